"""Pure functions over evaluation results: win rates and means with bootstrap intervals, diversity."""

from __future__ import annotations

import math
import random
from collections.abc import Hashable, Sequence


def win_rate(scores: Sequence[float], baseline: Sequence[float], *, n_bootstrap: int = 1000, confidence: float = 0.95,
             seed: int = 0, tie_eps: float = 1e-9, groups: Sequence[Hashable] | None = None) -> dict[str, float]:
    """How often a model's output beats the baseline's on the same prompt, a tie counting half.

    ``scores[i]`` and ``baseline[i]`` judge the two outputs for row ``i`` (gold judge, reward model,
    or 1/0 human verdicts). Returns ``win_rate``, the percentile-bootstrap interval ``low`` / ``high``
    (prompts resampled with replacement, ``n_bootstrap`` times; ``groups`` as in :func:`mean_interval`),
    and the counts of ``wins``, ``ties`` and ``losses``.
    """
    if len(scores) != len(baseline):
        raise ValueError(f"{len(scores)} scores for {len(baseline)} baseline scores")
    if not scores:
        raise ValueError("win_rate needs at least one prompt")
    outcomes = [0.5 if abs(a - b) <= tie_eps else float(a > b) for a, b in zip(scores, baseline, strict=True)]
    interval = mean_interval(outcomes, n_bootstrap=n_bootstrap, confidence=confidence, seed=seed,
                             groups=groups)
    return {"win_rate": interval["mean"], "low": interval["low"], "high": interval["high"],
            "wins": outcomes.count(1.0), "ties": outcomes.count(0.5), "losses": outcomes.count(0.0)}


def standard_error(values: Sequence[float]) -> float:
    """The standard error of the mean of ``values``: the sample standard deviation over ``sqrt(n)``."""
    n = len(values)
    mean = sum(values) / n
    return math.sqrt(sum((v - mean) ** 2 for v in values) / max(n - 1, 1) / n)


def distinct_n(texts: Sequence[str], n: int) -> float:
    """Distinct-n (Li et al. 2016): distinct word n-grams over all word n-grams of ``texts``."""
    grams = [tuple(words[i:i + n]) for words in (t.split() for t in texts) for i in range(len(words) - n + 1)]
    return len(set(grams)) / len(grams) if grams else 0.0


def mean_interval(values: Sequence[float], *, n_bootstrap: int = 1000, confidence: float = 0.95,
                  seed: int = 0, groups: Sequence[Hashable] | None = None) -> dict[str, float]:
    """The mean of per-prompt ``values`` and its percentile-bootstrap interval ``low`` / ``high``.

    The prompts are resampled with replacement ``n_bootstrap`` times, as in :func:`win_rate`. For the
    difference of two models on the same prompts, pass the per-prompt differences (a paired bootstrap).

    ``groups[i]`` names the prompt of ``values[i]`` when a prompt has several rows (an evaluation set that
    repeats its prompts, or several samples per prompt). The bootstrap then resamples whole prompts (a
    cluster bootstrap: rows of one prompt are not independent draws, and resampling them one by one would
    give too narrow an interval); the mean is still over rows. Without ``groups`` every row is its own prompt.
    """
    if not values:
        raise ValueError("mean_interval needs at least one value")
    values = [float(v) for v in values]
    if groups is None:
        clusters = [(v, 1) for v in values]
    else:
        if len(groups) != len(values):
            raise ValueError(f"{len(groups)} groups for {len(values)} values")
        rows_of: dict[Hashable, list[float]] = {}
        for group, value in zip(groups, values, strict=True):
            rows_of.setdefault(group, []).append(value)
        clusters = [(sum(rows), len(rows)) for rows in rows_of.values()]
    n = len(clusters)
    rng = random.Random(seed)
    means = []
    for _ in range(n_bootstrap):
        total = count = 0.0
        for _ in range(n):
            cluster_sum, cluster_size = clusters[rng.randrange(n)]
            total += cluster_sum
            count += cluster_size
        means.append(total / count)
    means.sort()
    tail = (1 - confidence) / 2
    return {"mean": sum(values) / len(values), "low": means[int(tail * (n_bootstrap - 1))],
            "high": means[round((1 - tail) * (n_bootstrap - 1))]}
