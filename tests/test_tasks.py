"""Synthetic task families, the train / held-out split, DiffuCoder's prompt format."""
import ml_collections
import pytest

from dllm import data, rewards, tasks

FENCE = "```"


@pytest.fixture(scope="module")
def suites():
    return tasks.synthetic_tasks("train"), tasks.synthetic_tasks("heldout")


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


def test_split_is_disjoint_deterministic_and_covers_every_family(suites):
    train, held = suites
    assert len(train) > 2 * len(held) > 0
    assert not {t.task_id for t in train} & {t.task_id for t in held}
    assert len({t.task_id for t in train + held}) == len(train) + len(held)
    for family in tasks.FAMILIES:
        assert any(t.entry_point.startswith(family.name + "_") for t in held), family.name
        assert sum(t.entry_point.startswith(family.name + "_") for t in train) >= 1
    assert {f.category for f in tasks.FAMILIES} == {"arithmetic", "strings", "lists"}
    assert tasks.synthetic_tasks("train") == train                    # same seed, same tasks
    other = tasks.synthetic_tasks("heldout", seed=1)
    assert {t.task_id for t in other} != {t.task_id for t in held}
    assert tasks.load_tasks("synthetic:heldout") == held
    with pytest.raises(ValueError, match="split"):
        tasks.synthetic_tasks("test")


def test_reference_solutions_pass_and_neighbours_fail(suites):
    train, held = suites
    by_entry = {t.entry_point: t for t in train + held}
    for family in tasks.FAMILIES:
        for k, k_next in zip(family.params, family.params[1:]):
            task, other = by_entry[f"{family.name}_{k}"], by_entry[f"{family.name}_{k_next}"]
            assert len(task.tests) == 3 and len(set(task.tests)) == 3
            assert run_locally(task.solution, task.tests), task.task_id
            # The neighbouring constant's solution, renamed, fails these tests.
            wrong = other.solution.replace(other.entry_point, task.entry_point)
            assert not run_locally(wrong, task.tests), (task.task_id, wrong)


def test_reference_responses_earn_the_full_reward_in_the_sandbox(suites):
    train, _ = suites
    one_per_family = list({t.entry_point.rsplit("_", 1)[0]: t for t in train}.values())
    responses = [response for _, response in tasks.sft_pairs(one_per_family)]
    out = rewards.compute_rewards(responses, [t.tests for t in one_per_family], workers=2)
    assert out.total.tolist() == [2.5] * len(one_per_family)
    bad = rewards.compute_rewards([responses[0]], [one_per_family[1].tests], workers=1)
    assert bad.total.tolist() == [0.5]                                # format only


def test_diffucoder_prompt_appends_the_first_test_without_a_code_block(suites):
    task = suites[1][0]
    assert tasks.question(task) == f"{task.prompt}\nTest cases: {task.tests[0]}"
    assert tasks.build_prompt(task, "diffucoder") == (
        "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n"
        f"<|im_start|>user\n{task.prompt}\nTest cases: {task.tests[0]}<|im_end|>\n"
        "<|im_start|>assistant\n")
    with_code = tasks.Task("x", f"Complete this:\n{FENCE}\ndef f(x):\n{FENCE}\n", "f",
                           ("assert f(1) == 2",))
    assert tasks.question(with_code) == with_code.prompt
    assert tasks.build_prompt(with_code, "diffucoder", answer_prefix=True).endswith(
        "<|im_start|>assistant\n")
    with pytest.raises(ValueError, match="style"):
        tasks.build_prompt(task, "chat")


def test_sft_pairs_and_the_tasks_data_source(suites):
    train, _ = suites
    pairs = tasks.sft_pairs(train)
    assert pairs[0] == (tasks.question(train[0]), f"{FENCE}python\n{train[0].solution}{FENCE}")
    cfg = ml_collections.ConfigDict(dict(data.default_config(), source="tasks",
                                         path="synthetic:train"))
    assert data.load_pairs(cfg) == pairs
    with pytest.raises(ValueError, match="reference solution"):
        tasks.sft_pairs([tasks.Task("x", "q", "f", ("assert True",))])
