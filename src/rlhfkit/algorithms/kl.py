"""KL divergence between the policy and the reference, per token, and the KL-penalised reward.

With ``logr = log pi(a|s) - log pi_ref(a|s)`` on tokens sampled from pi (Schulman 2020,
"Approximating KL divergence"):

- ``k1 = logr``                      unbiased, high variance, can be negative;
- ``k2 = logr^2 / 2``                biased, low variance;
- ``k3 = (r - 1) - log r`` with ``r = pi_ref / pi = exp(-logr)``: unbiased and always >= 0.
"""

from __future__ import annotations

from typing import Literal

import torch

KLEstimator = Literal["k1", "k2", "k3"]


def kl_estimate(logprobs: torch.Tensor, ref_logprobs: torch.Tensor, estimator: KLEstimator = "k1") -> torch.Tensor:
    """Per-token estimate of KL(pi || pi_ref) from log-probs of tokens sampled from pi."""
    logr = logprobs - ref_logprobs
    if estimator == "k1":
        return logr
    if estimator == "k2":
        return 0.5 * logr.square()
    if estimator == "k3":
        return torch.expm1(-logr) + logr
    raise ValueError(f"unknown KL estimator {estimator!r}; use k1, k2 or k3")


def kl_penalized_rewards(scores: torch.Tensor, kl: torch.Tensor, mask: torch.Tensor,
                         kl_coef: float) -> torch.Tensor:
    """Per-token rewards of RLHF-PPO (Ziegler et al. 2019; Ouyang et al. 2022, eq. 2).

    ``r_t = -beta * KL_t`` on every response token, plus the sequence score on the last response
    token. ``scores`` is ``[B]``; ``kl`` and ``mask`` are ``[B, T]`` over response tokens.
    """
    rewards = -kl_coef * kl * mask
    last = (mask.long().cumsum(-1) == mask.long().sum(-1, keepdim=True)) & mask.bool()
    return rewards + last.to(rewards.dtype) * scores.unsqueeze(-1)


def kl_penalized_score(scores: torch.Tensor, kl: torch.Tensor, mask: torch.Tensor, kl_coef: float) -> torch.Tensor:
    """The sequence reward with the KL penalty: ``R = r - beta * sum_t KL_t`` (``[B]``), the reward of the
    group baselines RLOO and GRPO (Ahmadian et al. 2024) and the logged ``objective/rlhf_reward``.
    With the same ``kl``, it is the sum over the tokens of :func:`kl_penalized_rewards`."""
    return scores - kl_coef * (kl * mask).sum(-1)


class AdaptiveKLController:
    """The adaptive KL coefficient of Ziegler et al. 2019 (section 2.2).

    After each batch: ``e = clip((KL - target) / target, -0.2, 0.2)`` and
    ``beta <- beta * (1 + e * n_steps / horizon)``: beta grows when the policy drifts past the
    target KL and shrinks when it stays below.
    """

    def __init__(self, init_coef: float, target: float, horizon: int):
        if target <= 0 or horizon <= 0:
            raise ValueError("the adaptive KL controller needs target > 0 and horizon > 0")
        self.value, self.target, self.horizon = init_coef, target, horizon

    def update(self, current_kl: float, n_steps: int) -> float:
        error = max(-0.2, min(0.2, (current_kl - self.target) / self.target))
        self.value *= 1 + error * n_steps / self.horizon
        return self.value

    def state_dict(self) -> dict[str, float]:
        return {"value": self.value, "target": self.target, "horizon": self.horizon}

    def load_state_dict(self, state: dict[str, float]) -> None:
        self.value, self.target, self.horizon = state["value"], state["target"], int(state["horizon"])


class FixedKLController:
    """A constant KL coefficient (the same interface as :class:`AdaptiveKLController`)."""

    def __init__(self, coef: float):
        self.value = coef

    def update(self, current_kl: float, n_steps: int) -> float:
        return self.value

    def state_dict(self) -> dict[str, float]:
        return {"value": self.value}

    def load_state_dict(self, state: dict[str, float]) -> None:
        self.value = state["value"]
