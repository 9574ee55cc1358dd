"""Batched sampling from a causal LM: left padding, KV cache, temperature / top-k / top-p, stop at EOS or a
stop string. :func:`sample` is one ``generate`` call on a batch of prompts, as token tensors (PPO's rollout
and :func:`generate` use it); :func:`generate` and :func:`generate_k` return decoded texts."""

from __future__ import annotations

from collections.abc import Callable, Sequence
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
    stop_strings: tuple[str, ...] = ()

    def generate_kwargs(self, tokenizer: PreTrainedTokenizerBase) -> dict:
        stop = {"stop_strings": list(self.stop_strings), "tokenizer": tokenizer} if self.stop_strings else {}
        if self.temperature == 0:
            return {"do_sample": False, **stop}
        return {"do_sample": True, "temperature": self.temperature, "top_k": self.top_k or None,
                "top_p": self.top_p, **stop}


@dataclass(frozen=True)
class SampledTokens:
    """A batch of prompts and what was sampled after them: ``queries`` ``[N, Q]`` left-padded with their
    ``query_mask``, ``responses`` ``[N, R]`` (padded after a row's end), and with ``return_logits`` the
    ``logits`` ``[N, R, V]`` each response token was sampled from (before the temperature)."""

    queries: torch.Tensor
    query_mask: torch.Tensor
    responses: torch.Tensor
    logits: torch.Tensor | None


def sample(generate_fn: Callable, tokenizer: PreTrainedTokenizerBase, prompts: Sequence[Prompt],
           sampling: SamplingConfig, *, device: torch.device | str = "cpu", max_prompt_length: int | None = None,
           return_logits: bool = False, **options) -> SampledTokens:
    """One call of ``generate_fn`` (a model's ``generate``, or a wrapper that runs it) on ``prompts``, each
    keeping its last ``max_prompt_length`` tokens; ``options`` go to ``generate`` as they are."""
    encoded = [encode_prompt(tokenizer, p) for p in prompts]
    if max_prompt_length:
        encoded = [ids[-max_prompt_length:] for ids in encoded]
    batch = PadCollator(tokenizer.pad_token_id, padding_side="left")([Example(ids, [0] * len(ids)) for ids in encoded])
    queries, query_mask = batch["input_ids"].to(device), batch["attention_mask"].to(device)
    out = generate_fn(input_ids=queries, attention_mask=query_mask, max_new_tokens=sampling.max_new_tokens,
                      pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id,
                      return_dict_in_generate=True, output_logits=return_logits,
                      **sampling.generate_kwargs(tokenizer), **options)
    responses = out.sequences[:, queries.size(1):]
    logits = torch.stack(out.logits, dim=1)[:, :responses.size(1)] if return_logits else None
    return SampledTokens(queries, query_mask, responses, logits)


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
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    results: list[Generation] = []
    for start in range(0, len(prompts), sampling.batch_size):
        sampled = sample(model.generate, tokenizer, prompts[start:start + sampling.batch_size], sampling,
                         device=device)
        for row in sampled.responses.tolist():
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
