"""Direct preference optimisation losses: DPO, IPO, robust / conservative DPO, hinge (SLiC), ORPO, KTO, SimPO.

Pure tensor maths, no models. Every pairwise loss takes the log-probabilities of the chosen and the
rejected response under the policy (``pi_c``, ``pi_r``) and under the frozen reference (``ref_c``,
``ref_r``), each ``[B]``, and returns the per-pair losses ``[B]`` (the trainer takes their mean).
They all work on the *implicit reward margin*

    h = (pi_c - ref_c) - (pi_r - ref_r)

the difference of the two log-ratios ``log pi(y|x) - log pi_ref(y|x)``. ``beta * (pi - ref)`` is the
implicit reward DPO assigns a response; :func:`implicit_rewards` computes it for the metrics.

Whether ``pi``/``ref`` are summed over response tokens (the DPO paper) or averaged per token is the
caller's choice; :data:`AVERAGES_LOGPS` records the convention of each loss (IPO, ORPO and SimPO average,
matching TRL and the ORPO and SimPO papers; the others sum).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

LOSS_TYPES = ("dpo", "ipo", "robust", "hinge", "orpo", "kto", "simpo")

# Default length normalisation of each loss: True means the log-probs are per-token means.
AVERAGES_LOGPS = {"dpo": False, "ipo": True, "robust": False, "hinge": False, "orpo": True, "kto": False,
                  "simpo": True}


def reward_margin(pi_c: torch.Tensor, pi_r: torch.Tensor, ref_c: torch.Tensor, ref_r: torch.Tensor) -> torch.Tensor:
    """h = (log pi(y_c|x) - log ref(y_c|x)) - (log pi(y_r|x) - log ref(y_r|x)), per pair."""
    return (pi_c - ref_c) - (pi_r - ref_r)


def implicit_rewards(pi: torch.Tensor, ref: torch.Tensor, beta: float) -> torch.Tensor:
    """DPO's implicit reward of a response, r = beta * (log pi(y|x) - log ref(y|x)) (Rafailov et al. 2023, eq. 5)."""
    return beta * (pi - ref)


def dpo_loss(pi_c: torch.Tensor, pi_r: torch.Tensor, ref_c: torch.Tensor, ref_r: torch.Tensor,
             *, beta: float = 0.1, label_smoothing: float = 0.0) -> torch.Tensor:
    """DPO (Rafailov et al. 2023, "Direct Preference Optimization", eq. 7), optionally conservative.

        L = -(1 - eps) log sigmoid(beta h) - eps log sigmoid(-beta h)

    With ``label_smoothing`` eps = 0 this is the Bradley-Terry log-likelihood of the preference under
    the implicit reward. eps > 0 is conservative DPO (cDPO, Mitchell 2023, "A note on DPO with noisy
    preferences"): the label is assumed flipped with probability eps, so the optimum keeps a finite
    margin instead of pushing h to infinity. At initialisation (policy == reference) h = 0 and L = log 2.
    """
    logits = beta * reward_margin(pi_c, pi_r, ref_c, ref_r)
    loss = -F.logsigmoid(logits)
    if label_smoothing:
        loss = (1 - label_smoothing) * loss - label_smoothing * F.logsigmoid(-logits)
    return loss


def robust_dpo_loss(pi_c: torch.Tensor, pi_r: torch.Tensor, ref_c: torch.Tensor, ref_r: torch.Tensor,
                    *, beta: float = 0.1, label_smoothing: float = 0.0) -> torch.Tensor:
    """Robust DPO (Chowdhury et al. 2024, "Provably Robust DPO: Aligning Language Models with Noisy
    Feedback", eq. 9): an unbiased estimate of the clean-label loss when labels flip with rate eps.

        L = [(1 - eps) (-log sigmoid(beta h)) - eps (-log sigmoid(-beta h))] / (1 - 2 eps),  0 <= eps < 1/2

    Unlike cDPO the flipped term is *subtracted*; in expectation over the noise this equals DPO on
    clean labels. eps = 0 is plain DPO.
    """
    if not 0 <= label_smoothing < 0.5:
        raise ValueError(f"robust DPO needs 0 <= label_smoothing < 0.5, got {label_smoothing}")
    logits = beta * reward_margin(pi_c, pi_r, ref_c, ref_r)
    clean, flipped = -F.logsigmoid(logits), -F.logsigmoid(-logits)
    return ((1 - label_smoothing) * clean - label_smoothing * flipped) / (1 - 2 * label_smoothing)


def ipo_loss(pi_c: torch.Tensor, pi_r: torch.Tensor, ref_c: torch.Tensor, ref_r: torch.Tensor,
             *, beta: float = 0.1) -> torch.Tensor:
    """IPO (Azar et al. 2023, "A General Theoretical Paradigm to Understand Learning from Human
    Preferences", eq. 17, with tau = beta): regress the margin onto a fixed target.

        L = (h - 1 / (2 beta))^2

    A squared loss cannot push h to infinity on deterministic preferences, which is IPO's fix for
    DPO's over-fitting. Convention (TRL's, confirmed by the IPO authors): the log-probs are *per-token
    means* over the response, so the target 1/(2 beta) does not depend on response length; pass averaged
    log-probs (the trainer does for ``loss: ipo`` unless ``average_logps: false``).
    """
    return (reward_margin(pi_c, pi_r, ref_c, ref_r) - 1 / (2 * beta)) ** 2


def hinge_loss(pi_c: torch.Tensor, pi_r: torch.Tensor, ref_c: torch.Tensor, ref_r: torch.Tensor,
               *, beta: float = 0.1) -> torch.Tensor:
    """Hinge / SLiC (Zhao et al. 2023, "SLiC-HF: Sequence Likelihood Calibration with Human Feedback",
    eq. 1, calibration term with margin delta = 1/beta), on the reference-normalised margin as in TRL:

        L = max(0, 1 - beta h)

    Zero once the policy prefers the chosen response by 1/beta nats more than the reference does.
    """
    return torch.relu(1 - beta * reward_margin(pi_c, pi_r, ref_c, ref_r))


def log1mexp(x: torch.Tensor) -> torch.Tensor:
    """log(1 - exp(x)) for x < 0, accurate for x near 0 and very negative x (Maechler 2012)."""
    return torch.where(x > -math.log(2), torch.log(-torch.expm1(x)), torch.log1p(-torch.exp(x)))


def orpo_loss(pi_c: torch.Tensor, pi_r: torch.Tensor, *, beta: float = 0.1) -> torch.Tensor:
    """ORPO (Hong et al. 2024, "ORPO: Monolithic Preference Optimization without Reference Model", eq. 6-7):
    supervised fine-tuning on the chosen response plus an odds-ratio penalty, no reference model.

        odds(y|x) = P(y|x) / (1 - P(y|x)),   log P(y|x) = mean_t log p(y_t | x, y_<t)
        L = -log P(y_c|x) - beta * log sigmoid(log odds(y_c|x) - log odds(y_r|x))

    ``pi_c``/``pi_r`` must be the per-token *mean* log-probs (the paper's length-normalised likelihood,
    which also keeps P < 1 away from 1 so the odds stay finite); ``beta`` is the paper's lambda. The
    SFT term is each pair's mean token NLL of the chosen response (the paper's eq. 2), so every pair
    weighs the same whatever its length.
    """
    log_odds = (pi_c - pi_r) - (log1mexp(pi_c) - log1mexp(pi_r))
    return -pi_c - beta * F.logsigmoid(log_odds)


def simpo_loss(pi_c: torch.Tensor, pi_r: torch.Tensor, *, beta: float = 2.0, gamma: float = 0.5) -> torch.Tensor:
    """SimPO (Meng et al. 2024, "SimPO: Simple Preference Optimization with a Reference-Free Reward"): the
    length-normalised log-likelihood as the implicit reward, no reference model, and a target margin ``gamma``.

        L = -log sigmoid(beta (pi_c - pi_r) - gamma)

    ``pi_c``/``pi_r`` must be per-token *mean* log-probs. At ``pi_c = pi_r`` the loss is ``-log sigmoid(-gamma)``.
    """
    return -F.logsigmoid(beta * (pi_c - pi_r) - gamma)


def rpo_nll(pi_c: torch.Tensor) -> torch.Tensor:
    """RPO's extra term (Pang et al. 2024, "Iterative Reasoning Preference Optimization"): the chosen
    response's negative log-likelihood per token, ``-pi_c`` for per-token mean log-probs ``pi_c``; weighted by
    ``rpo_alpha`` and added to each pair's preference loss."""
    return -pi_c


def orpo_log_odds_ratio(pi_c: torch.Tensor, pi_r: torch.Tensor) -> torch.Tensor:
    """log odds(y_c|x) - log odds(y_r|x) of :func:`orpo_loss` (a metric: positive when the policy prefers y_c)."""
    return (pi_c - pi_r) - (log1mexp(pi_c) - log1mexp(pi_r))


def kto_kl_estimate(pi_mismatched: torch.Tensor, ref_mismatched: torch.Tensor) -> torch.Tensor:
    """KTO's reference point z_ref: a biased but low-variance estimate of KL(pi || ref), held constant.

        z_ref = max(0, mean_i [log pi(y'_i|x_i) - log ref(y'_i|x_i)])

    over *mismatched* pairs (x_i, y'_i): prompt i with the completion of another example, so the
    estimate does not see the completion judged for x_i (Ethayarajh et al. 2024, section 4.1). It is
    detached: no gradient flows through the reference point.
    """
    return (pi_mismatched - ref_mismatched).mean().clamp(min=0).detach()


def kto_loss(pi: torch.Tensor, ref: torch.Tensor, desirable: torch.Tensor, kl: torch.Tensor | float,
             *, beta: float = 0.1, desirable_weight: float = 1.0, undesirable_weight: float = 1.0) -> torch.Tensor:
    """KTO (Ethayarajh et al. 2024, "KTO: Model Alignment as Prospect Theoretic Optimization", eq. 8):
    unpaired completions, each labelled desirable or undesirable, judged against a reference point.

        r = log pi(y|x) - log ref(y|x)
        L = lambda_D (1 - sigmoid(beta (r - z_ref)))   if y is desirable
            lambda_U (1 - sigmoid(beta (z_ref - r)))   if y is undesirable

    ``desirable`` is a bool ``[B]``; ``kl`` is z_ref from :func:`kto_kl_estimate`. The paper suggests
    weights with lambda_D n_D / (lambda_U n_U) in [1, 4/3]. At initialisation (r = 0, z_ref = 0) L = 0.5 * lambda.
    """
    ratio = pi - ref
    good = desirable_weight * (1 - torch.sigmoid(beta * (ratio - kl)))
    bad = undesirable_weight * (1 - torch.sigmoid(beta * (kl - ratio)))
    return torch.where(desirable.bool(), good, bad)


def pairwise_loss(loss_type: str, pi_c: torch.Tensor, pi_r: torch.Tensor, ref_c: torch.Tensor | None,
                  ref_r: torch.Tensor | None, *, beta: float, label_smoothing: float = 0.0,
                  simpo_gamma: float = 0.5) -> torch.Tensor:
    """Dispatch to the pairwise loss named ``loss_type`` (all of :data:`LOSS_TYPES` but ``kto``).

    ``ref_c``/``ref_r`` may be None for reference-free training (a uniform reference: log-ratios become
    the policy log-probs themselves); ORPO and SimPO ignore them.
    """
    if loss_type == "orpo":
        return orpo_loss(pi_c, pi_r, beta=beta)
    if loss_type == "simpo":
        return simpo_loss(pi_c, pi_r, beta=beta, gamma=simpo_gamma)
    if ref_c is None or ref_r is None:
        ref_c = ref_r = torch.zeros_like(pi_c)
    if loss_type == "dpo":
        return dpo_loss(pi_c, pi_r, ref_c, ref_r, beta=beta, label_smoothing=label_smoothing)
    if loss_type == "robust":
        return robust_dpo_loss(pi_c, pi_r, ref_c, ref_r, beta=beta, label_smoothing=label_smoothing)
    if loss_type == "ipo":
        return ipo_loss(pi_c, pi_r, ref_c, ref_r, beta=beta)
    if loss_type == "hinge":
        return hinge_loss(pi_c, pi_r, ref_c, ref_r, beta=beta)
    raise ValueError(f"unknown pairwise loss {loss_type!r}; expected one of {[t for t in LOSS_TYPES if t != 'kto']}")
