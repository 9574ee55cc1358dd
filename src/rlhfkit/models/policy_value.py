"""The policy and its value network as the one module PPO trains, and their forwards on a rollout.

A rollout batch is a dict of ``queries`` ``[N, Q]`` (left-padded prompts) with ``query_mask``, and
``responses`` ``[N, R]`` (right-padded) with ``response_mask``; every forward here returns per-response-token
tensors ``[N, R]``. The value network is a linear head on the policy's last hidden state (``value_model:
head``), or a reward-model-shaped network whose score head is applied to every response position (``value_model:
reward``: InstructGPT initialises the value function from the reward model).
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import torch

from rlhfkit.algorithms.logprobs import logprobs_of
from rlhfkit.config import ConfigError
from rlhfkit.models.load import position_ids_from_mask

VALUE_DIR = "value_model"  # a reward-model-shaped value network's directory in a checkpoint


def value_network(kind: str, policy: torch.nn.Module, reward_model: str | None) -> torch.nn.Module:
    """A fresh value network: ``kind="head"`` a :class:`ValueHead` on ``policy``'s hidden size; ``"reward"`` the
    reward model in ``reward_model`` (InstructGPT's initialisation; the config requires one for this kind), which
    must be a decoder with a ``score`` head (applied to every response position by :func:`value_forward`)."""
    if kind == "head":
        return ValueHead(policy.config.hidden_size)
    from transformers import AutoModelForSequenceClassification

    value = AutoModelForSequenceClassification.from_pretrained(reward_model)
    if not hasattr(value, "score"):
        raise ConfigError("ppo.value_model=reward needs a decoder reward model with a `score` head; "
                          "use ppo.value_model=head")
    return value


class ValueHead(torch.nn.Module):
    """A linear value head on the policy's last hidden state (``value_model: head``)."""

    def __init__(self, hidden_size: int):
        super().__init__()
        self.linear = torch.nn.Linear(hidden_size, 1)
        torch.nn.init.normal_(self.linear.weight, std=1.0 / math.sqrt(hidden_size + 1))
        torch.nn.init.zeros_(self.linear.bias)

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.linear(hidden).squeeze(-1)


def _sequence_inputs(queries, query_mask, responses, response_mask):
    input_ids = torch.cat([queries, responses], dim=1)
    attention_mask = torch.cat([query_mask, response_mask], dim=1)
    return input_ids, attention_mask, position_ids_from_mask(attention_mask)


def policy_forward(policy, batch: dict[str, torch.Tensor], temperature: float, *, hidden: bool = False):
    """Log-probs ``[N, R]`` of the response tokens under ``policy`` (at the sampling temperature),
    the logits that gave them, and the hidden states before each response token when asked.

    Only the last ``R + 1`` positions are turned into logits (``logits_to_keep``): the prompt's
    vocabulary projections are never computed.
    """
    input_ids, attention_mask, position_ids = _sequence_inputs(
        batch["queries"], batch["query_mask"], batch["responses"], batch["response_mask"])
    width = batch["responses"].size(1)
    out = policy(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids, use_cache=False,
                 logits_to_keep=width + 1, output_hidden_states=hidden)
    logits = out.logits[:, :-1] / temperature
    states = out.hidden_states[-1][:, -width - 1:-1] if hidden else None
    return logprobs_of(logits, batch["responses"]), logits, states


def value_forward(value_model, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """Per-token values ``[N, R]`` from a reward-model-shaped network: its score head applied to the
    hidden state before each response token (InstructGPT initialises the value function from the RM)."""
    input_ids, attention_mask, position_ids = _sequence_inputs(
        batch["queries"], batch["query_mask"], batch["responses"], batch["response_mask"])
    trunk = getattr(value_model, value_model.base_model_prefix)
    width = batch["responses"].size(1)
    states = trunk(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                   use_cache=False).last_hidden_state[:, -width - 1:-1]
    return value_model.score(states).squeeze(-1).float()


class PolicyAndValue(torch.nn.Module):
    """The trained networks, the policy and the value network (a :class:`ValueHead`, a reward-model-shaped
    network, or None), as the one module accelerate prepares with the optimizer.

    Every use of them is a call of this module, ``networks(task, ...)``, which runs the method ``task``
    (:meth:`generate`, :meth:`with_policy`, :meth:`policy_outputs`, :meth:`values`, :meth:`lm_logits`) inside
    ``forward``, so that the engine's hooks see every call: FSDP2 (which accelerate applies to one model per
    optimizer) gathers a unit's parameters in the hooks of its forward, so a call past it (``generate``, a
    value network's trunk) would meet the root's parameters as shards; DDP averages the gradients of whatever
    a call through its forward used, the value network's included.
    """

    def __init__(self, policy: torch.nn.Module, value: torch.nn.Module | None):
        super().__init__()
        self.policy, self.value = policy, value
        # the layer classes FSDP's TRANSFORMER_BASED_WRAP shards as units of their own
        self._no_split_modules = sorted({name for network in (policy, value)
                                         for name in getattr(network, "_no_split_modules", None) or []})

    def forward(self, task: str, *args, **kwargs):
        return getattr(self, task)(*args, **kwargs)

    def generate(self, **kwargs):
        """``generate`` of the policy (with ``synced_gpus`` under FSDP: see :mod:`rlhfkit.rollout.experience`)."""
        return self.policy.generate(**kwargs)

    def with_policy(self, fn, *args, **kwargs):
        """``fn(policy, *args, **kwargs)``: a function of the policy (rlhfkit's decoding loop) run inside this
        module's forward, as :meth:`generate` is."""
        return fn(self.policy, *args, **kwargs)

    def policy_outputs(self, batch: dict[str, torch.Tensor], temperature: float, *, hidden: bool = False):
        """:func:`policy_forward` of the policy."""
        return policy_forward(self.policy, batch, temperature, hidden=hidden)

    def values(self, batch: dict[str, torch.Tensor], states: torch.Tensor | None = None) -> torch.Tensor:
        """Per-token values ``[N, R]``: the value head on the policy's ``states`` (from :meth:`policy_outputs`
        with ``hidden=True``), or :func:`value_forward` of a reward-model-shaped value network."""
        if isinstance(self.value, ValueHead):
            return self.value(states.float())
        return value_forward(self.value, batch)

    def lm_logits(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """The policy's logits on pretraining text (PPO-ptx)."""
        return self.policy(input_ids=input_ids, attention_mask=attention_mask, use_cache=False).logits

    def save_value(self, directory: Path, weights: dict[str, torch.Tensor] | None) -> dict[str, Any]:
        """Save the value network with a checkpoint in ``directory`` from ``weights`` (its full state dict gathered
        under FSDP, else None: its own): a reward-model-shaped network in ``value_model/``, a value head as the
        returned ``{"value_head": weights}`` entry of the checkpoint's state file."""
        if isinstance(self.value, ValueHead):
            return {"value_head": weights if weights is not None else self.value.state_dict()}
        if self.value is not None:
            self.value.save_pretrained(directory / VALUE_DIR, state_dict=weights)
        return {}
