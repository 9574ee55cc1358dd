"""Build small Llama-style causal LMs from a config: no download, any vocabulary."""

from __future__ import annotations

import torch
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerBase

# Sizes used by the tests, the demo and the benchmarks (see DESIGN.md, "Performance targets").
PRESETS: dict[str, dict[str, int]] = {
    "tiny": {"hidden_size": 64, "intermediate_size": 256, "num_hidden_layers": 2, "num_attention_heads": 4},
    "small": {"hidden_size": 384, "intermediate_size": 1536, "num_hidden_layers": 6, "num_attention_heads": 6},
}


ARCHITECTURE_KEYS = ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                     "num_key_value_heads", "max_position_embeddings")


def build_causal_lm(tokenizer: PreTrainedTokenizerBase, preset: str = "tiny", *, seed: int = 0,
                    **overrides: int) -> LlamaForCausalLM:
    """A randomly initialised Llama model sized by ``preset`` (plus ``overrides``) for ``tokenizer``.

    Overriding ``hidden_size`` alone scales the MLP to 4x, as in the presets.
    """
    if preset not in PRESETS:
        raise ValueError(f"unknown model preset {preset!r}; known: {', '.join(PRESETS)}")
    unknown = sorted(set(overrides) - set(ARCHITECTURE_KEYS))
    if unknown:
        raise ValueError(f"model.architecture: unknown key(s) {unknown}; known: {', '.join(ARCHITECTURE_KEYS)}")
    sizes = {"max_position_embeddings": 1024, **PRESETS[preset], **overrides}
    if "hidden_size" in overrides and "intermediate_size" not in overrides:
        sizes["intermediate_size"] = 4 * overrides["hidden_size"]
    if sizes["hidden_size"] % sizes["num_attention_heads"]:
        raise ValueError(f"model.architecture: hidden_size {sizes['hidden_size']} is not divisible by "
                         f"num_attention_heads {sizes['num_attention_heads']}")
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        tie_word_embeddings=True,
        **sizes,
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = LlamaForCausalLM(config)
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    return model
