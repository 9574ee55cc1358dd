"""Reward models: a sequence classifier with one output, r(x, y) = a scalar per (prompt, completion).

The model is a plain ``AutoModelForSequenceClassification`` with ``num_labels=1``, so transformers, TRL
and OpenRLHF load the saved directory as it is. It is initialised from the SFT checkpoint (InstructGPT:
"starting from the SFT model with the final unembedding layer removed") or any HF model directory; a
decoder (Llama, GPT-2, ...) or an encoder (BERT-style) both work.

Where the reward is read, and why padding never changes it:

* Decoders: transformers' ``...ForSequenceClassification`` reads the score head at the rightmost token
  that is not ``config.pad_token_id`` (checked in transformers 5.23, ``GenericForSequenceClassification``)
  but does not derive position ids from the attention mask. We pad on the left, so the last column is
  the last real token of every row, and pass ``position_ids`` counted over real tokens only
  (:func:`~rlhfkit.models.load.position_ids_from_mask`); rotary models (Llama) would tolerate shifted
  positions, absolute-position models (GPT-2) would not. Right padding gives the same rewards (tested).
  The sequence is prompt + completion + EOS, so the reward is read at the EOS token, as in the
  policy's own rollouts; when the tokenizer pads with its EOS token (no pad token of its own) the EOS is
  left out, since transformers would skip it as padding: the reward is then read at the last completion
  token, identically here and in plain transformers.
* Encoders (BERT-style): the model pools its first token ([CLS]) itself; we pad on the right so that
  token is at position 0. The input is ``[CLS] prompt [SEP] completion [SEP]`` when the tokenizer has
  CLS/SEP tokens.

Normalisation (InstructGPT: "the reward model is normalized so that the labeler demonstrations achieve
a mean score of 0 before doing RL"; we use the SFT outputs of the training rankings, or a given
reference file) is stored in the saved config as ``rlhfkit_reward_mean`` / ``rlhfkit_reward_std`` and
applied by :func:`normalized_rewards` only: the raw score of the model is never changed, so plain
transformers gives the raw reward and rlhfkit's ``score`` and PPO give the normalised one.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from pathlib import Path
from typing import NamedTuple

import torch
from transformers import (
    AutoModelForSequenceClassification,
    LlamaForSequenceClassification,
    PretrainedConfig,
    PreTrainedModel,
    PreTrainedTokenizerBase,
)

from rlhfkit.config import ModelConfig
from rlhfkit.data.collators import encode_prompt, token_ids
from rlhfkit.data.records import Prompt
from rlhfkit.models.load import (
    DTYPES,
    apply_lora,
    is_gguf,
    load_gguf_model,
    load_tokenizer,
    position_ids_from_mask,
    quantization_options,
)

MEAN_KEY = "rlhfkit_reward_mean"
STD_KEY = "rlhfkit_reward_std"
WINDOW_KEYS = ("rlhfkit_max_length", "rlhfkit_max_prompt_length")  # the input window it was trained with
#: Set in the config of a reward model with ODIN's length head as its second output (checkpoints while training).
LENGTH_HEAD_KEY = "rlhfkit_length_head"
#: The saved names of a sequence classifier's score head (Llama ``score``, BERT ``classifier``, RoBERTa
#: ``classifier.out_proj``), under peft's trainable copy too.
_HEAD_PARAMETER = re.compile(r"(^|\.)(score|classifier)(\.out_proj)?(\.modules_to_save\.\w+)?\.(weight|bias)$")


def is_decoder_only(config: PretrainedConfig) -> bool:
    """True for causal decoders (reward at the last token), False for encoders (pooled first token).

    A model type counts as a decoder when transformers has a causal LM but no masked LM for it (BERT and
    RoBERTa have both; Llama, GPT-2, Mistral, Qwen only the former).
    """
    from transformers.models.auto.modeling_auto import (
        MODEL_FOR_CAUSAL_LM_MAPPING_NAMES,
        MODEL_FOR_MASKED_LM_MAPPING_NAMES,
    )

    if getattr(config, "is_encoder_decoder", False):
        return False
    model_type = getattr(config, "model_type", None)
    return model_type in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES and model_type not in MODEL_FOR_MASKED_LM_MAPPING_NAMES


def padding_side(decoder: bool) -> str:
    """Left for decoders (the last column is every row's last token), right for encoders ([CLS] first)."""
    return "left" if decoder else "right"


def build_reward_model(tokenizer: PreTrainedTokenizerBase, preset: str = "tiny", *, seed: int = 0, outputs: int = 1,
                       **overrides: int) -> LlamaForSequenceClassification:
    """A randomly initialised Llama reward model sized like :func:`~rlhfkit.models.build.build_causal_lm`, with
    ``outputs`` score outputs."""
    from rlhfkit.models.build import build_causal_lm

    config = build_causal_lm(tokenizer, preset, seed=seed, **overrides).config
    config.num_labels = outputs
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return LlamaForSequenceClassification(config)


def load_reward_model(config: ModelConfig, *, seed: int = 0,
                      length_head: bool = False) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """The reward model described by ``config``, with its tokenizer.

    From ``name_or_path`` (an SFT checkpoint, a base LM or its ``.gguf`` file, an encoder or an earlier reward
    model) the backbone weights are loaded and a one-output score head is added where the checkpoint has none (or
    a head of another size); from ``preset`` a random Llama is built. With ``config.lora`` the backbone
    gets LoRA adapters (peft task type SEQ_CLS) and the score head stays fully trainable. ``length_head``: the
    score head has a second output, ODIN's length head (:data:`LENGTH_HEAD_KEY`, :func:`drop_length_head`).
    """
    outputs = 2 if length_head else 1
    if config.name_or_path is not None:
        tokenizer = load_tokenizer(config.tokenizer or config.name_or_path,
                                   trust_remote_code=config.trust_remote_code)
        from transformers.utils import logging as hf_logging

        verbosity = hf_logging.get_verbosity()
        hf_logging.set_verbosity_error()  # a missing score head is expected: report only surprises below
        try:
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(seed)  # the new score head's initialisation
                options = {"num_labels": outputs, "ignore_mismatched_sizes": True, "output_loading_info": True}
                if is_gguf(config.name_or_path):  # a .gguf causal LM: its backbone, de-quantised
                    model, info = load_gguf_model(config.name_or_path, dtype=DTYPES[config.dtype],
                                                  model_class=AutoModelForSequenceClassification, **options)
                else:
                    model, info = AutoModelForSequenceClassification.from_pretrained(
                        config.name_or_path, dtype=DTYPES[config.dtype], trust_remote_code=config.trust_remote_code,
                        **options, **quantization_options(config))
        finally:
            hf_logging.set_verbosity(verbosity)
        heads = {"score", "classifier", "pre_classifier"}
        surprises = sorted(k for k in info["missing_keys"] if k.split(".")[0] not in heads)
        if surprises or info["mismatched_keys"]:
            import warnings

            warnings.warn(f"{config.name_or_path}: weights initialised at random: {surprises} "
                          f"{sorted(str(k) for k in info['mismatched_keys'])}", stacklevel=2)
    else:
        tokenizer = load_tokenizer(config.tokenizer)
        model = build_reward_model(tokenizer, config.preset, seed=seed, outputs=outputs,
                                   **config.architecture).to(DTYPES[config.dtype])
    if length_head:
        setattr(model.config, LENGTH_HEAD_KEY, True)
    if model.config.pad_token_id is None:
        model.config.pad_token_id = tokenizer.pad_token_id
    model.config.problem_type = "regression"
    if config.lora is not None:
        model = apply_lora(model, config.lora, task_type="SEQ_CLS")
    return model, tokenizer


class RewardInput(NamedTuple):
    """What the reward model reads of one (prompt, completion): its token ids, whether the window cut them, and
    the completion's own length in tokens before any cut (ODIN's length)."""

    ids: list[int]
    truncated: bool
    completion_tokens: int


def encode_for_reward(tokenizer: PreTrainedTokenizerBase, prompt: Prompt, completions: Sequence[str], *,
                      decoder: bool, max_length: int, max_prompt_length: int) -> list[RewardInput]:
    """The :class:`RewardInput` of each (prompt, completion): token ids and whether they were truncated.

    Decoders: rendered prompt + completion + EOS (no EOS when EOS is the pad token; see the module
    docstring). Encoders: ``[CLS] prompt [SEP] completion [SEP]`` (plain concatenation plus EOS when the
    tokenizer has no CLS/SEP). Too long: the prompt keeps its last ``max_prompt_length`` tokens, then the
    completion is cut to fit ``max_length`` (losing its end). The prompt is tokenized once for all
    completions.
    """
    prompt_ids = encode_prompt(tokenizer, prompt)
    cls, sep, eos = tokenizer.cls_token_id, tokenizer.sep_token_id, tokenizer.eos_token_id
    pair_form = not decoder and cls is not None and sep is not None
    suffix = [eos] if not pair_form and eos is not None and eos != tokenizer.pad_token_id else []
    prompt_truncated = len(prompt_ids) > max_prompt_length
    if prompt_truncated:
        prompt_ids = prompt_ids[-max_prompt_length:]
    room = max(max_length - (3 if pair_form else 0) - len(prompt_ids), 0)
    encoded = []
    for completion_ids in token_ids(tokenizer, completions):
        tokens = len(completion_ids)
        completion_ids = completion_ids + suffix
        truncated = prompt_truncated or len(completion_ids) > room
        completion_ids = completion_ids[:room]
        ids = [cls, *prompt_ids, sep, *completion_ids, sep] if pair_form else prompt_ids + completion_ids
        encoded.append(RewardInput(ids, truncated, tokens))
    return encoded


def pad_rows(rows: Sequence[Sequence[int]], pad_token_id: int, side: str) -> tuple[torch.Tensor, torch.Tensor]:
    """``input_ids`` and ``attention_mask`` ``[N, T]`` for token-id rows, padded on ``side``."""
    width = max(len(r) for r in rows)
    input_ids = torch.full((len(rows), width), pad_token_id, dtype=torch.long)
    attention_mask = torch.zeros(len(rows), width, dtype=torch.long)
    for i, row in enumerate(rows):
        span = slice(width - len(row), width) if side == "left" else slice(0, len(row))
        input_ids[i, span] = torch.tensor(row, dtype=torch.long)
        attention_mask[i, span] = 1
    return input_ids, attention_mask


def reward_outputs(model, input_ids: torch.Tensor, attention_mask: torch.Tensor, *, decoder: bool) -> torch.Tensor:
    """Every score output ``[N, H]`` of a padded batch (H = 1, or 2 with ODIN's length head): one forward.

    ``model`` may be a plain HF model, a peft model or an accelerate/DDP wrapper (it is called, never
    unwrapped, so gradients synchronise). Decoders get mask-derived ``position_ids``.
    """
    kwargs = {"position_ids": position_ids_from_mask(attention_mask), "use_cache": False} if decoder else {}
    return model(input_ids=input_ids, attention_mask=attention_mask, **kwargs).logits.float()


def sequence_rewards(model, input_ids: torch.Tensor, attention_mask: torch.Tensor, *, decoder: bool) -> torch.Tensor:
    """Raw rewards ``[N]`` of a padded batch: output 0 of :func:`reward_outputs` (the only one of a plain reward
    model; the quality head of one with a length head)."""
    return reward_outputs(model, input_ids, attention_mask, decoder=decoder)[:, 0]


def head_weight(model) -> torch.Tensor:
    """The trainable weight ``[2, H]`` of a two-output score head (ODIN: row 0 quality, row 1 length)."""
    found = [p for name, p in model.named_parameters()
             if _HEAD_PARAMETER.search(name) and name.endswith("weight") and p.requires_grad and p.dim() == 2
             and p.shape[0] == 2]
    if len(found) != 1:
        raise ValueError(f"expected one trainable two-output score head, found {len(found)}")
    return found[0]


def drop_length_head(directory: str | Path) -> None:
    """Rewrite the saved two-output reward model in ``directory`` as a plain one-output one: the score head's
    output 0 (ODIN's quality head) is kept and the length head dropped, so transformers, TRL, rlhfkit's
    ``score`` and PPO read the quality reward as they read any reward model's."""
    from safetensors.torch import load_file, save_file
    from transformers import AutoConfig

    directory = Path(directory)
    cut = 0
    for file in sorted(directory.glob("*.safetensors")):
        tensors = load_file(file)
        heads = {k: v[:1].clone() for k, v in tensors.items()
                 if _HEAD_PARAMETER.search(k) and v.dim() >= 1 and v.shape[0] == 2}
        if heads:
            save_file({**tensors, **heads}, file, metadata={"format": "pt"})
            cut += len(heads)
    if not cut:
        raise ValueError(f"{directory}: no two-output score head to cut")
    config = AutoConfig.from_pretrained(directory)
    config.num_labels = 1
    if hasattr(config, LENGTH_HEAD_KEY):
        delattr(config, LENGTH_HEAD_KEY)
    config.save_pretrained(directory)


def normalization(config: PretrainedConfig) -> tuple[float, float]:
    """The ``(mean, std)`` stored in a reward model's config; ``(0, 1)`` when it has none."""
    mean = getattr(config, MEAN_KEY, None)
    std = getattr(config, STD_KEY, None)
    return float(mean) if mean is not None else 0.0, float(std) if std is not None else 1.0


def set_normalization(config: PretrainedConfig, mean: float | None, std: float | None) -> None:
    """Store (or with None, remove) the normalisation of a reward model in its config."""
    for key, value in ((MEAN_KEY, mean), (STD_KEY, std)):
        if value is None:
            if hasattr(config, key):
                delattr(config, key)
        else:
            setattr(config, key, float(value))


def set_window(config: PretrainedConfig, max_length: int, max_prompt_length: int) -> None:
    """Store the input window a reward model was trained with (``data.max_length``, ``data.max_prompt_length``)."""
    for key, value in zip(WINDOW_KEYS, (max_length, max_prompt_length), strict=True):
        setattr(config, key, int(value))


def reading_window(config: PretrainedConfig, max_length: int | None = None,
                   max_prompt_length: int | None = None) -> tuple[int, int]:
    """The ``(max_length, max_prompt_length)`` a reward model scores with.

    A model trained by rlhfkit stores its training window (:func:`set_window`) and reads at most that much, so
    it scores PPO rollouts, ``rlhfkit score`` and ``rlhfkit eval`` samples as it saw its training pairs (a
    prompt cut to its last 40 tokens in training is not read whole later); a longer request is cut to it, a
    shorter one is kept. Without a stored window: the request, by default 512 and 256.
    """
    stored = [getattr(config, key, None) for key in WINDOW_KEYS]
    window = []
    for asked, trained, default in zip((max_length, max_prompt_length), stored, (512, 256), strict=True):
        value = asked if asked is not None else trained if trained is not None else default
        window.append(min(value, trained) if trained is not None else value)
    return window[0], window[1]


def normalized_rewards(raw: torch.Tensor, config: PretrainedConfig) -> torch.Tensor:
    """``(raw - mean) / std`` with the reward model's stored normalisation: the one place it is applied.

    ``score`` and PPO call this; without stored values the raw rewards come back unchanged.
    """
    mean, std = normalization(config)
    return (raw - mean) / std


@torch.no_grad()
def score_texts(model, tokenizer: PreTrainedTokenizerBase, prompts: Sequence[Prompt], completions: Sequence[str],
                *, batch_size: int = 32, max_length: int | None = None, max_prompt_length: int | None = None,
                normalize: bool = True) -> list[float]:
    """Rewards of (prompt, completion) pairs, normalised by default (see :func:`normalized_rewards`).

    The input window is :func:`reading_window` (the model's training window, at most; else 512 / 256).
    Sequences are scored in length-sorted batches (less padding), results returned in input order.
    """
    if len(prompts) != len(completions):
        raise ValueError(f"{len(prompts)} prompts for {len(completions)} completions")
    config = model.config
    max_length, max_prompt_length = reading_window(config, max_length, max_prompt_length)
    decoder = is_decoder_only(config)
    rows = [encode_for_reward(tokenizer, p, [c], decoder=decoder, max_length=max_length,
                              max_prompt_length=max_prompt_length)[0].ids
            for p, c in zip(prompts, completions, strict=True)]
    order = sorted(range(len(rows)), key=lambda i: len(rows[i]))
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    out = torch.empty(len(rows))
    for start in range(0, len(rows), batch_size):
        chunk = order[start:start + batch_size]
        input_ids, mask = pad_rows([rows[i] for i in chunk], tokenizer.pad_token_id, padding_side(decoder))
        raw = sequence_rewards(model, input_ids.to(device), mask.to(device), decoder=decoder).cpu()
        out[chunk] = normalized_rewards(raw, config) if normalize else raw
    model.train(was_training)
    return out.tolist()


def load_for_scoring(name_or_path: str, *, dtype: str = "float32") -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """A saved reward model (``runs/rm/final``) and its tokenizer, in eval mode."""
    tokenizer = load_tokenizer(name_or_path)
    model = AutoModelForSequenceClassification.from_pretrained(name_or_path, dtype=DTYPES[dtype])
    outputs = 2 if getattr(model.config, LENGTH_HEAD_KEY, False) else 1  # a checkpoint with its length head
    if model.config.num_labels != outputs:
        raise ValueError(f"{name_or_path}: not a reward model (num_labels={model.config.num_labels}, "
                         f"expected {outputs})")
    if model.config.pad_token_id is None:
        model.config.pad_token_id = tokenizer.pad_token_id
    return model.eval(), tokenizer
