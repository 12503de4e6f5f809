"""Task suites (HumanEval, jsonl files of every test style), prompts and programs."""
import gzip
import json
import re

import pytest

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
