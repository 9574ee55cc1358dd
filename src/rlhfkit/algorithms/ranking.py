"""The reward-model loss on K-way rankings, and the pairwise metrics that go with it (pure tensor maths).

InstructGPT (Ouyang et al. 2022, section 3.5, eq. 1) trains the reward model r_theta on rankings of K
completions of one prompt x. Every pair (y_w, y_l) with y_w ranked above y_l is a comparison:

    loss(theta) = - 1 / C(K, 2) * E_{(x, y_w, y_l) ~ D} [ log sigmoid( r_theta(x, y_w) - r_theta(x, y_l) ) ]

and "we train on all C(K, 2) comparisons from each prompt as a single batch element": one forward
pass per completion (K, not K(K-1)), and each prompt weighs the same in the batch however many
pairs it has. That avoids both the over-fitting they saw when the correlated comparisons of a prompt
were shuffled into separate batch elements, and the K(K-1)/2 extra forward passes.

Here the K completions of every prompt of a batch are flattened into one ``[N]`` vector of rewards
(one forward of N rows); a pair is two row indices into it plus the index of its prompt (its batch
element). :func:`expand_pairs` builds those index tensors from per-prompt pair lists (the records'
``pairs()``: winner's tie group strictly above the loser's; tied completions make no pair).

Options beyond eq. 1:

* ``margin`` (Touvron et al. 2023, Llama 2): ``- log sigmoid(r_w - r_l - m)``, asks for a gap of at least
  ``m`` (a float, or one value per pair).
* ``center_coef`` (reward centering, Eisenstein et al. 2023): adds ``center_coef * mean(r^2)`` over the
  batch's completions, which keeps rewards near 0 (the ranking loss only sees differences, so without it
  the offset drifts freely). TRL's ``center_rewards_coefficient`` uses ``(r_w + r_l)^2`` per pair; with
  K-way rankings we penalise each completion once rather than once per pair it takes part in.
* ``pair_weighting``: ``"per_prompt"`` (default, InstructGPT) averages a prompt's pairs, then the prompts;
  ``"per_pair"`` averages all pairs of the batch (what a pairwise trainer fed the expanded pairs does).

A length-disentangled reward (ODIN: Chen et al. 2024, "ODIN: Disentangled Reward Mitigates Hacking in
RLHF"): the model has two linear heads on the same features, a quality head ``r_Q`` and a length head
``r_L``; the ranking loss above is applied to their sum, and

    L_ODIN = L_rank(r_Q + r_L) + lambda_L * ( |rho(r_Q, L)| - s * rho(r_L, L) ) + lambda_O * |W_Q . W_L|

where ``rho`` is the Pearson correlation over the batch's completions and ``L`` their lengths
(:func:`length_disentangle_loss`), and ``W_Q``, ``W_L`` the heads' weight vectors (:func:`head_orthogonality`).
The length head soaks up the part of the preference that length explains; only ``r_Q`` is kept for RL.
ODIN has ``s = 1``, for labelers who prefer longer replies; ``s`` is the sign of the length preference in the
training labels (:func:`length_preference_sign`), so that the length head also takes a preference for shorter
replies (Anthropic's harmless pairs: the shorter reply wins 53 % of held-out pairs), where ``s = 1`` pulls it
against the labels (measured: training accuracy below 0.5 on those pairs).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F

PAIR_WEIGHTINGS = ("per_prompt", "per_pair")


@dataclass(frozen=True)
class PairIndex:
    """The comparisons of a batch as index tensors, all of shape ``[P]`` (long).

    ``winner[p]`` and ``loser[p]`` are rows of the flattened rewards; ``prompt[p]`` is the batch element
    (prompt) the pair belongs to.
    """

    winner: torch.Tensor
    loser: torch.Tensor
    prompt: torch.Tensor

    def __len__(self) -> int:
        return self.winner.numel()


def expand_pairs(pairs_per_prompt: Sequence[Sequence[tuple[int, int]]], sizes: Sequence[int]) -> PairIndex:
    """Turn each prompt's ``(winner, loser)`` completion indices into row indices of the flattened batch.

    Prompt ``b`` has ``sizes[b]`` completions, stored at rows ``offset_b .. offset_b + sizes[b] - 1`` with
    ``offset_b = sum(sizes[:b])``. Every prompt needs at least one pair.

    >>> index = expand_pairs([[(0, 1)], [(2, 0), (2, 1), (0, 1)]], sizes=[2, 3])
    >>> index.winner.tolist(), index.loser.tolist(), index.prompt.tolist()
    ([0, 4, 4, 2], [1, 2, 3, 3], [0, 1, 1, 1])
    """
    if len(pairs_per_prompt) != len(sizes):
        raise ValueError(f"{len(pairs_per_prompt)} pair lists for {len(sizes)} prompts")
    winners, losers, prompts = [], [], []
    offset = 0
    for b, (pairs, k) in enumerate(zip(pairs_per_prompt, sizes, strict=True)):
        if not pairs:
            raise ValueError(f"prompt {b} has no pair (every completion tied?)")
        for w, lo in pairs:
            if not (0 <= w < k and 0 <= lo < k) or w == lo:
                raise ValueError(f"prompt {b}: bad pair ({w}, {lo}) for {k} completions")
            winners.append(offset + w)
            losers.append(offset + lo)
            prompts.append(b)
        offset += k
    as_long = lambda values: torch.tensor(values, dtype=torch.long)  # noqa: E731
    return PairIndex(as_long(winners), as_long(losers), as_long(prompts))


def pair_margins(rewards: torch.Tensor, winner: torch.Tensor, loser: torch.Tensor) -> torch.Tensor:
    """``r_w - r_l`` for every pair: ``[P]``. Positive when the model agrees with the ranking."""
    return rewards[winner] - rewards[loser]


def pair_weights(prompt: torch.Tensor, pair_weighting: str = "per_prompt") -> torch.Tensor:
    """Weights ``[P]`` summing to 1 that turn per-pair losses into the batch loss.

    ``per_prompt``: ``1 / (B * n_b)`` for a pair of prompt ``b`` with ``n_b`` pairs, ``B`` the number of
    prompts that have pairs (InstructGPT: each prompt is one batch element). ``per_pair``: ``1 / P``.
    """
    if pair_weighting not in PAIR_WEIGHTINGS:
        raise ValueError(f"pair_weighting must be one of {PAIR_WEIGHTINGS}, got {pair_weighting!r}")
    n_pairs = prompt.numel()
    if n_pairs == 0:
        raise ValueError("no pairs to weigh")
    if pair_weighting == "per_pair":
        return torch.full((n_pairs,), 1.0 / n_pairs)
    counts = torch.bincount(prompt)
    n_prompts = int((counts > 0).sum())
    return 1.0 / (n_prompts * counts[prompt].to(torch.float32))


def ranking_loss(rewards: torch.Tensor, pairs: PairIndex, *, margin: float | torch.Tensor = 0.0,
                 pair_weighting: str = "per_prompt", center_coef: float = 0.0) -> torch.Tensor:
    """The InstructGPT reward-model loss (Ouyang et al. 2022, eq. 1) on a flattened batch.

    ``rewards``: ``[N]``, one scalar per completion (every completion of every prompt, one forward).
    Returns ``sum_p w_p * -log sigmoid(r_w(p) - r_l(p) - margin_p) + center_coef * mean(r^2)`` with the
    weights of :func:`pair_weights`.
    """
    if rewards.dim() != 1:
        raise ValueError(f"rewards must be 1-D [N], got shape {tuple(rewards.shape)}")
    logits = pair_margins(rewards, pairs.winner, pairs.loser).float() - margin
    weights = pair_weights(pairs.prompt, pair_weighting).to(logits.device)
    loss = -(F.logsigmoid(logits) * weights).sum()
    if center_coef:
        loss = loss + center_coef * rewards.float().pow(2).mean()
    return loss


def pairwise_accuracy(margins: torch.Tensor) -> torch.Tensor:
    """Share of pairs the rewards order like the ranking; an exact tie counts as half right."""
    return ((margins > 0).float() + 0.5 * (margins == 0).float()).mean()


def calibration_table(margins: torch.Tensor, n_bins: int = 10) -> dict:
    """How well ``sigmoid(r_w - r_l)`` predicts the labelers' choice (a reliability diagram).

    The model's confidence in its own preferred completion, ``max(p, 1 - p)`` with
    ``p = sigmoid(margin)``, lies in [0.5, 1]; it is binned into ``n_bins`` equal bins, and each bin's
    mean confidence is set against its observed accuracy (the share of pairs where the model's
    preferred completion is the labelers'). A calibrated model has ``accuracy == confidence`` in every
    bin. ``ece`` is the expected calibration error: the pair-weighted mean of ``|accuracy - confidence|``.
    """
    margins = margins.detach().float().flatten().cpu()
    confidence = torch.sigmoid(margins.abs())
    correct = (margins > 0).float() + 0.5 * (margins == 0).float()
    edges = torch.linspace(0.5, 1.0, n_bins + 1)
    position = torch.bucketize(confidence, edges[1:-1], right=True)
    bins, ece = [], 0.0
    for b in range(n_bins):
        chosen = position == b
        count = int(chosen.sum())
        row = {"lower": round(float(edges[b]), 6), "upper": round(float(edges[b + 1]), 6), "count": count,
               "confidence": None, "accuracy": None}
        if count:
            row["confidence"] = float(confidence[chosen].mean())
            row["accuracy"] = float(correct[chosen].mean())
            ece += count * abs(row["accuracy"] - row["confidence"])
        bins.append(row)
    n = margins.numel()
    return {"pairs": n, "ece": ece / n if n else None, "bins": bins}


def pearson(x: torch.Tensor, y: torch.Tensor, eps: float = 1e-8) -> torch.Tensor:
    """The Pearson correlation of two ``[N]`` vectors (0 where either is constant)."""
    x, y = x.float() - x.float().mean(), y.float() - y.float().mean()
    return (x * y).sum() / (x.norm() * y.norm() + eps)


def length_disentangle_loss(quality: torch.Tensor, length_reward: torch.Tensor, lengths: torch.Tensor,
                            sign: float = 1.0) -> torch.Tensor:
    """ODIN's length loss (Chen et al. 2024) ``|rho(r_Q, L)| - sign * rho(r_L, L)`` over a batch's completions.

    Minimising it drives the quality head's rewards to be uncorrelated with the completions' lengths and the
    length head's to be correlated with them, in the direction ``sign`` (1: the labels favour longer replies,
    -1: shorter ones; see :func:`length_preference_sign`).
    """
    return pearson(quality, lengths).abs() - sign * pearson(length_reward, lengths)


def length_preference_sign(length_gaps: Sequence[float]) -> float:
    """1.0 when the winners of the training pairs are longer on average (``length_gaps``: each pair's winner
    length minus loser length), -1.0 when they are shorter (0 counts as longer, ODIN's case)."""
    return 1.0 if sum(length_gaps) >= 0 else -1.0


def head_orthogonality(weight: torch.Tensor) -> torch.Tensor:
    """ODIN's orthogonality loss ``|W_Q . W_L|`` for a two-output head's weight ``[2, H]`` (row 0: quality,
    row 1: length), so that the two heads read different directions of the shared features."""
    if weight.dim() != 2 or weight.shape[0] != 2:
        raise ValueError(f"expected a [2, H] head weight, got shape {tuple(weight.shape)}")
    return (weight[0].float() * weight[1].float()).sum().abs()
