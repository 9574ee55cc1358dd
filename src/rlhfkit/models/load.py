"""Load models and tokenizers (local HF directory, hub id, or a preset), and wrap them with LoRA."""

from __future__ import annotations

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedModel, PreTrainedTokenizerBase

from rlhfkit.config import LoraConfig, ModelConfig
from rlhfkit.models.build import build_causal_lm

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def load_tokenizer(name_or_path: str, *, trust_remote_code: bool = False) -> PreTrainedTokenizerBase:
    """A tokenizer with a pad token (EOS stands in when the model has none)."""
    tokenizer = AutoTokenizer.from_pretrained(name_or_path, trust_remote_code=trust_remote_code)
    if tokenizer.pad_token is None:
        if tokenizer.eos_token is None:
            raise ValueError(f"{name_or_path}: the tokenizer has neither a pad nor an EOS token")
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def load_causal_lm(config: ModelConfig, *, seed: int = 0) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """The policy described by ``config``: loaded from ``name_or_path`` or built from ``preset``.

    LoRA adapters are added when ``config.lora`` is set (see :func:`apply_lora`).
    """
    if config.name_or_path is not None:
        tokenizer = load_tokenizer(config.tokenizer or config.name_or_path,
                                   trust_remote_code=config.trust_remote_code)
        model = AutoModelForCausalLM.from_pretrained(
            config.name_or_path, dtype=DTYPES[config.dtype], trust_remote_code=config.trust_remote_code)
    else:
        tokenizer = load_tokenizer(config.tokenizer)
        model = build_causal_lm(tokenizer, config.preset, seed=seed, **config.architecture).to(DTYPES[config.dtype])
    if model.generation_config.pad_token_id is None:
        model.generation_config.pad_token_id = tokenizer.pad_token_id
    if config.lora is not None:
        model = apply_lora(model, config.lora)
    return model, tokenizer


def apply_lora(model: PreTrainedModel, lora: LoraConfig, *, task_type: str = "CAUSAL_LM"):
    """Wrap ``model`` with trainable LoRA adapters (peft); the base weights are frozen.

    With adapters disabled (``model.disable_adapter()``) the wrapped model is the original one, which
    is how later stages get a frozen reference without a second copy in memory.
    """
    from peft import LoraConfig as PeftLoraConfig
    from peft import get_peft_model

    peft_config = PeftLoraConfig(r=lora.r, lora_alpha=lora.alpha, lora_dropout=lora.dropout,
                                 target_modules=lora.target_modules, task_type=task_type)
    return get_peft_model(model, peft_config)


def position_ids_from_mask(attention_mask: torch.Tensor) -> torch.Tensor:
    """Positions counted over real tokens only, so left and right padding give the same logits."""
    return (attention_mask.long().cumsum(-1) - 1).clamp(min=0)


def save_model(model, tokenizer: PreTrainedTokenizerBase, directory: str, *, merge_lora: bool = True) -> None:
    """Save in plain HF format with the tokenizer.

    With LoRA, ``merge_lora`` writes the merged model (plain transformers loads it: the ``final/``
    directory); without it only the adapters are written (checkpoints, for resume).
    """
    if merge_lora and hasattr(model, "merge_and_unload"):
        import copy

        model = copy.deepcopy(model).merge_and_unload()
    model.save_pretrained(directory, safe_serialization=True)
    tokenizer.save_pretrained(directory)
