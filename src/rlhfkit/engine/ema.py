"""An exponential moving average of a model's trainable weights, kept beside training (Polyak averaging)."""

from __future__ import annotations

import copy

import torch


class WeightAverage:
    """``average <- decay * average + (1 - decay) * weights`` over ``module``'s trainable parameters, by name.

    Call :meth:`update` after every optimizer step. :meth:`state_dict` / :meth:`load_state_dict` are the
    averaged tensors themselves (what a checkpoint keeps), and :meth:`averaged_copy` is the module with them.
    """

    def __init__(self, module: torch.nn.Module, decay: float):
        if not 0.0 < decay < 1.0:
            raise ValueError(f"an EMA decay lies in (0, 1), got {decay}")
        self.decay = decay
        self.weights = {name: p.detach().clone() for name, p in module.named_parameters() if p.requires_grad}

    @torch.no_grad()
    def update(self, module: torch.nn.Module) -> None:
        for name, param in module.named_parameters():
            if name in self.weights:
                self.weights[name].lerp_(param.detach(), 1.0 - self.decay)

    def state_dict(self) -> dict[str, torch.Tensor]:
        return self.weights

    def load_state_dict(self, weights: dict[str, torch.Tensor]) -> None:
        if weights.keys() != self.weights.keys():
            raise ValueError(f"the saved EMA holds {sorted(weights.keys() ^ self.weights.keys())[:5]} the model "
                             "does not (or lacks them)")
        self.weights = weights

    def averaged_copy(self, module: torch.nn.Module) -> torch.nn.Module:
        """A copy of ``module`` with the averaged weights in place of its trainable ones."""
        averaged = copy.deepcopy(module)
        averaged.load_state_dict(self.weights, strict=False)
        return averaged
