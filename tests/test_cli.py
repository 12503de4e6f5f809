"""dllm.cli: bad input to any command line ends in one line naming the key, file or
run (exit 2), before anything is written; a bug keeps its traceback."""
import json
import os
import subprocess
import sys

import pytest

from dllm import cli, metrics, model as model_lib, runs

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _raise(fn, *args):
    try:
        fn(*args)
    except Exception as e:  # noqa: BLE001
        return e
    raise AssertionError("no error")


def test_only_errors_dllm_raises_itself_are_input_errors(tmp_path):
    missing = _raise(runs.read_config, str(tmp_path / "nowhere"))
    assert cli.raised_by_dllm(missing)
    assert cli.message(missing) == f"'{tmp_path / 'nowhere'}' is not a run directory: no config.json"
    unknown = _raise(model_lib.config_from_dict, {"hiden": 1})
    assert cli.raised_by_dllm(unknown)
    assert cli.message(unknown).startswith("unknown model config key(s) ['hiden']")   # no quotes
    (tmp_path / "metrics.jsonl").write_text(json.dumps({"loss": 1.0}) + "\n")
    bug = _raise(metrics.drop_rows_after, str(tmp_path), 1)    # a row without "step"
    assert isinstance(bug, KeyError) and not cli.raised_by_dllm(bug)
    assert not cli.raised_by_dllm(_raise(json.loads, "{"))
    wrapped = ValueError("Error whilst parsing config file:\n\nTraceback (most recent call "
                         "last):\n  File x\nValueError: experiments/x.py: variant ''")
    assert cli.message(wrapped) == "experiments/x.py: variant ''"


def _run(module, *args):
    return subprocess.run([sys.executable, "-m", module, *args], capture_output=True, text=True,
                          timeout=120, cwd=ROOT, env={**os.environ, "PYTHONPATH": ROOT,
                                                      "JAX_PLATFORMS": "cpu"})


@pytest.mark.parametrize("args,message", [
    (["--config=experiments/pretrain.py:tiny", "--config.train.bogus=1"],
     "--config.train.bogus: unknown config key 'bogus' in config.train (its keys: b1, b2, "),
    (["--config=experiments/pretrain.py:tiny", "--config.train.steps=abc"],
     "flag --config.train.steps=abc: invalid literal for int() with base 10: 'abc'"),
    (["--config=experiments/nothere.py:tiny"],
     "--config=experiments/nothere.py:tiny: no such config file 'experiments/nothere.py'"),
    (["--config=experiments/pretrain.py"],
     "experiments/pretrain.py: variant ''; pass one of tiny, adapt, 7b after a colon"),
    (["--config=experiments/pretrain.py:tiny", "--config.train.steps=-5"],
     "train.steps=-5; must be >= 1"),
    (["--config=experiments/pretrain.py:tiny", "--config.loss.schedule=bogus"],
     "loss.schedule='bogus'; allowed: ('linear', 'cosine', 'polynomial', 'loglinear')"),
], ids=["unknown_key", "ill_typed", "missing_file", "no_variant", "steps", "schedule"])
def test_main_names_the_bad_input_in_one_line_and_writes_nothing(tmp_path, args, message):
    workdir = tmp_path / "run"
    done = _run("dllm.main", *args, f"--workdir={workdir}")
    assert done.returncode == 2, done.stderr[-3000:]
    assert done.stderr.startswith(f"error: {message}") and done.stderr.count("\n") == 1, \
        done.stderr[-3000:]
    assert not workdir.exists()


def test_sample_names_a_missing_run_or_step(trained_run, tmp_path):
    done = _run("dllm.sample", f"--workdir={tmp_path / 'nowhere'}")
    assert (done.returncode, done.stderr) == (
        2, f"error: '{tmp_path / 'nowhere'}' is not a run directory: no config.json\n")
    done = _run("dllm.sample", f"--workdir={trained_run}", "--checkpoint_step=7")
    assert (done.returncode, done.stderr) == (
        2, f"error: no checkpoint step 7 in {trained_run}/checkpoints (steps: [2])\n")
