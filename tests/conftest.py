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
