"""Sums: a verifiable task with exact answers, where labelers who show their work are right and those who
do not sometimes slip.

The questions add four digits from 1 to 9 ("What is 7 + 5 + 8 + 3?"). Every question has one right answer,
checked exactly (the completion's last number, as the ``exact_answer`` reward function reads an answer without
GSM8K's ``####``), so a policy can be trained on the answer's correctness alone (GRPO with ``exact_answer``),
with no reward model.

Labelers write demonstrations in two forms:

* *worked*: "Step by step: 7 + 5 + 8 + 3 = 12 + 8 + 3 = 20 + 3 = 23. The answer is 23." -- the sum rewritten
  with its first two numbers added, until one number is left: each step copies the rest of the line and
  adds two numbers, facts the pretraining corpus states again and again. Always right.
* *direct*: "The answer is 23." -- the sum in one step, off by 1 to 3 in :data:`DIRECT_SLIP` (40 %) of them.

How often a labeler shows the work varies (:data:`LABELERS`: 10 % to 90 %, half of all demonstrations on
average). SFT imitates both forms and the direct answers' slips; rewarded for the final answer's correctness
alone, reinforcement learning has two ways to do better than imitation: prefer the form that is right more
often, and stop reproducing the slips. (Measured with the demo's ~1M-parameter model: SFT is right 50 % of the
time and GRPO 98 %, answering in the worked form every time; see docs/tasks.md.)

The gold judge is the answer's correctness (1 or 0); :meth:`Sums.gold_details` also reports whether the
work was shown and the fraction of its steps that hold. Prompts are split into train and test by a stable
hash of the addends, so held-out questions are new combinations of the same facts.
"""

from __future__ import annotations

import random
import re
from functools import lru_cache
from itertools import product

from rlhfkit.tasks.base import Task, stable_hash

#: (labeler, probability of showing the work) of the simulated labelers; mean 0.5.
LABELERS = (("l1", 0.9), ("l2", 0.7), ("l3", 0.5), ("l4", 0.3), ("l5", 0.1))
#: How often a labeler who answers without working slips (the answer off by 1 to 3 either way).
DIRECT_SLIP = 0.4
#: How many digits a question adds (each 1-9).
ADDENDS = (4,)
#: Share of the pretraining documents that work a sum out (the others state addition facts).
WORKED_SHARE = 0.6
#: Share of the questions held out for testing (by a stable hash of the addends).
TEST_SHARE = 0.2
TEMPLATES = ("What is {sum}?", "Compute {sum}.", "Add {list}.", "What do you get when you add {list}?",
             "Work out {sum}.")
#: How a worked answer (and each worked sum of the pretraining corpus) starts.
WORKED_START = "Step by step:"
_NUMBER = re.compile(r"-?\d+")


def _as_sum(addends: tuple[int, ...]) -> str:
    return " + ".join(map(str, addends))


def _as_list(addends: tuple[int, ...]) -> str:
    return ", ".join(map(str, addends[:-1])) + f" and {addends[-1]}"


def worked_solution(addends: tuple[int, ...]) -> str:
    """The sum rewritten step by step, the first two numbers replaced by their sum each time, then the answer:
    "Step by step: 7 + 5 + 8 = 12 + 8 = 20. The answer is 20." Each step copies the rest of the line before it
    and adds two numbers."""
    line, steps = list(addends), []
    while len(line) > 1:
        steps.append(_as_sum(tuple(line)))
        line = [line[0] + line[1], *line[2:]]
    return f"{WORKED_START} " + " = ".join([*steps, str(line[0])]) + f". The answer is {line[0]}."


def direct_solution(addends: tuple[int, ...], slip: int = 0) -> str:
    """The answer alone (``slip`` away from the sum)."""
    return f"The answer is {sum(addends) + slip}."


@lru_cache(maxsize=1)
def _prompt_pool() -> tuple[dict[str, tuple[int, ...]], dict[str, dict[int, list[str]]]]:
    """Every prompt with its addends, and the prompts of each split by their number of addends."""
    addends_of: dict[str, tuple[int, ...]] = {}
    splits: dict[str, dict[int, list[str]]] = {"train": {}, "test": {}}
    for n in ADDENDS:
        for addends in product(range(1, 10), repeat=n):
            split = "test" if stable_hash(_as_sum(addends)) % 1000 < TEST_SHARE * 1000 else "train"
            template = TEMPLATES[stable_hash("template " + _as_sum(addends)) % len(TEMPLATES)]
            prompt = template.format(sum=_as_sum(addends), list=_as_list(addends))
            addends_of[prompt] = addends
            splits[split].setdefault(n, []).append(prompt)
    return addends_of, splits


class Sums(Task):
    """The sums task (see the module docstring): exact answers, two forms of demonstration."""

    name = "sums"
    # labeler noise of :meth:`Task.rank`: gold scores are 0 or 1, so a right answer is ranked above a wrong one
    # with probability 1 / (1 + exp(-1 / 0.5)), about 0.88
    temperature = 0.5

    def __init__(self) -> None:
        self._addends, self._splits = _prompt_pool()

    def addends(self, prompt: str) -> tuple[int, ...]:
        """The digits ``prompt`` asks to add; ValueError for a prompt this task did not generate."""
        try:
            return self._addends[" ".join(prompt.split())]
        except KeyError:
            raise ValueError(f"not a sums prompt: {prompt!r}") from None

    def answer(self, prompt: str) -> str:
        """The sum ``prompt`` asks for."""
        return str(sum(self.addends(prompt)))

    def prompts(self, n: int, *, split: str = "train", seed: int = 0) -> list[str]:
        """``n`` prompts of ``split``, each number of addends equally likely (there are 9**n questions of n
        digits, so the longest would otherwise be almost all); a prompt repeats only once its pool is used up."""
        if split not in self._splits:
            raise ValueError(f"unknown split {split!r}; expected 'train' or 'test'")
        rng = random.Random(seed)
        left = {size: [] for size in ADDENDS}
        out: list[str] = []
        for _ in range(n):
            size = rng.choice(ADDENDS)
            if not left[size]:
                pool = self._splits[split][size]
                left[size] = rng.sample(pool, len(pool))
            out.append(left[size].pop())
        return out

    def pretraining_corpus(self, n_docs: int, *, seed: int = 0) -> list[str]:
        """Documents of addition facts ("12 + 8 = 20.") and of sums worked out step by step to their result
        ("7, 5, 8 and 3. Step by step: 7 + 5 + 8 + 3 = 12 + 8 + 3 = 20 + 3 = 23. The answer is 23."), never a
        question and never a sum of many digits in one step.

        The facts cover every running total a question can reach plus every digit, so the corpus teaches each
        step of a worked answer. The worked sums (:data:`WORKED_SHARE` of the documents) teach the chain and
        the copying it needs: the digits, stated first as a sum, as a list or not at all, are copied into the
        first line, each line copies the rest of the one before, and the answer copies the last total.
        """
        rng = random.Random(seed)
        top = 9 * (max(ADDENDS) - 1)
        docs = []
        for _ in range(n_docs):
            if rng.random() >= WORKED_SHARE:
                facts = []
                for _ in range(rng.randint(4, 8)):
                    total, digit = rng.randint(1, top), rng.randint(1, 9)
                    facts.append(f"{total} + {digit} = {total + digit}.")
                docs.append(" ".join(facts))
            else:
                sums = []
                for _ in range(rng.randint(1, 2)):
                    addends = tuple(rng.randint(1, 9) for _ in range(rng.choice(ADDENDS)))
                    stated = rng.choice(("", f"{_as_sum(addends)}. ", f"{_as_list(addends)}. "))
                    sums.append(stated + worked_solution(addends))
                docs.append(" ".join(sums))
        return docs

    def demonstrations(self, prompts: list[str], *, seed: int = 0) -> list[dict]:
        """Each prompt answered by a labeler drawn from :data:`LABELERS`: worked (always right) or direct (off by
        1 to 3 with probability :data:`DIRECT_SLIP`)."""
        rng = random.Random(seed)
        out = []
        for prompt in prompts:
            labeler, shows_work = rng.choice(LABELERS)
            addends = self.addends(prompt)
            if rng.random() < shows_work:
                completion = worked_solution(addends)
            else:
                slip = rng.choice((-3, -2, -1, 1, 2, 3)) if rng.random() < DIRECT_SLIP else 0
                completion = direct_solution(addends, slip)
            out.append({"prompt": prompt, "completion": completion, "labeler": labeler})
        return out

    def reference_completion(self, prompt: str) -> str:
        """The worked solution."""
        return worked_solution(self.addends(prompt))

    def gold_details(self, prompt: str, completion: str) -> dict[str, float]:
        """``correct`` (the completion's last number is the sum: what ``exact_answer`` checks on completions
        without GSM8K's ``####`` or a ``\\boxed{}``), ``shows_work`` (the sum is rewritten at least once:
        "a + b + c = d + c") and ``steps_correct`` (the fraction of the sides of those equations that add up to
        the right sum; 1 without work)."""
        total = sum(self.addends(prompt))
        numbers = _NUMBER.findall(completion)
        sides = [_NUMBER.findall(side) for side in completion.split(" The answer")[0].split("=")]
        sides = [side for side in sides if side]
        right = sum(sum(map(int, side)) == total for side in sides)
        return {"correct": float(bool(numbers) and int(numbers[-1]) == total),
                "shows_work": float(len(sides) >= 2), "steps_correct": right / len(sides) if len(sides) >= 2 else 1.0}

    def gold_score(self, prompt: str, completion: str) -> float:
        """1.0 for the right final answer, else 0.0."""
        return self.gold_details(prompt, completion)["correct"]
