"""Token log-probabilities and the masked language-model loss (pure tensor maths, no models).

Convention shared by every stage: ``input_ids`` and ``loss_mask`` have the same shape ``[B, T]``;
``loss_mask[b, t] = 1`` when token ``t`` is a target (a response token, or any real token in
pretraining). Logits at position ``t`` predict token ``t + 1``, so the shift happens here, once.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def logprobs_of(logits: torch.Tensor, targets: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """log p(targets | logits) where ``logits[..., :]`` scores ``targets[...]`` (already aligned: no shift).

    The one log-softmax-and-gather of every stage. ``logits`` are divided by ``temperature`` first, so that
    log-probs used in RL match the distribution the rollout sampled from (Huang et al. 2024, "The N+
    implementation details of RLHF with PPO"). ``cross_entropy`` computes the log-softmax and the gather
    without keeping the full ``[..., V]`` log-softmax tensor alive.
    """
    if temperature != 1.0:
        logits = logits / temperature
    flat = -F.cross_entropy(logits.reshape(-1, logits.size(-1)).float(), targets.reshape(-1), reduction="none")
    return flat.view(targets.shape)


def token_logprobs(logits: torch.Tensor, input_ids: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """log p(x_{t+1} | x_{<=t}) for every position: ``[B, T-1]`` (:func:`logprobs_of` after the shift)."""
    return logprobs_of(logits[:, :-1, :], input_ids[:, 1:], temperature)


def masked_lm_loss(logits: torch.Tensor, input_ids: torch.Tensor, loss_mask: torch.Tensor) -> torch.Tensor:
    """Mean negative log-likelihood over target tokens (the SFT and pretraining loss).

    L = - sum_{b,t} m_{b,t+1} log p(x_{b,t+1} | x_{b,<=t}) / sum_{b,t} m_{b,t+1}

    Every target token of the batch weighs the same, whatever the length of its sequence
    (InstructGPT's SFT loss on response tokens; Radford et al. 2018 for pretraining).
    """
    target_mask = loss_mask[:, 1:].to(torch.float32)
    n_targets = target_mask.sum()
    if n_targets == 0:
        raise ValueError("masked_lm_loss: the batch has no target tokens (all responses truncated?)")
    return -(token_logprobs(logits, input_ids) * target_mask).sum() / n_targets


def sequence_logprobs(logits: torch.Tensor, input_ids: torch.Tensor, loss_mask: torch.Tensor,
                      *, average: bool = False, temperature: float = 1.0) -> torch.Tensor:
    """Sum (or mean, with ``average``) of target-token log-probs per sequence: ``[B]``."""
    target_mask = loss_mask[:, 1:].to(torch.float32)
    total = (token_logprobs(logits, input_ids, temperature) * target_mask).sum(-1)
    return total / target_mask.sum(-1).clamp(min=1) if average else total


def gathered_logprobs(logits: torch.Tensor, rows: torch.Tensor, predictors: torch.Tensor, targets: torch.Tensor,
                      *, temperature: float = 1.0) -> torch.Tensor:
    """log p(targets[i] | logits[rows[i], predictors[i]]) for a list of tokens: ``[N]``.

    For layouts where a token's predictor is not simply the position before it, e.g. several responses
    packed after one shared prompt (the first token of every response is predicted by the prompt's
    last position). ``logits`` is ``[B, T, V]``; ``rows``, ``predictors`` and ``targets`` are ``[N]``.
    Only the N selected rows of logits reach the softmax.
    """
    return logprobs_of(logits[rows, predictors], targets, temperature)
