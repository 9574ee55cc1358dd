"""Load models and tokenizers (local HF directory, hub id, ``.gguf`` file, or a preset), and wrap them with LoRA.

A ``.gguf`` file (llama.cpp's single-file format: weights, config, tokenizer and chat template) is read by
transformers (``from_pretrained(directory, gguf_file=name)``, which needs the ``gguf`` package: the
``rlhfkit[gguf]`` extra). Its weights are de-quantised into a plain model, in float32 unless asked
otherwise, so it trains and saves like any other; :func:`convert_gguf` (``rlhfkit convert``) writes it once
as a Hugging Face checkpoint, which loads faster and with plain transformers.
"""

from __future__ import annotations

from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedModel, PreTrainedTokenizerBase

from rlhfkit.config import LoraConfig, ModelConfig
from rlhfkit.models.build import build_causal_lm

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def is_gguf(name_or_path: str | Path) -> bool:
    """Whether ``name_or_path`` names a ``.gguf`` file (by its suffix)."""
    return str(name_or_path).lower().endswith(".gguf")


def _gguf_location(path: str | Path) -> tuple[str, str]:
    """The directory and file name transformers wants for a ``.gguf`` file.

    Raises:
        ValueError: the name does not end with ``.gguf``.
        FileNotFoundError: there is no such file.
        ImportError: the ``gguf`` package, which transformers reads the file with, is not installed.
    """
    import importlib.util

    path = Path(path)
    if not is_gguf(path):
        raise ValueError(f"{path}: not a .gguf file")
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such GGUF file")
    if importlib.util.find_spec("gguf") is None:
        raise ImportError("reading a .gguf file needs the gguf package: pip install 'rlhfkit[gguf]'")
    return str(path.parent), path.name


def load_gguf_model(path: str | Path, *, dtype: torch.dtype = torch.float32, model_class=AutoModelForCausalLM,
                    **kwargs):
    """The model in a ``.gguf`` file, de-quantised into a plain model that trains and saves as usual.

    ``model_class`` is the transformers auto class (a causal LM by default; a reward model loads the same
    backbone with ``AutoModelForSequenceClassification``); ``kwargs`` go to its ``from_pretrained``.
    """
    directory, name = _gguf_location(path)
    try:
        from transformers import GgufConfig
    except ImportError:  # releases before GgufConfig always de-quantise a GGUF file into a plain model
        return model_class.from_pretrained(directory, gguf_file=name, dtype=dtype, **kwargs)
    # newer ones may keep the weights packed, and mark even de-quantised ones as quantized (a model that
    # neither trains nor saves) unless dense weights are asked for
    return model_class.from_pretrained(directory, gguf_file=name, dtype=dtype,
                                       quantization_config=GgufConfig(dequantize=True), **kwargs)


def convert_gguf(gguf_path: str | Path, out_dir: str | Path, *, dtype: str = "float32") -> Path:
    """Write the model and tokenizer (with its chat template) of a ``.gguf`` file as a plain HF checkpoint.

    ``AutoModelForCausalLM.from_pretrained(out_dir)`` and ``AutoTokenizer.from_pretrained(out_dir)`` then
    load it without the ``gguf`` package. ``dtype`` is one of ``float32`` (default), ``bfloat16``,
    ``float16``. Returns ``out_dir``.
    """
    model = load_gguf_model(gguf_path, dtype=DTYPES[dtype])  # checks the path first
    tokenizer = load_tokenizer(str(gguf_path))
    out_dir = Path(out_dir)
    model.save_pretrained(out_dir, safe_serialization=True)
    tokenizer.save_pretrained(out_dir)
    return out_dir


def load_tokenizer(name_or_path: str, *, trust_remote_code: bool = False) -> PreTrainedTokenizerBase:
    """A tokenizer with a pad token (EOS stands in when the model has none); a ``.gguf`` file's own tokenizer."""
    if is_gguf(name_or_path):
        directory, name = _gguf_location(name_or_path)
        tokenizer = AutoTokenizer.from_pretrained(directory, gguf_file=name)
    else:
        tokenizer = AutoTokenizer.from_pretrained(name_or_path, trust_remote_code=trust_remote_code)
    if tokenizer.pad_token is None:
        if tokenizer.eos_token is None:
            raise ValueError(f"{name_or_path}: the tokenizer has neither a pad nor an EOS token")
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def load_causal_lm(config: ModelConfig, *, seed: int = 0) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """The policy described by ``config``: loaded from ``name_or_path`` (a ``.gguf`` file too) or built from
    ``preset``.

    LoRA adapters are added when ``config.lora`` is set (see :func:`apply_lora`).
    """
    if config.name_or_path is not None:
        tokenizer = load_tokenizer(config.tokenizer or config.name_or_path,
                                   trust_remote_code=config.trust_remote_code)
        if is_gguf(config.name_or_path):
            model = load_gguf_model(config.name_or_path, dtype=DTYPES[config.dtype])
        else:
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


def save_model(model, tokenizer: PreTrainedTokenizerBase, directory: str, *, merge_lora: bool = True,
               state_dict: dict[str, torch.Tensor] | None = None) -> None:
    """Save in plain HF format with the tokenizer.

    With LoRA, ``merge_lora`` writes the merged model (plain transformers loads it: the ``final/``
    directory); without it only the adapters are written (checkpoints, for resume). ``state_dict``, when
    given, is written instead of the model's own (the full weights gathered from FSDP shards).
    """
    if merge_lora and hasattr(model, "merge_and_unload"):
        import copy

        model = copy.deepcopy(model).merge_and_unload()
    model.save_pretrained(directory, safe_serialization=True, state_dict=state_dict)
    tokenizer.save_pretrained(directory)
