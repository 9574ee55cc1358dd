"""Batched sampling from a causal LM: left padding, KV cache, temperature / top-k / top-p, stop at EOS or a
stop string. :func:`sample` samples a batch of prompts, as token tensors (PPO's rollout and :func:`generate`
use it): with rlhfkit's own decoding loop (:mod:`rlhfkit.rollout.decode`: one prompt forward per distinct
prompt, finished rows dropped from the batch) where it applies, else one HF ``generate`` call;
:func:`generate` and :func:`generate_k` return decoded texts."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from transformers import PreTrainedTokenizerBase

from rlhfkit.algorithms.logprobs import logprobs_of
from rlhfkit.data.collators import Example, PadCollator, encode_prompt
from rlhfkit.data.records import Prompt
from rlhfkit.rollout.decode import Sampler, decode, unsupported_reason


@dataclass(frozen=True)
class SamplingConfig:
    """How to sample; ``temperature == 0`` means greedy decoding, ``top_k == 0`` no top-k (the whole distribution, as
    TRL's configs and HF's ``generate`` read 0; ``generate`` given no top-k would keep the 50 likeliest tokens)."""

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
        return {"do_sample": True, "temperature": self.temperature, "top_k": self.top_k, "top_p": self.top_p, **stop}

    @property
    def sampler(self) -> Sampler:
        """How rlhfkit's decoding loop draws each token: what ``generate`` draws with :meth:`generate_kwargs`
        (every setting given, so a model's generation config changes nothing)."""
        if self.temperature == 0:
            return Sampler(greedy=True)
        return Sampler(False, self.temperature, self.top_k, self.top_p)


@dataclass(frozen=True)
class SampledTokens:
    """A batch of prompts and what was sampled after them: ``queries`` ``[N, Q]`` left-padded with their
    ``query_mask``, ``responses`` ``[N, R]`` (padded after a row's end), with ``return_logits`` the
    ``logits`` ``[N, R, V]`` each response token was sampled from (before the temperature), with
    ``return_logprobs`` the ``logprobs`` ``[N, R]`` of each response token under those logits divided by the
    temperature (1 when greedy); ``path`` is ``"decode"`` (rlhfkit's loop) or ``"generate"`` (HF), and
    ``prompt_rows`` / ``decode_rows`` count the rows of the prompt forward and of the decode-step forwards."""

    queries: torch.Tensor
    query_mask: torch.Tensor
    responses: torch.Tensor
    logits: torch.Tensor | None
    logprobs: torch.Tensor | None = None
    path: str = "generate"
    prompt_rows: int = 0
    decode_rows: int = 0


def stop_string_check(tokenizer: PreTrainedTokenizerBase, stop_strings: Sequence[str],
                      prompts: Sequence[list[int]]) -> Callable | None:
    """``stopped(row, token_ids)``: whether one of ``stop_strings`` ends inside the text of the response
    ``token_ids`` after prompt ``prompts[row]`` (token ids): as HF's ``StopStringCriteria``, a stop string may
    begin in the prompt's last tokens. None without stop strings."""
    if not stop_strings:
        return None
    tail = max(len(s) for s in stop_strings)  # tokens: each holds at least one character
    tails = [ids[-tail:] for ids in prompts]
    prefixes = [len(tokenizer.decode(ids)) for ids in tails]

    def stopped(row: int, ids: list[int]) -> bool:
        text = tokenizer.decode(tails[row] + ids)
        return any(text.find(s, max(0, prefixes[row] - len(s) + 1)) >= 0 for s in stop_strings)

    return stopped


def sample(generate_fn: Callable, tokenizer: PreTrainedTokenizerBase, prompts: Sequence[Prompt],
           sampling: SamplingConfig, *, device: torch.device | str = "cpu", max_prompt_length: int | None = None,
           return_logits: bool = False, return_logprobs: bool = False, policy_call: Callable | None = None,
           **options) -> SampledTokens:
    """Sample after ``prompts``, each keeping its last ``max_prompt_length`` tokens.

    With ``policy_call`` (``policy_call(fn)`` runs ``fn(policy)``: through a wrapper's forward where there is
    one), no ``return_logits`` and no ``options``, with :func:`rlhfkit.rollout.decode.decode` where the policy
    allows it (:func:`rlhfkit.rollout.decode.unsupported_reason`; its cache is checked after the prompt forward);
    otherwise with one call of ``generate_fn`` (a model's ``generate``, or a wrapper that runs it), ``options``
    passed to it as they are."""
    encoded = [encode_prompt(tokenizer, p) for p in prompts]
    if max_prompt_length:
        encoded = [ids[-max_prompt_length:] for ids in encoded]
    batch = PadCollator(tokenizer.pad_token_id, padding_side="left")([Example(ids, [0] * len(ids)) for ids in encoded])
    queries, query_mask = batch["input_ids"].to(device), batch["attention_mask"].to(device)
    logprob_temperature = sampling.temperature or 1.0
    if policy_call is not None and not return_logits:
        def run(policy):
            if unsupported_reason(policy, options) is not None:
                return None
            return decode(policy, queries, query_mask, sampling.sampler, max_new_tokens=sampling.max_new_tokens,
                          eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
                          logprob_temperature=logprob_temperature,
                          stopped=stop_string_check(tokenizer, sampling.stop_strings, encoded))

        decoded = policy_call(run)
        if decoded is not None:
            return SampledTokens(queries, query_mask, decoded.responses, None,
                                 decoded.logprobs if return_logprobs else None, "decode", decoded.prompt_rows,
                                 decoded.decode_rows)
    keep_logits = return_logits or return_logprobs
    out = generate_fn(input_ids=queries, attention_mask=query_mask, max_new_tokens=sampling.max_new_tokens,
                      pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id,
                      return_dict_in_generate=True, output_logits=keep_logits,
                      **sampling.generate_kwargs(tokenizer), **options)
    responses = out.sequences[:, queries.size(1):]
    logits = torch.stack(out.logits, dim=1)[:, :responses.size(1)] if keep_logits else None
    logprobs = logprobs_of(logits, responses, logprob_temperature) if return_logprobs else None
    n = queries.size(0)
    return SampledTokens(queries, query_mask, responses, logits if return_logits else None, logprobs, "generate",
                         n, n * max(responses.size(1) - 1, 0))


@dataclass(frozen=True)
class Generation:
    """One sampled completion: its text, token ids, and whether it ended with EOS."""

    text: str
    token_ids: list[int]
    finished: bool


@torch.no_grad()
def generate(model, tokenizer: PreTrainedTokenizerBase, prompts: Sequence[Prompt],
             sampling: SamplingConfig = SamplingConfig(), *, seed: int | None = None,
             use_decode: bool = True, **options) -> list[Generation]:
    """Sample one completion per prompt, in prompt order, in batches of ``sampling.batch_size`` (each a
    :func:`sample`: rlhfkit's decoding loop where it applies and ``use_decode``, else HF ``generate``;
    ``options`` go to :func:`sample`, e.g. ``synced_gpus`` for a model sharded by FSDP)."""
    if seed is not None:
        torch.manual_seed(seed)
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    results: list[Generation] = []
    for start in range(0, len(prompts), sampling.batch_size):
        sampled = sample(model.generate, tokenizer, prompts[start:start + sampling.batch_size], sampling,
                         device=device, policy_call=(lambda fn: fn(model)) if use_decode else None, **options)
        for row in sampled.responses.tolist():
            finished = tokenizer.eos_token_id in row
            ids = row[:row.index(tokenizer.eos_token_id)] if finished else row
            results.append(Generation(tokenizer.decode(ids, skip_special_tokens=True).strip(), ids, finished))
    model.train(was_training)
    return results


def generate_k(model, tokenizer: PreTrainedTokenizerBase, prompts: Sequence[Prompt], k: int,
               sampling: SamplingConfig = SamplingConfig(), *, seed: int | None = None,
               use_decode: bool = True, **options) -> list[list[Generation]]:
    """``k`` sampled completions per prompt (for labelers to rank), grouped by prompt, in prompt order
    (``options``: those of :func:`generate`).

    Each prompt is repeated ``k`` times in the batches, so its samples are independent draws (rlhfkit's
    decoding loop runs one prompt forward for a prompt's rows in a batch and repeats its cache).
    """
    if k < 1:
        raise ValueError(f"k must be at least 1, got {k}")
    flat = generate(model, tokenizer, [p for p in prompts for _ in range(k)], sampling, seed=seed,
                    use_decode=use_decode, **options)
    return [flat[i * k:(i + 1) * k] for i in range(len(prompts))]
