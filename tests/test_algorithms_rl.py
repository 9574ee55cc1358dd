"""PPO/RLOO/GRPO maths against hand-computed values."""

import math

import pytest
import torch

from rlhfkit.algorithms.advantages import gae, grpo_advantages, masked_mean, masked_whiten, rloo_advantages
from rlhfkit.algorithms.kl import AdaptiveKLController, kl_estimate, kl_penalized_rewards
from rlhfkit.algorithms.ppo import entropy_from_logits, policy_loss, value_loss


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
