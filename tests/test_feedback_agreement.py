"""Agreement metrics against values computed by hand (and tau-b against its textbook formula)."""

from __future__ import annotations

import math

import pytest

from rlhfkit.feedback.agreement import (
    gold_agreement,
    item_agreement,
    kendall_tau,
    labeler_agreement,
    mean,
    overall_agreement,
    pairwise_agreement,
    verdict_agreement,
    verdict_ranking,
)


@pytest.mark.parametrize(("a", "b", "expected"), [
    ([[0], [1], [2]], [[0], [1], [2]], 1.0),
    ([[0], [1], [2]], [[2], [1], [0]], 0.0),
    ([[0], [1], [2]], [[1], [0], [2]], 2 / 3),  # (0,1) flipped; (0,2) and (1,2) agree
    ([[0], [1], [2]], [[0], [1, 2]], 2 / 3),  # a tie against an order disagrees
    ([[0, 1], [2]], [[1, 0], [2]], 1.0),  # both tie (0,1): agreement
    ([[0, 1, 2], [3]], [[3], [0, 1, 2]], 0.5),  # the three ties agree, the three (x, 3) pairs flip
    ([[0], [1], [2], [3]], [[3], [0], [9]], 0.0),  # only 0 and 3 are common, and they flip
])
def test_pairwise_agreement(a, b, expected):
    assert pairwise_agreement(a, b) == pytest.approx(expected)


def test_pairwise_agreement_uses_only_common_completions():
    # common completions: 0, 1, 3. a: 0 > 1 > 3; b: 3 > 0 > 1. Pairs: (0,1) agree, (0,3) flip, (1,3) flip.
    assert pairwise_agreement([[0], [1], [2], [3]], [[3], [0], [1], [9]]) == pytest.approx(1 / 3)
    assert pairwise_agreement([[0], [1]], [[0], [5]]) is None


@pytest.mark.parametrize(("a", "b", "expected"), [
    ([[0], [1], [2]], [[0], [1], [2]], 1.0),
    ([[0], [1], [2]], [[2], [1], [0]], -1.0),
    ([[0], [1], [2]], [[1], [0], [2]], 1 / 3),  # C=2, D=1, no ties: (2-1)/3
    ([[0], [1], [2]], [[0], [1, 2]], 2 / math.sqrt(6)),  # C=2, D=0, ties_b=1: 2/sqrt(3*2)
    ([[0, 1], [2], [3]], [[0], [1, 2], [3]], 4 / 5),  # C=4, D=0, one tie in each: 4/sqrt(5*5)
])
def test_kendall_tau_b(a, b, expected):
    assert kendall_tau(a, b) == pytest.approx(expected)


def test_kendall_tau_b_matches_its_formula_on_a_larger_example():
    a = [[2], [0, 4], [1], [3, 5]]
    b = [[0], [2], [5], [1, 4], [3]]
    pa = {i: g for g, group in enumerate(a) for i in group}
    pb = {i: g for g, group in enumerate(b) for i in group}
    pairs = [(i, j) for i in range(6) for j in range(i + 1, 6)]
    s = sum(((pa[i] > pa[j]) - (pa[i] < pa[j])) * ((pb[i] > pb[j]) - (pb[i] < pb[j])) for i, j in pairs)
    n1 = sum(pa[i] == pa[j] for i, j in pairs)
    n2 = sum(pb[i] == pb[j] for i, j in pairs)
    assert kendall_tau(a, b) == pytest.approx(s / math.sqrt((15 - n1) * (15 - n2)))


def test_kendall_tau_is_undefined_when_a_ranking_ties_everything():
    assert kendall_tau([[0, 1]], [[0], [1]]) is None
    assert kendall_tau([[0], [1]], [[7], [8]]) is None


def test_verdicts_are_two_completion_rankings():
    assert verdict_ranking("a") == [[0], [1]] and verdict_ranking("b") == [[1], [0]]
    assert verdict_ranking("tie") == [[0, 1]]
    for a in ("a", "b", "tie"):
        for b in ("a", "b", "tie"):
            expected = pairwise_agreement(verdict_ranking(a), verdict_ranking(b))
            assert verdict_agreement(a, b) == expected == float(a == b)
    with pytest.raises(ValueError, match="unknown verdict"):
        verdict_agreement("a", "left")


def test_gold_agreement_is_pairwise_agreement_with_gold():
    assert gold_agreement([[1], [0], [2]], [[0], [1], [2]]) == pytest.approx(2 / 3)
    assert gold_agreement([[0, 1], [2]], [[0, 1], [2]]) == 1.0


def test_mean_ignores_undefined_values():
    assert mean([1.0, None, 0.0]) == 0.5
    assert mean([None]) is None and mean([]) is None


def test_item_agreement_averages_over_pairs_of_labelers():
    result = item_agreement({"ann": [[0], [1], [2]], "bob": [[0], [1], [2]], "cy": [[2], [1], [0]]})
    assert result["pairwise_agreement"] == pytest.approx((1 + 0 + 0) / 3)
    assert result["kendall_tau"] == pytest.approx((1 - 1 - 1) / 3)
    assert item_agreement({"ann": [[0], [1]]}) == {"pairwise_agreement": None, "kendall_tau": None}


ITEMS = [
    ({"ann": [[0], [1], [2]], "bob": [[1], [0], [2]]}, [[0], [1], [2]]),  # pairwise 2/3, tau 1/3
    ({"ann": [[0], [1]], "bob": [[0, 1]], "cy": [[0, 1]]}, None),  # A/B: a, tie, tie
    ({"cy": [[1], [0]]}, [[0], [1]]),  # nobody to agree with; gold only
]


def test_labeler_agreement_per_labeler():
    result = labeler_agreement(ITEMS)
    assert result["ann"] == {"items": 2, "pairwise_agreement": pytest.approx((2 / 3 + 0 + 0) / 3),
                             "kendall_tau": pytest.approx(1 / 3), "gold_agreement": 1.0}
    assert result["bob"]["pairwise_agreement"] == pytest.approx((2 / 3 + 0 + 1) / 3)
    assert result["bob"]["gold_agreement"] == pytest.approx(2 / 3)
    assert result["cy"] == {"items": 2, "pairwise_agreement": 0.5, "kendall_tau": None, "gold_agreement": 0.0}


def test_overall_agreement():
    result = overall_agreement(ITEMS)
    assert result["pairwise_agreement"] == pytest.approx((2 / 3 + 0 + 0 + 1) / 4)
    assert result["kendall_tau"] == pytest.approx(1 / 3)
    assert result["gold_agreement"] == pytest.approx((1 + 2 / 3 + 0) / 3)
    assert overall_agreement([]) == {"pairwise_agreement": None, "kendall_tau": None, "gold_agreement": None}
