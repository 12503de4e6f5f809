"""The paper's analyses of how a diffusion LM decodes (DiffuCoder, arXiv 2506.20639).

  python -m dllm.analyze --config=experiments/analysis.py:<variant> --workdir=OUT

Each variant writes PNG plots and CSV / markdown tables to OUT:
  arness           local and global AR-ness@k (k = 1..max_k) of each run's decodings of
                   the task prompts, mean and spread over samples, beside pass@k
  entropy_sink     the confidence at every position of a fully masked completion at the
                   first step (Dream's negative entropy, LLaDA's top log-probability),
                   averaged over the task prompts; and one decoding's confidence heatmap
  temperature      AR-ness, tokens per model call and pass@k against temperature
  decoding_steps   pass@1 with steps = max_new_tokens x each of `fractions` (1, 1/2), and
                   its relative drop, per run
  training_stages  AR-ness, tokens per call and pass@k of each run / checkpoint in turn
                   (stages, steps of one run, RL steps: an RL run is another run directory)

Variants as named are tiny: they run on one CPU with the tiny runs of the other configs
(runs/pretrain, runs/midtrain, runs/sft), trained first when missing, on
experiments/data/tasks_tiny.jsonl (the 30 functions of the tiny SFT set as bare
signatures with assert tests: a check of the machinery on problems the tiny SFT run was
trained on, not a benchmark). `<variant>_7b` reads
DiffuCoder-7B weights imported with `python -m dllm.convert import` (see README) into
runs/diffucoder-7b-base and runs/diffucoder-7b-instruct, on HumanEval with the
paper's decoding (entropy order, 256 tokens in 256 steps, top-p 0.95).

Runs are `config.runs.<label>` (workdir, step, style, command), analysed in the order
of `config.read`, e.g. --config.runs.sft.workdir=/my/run --config.runs.sft.step=200
--config.read="('pretrain','sft')"; `config.train` names those trained first.
"""
import dataclasses

import ml_collections

from dllm import sampling

ANALYSES = ("arness", "entropy_sink", "temperature", "decoding_steps", "training_stages")


def _run(workdir: str, command: str = "", style: str = "base") -> dict:
    return dict(workdir=workdir, step=-1, style=style, command=command)


TINY_RUNS = {
    "pretrain": _run("runs/pretrain", "experiments/pretrain.py:tiny"),
    "midtrain": _run("runs/midtrain", "experiments/midtrain.py:tiny "
                     "--config.init.checkpoint=runs/pretrain"),
    "sft": _run("runs/sft", "experiments/sft.py:tiny --config.init.checkpoint=runs/pretrain"),
}
# The runs each tiny analysis reads (single-run analyses read the first).
TINY_READS = {"arness": ("pretrain", "sft"), "entropy_sink": ("sft",), "temperature": ("sft",),
              "decoding_steps": ("pretrain", "sft"),
              "training_stages": ("pretrain", "midtrain", "sft")}
RUNS_7B = {"base": _run("runs/diffucoder-7b-base"),
           "instruct": _run("runs/diffucoder-7b-instruct", style="instruct")}


def get_config(arg: str = "arness"):
    big = arg.endswith("_7b")
    name = arg[:-len("_7b")] if big else arg
    if name not in ANALYSES:
        raise ValueError(f"unknown variant {arg!r} of experiments/analysis.py; allowed: "
                         f"{', '.join(ANALYSES)}, each also as <name>_7b")
    c = ml_collections.ConfigDict()
    c.analysis = name
    c.seed = 0
    # runs.<label>: workdir; step (-1 = latest); style, how task prompts are built for it:
    # base (the code prompt, continued) | instruct (a chat turn + "```python"); command:
    # the `dllm.main --config` (with overrides) that trains it ("" = not trained here).
    c.runs = RUNS_7B if big else TINY_RUNS
    # The runs analysed, in this order (single-run analyses take the first).
    single = name in ("entropy_sink", "temperature")
    c.read = (("base",) if single else ("base", "instruct")) if big else TINY_READS[name]
    # Trained first, in this order, where the workdir holds no finished run (midtrain
    # and sft start from pretrain).
    c.train = () if big else ("pretrain",) + tuple(r for r in c.read if r != "pretrain")
    # Tasks: "humaneval" or a jsonl suite (dllm.tasks); limit: the first N (0 = all).
    c.tasks = "humaneval" if big else "experiments/data/tasks_tiny.jsonl"
    c.limit = 0
    c.n = 10 if name == "temperature" else 1   # completions per task
    c.k = (1, 10) if name == "temperature" else (1,)   # pass@k reported
    c.max_k = 10 if big else 6                 # AR-ness@k for k = 1..max_k
    c.temperatures = (0.2, 0.4, 0.6, 0.8, 1.0, 1.2)
    c.fractions = (1.0, 0.5)                   # decoding_steps: steps / max_new_tokens
    # Prompts per decoding batch; the entropy sink's forward holds [batch, length, vocab]
    # float32 logits (8 x ~650 x 152064 at 7B: ~3 GB, twice).
    c.batch_size = 8 if big else 16
    c.timeout = 3.0                            # seconds per test case
    sample = sampling.SampleConfig(alg="entropy", max_new_tokens=256 if big else 48,
                                   steps=256 if big else 48, top_p=0.95,
                                   temperature=0.2 if big else 0.0)
    c.sample = dataclasses.asdict(sample)      # every SampleConfig field (dllm.sampling)
    return c
