"""Task suites (HumanEval, jsonl files of every test style, the synthetic families and
their train / held-out split), prompts (DiffuCoder's RL format too) and programs."""
import gzip
import json
import re

import ml_collections
import pytest

from dllm import data, rewards
from dllm import tasks as tasks_lib
from dllm import tokenizer as tokenizer_lib

FENCE = "```"


@pytest.fixture(scope="module")
def humaneval():
    return tasks_lib.load_tasks("humaneval")


def write_jsonl(path, records):
    with open(path, "w") as f:
        for r in records:
            f.write((r if isinstance(r, str) else json.dumps(r)) + "\n")
    return str(path)


MBPP_LIKE = {"task_id": 11, "prompt": "Write add.", "entry_point": "add",
             "test_list": ["assert add(1, 2) == 3", "assert add(0, 0) == 0"],
             "test_imports": ["import math"]}
HE_LIKE = {"task_id": "t/1", "prompt": "def mul(a, b):\n", "entry_point": "mul",
           "test": "def check(candidate):\n    assert candidate(2, 3) == 6\n"}
UNITTEST_LIKE = {"task_id": "t/2", "prompt": "def neg(a):\n", "entry_point": "neg",
                 "test": "import unittest\nclass TestCases(unittest.TestCase):\n"
                         "    def test_neg(self):\n        self.assertEqual(neg(2), -2)\n"}


def test_humaneval_has_164_tasks_with_check_code(humaneval):
    assert len(humaneval) == tasks_lib.HUMANEVAL_SIZE == 164
    assert len({t.task_id for t in humaneval}) == 164
    assert all(len(t.tests) == 1 and f"check({t.entry_point})" in t.tests[0] for t in humaneval)


def test_gzipped_suite(tmp_path):
    path = tmp_path / "tasks.jsonl.gz"
    with gzip.open(path, "wt") as f:
        f.write(json.dumps(HE_LIKE) + "\n")
    assert tasks_lib.load_tasks(str(path))[0].task_id == "t/1"


def test_bad_files_name_the_file_and_line(tmp_path):
    with pytest.raises(FileNotFoundError, match="missing.jsonl"):
        tasks_lib.load_tasks(str(tmp_path / "missing.jsonl"))
    bad_json = write_jsonl(tmp_path / "a.jsonl", [HE_LIKE, "{not json"])
    with pytest.raises(ValueError, match=r"a\.jsonl:2: malformed JSON"):
        tasks_lib.load_tasks(bad_json)
    no_entry = write_jsonl(tmp_path / "b.jsonl", [{**HE_LIKE, "entry_point": None}])
    with pytest.raises(ValueError, match=r"b\.jsonl:1: missing or invalid key 'entry_point'"):
        tasks_lib.load_tasks(no_entry)
    no_tests = write_jsonl(tmp_path / "c.jsonl", [{"task_id": 1, "prompt": "", "entry_point": "f"}])
    with pytest.raises(ValueError, match=r"c\.jsonl:1: needs `test` code"):
        tasks_lib.load_tasks(no_tests)
    duplicate = write_jsonl(tmp_path / "d.jsonl", [HE_LIKE, HE_LIKE])
    with pytest.raises(ValueError, match=r"d\.jsonl:2: duplicate task_id"):
        tasks_lib.load_tasks(duplicate)


def test_build_prompt_styles(humaneval):
    task = humaneval[0]
    assert tasks_lib.build_prompt(task, "base") == task.prompt
    prompt = tasks_lib.build_prompt(task, "instruct")
    assert task.prompt.strip() in prompt
    assert prompt.startswith("<|im_start|>system\nYou are a helpful assistant.<|im_end|>")
    assert prompt.endswith("<|im_start|>assistant\n```python\n")
    assert not tasks_lib.build_prompt(task, "instruct", answer_prefix=False).endswith(FENCE + "python\n")
    custom = tasks_lib.build_prompt(task, "instruct", chat_template=lambda m: f"[{m[-1]['role']}]")
    assert custom == "[user]```python\n"


def test_the_default_chat_template_is_the_tokenizers(humaneval):
    messages = [{"role": "user", "content": "hi"}]
    assert tokenizer_lib.chat_template(messages) == (
        "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n"
        "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n")
    assert tasks_lib.build_prompt(humaneval[0]).startswith(
        tokenizer_lib.chat_template([{"role": "system", "content": "You are a helpful assistant."}],
                                    add_generation_prompt=False))


@pytest.mark.parametrize("tests", [{"tests": []}, {"test_list": []}, {"test": ""},
                                   {"tests": ["assert f(1) == 1", "  "]}])
def test_a_task_without_tests_is_refused(tmp_path, tests):
    """An empty test list would pass any completion (pass@1 = 1.0, a free RL reward)."""
    path = tmp_path / "tasks.jsonl"
    record = {"task_id": "t/0", "prompt": "def f(x):\n", "entry_point": "f", **tests}
    path.write_text(json.dumps(record) + "\n")
    with pytest.raises(ValueError, match=rf"{re.escape(str(path))}:1: task 't/0' has no tests"):
        tasks_lib.load_tasks(str(path))


# ---- synthetic families ----

@pytest.fixture(scope="module")
def splits():
    return {split: tasks_lib.synthetic_tasks(split) for split in tasks_lib.SPLITS}


@pytest.fixture(scope="module")
def suites(splits):
    """(instruction-tuning tasks, held-out tasks)."""
    return splits["sft"], splits["heldout"]


def run_locally(solution: str, tests) -> bool:
    """Our own reference code and asserts (trusted): do all tests pass?"""
    namespace: dict = {}
    try:
        exec(solution, namespace)
        for test in tests:
            exec(test, namespace)
    except AssertionError:
        return False
    return True


def test_splits_are_disjoint_deterministic_and_cover_every_family(splits):
    sft, rl, held = splits["sft"], splits["rl"], splits["heldout"]
    assert len(sft) > 2 * len(rl) > 2 * len(held) > 0
    ids = [t.task_id for t in sft + rl + held]
    assert len(set(ids)) == len(ids)                                     # disjoint
    # Together they are every family's every constant.
    assert len(ids) == sum(len(f.params) for f in tasks_lib.FAMILIES)
    for family in tasks_lib.FAMILIES:
        for split, suite in splits.items():
            assert any(t.entry_point == family.name for t in suite), (family.name, split)
    assert {f.category for f in tasks_lib.FAMILIES} == {"arithmetic", "strings", "lists"}
    assert tasks_lib.synthetic_tasks("rl") == rl                          # same seed, same tasks
    other = tasks_lib.synthetic_tasks("heldout", seed=1)
    assert {t.task_id for t in other} != {t.task_id for t in held}
    assert tasks_lib.load_tasks("synthetic:heldout") == held
    with pytest.raises(ValueError, match="split"):
        tasks_lib.synthetic_tasks("test")


def test_reference_solutions_pass_and_neighbours_fail(splits):
    by_id = {t.task_id: t for suite in splits.values() for t in suite}
    for family in tasks_lib.FAMILIES:
        for k, k_next in zip(family.params, family.params[1:]):
            task = by_id[f"synthetic/{family.name}_{k}"]
            other = by_id[f"synthetic/{family.name}_{k_next}"]
            assert len(task.tests) == 3 and len(set(task.tests)) == 3
            assert run_locally(task.solution, task.tests), task.task_id
            # The neighbouring constant's solution and the family's slip fail these tests.
            assert not run_locally(other.solution, task.tests), (task.task_id, other.solution)
            slip = f"def {family.name}({family.arg}):\n    return {family.slip.format(k=k)}\n"
            assert not run_locally(slip, task.tests), (task.task_id, slip)


def test_the_sft_split_demonstrates_each_familys_slip_in_a_fixed_share(splits):
    for family in tasks_lib.FAMILIES:
        sft = [t for t in splits["sft"] if t.entry_point == family.name]
        slipped = [t for t in sft if t.demonstration]
        assert len(slipped) == round(0.4 * len(sft)), family.name
        for t in slipped:
            k = t.task_id[len(f"synthetic/{family.name}_"):]
            assert t.demonstration == t.solution.replace(family.body.format(k=k),
                                                         family.slip.format(k=k))
            assert not run_locally(t.demonstration, t.tests), t.task_id
    assert not any(t.demonstration for split in ("rl", "heldout") for t in splits[split])
    clean = tasks_lib.synthetic_tasks("sft", slip_fraction=0.0)
    assert [t.task_id for t in clean] == [t.task_id for t in splits["sft"]]
    assert not any(t.demonstration for t in clean)


def test_reference_responses_earn_the_full_reward_in_the_sandbox(suites):
    train, _ = suites
    one_per_family = list({t.entry_point: t for t in train if not t.demonstration}.values())
    responses = [response for _, response in tasks_lib.sft_pairs(one_per_family)]
    out = rewards.compute_rewards(responses, [t.tests for t in one_per_family], workers=2)
    assert out.total.tolist() == [2.5] * len(one_per_family)
    bad = rewards.compute_rewards([responses[0]], [one_per_family[1].tests], workers=1)
    assert bad.total.tolist() == [0.5]                                # format only


def test_diffucoder_prompt_appends_the_first_test_without_a_code_block(suites):
    task = suites[1][0]
    assert tasks_lib.question(task) == f"{task.prompt}\nTest cases: {task.tests[0]}"
    assert tasks_lib.build_prompt(task, "diffucoder") == (
        "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n"
        f"<|im_start|>user\n{task.prompt}\nTest cases: {task.tests[0]}<|im_end|>\n"
        "<|im_start|>assistant\n")
    with_code = tasks_lib.Task("x", f"Complete this:\n{FENCE}\ndef f(x):\n{FENCE}\n", "f",
                           ("assert f(1) == 2",))
    assert tasks_lib.question(with_code) == with_code.prompt
    assert tasks_lib.build_prompt(with_code, "diffucoder", answer_prefix=True).endswith(
        "<|im_start|>assistant\n")
    with pytest.raises(ValueError, match="style"):
        tasks_lib.build_prompt(task, "chat")


def test_sft_pairs_and_the_tasks_data_source(suites):
    train, _ = suites
    pairs = tasks_lib.sft_pairs(train)
    system = {"role": "system", "content": tokenizer_lib.DEFAULT_SYSTEM_PROMPT}
    for task, pair in zip(train[:20], pairs):   # the demonstration where there is one
        assert pair == ((system, {"role": "user", "content": tasks_lib.question(task)}),
                        f"{FENCE}python\n{task.demonstration or task.solution}{FENCE}")
    assert {bool(t.demonstration) for t in train[:20]} == {True, False}
    cfg = ml_collections.ConfigDict(dict(data.default_config(), source="tasks",
                                         path="synthetic:sft"))
    assert data.load_pairs(cfg) == pairs
    with pytest.raises(ValueError, match="reference solution"):
        tasks_lib.sft_pairs([tasks_lib.Task("x", "q", "f", ("assert True",))])
