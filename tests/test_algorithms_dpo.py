"""The preference losses against values worked out by hand on fixed log-probs."""

import math

import pytest
import torch

from rlhfkit.algorithms.dpo import (
    dpo_loss,
    hinge_loss,
    implicit_rewards,
    ipo_loss,
    kto_kl_estimate,
    kto_loss,
    log1mexp,
    orpo_log_odds_ratio,
    orpo_loss,
    pairwise_loss,
    reward_margin,
    robust_dpo_loss,
    rpo_nll,
    simpo_loss,
)
from rlhfkit.algorithms.logprobs import gathered_logprobs

# Two pairs with beta = 0.5:
#   pair 0: policy gains 1 nat on chosen and loses 1 on rejected vs the reference -> h = 2,  beta h = 1
#   pair 1: policy equals the reference on chosen and gains 1 on rejected         -> h = -1, beta h = -0.5
PI_C, PI_R = torch.tensor([-10.0, -5.0]), torch.tensor([-12.0, -4.0])
REF_C, REF_R = torch.tensor([-11.0, -5.0]), torch.tensor([-11.0, -5.0])
BETA = 0.5
# softplus values: log(1 + e^-1) = 0.3132617, log(1 + e^1) = 1.3132617,
#                  log(1 + e^0.5) = 0.9740770, log(1 + e^-0.5) = 0.4740770


def close(tensor, values, tol=1e-6):
    assert tensor.tolist() == pytest.approx(values, abs=tol)


def test_reward_margin_and_implicit_rewards():
    close(reward_margin(PI_C, PI_R, REF_C, REF_R), [2.0, -1.0])
    close(implicit_rewards(PI_C, REF_C, BETA), [0.5, 0.0])


def test_dpo_sigmoid_loss():
    # -log sigmoid(1) = log(1 + e^-1); -log sigmoid(-0.5) = log(1 + e^0.5)
    close(dpo_loss(PI_C, PI_R, REF_C, REF_R, beta=BETA), [0.3132617, 0.9740770])


def test_conservative_dpo_label_smoothing():
    # 0.9 * 0.3132617 + 0.1 * 1.3132617 ; 0.9 * 0.9740770 + 0.1 * 0.4740770
    close(dpo_loss(PI_C, PI_R, REF_C, REF_R, beta=BETA, label_smoothing=0.1), [0.4132617, 0.9240770])


def test_robust_dpo():
    # (0.9 * 0.3132617 - 0.1 * 1.3132617) / 0.8 ; (0.9 * 0.9740770 - 0.1 * 0.4740770) / 0.8
    close(robust_dpo_loss(PI_C, PI_R, REF_C, REF_R, beta=BETA, label_smoothing=0.1), [0.1882617, 1.0365770])
    close(robust_dpo_loss(PI_C, PI_R, REF_C, REF_R, beta=BETA), dpo_loss(PI_C, PI_R, REF_C, REF_R, beta=BETA).tolist())
    with pytest.raises(ValueError):
        robust_dpo_loss(PI_C, PI_R, REF_C, REF_R, beta=BETA, label_smoothing=0.5)


def test_robust_dpo_is_unbiased_under_label_noise():
    """E over flips (rate eps) of the robust loss equals the clean DPO loss (Chowdhury et al. 2024, Lemma 3.1)."""
    eps = 0.2
    clean = dpo_loss(PI_C, PI_R, REF_C, REF_R, beta=BETA)
    kept = robust_dpo_loss(PI_C, PI_R, REF_C, REF_R, beta=BETA, label_smoothing=eps)
    flipped = robust_dpo_loss(PI_R, PI_C, REF_R, REF_C, beta=BETA, label_smoothing=eps)
    close((1 - eps) * kept + eps * flipped, clean.tolist())


def test_ipo_targets_one_over_two_beta():
    # target 1 / (2 * 0.5) = 1: (2 - 1)^2 and (-1 - 1)^2
    close(ipo_loss(PI_C, PI_R, REF_C, REF_R, beta=BETA), [1.0, 4.0])
    # at h = 1/(2 beta) the loss and its gradient vanish
    pi_c = torch.tensor([0.1], requires_grad=True)
    loss = ipo_loss(pi_c, torch.zeros(1), torch.zeros(1), torch.zeros(1), beta=5.0)
    loss.backward()
    assert loss.item() == pytest.approx(0.0, abs=1e-12) and pi_c.grad.item() == pytest.approx(0.0, abs=1e-6)


def test_hinge_slic():
    # max(0, 1 - 0.5 * 2) = 0 ; max(0, 1 + 0.5) = 1.5
    close(hinge_loss(PI_C, PI_R, REF_C, REF_R, beta=BETA), [0.0, 1.5])


def test_orpo_odds_ratio_and_sft_term():
    # P(y_c) = 1/2 -> odds 1; P(y_r) = 1/4 -> odds 1/3; log odds ratio = log 3
    # L = -log(1/2) - 0.1 * log sigmoid(log 3) = log 2 - 0.1 * log(3/4)
    pi_c, pi_r = torch.tensor([math.log(0.5)]), torch.tensor([math.log(0.25)])
    close(orpo_log_odds_ratio(pi_c, pi_r), [math.log(3)])
    close(orpo_loss(pi_c, pi_r, beta=0.1), [0.7219153])
    # and through the dispatcher, which ignores any reference
    close(pairwise_loss("orpo", pi_c, pi_r, torch.zeros(1), torch.zeros(1), beta=0.1), [0.7219153])


def test_orpo_is_finite_for_near_certain_responses():
    pi = torch.tensor([-1e-9, -40.0], dtype=torch.float64)
    assert torch.isfinite(orpo_loss(pi, pi.flip(0), beta=0.1)).all()
    close(log1mexp(torch.tensor([-1e-10], dtype=torch.float64)), [math.log(1e-10)], tol=1e-6)
    close(log1mexp(torch.tensor([-50.0], dtype=torch.float64)), [-math.exp(-50)], tol=1e-30)


def test_kto_loss_and_weights():
    # r = [1, -1], z_ref = 0.5, beta = 1
    # desirable:   2 * (1 - sigmoid(1 - 0.5))  = 2 * 0.3775407
    # undesirable: 1 * (1 - sigmoid(0.5 + 1))  = 0.1824255
    losses = kto_loss(torch.tensor([-3.0, -3.0]), torch.tensor([-4.0, -2.0]), torch.tensor([True, False]),
                      torch.tensor(0.5), beta=1.0, desirable_weight=2.0, undesirable_weight=1.0)
    close(losses, [0.7550813, 0.1824255])


def test_kto_at_initialisation_is_half_the_weight():
    pi = torch.tensor([-3.0, -7.0])
    close(kto_loss(pi, pi, torch.tensor([True, False]), 0.0, beta=0.1, undesirable_weight=1.5), [0.5, 0.75])


def test_kto_kl_estimate_is_clamped_and_detached():
    close(kto_kl_estimate(torch.tensor([-3.0, -5.0]), torch.tensor([-4.0, -4.0])).reshape(1), [0.0])
    pi = torch.tensor([-3.0, -3.0], requires_grad=True)
    kl = kto_kl_estimate(pi, torch.tensor([-4.0, -5.0]))
    assert kl.item() == pytest.approx(1.5) and not kl.requires_grad


def test_reference_free_dispatch_uses_a_zero_reference():
    for loss in ("dpo", "robust", "ipo", "hinge"):
        free = pairwise_loss(loss, PI_C, PI_R, None, None, beta=BETA)
        zero = pairwise_loss(loss, PI_C, PI_R, torch.zeros(2), torch.zeros(2), beta=BETA)
        close(free, zero.tolist())
    with pytest.raises(ValueError, match="unknown pairwise loss"):
        pairwise_loss("kto", PI_C, PI_R, REF_C, REF_R, beta=BETA)


@pytest.mark.parametrize("loss", ["dpo", "robust", "ipo", "hinge", "orpo", "simpo"])
def test_gradients_raise_chosen_and_lower_rejected(loss):
    pi_c = torch.tensor([-3.0], requires_grad=True)
    pi_r = torch.tensor([-2.0], requires_grad=True)
    smoothing = 0.1 if loss == "robust" else 0.0
    pairwise_loss(loss, pi_c, pi_r, torch.tensor([-3.0]), torch.tensor([-2.0]), beta=0.1,
                  label_smoothing=smoothing).sum().backward()
    assert pi_c.grad.item() < 0 < pi_r.grad.item()  # descent raises log pi(chosen), lowers log pi(rejected)


def test_dpo_at_initialisation_is_log_two():
    pi = torch.tensor([-30.0, -12.0])
    close(dpo_loss(pi, pi.flip(0), pi, pi.flip(0), beta=0.1), [math.log(2)] * 2)


def test_gathered_logprobs_picks_each_tokens_predictor():
    # row 0: position 0 predicts [1/4, 3/4]; row 1: position 1 predicts [1/2, 1/2]
    logits = torch.zeros(2, 2, 2)
    logits[0, 0, 1] = math.log(3.0)
    out = gathered_logprobs(logits, torch.tensor([0, 0, 1]), torch.tensor([0, 0, 1]), torch.tensor([0, 1, 1]))
    close(out, [math.log(0.25), math.log(0.75), math.log(0.5)])
    close(gathered_logprobs(logits, torch.tensor([0]), torch.tensor([0]), torch.tensor([1]), temperature=2.0),
          [math.log(math.sqrt(3) / (1 + math.sqrt(3)))])


def test_simpo_by_hand_and_without_a_reference():
    # beta 2, gamma 0.5: logits 2 (-1.0 + 1.5) - 0.5 = 0.5; equal log-probs give -log sigmoid(-gamma)
    pi_c, pi_r = torch.tensor([-1.0, -1.2]), torch.tensor([-1.5, -1.2])
    close(simpo_loss(pi_c, pi_r, beta=2.0, gamma=0.5), [math.log1p(math.exp(-0.5)), math.log1p(math.exp(0.5))])
    dispatched = pairwise_loss("simpo", pi_c, pi_r, torch.tensor([5.0, 5.0]), None, beta=2.0, simpo_gamma=0.5)
    close(dispatched, simpo_loss(pi_c, pi_r, beta=2.0, gamma=0.5).tolist())  # the reference plays no part


def test_simpo_equals_trls_cpo_simpo_loss():
    from types import SimpleNamespace

    cpo = pytest.importorskip("trl.experimental.cpo.cpo_trainer", reason="TRL (the bench extra) is not installed")
    pi_c, pi_r = torch.tensor([-0.4, -2.0, -1.1]), torch.tensor([-0.9, -1.0, -1.1])
    trainer = SimpleNamespace(alpha=0.0, loss_type="simpo", beta=2.5, simpo_gamma=1.4, label_smoothing=0.0,
                              accelerator=SimpleNamespace(device=torch.device("cpu")))
    theirs, _, _ = cpo.CPOTrainer.cpo_loss(trainer, pi_c, pi_r)
    close(simpo_loss(pi_c, pi_r, beta=2.5, gamma=1.4), theirs.tolist())


def test_rpo_nll_is_the_chosen_responses_token_nll():
    close(rpo_nll(torch.tensor([-0.7, -2.0])), [0.7, 2.0])
