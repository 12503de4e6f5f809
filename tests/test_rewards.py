"""Code extraction, the format and execution rewards, and their weighted total."""
import numpy as np
import pytest

from dllm import rewards

FENCE = "```"
GOOD = f"Here is the solution:\n{FENCE}python\ndef add(a, b):\n    return a + b\n{FENCE}\n"
WRONG = f"{FENCE}python\ndef add(a, b):\n    return a - b\n{FENCE}"
BROKEN = f"{FENCE}python\ndef add(a, b) return a + b\n{FENCE}\n"
TWO_BLOCKS = f"{FENCE}python\ndef add(a, b):\n    return a + b\n{FENCE}\n{FENCE}python\nprint(1)\n{FENCE}\n"
TRAILING_PROSE = GOOD + "This adds two numbers.\n"
NO_BLOCK = "def add(a, b):\n    return a + b\n"
TESTS = ["assert add(1, 2) == 3", "assert add(0, 0) == 0", "assert add(-1, 1) == 0",
         "assert add(2, 2) == 4"]


# ---- extraction ----

def test_chat_extraction_takes_the_first_python_block():
    assert rewards.extract_code(GOOD) == "def add(a, b):\n    return a + b\n"
    assert rewards.extract_code(TWO_BLOCKS) == "def add(a, b):\n    return a + b\n"
    text = f"{FENCE}text\nnot code\n{FENCE}\n{FENCE}py\nx = 1\n{FENCE}"
    assert rewards.extract_code(text) == "x = 1\n"


def test_chat_extraction_fallbacks():
    assert rewards.extract_code(f"{FENCE}\nx = 2\n{FENCE}") == "x = 2\n"  # unlabelled
    assert rewards.extract_code(f"{FENCE}python\nx = 3\ny = 4") == "x = 3\ny = 4"  # cut off
    assert rewards.extract_code(NO_BLOCK) is None
    assert rewards.extract_code("") is None


def test_base_extraction_cuts_at_stop_sequences():
    body = "    return a + b\n"
    assert rewards.extract_code(body + "\ndef unused():\n    pass\n", "base") == body
    assert rewards.extract_code(body + "\nprint(add(1, 2))\n", "base") == body
    assert rewards.extract_code(body + "\nif __name__ == '__main__':\n", "base") == body
    assert rewards.extract_code(body, "base") == body
    assert rewards.extract_code(body + "\ndef g(): pass", "base", stop=()) == body + "\ndef g(): pass"
    with pytest.raises(ValueError):
        rewards.extract_code(body, "other")


# ---- format ----

@pytest.mark.parametrize("completion, expected", [
    (GOOD, 1.0),
    (WRONG, 1.0),                               # format says nothing about correctness
    (GOOD.rstrip("\n") + "\n\n  \n", 1.0),      # whitespace after the block is fine
    (BROKEN, 0.5),                              # one block, syntax error
    (NO_BLOCK, 0.0),
    (TWO_BLOCKS, 0.0),                          # not exactly one block
    (TRAILING_PROSE, 0.0),                      # text after the block
    (f"{FENCE}\ndef add(a, b):\n    return a + b\n{FENCE}\n", 0.0),   # no python label
    (f"{FENCE}python\ndef add(a, b):\n    return a + b\n", 0.0),      # never closed
    (f"{FENCE}python\n\n{FENCE}\n", 1.0),       # an empty module parses
])
def test_format_reward(completion, expected):
    assert rewards.format_reward(completion) == expected


# ---- execution ----

def test_execution_reward_is_the_fraction_of_tests_passed():
    cfg = rewards.RewardConfig(timeout=2.0)
    assert rewards.execution_reward(GOOD, TESTS, cfg) == 1.0
    # a - b equals a + b only when b == 0: of TESTS, just add(0, 0) == 0
    assert rewards.execution_reward(WRONG, TESTS, cfg) == 0.25
    assert rewards.execution_reward(NO_BLOCK, TESTS, cfg) == 0.0
    assert rewards.execution_reward(GOOD, [], cfg) == 0.0


def test_exit_status_zero_is_not_a_pass():
    cheat = f"{FENCE}python\nimport sys\ndef add(a, b):\n    return 0\nsys.exit(0)\n{FENCE}\n"
    assert rewards.format_reward(cheat) == 1.0
    assert rewards.execution_reward(cheat, TESTS, rewards.RewardConfig(timeout=2.0)) == 0.0


# ---- the batch and its weighted total ----

def test_compute_rewards_matches_hand_computed_totals():
    completions = [GOOD, WRONG, BROKEN, NO_BLOCK, TRAILING_PROSE]
    result = rewards.compute_rewards(completions, [TESTS] * 5,
                                     rewards.RewardConfig(timeout=2.0), workers=2)
    fmt = np.array([1.0, 1.0, 0.5, 0.0, 0.0])
    exe = np.array([1.0, 0.25, 0.0, 0.0, 0.0])  # execution only where format == 1
    np.testing.assert_allclose(result.format, fmt)
    np.testing.assert_allclose(result.execution, exe)
    np.testing.assert_allclose(result.total, 2.0 * exe + 0.5 * fmt)
    assert [r is not None for r in result.results] == [True, True, False, False, False]


def test_weights_and_gate_come_from_the_config():
    cfg = rewards.RewardConfig(execution_weight=1.0, format_weight=0.25,
                               execution_requires_format=False, timeout=2.0)
    result = rewards.compute_rewards([TRAILING_PROSE, BROKEN], [TESTS, TESTS], cfg)
    np.testing.assert_allclose(result.execution, [1.0, 0.0])  # ran although format is 0
    np.testing.assert_allclose(result.total, [1.0 * 1.0 + 0.25 * 0.0, 0.25 * 0.5])


def test_base_mode_runs_the_completion_without_a_format_reward():
    cfg = rewards.RewardConfig(mode="base", timeout=2.0)
    completions = ["def add(a, b):\n    return a + b\n", "def add(a, b):\n    return 0\n"]
    result = rewards.compute_rewards(completions, [TESTS, TESTS], cfg)
    np.testing.assert_allclose(result.format, [0.0, 0.0])
    # `return 0` passes add(0, 0) == 0 and add(-1, 1) == 0: 2 of 4
    np.testing.assert_allclose(result.execution, [1.0, 0.5])
    np.testing.assert_allclose(result.total, [2.0, 1.0])


def test_compute_rewards_checks_lengths():
    with pytest.raises(ValueError):
        rewards.compute_rewards([GOOD, GOOD], [TESTS])
