"""Batched sampling from a causal LM: left padding, KV cache, temperature / top-k / top-p, stop at EOS."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from transformers import PreTrainedTokenizerBase

from rlhfkit.data.collators import Example, PadCollator, encode_prompt
from rlhfkit.data.records import Prompt


@dataclass(frozen=True)
class SamplingConfig:
    """How to sample; ``temperature == 0`` means greedy decoding."""

    max_new_tokens: int = 64
    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0
    batch_size: int = 16

    def generate_kwargs(self) -> dict:
        if self.temperature == 0:
            return {"do_sample": False}
        return {"do_sample": True, "temperature": self.temperature, "top_k": self.top_k or None,
                "top_p": self.top_p}


@dataclass(frozen=True)
class Generation:
    """One sampled completion: its text, token ids, and whether it ended with EOS."""

    text: str
    token_ids: list[int]
    finished: bool


@torch.no_grad()
def generate(model, tokenizer: PreTrainedTokenizerBase, prompts: Sequence[Prompt],
             sampling: SamplingConfig = SamplingConfig(), *, seed: int | None = None) -> list[Generation]:
    """Sample one completion per prompt, in prompt order, in batches of ``sampling.batch_size``."""
    if seed is not None:
        torch.manual_seed(seed)
    collate = PadCollator(tokenizer.pad_token_id, padding_side="left")
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    results: list[Generation] = []
    for start in range(0, len(prompts), sampling.batch_size):
        encoded = [encode_prompt(tokenizer, p) for p in prompts[start:start + sampling.batch_size]]
        batch = collate([Example(ids, [0] * len(ids)) for ids in encoded])
        output = model.generate(input_ids=batch["input_ids"].to(device),
                                attention_mask=batch["attention_mask"].to(device),
                                max_new_tokens=sampling.max_new_tokens, pad_token_id=tokenizer.pad_token_id,
                                eos_token_id=tokenizer.eos_token_id, **sampling.generate_kwargs())
        for row in output[:, batch["input_ids"].size(1):].tolist():
            finished = tokenizer.eos_token_id in row
            ids = row[:row.index(tokenizer.eos_token_id)] if finished else row
            results.append(Generation(tokenizer.decode(ids, skip_special_tokens=True).strip(), ids, finished))
    model.train(was_training)
    return results


def generate_k(model, tokenizer: PreTrainedTokenizerBase, prompts: Sequence[Prompt], k: int,
               sampling: SamplingConfig = SamplingConfig(), *, seed: int | None = None) -> list[list[Generation]]:
    """``k`` sampled completions per prompt (for labelers to rank), grouped by prompt, in prompt order.

    Each prompt is repeated ``k`` times in the batches, so its samples are independent draws.
    """
    if k < 1:
        raise ValueError(f"k must be at least 1, got {k}")
    flat = generate(model, tokenizer, [p for p in prompts for _ in range(k)], sampling, seed=seed)
    return [flat[i * k:(i + 1) * k] for i in range(len(prompts))]
