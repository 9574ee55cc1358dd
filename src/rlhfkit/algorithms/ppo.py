"""PPO's clipped surrogate losses (Schulman et al. 2017) and the policy entropy, per token, and how a
per-token loss becomes one number (the GRPO family's aggregations)."""

from __future__ import annotations

from typing import Literal

import torch

from rlhfkit.algorithms.advantages import masked_mean

#: How a per-token loss ``l[i, t]`` (mask ``m``) becomes the batch's loss:
#: ``token_mean``: ``sum l m / sum m`` over all tokens (DAPO's token-level loss, Yu et al. 2025: long answers
#: weigh in proportion to their tokens); ``sequence_mean``: each sequence's token mean, then the mean over
#: sequences (GRPO, Shao et al. 2024); ``constant_length``: each sequence's token *sum* over one constant length (the
#: rollout's ``max_new_tokens``), then the mean over sequences (Dr. GRPO, Liu et al. 2025: no length normalisation
#: per sequence, so long wrong answers are not favoured).
Aggregation = Literal["token_mean", "sequence_mean", "constant_length"]
#: Whose likelihood ratio is clipped: each token's (PPO) or each sequence's length-normalised one (GSPO).
RatioLevel = Literal["token", "sequence"]


def aggregate(per_token: torch.Tensor, mask: torch.Tensor, how: Aggregation = "token_mean",
              max_tokens: int | None = None) -> torch.Tensor:
    """The loss of ``per_token`` ``[N, T]`` under ``mask`` as :data:`Aggregation` ``how`` says (``max_tokens``: the
    constant length of ``constant_length``). Sequences without a token count as none in the two sequence means."""
    if how == "token_mean":
        return masked_mean(per_token, mask)
    mask = mask.to(per_token.dtype)
    sums, lengths = (per_token * mask).sum(-1), mask.sum(-1)
    present = lengths > 0
    if how == "sequence_mean":
        per_sequence = sums[present] / lengths[present]
    elif how == "constant_length":
        if not max_tokens or max_tokens <= 0:
            raise ValueError("the constant_length aggregation needs max_tokens > 0")
        per_sequence = sums[present] / max_tokens
    else:
        raise ValueError(f"unknown loss aggregation {how!r}; expected one of token_mean, sequence_mean, "
                         "constant_length")
    return per_sequence.mean() if per_sequence.numel() else sums.sum() * 0.0


def aggregation_count(mask: torch.Tensor, how: Aggregation) -> torch.Tensor:
    """What the :func:`aggregate` loss is a mean over: tokens (``token_mean``) or sequences with a token; the
    weight with which a process's share pools into the whole micro-batch's loss
    (:func:`~rlhfkit.algorithms.advantages.pooled_loss`)."""
    return mask.sum() if how == "token_mean" else (mask.sum(-1) > 0).sum()


def sequence_log_ratio(logprobs: torch.Tensor, old_logprobs: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """GSPO's log importance ratio (Zheng et al. 2025), ``log s_i = mean_t (log pi - log pi_old)`` over
    each sequence's tokens, repeated on every token ``[N, T]``: the length-normalised sequence likelihood ratio."""
    mask = mask.to(logprobs.dtype)
    per_sequence = ((logprobs - old_logprobs) * mask).sum(-1) / mask.sum(-1).clamp(min=1.0)
    return per_sequence.unsqueeze(-1).expand_as(logprobs)


def policy_loss(logprobs: torch.Tensor, old_logprobs: torch.Tensor, advantages: torch.Tensor,
                mask: torch.Tensor, clip_range: float = 0.2, clip_range_high: float | None = None, *,
                aggregation: Aggregation = "token_mean", max_tokens: int | None = None,
                ratio_level: RatioLevel = "token") -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Clipped surrogate objective (PPO, eq. 7), negated to be minimised.

    ``L = agg_t max(-A_t rho_t, -A_t clip(rho_t, 1 - eps_low, 1 + eps_high))`` with
    ``rho_t = exp(log pi(a_t) - log pi_old(a_t))``, ``eps_low = clip_range`` and ``eps_high =
    clip_range_high`` (None: ``clip_range``, PPO's symmetric clip; larger: DAPO's clip-higher, Yu et al. 2025,
    eq. 10, which lets unlikely tokens with a positive advantage gain more). ``agg`` is :func:`aggregate`'s
    ``aggregation`` (default: PPO's token mean). With ``ratio_level="sequence"`` every token of a sequence
    shares the sequence's ratio (:func:`sequence_log_ratio`) and advantage (its token mean), clipped once: GSPO
    (Zheng et al. 2025), whose objective is the ``sequence_mean`` of this. Also returns ``clipfrac``
    (share of tokens where the clipped term is active), ``approxkl`` (``mean (log rho)^2 / 2``, the k2
    estimator) and the mean ``ratio``.
    """
    high = clip_range if clip_range_high is None else clip_range_high
    if ratio_level == "sequence":
        log_ratio = sequence_log_ratio(logprobs, old_logprobs, mask)
        advantages = masked_mean(advantages, mask, dim=-1).unsqueeze(-1).expand_as(logprobs)
    else:
        log_ratio = logprobs - old_logprobs
    ratio = torch.exp(log_ratio)
    unclipped = -advantages * ratio
    clipped = -advantages * torch.clamp(ratio, 1.0 - clip_range, 1.0 + high)
    loss = aggregate(torch.maximum(unclipped, clipped), mask, aggregation, max_tokens)
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
