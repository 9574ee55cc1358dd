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
                config.name_or_path, dtype=DTYPES[config.dtype], trust_remote_code=config.trust_remote_code,
                **quantization_options(config))
    else:
        tokenizer = load_tokenizer(config.tokenizer)
        model = build_causal_lm(tokenizer, config.preset, seed=seed, **config.architecture).to(DTYPES[config.dtype])
    if model.generation_config.pad_token_id is None:
        model.generation_config.pad_token_id = tokenizer.pad_token_id
    if config.lora is not None:
        model = apply_lora(model, config.lora)
    return model, tokenizer


#: Modules never quantised: the heads (a reward model's score head trains in full precision).
UNQUANTIZED_MODULES = ["lm_head", "score", "classifier", "pre_classifier"]


def quantization_options(config: ModelConfig) -> dict:
    """``from_pretrained``'s options for ``config.quantization`` (none without it): bitsandbytes' 4-bit NF4 with
    double quantisation, computed in ``config.dtype``, the heads left unquantised, every weight on this process's
    device (QLoRA).

    Raises:
        ImportError: bitsandbytes is not installed.
    """
    if config.quantization is None:
        return {}
    import importlib.util

    if importlib.util.find_spec("bitsandbytes") is None:
        raise ImportError("model.quantization: 4bit loads the weights with bitsandbytes, which is not installed: "
                          "pip install 'rlhfkit[qlora]'")
    from accelerate import PartialState
    from transformers import BitsAndBytesConfig

    quantization = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                                      bnb_4bit_compute_dtype=DTYPES[config.dtype],
                                      llm_int8_skip_modules=UNQUANTIZED_MODULES)
    return {"quantization_config": quantization, "device_map": {"": PartialState().device}}


def is_quantized(model) -> bool:
    """Whether ``model`` (or the model inside a peft wrapper) holds bitsandbytes 4-bit weights."""
    return bool(getattr(model, "is_loaded_in_4bit", False)
                or getattr(getattr(model, "base_model", None), "is_loaded_in_4bit", False))


def apply_lora(model: PreTrainedModel, lora: LoraConfig, *, task_type: str = "CAUSAL_LM"):
    """Wrap ``model`` with trainable LoRA adapters (peft); the base weights are frozen.

    With adapters disabled (``model.disable_adapter()``) the wrapped model is the original one, which
    is how later stages get a frozen reference without a second copy in memory. A 4-bit model is first made
    ready for training as QLoRA does (peft's ``prepare_model_for_kbit_training``: the unquantised weights, such
    as the norms, in float32, and gradients flowing from the input embeddings).
    """
    from peft import LoraConfig as PeftLoraConfig
    from peft import get_peft_model, prepare_model_for_kbit_training

    if is_quantized(model):
        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=False)

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

        model = dequantized_merge(model) if is_quantized(model) else copy.deepcopy(model).merge_and_unload()
    model.save_pretrained(directory, safe_serialization=True, state_dict=state_dict)
    tokenizer.save_pretrained(directory)


@torch.no_grad()
def dequantized_merge(model) -> PreTrainedModel:
    """A QLoRA model (peft adapters on 4-bit weights) as a plain model in its compute dtype: each 4-bit weight
    de-quantised and its adapters' delta added in full precision. (peft's ``merge_and_unload`` adds the delta to
    the de-quantised weight and quantises the sum again, which rounds the trained delta to 4 bits.)"""
    import bitsandbytes.functional as bnb_functional
    from bitsandbytes.nn import Params4bit
    from peft.tuners.lora import LoraLayer

    base = model.get_base_model()
    dtype = base.config.quantization_config.bnb_4bit_compute_dtype if hasattr(base.config, "quantization_config") \
        else torch.float32
    dtype = getattr(torch, dtype) if isinstance(dtype, str) else dtype

    def dense(param) -> torch.Tensor:
        if isinstance(param, Params4bit):
            return bnb_functional.dequantize_4bit(param.data, param.quant_state).to(dtype)
        return param.data.to(dtype)

    weights: dict[str, torch.Tensor] = {}
    lora_layers = {name: module for name, module in base.named_modules() if isinstance(module, LoraLayer)}
    for name, module in lora_layers.items():
        weight = dense(module.base_layer.weight)
        for adapter in module.active_adapters:
            if adapter in module.lora_A:
                weight = weight + module.get_delta_weight(adapter).to(dtype)
        weights[f"{name}.weight"] = weight
        if module.base_layer.bias is not None:
            weights[f"{name}.bias"] = module.base_layer.bias.data.to(dtype)
    for name, param in base.named_parameters():
        owner = name.rsplit(".", 1)[0]
        if ".original_module." in name or any(owner == n or owner.startswith(f"{n}.") for n in lora_layers):
            continue  # a LoRA layer's (above), or the untrained copy of a fully trained module
        weights[name.replace(".modules_to_save.default.", ".")] = dense(param)
    config = _plain_config(base.config)
    plain = type(base)(config).to(dtype)
    missing, unexpected = plain.load_state_dict(weights, strict=False)
    if unexpected or [k for k in missing if k not in _tied_keys(plain)]:
        raise RuntimeError(f"de-quantising the QLoRA model: missing {missing}, unexpected {unexpected}")
    if getattr(base, "generation_config", None) is not None:
        plain.generation_config = base.generation_config
    return plain.eval()


def _plain_config(config):
    """A copy of a model config without its ``quantization_config`` (a plain model's config)."""
    import copy

    config = copy.deepcopy(config)
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    return config


def _tied_keys(model) -> set[str]:
    """The parameter names that share another's tensor (a tied output embedding): absent from a state dict."""
    seen: dict[int, str] = {}
    tied = set()
    for name, param in model.named_parameters(remove_duplicate=False):
        if id(param) in seen:
            tied.add(name)
        seen.setdefault(id(param), name)
    return tied
