"""Test set-up: 8 fake CPU devices (for mesh tests), float32, quiet logs."""
import os

import pytest

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")


@pytest.fixture(scope="session")
def tiny_runs(tmp_path_factory):
    """Subprocess runs of tests/tiny_config.py, with the uninterrupted one-process run
    "reference" done (the two-process, kill -9 and SIGTERM runs are compared with it)."""
    import subprocess_runs as runs
    tiny = runs.TinyRuns(str(tmp_path_factory.mktemp("tiny_runs")))
    code = runs.finish(tiny.launch("reference"))
    assert code == 0, runs.read_logs(tiny.workdir("reference"))
    return tiny


@pytest.fixture(scope="session")
def trained_run(tmp_path_factory):
    """A run directory trained for 2 steps in this process (tests/test_train.py's tiny
    config): for the tests of what reads runs (runs, sample, evaluate)."""
    from dllm import train
    from test_train import tiny_run_config
    workdir = str(tmp_path_factory.mktemp("trained_run"))
    train.train_and_evaluate(tiny_run_config(steps=2), workdir)
    return workdir


@pytest.fixture
def fake_gcs(monkeypatch):
    """gs:// served from memory (fsspec's memory file system under the "gs" / "gcs"
    protocols, which etils.epath uses for gs:// without TensorFlow). Like GCS, its
    objects cannot be opened for appending."""
    from fsspec.registry import _registry
    from etils.epath import backend
    from fsspec.implementations.memory import MemoryFileSystem

    class FakeGCS(MemoryFileSystem):
        store, pseudo_dirs = {}, [""]
        protocol = ("gs", "gcs")

        @classmethod
        def _strip_protocol(cls, path):
            path = str(path)
            for prefix in ("gs://", "gcs://"):
                if path.startswith(prefix):
                    path = path[len(prefix):]
            return super()._strip_protocol(path)

        def _open(self, path, mode="rb", **kwargs):
            if "a" in mode:
                raise NotImplementedError(f"{path}: GCS objects cannot be appended to")
            return super()._open(path, mode, **kwargs)

    monkeypatch.setenv("EPATH_USE_TF", "false")  # epath prefers TensorFlow's gfile if installed
    for name in ("gs", "gcs"):
        monkeypatch.setitem(_registry, name, FakeGCS)
    backend._FileSystemSpecBackend._get_filesystem.cache_clear()
    yield FakeGCS.store
    backend._FileSystemSpecBackend._get_filesystem.cache_clear()
