"""rlhfkit's decoding loop (rollout/decode.py) against HF ``generate``: greedy token for token, sampled log-probs
against a separate forward, the filtering maths against hand-computed values and HF's warpers, the fallbacks."""

from __future__ import annotations

import math

import pytest
import torch
from transformers import GenerationConfig
from transformers.generation.logits_process import TemperatureLogitsWarper, TopKLogitsWarper, TopPLogitsWarper

from rlhfkit.models.build import build_causal_lm
from rlhfkit.models.policy_value import policy_forward
from rlhfkit.rollout.decode import Sampler, filter_logits, repeat_groups, unsupported_reason
from rlhfkit.rollout.experience import response_masks
from rlhfkit.rollout.generate import SamplingConfig, generate_k, sample


def stopping_model(tokenizer, eos_bias: float):
    """A tiny random Llama whose LM head favours EOS by ``eos_bias`` (so rows end at different steps)."""
    model = build_causal_lm(tokenizer, "tiny", seed=0)
    head = torch.nn.Linear(model.config.hidden_size, model.config.vocab_size, bias=True)
    with torch.no_grad():
        head.weight.copy_(model.get_input_embeddings().weight)
        head.bias.zero_()
        head.bias[tokenizer.eos_token_id] = eos_bias
    model.lm_head = head
    return model.eval()


def prompts_of(task, n: int, k: int) -> list[str]:
    """``n`` prompts of different lengths, each repeated ``k`` times (prompt-major)."""
    prompts = task.prompts(n, seed=3)
    prompts = [p + " and more" * i for i, p in enumerate(prompts)]  # varied lengths: left padding in play
    return [p for p in prompts for _ in range(k)]


def both(model, tokenizer, prompts, sampling, **kwargs):
    hf = sample(model.generate, tokenizer, prompts, sampling, **kwargs)
    own = sample(model.generate, tokenizer, prompts, sampling, policy_call=lambda fn: fn(model), **kwargs)
    assert (hf.path, own.path) == ("generate", "decode")
    return hf, own


@pytest.mark.parametrize("k", [1, 3])
@pytest.mark.parametrize("eos_bias", [0.0, 0.7])
def test_greedy_decoding_is_token_for_token_hf_generate(tokenizer, task, k, eos_bias):
    model = stopping_model(tokenizer, eos_bias)
    sampling = SamplingConfig(max_new_tokens=24, temperature=0)
    hf, own = both(model, tokenizer, prompts_of(task, 5, k), sampling)
    assert torch.equal(own.responses, hf.responses)
    lengths = response_masks(own.responses, tokenizer.eos_token_id, tokenizer.pad_token_id)[0].sum(-1)
    if eos_bias:  # rows finished at different steps, some before the longest: they left the batch
        assert len(set(lengths.tolist())) > 2 and int(lengths.min()) < own.responses.size(1)
        assert own.decode_rows == int((lengths - 1).sum()) < hf.decode_rows
    assert own.prompt_rows == 5 and hf.prompt_rows == 5 * k


@pytest.mark.parametrize("eos_bias", [0.0, 0.6])
def test_greedy_with_a_stop_string_matches_hf_generate(tokenizer, task, eos_bias):
    """Stop strings cut rows at different steps, and (with a model that repeats one token) one that begins in
    the prompt's last token stops a row at its first token, as HF's StopStringCriteria does."""
    model = stopping_model(tokenizer, eos_bias)
    prompts = prompts_of(task, 4, 2)
    free = sample(model.generate, tokenizer, prompts, SamplingConfig(max_new_tokens=20, temperature=0))
    texts = [tokenizer.decode(row[:10]) for row in free.responses[::2]]
    stops = tuple(text[len(text) // 2:len(text) // 2 + 2] for text in texts[:2])  # emitted half-way
    sampling = SamplingConfig(max_new_tokens=20, temperature=0, stop_strings=stops)
    hf, own = both(model, tokenizer, prompts, sampling)
    assert torch.equal(own.responses, hf.responses)
    assert own.decode_rows < hf.decode_rows or own.responses.size(1) == 1


@pytest.mark.parametrize("temperature,top_k,top_p", [(1.0, 0, 1.0), (0.7, 20, 0.9)])
def test_sampled_logprobs_equal_a_separate_forward(tokenizer, task, temperature, top_k, top_p):
    model = stopping_model(tokenizer, 2.0)
    torch.manual_seed(0)
    sampling = SamplingConfig(max_new_tokens=16, temperature=temperature, top_k=top_k, top_p=top_p)
    out = sample(model.generate, tokenizer, prompts_of(task, 4, 4), sampling, return_logprobs=True,
                 policy_call=lambda fn: fn(model))
    assert out.path == "decode"
    mask, finished = response_masks(out.responses, tokenizer.eos_token_id, tokenizer.pad_token_id)
    assert finished.any() and not finished.all() or len(set(mask.sum(-1).tolist())) > 1
    batch = {"queries": out.queries, "query_mask": out.query_mask, "responses": out.responses,
             "response_mask": mask}
    with torch.no_grad():
        full = policy_forward(model, batch, temperature)[0]
    assert torch.allclose(out.logprobs * mask, full * mask, atol=1e-5, rtol=0)
    # what the sampler kept is the only thing drawn: every sampled token is inside the filtered set
    assert bool((out.logprobs * mask > -math.inf).all())


def test_hf_path_logprobs_are_the_same_quantity(tokenizer, task):
    model = stopping_model(tokenizer, 2.0)
    sampling = SamplingConfig(max_new_tokens=12, temperature=0.8)
    torch.manual_seed(1)
    out = sample(model.generate, tokenizer, prompts_of(task, 3, 2), sampling, return_logprobs=True)
    mask = response_masks(out.responses, tokenizer.eos_token_id, tokenizer.pad_token_id)[0]
    batch = {"queries": out.queries, "query_mask": out.query_mask, "responses": out.responses, "response_mask": mask}
    with torch.no_grad():
        full = policy_forward(model, batch, 0.8)[0]
    assert out.path == "generate" and torch.allclose(out.logprobs * mask, full * mask, atol=1e-5, rtol=0)


def test_filter_logits_by_hand():
    logits = torch.tensor([[0.1, 0.2, 0.3, 0.4]]).log()
    inf = -math.inf
    # top-p 0.5: cumulated from the least likely, 0.1, 0.3 <= 0.5 are removed; 0.6 is not
    assert filter_logits(logits, top_p=0.5).exp()[0].tolist() == pytest.approx([0, 0, 0.3, 0.4])
    assert filter_logits(logits, top_p=0.75).exp()[0].tolist() == pytest.approx([0, 0.2, 0.3, 0.4])
    assert filter_logits(logits, top_p=0.01).exp()[0].tolist() == pytest.approx([0, 0, 0, 0.4])  # one kept
    assert filter_logits(logits, top_k=2)[0, :2].tolist() == [inf, inf]
    assert filter_logits(logits, temperature=2.0)[0].tolist() == pytest.approx((logits / 2)[0].tolist())
    # the order is temperature, top-k, top-p: after T = 0.5 the probabilities are 1/30, 4/30, 9/30, 16/30;
    # top-k 3 leaves 4, 9, 16 (of 29): cumulated 4/29 <= 0.2, 13/29 > 0.2
    kept = filter_logits(logits, temperature=0.5, top_k=3, top_p=0.8).softmax(-1)
    assert kept[0].tolist() == pytest.approx([0, 0, 9 / 25, 16 / 25])
    # ties with the k-th largest are kept, as in HF's TopKLogitsWarper
    assert torch.isfinite(filter_logits(torch.tensor([[1.0, 2.0, 2.0, 0.0]]), top_k=2)).tolist() == [
        [False, True, True, False]]


@pytest.mark.parametrize("temperature,top_k,top_p", [(1.0, 0, 0.9), (0.6, 7, 1.0), (1.3, 40, 0.8), (0.9, 3, 0.3)])
def test_filter_logits_equals_hf_warpers(temperature, top_k, top_p):
    logits = torch.randn(6, 97, generator=torch.Generator().manual_seed(5)) * 3
    expected = logits
    if temperature != 1.0:
        expected = TemperatureLogitsWarper(temperature)(None, expected)
    if top_k:
        expected = TopKLogitsWarper(top_k)(None, expected)
    if top_p < 1.0:
        expected = TopPLogitsWarper(top_p)(None, expected)
    assert torch.equal(filter_logits(logits, temperature, top_k, top_p), expected)


def test_sampler_is_what_generate_is_given(tokenizer):
    assert SamplingConfig(temperature=0, top_k=5, top_p=0.5).sampler == Sampler(greedy=True)
    assert SamplingConfig(temperature=0.7, top_p=0.9).sampler == Sampler(False, 0.7, 0, 0.9)
    assert SamplingConfig(temperature=1.0, top_k=8).generate_kwargs(tokenizer)["top_k"] == 8


def test_top_k_zero_samples_the_whole_distribution(tokenizer, task):
    """``top_k: 0`` is no top-k on both paths, as TRL's configs mean it (HF's ``generate`` applies its default of
    50 unless given 0): a near-uniform random model then draws tokens outside its 50 likeliest. A policy gradient
    needs samples of the distribution whose log-probs it uses."""
    model = build_causal_lm(tokenizer, "tiny", seed=0).eval()
    model.generation_config.top_k = 50  # what a model's own generation config may say: the setting given wins
    prompts = task.prompts(16, seed=2)
    sampling = SamplingConfig(max_new_tokens=1, temperature=1.0)
    torch.manual_seed(0)
    hf, own = both(model, tokenizer, prompts, sampling)
    for out in (hf, own):
        with torch.no_grad():
            logits = model(input_ids=out.queries, attention_mask=out.query_mask).logits[:, -1]
        ranks = (logits > logits.gather(-1, out.responses[:, :1])).sum(-1)
        assert int(ranks.max()) >= 50, out.path


def test_repeat_groups():
    rows = torch.tensor([[0, 5], [0, 5], [3, 4], [0, 5], [0, 5], [0, 5]])
    firsts, expand = repeat_groups(rows)
    assert firsts.tolist() == [0, 2, 3] and expand.tolist() == [0, 0, 1, 2, 2, 2]
    assert torch.equal(rows[firsts][expand], rows)


def test_falls_back_to_generate_where_the_loop_does_not_apply(tokenizer, task):
    model = stopping_model(tokenizer, 0.0)
    prompts = prompts_of(task, 2, 2)
    sampling = SamplingConfig(max_new_tokens=6, temperature=0)
    run = {"policy_call": lambda fn: fn(model)}
    assert unsupported_reason(model, {}) is None and unsupported_reason(model, {"synced_gpus": False}) is None
    assert "synced_gpus" in unsupported_reason(model, {"synced_gpus": True})  # FSDP: every process in step
    assert sample(model.generate, tokenizer, prompts, sampling, return_logits=True, **run).path == "generate"
    model.generation_config = GenerationConfig(**{**model.generation_config.to_dict(), "repetition_penalty": 1.3})
    assert "repetition_penalty" in unsupported_reason(model, {})
    hf, own = sample(model.generate, tokenizer, prompts, sampling), sample(model.generate, tokenizer, prompts,
                                                                           sampling, **run)
    assert own.path == "generate" and torch.equal(own.responses, hf.responses)
    model.generation_config = GenerationConfig(pad_token_id=0, eos_token_id=1, cache_implementation="static")
    assert "static" in unsupported_reason(model, {})


def test_a_model_returning_another_cache_falls_back(tokenizer, task):
    """The cache is checked after the prompt forward: a forward that keeps no indexable cache means generate."""
    model = stopping_model(tokenizer, 0.0)

    class NoCache(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.inner, self.config, self.generation_config = model, model.config, model.generation_config

        def forward(self, cache=None, **kwargs):
            out = self.inner(cache=cache, **kwargs)
            out.cache = None
            return out

    wrapped = NoCache()
    out = sample(model.generate, tokenizer, prompts_of(task, 2, 1), SamplingConfig(max_new_tokens=4, temperature=0),
                 policy_call=lambda fn: fn(wrapped))
    assert out.path == "generate"


def test_generate_k_uses_the_loop_and_keeps_the_greedy_texts(tokenizer, task):
    model = stopping_model(tokenizer, 0.7)
    sampling = SamplingConfig(max_new_tokens=16, temperature=0, batch_size=6)
    prompts = task.prompts(4, seed=2)
    own = generate_k(model, tokenizer, prompts, 3, sampling)
    hf = generate_k(model, tokenizer, prompts, 3, sampling, use_decode=False)
    assert [[g.token_ids for g in group] for group in own] == [[g.token_ids for g in group] for group in hf]
    assert [[g.finished for g in group] for group in own] == [[g.finished for g in group] for group in hf]


def test_the_rollout_decodes_through_the_prepared_networks(tokenizer, task):
    """PPO's rollout calls the loop as ``networks("with_policy", fn)``: inside the wrapper's forward, as
    ``generate`` is, and with the same tokens as ``generate``."""
    from functools import partial

    from rlhfkit.models.policy_value import PolicyAndValue

    model = stopping_model(tokenizer, 0.7)
    networks = PolicyAndValue(model, None)
    calls = []
    networks.register_forward_pre_hook(lambda module, args: calls.append(args[0]))
    sampling = SamplingConfig(max_new_tokens=16, temperature=0)
    prompts = prompts_of(task, 3, 4)
    own = sample(partial(networks, "generate"), tokenizer, prompts, sampling, return_logprobs=True,
                 policy_call=partial(networks, "with_policy"), synced_gpus=False)
    hf = sample(partial(networks, "generate"), tokenizer, prompts, sampling, return_logprobs=True)
    assert (own.path, hf.path, calls) == ("decode", "generate", ["with_policy", "generate"])
    mask = response_masks(own.responses, tokenizer.eos_token_id, tokenizer.pad_token_id)[0]
    assert torch.equal(own.responses, hf.responses)
    assert torch.allclose(own.logprobs * mask, hf.logprobs * mask, atol=1e-5, rtol=0)
