"""N processes of one command on this machine, joined over a loopback coordinator: the
multi-host path of dllm.main without the hosts (tests; several processes per GPU host).

  python -m launch.local -n 2 --devices=4 -- python -m dllm.main \\
      --config=experiments/pretrain.py:tiny --workdir=runs/two --config.mesh.fsdp=-1

Process i runs the command with --config.distributed.coordinator_address=127.0.0.1:PORT
--config.distributed.num_processes=N --config.distributed.process_id=I appended, and
`--devices=K` gives each process K devices: K CPU devices (XLA_FLAGS) and the GPUs
i*K .. i*K+K-1 (CUDA_VISIBLE_DEVICES). Output lines are prefixed "[i] ". When a process
fails, the others get SIGTERM (a dllm run saves a checkpoint and stops), then SIGKILL
after STOP_GRACE_S; the launcher exits with the failed process's status.
"""
from __future__ import annotations

import argparse
import os
import signal
import socket
import subprocess
import sys
import threading
import time

STOP_GRACE_S = 30.0
_DEVICE_COUNT_FLAG = "--xla_force_host_platform_device_count"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def process_commands(command: list[str], n: int, port: int) -> list[list[str]]:
    """The command of each of the `n` processes (the distributed flags appended)."""
    return [command + [f"--config.distributed.coordinator_address=127.0.0.1:{port}",
                       f"--config.distributed.num_processes={n}",
                       f"--config.distributed.process_id={i}"] for i in range(n)]


def process_env(base: dict, i: int, devices: int | None) -> dict:
    """`base` with process i's share of the devices (unchanged when devices is None)."""
    env = dict(base)
    if devices:
        flags = [f for f in env.get("XLA_FLAGS", "").split()
                 if not f.startswith(_DEVICE_COUNT_FLAG)]
        env["XLA_FLAGS"] = " ".join(flags + [f"{_DEVICE_COUNT_FLAG}={devices}"])
        env["CUDA_VISIBLE_DEVICES"] = ",".join(str(i * devices + d) for d in range(devices))
    return env


def _forward(proc: subprocess.Popen, prefix: str, out, lock: threading.Lock):
    for line in proc.stdout:
        with lock:
            out.write(prefix + line)
            out.flush()


def stop(procs: list[subprocess.Popen], grace_s: float = STOP_GRACE_S):
    """SIGTERM to every running process (and its children), SIGKILL to those still
    running after `grace_s`."""
    for sig in (signal.SIGTERM, signal.SIGKILL):
        for p in procs:
            if p.poll() is None:
                try:
                    os.killpg(p.pid, sig)  # each runs in its own session: pid = group id
                except ProcessLookupError:  # exited meanwhile
                    pass
        deadline = time.monotonic() + grace_s
        while any(p.poll() is None for p in procs) and time.monotonic() < deadline:
            time.sleep(0.05)


def run(commands: list[list[str]], envs: list[dict], out=sys.stdout,
        grace_s: float = STOP_GRACE_S, poll_s: float = 0.1) -> int:
    """Runs the commands at once; 0 when all exit 0, else the status of the first
    that failed (128 + signal for a signal), after stopping the others."""
    lock = threading.Lock()
    procs = [subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                              stdin=subprocess.DEVNULL, text=True, errors="replace",
                              start_new_session=True)
             for cmd, env in zip(commands, envs)]
    threads = [threading.Thread(target=_forward, args=(p, f"[{i}] ", out, lock), daemon=True)
               for i, p in enumerate(procs)]
    for t in threads:
        t.start()
    status = 0
    try:
        while True:
            codes = [p.poll() for p in procs]
            failed = [(i, c) for i, c in enumerate(codes) if c]
            if failed:
                i, code = failed[0]
                status = code if code > 0 else 128 - code
                with lock:
                    out.write(f"launch.local: process {i} exited with status {code}; "
                              "stopping the others\n")
                break
            if all(c == 0 for c in codes):
                break
            time.sleep(poll_s)
    except KeyboardInterrupt:  # Ctrl-C, or SIGTERM to the launcher (main)
        status = 128 + signal.SIGINT
    finally:
        stop(procs, grace_s)
        for t in threads:
            t.join()
    return status


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m launch.local", description=__doc__.split("\n\n")[0],
        usage="%(prog)s -n N [--devices=K] [--port=P] -- COMMAND ...")
    parser.add_argument("-n", type=int, required=True, help="number of processes")
    parser.add_argument("--devices", type=int, default=None,
                        help="devices per process (CPU devices / a group of GPUs)")
    parser.add_argument("--port", type=int, default=None, help="coordinator port (default: free)")
    parser.add_argument("command", nargs=argparse.REMAINDER, help="after --: the command")
    args = parser.parse_args(argv)
    command = args.command[1:] if args.command[:1] == ["--"] else args.command
    if not command:
        parser.error("no command given (put it after --)")
    if args.n < 1 or (args.devices is not None and args.devices < 1):
        parser.error("-n and --devices must be at least 1")
    commands = process_commands(command, args.n, args.port or free_port())
    envs = [process_env(os.environ, i, args.devices) for i in range(args.n)]
    signal.signal(signal.SIGTERM, _interrupt)  # stop the processes, as on Ctrl-C
    return run(commands, envs)


def _interrupt(signum, frame):
    raise KeyboardInterrupt


if __name__ == "__main__":
    sys.exit(main())
