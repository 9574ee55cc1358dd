"""Best-of-n sampling: draw ``n`` completions per prompt, keep the one the reward model scores highest.

The simplest way to optimise against a reward model (Nakano et al. 2021, WebGPT; Stiennon et al. 2020),
the baseline of Gao et al. 2022's over-optimisation study, and, with the kept samples used as SFT data,
rejection-sampling fine-tuning (Touvron et al. 2023, Llama 2). Its KL to the sampled policy is
:func:`rlhfkit.evaluate.overoptimisation.best_of_n_kl`.

The selection is pure (:func:`best_index`, :func:`best_of_prefix`) and separate from the model I/O
(:func:`sample_best_of_n`). All ``n`` scores are kept, so one draw of ``n`` serves every ``m <= n``: the
best of the first ``m`` draws is a best-of-``m`` sample (the draws are independent), which is how an
over-optimisation study gets n = 1, 2, 4, ..., 64 from one n = 64 draw.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

from transformers import PreTrainedTokenizerBase

from rlhfkit.data.records import Prompt
from rlhfkit.models.reward import score_texts
from rlhfkit.rollout.generate import Generation, SamplingConfig, generate_k


def best_index(scores: Sequence[float]) -> int:
    """The index of the highest score; the first one on ties. Raises on no scores or a NaN score."""
    if not scores:
        raise ValueError("best-of-n needs at least one score")
    if any(math.isnan(s) for s in scores):
        raise ValueError("a score is NaN: the reward model's output cannot be ranked")
    best = 0
    for i, score in enumerate(scores):
        if score > scores[best]:  # strictly greater: ties keep the earlier draw
            best = i
    return best


def best_of_prefix(scores: Sequence[float], m: int) -> int:
    """The best-of-``m`` pick from one draw of ``n >= m``: :func:`best_index` of the first ``m`` scores.

    ``m = 1`` is the first sample (a plain sample of the policy); the picked score never decreases as ``m``
    grows.
    """
    if not 1 <= m <= len(scores):
        raise ValueError(f"m must be between 1 and the {len(scores)} scores drawn, got {m}")
    return best_index(scores[:m])


@dataclass(frozen=True)
class BestOfN:
    """The ``n`` draws for one prompt, their reward-model scores, and the index of the best (first on ties)."""

    prompt: Prompt
    samples: tuple[Generation, ...]
    scores: tuple[float, ...]
    index: int

    @property
    def best(self) -> Generation:
        return self.samples[self.index]

    @property
    def text(self) -> str:
        return self.best.text

    @property
    def score(self) -> float:
        return self.scores[self.index]


def select_best(prompts: Sequence[Prompt], groups: Sequence[Sequence[Generation]],
                scores: Sequence[float]) -> list[BestOfN]:
    """Pair each prompt's draws with its slice of the flat ``scores`` (prompt-major) and pick the best."""
    if sum(len(g) for g in groups) != len(scores):
        raise ValueError(f"{len(scores)} scores for {sum(len(g) for g in groups)} samples")
    results, start = [], 0
    for prompt, group in zip(prompts, groups, strict=True):
        chunk = tuple(scores[start:start + len(group)])
        start += len(group)
        results.append(BestOfN(prompt, tuple(group), chunk, best_index(chunk)))
    return results


def sample_best_of_n(model, tokenizer: PreTrainedTokenizerBase, scorer: tuple, prompts: Sequence[Prompt], n: int,
                     sampling: SamplingConfig = SamplingConfig(), *, seed: int | None = None,
                     score_batch_size: int = 32) -> list[BestOfN]:
    """Best-of-``n`` of a policy for each prompt, in prompt order.

    ``scorer`` is ``(reward_model, reward_tokenizer)`` as :func:`~rlhfkit.models.reward.load_for_scoring`
    returns it. The ``n`` completions per prompt are independent draws
    (:func:`~rlhfkit.rollout.generate.generate_k`); all of them are scored in one
    :func:`~rlhfkit.models.reward.score_texts` call (normalised rewards, length-sorted batches).
    """
    if n < 1:
        raise ValueError(f"n must be at least 1, got {n}")
    groups = generate_k(model, tokenizer, prompts, n, sampling, seed=seed)
    scores = score_texts(*scorer, [p for p, group in zip(prompts, groups, strict=True) for _ in group],
                         [g.text for group in groups for g in group], batch_size=score_batch_size)
    return select_best(prompts, groups, scores)
