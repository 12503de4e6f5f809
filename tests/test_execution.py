"""Sandboxed execution: statuses, honest passing, containment of hostile programs.

Hostile tests run only where the sandbox reports the guarantee they rely on
(sandbox_capabilities()["guarantees"]); elsewhere they are skipped with the reason,
so this file never damages a machine without namespaces.
"""
import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import textwrap
import time
import uuid

import pytest

from dllm import execution as ex

FAST = ex.SandboxConfig(timeout=1.0)
GUARANTEES = ex.sandbox_capabilities()["guarantees"]
ADD = "def add(a, b):\n    return a + b\n"


def needs(*names):
    missing = [n for n in names if not GUARANTEES[n]]
    return pytest.mark.skipif(bool(missing), reason=f"sandbox lacks {missing} here: "
                              f"{ex.sandbox_capabilities()['notes']}")


def run(program, tests=("assert add(1, 2) == 3",), config=FAST):
    return ex.run_tests(textwrap.dedent(program), tests, config)


# ---- statuses and reasons ----

def test_passing_program_reports_every_test():
    result = run(ADD, ["assert add(1, 2) == 3", "assert add(-1, 1) == 0"])
    assert result.status == "passed" and result.passed
    assert [t.status for t in result.tests] == ["passed", "passed"]
    assert result.pass_fraction == 1.0


def test_failed_assertion_names_the_line():
    result = run(ADD, ["assert add(1, 2) == 3", "assert add(2, 2) == 5"])
    assert result.status == "failed"
    assert [t.status for t in result.tests] == ["passed", "failed"]
    assert "assert add(2, 2) == 5" in result.tests[1].reason
    assert result.pass_fraction == 0.5


@pytest.mark.parametrize("program, kind", [("def add(a, b) return a", "SyntaxError"),
                                           ("raise ValueError('boom')", "ValueError")])
def test_program_that_does_not_load_is_an_error(program, kind):
    result = run(program, ["assert add(1, 2) == 3", "assert True"])
    assert result.status == "error" and kind in result.reason
    assert [t.status for t in result.tests] == ["error", "error"]


def test_run_program_without_tests():
    assert ex.run_program("x = sum(range(10))\nprint(x)").passed
    result = ex.run_program("print('hi')\nraise SystemExit(3)")
    assert result.status == "error" and "hi" in result.output


def test_each_test_has_its_own_timeout_and_the_run_resumes_after_it():
    result = run(ADD, ["while True: pass", "assert add(1, 1) == 2", "import os; os._exit(0)",
                       "assert add(2, 2) == 4"])
    assert [t.status for t in result.tests] == ["timeout", "passed", "failed", "passed"]
    assert result.status == "timeout" and result.pass_fraction == 0.5


def test_job_time_limit_caps_the_whole_job():
    cfg = ex.SandboxConfig(timeout=1.0, total_timeout=1.8)
    result = run(ADD, ["while True: pass"] * 4, cfg)
    assert result.status == "timeout"
    assert all(t.status == "timeout" for t in result.tests)
    assert "1 s time limit" in result.tests[0].reason  # its own limit came first
    assert [t.reason for t in result.tests[2:]] == ["not run: job time limit reached"] * 2


def test_state_carries_between_tests_like_one_program():
    result = run("counter = []\ndef bump():\n    counter.append(1)\n    return len(counter)\n",
                 ["assert bump() == 1", "assert bump() == 2"])
    assert result.passed


def test_libraries_and_the_working_directory_are_usable():
    program = """
    import json, os, tempfile, collections
    with open("scratch.txt", "w") as f:
        f.write("data")
    with tempfile.NamedTemporaryFile("w", delete=False) as f:
        f.write("x")
    ok = open("scratch.txt").read() == "data" and os.path.exists(f.name)
    """
    assert run(program, ["assert ok"]).passed


def test_program_sees_an_empty_stdin():
    assert run("import sys\ndata = sys.stdin.read()", ["assert data == ''"]).passed


# ---- honest passing: only tests that ran to completion count ----

@pytest.mark.parametrize("early_exit", ["import sys; sys.exit(0)", "quit()", "exit()",
                                        "import os; os._exit(0)", "raise SystemExit"])
def test_exiting_before_the_tests_run_does_not_pass(early_exit):
    result = run(ADD + early_exit)
    assert not result.passed and result.n_passed == 0


def test_exiting_inside_the_tested_function_does_not_pass():
    program = "import os, sys\ndef add(a, b):\n    sys.stdout.flush()\n    os._exit(0)\n"
    result = run(program, ["assert add(1, 2) == 3", "assert add(0, 0) == 0"])
    assert [t.status for t in result.tests] == ["failed", "failed"]
    result = run("import sys\ndef add(a, b):\n    sys.exit(0)\n")
    assert result.status == "failed" and "SystemExit" in result.reason


def test_printing_what_a_naive_harness_looks_for_does_not_pass():
    program = ADD.replace("a + b", "a - b") + "print('passed'); print('ok 0'); print('PASSED 1/1')"
    assert run(program).status == "failed"


def test_forged_reports_on_every_descriptor_do_not_pass():
    program = ADD.replace("a + b", "a - b") + textwrap.dedent("""
    import os
    for fd in range(0, 64):
        for line in (b"ok 0\\n", b"0 ok 0 \\n", b"x loaded 0 \\nx ok 0 \\n"):
            try:
                os.write(fd, line)
            except OSError:
                pass
    """)
    assert run(program).status == "failed"


def test_closing_the_report_pipe_loses_passes_not_gains_them():
    program = ADD + "import os\nfor fd in range(3, 64):\n    try:\n        os.close(fd)\n" \
                    "    except OSError:\n        pass\n"
    assert not run(program).passed


def test_tampering_with_builtins_and_the_runner_does_not_pass():
    program = ADD.replace("a + b", "a - b") + textwrap.dedent("""
    import builtins, sys
    builtins.exec = lambda *a, **k: None
    builtins.compile = lambda *a, **k: compile("pass", "x", "exec")
    builtins.BaseException = type("Nothing", (Exception,), {})
    builtins.AssertionError = type("Nothing", (Exception,), {})
    main = sys.modules.get("__main__")
    if main is not None:
        for name in list(vars(main)):
            if callable(getattr(main, name)):
                setattr(main, name, lambda *a, **k: None)
    """)
    assert run(program).status == "failed"


def test_catching_the_assertion_inside_the_program_does_not_help():
    program = ADD.replace("a + b", "a - b") + "import sys\nsys.excepthook = lambda *a: None\n"
    assert run(program).status == "failed"


# ---- containment of hostile programs ----

def test_infinite_loop_times_out_and_the_call_returns():
    start = time.monotonic()
    result = run("while True:\n    pass\n")
    assert result.status == "timeout" and not result.passed
    assert time.monotonic() - start < 30  # generous outer bound: the call came back


def _sandbox_processes():
    """pids of processes running as a sandbox uid (root) or named like our marker."""
    found = []
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            with open(f"/proc/{pid}/status") as f:
                status = f.read()
        except OSError:
            continue
        uid = int(status.split("Uid:")[1].split()[0])
        state = status.split("State:")[1].split()[0]
        if ex._UID_BASE <= uid < ex._UID_BASE + ex._UID_SPAN and state != "Z":
            found.append(int(pid))
    return found


def _wait_until(predicate, seconds=10.0):
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.1)
    return predicate()


@needs("process_cap", "process_tree")
def test_fork_bomb_is_capped_and_cleaned_up():
    bomb = "import os\nwhile True:\n    try:\n        os.fork()\n    except OSError:\n        pass\n"
    cfg = ex.SandboxConfig(timeout=1.5, max_processes=16)
    result = ex.run_tests(bomb, ["assert True"], cfg)
    assert not result.passed and result.status in ("timeout", "killed")
    if os.geteuid() == 0:  # the throwaway uids are visible: none may be left running
        assert _wait_until(lambda: not _sandbox_processes())
    assert run(ADD).passed  # and the sandbox keeps working


@needs("process_cap")
def test_thread_bomb_is_capped():
    program = "import threading, time\nwhile True:\n    threading.Thread(target=time.sleep, " \
              "args=(60,), daemon=True).start()\n"
    result = run(program, config=ex.SandboxConfig(timeout=3.0, max_processes=16))
    assert result.status == "error" and "thread" in result.reason


@needs("memory")
def test_memory_bomb_fails_within_the_limit():
    program = "chunks = []\nwhile True:\n    chunks.append(bytearray(1 << 24))\n"
    result = run(program, config=ex.SandboxConfig(timeout=10.0, memory_mb=256))
    assert not result.passed and "MemoryError" in result.reason


def test_huge_output_is_capped_and_killed():
    program = "import sys\nfor _ in range(100):\n    sys.stdout.write('x' * 10**6)\n"
    result = run(program, config=ex.SandboxConfig(timeout=10.0, max_output_bytes=1 << 20))
    assert result.status == "killed" and "output" in result.reason
    assert len(result.output) <= 4096


@needs("filesystem")
def test_writes_outside_the_working_directory_do_not_land(tmp_path):
    os.chmod(tmp_path, 0o777)  # even a world-writable directory is out of reach
    name = f"dllm-pwned-{uuid.uuid4().hex}"
    targets = sorted({str(tmp_path / name), os.path.join(os.getcwd(), name),
                      os.path.join(os.path.expanduser("~"), name), f"/var/tmp/{name}",
                      f"/tmp/{name}"})
    # Inside the sandbox /tmp is the run's own tmpfs: writable, and never the host's.
    own_tmp = [t for t in targets if os.path.dirname(t) == "/tmp"]
    program = "written = []\n" + "".join(
        f"try:\n    open({t!r}, 'w').write('x'); written.append({t!r})\n"
        f"except OSError:\n    pass\n" for t in targets)
    result = run(program, [f"assert written == {own_tmp!r}"])
    assert result.passed, result.reason
    for target in targets:
        assert not os.path.exists(target)


@needs("parent")
def test_environment_secrets_of_the_parent_are_unreadable(monkeypatch):
    secret = f"dllm-secret-{uuid.uuid4().hex}"
    monkeypatch.setenv("DLLM_TEST_SECRET", secret)
    program = textwrap.dedent("""
    import glob, os
    leak = repr(dict(os.environ))
    for path in glob.glob("/proc/*/environ"):
        try:
            leak += open(path, "rb").read().decode(errors="replace")
        except OSError:
            pass
    print(leak[-3000:])
    """)
    result = run(program, [f"assert {secret!r} in leak"])
    assert result.status == "failed"
    assert secret not in result.output


@needs("network")
def test_network_connections_fail():
    with socket.socket() as server:
        server.bind(("127.0.0.1", 0))
        server.listen()
        server.settimeout(0.2)
        port = server.getsockname()[1]
        program = (f"import socket\ns = socket.create_connection(('127.0.0.1', {port}), "
                   f"timeout=2)\ns.sendall(b'leak')\nconnected = True\n")
        result = run(program, ["assert connected"])
        assert result.status == "error" and "OSError" in result.reason
        with pytest.raises(socket.timeout):
            server.accept()


@needs("parent", "process_tree")
def test_killing_the_parent_kills_nothing_outside():
    """A throwaway parent runs the program; it must survive to report."""
    hostile = textwrap.dedent("""
    import os, signal
    for target in [os.getppid()] + [int(p) for p in os.listdir("/proc") if p.isdigit()]:
        if target not in (0, os.getpid()):
            try:
                os.kill(target, signal.SIGKILL)
            except OSError:
                pass
    try:
        os.kill(-1, signal.SIGKILL)
    except OSError:
        pass
    def add(a, b):
        return 0
    """)
    parent = (f"import json\nfrom dllm import execution\n"
              f"r = execution.run_tests({hostile!r}, ['assert add(1, 2) == 3'])\n"
              f"print(json.dumps([r.status, r.reason]))\n")
    done = subprocess.run([sys.executable, "-c", parent], capture_output=True, text=True,
                          timeout=120, env={**os.environ, "PYTHONPATH": os.getcwd()})
    assert done.returncode == 0, done.stderr
    status, reason = json.loads(done.stdout.strip().splitlines()[-1])
    assert status == "failed", reason


def _marked_processes(marker):
    found = []
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            with open(f"/proc/{pid}/comm") as f:
                if f.read().strip() == marker:
                    found.append(int(pid))
        except OSError:
            pass
    return found


@needs("process_tree")
def test_background_process_does_not_outlive_the_run():
    marker = f"dllm{uuid.uuid4().hex[:8]}"  # comm names are at most 15 bytes
    program = textwrap.dedent(f"""
    import ctypes, os, time
    libc = ctypes.CDLL(None)
    if os.fork() == 0:
        os.setsid()
        libc.prctl(1, 0)  # clear the parent-death signal
        libc.prctl(15, {marker.encode()!r})  # PR_SET_NAME: visible in /proc/PID/comm
        while True:
            time.sleep(0.05)
    time.sleep(0.5)
    while True:
        pass
    """)
    try:
        result = run(program)
        assert result.status == "timeout"
        assert _wait_until(lambda: not _marked_processes(marker))
    finally:
        for pid in _marked_processes(marker):
            os.kill(pid, signal.SIGKILL)


def test_stdin_is_not_the_callers():
    result = run("import sys\nline = sys.stdin.readline()\n", ["assert line == ''"])
    assert result.passed


# ---- the pool ----

def test_pool_keeps_input_order_and_goes_on_past_hostile_jobs():
    jobs = [(ADD, ["assert add(1, 1) == 2"]), ("while True: pass", ["assert True"]),
            (ADD, ["assert add(1, 1) == 3"]), ("import sys\nsys.stdout.write('x' * 10**7)", []),
            ex.Job(ADD, ("assert add(2, 3) == 5",))]
    results = ex.execute_many(jobs, workers=2, timeout=1.0)
    assert [r.status for r in results] == ["passed", "timeout", "failed", "killed", "passed"]


def test_pool_reports_progress_and_handles_no_jobs():
    ticks = []
    assert ex.execute_many([], workers=2) == []
    ex.execute_many([(ADD, ["assert add(0, 0) == 0"])] * 3, workers=2, progress=ticks.append)
    assert ticks == [1, 1, 1]


def test_a_dead_zygote_is_replaced():
    assert run(ADD).passed
    for zygote in list(ex._idle_zygotes):
        zygote.proc.kill()
        zygote.proc.wait()
    assert run(ADD).passed


def test_without_namespaces_the_basics_still_hold():
    cfg = ex.SandboxConfig(timeout=1.0, isolate=False)
    assert ex.run_tests(ADD, ["assert add(1, 2) == 3"], cfg).passed
    assert ex.run_tests(ADD + "import sys; sys.exit(0)", ["assert True"], cfg).status == "error"
    assert ex.run_tests("while True: pass", ["assert True"], cfg).status == "timeout"
    assert "isolation disabled by configuration" in ex.run_program("pass", cfg).notes


def test_masks_never_cover_root_or_the_temp_directory(monkeypatch):
    monkeypatch.setenv("HOME", "/")
    temp = tempfile.gettempdir()
    cfg = ex.SandboxConfig(hide_paths=("/root", temp, os.path.dirname(temp), "/srv/data"))
    python, isolate, hidden = ex._zygote_key(cfg)
    assert hidden == ("/root", "/srv/data")
    assert ex._zygote_key(ex.SandboxConfig(isolate=False))[2] == ()


def test_guarantees_follow_from_features():
    assert not any(ex.guarantees([]).values())
    full = ex.guarantees(["netns", "read-only-fs", "tmpfs-workdir", "pidns", "fresh-proc",
                          "uid", "rlimits"])
    assert full["network"] and full["filesystem"] and full["process_tree"] and full["parent"]
    assert full["process_cap"]
    assert not ex.guarantees(["read-only-fs"])["filesystem"]  # needs its own tmpfs too
