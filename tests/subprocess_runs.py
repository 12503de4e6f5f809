"""Runs of `python -m dllm.main` in subprocesses (kill -9, SIGTERM, two processes): the
tiny config of tests/tiny_config.py on CPU devices, one shared tokenizer and compilation
cache (a rerun then starts in seconds), hard timeouts."""
import os
import socket
import subprocess
import sys
import time

import jax
import numpy as np

from dllm import data, metrics, sharding
from dllm import runs as dllm_runs

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TIMEOUT_S = 180


class TinyRuns:
    """Workdirs under `root`; `launch(name, *flags)` starts the tiny run in root/name."""

    def __init__(self, root: str):
        import tiny_config
        self.root = root
        data.get_tokenizer(tiny_config.get_config().data, root)
        self.tokenizer = os.path.join(root, "tokenizer.model")

    def workdir(self, name: str) -> str:
        return os.path.join(self.root, name)

    def launch(self, name: str, *flags: str, devices: int = 1) -> subprocess.Popen:
        """Starts the run on `devices` CPU devices; its output goes to root/name/log.N.txt."""
        env = {**os.environ, "PYTHONPATH": ROOT, "JAX_PLATFORMS": "cpu",
               "XLA_FLAGS": f"--xla_force_host_platform_device_count={devices}",
               "JAX_COMPILATION_CACHE_DIR": os.path.join(self.root, "jax_cache"),
               "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": "0",
               "JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES": "0"}
        workdir = self.workdir(name)
        os.makedirs(workdir, exist_ok=True)
        n = sum(f.startswith("log.") for f in os.listdir(workdir))
        log = open(os.path.join(workdir, f"log.{n}.txt"), "w")
        cmd = [sys.executable, "-m", "dllm.main", "--config=tests/tiny_config.py",
               f"--workdir={workdir}", f"--config.data.tokenizer={self.tokenizer}", *flags]
        return subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT)


def launch_pair(tiny: TinyRuns, name: str) -> list[subprocess.Popen]:
    """The run in two processes (2 CPU devices each) joined over a loopback coordinator;
    the mesh treats each process as a slice (fsdp 2 across the "DCN", tensor 2 within
    a process), as on a multi-slice pod."""
    address = f"127.0.0.1:{free_port()}"
    return [tiny.launch(
        name, f"--config.distributed.coordinator_address={address}",
        "--config.distributed.num_processes=2", f"--config.distributed.process_id={i}",
        "--config.distributed.timeout_s=120", "--config.mesh.data=1", "--config.mesh.fsdp=1",
        "--config.mesh.tensor=2", "--config.mesh.dcn.fsdp=2", devices=2) for i in range(2)]


def finish(proc: subprocess.Popen) -> int:
    """Waits for `proc` (killing it after TIMEOUT_S); returns its exit code."""
    try:
        return proc.wait(timeout=TIMEOUT_S)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
        raise


def wait_for(proc: subprocess.Popen, workdir: str, path: str):
    """Polls until workdir/path exists (checkpoints/N: orbax renames a step into place
    once it is complete); fails if the run ends first."""
    deadline = time.monotonic() + TIMEOUT_S
    while not os.path.exists(os.path.join(workdir, path)):
        if proc.poll() is not None or time.monotonic() > deadline:
            proc.kill()
            raise AssertionError(f"run ended or timed out before {path}:\n{read_logs(workdir)}")
        time.sleep(0.02)


def read_logs(workdir: str) -> str:
    return "\n".join(open(os.path.join(workdir, f)).read()[-3000:]
                     for f in sorted(os.listdir(workdir)) if f.startswith("log."))


def metric_rows(workdir: str) -> list[dict]:
    return metrics.read_metrics(workdir) if os.path.exists(
        os.path.join(workdir, "metrics.jsonl")) else []


def losses(workdir: str) -> dict[int, float]:
    """{step: loss} from metrics.jsonl (a resumed run appends: later rows win)."""
    return {r["step"]: r["loss"] for r in metric_rows(workdir) if "loss" in r}


def checkpoint_steps(workdir: str) -> list[int]:
    return sorted(int(d) for d in os.listdir(os.path.join(workdir, "checkpoints")) if d.isdigit())


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def restore_params(workdir: str):
    """The latest checkpoint's params as host numpy arrays (whatever mesh saved them)."""
    one_device = sharding.make_mesh(dict(data=1, fsdp=1, tensor=1), jax.devices()[:1])
    _, params = dllm_runs.restore_params(workdir, mesh=one_device)
    return jax.tree.map(np.asarray, params)
