"""The InstructGPT ranking loss and pair expansion against values computed by hand."""

import math

import pytest
import torch

from rlhfkit.algorithms.ranking import (
    PairIndex,
    calibration_table,
    expand_pairs,
    head_orthogonality,
    length_disentangle_loss,
    length_preference_sign,
    pair_weights,
    pairwise_accuracy,
    pearson,
    ranking_loss,
)
from rlhfkit.data.records import PairSetRecord, RankingRecord


def softplus_neg(d: float) -> float:
    """-log sigmoid(d), written out."""
    return math.log(1.0 + math.exp(-d))


def pairs_of(ranking, k):
    return RankingRecord("p", tuple(f"c{i}" for i in range(k)), ranking).pairs()


def test_k2_one_pair():
    rewards = torch.tensor([1.0, 0.0])
    index = expand_pairs([pairs_of(((0,), (1,)), 2)], [2])
    assert index.winner.tolist() == [0] and index.loser.tolist() == [1] and index.prompt.tolist() == [0]
    assert ranking_loss(rewards, index).item() == pytest.approx(softplus_neg(1.0))  # 0.31326
    assert ranking_loss(rewards, index).item() == pytest.approx(0.3132617, abs=1e-6)


def test_k4_all_six_pairs():
    # ranking best first: 2 > 0 > 3 > 1
    rewards = torch.tensor([0.5, -1.0, 2.0, 0.0])
    pairs = pairs_of(((2,), (0,), (3,), (1,)), 4)
    assert pairs == [(2, 0), (2, 3), (2, 1), (0, 3), (0, 1), (3, 1)]
    index = expand_pairs([pairs], [4])
    differences = [2.0 - 0.5, 2.0 - 0.0, 2.0 + 1.0, 0.5 - 0.0, 0.5 + 1.0, 0.0 + 1.0]
    expected = sum(softplus_neg(d) for d in differences) / 6
    assert ranking_loss(rewards, index).item() == pytest.approx(expected, rel=1e-6)


def test_ties_make_no_pair():
    # [[0, 2], [1], [3]]: 0 and 2 tied at the top
    rewards = torch.tensor([1.0, 0.0, 3.0, -2.0])
    pairs = pairs_of(((0, 2), (1,), (3,)), 4)
    assert pairs == [(0, 1), (0, 3), (2, 1), (2, 3), (1, 3)]  # 5 pairs, not 6: (0, 2) is a tie
    expected = (softplus_neg(1.0) + softplus_neg(3.0) + softplus_neg(3.0) + softplus_neg(5.0)
                + softplus_neg(2.0)) / 5
    assert ranking_loss(rewards, expand_pairs([pairs], [4])).item() == pytest.approx(expected, rel=1e-6)
    # a tied pair in the wrong order costs nothing: swapping the tied rewards leaves the loss unchanged
    swapped = torch.tensor([3.0, 0.0, 1.0, -2.0])
    assert ranking_loss(swapped, expand_pairs([pairs], [4])).item() == pytest.approx(expected, rel=1e-6)


def test_pair_set_with_a_cycle_and_a_tie():
    # qa-feedback-style judgements no ranking can hold: 0 over 1, 1 over 2, 2 over 0 (a cycle), 0 tied with 3
    record = PairSetRecord("p", ("a", "b", "c", "d"), ((0, 1, 1), (1, 2, 1), (0, 2, 2), (0, 3, 0)))
    assert record.pairs() == [(0, 1), (1, 2), (2, 0)] and record.ties() == [(0, 3)]
    index = expand_pairs([record.pairs()], [4])
    rewards = torch.tensor([1.0, 0.5, -1.0, 4.0])
    expected = (softplus_neg(0.5) + softplus_neg(1.5) + softplus_neg(-2.0)) / 3
    assert expected == pytest.approx((0.474077 + 0.201413 + 2.126928) / 3, abs=1e-6)
    assert ranking_loss(rewards, index).item() == pytest.approx(expected, rel=1e-6)
    # the tie is not trained on: completion 3's reward does not enter the loss
    assert ranking_loss(torch.tensor([1.0, 0.5, -1.0, -7.0]), index).item() == pytest.approx(expected, rel=1e-6)
    # a cycle cannot be satisfied: at equal rewards every completion wins once and loses once, so no gradient
    equal = torch.zeros(4, requires_grad=True)
    ranking_loss(equal, index).backward()
    torch.testing.assert_close(equal.grad, torch.zeros(4))


def test_margin():
    rewards = torch.tensor([1.0, 0.0, 0.5])
    index = expand_pairs([[(0, 1), (0, 2), (2, 1)]], [3])
    expected = (softplus_neg(1.0 - 0.5) + softplus_neg(0.5 - 0.5) + softplus_neg(0.5 - 0.5)) / 3
    assert ranking_loss(rewards, index, margin=0.5).item() == pytest.approx(expected, rel=1e-6)
    per_pair_margin = torch.tensor([1.0, 0.0, 2.0])
    expected = (softplus_neg(0.0) + softplus_neg(0.5) + softplus_neg(-1.5)) / 3
    assert ranking_loss(rewards, index, margin=per_pair_margin).item() == pytest.approx(expected, rel=1e-6)


def test_batch_offsets_and_per_prompt_weighting():
    # prompt 0: K = 2 (1 pair); prompt 1: K = 3, ranking 1 > 0 > 2 (3 pairs); rows 0-1, then 2-4
    rewards = torch.tensor([0.3, -0.2, 0.0, 1.0, -1.0])
    index = expand_pairs([[(0, 1)], [(1, 0), (1, 2), (0, 2)]], [2, 3])
    assert index.winner.tolist() == [0, 3, 3, 2]
    assert index.loser.tolist() == [1, 2, 4, 4]
    assert index.prompt.tolist() == [0, 1, 1, 1]
    first = softplus_neg(0.5)
    second = [softplus_neg(1.0), softplus_neg(2.0), softplus_neg(1.0)]
    per_prompt = (first + sum(second) / 3) / 2  # InstructGPT: each prompt one batch element
    per_pair = (first + sum(second)) / 4
    assert ranking_loss(rewards, index).item() == pytest.approx(per_prompt, rel=1e-6)
    assert ranking_loss(rewards, index, pair_weighting="per_pair").item() == pytest.approx(per_pair, rel=1e-6)
    torch.testing.assert_close(pair_weights(index.prompt), torch.tensor([1 / 2, 1 / 6, 1 / 6, 1 / 6]))


def test_reward_centering_term():
    rewards = torch.tensor([1.0, -3.0])
    index = expand_pairs([[(0, 1)]], [2])
    expected = softplus_neg(4.0) + 0.1 * (1.0 + 9.0) / 2
    assert ranking_loss(rewards, index, center_coef=0.1).item() == pytest.approx(expected, rel=1e-6)


def test_gradient_pushes_winner_up_and_loser_down():
    rewards = torch.zeros(3, requires_grad=True)
    ranking_loss(rewards, expand_pairs([[(2, 0), (2, 1), (0, 1)]], [3])).backward()
    # d/dr of softplus(-(r_w - r_l)) at 0 is -1/2 for the winner, +1/2 for the loser; 3 pairs averaged
    torch.testing.assert_close(rewards.grad, torch.tensor([0.0, 1 / 3, -1 / 3]))


def test_bad_pairs_are_rejected():
    with pytest.raises(ValueError, match="no pair"):
        expand_pairs([[]], [2])
    with pytest.raises(ValueError, match="bad pair"):
        expand_pairs([[(0, 2)]], [2])
    with pytest.raises(ValueError, match="pair_weighting"):
        ranking_loss(torch.zeros(2), PairIndex(torch.tensor([0]), torch.tensor([1]), torch.tensor([0])),
                     pair_weighting="per_token")


def test_accuracy_and_calibration():
    margins = torch.tensor([2.0, 0.1, -0.1, 0.0, 3.0, -3.0])
    assert pairwise_accuracy(margins).item() == pytest.approx((1 + 1 + 0 + 0.5 + 1 + 0) / 6)
    table = calibration_table(margins, n_bins=5)
    assert table["pairs"] == 6 and len(table["bins"]) == 5
    assert sum(b["count"] for b in table["bins"]) == 6
    first = table["bins"][0]  # confidence sigmoid(|m|) in [0.5, 0.6): margins 0.1, -0.1, 0.0
    assert first["count"] == 3 and first["accuracy"] == pytest.approx(0.5)
    assert first["confidence"] == pytest.approx((2 * torch.sigmoid(torch.tensor(0.1)).item() + 0.5) / 3)
    last = table["bins"][-1]  # [0.9, 1.0]: margins +3 and -3 (confidence sigmoid(3) = 0.95)
    assert last["count"] == 2 and last["accuracy"] == pytest.approx(0.5)  # +3 right, -3 wrong
    assert table["bins"][3]["count"] == 1 and table["bins"][3]["accuracy"] == 1.0  # sigmoid(2) = 0.881
    assert table["ece"] == pytest.approx(sum(b["count"] * abs(b["accuracy"] - b["confidence"])
                                             for b in table["bins"] if b["count"]) / 6)


# ---- ODIN: the length-disentangled reward's extra losses -----------------------------------------------------
def test_pearson_by_hand():
    # x - mean = (-1, 0, 1); y - mean = (-4/3, -1/3, 5/3); cov sum = 3; norms sqrt(2) and sqrt(42)/3
    assert pearson(torch.tensor([1.0, 2.0, 3.0]), torch.tensor([1.0, 2.0, 4.0])).item() == \
        pytest.approx(9 / math.sqrt(84), abs=1e-6)
    assert pearson(torch.tensor([3.0, 2.0, 1.0]), torch.tensor([1.0, 2.0, 3.0])).item() == pytest.approx(-1.0)
    assert pearson(torch.tensor([5.0, 5.0, 5.0]), torch.tensor([1.0, 2.0, 3.0])).item() == 0.0  # constant: 0


def test_length_disentangle_loss_by_hand():
    lengths = torch.tensor([1.0, 2.0, 3.0])
    # quality perfectly anti-correlated (|rho| = 1 is penalised like +1), length head perfectly correlated (-1)
    assert length_disentangle_loss(torch.tensor([3.0, 2.0, 1.0]), lengths, lengths).item() == pytest.approx(0.0)
    # the optimum: quality uncorrelated, the length head correlated with length in the labels' direction
    flat = torch.tensor([1.0, -2.0, 1.0])
    assert length_disentangle_loss(flat, 2 * lengths, lengths).item() == pytest.approx(-1.0)
    assert length_disentangle_loss(flat, -lengths, lengths, sign=-1.0).item() == pytest.approx(-1.0)
    # the length head against the labels' direction costs as much as a quality head that follows length
    assert length_disentangle_loss(flat, -lengths, lengths).item() == pytest.approx(1.0)
    assert length_disentangle_loss(lengths, lengths, lengths, sign=-1.0).item() == pytest.approx(2.0)


def test_length_preference_sign():
    assert length_preference_sign([3, -1, 0]) == 1.0  # winners longer on average
    assert length_preference_sign([-3, 1]) == -1.0
    assert length_preference_sign([0, 0]) == 1.0  # no preference: ODIN's direction


def test_length_disentangle_loss_gradient_moves_quality_away_from_length():
    lengths = torch.tensor([1.0, 2.0, 3.0, 4.0])
    quality = torch.tensor([0.0, 1.0, 1.0, 3.0], requires_grad=True)
    length_disentangle_loss(quality, torch.zeros(4), lengths).backward()
    step = quality.detach() - 0.1 * quality.grad
    assert abs(pearson(step, lengths)) < abs(pearson(quality.detach(), lengths))


def test_head_orthogonality_by_hand():
    assert head_orthogonality(torch.tensor([[1.0, 2.0], [3.0, -4.0]])).item() == 5.0  # |3 - 8|
    assert head_orthogonality(torch.tensor([[1.0, 0.0], [0.0, 7.0]])).item() == 0.0
    with pytest.raises(ValueError, match=r"\[2, H\]"):
        head_orthogonality(torch.ones(1, 4))
