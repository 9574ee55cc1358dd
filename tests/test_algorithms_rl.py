"""PPO/RLOO/GRPO/REINFORCE++ maths against hand-computed values."""

import math
from typing import get_args

import pytest
import torch

from rlhfkit.algorithms.advantages import (
    dr_grpo_advantages,
    gae,
    grpo_advantages,
    masked_mean,
    masked_whiten,
    reinforce_plus_plus_advantages,
    rloo_advantages,
)
from rlhfkit.algorithms.estimators import ESTIMATORS, estimate_advantages
from rlhfkit.algorithms.kl import AdaptiveKLController, kl_estimate, kl_penalized_rewards, kl_penalized_score
from rlhfkit.algorithms.ppo import (
    Aggregation,
    aggregate,
    aggregation_count,
    entropy_from_logits,
    policy_loss,
    sequence_log_ratio,
    value_loss,
)
from rlhfkit.config import PPOSection


def t(*rows):
    return torch.tensor(rows, dtype=torch.float32)


def test_gae_hand_computed_lambda():
    adv, ret = gae(t([0, 0, 1]), t([0.5, 0.6, 0.7]), t([1, 1, 1]), gamma=1.0, lam=0.5)
    torch.testing.assert_close(adv, t([0.225, 0.25, 0.3]))
    torch.testing.assert_close(ret, t([0.725, 0.85, 1.0]))


def test_gae_with_lambda_one_is_discounted_return_minus_value():
    adv, _ = gae(t([0, 0, 1]), t([0.5, 0.6, 0.7]), t([1, 1, 1]), gamma=0.9, lam=1.0)
    torch.testing.assert_close(adv, t([0.81 - 0.5, 0.9 - 0.6, 1.0 - 0.7]))


def test_gae_ignores_padding_after_the_response():
    adv, ret = gae(t([0, 1, 5]), t([0.5, 0.6, 9.0]), t([1, 1, 0]), gamma=1.0, lam=0.5)
    torch.testing.assert_close(adv, t([0.3, 0.4, 0.0]))
    torch.testing.assert_close(ret, t([0.8, 1.0, 0.0]))


def test_kl_estimators_are_exact_in_expectation_on_known_distributions():
    p, q = torch.tensor([0.5, 0.5]), torch.tensor([0.9, 0.1])
    true_kl = 0.5 * math.log(0.5 / 0.9) + 0.5 * math.log(0.5 / 0.1)  # 0.510826
    for estimator in ("k1", "k3"):
        per_token = kl_estimate(p.log(), q.log(), estimator)
        assert (p * per_token).sum().item() == pytest.approx(true_kl, abs=1e-6)
    assert (kl_estimate(p.log(), q.log(), "k3") >= 0).all()
    k2 = (p * kl_estimate(p.log(), q.log(), "k2")).sum().item()
    assert k2 == pytest.approx(0.5 * (0.5 * math.log(0.5 / 0.9) ** 2 + 0.5 * math.log(5) ** 2), abs=1e-6)


def test_kl_penalty_is_zero_when_policy_equals_reference():
    logprobs = torch.log(torch.rand(3, 5))
    for estimator in ("k1", "k2", "k3"):
        assert kl_estimate(logprobs, logprobs.clone(), estimator).abs().max().item() == 0.0
    rewards = kl_penalized_rewards(torch.tensor([1.0, 2.0, 3.0]), kl_estimate(logprobs, logprobs, "k1"),
                                   torch.ones(3, 5), kl_coef=0.5)
    assert rewards[:, :-1].abs().max().item() == 0.0
    torch.testing.assert_close(rewards[:, -1], torch.tensor([1.0, 2.0, 3.0]))


def test_kl_penalized_rewards_put_the_score_on_the_last_response_token():
    rewards = kl_penalized_rewards(torch.tensor([2.0]), t([0.1, 0.2, 0.3, 0.4]), t([1, 1, 1, 0]), kl_coef=0.5)
    torch.testing.assert_close(rewards, t([-0.05, -0.1, -0.15 + 2.0, 0.0]))


def test_adaptive_kl_controller_follows_ziegler():
    controller = AdaptiveKLController(0.1, target=6.0, horizon=10_000)
    assert controller.update(12.0, n_steps=256) == pytest.approx(0.1 * (1 + 0.2 * 256 / 10_000))
    controller = AdaptiveKLController(0.1, target=6.0, horizon=10_000)
    assert controller.update(5.4, n_steps=256) == pytest.approx(0.1 * (1 - 0.1 * 256 / 10_000))
    restored = AdaptiveKLController(1.0, target=1.0, horizon=1)
    restored.load_state_dict(controller.state_dict())
    assert restored.state_dict() == controller.state_dict()


def test_rloo_and_grpo_advantages_hand_computed():
    scores = torch.tensor([1.0, 2.0, 3.0, 10.0, 10.0, 10.0])
    torch.testing.assert_close(rloo_advantages(scores, 3), torch.tensor([-1.5, 0.0, 1.5, 0.0, 0.0, 0.0]))
    expected = torch.tensor([-1.0, 0.0, 1.0, 0.0, 0.0, 0.0]) / torch.tensor([1 + 1e-4] * 3 + [1e-4] * 3)
    torch.testing.assert_close(grpo_advantages(scores, 3), expected)
    with pytest.raises(ValueError, match="multiple of k"):
        rloo_advantages(scores, 4)


def test_policy_loss_clips_only_in_the_pessimistic_direction():
    logprobs = torch.log(t([1.5, 0.5, 1.0]))
    loss, stats = policy_loss(logprobs, torch.zeros(1, 3), t([1.0, 1.0, -1.0]), torch.ones(1, 3), 0.2)
    assert loss.item() == pytest.approx((-1.2 - 0.5 + 1.0) / 3, abs=1e-6)
    assert stats["clipfrac"].item() == pytest.approx(1 / 3)
    # a negative advantage with a large ratio keeps the unclipped (worse) term
    loss, stats = policy_loss(torch.log(t([1.5])), torch.zeros(1, 1), t([-1.0]), torch.ones(1, 1), 0.2)
    assert loss.item() == pytest.approx(1.5, abs=1e-6) and stats["clipfrac"].item() == 0.0


def test_policy_loss_gradient_vanishes_on_clipped_tokens():
    logprobs = torch.log(t([1.5, 1.0])).requires_grad_()
    loss, _ = policy_loss(logprobs, torch.zeros(1, 2), t([1.0, 1.0]), torch.ones(1, 2), 0.2)
    loss.backward()
    assert logprobs.grad[0, 0].item() == 0.0 and logprobs.grad[0, 1].item() != 0.0


def test_value_loss_hand_computed():
    loss, stats = value_loss(t([1.0, 0.0]), t([0.5, 0.5]), t([1.0, 1.0]), torch.ones(1, 2), 0.2)
    assert loss.item() == pytest.approx(0.5 * (0.09 + 1.0) / 2, abs=1e-6)
    assert stats["clipfrac"].item() == pytest.approx(0.5)


def test_entropy_and_masked_statistics():
    assert entropy_from_logits(torch.zeros(1, 1, 4)).item() == pytest.approx(math.log(4), abs=1e-6)
    assert masked_mean(t([1.0, 3.0, 100.0]), t([1, 1, 0])).item() == pytest.approx(2.0)
    whitened = masked_whiten(t([1.0, 2.0, 3.0, 50.0]), t([1, 1, 1, 0]))
    torch.testing.assert_close(whitened, t([-1.0, 0.0, 1.0, 0.0]), atol=1e-4, rtol=0)


def test_reinforce_plus_plus_hand_computed():
    """Hu et al. 2025: A_t = r(x, y) - beta * sum_{i >= t} KL_i, then normalised over every token of the batch."""
    scores, mask = t(1.0, -0.5), t([1, 1, 0], [1, 1, 1])
    kl = t([0.1, 0.2, 0.0], [0.3, -0.1, 0.4])
    advantages, returns = estimate_advantages("reinforce++", scores, kl, mask, kl_coef=0.5)
    # before normalisation: row 0 (1 - 0.5 * 0.3, 1 - 0.5 * 0.2),
    # row 1 (-0.5 - 0.5 * 0.6, -0.5 - 0.5 * 0.3, -0.5 - 0.5 * 0.4)
    raw = [0.85, 0.9, -0.8, -0.65, -0.7]
    mean = sum(raw) / 5
    std = math.sqrt(sum((a - mean) ** 2 for a in raw) / 4)  # the unbiased std, as every whitening here
    expected = [(a - mean) / std for a in raw]
    torch.testing.assert_close(advantages, t(expected[:2] + [0.0], expected[2:]))
    assert returns is None
    # the reward-to-go with a discount, before normalisation
    discounted = reinforce_plus_plus_advantages(t([0, 0, 1]), t([1, 1, 1]), gamma=0.9)
    torch.testing.assert_close(discounted, t([0.81, 0.9, 1.0]))


def test_estimators_shape_the_kl_and_whiten_as_their_options_say():
    scores, mask = t(1.0, 0.0, 2.0, 0.5), t([1, 1], [1, 0], [1, 1], [1, 1])
    kl = t([0.2, 0.1], [0.4, 0.0], [0.0, 0.3], [0.1, 0.1])
    # group estimators: the score minus the summed KL penalty, one advantage per sequence, not whitened by default
    rloo, returns = estimate_advantages("rloo", scores, kl, mask, kl_coef=0.5, group_size=2)
    sequence = kl_penalized_score(scores, kl, mask, 0.5)
    torch.testing.assert_close(rloo, rloo_advantages(sequence, 2).unsqueeze(-1) * mask)
    assert returns is None
    # whitening is an option of every estimator
    whitened, _ = estimate_advantages("rloo", scores, kl, mask, kl_coef=0.5, group_size=2, whiten_advantages=True)
    torch.testing.assert_close(whitened, masked_whiten(rloo, mask))
    # GAE: the per-token KL in the reward, whitened by default, and the value targets
    values = t([0.1, 0.2], [0.3, 0.0], [0.5, 0.4], [0.0, 0.1])
    advantages, returns = estimate_advantages("gae", scores, kl, mask, kl_coef=0.5, values=values, lam=0.9)
    expected, expected_returns = gae(kl_penalized_rewards(scores, kl, mask, 0.5), values, mask, 1.0, 0.9)
    torch.testing.assert_close(advantages, masked_whiten(expected, mask))
    torch.testing.assert_close(returns, expected_returns)


def test_every_estimator_is_a_value_of_ppo_advantage():
    assert set(ESTIMATORS) == set(get_args(PPOSection.model_fields["advantage"].annotation))
    assert [name for name, estimator in ESTIMATORS.items() if estimator.needs_values] == ["gae"]


def test_dr_grpo_advantages_keep_the_scale_of_the_rewards():
    scores = torch.tensor([1.0, 0.0, 0.0, 3.0, 3.0, 3.0])
    # group means 1/3 and 3: r - mean, no division by the std; a group of equal rewards learns nothing
    torch.testing.assert_close(dr_grpo_advantages(scores, 3), torch.tensor([2 / 3, -1 / 3, -1 / 3, 0.0, 0.0, 0.0]))
    grpo = grpo_advantages(torch.tensor([1.0, 0.0, 0.0, 10.0, 0.0, 0.0]), 3)
    assert grpo[0].item() == pytest.approx(grpo[3].item(), rel=1e-3)  # GRPO: the same, whatever the scale
    dr = dr_grpo_advantages(torch.tensor([1.0, 0.0, 0.0, 10.0, 0.0, 0.0]), 3)
    assert dr[3].item() == pytest.approx(10 * dr[0].item())  # Dr. GRPO: ten times the reward, ten times the step


def test_clip_higher_widens_only_the_upper_clip():
    # ratios 1.25 and 0.7 with positive advantages; eps_low 0.2, eps_high 0.28 (DAPO)
    logprobs, advantages, mask = torch.log(t([1.25, 0.7])), t([1.0, 1.0]), torch.ones(1, 2)
    symmetric, stats = policy_loss(logprobs, torch.zeros(1, 2), advantages, mask, 0.2)
    assert symmetric.item() == pytest.approx(-(1.2 + 0.7) / 2) and stats["clipfrac"].item() == 0.5
    higher, stats = policy_loss(logprobs, torch.zeros(1, 2), advantages, mask, 0.2, clip_range_high=0.28)
    assert higher.item() == pytest.approx(-(1.25 + 0.7) / 2) and stats["clipfrac"].item() == 0.0
    # a negative advantage is still clipped below at 1 - eps_low
    low, _ = policy_loss(torch.log(t([0.7])), torch.zeros(1, 1), t([-1.0]), torch.ones(1, 1), 0.2, 0.28)
    assert low.item() == pytest.approx(0.8)


def test_loss_aggregations_by_hand():
    # two sequences of 3 and 1 tokens, and one without a token (it counts in no mean)
    per_token = t([1.0, 2.0, 3.0], [4.0, 0.0, 0.0], [9.0, 9.0, 9.0])
    mask = t([1, 1, 1], [1, 0, 0], [0, 0, 0])
    assert aggregate(per_token, mask, "token_mean").item() == pytest.approx(10 / 4)  # DAPO: over all tokens
    assert aggregate(per_token, mask, "sequence_mean").item() == pytest.approx((2 + 4) / 2)  # GRPO
    # Dr. GRPO: each sequence's sum over one constant length (4), then the mean over sequences
    assert aggregate(per_token, mask, "constant_length", max_tokens=4).item() == pytest.approx((6 / 4 + 4 / 4) / 2)
    assert aggregation_count(mask, "token_mean").item() == 4
    assert aggregation_count(mask, "sequence_mean").item() == aggregation_count(mask, "constant_length").item() == 2
    with pytest.raises(ValueError, match="needs max_tokens"):
        aggregate(per_token, mask, "constant_length")
    assert set(get_args(Aggregation)) == set(get_args(PPOSection.model_fields["loss_aggregation"].annotation))


def test_gspo_clips_one_length_normalised_ratio_per_sequence():
    log_ratio, advantages = t([0.3, -0.1, 0.1], [0.5, 0.0, 0.0]), t([1.0, 1.0, 1.0], [1.0, 0.0, 0.0])
    mask = t([1, 1, 1], [1, 0, 0])
    # log s = the token mean of the log ratio: 0.1 and 0.5, on every token of the sequence
    torch.testing.assert_close(sequence_log_ratio(log_ratio, torch.zeros(2, 3), mask), t([0.1] * 3, [0.5] * 3))
    loss, stats = policy_loss(log_ratio, torch.zeros(2, 3), advantages, mask, 0.2, aggregation="sequence_mean",
                              ratio_level="sequence")
    # sequence 1: s = e^0.1 = 1.105, inside the clip; sequence 2: s = e^0.5 = 1.65, clipped at 1.2 (A > 0)
    assert loss.item() == pytest.approx(-(math.exp(0.1) + 1.2) / 2, abs=1e-6)
    assert stats["clipfrac"].item() == pytest.approx(1 / 4)  # the one token of sequence 2
    # per token (PPO) the same inputs clip e^0.3 and e^0.5: a different loss
    token_level, _ = policy_loss(log_ratio, torch.zeros(2, 3), advantages, mask, 0.2, aggregation="sequence_mean")
    expected = (-(1.2 + math.exp(-0.1) + math.exp(0.1)) / 3 - 1.2) / 2
    assert token_level.item() == pytest.approx(expected, abs=1e-6)
