"""Code extraction and the coupled-GRPO rewards (DiffuCoder's recipe).

total = execution_weight * execution + format_weight * format, with
  format    = 1.0 when the response is exactly one fenced ```python block (prose
              before it allowed, nothing but whitespace after it) whose code
              parses; 0.5 when that block has a syntax error; 0.0 otherwise;
  execution = fraction of the task's test cases that ran to completion after the
              block's code, each with its own timeout, in the sandbox
              (`dllm.execution`); counted only when format == 1.
Differences from the released code, all deliberate: a test passes only if it
really ran (not on exit status 0); the code runs as a module named `solution`,
so an `if __name__ == "__main__":` block does not run (it would read stdin or
loop); trailing whitespace of any kind is allowed after the closing fence (the
released regex wants exactly one newline).
"""
import ast
import dataclasses
import re
from typing import Callable, Sequence

import numpy as np

from dllm import execution

# A fence line: ``` plus an optional language label, then the code, then ```.
_BLOCK = re.compile(r"```([^\n`]*)\n(.*?)```", re.DOTALL)
_OPEN = re.compile(r"```([^\n`]*)\n")
_PYTHON_LABELS = ("python", "py", "python3")
# Codex / HumanEval stop sequences for base-model completions of a function body.
BASE_STOP = ("\nclass ", "\ndef ", "\n#", "\nif ", "\nprint(", "\nassert ", "\n```")


@dataclasses.dataclass(frozen=True)
class RewardConfig:
    """Weights and execution settings (defaults: DiffuCoder's coupled-GRPO).

    execution_weight, format_weight: total = these times the two components.
    execution_requires_format: count execution only when format == 1 (and only
      run those completions).
    timeout: wall seconds per test case (DiffuCoder: 5).
    mode: "chat" (code = the first python block) or "base" (code = the
      completion cut at BASE_STOP; the format component is then 0 and ungated).
    sandbox: limits of each run; its timeout is replaced by `timeout`.
    """
    execution_weight: float = 2.0
    format_weight: float = 0.5
    execution_requires_format: bool = True
    timeout: float = 5.0
    mode: str = "chat"
    sandbox: execution.SandboxConfig = execution.SandboxConfig()


@dataclasses.dataclass(frozen=True)
class Rewards:
    """Per-completion rewards of a batch: float64 arrays of shape [len(completions)],
    and the sandbox Result of each completion that ran (None if it did not)."""
    total: np.ndarray
    format: np.ndarray
    execution: np.ndarray
    results: list


def _python_blocks(text: str) -> list[str]:
    return [code for label, code in _BLOCK.findall(text)
            if label.strip().lower() in _PYTHON_LABELS]


def extract_code(completion: str, mode: str = "chat",
                 stop: Sequence[str] = BASE_STOP) -> str | None:
    """The code in a model's output.

    Args:
      completion: the model's text (in chat mode, the whole assistant response,
        including a prefilled answer prefix such as "```python\\n").
      mode: "chat": the first ```python (or py / python3) block; failing that the
        first unlabelled block; failing that, a python block left unclosed (a
        response cut at the length limit). "base": the completion itself, cut at
        the first of `stop` (a base model continues the prompt's function body).
      stop: stop sequences for base mode (() keeps the bare completion).
    Returns:
      the code, or None in chat mode when there is no code block.
    """
    if mode == "base":
        cut = min((i for i in (completion.find(s) for s in stop) if i >= 0),
                  default=len(completion))
        return completion[:cut]
    if mode != "chat":
        raise ValueError(f"mode must be 'chat' or 'base', got {mode!r}")
    blocks = _BLOCK.findall(completion)
    for wanted in (_PYTHON_LABELS, ("",)):
        for label, code in blocks:
            if label.strip().lower() in wanted:
                return code
    opening = _OPEN.search(completion)
    if opening and opening.group(1).strip().lower() in _PYTHON_LABELS:
        rest = completion[opening.end():]
        if "```" not in rest:
            return rest
    return None


def format_reward(completion: str) -> float:
    """1.0: exactly one ```python block (prose before it allowed, only whitespace
    after it) that parses; 0.5: the same with a syntax error; 0.0: otherwise."""
    blocks = list(_BLOCK.finditer(completion))
    if (len(blocks) != 1 or completion.count("```") != 2
            or completion[blocks[0].end():].strip()
            or blocks[0].group(1).strip().lower() != "python"):
        return 0.0
    try:
        ast.parse(blocks[0].group(2).strip())  # stripped, as DiffuCoder does
    except (SyntaxError, ValueError):  # ValueError: null bytes in the source
        return 0.5
    return 1.0


def execution_reward(completion: str, tests: Sequence[str],
                     cfg: RewardConfig = RewardConfig()) -> float:
    """Fraction of `tests` that pass after the completion's code (0 if none found)."""
    code = extract_code(completion, cfg.mode)
    if code is None or not tests:
        return 0.0
    return execution.run_tests(code, tests, _sandbox(cfg)).pass_fraction


def _sandbox(cfg: RewardConfig) -> execution.SandboxConfig:
    return dataclasses.replace(cfg.sandbox, timeout=cfg.timeout)


def compute_rewards(completions: Sequence[str], tests_per_completion: Sequence[Sequence[str]],
                    cfg: RewardConfig = RewardConfig(), workers: int | None = None,
                    progress: Callable[[int], object] | None = None) -> Rewards:
    """Rewards of a batch (e.g. G completions for each of B prompts), run in parallel.

    Args:
      completions: model responses.
      tests_per_completion: the test cases (assert statements or check code) of
        each completion's task; same length as completions.
      cfg: weights and execution settings.
      workers: sandbox pool size (default: CPU count).
      progress: called with 1 per finished run.
    """
    if len(completions) != len(tests_per_completion):
        raise ValueError(f"{len(completions)} completions but "
                         f"{len(tests_per_completion)} test lists")
    if cfg.mode == "base":
        formats = np.zeros(len(completions))
    else:
        formats = np.array([format_reward(c) for c in completions], dtype=np.float64)
    codes = [extract_code(c, cfg.mode) for c in completions]
    run = [i for i, code in enumerate(codes) if code is not None and tests_per_completion[i]
           and (formats[i] == 1.0 or cfg.mode == "base" or not cfg.execution_requires_format)]
    jobs = [execution.Job(codes[i], tuple(tests_per_completion[i])) for i in run]
    results: list = [None] * len(completions)
    for i, result in zip(run, execution.execute_many(jobs, workers, config=_sandbox(cfg),
                                                     progress=progress)):
        results[i] = result
    executions = np.array([r.pass_fraction if r is not None else 0.0 for r in results])
    total = cfg.execution_weight * executions + cfg.format_weight * formats
    return Rewards(total, formats, executions, results)
