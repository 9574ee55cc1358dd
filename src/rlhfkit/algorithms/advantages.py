"""Advantage estimators: GAE with a value model, REINFORCE++'s reward-to-go, and the group baselines RLOO
and GRPO (by name, with their options: :mod:`rlhfkit.algorithms.estimators`).

Token tensors are ``[B, T]`` over response tokens with ``mask = 1`` on real tokens (responses are
right-padded). Group estimators take one score per sample, laid out prompt-major: the ``k``
samples of prompt ``i`` are ``scores[i * k:(i + 1) * k]``.

Statistics over a batch split across processes (data parallel): :func:`masked_mean` and
:func:`masked_whiten` take ``reduce_sum``, a function that sums a tensor over all processes (e.g.
:func:`rlhfkit.engine.accelerator.sum_over_processes`). Only sums and counts are reduced, never whole tensors,
and the result is the statistic of the concatenation of every process's rows.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

ReduceSum = Callable[[torch.Tensor], torch.Tensor]  # elementwise sum of a tensor over all processes


def masked_mean(values: torch.Tensor, mask: torch.Tensor, dim: int | None = None,
                reduce_sum: ReduceSum | None = None) -> torch.Tensor:
    """Mean of ``values`` where ``mask`` is 1 (over all entries, or along ``dim``).

    With ``reduce_sum`` (over all entries only) the masked sum and the count are summed over processes
    first: the mean over every process's masked entries.
    """
    mask = mask.to(values.dtype)
    if reduce_sum is not None:
        if dim is not None:
            raise ValueError("masked_mean: reduce_sum is for the mean over all entries (dim=None)")
        total, count = reduce_sum(torch.stack([(values * mask).sum(), mask.sum()])).unbind()
        return total / count.clamp(min=1)
    if dim is None:
        return (values * mask).sum() / mask.sum().clamp(min=1)
    return (values * mask).sum(dim) / mask.sum(dim).clamp(min=1)


def masked_whiten(values: torch.Tensor, mask: torch.Tensor, shift_mean: bool = True, eps: float = 1e-8,
                  reduce_sum: ReduceSum | None = None) -> torch.Tensor:
    """Normalise to unit variance over masked entries (and zero mean unless ``shift_mean`` is off).

    With ``reduce_sum`` the mean, the variance and the count are those of every process's masked entries
    (three reductions of one or two numbers each: the mean, the squared deviations from it, the count).
    """
    mean = masked_mean(values, mask, reduce_sum=reduce_sum)
    centered = values - mean
    variance = masked_mean(centered.square(), mask, reduce_sum=reduce_sum)
    n = mask.sum() if reduce_sum is None else reduce_sum(mask.sum().to(values.dtype))
    if n > 1:  # unbiased, as the usual whitening of PPO implementations
        variance = variance * n / (n - 1)
    whitened = centered * torch.rsqrt(variance + eps)
    if not shift_mean:
        whitened = whitened + mean
    return whitened * mask.to(values.dtype)


def pool_means(means: list[torch.Tensor], counts: list[torch.Tensor], reduce_sum: ReduceSum) -> tuple[torch.Tensor,
                                                                                                   torch.Tensor]:
    """Means over every process's units from each process's means, in one reduction.

    ``means[i]`` is this process's mean of quantity ``i`` over its ``counts[i]`` units (tokens, sequences).
    Returns the means over all processes' units (``sum(mean * count) / sum(count)``, equal on every process)
    and this process's share of each quantity's units (``count / sum(count)``).
    """
    device = means[0].device
    counts = torch.stack([torch.as_tensor(c, device=device).float() for c in counts])
    sums, totals = reduce_sum(torch.cat([torch.stack(means).detach().float() * counts, counts])).chunk(2)
    totals = totals.clamp(min=1)
    return sums / totals, counts / totals


def pooled_loss(means: dict[str, tuple[torch.Tensor, torch.Tensor]], coefs: dict[str, float],
                reduce_sum: ReduceSum | None, world: int = 1) -> tuple[torch.Tensor, float, dict[str, float]]:
    """(loss to backpropagate, the micro-batch's loss value, {name: the micro-batch's statistic}) of token-mean
    loss terms of a micro-batch split over ``world`` processes.

    ``means`` maps each loss term and statistic to its token mean over this process's share and its
    number of tokens; the loss is ``sum(coef x term)`` over the terms of ``coefs``. With one process
    (``reduce_sum`` None) that is all. With N, the micro-batch is every process's share: the means are pooled
    over every process's tokens (one reduction, :func:`pool_means`; equal on every process, so a non-finite
    check and an early stop decide alike) and each term is weighted by N x this process's share of its
    tokens, so that the gradient DDP averages over processes is the gradient of the whole micro-batch's loss.
    """
    if reduce_sum is None:
        loss = sum(coef * means[name][0] for name, coef in coefs.items())
        return loss, loss.item(), {name: mean.item() for name, (mean, _) in means.items()}
    names = list(means)
    pooled, shares = pool_means([means[n][0] for n in names], [means[n][1] for n in names], reduce_sum)
    stats, share = dict(zip(names, pooled.tolist(), strict=True)), dict(zip(names, shares, strict=True))
    loss = sum(coef * means[name][0] * (share[name] * world) for name, coef in coefs.items())
    return loss, sum(coef * stats[name] for name, coef in coefs.items()), stats


def gae(rewards: torch.Tensor, values: torch.Tensor, mask: torch.Tensor, gamma: float = 1.0,
        lam: float = 0.95) -> tuple[torch.Tensor, torch.Tensor]:
    """Generalised advantage estimation (Schulman et al. 2016, eq. 16): advantages and returns.

    ``delta_t = r_t + gamma * V_{t+1} - V_t`` and ``A_t = delta_t + gamma * lambda * A_{t+1}``, with
    ``V`` and ``A`` zero past the last response token. Returns are ``A_t + V_t`` (the value target).
    """
    mask = mask.to(values.dtype)
    values = values * mask
    rewards = rewards * mask
    advantages = torch.zeros_like(values)
    next_advantage = torch.zeros_like(values[:, 0])
    next_value = torch.zeros_like(values[:, 0])
    for t in reversed(range(values.size(1))):
        delta = rewards[:, t] + gamma * next_value - values[:, t]
        next_advantage = (delta + gamma * lam * next_advantage) * mask[:, t]
        advantages[:, t] = next_advantage
        next_value = values[:, t]
    return advantages, (advantages + values) * mask


def reinforce_plus_plus_advantages(rewards: torch.Tensor, mask: torch.Tensor, gamma: float = 1.0) -> torch.Tensor:
    """REINFORCE++ (Hu et al. 2025, arXiv:2501.03262) before its global normalisation: the reward-to-go of the
    KL-shaped per-token rewards, ``A_t = sum_{s >= t} gamma^(s - t) r_s``. With the rewards of
    :func:`rlhfkit.algorithms.kl.kl_penalized_rewards` and ``gamma = 1`` this is the paper's
    ``A_t = r(x, y) - beta * sum_{i >= t} KL_i``; the paper then normalises ``A`` over the whole batch
    (:func:`masked_whiten` over every process's tokens).

    No value function: it is GAE with ``V = 0`` and ``lambda = 1`` (Schulman et al. 2016, eq. 18).
    """
    return gae(rewards, torch.zeros_like(rewards), mask, gamma, lam=1.0)[0]


def _groups(scores: torch.Tensor, k: int) -> torch.Tensor:
    if k < 2 or scores.numel() % k:
        raise ValueError(f"group advantages need k >= 2 samples per prompt and a multiple of k scores; "
                         f"got k={k} for {scores.numel()} scores")
    return scores.view(-1, k)


def rloo_advantages(scores: torch.Tensor, k: int) -> torch.Tensor:
    """REINFORCE leave-one-out (Kool et al. 2019; Ahmadian et al. 2024): ``A_i = r_i - mean_{j != i} r_j``."""
    grouped = _groups(scores, k)
    baseline = (grouped.sum(-1, keepdim=True) - grouped) / (k - 1)
    return (grouped - baseline).view(-1)


def dr_grpo_advantages(scores: torch.Tensor, k: int) -> torch.Tensor:
    """Dr. GRPO (Liu et al. 2025, "Understanding R1-Zero-Like Training", eq. 3): ``A_i = r_i - mean`` of the
    group, without GRPO's division by the group's standard deviation, which weights prompts whose samples
    score alike (too easy or too hard) the most (TRL: ``scale_rewards=False``)."""
    grouped = _groups(scores, k)
    return (grouped - grouped.mean(-1, keepdim=True)).view(-1)


def grpo_advantages(scores: torch.Tensor, k: int, eps: float = 1e-4) -> torch.Tensor:
    """Group-relative advantages (Shao et al. 2024, DeepSeekMath): ``(r_i - mean) / (std + eps)``.

    ``std`` is the unbiased standard deviation of the group, as in TRL's GRPOTrainer.
    """
    grouped = _groups(scores, k)
    mean, std = grouped.mean(-1, keepdim=True), grouped.std(-1, keepdim=True)
    return ((grouped - mean) / (std + eps)).view(-1)
