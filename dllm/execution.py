"""Sandboxed execution of untrusted Python against test cases.

Each run is a process forked from a trusted zygote interpreter (one per worker,
started once; its code is `dllm/sandbox_child.py`), so a run costs a fork, not an
interpreter start. A run has a wall-clock timeout per phase (loading the program,
then each test case), a CPU-time limit, an address-space limit, a cap on processes
and threads, a cap on output, a fresh working directory, a scrubbed environment
and an empty stdin; on Linux also new mount/pid/network/IPC namespaces, a
read-only file system, masked home directories, no capabilities and (as root) a
throwaway uid. Every outcome is a `Result`: the caller is never crashed or
stalled by what a program does.

Honest passing: a test passes only when the child reports, on a private pipe and
with a per-run nonce, that the test code ran to completion. Exit status and
printed text count for nothing. When a test times out or kills its process, the
run restarts at the next test (each test gets its own `timeout`, as in
DiffuCoder's reward), within a job budget of `total_timeout`.

Public API: `SandboxConfig`, `TestOutcome`, `Result`, `Job`, `run_tests`,
`run_program`, `execute_many`, `guarantees`, `sandbox_capabilities`.
"""
import atexit
import concurrent.futures
import dataclasses
import functools
import logging
import marshal
import math
import os
import re
import secrets
import selectors
import shutil
import signal
import socket
import struct
import subprocess
import sys
import tempfile
import threading
import time
from typing import Callable, Iterable, Sequence

STATUSES = ("passed", "failed", "timeout", "error", "killed")
_CHILD_SOURCE = (os.path.dirname(os.path.abspath(__file__)) + "/sandbox_child.py")
_OUTPUT_TAIL = 4096  # bytes of stdout+stderr kept in a Result
_UID_BASE, _UID_SPAN = 1_900_000_000, 100_000_000  # throwaway uids (as root)
_log = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class SandboxConfig:
    """Limits of one sandboxed run.

    timeout: wall seconds per phase (loading the program; each test case).
    total_timeout: wall seconds for the whole job; None = timeout * (tests + 1).
    memory_mb: address-space limit of each process.
    max_processes: processes + threads (enforced on Linux as root or in a user ns).
    max_output_bytes: stdout + stderr; the run is killed past it.
    max_file_mb: largest file written, and the size of the tmpfs working directory.
    max_open_files: file descriptors per process.
    isolate: use Linux namespaces when available (False: rlimits, uid, tempdir only).
    hide_paths: directories masked by an empty tmpfs (the caller's HOME is added).
    python: the interpreter that runs programs.
    """
    timeout: float = 5.0
    total_timeout: float | None = None
    memory_mb: int = 2048
    max_processes: int = 64
    max_output_bytes: int = 1 << 20
    max_file_mb: int = 64
    max_open_files: int = 256
    isolate: bool = True
    hide_paths: tuple[str, ...] = ("/root", "/home")
    python: str = sys.executable


def _check_status(status: str) -> None:
    if status not in STATUSES:
        raise ValueError(f"status must be one of {STATUSES}, got {status!r}")


@dataclasses.dataclass(frozen=True)
class TestOutcome:
    """One test case: status in STATUSES, and why."""
    status: str
    reason: str = ""

    def __post_init__(self):
        _check_status(self.status)


@dataclasses.dataclass(frozen=True)
class Result:
    """The outcome of one job.

    status: "passed" (every test ran to completion; with no tests, the program did),
      "failed" (a test raised, or the process exited during it), "timeout",
      "error" (the program did not load: syntax error, exception, exit), "killed"
      (a signal or the output cap). Otherwise the status of the first failing test.
    tests: one TestOutcome per test case, in order.
    output: the tail of stdout + stderr.  isolation / notes: what the sandbox applied
      and what it could not (see `sandbox_capabilities`).
    """
    status: str
    reason: str
    tests: tuple[TestOutcome, ...] = ()
    duration: float = 0.0
    output: str = ""
    isolation: tuple[str, ...] = ()
    notes: tuple[str, ...] = ()

    def __post_init__(self):
        _check_status(self.status)

    @property
    def passed(self) -> bool:
        return self.status == "passed"

    @property
    def n_passed(self) -> int:
        return sum(t.status == "passed" for t in self.tests)

    @property
    def pass_fraction(self) -> float:
        """Fraction of test cases passed (1/0 for a job without tests)."""
        return self.n_passed / len(self.tests) if self.tests else float(self.passed)


@dataclasses.dataclass(frozen=True)
class Job:
    """A program and its test cases (Python source strings run after it)."""
    program: str
    tests: tuple[str, ...] = ()


@dataclasses.dataclass
class _Attempt:
    """Mutable state of one child process running tests[first:]."""
    first: int
    n_tests: int
    outcomes: list = dataclasses.field(default_factory=list)
    loaded: bool = False
    load_error: str | None = None
    end: TestOutcome | None = None  # set when the process ended before reporting all
    init_pid: int | None = None
    isolation: tuple | None = None  # (features, notes), reported before the program runs
    output: bytes = b""
    output_bytes: int = 0

    @property
    def finished(self) -> bool:
        return self.load_error is not None or (
            self.loaded and self.first + len(self.outcomes) == self.n_tests)


@functools.lru_cache(maxsize=1)
def _child_source() -> str:
    with open(_CHILD_SOURCE) as f:
        return f.read()


def _limits(cfg: SandboxConfig, total: float) -> dict:
    return {"memory_bytes": cfg.memory_mb << 20, "cpu_seconds": math.ceil(total) + 1,
            "processes": cfg.max_processes, "file_bytes": cfg.max_file_mb << 20,
            "open_files": cfg.max_open_files, "tmpfs_bytes": cfg.max_file_mb << 20,
            "tmpfs_inodes": 10_000}


def _environment(workdir: str, python: str) -> dict:
    """A scrubbed environment: nothing inherited from the caller."""
    threads = {k: "1" for k in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS",
                                "MKL_NUM_THREADS", "NUMEXPR_NUM_THREADS")}
    return {"PATH": f"{os.path.dirname(python)}:/usr/local/bin:/usr/bin:/bin",
            "HOME": workdir, "TMPDIR": workdir, "LANG": "C.UTF-8",
            "MALLOC_ARENA_MAX": "2",  # glibc arenas would eat the address space
            **threads}


class _Zygote:
    """A `sandbox_child` zygote: a trusted interpreter that forks one child per job,
    so a run costs a fork, not an interpreter start. Jobs go over a Unix socket
    (payload + the write ends of the output and report pipes); it answers each job
    with the child's pid ("P") and, once reaped, its exit code ("X"), and on "K"
    kills the child's process group. It exits when our end of the socket closes."""

    _MESSAGE = struct.Struct("!cq")  # as in sandbox_child

    def __init__(self, key: tuple):
        python, isolate, hide_paths = key
        options = marshal.dumps({"isolate": isolate, "hide_paths": list(hide_paths)})
        ours, theirs = socket.socketpair()
        with theirs:
            self.proc = subprocess.Popen(
                [python, "-I", "-B", "-c", _child_source(), str(theirs.fileno()),
                 options.hex()],
                stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, cwd="/",
                env=_environment("/", python), pass_fds=(theirs.fileno(),),
                start_new_session=True)
        self.sock, self.key = ours, key
        self.sock.settimeout(_ZYGOTE_TIMEOUT)

    def start(self, payload: dict, out_fd: int, report_fd: int) -> int:
        """Send a job; returns the child's pid."""
        data = marshal.dumps(payload)
        socket.send_fds(self.sock, [self._MESSAGE.pack(b"J", len(data))],
                        [out_fd, report_fd])
        self.sock.sendall(data)
        return self._receive(b"P")

    def kill(self) -> None:
        self.sock.sendall(self._MESSAGE.pack(b"K", 0))

    def exit_code(self) -> int:
        """The child's exit code (< 0: killed by that signal); blocks until reaped."""
        return self._receive(b"X")

    def _receive(self, kind: bytes) -> int:
        data = b""
        while len(data) < self._MESSAGE.size:
            chunk = self.sock.recv(self._MESSAGE.size - len(data))
            if not chunk:
                raise ConnectionError("sandbox zygote exited")
            data += chunk
        got, value = self._MESSAGE.unpack(data)
        if got != kind:
            raise ConnectionError(f"sandbox zygote sent {got!r}, expected {kind!r}")
        return value

    def close(self) -> None:
        self.sock.close()  # the zygote kills its child, if any, and exits
        try:
            self.proc.wait(_ZYGOTE_TIMEOUT)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()


_ZYGOTE_TIMEOUT = 60.0  # seconds a trusted zygote may take to answer
_idle_zygotes: list[_Zygote] = []
_idle_lock = threading.Lock()


def _zygote_key(cfg: SandboxConfig) -> tuple:
    """What a zygote is set up for: interpreter, isolation, masked directories
    (the configured ones and the caller's HOME, never / nor the temp directory
    that holds the fallback working directories)."""
    temp = os.path.realpath(tempfile.gettempdir())

    def maskable(path: str) -> bool:
        real = os.path.realpath(path)
        return real != "/" and temp != real and not temp.startswith(real + "/")

    hide = (*cfg.hide_paths, os.path.expanduser("~")) if cfg.isolate else ()
    return cfg.python, cfg.isolate, tuple(filter(maskable, hide))


def _take_zygote(key: tuple) -> "_Zygote":
    """An idle zygote set up for `key`, or a new one."""
    with _idle_lock:
        found = [z for z in _idle_zygotes if z.key == key]
        if found:
            _idle_zygotes.remove(found[-1])
    if found and found[-1].proc.poll() is None:
        return found[-1]
    if found:
        found[-1].close()  # it died while idle
    return _Zygote(key)


def _give_back(zygote: "_Zygote") -> None:
    with _idle_lock:
        _idle_zygotes.append(zygote)


def _start_job(key: tuple, payload: dict, out_fd: int, report_fd: int):
    """(zygote, child pid) for a job; a zygote that died while idle is replaced once."""
    for retry in (False, True):
        zygote = _take_zygote(key)
        try:
            return zygote, zygote.start(payload, out_fd, report_fd)
        except (OSError, ConnectionError):
            zygote.close()
            if retry:
                raise


@atexit.register
def _close_zygotes() -> None:
    with _idle_lock:
        for zygote in _idle_zygotes:
            zygote.close()
        _idle_zygotes.clear()


def _forget_zygotes() -> None:
    """In a forked copy of this process: the zygotes belong to the original."""
    global _idle_lock
    _idle_lock = threading.Lock()  # another thread may have held it at fork time
    for zygote in _idle_zygotes:
        zygote.sock.close()
    _idle_zygotes.clear()


os.register_at_fork(after_in_child=_forget_zygotes)


def _unescape(text: str) -> str:
    return re.sub(r"\\(.)", lambda m: "\n" if m.group(1) == "n" else m.group(1), text)


def _handle_event(line: bytes, nonce: str, att: _Attempt) -> bool:
    """Apply one report line; False if it is not a genuine, in-order report."""
    parts = line.decode("utf-8", "replace").split(" ", 3)
    if len(parts) != 4 or not secrets.compare_digest(parts[0], nonce):
        return False
    _, kind, index, text = parts
    if not index.isdigit():
        return False
    text = _unescape(text)
    expected = att.first + len(att.outcomes)
    if kind == "init" and att.isolation is None and att.init_pid is None:
        att.init_pid = int(index)
    elif kind == "isolation" and att.isolation is None:
        features, _, notes = text.partition("|")
        att.isolation = (tuple(filter(None, features.split(","))),
                         tuple(filter(None, notes.split("|"))))
    elif kind == "loaded" and att.isolation is not None and not att.loaded:
        att.loaded = True
    elif kind == "load_error" and att.isolation is not None and not att.loaded:
        att.load_error = text
    elif kind in ("ok", "fail") and att.loaded and int(index) == expected:
        att.outcomes.append(TestOutcome("passed") if kind == "ok"
                            else TestOutcome("failed", text))
    else:
        return False
    return True


def _watch(zygote: _Zygote, out_fd: int, report_fd: int, nonce: str, att: _Attempt,
           cfg: SandboxConfig, job_deadline: float) -> int | None:
    """Read output and reports until the attempt finishes, the child exits, a phase
    or the job runs out of time, or output passes the cap (then att.end is set).
    Returns the child's exit code if it exited."""
    sel = selectors.DefaultSelector()
    sel.register(out_fd, selectors.EVENT_READ, "out")
    sel.register(report_fd, selectors.EVENT_READ, "report")
    sel.register(zygote.sock, selectors.EVENT_READ, "zygote")
    pending, phase_deadline, exit_code = b"", time.monotonic() + cfg.timeout, None
    try:
        while not att.finished:
            now = time.monotonic()
            if now >= min(phase_deadline, job_deadline):
                att.end = TestOutcome("timeout", "job time limit reached"
                                      if now >= job_deadline else
                                      f"exceeded the {cfg.timeout:g} s time limit")
                return exit_code
            # Once the child has exited, drain what its pipes still hold, then stop.
            ready = sel.select(0 if exit_code is not None else
                               min(phase_deadline, job_deadline) - now)
            for key, _ in ready:
                if key.data == "zygote":
                    exit_code = zygote.exit_code()
                    sel.unregister(key.fileobj)
                    continue
                data = os.read(key.fd, 1 << 16)
                if not data:
                    sel.unregister(key.fd)
                    continue
                att.output_bytes += len(data)
                if att.output_bytes > cfg.max_output_bytes:
                    att.end = TestOutcome("killed", f"output exceeded "
                                          f"{cfg.max_output_bytes} bytes")
                    return exit_code
                if key.data == "out":
                    att.output = (att.output + data)[-_OUTPUT_TAIL:]
                    continue
                *lines, pending = (pending + data).split(b"\n")
                if sum(_handle_event(line, nonce, att) for line in lines):
                    phase_deadline = time.monotonic() + cfg.timeout
            if exit_code is not None and not ready and not att.finished:
                att.end = _exit_outcome(exit_code, att)
                return exit_code
        return exit_code
    finally:
        sel.close()


def _exit_outcome(exit_code: int, att: _Attempt) -> TestOutcome:
    """How a child that ended on its own ended, for the phase it was in."""
    if att.isolation is None:  # before any untrusted code ran
        return TestOutcome("error", f"sandbox set-up failed (exit code {exit_code}); "
                           "see the output")
    where = "while a test ran" if att.loaded else "while loading the program"
    if exit_code < 0:
        name = (signal.Signals(-exit_code).name if -exit_code in signal.valid_signals()
                else str(-exit_code))
        hint = " (CPU time limit)" if name == "SIGXCPU" else ""
        return TestOutcome("killed", f"killed by {name}{hint} {where}")
    status = "failed" if att.loaded else "error"
    return TestOutcome(status, f"exited with code {exit_code} {where}")


def _kill(zygote: _Zygote, pid: int, att: _Attempt) -> None:
    """SIGKILL the pid namespace's init (everything inside dies with it), then have
    the zygote kill the child's process group and reap it. The init is only killed
    while it is still the child's child: never a stray pid."""
    if att.init_pid is not None:
        try:
            with open(f"/proc/{att.init_pid}/stat") as f:
                parent = int(f.read().rsplit(")", 1)[1].split()[1])
            if parent == pid:
                os.kill(att.init_pid, signal.SIGKILL)
        except (OSError, ValueError, IndexError):
            pass
    zygote.kill()
    zygote.exit_code()


def _sweep_uid(uid: int, python: str) -> None:
    """Kill every process of a throwaway uid (root without a pid namespace, where a
    program's setsid'd children would otherwise outlive the run)."""
    code = (f"import os; os.setgroups([]); os.setresgid({uid}, {uid}, {uid}); "
            f"os.setresuid({uid}, {uid}, {uid}); os.kill(-1, 9)")
    subprocess.run([python, "-I", "-S", "-c", code], stdin=subprocess.DEVNULL,
                   stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, timeout=30)


def _run_attempt(program: str, tests: Sequence[str], first: int, cfg: SandboxConfig,
                 job_deadline: float, total: float) -> _Attempt:
    """One sandboxed child: the program, then tests[first:]."""
    att, nonce = _Attempt(first, len(tests)), secrets.token_hex(16)
    uid = _UID_BASE + secrets.randbelow(_UID_SPAN) if os.geteuid() == 0 else None
    workdir = tempfile.mkdtemp(prefix="dllm-sandbox-")
    payload = {"nonce": nonce, "program": program, "tests": list(tests), "first": first,
               "uid": uid, "workdir": workdir, "env": _environment(workdir, cfg.python),
               "limits": _limits(cfg, total)}
    (out_r, out_w), (report_r, report_w) = os.pipe(), os.pipe()
    try:
        try:
            zygote, pid = _start_job(_zygote_key(cfg), payload, out_w, report_w)
        finally:
            os.close(out_w)
            os.close(report_w)
        try:
            if _watch(zygote, out_r, report_r, nonce, att, cfg, job_deadline) is None:
                _kill(zygote, pid, att)
        except (OSError, ConnectionError) as exc:  # the zygote died: the run did too
            zygote.close()
            att.end = att.end or TestOutcome("killed", f"sandbox zygote lost: {exc}")
        except BaseException:  # e.g. KeyboardInterrupt: closing makes the zygote kill it
            zygote.close()
            raise
        else:
            _give_back(zygote)
        features = att.isolation[0] if att.isolation else ()
        if uid is not None and "uid" in features and "pidns" not in features:
            _sweep_uid(uid, cfg.python)
    finally:
        os.close(out_r)
        os.close(report_r)
        shutil.rmtree(workdir, ignore_errors=True)
    return att


def _summary(outcomes: list, n_tests: int, load_ok: bool) -> tuple[str, str]:
    """The job's status and reason from its test outcomes."""
    for i, outcome in enumerate(outcomes):
        if outcome.status != "passed":
            where = f"test {i}: " if n_tests and load_ok else ""
            return outcome.status, where + outcome.reason
    return "passed", (f"all {n_tests} tests passed" if n_tests
                      else "the program ran to completion")


def run_tests(program: str, tests: Sequence[str] = (),
              config: SandboxConfig | None = None) -> Result:
    """Run `program`, then each test case in its namespace, in the sandbox.

    Args:
      program: Python source (e.g. a HumanEval prompt + completion).
      tests: Python sources, each one test case (asserts, or `check(f)` code); a
        test passes when it runs to completion.
      config: limits; SandboxConfig() by default.
    Returns:
      a Result. Never raises: a failure of the sandbox itself is an "error" Result.
    """
    try:
        return _run_tests(program, tuple(tests), config or SandboxConfig())
    except Exception as exc:  # noqa: BLE001 - the caller must get a Result
        return Result("error", f"sandbox failure: {type(exc).__name__}: {exc}")


def _run_tests(program: str, tests: tuple, cfg: SandboxConfig) -> Result:
    """run_tests: one attempt, then one more after each test that ended its process."""
    total = cfg.total_timeout or cfg.timeout * (len(tests) + 1)
    start = time.monotonic()
    outcomes, output, att = [], b"", None
    while att is None or len(outcomes) < len(tests):
        if att is not None and time.monotonic() >= start + total:
            outcomes += [TestOutcome("timeout", "not run: job time limit reached")] * (
                len(tests) - len(outcomes))
            break
        att = _run_attempt(program, tests, len(outcomes), cfg, start + total, total)
        output = (output + att.output)[-_OUTPUT_TAIL:]
        outcomes += att.outcomes
        if not att.loaded:  # the program itself did not load: no test can pass
            failure = (TestOutcome("error", att.load_error) if att.load_error is not None
                       else att.end)
            outcomes += [failure] * (len(tests) - len(outcomes))
            outcomes = outcomes or [failure]
            break
        if att.end is not None and len(outcomes) < len(tests):
            outcomes.append(att.end)  # this test broke the process; go on after it
    status, reason = _summary(outcomes, len(tests), att.loaded)
    features, notes = att.isolation or ((), ("the sandbox reported no isolation",))
    _warn_once(notes)
    return Result(status, reason, tuple(outcomes[:len(tests)]),
                  time.monotonic() - start, output.decode("utf-8", "replace"),
                  features, notes)


def run_program(program: str, config: SandboxConfig | None = None) -> Result:
    """Run a program without test cases: passed iff it ran to completion."""
    return run_tests(program, (), config)


@functools.lru_cache(maxsize=None)
def _warn_once(notes: tuple[str, ...]) -> None:
    for note in notes:
        _log.warning("sandbox: %s", note)


def execute_many(jobs: Iterable[Job | tuple], workers: int | None = None,
                 timeout: float | None = None, config: SandboxConfig | None = None,
                 progress: Callable[[int], object] | None = None) -> list[Result]:
    """Run many jobs on a bounded pool; results in input order.

    Args:
      jobs: Job, or (program, tests) tuples.
      workers: concurrent runs (default: CPU count).
      timeout: overrides config.timeout (seconds per phase).
      config: limits; SandboxConfig() by default.
      progress: called with 1 after each finished job (e.g. tqdm's update).
    """
    cfg = config or SandboxConfig()
    if timeout is not None:
        cfg = dataclasses.replace(cfg, timeout=timeout)
    jobs = [j if isinstance(j, Job) else Job(j[0], tuple(j[1])) for j in jobs]
    results: list = [None] * len(jobs)
    workers = max(1, min(workers or os.cpu_count() or 1, len(jobs) or 1))
    with concurrent.futures.ThreadPoolExecutor(workers) as pool:
        futures = {pool.submit(run_tests, job.program, job.tests, cfg): i for i, job in enumerate(jobs)}
        for future in concurrent.futures.as_completed(futures):
            results[futures[future]] = future.result()
            if progress is not None:
                progress(1)
    return results


def guarantees(features: Sequence[str]) -> dict[str, bool]:
    """What a run with these isolation features is protected against.

    network: no network at all (an empty network namespace).
    filesystem: nothing outside the run's own tmpfs can be written.
    process_cap: max_processes binds (RLIMIT_NPROC under a non-root uid).
    process_tree: no process outlives the run (pid namespace, or a uid to sweep).
    parent: the caller's processes cannot be signalled or read (own pid namespace
      with a fresh /proc, or another uid).
    memory: the address-space limit binds (Linux).
    """
    features = set(features)
    return {"network": "netns" in features,
            "filesystem": {"read-only-fs", "tmpfs-workdir"} <= features,
            "process_cap": "uid" in features or (os.geteuid() != 0 and "rlimits" in features),
            "process_tree": "pidns" in features or "uid" in features,
            "parent": "fresh-proc" in features or "uid" in features,
            "memory": "rlimits" in features and sys.platform.startswith("linux")}


@functools.lru_cache(maxsize=None)
def sandbox_capabilities(config: SandboxConfig | None = None) -> dict:
    """What the sandbox applies on this machine, found by running a trivial program.

    Returns {"features": [...], "notes": [...], "guarantees": {name: bool}}:
    features as in Result.isolation (netns, mountns, pidns, read-only-fs,
    tmpfs-workdir, uid, no-caps, rlimits, ...), notes on what is missing, and
    `guarantees(features)`.
    """
    result = run_program("pass", config)
    return {"features": list(result.isolation), "notes": list(result.notes),
            "guarantees": guarantees(result.isolation)}
