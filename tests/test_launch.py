"""launch.tpu (dry-run argument lists, quoting of the remote command, the preemption
watcher against a fake gcloud) and launch.local (N processes, failure handling)."""
import json
import os
import shlex
import subprocess
import sys
import tempfile
import time

import numpy as np
import pytest

import subprocess_runs as runs
from launch import local, tpu

ROOT = runs.ROOT
SA = "trainer@proj-b.iam.gserviceaccount.com"
SHAPES = [  # (flags, expected zone, project, accelerator, runtime version, capacity flags)
    (["--name=tiny-a", "--project=proj-a", "--zone=us-east5-a", "--accelerator=v5p-8", "--spot"],
     "us-east5-a", "proj-a", "v5p-8", "v2-alpha-tpuv5", ["--spot"]),
    (["--name=pod-b", "--project=proj-b", "--zone=us-west4-a", "--accelerator=v5litepod-32",
      "--reserved", f"--service_account={SA}"], "us-west4-a", "proj-b", "v5litepod-32",
     "v2-alpha-tpuv5-lite", ["--reserved", f"--service-account={SA}",
                             "--scopes=https://www.googleapis.com/auth/cloud-platform"]),
]


def dry_run(capsys, *argv) -> list[list[str]]:
    """The commands `python -m launch.tpu ARGV --dry-run` prints, as argument lists."""
    argv = list(argv)
    argv.insert(argv.index("--") if "--" in argv else len(argv), "--dry-run")
    assert tpu.main(argv) == 0
    lines = capsys.readouterr().out.splitlines()
    return [shlex.split(line) for line in lines if line and not line.startswith("#")]


def remote_words(command: list[str]) -> list[str]:
    """The shell words of an ssh command's --command."""
    return shlex.split(next(a for a in command if a.startswith("--command="))[len("--command="):])


@pytest.mark.parametrize("shape", SHAPES, ids=["v5p-8-spot", "v5litepod-32-reserved"])
def test_dry_run_argument_lists(shape, capsys):
    flags, zone, project, accelerator, version, capacity = shape
    name = flags[0].split("=")[1]
    loc = [f"--zone={zone}", f"--project={project}"]
    base = flags[:3]
    assert dry_run(capsys, "create", *flags) == [
        ["gcloud", "compute", "tpus", "queued-resources", "create", name, f"--node-id={name}",
         f"--accelerator-type={accelerator}", f"--runtime-version={version}", *capacity, *loc],
        ["gcloud", "compute", "tpus", "queued-resources", "describe", name,
         "--format=value(state.state)", *loc]]

    tar = os.path.join(tempfile.gettempdir(), f"dllm-{name}.tar.gz")
    scp, ssh = dry_run(capsys, "setup", *base)
    assert scp == ["gcloud", "compute", "tpus", "tpu-vm", "scp", tar, f"{name}:~/dllm.tar.gz",
                   "--worker=all", *loc]
    assert ssh[:7] == ["gcloud", "compute", "tpus", "tpu-vm", "ssh", name, "--worker=all"]
    assert ssh[8:] == loc
    words = remote_words(ssh)
    install = words[words.index("pip"):]
    assert install[:2] == ["pip", "install"] and install[-2:] == ["-e", "~/dllm[tpu]"]
    assert "3.12" in words and "~/dllm.tar.gz" in words

    (run,) = dry_run(capsys, "run", *base, "--config=experiments/pretrain.py:7b",
                     "--workdir=gs://bkt/runs/x", "--env=LIBTPU_INIT_ARGS=--xla_a=1 --xla_b=2",
                     "--", "--config.train.lr=1e-4")
    assert run[:7] == ["gcloud", "compute", "tpus", "tpu-vm", "ssh", name, "--worker=all"]
    assert run[8:] == loc
    # What the workers run (the words sh sees, after the outer shell removed its quotes):
    inner = shlex.split(remote_words(run)[remote_words(run).index("-c") + 1])
    start = inner.index("env")
    assert inner[start:inner.index("&", start)] == [
        "env", "PYTHONUNBUFFERED=1", "LIBTPU_INIT_ARGS=--xla_a=1 --xla_b=2",
        "~/dllm-venv/bin/python", "-m", "dllm.main", "--config=experiments/pretrain.py:7b",
        "--workdir=gs://bkt/runs/x", "--config.train.lr=1e-4"]

    assert dry_run(capsys, "delete", *base) == [
        ["gcloud", "compute", "tpus", "queued-resources", "delete", name, "--force", "--quiet",
         *loc]]
    (stop,) = dry_run(capsys, "stop", *base)
    assert stop[6] == "--worker=all" and "kill" in remote_words(stop)


def test_bad_flags_fail_before_running_anything(capsys):
    base = ["--name=a", "--project=p", "--zone=z"]
    with pytest.raises(ValueError, match="not a file under"):
        tpu.main(["run", *base, "--config=/etc/passwd", "--workdir=gs://b/r", "--dry-run"])
    with pytest.raises(ValueError, match="KEY=VALUE"):
        tpu.main(["run", *base, "--config=experiments/sft.py", "--workdir=gs://b/r",
                  "--env=1X=2", "--dry-run"])
    with pytest.raises(ValueError, match="no default runtime version"):
        tpu.main(["create", *base, "--accelerator=v9-8", "--dry-run"])
    for argv in (["up", *base, "--accelerator=v5p-8", "--config=experiments/sft.py",
                  "--workdir=/local/run"],                          # up needs a gs:// workdir
                 ["create", "--name=Bad_Name", "--project=p", "--zone=z", "--accelerator=v5p-8"],
                 ["create", *base, "--accelerator=v5p-8", "--spot", "--reserved"],
                 ["delete", *base, "--", "--config.x=1"]):
        with pytest.raises(SystemExit):
            tpu.main([*argv, "--dry-run"])
    assert capsys.readouterr().out == ""


# ----------------------------------------------------------------------------- fake workers

FAKE_DLLM_PYTHON = """#!{python}
# Stands in for ~/dllm-venv/bin/python on a fake worker: records what it was given; on
# worker 0's first run where FAKE_GCLOUD_DIR/preempt exists, saves-and-stops as on a
# preemption notice and marks the slice to be reclaimed (the fake gcloud's describe then
# reports SUSPENDED); where FAKE_GCLOUD_DIR/hang exists, runs until SIGTERM.
import json, os, sys
d, home = os.environ["FAKE_GCLOUD_DIR"], os.environ["HOME"]
with open(os.path.join(d, "runs.jsonl"), "a") as f:
    env = {{k: os.environ.get(k) for k in ("PYTHONUNBUFFERED", "MY_VAR")}}
    f.write(json.dumps({{"home": home, "cwd": os.getcwd(), "argv": sys.argv[1:],
                        "env": env}}) + "\\n")
first = sum(json.loads(l)["home"] == home for l in open(os.path.join(d, "runs.jsonl"))) == 1
if os.path.exists(os.path.join(d, "hang")):  # until SIGTERM, then save and stop as dllm does
    import signal
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(print("preempted: saved step 3 in ...")))
    print("training", flush=True)
    while True:
        signal.pause()
elif first and home.endswith("worker0") and os.path.exists(os.path.join(d, "preempt")):
    os.remove(os.path.join(d, "preempt"))
    open(os.path.join(d, "reclaim"), "w").close()
    print("preempted: saved step 8 in gs://bkt/run/checkpoints; rerun the same command")
else:
    print("--- sample ---")
"""

FAKE_UV = """#!/bin/sh
# uv on a fake worker: `uv venv ... DIR` puts the fake python in DIR/bin.
if [ "$1" = venv ]; then for a; do dir=$a; done; mkdir -p "$dir/bin"
  cp "$FAKE_GCLOUD_DIR/dllm_python" "$dir/bin/python"; chmod +x "$dir/bin/python"; fi
"""

FAKE_GCLOUD = """#!{python}
# gcloud compute tpus ... for the tests: a slice of two workers, each a directory used as
# HOME by the commands ssh runs (with bash, as a worker's login shell would).
import json, os, shutil, subprocess, sys
d = os.environ["FAKE_GCLOUD_DIR"]
args = sys.argv[1:]
with open(os.path.join(d, "calls.jsonl"), "a") as f:
    f.write(json.dumps(args) + "\\n")
flags = dict(a[2:].split("=", 1) for a in args if a.startswith("--") and "=" in a)
state = os.path.join(d, "state")
workers = [os.path.join(d, f"worker{{i}}") for i in range(2)]
worker = flags.get("worker", "0")
chosen = workers if worker == "all" else [workers[int(worker)]]
what = args[2:4]
if what == ["queued-resources", "create"]:
    for w in workers:  # a new slice: fresh disks with the runtime image's tools
        shutil.rmtree(w, ignore_errors=True)
        os.makedirs(os.path.join(w, ".local", "bin"))
        shutil.copy(os.path.join(d, "uv"), os.path.join(w, ".local", "bin", "uv"))
    open(state, "w").write(os.environ.get("FAKE_CREATED_STATE", "PROVISIONING"))
elif what == ["queued-resources", "describe"]:
    if not os.path.exists(state):
        sys.exit("ERROR: (gcloud.compute.tpus.queued-resources.describe) NOT_FOUND: " + args[4])
    current = open(state).read()
    if current == "PROVISIONING":
        open(state, "w").write("ACTIVE")
    reclaim = os.path.join(d, "reclaim")
    if current == "ACTIVE" and os.path.exists(reclaim) and \\
            os.path.exists(os.path.join(workers[0], "dllm.exit")):
        os.remove(reclaim)
        open(state, "w").write(current := "SUSPENDED")
    print(current)
elif what == ["queued-resources", "delete"]:
    os.remove(state)
elif what[0] == "tpu-vm" and what[1] == "scp":
    for w in chosen:
        shutil.copy(args[4], os.path.join(w, "dllm.tar.gz"))
elif what[0] == "tpu-vm" and what[1] == "ssh":
    for w in chosen:
        env = {{**os.environ, "HOME": w, "PATH": os.path.join(d, "bin") + ":/usr/bin:/bin"}}
        code = subprocess.run(["bash", "-c", flags["command"]], env=env).returncode
        if code:
            sys.exit(code)
else:
    sys.exit(f"fake gcloud: unexpected {{args}}")
"""


@pytest.fixture
def fake_gcloud(tmp_path, monkeypatch):
    """A fake `gcloud` first on PATH; returns its directory (calls.jsonl, runs.jsonl,
    worker0/, worker1/)."""
    d = tmp_path / "gcloud"
    (d / "bin").mkdir(parents=True)
    for name, text in (("gcloud", FAKE_GCLOUD), ("dllm_python", FAKE_DLLM_PYTHON),
                       ("uv", FAKE_UV), ("bin/python3", "#!/bin/sh\n")):
        (d / name).write_text(text.format(python=sys.executable) if "{python}" in text else text)
        (d / name).chmod(0o755)
    (d / "gcloud_bin").mkdir()
    os.symlink(d / "gcloud", d / "gcloud_bin" / "gcloud")
    monkeypatch.setenv("PATH", f"{d / 'gcloud_bin'}:{os.environ['PATH']}")
    monkeypatch.setenv("FAKE_GCLOUD_DIR", str(d))
    return d


def calls(d) -> list[list[str]]:
    return [json.loads(line) for line in open(d / "calls.jsonl")]


def bounded_sleep(limit: int = 400):
    """A sleep for the watcher: short real pauses (the fake runs are background
    processes), failing the test if the watcher polls too often."""
    count = [0]

    def sleep(seconds):
        count[0] += 1
        assert count[0] <= limit, "the watcher never finished"
        time.sleep(0.02)
    return sleep


def test_remote_command_quotes_every_value(fake_gcloud, tmp_path):
    """Config, workdir, overrides and env values full of shell syntax reach the run as
    literal arguments through both shells (the worker's and sh -c), and create no file."""
    boom = tmp_path / "injected"
    evil = [f"; touch {boom}", f"$(touch {boom})", f"`touch {boom}`", f"' ; touch {boom}; '",
            f'" ; touch {boom}; "', f"\\'; touch {boom} #", f"\n touch {boom}", f"| touch {boom}"]
    for w in ("worker0", "worker1"):                                  # set-up workers
        (fake_gcloud / w / "dllm").mkdir(parents=True)
        subprocess.run([fake_gcloud / "uv", "venv", fake_gcloud / w / "dllm-venv"], check=True)
    for i, bad in enumerate(evil):
        args = [f"--config=experiments/pretrain.py:tiny{bad}", f"--workdir=gs://b/r{bad}",
                f"--env=MY_VAR=v{bad}", "--", f"--config.data.path={bad}"]
        assert tpu.main(["run", "--name=w", "--project=p", "--zone=z", *args]) == 0
        exits = [fake_gcloud / w / "dllm.exit" for w in ("worker0", "worker1")]
        deadline = time.monotonic() + 30
        while not all(e.exists() for e in exits):
            assert time.monotonic() < deadline, "the run never ended"
            time.sleep(0.02)
        records = [json.loads(line) for line in open(fake_gcloud / "runs.jsonl")][2 * i:]
        assert sorted(r["cwd"] for r in records) == [
            str(fake_gcloud / w / "dllm") for w in ("worker0", "worker1")]
        for r in records:
            assert r["argv"] == [
                "-m", "dllm.main", f"--config=experiments/pretrain.py:tiny{bad}",
                f"--workdir=gs://b/r{bad}", f"--config.data.path={bad}"]
            assert r["env"] == {"PYTHONUNBUFFERED": "1", "MY_VAR": f"v{bad}"}
        assert [e.read_text() for e in exits] == ["0\n", "0\n"]
        assert not boom.exists()
        for e in exits:
            e.unlink()


def test_stop_sends_sigterm_to_the_run_on_every_worker(fake_gcloud, capsys):
    (fake_gcloud / "hang").touch()
    base = ["--name=w", "--project=p", "--zone=z"]
    for w in ("worker0", "worker1"):
        (fake_gcloud / w / "dllm").mkdir(parents=True)
        subprocess.run([fake_gcloud / "uv", "venv", fake_gcloud / w / "dllm-venv"], check=True)
    assert tpu.main(["run", *base, "--config=experiments/sft.py", "--workdir=gs://b/r"]) == 0
    logs = [fake_gcloud / w / "dllm.log" for w in ("worker0", "worker1")]
    deadline = time.monotonic() + 30
    while not all(log.exists() and "training" in log.read_text() for log in logs):
        assert time.monotonic() < deadline, "the runs never started"
        time.sleep(0.02)
    with pytest.raises(RuntimeError, match="status 1"):   # one run at a time
        tpu.main(["run", *base, "--config=experiments/sft.py", "--workdir=gs://b/r"])
    capsys.readouterr()
    assert tpu.main(["status", *base]) == 0
    assert "# run on worker 0: running" in capsys.readouterr().out
    assert tpu.main(["stop", *base]) == 0
    while not all((fake_gcloud / w / "dllm.exit").exists() for w in ("worker0", "worker1")):
        assert time.monotonic() < deadline, "the runs never stopped"
        time.sleep(0.02)
    assert all("preempted: saved step 3" in log.read_text() for log in logs)
    capsys.readouterr()
    assert tpu.main(["status", *base]) == 0
    assert "# run on worker 0: stopped" in capsys.readouterr().out


def test_up_recreates_a_preempted_slice_and_reruns_the_same_command(fake_gcloud, capsys):
    (fake_gcloud / "preempt").touch()   # worker 0's first run is preempted
    argv = ["up", "--name=job", "--project=p", "--zone=z", "--accelerator=v5p-16", "--spot",
            "--config=experiments/pretrain.py:7b", "--workdir=gs://bkt/run", "--env=MY_VAR=x",
            "--poll_s=5", "--", "--config.train.steps=10"]
    assert tpu.main(argv, sleep=bounded_sleep()) == 0
    out = capsys.readouterr().out
    assert "job is SUSPENDED: deleting and starting it again (1/20)" in out

    kinds = [" ".join(c[2:4]) for c in calls(fake_gcloud)
             if c[2:4] != ["queued-resources", "describe"]
             and not (c[3] == "ssh" and c[5] == "--worker=0")]     # less the polls
    start = ["queued-resources create", "tpu-vm scp", "tpu-vm ssh", "tpu-vm ssh"]
    assert kinds == start + ["queued-resources delete"] + start
    ssh_all = [c for c in calls(fake_gcloud) if c[3] == "ssh" and c[5] == "--worker=all"]
    assert ssh_all[1] == ssh_all[3] and ssh_all[0] == ssh_all[2]   # same setup, same run
    creates = [c for c in calls(fake_gcloud) if c[2:4] == ["queued-resources", "create"]]
    assert creates[0] == creates[1] and "--spot" in creates[0]

    records = [json.loads(line) for line in open(fake_gcloud / "runs.jsonl")]
    assert len(records) == 4 and {r["home"][-7:] for r in records} == {"worker0", "worker1"}
    for r in records:   # both workers, before and after the recreation: the same command
        assert r["argv"] == ["-m", "dllm.main", "--config=experiments/pretrain.py:7b",
                             "--workdir=gs://bkt/run", "--config.train.steps=10"]
        assert r["env"] == {"PYTHONUNBUFFERED": "1", "MY_VAR": "x"}
    for w in ("worker0", "worker1"):   # logs kept per worker
        assert "--- sample ---" in (fake_gcloud / w / "dllm.log").read_text()


def test_up_on_a_slice_made_by_create_sets_it_up_and_runs(fake_gcloud, capsys):
    slice_flags = ["--name=job", "--project=p", "--zone=z", "--accelerator=v5p-8"]
    assert tpu.main(["create", *slice_flags], sleep=bounded_sleep()) == 0
    assert tpu.main(["up", *slice_flags, "--config=experiments/sft.py:tiny",
                     "--workdir=gs://bkt/run"], sleep=bounded_sleep()) == 0
    assert "job is ACTIVE: setting it up and running" in capsys.readouterr().out
    kinds = [" ".join(c[2:4]) for c in calls(fake_gcloud)
             if c[2:4] != ["queued-resources", "describe"]
             and not (c[3] == "ssh" and c[5] == "--worker=0")]
    assert kinds == ["queued-resources create", "tpu-vm scp", "tpu-vm ssh", "tpu-vm ssh"]
    assert len(open(fake_gcloud / "runs.jsonl").readlines()) == 2   # one run per worker


def test_up_gives_up_after_max_restarts(fake_gcloud, monkeypatch, capsys):
    monkeypatch.setenv("FAKE_CREATED_STATE", "FAILED")   # e.g. no capacity, ever
    argv = ["up", "--name=job", "--project=p", "--zone=z", "--accelerator=v5p-8",
            "--config=experiments/pretrain.py:7b", "--workdir=gs://bkt/run", "--max_restarts=2"]
    assert tpu.main(argv, sleep=bounded_sleep()) == 1
    assert "restarted 2 times already: giving up" in capsys.readouterr().out
    kinds = [c[3] for c in calls(fake_gcloud) if c[2] == "queued-resources"]
    assert kinds.count("create") == 3 and kinds.count("delete") == 2
    assert not any(c[2] == "tpu-vm" for c in calls(fake_gcloud))   # never set up


# ----------------------------------------------------------------------------- launch.local


def test_process_env_gives_each_process_its_devices():
    base = {"XLA_FLAGS": "--xla_force_host_platform_device_count=8 --xla_dump_to=/tmp/d",
            "OTHER": "1"}
    env = local.process_env(base, 1, 2)
    assert env == {"XLA_FLAGS": "--xla_dump_to=/tmp/d --xla_force_host_platform_device_count=2",
                   "OTHER": "1", "CUDA_VISIBLE_DEVICES": "2,3"}
    assert local.process_env(base, 1, None) == base


def test_local_one_failure_stops_the_others(tmp_path):
    """Process 1 exits 3; process 0 (asleep) gets SIGTERM; the launcher exits 3."""
    code = ("import pathlib, signal, sys, time\n"
            "i = sys.argv[-1].rsplit('=', 1)[1]\n"
            f"mark = pathlib.Path({str(tmp_path)!r}) / ('terminated' + i)\n"
            "signal.signal(signal.SIGTERM, lambda *_: (mark.touch(), sys.exit(0)))\n"
            "print('started', flush=True)\n"
            "time.sleep(0.5) if i == '1' else time.sleep(120)\n"
            "sys.exit(3)\n")
    proc = subprocess.run([sys.executable, "-m", "launch.local", "-n", "2", "--",
                           sys.executable, "-c", code], cwd=ROOT, capture_output=True,
                          text=True, timeout=60)
    assert proc.returncode == 3, proc.stdout + proc.stderr
    assert (tmp_path / "terminated0").exists() and not (tmp_path / "terminated1").exists()
    assert "[0] started" in proc.stdout and "[1] started" in proc.stdout
    assert "process 1 exited with status 3; stopping the others" in proc.stdout


@pytest.mark.slow
def test_local_two_processes_train_the_tiny_config(tiny_runs):
    """launch.local -n 2 runs the two-process tiny run of tests/subprocess_runs.py: both exit 0
    and the losses equal the one-process reference run's."""
    workdir = tiny_runs.workdir("local_pair")
    env = {**os.environ, "PYTHONPATH": ROOT, "JAX_PLATFORMS": "cpu",
           "JAX_COMPILATION_CACHE_DIR": os.path.join(tiny_runs.root, "jax_cache"),
           "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": "0",
           "JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES": "0"}
    cmd = [sys.executable, "-m", "launch.local", "-n", "2", "--devices=2", "--",
           sys.executable, "-m", "dllm.main", "--config=tests/tiny_config.py",
           f"--workdir={workdir}", f"--config.data.tokenizer={tiny_runs.tokenizer}",
           "--config.distributed.timeout_s=120", "--config.mesh.data=1", "--config.mesh.fsdp=1",
           "--config.mesh.tensor=2", "--config.mesh.dcn.fsdp=2"]
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=runs.TIMEOUT_S)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "[0] --- sample" in proc.stdout and "Traceback" not in proc.stdout
    one, two = runs.losses(tiny_runs.workdir("reference")), runs.losses(workdir)
    assert sorted(two) == sorted(one)
    np.testing.assert_allclose([two[s] for s in one], list(one.values()), rtol=2e-5)
