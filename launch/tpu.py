"""A dllm run on a Cloud TPU VM slice, through gcloud.

  python -m launch.tpu up --name=dllm-7b --project=P --zone=Z --accelerator=v5p-64 --spot \\
      --config=experiments/pretrain.py:7b --workdir=gs://BUCKET/runs/pretrain-7b \\
      -- --config.init.checkpoint=gs://BUCKET/qwen2.5-coder-7b \\
         --config.data.mixture.code.path=gs://BUCKET/dllm/stage1/code ...

  create  request the slice as a queued resource (--spot, --reserved, or on demand);
          wait until it is ACTIVE
  setup   copy this checkout to every worker (~/dllm) and install dllm with its `tpu`
          extra (jax[tpu], gcsfs) into a Python 3.12 virtual environment there (~/dllm-venv)
  run     start `python -m dllm.main --config=... --workdir=... [-- overrides]` on every
          worker at once, in the background; each worker logs to ~/dllm.log
  logs    the last lines of a worker's log (--worker, --lines, --follow)
  status  the queued resource's state, and the run's on worker 0
  stop    SIGTERM to the run on every worker: it saves a checkpoint and exits
  delete  delete the queued resource and its slice
  up      create, setup and run (what is not done yet: a slice made by `create` is
          used, a running run is watched), then watch: when the slice is preempted (the
          queued resource FAILED, SUSPENDING or SUSPENDED, or gone), delete it, create it
          again, set it up and rerun the same command, which resumes from the latest
          checkpoint in the gs:// workdir; exits with the run's status when it ends

--dry-run prints every command (one argument list per line, as `shlex.join` writes
it) and runs nothing. Commands are argument lists (no local shell); the one string a
worker's shell reads (`gcloud ... ssh --command`) has every user value shell-quoted.
"""
from __future__ import annotations

import argparse
import dataclasses
import os
import re
import shlex
import subprocess
import sys
import tarfile
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# What `setup` copies to the workers (paths relative to ROOT).
PACKED = ("setup.py", "README.md", "dllm", "launch", "experiments")
# Runtime versions for JAX per TPU generation (Cloud TPU docs, "TPU software versions").
RUNTIME_VERSIONS = {"v6e": "v2-alpha-tpuv6e", "v5p": "v2-alpha-tpuv5",
                    "v5litepod": "v2-alpha-tpuv5-lite", "v4": "tpu-ubuntu2204-base"}
# Queued-resource states: provisioned, and gone (preempted, or the request failed).
ACTIVE = "ACTIVE"
LOST = ("FAILED", "SUSPENDING", "SUSPENDED")
WORKER_ENV = {"PYTHONUNBUFFERED": "1"}   # logs line by line
CLOUD_PLATFORM_SCOPE = "https://www.googleapis.com/auth/cloud-platform"

# On each worker: code in ~/dllm, the environment in ~/dllm-venv, the run's log, pid,
# exit status and stop mark in ~/dllm.{log,pid,exit,stopped}. (~ stays unquoted to expand.)
SETUP_REMOTE = (
    "set -e; rm -rf ~/dllm ~/dllm-venv; mkdir -p ~/dllm; tar xzf ~/dllm.tar.gz -C ~/dllm; "
    "python3 -m pip install -q --user uv; ~/.local/bin/uv venv -q --python 3.12 ~/dllm-venv; "
    "~/.local/bin/uv pip install -q --python ~/dllm-venv/bin/python -e ~/dllm'[tpu]'")
RUNNING = '[ -f ~/dllm.pid ] && kill -0 "$(cat ~/dllm.pid)" 2>/dev/null'
# One word (or "exited N") for the run on a worker: starting, running, stopped (by
# `stop`), preempted (exited 0 after saving on a SIGTERM it did not get from `stop`).
STATE_REMOTE = (
    f"if [ -f ~/dllm.exit ]; then if [ -f ~/dllm.stopped ]; then echo stopped; "
    "elif [ \"$(cat ~/dllm.exit)\" = 0 ] && grep -q '^preempted: saved step' ~/dllm.log; "
    "then echo preempted; else echo \"exited $(cat ~/dllm.exit)\"; fi; "
    f"elif {RUNNING}; then echo running; else echo starting; fi")
STOP_REMOTE = f'if {RUNNING}; then touch ~/dllm.stopped; kill -TERM "$(cat ~/dllm.pid)"; fi'


@dataclasses.dataclass(frozen=True)
class Slice:
    name: str
    project: str
    zone: str
    accelerator: str = ""           # e.g. v5p-64 (create only)
    runtime_version: str = ""       # default: RUNTIME_VERSIONS of the generation
    capacity: str = "on-demand"     # spot | reserved | on-demand
    service_account: str = ""       # the workers' identity ("": the project's default)

    def gcloud(self, *args: str) -> list[str]:
        return ["gcloud", "compute", "tpus", *args, f"--zone={self.zone}",
                f"--project={self.project}"]


@dataclasses.dataclass(frozen=True)
class Job:
    config: str                     # experiments/<stage>.py:<variant>, relative to ROOT
    workdir: str
    overrides: tuple[str, ...] = ()
    env: tuple[tuple[str, str], ...] = ()


# ----------------------------------------------------------------------------- commands


def create_command(s: Slice) -> list[str]:
    generation = s.accelerator.split("-")[0]
    version = s.runtime_version or RUNTIME_VERSIONS.get(generation)
    if not version:
        raise ValueError(f"--accelerator={s.accelerator!r}: no default runtime version for "
                         f"{generation!r} (known: {sorted(RUNTIME_VERSIONS)}); "
                         "pass --runtime_version")
    capacity = {"spot": ["--spot"], "reserved": ["--reserved"], "on-demand": []}[s.capacity]
    # With a service account, its IAM roles alone decide what the workers may do.
    identity = [f"--service-account={s.service_account}",
                f"--scopes={CLOUD_PLATFORM_SCOPE}"] if s.service_account else []
    return s.gcloud("queued-resources", "create", s.name, f"--node-id={s.name}",
                    f"--accelerator-type={s.accelerator}", f"--runtime-version={version}",
                    *capacity, *identity)


def describe_command(s: Slice) -> list[str]:
    return s.gcloud("queued-resources", "describe", s.name, "--format=value(state.state)")


def delete_command(s: Slice) -> list[str]:
    return s.gcloud("queued-resources", "delete", s.name, "--force", "--quiet")


def scp_command(s: Slice, local_path: str) -> list[str]:
    return s.gcloud("tpu-vm", "scp", local_path, f"{s.name}:~/dllm.tar.gz", "--worker=all")


def ssh_command(s: Slice, remote: str, worker: str = "all") -> list[str]:
    return s.gcloud("tpu-vm", "ssh", s.name, f"--worker={worker}", f"--command={remote}")


def run_remote(job: Job) -> str:
    """The shell command that starts the run on a worker and returns: `sh -c` runs
    python in the background, records its pid and then its exit status; the log of the
    previous run on this worker is kept as ~/dllm.log.1."""
    env = [f"{k}={v}" for k, v in {**WORKER_ENV, **dict(job.env)}.items()]
    args = [f"--config={job.config}", f"--workdir={job.workdir}", *job.overrides]
    # $! is python's pid (env execs it): `stop` signals python itself. The exit status
    # is renamed into place, so whoever reads it reads it whole.
    script = (f"cd ~/dllm && {{ env {shlex.join(env)} ~/dllm-venv/bin/python -m dllm.main "
              f"{shlex.join(args)} & echo $! > ~/dllm.pid; wait $!; }}; "
              "echo $? > ~/dllm.exit.tmp; mv ~/dllm.exit.tmp ~/dllm.exit")
    return (f"if {RUNNING}; then echo 'a run is already running: stop it first' >&2; exit 1; "
            "fi; rm -f ~/dllm.pid ~/dllm.exit ~/dllm.stopped; mv -f ~/dllm.log ~/dllm.log.1 "
            f"2>/dev/null; nohup sh -c {shlex.quote(script)} > ~/dllm.log 2>&1 < /dev/null &")


def logs_remote(lines: int, follow: bool) -> str:
    return f"tail -n {int(lines)}{' -F' if follow else ''} ~/dllm.log"


# ----------------------------------------------------------------------------- running


class Gcloud:
    """Runs (or, dry, only prints) commands; every command is printed first."""

    def __init__(self, dry_run: bool, out=None):
        self.dry_run, self.out = dry_run, sys.stdout if out is None else out

    def note(self, text: str):
        print(f"# {text}", file=self.out, flush=True)

    def __call__(self, argv: list[str], capture: bool = False,
                 check: bool = True) -> subprocess.CompletedProcess:
        """Runs `argv` (output captured with `capture`); with `check` a failure raises."""
        print(shlex.join(argv), file=self.out, flush=True)
        if self.dry_run:
            return subprocess.CompletedProcess(argv, 0, "", "")
        pipe = subprocess.PIPE if capture else None
        proc = subprocess.run(argv, text=True, stdout=pipe, stderr=pipe)
        if check and proc.returncode:
            raise RuntimeError(f"status {proc.returncode} from: {shlex.join(argv)}")
        return proc


def state(gc: Gcloud, s: Slice) -> str:
    """The queued resource's state: one of the API's (ACTIVE, SUSPENDED, ...),
    NOT_FOUND, or UNKNOWN when gcloud failed otherwise (e.g. no network)."""
    proc = gc(describe_command(s), capture=True, check=False)
    if proc.returncode:
        return "NOT_FOUND" if "NOT_FOUND" in proc.stderr else "UNKNOWN"
    return proc.stdout.strip() or "UNKNOWN"


def run_state(gc: Gcloud, s: Slice) -> str:
    """The run on worker 0: starting | running | stopped | preempted | exited N, or
    unknown (ssh failed)."""
    proc = gc(ssh_command(s, STATE_REMOTE, worker="0"), capture=True, check=False)
    lines = proc.stdout.strip().splitlines()
    return lines[-1] if proc.returncode == 0 and lines else "unknown"


def create(gc: Gcloud, s: Slice, sleep=time.sleep, poll_s: float = 60) -> str:
    """Requests the slice; waits until it is ACTIVE or lost. Returns that state."""
    gc(create_command(s))
    if gc.dry_run:
        gc.note(f"then every {poll_s:g} s until the state is {ACTIVE}:")
        gc(describe_command(s), capture=True)
        return ACTIVE
    return wait_until_provisioned(gc, s, sleep, poll_s)


def wait_until_provisioned(gc: Gcloud, s: Slice, sleep=time.sleep, poll_s: float = 60) -> str:
    """Polls until the slice is ACTIVE or lost (or gone); returns that state."""
    while (current := state(gc, s)) not in (ACTIVE, *LOST, "NOT_FOUND"):
        sleep(poll_s)
    return current


def pack(tar_path: str):
    """The files `setup` copies (PACKED, without caches) as a .tar.gz."""
    with tarfile.open(tar_path, "w:gz") as tar:
        for name in PACKED:
            tar.add(os.path.join(ROOT, name), arcname=name,
                    filter=lambda t: None if "__pycache__" in t.name else t)


def setup(gc: Gcloud, s: Slice):
    tar_path = os.path.join(tempfile.gettempdir(), f"dllm-{s.name}.tar.gz")
    gc.note(f"pack {' '.join(PACKED)} of {ROOT} into {tar_path}")
    if not gc.dry_run:
        pack(tar_path)
    gc(scp_command(s, tar_path))
    gc(ssh_command(s, SETUP_REMOTE))


def start(gc: Gcloud, s: Slice, job: Job, sleep=time.sleep, poll_s: float = 60) -> bool:
    """create + setup + run; False if the slice was lost before it became ACTIVE."""
    if create(gc, s, sleep, poll_s) != ACTIVE:
        return False
    setup(gc, s)
    gc(ssh_command(s, run_remote(job)))
    return True


def resume(gc: Gcloud, s: Slice, job: Job, sleep=time.sleep, poll_s: float = 60) -> bool:
    """What is missing of create + setup + run: an ACTIVE slice (made by `create`, or
    by an earlier `up`) is not created again, a running run is left alone (the watch
    resumes). False if the slice is lost or gone."""
    current = "NOT_FOUND" if gc.dry_run else state(gc, s)
    if current == "NOT_FOUND":
        return start(gc, s, job, sleep, poll_s)
    if current == "UNKNOWN":
        raise RuntimeError(f"cannot read the state of {s.name}: {shlex.join(describe_command(s))}")
    if current not in LOST:   # a request still waiting for capacity, or provisioning
        current = wait_until_provisioned(gc, s, sleep, poll_s)
    if current != ACTIVE:
        return False
    if run_state(gc, s) == "running":
        gc.note(f"{s.name} is {ACTIVE} and the run on it is running: watching it")
        return True
    gc.note(f"{s.name} is {ACTIVE}: setting it up and running")
    setup(gc, s)
    gc(ssh_command(s, run_remote(job)))
    return True


def up(gc: Gcloud, s: Slice, job: Job, sleep=time.sleep, poll_s: float = 60,
       max_restarts: int = 20) -> int:
    """start, then every `poll_s` look at the slice and the run on worker 0. A lost slice
    is deleted and started again (at most `max_restarts` times). A run that stopped on
    a SIGTERM or failed is looked at once more a poll later, as its slice may be going
    away; if the slice is still ACTIVE, a SIGTERM'd run (a maintenance event) is rerun
    on it and a failed one ends the watch. Returns the run's exit status (0 when
    finished or stopped by `stop`; 1 after too many restarts)."""
    started, restarts, ended_once = resume(gc, s, job, sleep, poll_s), 0, False
    if gc.dry_run:
        gc.note(f"then every {poll_s:g} s: the slice's state, and the run's on worker 0:")
        gc(describe_command(s), capture=True)
        gc(ssh_command(s, STATE_REMOTE, worker="0"), capture=True)
        gc.note(f"when the slice is {' / '.join(LOST)} or gone: delete it, then create, "
                "setup and run again as above")
        gc(delete_command(s))
        return 0
    while True:
        if started:
            sleep(poll_s)
        current = state(gc, s)
        if current in LOST or current == "NOT_FOUND" or not started:
            if restarts == max_restarts:
                gc.note(f"{s.name} is {current}; restarted {restarts} times already: giving up")
                return 1
            restarts += 1
            gc.note(f"{s.name} is {current}: deleting and starting it again ({restarts}/"
                    f"{max_restarts}); the run resumes from its latest checkpoint")
            gc(delete_command(s), check=False)
            started, ended_once = start(gc, s, job, sleep, poll_s), False
            continue
        run = run_state(gc, s) if current == ACTIVE else "unknown"
        if run in ("stopped", "exited 0"):
            gc.note(f"the run on {s.name}: {run}")
            return 0
        ended = run == "preempted" or run.startswith("exited ")
        if ended and ended_once and run == "preempted":
            gc.note("the run saved and stopped on a SIGTERM; the slice stayed ACTIVE: rerun")
            gc(ssh_command(s, run_remote(job)))
        elif ended and ended_once:
            gc.note(f"the run on {s.name}: {run}; see python -m launch.tpu logs")
            return int(run.split()[1])
        ended_once = ended and not ended_once


# ----------------------------------------------------------------------------- CLI


def check_config(config: str) -> str:
    """--config (a file of this checkout, ":variant" optional) relative to ROOT, as the
    workers see it; other files are not copied to them."""
    path, variant = (config.split(":", 1) + [None])[:2]
    full = os.path.abspath(path) if os.path.exists(path) else os.path.join(ROOT, path)
    rel = os.path.relpath(full, ROOT)
    if not os.path.isfile(full) or rel.split(os.sep)[0] not in PACKED:
        raise ValueError(f"--config={config!r}: {path!r} is not a file under "
                         f"{', '.join(p + '/' for p in PACKED[2:])} of {ROOT} (what setup "
                         "copies to the workers)")
    return rel if variant is None else f"{rel}:{variant}"


def check_env(pairs: list[str]) -> tuple[tuple[str, str], ...]:
    out = []
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", key):
            raise ValueError(f"--env={pair!r}: expected KEY=VALUE with KEY a variable name")
        out.append((key, value))
    return tuple(out)


def parse(argv: list[str]) -> argparse.Namespace:
    """Flags before `--`; what follows `--` are config overrides for dllm.main."""
    overrides = argv[argv.index("--") + 1:] if "--" in argv else []
    argv = argv[:argv.index("--")] if "--" in argv else argv
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--name", required=True, help="queued resource and slice name")
    common.add_argument("--project", required=True)
    common.add_argument("--zone", required=True)
    common.add_argument("--dry-run", "--dry_run", action="store_true", dest="dry_run",
                        help="print the commands, run nothing")
    slice_flags = argparse.ArgumentParser(add_help=False)
    slice_flags.add_argument("--accelerator", required=True, help="e.g. v5p-64")
    slice_flags.add_argument("--runtime_version", default="",
                             help=f"default per generation: {RUNTIME_VERSIONS}")
    capacity = slice_flags.add_mutually_exclusive_group()
    capacity.add_argument("--spot", action="store_const", dest="capacity", const="spot")
    capacity.add_argument("--reserved", action="store_const", dest="capacity",
                          const="reserved")
    slice_flags.set_defaults(capacity="on-demand")
    slice_flags.add_argument("--service_account", default="",
                             help="the workers' service account (e.g. with "
                                  "roles/storage.objectUser on the workdir's bucket)")
    poll = argparse.ArgumentParser(add_help=False)
    poll.add_argument("--poll_s", type=float, default=60, help="seconds between polls")
    job_flags = argparse.ArgumentParser(add_help=False)
    job_flags.add_argument("--config", required=True, help="experiments/<stage>.py:<variant>")
    job_flags.add_argument("--workdir", required=True, help="gs://BUCKET/runs/NAME")
    job_flags.add_argument("--env", action="append", default=[], metavar="KEY=VALUE",
                           help="environment of the run on the workers (repeatable)")

    parser = argparse.ArgumentParser(prog="python -m launch.tpu", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("create", parents=[common, slice_flags, poll])
    sub.add_parser("setup", parents=[common])
    sub.add_parser("run", parents=[common, job_flags])
    logs = sub.add_parser("logs", parents=[common])
    logs.add_argument("--worker", default="0", help="a worker index, or all")
    logs.add_argument("--lines", type=int, default=100)
    logs.add_argument("--follow", action="store_true")
    for name in ("status", "stop", "delete"):
        sub.add_parser(name, parents=[common])
    up_parser = sub.add_parser("up", parents=[common, slice_flags, poll, job_flags])
    up_parser.add_argument("--max_restarts", type=int, default=20)
    args = parser.parse_args(argv)
    if getattr(args, "poll_s", 1) < 1:
        parser.error("--poll_s must be at least 1")
    if args.command not in ("run", "up") and overrides:
        parser.error(f"{args.command} takes no config overrides after --")
    if not re.fullmatch(r"[a-z]([-a-z0-9]*[a-z0-9])?", args.name):
        parser.error(f"--name={args.name!r}: lowercase letters, digits and hyphens")
    if args.command == "up" and not args.workdir.startswith("gs://"):
        parser.error("up recreates the slice, whose disks are lost: --workdir must be gs://")
    args.overrides = tuple(overrides)
    return args


def main(argv=None, sleep=time.sleep) -> int:
    args = parse(sys.argv[1:] if argv is None else list(argv))
    gc = Gcloud(args.dry_run)
    s = Slice(args.name, args.project, args.zone, getattr(args, "accelerator", ""),
              getattr(args, "runtime_version", ""), getattr(args, "capacity", "on-demand"),
              getattr(args, "service_account", ""))
    job = None
    if args.command in ("run", "up"):
        job = Job(check_config(args.config), args.workdir, args.overrides, check_env(args.env))
    if args.command == "create":
        current = create(gc, s, sleep, args.poll_s)
        if current != ACTIVE:
            gc.note(f"{s.name} is {current}")
        return 0 if current == ACTIVE else 1
    if args.command == "up":
        try:
            return up(gc, s, job, sleep, args.poll_s, args.max_restarts)
        except KeyboardInterrupt:
            gc.note(f"stopped watching; {s.name} and its run go on (status, logs, stop, "
                    "delete; or up again to watch)")
            return 130
    if args.command == "status":
        gc.note(f"queued resource: {state(gc, s)}")
        gc.note(f"run on worker 0: {run_state(gc, s)}")
        return 0
    commands = {"setup": lambda: setup(gc, s),
                "run": lambda: gc(ssh_command(s, run_remote(job))),
                "logs": lambda: gc(ssh_command(s, logs_remote(args.lines, args.follow),
                                               worker=args.worker), check=False),
                "stop": lambda: gc(ssh_command(s, STOP_REMOTE)),
                "delete": lambda: gc(delete_command(s))}
    commands[args.command]()
    return 0


if __name__ == "__main__":
    sys.exit(main())
