"""Run metrics: one JSON line per logged step, TensorBoard events, and the
matmul ceiling that MFU is measured against. The workdir may be local or gs://
(both files are written through dllm.fs)."""
from __future__ import annotations

import json
import os
import time
import uuid

import jax
import jax.numpy as jnp
import numpy as np

from dllm import fs


class MetricsWriter:
    """Appends `{"step": ..., **metrics}` to DIR/metrics.jsonl and writes the same
    scalars as TensorBoard events (tensorboardX, no TensorFlow). Only process 0
    writes; other processes get a no-op writer."""

    def __init__(self, workdir: str):
        self.enabled = jax.process_index() == 0
        self._jsonl = self._tb = None
        if self.enabled:
            fs.makedirs(workdir)
            self._jsonl = fs.open(os.path.join(workdir, "metrics.jsonl"), "a")
            from tensorboardX import SummaryWriter, record_writer
            record_writer.register_writer_factory("gs", _EventFiles())
            # Event files are named by the second they start in: a suffix keeps a run
            # restarted within the same second from overwriting the previous file.
            self._tb = SummaryWriter(os.path.join(workdir, "tensorboard"),
                                     filename_suffix=f".{uuid.uuid4().hex[:8]}")

    def write(self, step: int, metrics: dict):
        if not self.enabled:
            return
        row = {"step": int(step), **{k: float(v) for k, v in metrics.items()}}
        self._jsonl.write(json.dumps(row) + "\n")
        self._jsonl.flush()
        for k, v in metrics.items():
            self._tb.add_scalar(k, float(v), int(step))

    def close(self):
        if self.enabled:
            self._jsonl.close()
            self._tb.close()


class _EventFiles:
    """tensorboardX's writer factory for gs:// event files: through dllm.fs, so one
    client (gcsfs) serves the whole run directory (tensorboardX's own needs
    google-cloud-storage)."""

    def open(self, path: str):
        return fs.open(path, "wb")

    def directory_check(self, path: str):
        fs.makedirs(path)


def drop_rows_after(workdir: str, step: int) -> None:
    """Before a run continues from checkpoint `step`: rewrites DIR/metrics.jsonl (process
    0, atomically) without the rows of later steps, logged before the run stopped and
    about to be logged again (at step 0, a fresh start, every row goes), and without a
    torn last line; so each step appears once."""
    path = os.path.join(workdir, "metrics.jsonl")
    if jax.process_index() != 0 or not fs.exists(path):
        return
    lines = fs.read_text(path).splitlines(keepends=True)
    keep = []
    for line in lines:
        try:
            row = json.loads(line)
        except json.JSONDecodeError:   # the torn end of a killed run's last write
            continue
        if 0 < step and row["step"] <= step:
            keep.append(line.rstrip("\n") + "\n")
    if len(keep) != len(lines):
        fs.write_text(path, "".join(keep))


class MatmulTimer:
    """A jitted n x n x n matmul on random operands in `dtype` on the default device:
    the ceiling MFU is quoted against. Each call times one product."""

    def __init__(self, dtype="float32", n: int = 2048):
        k1, k2 = jax.random.split(jax.random.key(0))
        self.operands = (jax.random.normal(k1, (n, n), dtype), jax.random.normal(k2, (n, n), dtype))
        self.matmul = jax.jit(jnp.matmul).lower(*self.operands).compile()
        self.flops = 2 * n ** 3
        jax.block_until_ready(self.matmul(*self.operands))

    def __call__(self) -> tuple[float, float]:
        """(wall s, process CPU s) of one product."""
        wall, cpu = time.perf_counter(), time.process_time()
        jax.block_until_ready(self.matmul(*self.operands))
        return time.perf_counter() - wall, time.process_time() - cpu


def matmul_ceiling(dtype="float32", n: int = 2048, reps: int = 5) -> float:
    """Measured FLOP/s of MatmulTimer(dtype, n): the median of `reps` calls (calls
    vary by tens of percent on a GPU)."""
    timer = MatmulTimer(dtype, n)
    return timer.flops / float(np.median([timer()[0] for _ in range(reps)]))


def read_metrics(workdir: str) -> list[dict]:
    """The rows of DIR/metrics.jsonl (for tests, plots and notebooks)."""
    with fs.open(os.path.join(workdir, "metrics.jsonl")) as f:
        return [json.loads(line) for line in f if line.strip()]


def to_host(tree) -> dict:
    """Device scalars -> Python floats (one transfer)."""
    return {k: float(v) for k, v in jax.device_get(tree).items()}


def is_finite(metrics: dict) -> bool:
    return all(np.isfinite(v) for v in metrics.values())
