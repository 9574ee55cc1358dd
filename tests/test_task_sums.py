"""The sums task: questions with exact answers, worked and direct demonstrations, the gold judge."""

from __future__ import annotations

import re

import pytest

from rlhfkit.rewards.builtin import exact_answer_reward
from rlhfkit.tasks import TASKS, Sums, get_task
from rlhfkit.tasks.sums import ADDENDS, DIRECT_SLIP, LABELERS, direct_solution, worked_solution


@pytest.fixture(scope="module")
def task() -> Sums:
    return get_task("sums")


def test_registered_and_verifiable(task):
    assert TASKS["sums"] is Sums and isinstance(task, Sums)
    prompt = task.prompts(1)[0]
    assert task.answer(prompt) == str(sum(task.addends(prompt)))
    assert get_task("tinyworld").answer(get_task("tinyworld").prompts(1)[0]) is None  # judged on open text
    with pytest.raises(ValueError, match="not a sums prompt"):
        task.addends("What is 1 + 1?")


def test_worked_and_direct_solutions_by_hand():
    assert worked_solution((7, 5, 8, 3)) == "Step by step: 7 + 5 + 8 + 3 = 12 + 8 + 3 = 20 + 3 = 23. The answer is 23."
    assert direct_solution((7, 5, 8, 3)) == "The answer is 23."
    assert direct_solution((7, 5, 8, 3), slip=-2) == "The answer is 21."


def test_prompts_are_seeded_split_and_name_their_addends(task):
    assert task.prompts(30, seed=1) == task.prompts(30, seed=1) != task.prompts(30, seed=2)
    train, test = set(task.prompts(3000)), set(task.prompts(1000, split="test"))
    assert not train & test and len(test) > 800
    # a question's other wordings are in its split too: the split is by the addends
    assert not {task.addends(p) for p in train} & {task.addends(p) for p in test}
    for prompt in list(train)[:200]:
        addends = task.addends(prompt)
        assert len(addends) in ADDENDS and all(1 <= d <= 9 for d in addends)
        assert [int(n) for n in re.findall(r"\d+", prompt)] == list(addends)
    with pytest.raises(ValueError, match="split"):
        task.prompts(3, split="valid")


def test_demonstrations_show_the_work_half_the_time_and_slip_only_without_it(task):
    prompts = task.prompts(3000, seed=3)
    demos = task.demonstrations(prompts, seed=3)
    assert demos == task.demonstrations(prompts, seed=3)
    assert [d["prompt"] for d in demos] == prompts and {d["labeler"] for d in demos} == {n for n, _ in LABELERS}
    details = [task.gold_details(d["prompt"], d["completion"]) for d in demos]
    worked = [x for x in details if x["shows_work"]]
    direct = [x for x in details if not x["shows_work"]]
    assert 0.45 < len(worked) / len(demos) < 0.55  # the labelers' mean share, 0.5
    assert all(x["correct"] == x["steps_correct"] == 1.0 for x in worked)
    slips = 1 - sum(x["correct"] for x in direct) / len(direct)
    assert abs(slips - DIRECT_SLIP) < 0.04, slips
    for d, x in zip(demos, details, strict=True):
        if not x["shows_work"]:  # a slip is 1 to 3 off, in either direction
            assert d["completion"].startswith("The answer is ")
            assert 0 <= abs(int(d["completion"][14:-1]) - int(task.answer(d["prompt"]))) <= 3
    by_labeler = {name: [x["shows_work"] for d, x in zip(demos, details, strict=True) if d["labeler"] == name]
                  for name, _ in LABELERS}
    assert sum(by_labeler["l1"]) / len(by_labeler["l1"]) > 0.8 > 0.2 > sum(by_labeler["l5"]) / len(by_labeler["l5"])


def test_the_gold_judge_checks_the_last_number_and_the_steps(task):
    prompt = task.prompts(1, seed=5)[0]
    a, b, c, d = task.addends(prompt)
    total = a + b + c + d
    assert task.gold_details(prompt, task.reference_completion(prompt)) == {
        "correct": 1.0, "shows_work": 1.0, "steps_correct": 1.0}
    # a slip in the second of three sides: the answer is still right
    assert task.gold_details(prompt, f"{a} + {b} + {c} + {d} = {a + b + 1} + {c} + {d} = {total}.") == {
        "correct": 1.0, "shows_work": 1.0, "steps_correct": pytest.approx(2 / 3)}
    assert task.gold_details(prompt, f"The answer is {total + 1}.") == {
        "correct": 0.0, "shows_work": 0.0, "steps_correct": 1.0}
    assert task.gold_score(prompt, f"{total} is what I get, not {total - 1}.") == 0.0  # the last number counts
    assert task.gold_score(prompt, "") == task.gold_score(prompt, "The answer is.") == 0.0
    # the gold judge and the exact_answer reward function agree on every demonstration and on wrong answers
    prompts = task.prompts(200, seed=6)
    completions = [d["completion"] for d in task.demonstrations(prompts)]
    completions[::3] = [f"The answer is {int(task.answer(p)) + 2}." for p in prompts[::3]]
    rewards = exact_answer_reward(prompts, completions, answer=[task.answer(p) for p in prompts])
    assert rewards == [task.gold_score(p, c) for p, c in zip(prompts, completions, strict=True)]
    assert 0 < sum(rewards) < len(rewards)


def test_the_corpus_teaches_the_steps_and_never_asks(task):
    docs = task.pretraining_corpus(300, seed=0)
    assert docs == task.pretraining_corpus(300, seed=0)
    text = " ".join(docs)
    assert "?" not in text and "What" not in text and "Add" not in text
    facts = re.findall(r"(?<![+=] )\b(\d+) \+ (\d+) = (\d+)\.", text)  # the single facts, not worked sums
    assert len(facts) > 300 and all(int(x) + int(y) == int(z) for x, y, z in facts)
    worked = re.findall(r"Step by step: ([\d +=]+)\. The answer is (\d+)\.", text)
    assert len(worked) > 100 and len(worked) == text.count("Step by step")
    for line, answer in worked:  # every side of a worked sum has the same total, the answer's
        assert {sum(map(int, re.findall(r"\d+", side))) for side in line.split("=")} == {int(answer)}, line
    # the digits are stated before their worked sum, as a sum, as a list or not at all
    stated = re.findall(r"(?:^|\. )([\d ,+and]+)\. Step by step: ([\d +]+) =", text)
    assert {"+" in digits for digits, _ in stated} == {True, False}
    assert all(re.findall(r"\d", digits) == re.findall(r"\d", first) for digits, first in stated)
    # every step a question can need: each running total up to 9 * (max addends - 1), plus each digit
    top = 9 * (max(ADDENDS) - 1)
    steps = re.findall(r"(\d+) \+ (\d+) =", " ".join(task.pretraining_corpus(3000, seed=1)))
    pairs = {(int(x), int(y)) for x, y in steps}
    assert {(t, d) for t in range(2, top + 1) for d in range(1, 10)} <= pairs
