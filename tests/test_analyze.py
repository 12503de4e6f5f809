"""The analysis CLI and experiments/analysis.py: every variant's config, training of
missing runs, and the analyses end to end on the tests' tiny run (trained_run)."""
import csv
import importlib.util
import os
import subprocess
import sys

import pytest

from dllm import analysis, analyze

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
_SPEC = importlib.util.spec_from_file_location("experiments_analysis",
                                               os.path.join(ROOT, "experiments", "analysis.py"))
experiments_analysis = importlib.util.module_from_spec(_SPEC)
_SPEC.loader.exec_module(experiments_analysis)


@pytest.mark.parametrize("variant", [f"{name}{size}" for name in experiments_analysis.ANALYSES
                                     for size in ("", "_7b")])
def test_every_variant_names_runs_it_has(variant):
    config = experiments_analysis.get_config(variant)
    points = analysis.checkpoints(config)
    assert points and all(label in config.runs for label in config.train)
    assert config.analysis == variant.removesuffix("_7b")
    if variant.endswith("_7b"):
        assert config.sample.max_new_tokens == config.sample.steps == 256 and not config.train
    else:  # what a tiny analysis reads is trained first, pretrain before what starts from it
        assert set(config.read) <= set(config.train) and config.train[0] == "pretrain"


def test_unknown_variant_and_unknown_run_fail_naming_them():
    with pytest.raises(ValueError, match="unknown variant 'nope'"):
        experiments_analysis.get_config("nope")
    config = experiments_analysis.get_config("arness")
    config.read = ("pretrain", "rl")
    with pytest.raises(KeyError, match="rl"):
        analysis.checkpoints(config)


def test_train_missing_needs_a_command(tmp_path):
    config = experiments_analysis.get_config("arness")
    config.runs.pretrain.workdir = str(tmp_path / "none")
    config.runs.pretrain.command = ""
    config.train = ("pretrain",)
    assert not analyze.finished(str(tmp_path / "none"))
    with pytest.raises(SystemExit, match="config.runs.pretrain.command is empty"):
        analyze.train_missing(config)


def _tiny_overrides(run: str) -> list[str]:
    return [f"--config.runs.pretrain.workdir={run}", "--config.read=('pretrain',)",
            "--config.train=()", "--config.limit=3", "--config.n=2", "--config.k=(1,2)",
            "--config.max_k=3", "--config.sample.max_new_tokens=8", "--config.sample.steps=8",
            "--config.temperatures=(0.0,1.0)"]


@pytest.mark.slow
def test_cli_writes_the_plot_and_tables(trained_run, tmp_path):
    """decoding_steps on the tests' tiny run: steps 8 and 4, the relative drop column."""
    run = trained_run
    assert analyze.finished(run)
    out = str(tmp_path / "out")
    proc = subprocess.run(
        [sys.executable, "-m", "dllm.analyze", "--config=experiments/analysis.py:decoding_steps",
         f"--workdir={out}", *_tiny_overrides(run)], cwd=ROOT, capture_output=True, text=True,
        env={**os.environ, "JAX_PLATFORMS": "cpu", "XLA_FLAGS": ""}, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert sorted(os.listdir(out)) == ["decoding_steps.csv", "decoding_steps.md",
                                       "decoding_steps.png"]
    rows = list(csv.DictReader(open(os.path.join(out, "decoding_steps.csv"))))
    assert [(r["run"], r["steps"]) for r in rows] == [("pretrain", "8"), ("pretrain", "4")]
    assert {"pass@1", "pass@2", "relative_drop", "tokens_per_call", "global@3"} <= set(rows[0])


@pytest.mark.slow
@pytest.mark.parametrize("name", ["arness", "entropy_sink", "temperature", "training_stages"])
def test_each_analysis_writes_its_files(trained_run, tmp_path, name):
    config = experiments_analysis.get_config(name)
    config.runs.pretrain.workdir = trained_run
    config.update(read=("pretrain",), train=(), limit=3, n=2, k=(1, 2), max_k=3,
                  temperatures=(0.0, 1.0))
    config.sample.update(max_new_tokens=8, steps=8)
    paths = analysis.run_analysis(config, str(tmp_path))
    assert all(os.path.getsize(p) > 0 for p in paths)
    expected = {"entropy_sink": {"entropy_sink.png", "entropy_sink.csv", "entropy_sink.md",
                                 "confidence_trace.png"}}.get(
        name, {f"{name}.png", f"{name}.csv", f"{name}.md"})
    assert {os.path.basename(p) for p in paths} == expected
