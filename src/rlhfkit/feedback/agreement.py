"""Agreement between labelers: pairwise agreement and Kendall tau-b between rankings, A/B verdicts, gold.

A ranking is a list of tie groups, best first, e.g. ``[[1], [0, 2], [3]]``: completion 1 is best, 0 and 2
tie, 3 is worst. An A/B verdict is the ranking of two completions :func:`verdict_ranking` gives, so the same
functions measure both.

Definitions (over the completions both rankings order; a completion only one of them ranks is left out):

* **pairwise agreement**: the fraction of completion pairs ``{i, j}`` on which the two rankings say the
  same thing: both prefer ``i``, both prefer ``j``, or both tie them. A pair one ranking ties and the
  other orders is a disagreement. Undefined (None) with fewer than two common completions.
* **Kendall tau-b**: ``(concordant - discordant) / sqrt((pairs - ties_a) * (pairs - ties_b))``, where
  ``ties_a`` counts the pairs tied in the first ranking (joint ties included) and ``ties_b`` in the
  second. It runs from -1 (reversed) to 1 (same order). Undefined (None) when either ranking ties every
  pair, as an A/B tie does.
* **gold agreement**: the pairwise agreement of a labeler's ranking with the gold ranking of the item.

Aggregates are plain means of the defined values (None when there are none).
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from itertools import combinations

Ranking = Sequence[Sequence[int]]

VERDICT_RANKINGS = {"a": [[0], [1]], "b": [[1], [0]], "tie": [[0, 1]]}


def _positions(ranking: Ranking) -> dict[int, int]:
    """The group position (0 = best) of every completion of ``ranking``."""
    return {index: position for position, group in enumerate(ranking) for index in group}


def _common_pairs(a: Ranking, b: Ranking) -> list[tuple[int, int]]:
    """The sign of each common pair's order in ``a`` and in ``b``: -1 (first better), 0 (tie) or 1."""
    pa, pb = _positions(a), _positions(b)
    common = sorted(pa.keys() & pb.keys())
    return [
        ((pa[i] > pa[j]) - (pa[i] < pa[j]), (pb[i] > pb[j]) - (pb[i] < pb[j]))
        for i, j in combinations(common, 2)
    ]


def pairwise_agreement(a: Ranking, b: Ranking) -> float | None:
    """The fraction of common completion pairs both rankings order the same way (ties agree only with ties).

    None when the rankings share fewer than two completions.
    """
    signs = _common_pairs(a, b)
    if not signs:
        return None
    return sum(sa == sb for sa, sb in signs) / len(signs)


def kendall_tau(a: Ranking, b: Ranking) -> float | None:
    """Kendall's tau-b between two rankings with ties, over their common completions.

    None when it is undefined: fewer than two common completions, or one ranking ties every pair.
    """
    signs = _common_pairs(a, b)
    concordant = sum(sa * sb > 0 for sa, sb in signs)
    discordant = sum(sa * sb < 0 for sa, sb in signs)
    ties_a = sum(sa == 0 for sa, _ in signs)
    ties_b = sum(sb == 0 for _, sb in signs)
    denominator = math.sqrt((len(signs) - ties_a) * (len(signs) - ties_b))
    if denominator == 0:
        return None
    return (concordant - discordant) / denominator


def verdict_ranking(verdict: str) -> list[list[int]]:
    """An A/B verdict (``"a"``, ``"b"`` or ``"tie"``) as a ranking of the two completions."""
    if verdict not in VERDICT_RANKINGS:
        raise ValueError(f"unknown verdict {verdict!r}; expected one of {tuple(VERDICT_RANKINGS)}")
    return VERDICT_RANKINGS[verdict]


def verdict_agreement(a: str, b: str) -> float:
    """1.0 when two A/B verdicts are the same, else 0.0 (their rankings' pairwise agreement)."""
    verdict_ranking(a), verdict_ranking(b)  # validates both
    return float(a == b)


def gold_agreement(ranking: Ranking, gold: Ranking) -> float | None:
    """The pairwise agreement of a labeler's ``ranking`` with the item's ``gold`` ranking."""
    return pairwise_agreement(ranking, gold)


def mean(values: Iterable[float | None]) -> float | None:
    """The mean of the values that are not None; None when there are none."""
    defined = [value for value in values if value is not None]
    return sum(defined) / len(defined) if defined else None


def item_agreement(rankings: Mapping[str, Ranking]) -> dict:
    """Agreement among the labelers of one item: ``rankings`` maps each labeler to their ranking.

    Returns ``{"pairwise_agreement", "kendall_tau"}``, each the mean over every pair of labelers (None with
    fewer than two labelers, or where every pair is undefined).
    """
    pairs = list(combinations(rankings.values(), 2))
    return {
        "pairwise_agreement": mean(pairwise_agreement(a, b) for a, b in pairs),
        "kendall_tau": mean(kendall_tau(a, b) for a, b in pairs),
    }


def labeler_agreement(items: Iterable[tuple[Mapping[str, Ranking], Ranking | None]]) -> dict[str, dict]:
    """Agreement of each labeler with the others and with gold, over many items.

    ``items`` holds one ``(rankings by labeler, gold ranking or None)`` per item. Returns, per labeler,
    ``{"items": the items they ranked, "pairwise_agreement" and "kendall_tau": means over every (item,
    other labeler of that item), "gold_agreement": mean over their items that have gold}``.
    """
    pairwise: dict[str, list[float | None]] = {}
    tau: dict[str, list[float | None]] = {}
    gold_scores: dict[str, list[float | None]] = {}
    counts: dict[str, int] = {}
    for rankings, gold in items:
        for labeler, ranking in rankings.items():
            counts[labeler] = counts.get(labeler, 0) + 1
            others = [other for name, other in rankings.items() if name != labeler]
            pairwise.setdefault(labeler, []).extend(pairwise_agreement(ranking, other) for other in others)
            tau.setdefault(labeler, []).extend(kendall_tau(ranking, other) for other in others)
            if gold is not None:
                gold_scores.setdefault(labeler, []).append(gold_agreement(ranking, gold))
    return {
        labeler: {
            "items": counts[labeler],
            "pairwise_agreement": mean(pairwise[labeler]),
            "kendall_tau": mean(tau[labeler]),
            "gold_agreement": mean(gold_scores.get(labeler, [])),
        }
        for labeler in counts
    }


def overall_agreement(items: Iterable[tuple[Mapping[str, Ranking], Ranking | None]]) -> dict:
    """Agreement over all items (same input as :func:`labeler_agreement`).

    ``pairwise_agreement`` and ``kendall_tau`` are means over every (item, pair of its labelers);
    ``gold_agreement`` is the mean over every ranking of an item that has gold.
    """
    pairwise: list[float | None] = []
    tau: list[float | None] = []
    gold_scores: list[float | None] = []
    for rankings, gold in items:
        for a, b in combinations(rankings.values(), 2):
            pairwise.append(pairwise_agreement(a, b))
            tau.append(kendall_tau(a, b))
        if gold is not None:
            gold_scores.extend(gold_agreement(ranking, gold) for ranking in rankings.values())
    return {"pairwise_agreement": mean(pairwise), "kendall_tau": mean(tau), "gold_agreement": mean(gold_scores)}
