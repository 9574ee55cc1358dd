"""Advantage estimators by name (``ppo.advantage``): each one pure function plus its options.

From a rollout's scores ``[N]``, per-token KL estimates ``[N, R]`` and (for GAE) values, an estimator gives
per-token advantages and, where a value function learns, its targets (returns). Two options frame them:

- **KL shaping**, where the penalty ``beta * KL`` goes: ``"token"``, into each token's reward, the score
  added on the last token (Ziegler et al. 2019; Ouyang et al. 2022, eq. 2; :func:`kl_penalized_rewards`),
  optionally whitened without shifting their mean (``ppo.whiten_rewards``); or ``"sequence"``, one reward per
  sequence, the score minus the summed penalty (:func:`kl_penalized_score`).
- **Whitening** of the advantages over every token of the batch (every process's: ``reduce_sum``), by
  default as the estimator's authors do (``whiten``) and otherwise as ``ppo.whiten_advantages`` says.

A new estimator is one function taking :class:`EstimatorInput` and one entry of :data:`ESTIMATORS` (with
its name among ``ppo.advantage``'s values); the PPO trainer does not change.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal

import torch

from rlhfkit.algorithms.advantages import (
    ReduceSum,
    dr_grpo_advantages,
    gae,
    grpo_advantages,
    masked_whiten,
    reinforce_plus_plus_advantages,
    rloo_advantages,
)
from rlhfkit.algorithms.kl import kl_penalized_rewards, kl_penalized_score


@dataclass(frozen=True)
class EstimatorInput:
    """What an estimator sees: ``rewards`` per token ``[N, R]`` (token shaping) or per sequence ``[N]``
    (sequence shaping), the response ``mask`` ``[N, R]``, the ``values`` ``[N, R]`` of a value function (or
    None), the number of samples per prompt (prompt-major groups), and the discount and GAE's lambda."""

    rewards: torch.Tensor
    mask: torch.Tensor
    values: torch.Tensor | None
    group_size: int
    gamma: float
    lam: float


Advantages = tuple[torch.Tensor, torch.Tensor | None]  # per-token advantages [N, R]; returns [N, R] or None


@dataclass(frozen=True)
class Estimator:
    """An advantage estimator: its function and options (module docstring). ``needs_values``: it uses a value
    network (trained on the returns it gives); ``whiten``: the default of ``ppo.whiten_advantages``."""

    advantages: Callable[[EstimatorInput], Advantages]
    kl_shaping: Literal["token", "sequence"]
    whiten: bool
    needs_values: bool = False


def _per_sequence(advantages: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """A sequence's advantage on each of its tokens."""
    return advantages.unsqueeze(-1) * mask


ESTIMATORS: dict[str, Estimator] = {
    # Schulman et al. 2016 with a learnt value function; PPO's advantage normalisation
    "gae": Estimator(lambda x: gae(x.rewards, x.values, x.mask, x.gamma, x.lam), "token", whiten=True,
                     needs_values=True),
    # Kool et al. 2019; Ahmadian et al. 2024: the group's other samples are the baseline
    "rloo": Estimator(lambda x: (_per_sequence(rloo_advantages(x.rewards, x.group_size), x.mask), None),
                      "sequence", whiten=False),
    # Shao et al. 2024: normalised within each group
    "grpo": Estimator(lambda x: (_per_sequence(grpo_advantages(x.rewards, x.group_size), x.mask), None),
                      "sequence", whiten=False),
    # Liu et al. 2025: the group mean as the baseline, no division by the group's standard deviation
    "dr_grpo": Estimator(lambda x: (_per_sequence(dr_grpo_advantages(x.rewards, x.group_size), x.mask), None),
                         "sequence", whiten=False),
    # Hu et al. 2025: token-level KL in the reward, the reward-to-go normalised over the global batch
    "reinforce++": Estimator(lambda x: (reinforce_plus_plus_advantages(x.rewards, x.mask, x.gamma), None),
                             "token", whiten=True),
}


def estimate_advantages(name: str, scores: torch.Tensor, kl: torch.Tensor, mask: torch.Tensor, *,
                        kl_coef: float, values: torch.Tensor | None = None, group_size: int = 1,
                        gamma: float = 1.0, lam: float = 0.95, whiten_rewards: bool = False,
                        whiten_advantages: bool | None = None, reduce_sum: ReduceSum | None = None) -> Advantages:
    """Advantages (and returns, or None) of estimator ``name`` from ``scores`` ``[N]`` and the per-token KL
    estimates ``kl`` ``[N, R]``, shaped and whitened as the module docstring says (``whiten_rewards`` applies
    to token-shaped rewards; ``whiten_advantages`` None: the estimator's default)."""
    estimator = ESTIMATORS[name]
    if estimator.kl_shaping == "token":
        rewards = kl_penalized_rewards(scores, kl, mask, kl_coef)
        if whiten_rewards:
            rewards = masked_whiten(rewards, mask, shift_mean=False, reduce_sum=reduce_sum)
    else:
        rewards = kl_penalized_score(scores, kl, mask, kl_coef)
    advantages, returns = estimator.advantages(EstimatorInput(rewards, mask, values, group_size, gamma, lam))
    if estimator.whiten if whiten_advantages is None else whiten_advantages:
        advantages = masked_whiten(advantages, mask, reduce_sum=reduce_sum)
    return advantages, returns
