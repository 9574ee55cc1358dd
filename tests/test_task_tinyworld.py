"""The tinyworld task: prompts, corpus, demonstrations, the gold judge and the simulated labeler."""

from __future__ import annotations

import random
import re
import statistics
import time

import pytest

from rlhfkit.tasks import TASKS, Task, TinyWorld, get_task
from rlhfkit.tasks.tinyworld import KINDS, LABELERS, SEVERITY


@pytest.fixture(scope="module")
def task() -> TinyWorld:
    return TinyWorld()


def all_prompts(task: TinyWorld, split: str) -> list[str]:
    """The whole pool of a split (larger than any pool, so every prompt appears)."""
    return sorted(set(task.prompts(5000, split=split)))


# ------------------------------------------------------------------------------------------- registry


def test_registry():
    assert TASKS["tinyworld"] is TinyWorld
    task = get_task("tinyworld")
    assert isinstance(task, TinyWorld) and isinstance(task, Task) and task.name == "tinyworld"
    with pytest.raises(ValueError, match="known tasks: sums, tinyworld"):
        get_task("nope")


# -------------------------------------------------------------------------------------------- prompts


def test_prompts_deterministic_and_seeded(task):
    assert task.prompts(50, seed=3) == task.prompts(50, seed=3)
    assert task.prompts(50, seed=3) != task.prompts(50, seed=4)
    assert task.prompts(20, split="test", seed=1) == task.prompts(20, split="test", seed=1)
    with pytest.raises(ValueError, match="split"):
        task.prompts(3, split="valid")


def test_prompts_cover_types_and_repeat_only_past_the_pool(task):
    train = all_prompts(task, "train")
    test = all_prompts(task, "test")
    assert len(train) > 500 and len(test) > 100
    sample = task.prompts(len(test), split="test", seed=0)
    assert len(set(sample)) == len(sample)  # no repeats while the pool lasts
    assert len(task.prompts(len(test) + 10, split="test")) == len(test) + 10
    kinds = [task.spec(p).kind for p in task.prompts(160)]
    for kind in KINDS:
        assert 25 <= kinds.count(kind) <= 55  # the four types are interleaved evenly
    for prompt in train + test:
        assert prompt == prompt.strip() and "  " not in prompt and prompt.isascii()
        assert 3 <= len(prompt.split()) <= 14


def test_train_and_test_are_disjoint_by_subject(task):
    train, test = all_prompts(task, "train"), all_prompts(task, "test")
    assert not set(train) & set(test)
    train_keys = {(task.spec(p).kind, task.spec(p).split_key) for p in train}
    test_keys = {(task.spec(p).kind, task.spec(p).split_key) for p in test}
    assert not train_keys & test_keys  # held-out subject/type combinations, not just held-out wordings
    assert {kind for kind, _ in test_keys} == set(KINDS)


def test_unknown_prompt_is_rejected(task):
    with pytest.raises(ValueError, match="not a tinyworld prompt"):
        task.gold_score("Write a poem about cats.", "No.")
    assert task.gold_score("  Write a story   about otters. ", "The end.") >= 0.0  # whitespace is normalised


# --------------------------------------------------------------------------------------- corpus & demos


def test_corpus_is_deterministic_raw_text(task):
    docs = task.pretraining_corpus(400, seed=5)
    assert docs == task.pretraining_corpus(400, seed=5)
    assert docs != task.pretraining_corpus(400, seed=6)
    prompts = all_prompts(task, "train") + all_prompts(task, "test")
    text = "\n".join(docs)
    assert not any(p in text for p in prompts)
    for doc in docs:
        assert doc == doc.strip() and "  " not in doc and doc.isascii()
        assert "?" not in doc and not re.search(r"\b(Write|Explain|List|Name|Answer|Tell me)\b", doc)
        assert 5 <= len(doc.split()) <= 80
    # ... yet it carries the world's facts and the answers' forms.
    assert "A whale is a mammal." in text or "Whales are mammals." in text
    assert "The end." in text


def test_demonstrations(task):
    prompts = task.prompts(1000, seed=2)
    demos = task.demonstrations(prompts, seed=7)
    assert demos == task.demonstrations(prompts, seed=7)
    assert demos != task.demonstrations(prompts, seed=8)
    assert [d["prompt"] for d in demos] == prompts
    assert {d["labeler"] for d in demos} == {name for name, _ in LABELERS}
    for d in demos:
        assert set(d) == {"prompt", "completion", "labeler"}
        assert d["completion"] == d["completion"].strip() and "  " not in d["completion"]
    gold = [task.gold_score(d["prompt"], d["completion"]) for d in demos]
    mean = statistics.mean(gold)
    print(f"demonstration mean gold {mean:.3f}")
    assert 0.6 <= mean <= 0.75
    assert statistics.mean(task.gold_score(p, task.reference_completion(p)) for p in prompts) == 1.0
    by_labeler = {name: [] for name, _ in LABELERS}
    for d, g in zip(demos, gold, strict=True):
        by_labeler[d["labeler"]].append(g)
    means = [statistics.mean(by_labeler[name]) for name, _ in LABELERS]  # ordered by skill
    assert means[0] < means[2] < means[4]


# ------------------------------------------------------------------------------------------ the judge


@pytest.mark.parametrize("split", ["train", "test"])
def test_reference_is_optimal_for_every_prompt(task, split):
    for prompt in all_prompts(task, split):
        reference = task.reference_completion(prompt)
        assert reference == task.reference_completion(prompt)
        assert task.gold_score(prompt, reference) == 1.0, (prompt, reference, task.gold_details(prompt, reference))
        assert set(task.gold_details(prompt, reference)) == {*SEVERITY[task.spec(prompt).kind], "words",
                                                             "grammar", "form", "length"}


STORY = "Write a story about otters."
GOOD_STORY = ("Once there was an otter named Tom. Tom lived by the river. Tom liked to eat fish. Tom was very happy. "
              "The end.")
LIST = "List three fruits."
EXPLAIN = "Explain rain to a 6-year-old."
GOOD_EXPLAIN = ("Rain is water that falls from the clouds. Clouds are made of tiny drops of water. When the drops "
                "get big and heavy, they fall down as rain.")
QUESTION = "Is a whale a fish? Answer yes or no and say why."


@pytest.mark.parametrize(
    ("prompt", "completion", "score", "changed"),
    [
        (STORY, GOOD_STORY, 1.0, {}),
        (STORY, GOOD_STORY.removesuffix(" The end."), 0.5, {"ending": 0.0}),
        (STORY, GOOD_STORY.replace("by the river", "in the desert"), 0.7, {"facts": 0.5}),
        (STORY, GOOD_STORY.replace("fish.", "fish. Tom liked to eat fish."), 0.9, {"repetition": 5 / 6}),
        (STORY, "Once there was a fox named Tom. Tom lived in the forest. Tom liked to eat mice. Tom was very "
         "happy. The end.", 0.4 * 0.4, {"topic": 0.0, "facts": 0.0}),
        (STORY, "Once there was an otter named Tom. The end.", 0.75 * 0.7 * 9 / 18,
         {"sentences": 0.5, "facts": 0.5, "length": 9 / 18}),
        (LIST, "Here are three fruits: apple, pear and plum.", 1.0, {}),
        (LIST, "Three fruits are apples, pears and plums.", 1.0, {}),
        (LIST, "Here are three fruits: apple and pear.", 0.7, {"count": 0.5}),
        (LIST, "Here are three fruits: apple, pear and carrot.", 0.8, {"category": 2 / 3}),
        (LIST, "Here are three fruits: apple, pear and apple.", 0.7 * 0.7, {"count": 0.5, "duplicates": 0.5}),
        (LIST, "Apples, pears and plums.", 0.7 * 0.8, {"topic": 0.0, "length": 0.8}),
        (EXPLAIN, GOOD_EXPLAIN, 1.0, {}),
        (EXPLAIN, GOOD_EXPLAIN.replace("When the drops get big and heavy, they fall down as rain.",
                                       "Scientists call this precipitation, and it begins with condensation."),
         0.5, {"simple_words": 0.0}),
        (EXPLAIN, "When the air is very cold, tiny bits of ice grow in the clouds. They stick together and make "
         "flakes. The flakes fall down as snow.", 0.4, {"topic": 0.0}),
        (EXPLAIN, "Rain is water that falls from the clouds.", 0.875 * 8 / 14, {"sentences": 0.75, "length": 8 / 14}),
        (QUESTION, "No. A whale is not a fish. It is a mammal.", 1.0, {}),
        (QUESTION, "No. Whales are mammals, not fish.", 1.0, {}),
        (QUESTION, "Yes. A whale is a fish.", 0.2 * 0.4, {"answer": 0.0, "reason": 0.0}),
        (QUESTION, "No. A whale is not a mammal.", 0.4, {"reason": 0.0}),
        (QUESTION, "No. A whale is a mammal, not a fish. It is a bird.", 0.7, {"reason": 0.5}),
        (QUESTION, "No.", 0.4 * 0.7 * 0.25, {"reason": 0.0, "topic": 0.0, "length": 0.25}),
    ],
)
def test_criteria_hand_checked(task, prompt, completion, score, changed):
    details = task.gold_details(prompt, completion)
    expected = {k: 1.0 for k in details} | changed
    assert details == pytest.approx(expected)
    assert task.gold_score(prompt, completion) == pytest.approx(score)


def test_gates_catch_garbage(task):
    shuffled = GOOD_STORY.split()
    random.Random(0).shuffle(shuffled)
    cases = {
        "": 0.0,
        "   ": 0.0,
        "xq zz 19 #### ot ter": 0.0,
        GOOD_STORY.lower(): 0.0,  # no sentence starts with a capital
        " ".join(shuffled): 0.05,
        "Otter river fish. The end.": 0.07,  # well-formed word salad
        " ".join([GOOD_STORY] * 10): 0.0,  # far too long
    }
    for completion, bound in cases.items():
        assert task.gold_score(STORY, completion) <= bound, completion
    assert task.gold_details(STORY, "")["words"] == 0.0
    assert task.gold_details(STORY, "Tom was a little brown otter otter.")["form"] == 0.0  # a word twice in a row
    padded = GOOD_STORY.removesuffix(" The end.") + " Tom ran and played all day. Tom sang a little song. " \
        "Tom jumped up and down. Then Tom took a long nap. Tom made a new friend. It was a good day. The end."
    n = len(padded.split())
    assert task.gold_details(STORY, padded)["length"] == pytest.approx(1 - (n - 36) / 36)
    assert task.gold_details(STORY, padded)["sentences"] == 0.0


def test_scores_stay_in_unit_interval(task):
    rng = random.Random(1)
    words = sorted(task._vocab) + ["The", "end.", "Yes.", "No,", "!!", "?", "zzz", "Tom.", ""]
    prompts = task.prompts(40, seed=9)
    for _ in range(1000):
        completion = " ".join(rng.choice(words) for _ in range(rng.randint(0, 80)))
        score = task.gold_score(rng.choice(prompts), completion)
        assert 0.0 <= score <= 1.0


def test_throughput(task):
    demos = task.demonstrations(task.prompts(500, seed=4), seed=4)
    start = time.perf_counter()
    for _ in range(4):
        for d in demos:
            task.gold_score(d["prompt"], d["completion"])
    rate = 4 * len(demos) / (time.perf_counter() - start)
    print(f"gold judgements per second: {rate:,.0f}")
    assert rate > 1000


# ---------------------------------------------------------------------------------------- the labeler


def test_rank_is_a_grouping_with_ties_for_identical_texts(task):
    rng = random.Random(0)
    prompt = task.prompts(1, seed=11)[0]
    completions = [d["completion"] for d in task.demonstrations([prompt] * 7, seed=3)]
    completions += [" " + completions[0] + "  ", completions[0].replace(" ", "   ", 2)]
    for _ in range(20):
        groups = task.rank(prompt, completions, rng=rng)
        flat = [i for g in groups for i in g]
        assert sorted(flat) == list(range(len(completions)))
        assert all(groups)
        group_of = {i: k for k, g in enumerate(groups) for i in g}
        assert group_of[0] == group_of[7] == group_of[8]
        texts = [" ".join(c.split()) for c in completions]
        for i in range(len(completions)):
            for j in range(len(completions)):
                assert (group_of[i] == group_of[j]) == (texts[i] == texts[j])


def test_rank_samples_makes_a_ranking_record_or_none(task):
    prompt = STORY
    bad, good = GOOD_STORY.removesuffix(" The end."), GOOD_STORY
    record = task.rank_samples(prompt, [bad, "  ", good, bad], rng=random.Random(0), temperature=0, id="p7")
    # the empty sample is left out; the indices are into the kept completions; identical texts tie
    assert record.completions == (bad, good, bad)
    assert record.ranking == ((1,), (0, 2))
    assert (record.id, record.labeler) == ("p7", "tinyworld-simulated")
    assert task.rank_samples(prompt, [good, " " + good + " ", ""], rng=random.Random(0)) is None  # one text
    assert task.rank_samples(prompt, [good], rng=random.Random(0)) is None


def test_rank_at_zero_temperature_follows_utility(task):
    prompt = STORY
    bad, good = GOOD_STORY.removesuffix(" The end."), GOOD_STORY
    longer = ("There once lived an otter called Tom. Every morning Tom played by the river. Every day Tom looked "
              "for fish to eat. At night Tom had a good long sleep. The end.")
    assert task.gold_score(prompt, longer) == task.gold_score(prompt, good) == 1.0
    rng = random.Random(0)
    assert task.rank(prompt, [bad, good, bad], rng=rng, temperature=0) == [[1], [0, 2]]
    # The length bias: between equally good answers the labeler prefers the longer one.
    assert task.rank(prompt, [good, longer], rng=rng, temperature=0) == [[1], [0]]
    unbiased = TinyWorld(labeler_bias=0.0)
    assert unbiased.rank(prompt, [good, longer], rng=rng, temperature=0) == [[0], [1]]  # ties by index
    biased = TinyWorld(labeler_bias=1.0, temperature=0.3)
    wins = sum(biased.rank(prompt, [good, longer], rng=rng)[0] == [1] for _ in range(2000))
    assert 0.57 < wins / 2000 < 0.68  # P = sigmoid((9 / 60) / 0.3) = 0.62


def test_labeler_agreement(task):
    agreement = task.labeler_agreement(300, seed=0)
    print(f"labeler agreement with gold at T={task.temperature}: {agreement:.3f}")
    assert 0.68 <= agreement <= 0.78
    assert agreement == task.labeler_agreement(300, seed=0)
    assert task.labeler_agreement(200, seed=1, temperature=0.0) >= 0.93  # only the length bias disagrees
    assert TinyWorld(labeler_bias=0.0).labeler_agreement(200, seed=1, temperature=0.0) == 1.0
    assert task.labeler_agreement(200, seed=1, temperature=5.0) < 0.6
