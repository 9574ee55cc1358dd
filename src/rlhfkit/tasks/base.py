"""The abstract :class:`Task`: a world of prompts, a gold judge and simulated labelers.

A task is everything the InstructGPT recipe needs from "the humans", simulated offline:

* ``prompts``: instructions to fine-tune and evaluate on, with a held-out test split;
* ``pretraining_corpus``: raw text for the base model (the world's words and facts, no instructions);
* ``demonstrations``: labeler-written answers for supervised fine-tuning, of mixed quality;
* ``rank``: a labeler's noisy K-way ranking of completions, for reward-model training;
* ``gold_score`` / ``gold_details``: the judge everything is finally scored by.

The gold judge plays the role of "what the labelers really meant"; the simulated labeler is a noisy,
slightly biased view of it. :meth:`Task.rank` draws a Plackett-Luce order from the labeler's utility,
``labeler_utility(prompt, completion) / temperature`` plus Gumbel noise (the Gumbel-max trick), which for
a pair is exactly a Bradley-Terry choice. Completions identical after whitespace normalisation are tied
(the same ranking group); all others are strictly ordered.
"""

from __future__ import annotations

import abc
import hashlib
import math
import random

from rlhfkit.data.records import RankingRecord

#: Gold scores closer than this count as equal when measuring agreement.
GOLD_TIE_EPS = 1e-9


def stable_hash(text: str) -> int:
    """A hash that, unlike ``hash()``, is the same in every process (tasks split their prompts by it)."""
    return int.from_bytes(hashlib.sha256(text.encode()).digest()[:8], "big")


def normalize_whitespace(text: str) -> str:
    """Collapse runs of whitespace to single spaces and strip the ends."""
    return " ".join(text.split())


class Task(abc.ABC):
    """A prompt distribution with a gold judge and a pool of simulated labelers.

    Subclasses set ``name`` and ``temperature`` (the labeler noise of :meth:`rank`; tinyworld's gives a
    :meth:`labeler_agreement` with gold of about 0.73) and implement
    the abstract methods. :meth:`labeler_utility` is the hook for a labeler bias the gold judge does not
    share; by default the labeler's utility is the gold score itself.
    """

    name: str
    temperature: float = 0.1
    #: Completions per prompt that :meth:`labeler_agreement` ranks.
    agreement_group_size: int = 6

    @abc.abstractmethod
    def prompts(self, n: int, *, split: str = "train", seed: int = 0) -> list[str]:
        """``n`` prompts from ``split`` ("train" or "test"), deterministic for ``seed``.

        Test prompts are held out from train. Prompts repeat only when ``n`` exceeds the split's pool.
        """

    @abc.abstractmethod
    def pretraining_corpus(self, n_docs: int, *, seed: int = 0) -> list[str]:
        """Raw documents about the world, not in instruction/response format."""

    @abc.abstractmethod
    def demonstrations(self, prompts: list[str], *, seed: int = 0) -> list[dict]:
        """One ``{"prompt", "completion", "labeler"}`` dict per prompt, by labelers of varying skill."""

    @abc.abstractmethod
    def reference_completion(self, prompt: str) -> str:
        """A gold-optimal completion for ``prompt``."""

    @abc.abstractmethod
    def gold_details(self, prompt: str, completion: str) -> dict[str, float]:
        """The named components, each in [0, 1], that :meth:`gold_score` combines."""

    @abc.abstractmethod
    def gold_score(self, prompt: str, completion: str) -> float:
        """The gold judge: deterministic, in [0, 1]."""

    def answer(self, prompt: str) -> str | None:
        """The exact answer to ``prompt`` where the task is verifiable (its gold judge checks an answer, so a
        policy can be trained on reward functions alone: the ``answer`` field of an RL prompt record, read by
        :func:`rlhfkit.rewards.builtin.exact_answer_reward`); None for a task judged on open-ended text."""
        return None

    def labeler_utility(self, prompt: str, completion: str) -> float:
        """How much a simulated labeler likes ``completion`` before noise (default: the gold score)."""
        return self.gold_score(prompt, completion)

    def rank(
        self,
        prompt: str,
        completions: list[str],
        *,
        rng: random.Random,
        temperature: float | None = None,
    ) -> list[list[int]]:
        """A simulated labeler's ranking of ``completions``: groups of indices, best group first.

        Completions identical after whitespace normalisation share a group (a tie); the distinct texts
        are ordered by a Plackett-Luce draw with weights ``exp(utility / temperature)``. A temperature
        of 0 (or below) orders by utility exactly, ties in utility broken by first index.
        """
        temp = self.temperature if temperature is None else temperature
        groups: dict[str, list[int]] = {}
        for i, completion in enumerate(completions):
            groups.setdefault(normalize_whitespace(completion), []).append(i)
        keys = list(groups)
        utility = [self.labeler_utility(prompt, text) for text in keys]
        if temp > 0:
            # Gumbel-max: argsort of utility/T + Gumbel noise is a Plackett-Luce sample.
            noisy = [u / temp - math.log(max(rng.expovariate(1.0), 1e-300)) for u in utility]
        else:
            noisy = utility
        order = sorted(range(len(keys)), key=lambda k: -noisy[k])
        return [groups[keys[k]] for k in order]

    def rank_samples(
        self,
        prompt: str,
        completions: list[str],
        *,
        rng: random.Random,
        temperature: float | None = None,
        id: str | None = None,
        labeler: str | None = None,
    ) -> RankingRecord | None:
        """The simulated labeler's ranking record of a prompt's samples, or ``None`` when none can be made.

        Empty completions are left out (nothing to rank them by); with fewer than two distinct texts
        left there is nothing to prefer, and ``None`` is returned.
        """
        kept = [c for c in completions if c.strip()]
        groups = self.rank(prompt, kept, rng=rng, temperature=temperature) if len(kept) >= 2 else []
        if len(groups) < 2:
            return None
        return RankingRecord(prompt, tuple(kept), tuple(tuple(sorted(g)) for g in groups), id=id,
                             labeler=labeler or f"{self.name}-simulated")

    def labeler_agreement(
        self, n_prompts: int = 300, *, seed: int = 0, temperature: float | None = None
    ) -> float:
        """Fraction of completion pairs with different gold scores that :meth:`rank` orders like gold.

        For each of ``n_prompts`` train prompts, ``agreement_group_size`` demonstrations (mixed quality,
        as labelers write them) are ranked once; every pair whose gold scores differ counts.
        """
        rng = random.Random(seed)
        agree = total = 0
        for prompt in self.prompts(n_prompts, split="train", seed=seed):
            demos = self.demonstrations([prompt] * self.agreement_group_size, seed=rng.randrange(2**32))
            completions = [d["completion"] for d in demos]
            gold = [self.gold_score(prompt, c) for c in completions]
            position = {}
            for g, group in enumerate(self.rank(prompt, completions, rng=rng, temperature=temperature)):
                for i in group:
                    position[i] = g
            for i in range(len(completions)):
                for j in range(i + 1, len(completions)):
                    if abs(gold[i] - gold[j]) <= GOLD_TIE_EPS:
                        continue
                    total += 1
                    agree += (gold[i] > gold[j]) == (position[i] < position[j])
        return agree / total if total else 1.0
