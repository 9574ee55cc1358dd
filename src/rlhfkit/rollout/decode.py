"""rlhfkit's own decoding loop over a causal LM's forward and its KV cache (``DynamicCache``), for the rollout.

It samples what HF ``generate`` samples (same position ids, same masks, same temperature / top-k / top-p
maths, greedy token-for-token the same), with less work:

* **The prompt's cache is computed once per distinct prompt.** Consecutive identical rows of a batch (the K
  samples of a prompt: GRPO / RLOO groups, ``rlhfkit sample --k``, best-of-n) share one prompt forward; its
  cache and last logits are repeated for their rows (``index_select`` on the batch dimension) before the
  first token is drawn.
* **Finished rows leave the batch.** A row that emitted EOS (or whose text now holds a stop string) is
  removed from the decode batch and from every layer of the cache, so later steps run only the rows still
  going, instead of decoding padding until the longest sample ends.

It also keeps each sampled token's log-prob under the temperature-scaled logits (what
:func:`rlhfkit.algorithms.logprobs.logprobs_of` computes from ``generate``'s logits), so the rollout needs
neither a second forward nor the ``[N, R, V]`` logits.

Where it does not apply, :func:`rlhfkit.rollout.generate.sample` falls back to HF ``generate``
(:func:`unsupported_reason` says why): encoder-decoder models; a model generation config that asks for more
than temperature / top-k / top-p (repetition penalty, minimum length, banned words, ...); ``generate`` options
such as ``synced_gpus`` (FSDP: every process must run the same number of forwards, which dropping rows breaks);
and a model whose forward returns a cache other than a plain ``DynamicCache`` of full or sliding-window
layers (static, quantized, offloaded, linear-attention / recurrent caches), which :func:`decode` detects after
the prompt forward and reports by returning None.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from dataclasses import dataclass

import torch
from transformers import DynamicCache

try:  # transformers >= 4.56: a cache is a list of layers
    from transformers.cache_utils import DynamicLayer, DynamicSlidingWindowLayer
    INDEXABLE_LAYERS: tuple[type, ...] | None = (DynamicLayer, DynamicSlidingWindowLayer)
except ImportError:  # older: a DynamicCache keeps lists of key and value tensors
    INDEXABLE_LAYERS = None

# what a model's generation config may set for this loop to sample what ``generate`` samples
HANDLED_GENERATION_KEYS = {"bos_token_id", "eos_token_id", "pad_token_id", "decoder_start_token_id", "do_sample",
                           "temperature", "top_k", "top_p", "max_length", "max_new_tokens", "use_cache",
                           "cache_implementation", "transformers_version", "_from_model_config"}
# settings whose value here changes nothing in what is sampled
NEUTRAL_GENERATION_SETTINGS = {"output_attentions": False, "output_hidden_states": False, "output_scores": False,
                               "output_logits": False, "return_dict_in_generate": False, "num_beams": 1,
                               "num_return_sequences": 1, "repetition_penalty": 1.0, "min_length": 0,
                               "no_repeat_ngram_size": 0, "typical_p": 1.0, "length_penalty": 1.0,
                               "early_stopping": False, "renormalize_logits": False}


def filter_logits(logits: torch.Tensor, temperature: float = 1.0, top_k: int = 0, top_p: float = 1.0) -> torch.Tensor:
    """The logits ``[B, V]`` a token is sampled from, as HF's warpers compute them, in their order: divided by
    ``temperature`` (unless 1), then all but the ``top_k`` largest set to ``-inf`` (ties with the k-th kept;
    0: no top-k), then, over what is left, the smallest tokens whose cumulated probability (summed from the
    least likely up) stays at or below ``1 - top_p`` set to ``-inf``, always keeping the most likely token
    (1: no top-p)."""
    if temperature != 1.0:
        logits = logits / temperature
    if top_k:
        kth = torch.topk(logits, min(top_k, logits.size(-1))).values[..., -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p < 1.0:
        ascending, order = torch.sort(logits, descending=False)
        cumulative = ascending.softmax(-1).cumsum(-1)
        remove = cumulative <= 1 - top_p
        remove[..., -1:] = False
        logits = logits.masked_fill(remove.scatter(-1, order, remove), float("-inf"))
    return logits


@dataclass(frozen=True)
class Sampler:
    """The settings a token is drawn with: greedy (argmax), or a multinomial draw from
    :func:`filter_logits` with ``temperature``, ``top_k`` and ``top_p``."""

    greedy: bool
    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0

    def __call__(self, logits: torch.Tensor) -> torch.Tensor:
        """One token per row of the float32 ``logits`` ``[B, V]``: ``[B]``."""
        if self.greedy:
            return logits.argmax(-1)
        probs = filter_logits(logits, self.temperature, self.top_k, self.top_p).softmax(-1)
        return torch.multinomial(probs, num_samples=1).squeeze(1)


def unsupported_reason(model, options: dict) -> str | None:
    """Why :func:`decode` cannot stand in for ``model.generate`` called with ``options`` (None: it can)."""
    config = getattr(model, "config", None)
    if config is None or getattr(config, "is_encoder_decoder", False):
        return "an encoder-decoder (or config-less) model"
    asked = sorted(name for name, value in options.items() if not (name == "synced_gpus" and not value))
    if asked:
        return f"generate options {asked}"
    generation_config = getattr(model, "generation_config", None)
    settings = generation_config.to_diff_dict() if generation_config is not None else {}
    extra = {name for name, value in settings.items() if name not in HANDLED_GENERATION_KEYS and value is not None
             and NEUTRAL_GENERATION_SETTINGS.get(name, object()) != value}
    if extra:
        return f"the model's generation config sets {sorted(extra)}"
    if generation_config is not None and generation_config.cache_implementation not in (None, "dynamic"):
        return f"the model's generation config asks for a {generation_config.cache_implementation} cache"
    return None


def _indexable(cache) -> bool:
    """Whether ``cache`` is a plain ``DynamicCache`` whose layers keep ``[B, H, T, D]`` keys and values that
    can be indexed on the batch dimension."""
    if type(cache) is not DynamicCache:
        return False
    return INDEXABLE_LAYERS is None or all(type(layer) in INDEXABLE_LAYERS for layer in cache.layers)


def _new_cache(model) -> DynamicCache:
    try:
        return DynamicCache(config=model.config)  # sliding-window layers where the model has them
    except TypeError:  # transformers before 4.56
        return DynamicCache()


def _forward_keywords(model) -> tuple[str, bool]:
    """The name of the cache argument of ``model``'s forward (``cache`` since transformers 5.2x, before it
    ``past_key_values``) and whether the forward takes ``logits_to_keep``."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model  # a PEFT model's own forward
    parameters = inspect.signature(base.forward).parameters
    return ("cache" if "cache" in parameters else "past_key_values"), "logits_to_keep" in parameters


def _returned_cache(out):
    """The cache a forward returned (``cache``, or ``past_key_values`` before transformers 5.2x)."""
    cache = getattr(out, "cache", None)
    return cache if cache is not None else getattr(out, "past_key_values", None)


@dataclass(frozen=True)
class Decoded:
    """What :func:`decode` sampled: ``responses`` ``[N, R]`` (``pad_token_id`` after a row's end; R the longest
    row), ``logprobs`` ``[N, R]`` of each sampled token under the logits divided by the temperature (0 after a
    row's end), and the work done: ``prompt_rows`` (rows of the prompt forward) and ``decode_rows`` (rows
    summed over the decode-step forwards)."""

    responses: torch.Tensor
    logprobs: torch.Tensor
    prompt_rows: int
    decode_rows: int


def repeat_groups(queries: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The first row of each run of identical consecutive rows of ``queries`` ``[N, Q]``, and for each row the
    index of its run: ``(firsts [U], expand [N])``, so ``queries[firsts][expand]`` equals ``queries``."""
    starts = torch.ones(queries.size(0), dtype=torch.bool, device=queries.device)
    starts[1:] = (queries[1:] != queries[:-1]).any(-1)
    return starts.nonzero().squeeze(1), starts.long().cumsum(0) - 1


@torch.no_grad()
def decode(model, queries: torch.Tensor, query_mask: torch.Tensor, sampler: Sampler, *, max_new_tokens: int,
           eos_token_id: int | None, pad_token_id: int, logprob_temperature: float = 1.0,
           stopped: Callable[[int, list[int]], bool] | None = None) -> Decoded | None:
    """Sample up to ``max_new_tokens`` after each left-padded row of ``queries`` / ``query_mask`` with
    ``model``'s forward and a ``DynamicCache``: one prompt forward per run of identical rows, then one forward
    per step over the rows still going. A row ends at EOS or when ``stopped(row, its token ids)`` says so (its
    last token kept). Returns None, before any token is drawn, when the model's forward does not keep a cache
    this loop can index (the caller then runs ``generate``)."""
    n = queries.size(0)
    firsts, expand = repeat_groups(queries)
    unique_mask = query_mask[firsts]
    positions = (unique_mask.long().cumsum(-1) - 1).masked_fill(unique_mask == 0, 0)
    cache_keyword, logits_to_keep = _forward_keywords(model)
    extra = {"logits_to_keep": 1} if logits_to_keep else {}
    out = model(input_ids=queries[firsts], attention_mask=unique_mask, position_ids=positions,
                use_cache=True, **{cache_keyword: _new_cache(model)}, **extra)
    cache = _returned_cache(out)
    if not _indexable(cache):
        return None
    if firsts.numel() != n:
        cache.batch_select_indices(expand)
    logits = out.logits[:, -1].float()[expand]
    mask, next_position = query_mask, positions[:, -1][expand] + 1
    rows = torch.arange(n, device=queries.device)  # the output row of each row still in the batch
    responses = torch.full((n, max_new_tokens), pad_token_id, dtype=torch.long, device=queries.device)
    logprobs = torch.zeros(n, max_new_tokens, device=queries.device)
    width, decode_rows = 0, 0
    for step in range(max_new_tokens):
        tokens = sampler(logits)
        scaled = logits if logprob_temperature == 1.0 else logits / logprob_temperature
        responses[rows, step] = tokens
        logprobs[rows, step] = scaled.log_softmax(-1).gather(-1, tokens.unsqueeze(-1)).squeeze(-1)
        width = step + 1
        done = tokens == eos_token_id if eos_token_id is not None else torch.zeros_like(tokens, dtype=torch.bool)
        if stopped is not None:
            done |= torch.tensor([stopped(int(r), responses[r, :width].tolist()) for r in rows.tolist()],
                                 dtype=torch.bool, device=done.device)
        if step == max_new_tokens - 1 or bool(done.all()):
            break
        if bool(done.any()):
            keep = (~done).nonzero().squeeze(1)
            cache.batch_select_indices(keep)
            rows, tokens, mask, next_position = rows[keep], tokens[keep], mask[keep], next_position[keep]
        mask = torch.cat([mask, mask.new_ones(mask.size(0), 1)], dim=1)
        out = model(input_ids=tokens.unsqueeze(1), attention_mask=mask, position_ids=next_position.unsqueeze(1),
                    use_cache=True, **{cache_keyword: cache})
        decode_rows += rows.numel()
        cache, logits, next_position = _returned_cache(out), out.logits[:, -1].float(), next_position + 1
    return Decoded(responses[:, :width], logprobs[:, :width], firsts.numel(), decode_rows)
