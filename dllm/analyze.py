"""The paper's analyses of how the model decodes:

    python -m dllm.analyze --config=experiments/analysis.py:<variant> --workdir=OUT

Variants (experiments/analysis.py): arness, entropy_sink, temperature, decoding_steps,
training_stages, each also as <variant>_7b. Writes PNG plots and CSV / markdown tables
to OUT. Runs named in config.train whose workdir holds no finished run are trained
first with `python -m dllm.main` (a subprocess), e.g. the tiny pretraining and SFT runs.
Config keys can be overridden: --config.runs.sft.workdir=/my/run --config.n=20.
"""
import shlex
import subprocess
import sys

from absl import app, flags, logging
from ml_collections import config_flags

from dllm import analysis, cli, runs


def finished(workdir: str) -> bool:
    """Whether workdir holds a run whose latest checkpoint is its last step."""
    saved = runs.checkpoint_steps(workdir)
    return bool(saved) and max(saved) >= runs.read_config(workdir).train.steps


def train_missing(config) -> None:
    """Trains each run of config.train (in order) whose workdir holds no finished run."""
    for label in config.train:
        run = config.runs[label]
        if finished(run.workdir):
            continue
        if not run.command:
            raise SystemExit(f"config.runs.{label}: {run.workdir} holds no finished run and "
                             f"config.runs.{label}.command is empty")
        experiment, *overrides = shlex.split(run.command)
        cmd = [sys.executable, "-m", "dllm.main", f"--config={experiment}",
               f"--workdir={run.workdir}", *overrides]
        print(f"training {label}: {shlex.join(cmd)}", flush=True)
        subprocess.run(cmd, check=True)


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    logging.set_verbosity(logging.WARNING)
    config = flags.FLAGS.config
    train_missing(config)
    for path in analysis.run_analysis(config, flags.FLAGS.workdir):
        print(path)


def _define_flags() -> None:  # at run time only: the module is also imported (notebooks)
    config_flags.DEFINE_config_file("config", None, "experiments/analysis.py:<variant>",
                                    lock_config=True)
    flags.DEFINE_string("workdir", None, "Where the plots and tables go.")
    flags.mark_flags_as_required(["config", "workdir"])


if __name__ == "__main__":
    _define_flags()
    cli.run(main)
