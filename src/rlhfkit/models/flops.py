"""Model FLOPs of a transformer's forward and training passes, for model-FLOP utilisation (MFU).

The count of Kaplan et al. 2020 ("Scaling laws for neural language models", section 2.1) and of
Chowdhery et al. 2022 (PaLM, appendix B): a forward pass costs, per sequence of ``T`` tokens,

    2 * N * T          (every weight of a matmul: one multiply and one add per token; a head that reads
                        one token per sequence, like BERT's pooler, is over-counted, a small error)
  + 4 * L * d * T^2    (attention scores Q K^T and their weighted sum of V, in each of the L layers)

where ``N`` counts the weights of the model's matmuls (``nn.Linear`` layers, the LM head included,
embedding look-ups excluded) and ``d`` is the attention width (heads x head size). A training pass
(forward + backward) costs three times that. These are *model* FLOPs: the work the model needs for its
real tokens, not what a kernel spends on padding, re-computation (gradient checkpointing) or masked-out
attention entries, so that MFU compares implementations on the same useful work.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch

#: a backward pass costs two forward passes (the gradients of the inputs and of the weights)
TRAINING_MULTIPLIER = 3


def matmul_parameters(model: torch.nn.Module) -> int:
    """Weights of the model's ``nn.Linear`` layers (a tied LM head counted: it is a matmul per token)."""
    return sum(module.weight.numel() for module in model.modules() if isinstance(module, torch.nn.Linear))


def attention_shape(config) -> tuple[int, int]:
    """(layers, attention width) of a Hugging Face transformer config (Llama-, GPT-2- and BERT-style names)."""
    layers = getattr(config, "num_hidden_layers", None) or config.n_layer
    heads = getattr(config, "num_attention_heads", None) or config.n_head
    hidden = getattr(config, "hidden_size", None) or config.n_embd
    head_dim = getattr(config, "head_dim", None) or hidden // heads
    return int(layers), int(heads * head_dim)


def forward_flops(n_matmul: int, layers: int, attention_width: int, lengths: Iterable[int]) -> float:
    """Model FLOPs of one forward pass over sequences of the given real (non-padding) lengths."""
    return float(sum(2 * n_matmul * t + 4 * layers * attention_width * t * t for t in lengths))


class FlopModel:
    """The FLOP count of one model: ``forward(lengths)`` and ``training(lengths)`` for a batch's sequences."""

    def __init__(self, model: torch.nn.Module):
        base = model.get_base_model() if hasattr(model, "get_base_model") else model
        self.n_matmul = matmul_parameters(base)
        self.layers, self.attention_width = attention_shape(base.config)

    def forward(self, lengths: Iterable[int]) -> float:
        return forward_flops(self.n_matmul, self.layers, self.attention_width, lengths)

    def training(self, lengths: Iterable[int]) -> float:
        return TRAINING_MULTIPLIER * self.forward(lengths)


def lengths_of(attention_mask: torch.Tensor) -> list[int]:
    """Real tokens per row of a ``[B, T]`` 0/1 attention mask."""
    return attention_mask.sum(-1).tolist()
