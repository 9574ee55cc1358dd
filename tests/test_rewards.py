"""Reward functions: the built-in verifiable rewards (hand-checked values), loading by name, and the checks."""

from __future__ import annotations

from decimal import Decimal
from pathlib import Path

import pytest

from rlhfkit.data.readers import read_records
from rlhfkit.rewards.builtin import (
    exact_answer_reward,
    extract_answer,
    format_reward,
    length_penalty,
    overlong_penalty,
    parse_number,
)
from rlhfkit.rewards.functions import RewardFunctionError, combined_rewards, load_reward_function, reward_source

GSM8K = Path(__file__).resolve().parents[2] / "shared" / "data" / "gsm8k" / "train_1000.jsonl"


@pytest.mark.parametrize("text, value", [("1,000", "1000"), ("$12", "12"), ("-3.50", "-3.5"), ("7.", "7"),
                                         ("abc", None), ("", None), ("1e400", "1e400")])
def test_parse_number(text, value):
    assert parse_number(text) == (None if value is None else Decimal(value))


@pytest.mark.parametrize("text, value", [
    ("She sold 48 + 24 = 72 clips.\n#### 72", "72"),
    ("#### 5 is wrong, the answer is\n#### 1,200", "1200"),   # the last #### wins
    ("So the total is \\boxed{42} and not 41.", "42"),         # \boxed before a later bare number
    ("First 3 apples, then 4 more, so 7", "7"),                # else the last number
    ("no digits here", None),
    ("\\boxed{\\frac{1}{2}}", "2"),                            # not a plain number: the last number
])
def test_extract_answer(text, value):
    assert extract_answer(text) == (None if value is None else Decimal(value))


def test_exact_answer_reward_against_gsm8k_references():
    references = ["Natalia sold 48/2 = <<48/2=24>>24 clips in May.\n#### 72", "#### 10", "3", "#### 5"]
    completions = ["48 + 24 = 72\n#### 72", "She earned $10.00", "#### 4", "nothing"]
    assert exact_answer_reward(["q"] * 4, completions, answer=references) == [1.0, 1.0, 0.0, 0.0]


def test_exact_answer_reward_reads_every_real_gsm8k_answer():
    if not GSM8K.exists():
        pytest.skip(f"{GSM8K} is not on this machine")
    records = read_records(str(GSM8K), "prompt")  # {"question", "answer"}: the question is the prompt
    assert len(records) == 1000 and records[0].prompt.startswith("Natalia sold clips")
    questions, answers = [r.prompt for r in records], [r.fields["answer"] for r in records]
    # a reference solution is right about itself, and a solution to another question mostly is not
    assert exact_answer_reward(questions, answers, answer=answers) == [1.0] * len(records)
    shifted = exact_answer_reward(questions, answers[1:] + answers[:1], answer=answers)
    assert sum(shifted) < 0.1 * len(records)


def test_format_reward():
    completions = ["work\n#### 12", "#### 12 and more", "the answer is 12", "a\n####  -3.5  "]
    assert format_reward([""] * 4, completions) == [1.0, 0.0, 0.0, 1.0]
    assert format_reward([""] * 2, ["<answer>4</answer>", "4"], pattern=r"<answer>.*</answer>") == [1.0, 0.0]


def test_length_penalty():
    completions = ["w " * 10, "w " * 15, "w " * 20, "w " * 50]
    assert length_penalty([""] * 4, completions, max_words=10) == [0.0, -0.5, -1.0, -1.0]
    with pytest.raises(ValueError, match="max_words must be positive"):
        length_penalty([""], ["w"], max_words=0)


def test_overlong_penalty_by_hand():
    # max 10 tokens, the last 4 a soft zone: 6 tokens free, 8 half-way (-(8 - 6) / 4), 10 and beyond -1
    ids = [[0] * n for n in (3, 6, 8, 10, 12)]
    assert overlong_penalty([""] * 5, [""] * 5, completion_ids=ids, max_tokens=10, cache_tokens=4) == [
        0.0, 0.0, -0.5, -1.0, -1.0]
    with pytest.raises(ValueError, match="cache_tokens <= max_tokens"):
        overlong_penalty([""], [""], completion_ids=[[0]], max_tokens=4, cache_tokens=5)


def _write(tmp_path: Path, body: str) -> Path:
    path = tmp_path / "my_rewards.py"
    path.write_text(body, encoding="utf-8")
    return path


def test_load_by_builtin_module_or_file(tmp_path):
    assert load_reward_function("format") is format_reward
    assert load_reward_function("rlhfkit.rewards.builtin:length_penalty") is length_penalty
    path = _write(tmp_path, "def shout(prompts, completions, **fields):\n"
                            "    return [c.count('!') for c in completions]\n")
    source = reward_source(f"{path}:shout", weight=0.5)
    assert source.name == "shout" and source(["p", "p"], ["a!", "b!!"], {}) == [1.0, 2.0]


@pytest.mark.parametrize("name, message", [
    ("nonsense", "expected a built-in"),
    ("rlhfkit.rewards.builtin:no_such", "has no function 'no_such'"),
    ("no_such_package_xyz:f", "importing no_such_package_xyz failed: ModuleNotFoundError"),
    ("missing/file.py:f", "no file missing/file.py"),
])
def test_load_errors_name_the_function(name, message):
    with pytest.raises(RewardFunctionError, match=message) as error:
        load_reward_function(name)
    assert repr(name) in str(error.value)


def test_unknown_option_is_refused_before_any_call():
    with pytest.raises(RewardFunctionError, match="'length_penalty' takes no option 'max_tokens'"):
        reward_source("length_penalty", options={"max_tokens": 5})
    assert reward_source("length_penalty", options={"max_words": 5}).options == {"max_words": 5}


@pytest.mark.parametrize("body, message", [
    ("    raise KeyError('answer')", "'bad' raised KeyError: 'answer'"),
    ("    return [1.0]", "'bad' returned 1 values for 2 completions"),
    ("    return [1.0, float('nan')]", "'bad' returned nan for completion 1: 'y'"),
    ("    return [1.0, 'high']", "'bad' must return one number per completion"),
    ("    return None", "'bad' must return one number per completion"),
])
def test_a_wrong_return_names_the_function(tmp_path, body, message):
    path = _write(tmp_path, f"def bad(prompts, completions, **fields):\n{body}\n")
    with pytest.raises(RewardFunctionError, match=message.replace("(", r"\(")):
        reward_source(f"{path}:bad")(["p", "p"], ["x", "y"], {})


def test_combined_rewards_weights_sources_and_keeps_each(tmp_path):
    fields = {"answer": ["#### 4", "#### 5"]}
    sources = [reward_source("exact_answer", weight=1.0), reward_source("format", weight=0.25),
               reward_source("length_penalty", weight=2.0, options={"max_words": 2})]
    totals, each = combined_rewards(sources, ["q1", "q2"], ["#### 4", "it is 6 I think\n#### 6"], fields)
    assert each == {"exact_answer": [1.0, 0.0], "format": [1.0, 1.0], "length_penalty": [0.0, -1.0]}
    assert totals == [1.25, 0.25 - 2.0]
    with pytest.raises(RewardFunctionError, match="share a name"):
        combined_rewards([sources[1], sources[1]], ["q"], ["#### 1"])
