"""PPO's clipped surrogate losses (Schulman et al. 2017) and the policy entropy, per token."""

from __future__ import annotations

import torch

from rlhfkit.algorithms.advantages import masked_mean


def policy_loss(logprobs: torch.Tensor, old_logprobs: torch.Tensor, advantages: torch.Tensor,
                mask: torch.Tensor, clip_range: float = 0.2,
                clip_range_high: float | None = None) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Clipped surrogate objective (PPO, eq. 7), negated to be minimised.

    ``L = mean_t max(-A_t rho_t, -A_t clip(rho_t, 1 - eps_low, 1 + eps_high))`` with
    ``rho_t = exp(log pi(a_t) - log pi_old(a_t))``, ``eps_low = clip_range`` and ``eps_high =
    clip_range_high`` (None: ``clip_range``, PPO's symmetric clip; larger: DAPO's clip-higher, Yu et al. 2025,
    eq. 10, which lets unlikely tokens with a positive advantage gain more). Also returns ``clipfrac`` (share
    of tokens where the clipped term is active) and ``approxkl`` (``mean (log rho)^2 / 2``, the k2 estimator).
    """
    high = clip_range if clip_range_high is None else clip_range_high
    log_ratio = logprobs - old_logprobs
    ratio = torch.exp(log_ratio)
    unclipped = -advantages * ratio
    clipped = -advantages * torch.clamp(ratio, 1.0 - clip_range, 1.0 + high)
    loss = masked_mean(torch.maximum(unclipped, clipped), mask)
    with torch.no_grad():
        stats = {"clipfrac": masked_mean((clipped > unclipped).float(), mask),
                 "approxkl": 0.5 * masked_mean(log_ratio.square(), mask),
                 "ratio": masked_mean(ratio, mask)}
    return loss, stats


def value_loss(values: torch.Tensor, old_values: torch.Tensor, returns: torch.Tensor, mask: torch.Tensor,
               clip_range: float = 0.2) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Clipped value loss: ``0.5 * mean_t max((V - R)^2, (V_clip - R)^2)``.

    ``V_clip = V_old + clip(V - V_old, -eps, eps)`` keeps the value function close to the one that
    produced the advantages (as in OpenAI's baselines PPO2 and Ziegler et al. 2019).
    """
    clipped_values = old_values + torch.clamp(values - old_values, -clip_range, clip_range)
    unclipped_error = (values - returns).square()
    clipped_error = (clipped_values - returns).square()
    loss = 0.5 * masked_mean(torch.maximum(unclipped_error, clipped_error), mask)
    with torch.no_grad():
        stats = {"clipfrac": masked_mean((clipped_error > unclipped_error).float(), mask)}
    return loss, stats


def entropy_from_logits(logits: torch.Tensor) -> torch.Tensor:
    """Entropy of the categorical distribution at every position: ``logsumexp(z) - sum softmax(z) z``."""
    probs = torch.softmax(logits.float(), dim=-1)
    return torch.logsumexp(logits.float(), dim=-1) - (probs * logits.float()).sum(-1)
