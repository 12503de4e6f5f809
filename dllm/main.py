"""Train a stage: python -m dllm.main --config=experiments/<stage>.py:<variant> --workdir=DIR

Config keys can be overridden: --config.train.lr=1e-4. Rerunning the same command in
the same workdir resumes from its latest checkpoint. On N hosts, run the same command
on each: TPU VMs (and SLURM, Open MPI) are detected; elsewhere add
--config.distributed.coordinator_address=HOST0:PORT --config.distributed.num_processes=N
--config.distributed.process_id=I. SIGTERM or Ctrl-C saves a checkpoint and exits 0
(a second Ctrl-C exits at once). Bad input ends in one line naming it (dllm.cli).
"""
from absl import app, flags, logging
from ml_collections import config_flags

from dllm import cli, sharding, train

_CONFIG = config_flags.DEFINE_config_file("config", None, "Experiment file and variant.",
                                          lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Directory for checkpoints, metrics, samples.")
flags.mark_flags_as_required(["config", "workdir"])


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    logging.set_verbosity(logging.WARNING)  # orbax reports every save at INFO
    sharding.initialize_distributed(_CONFIG.value.distributed)
    train.train_and_evaluate(_CONFIG.value, _WORKDIR.value)


if __name__ == "__main__":
    cli.run(main)
