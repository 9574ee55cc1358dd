"""Turn records into token tensors: prompt rendering, response-only loss masks, packing, padding.

Prompts and responses are tokenized separately and concatenated, so the boundary between them is
exact (no BPE merge across it) and matches what the model sees at generation time: the rendered
prompt, then the tokens it generates, then EOS.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from transformers import PreTrainedTokenizerBase

from rlhfkit.data.records import Prompt


def render_prompt(tokenizer: PreTrainedTokenizerBase, prompt: Prompt) -> str:
    """The text the model continues: the chat template with a generation prompt when the tokenizer
    has one (a plain string becomes one user message), else the plain prompt text."""
    if tokenizer.chat_template is None:
        if isinstance(prompt, str):
            return prompt
        return "\n\n".join(f"{m['role']}: {m['content']}" for m in prompt) + "\n\nassistant: "
    messages = [{"role": "user", "content": prompt}] if isinstance(prompt, str) else list(prompt)
    return tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)


def encode_prompt(tokenizer: PreTrainedTokenizerBase, prompt: Prompt) -> list[int]:
    """Token ids of the rendered prompt (the template itself holds any BOS token)."""
    return tokenizer(render_prompt(tokenizer, prompt), add_special_tokens=False)["input_ids"]


@dataclass(frozen=True)
class Example:
    """One tokenized sequence: ``loss_mask[t] = 1`` where token ``t`` is a training target."""

    input_ids: list[int]
    loss_mask: list[int]
    truncated: bool = False


def encode_demonstration(tokenizer: PreTrainedTokenizerBase, prompt: Prompt, completion: str,
                         *, max_length: int, max_prompt_length: int) -> Example:
    """Prompt + completion + EOS, with the loss on the completion and EOS only.

    Too long: the prompt keeps its last ``max_prompt_length`` tokens (the instruction is usually at the
    end of a chat), then the completion is cut to fit ``max_length`` (losing its EOS).
    """
    prompt_ids = encode_prompt(tokenizer, prompt)
    completion_ids = tokenizer(completion, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
    truncated = False
    if len(prompt_ids) > max_prompt_length:
        prompt_ids, truncated = prompt_ids[-max_prompt_length:], True
    room = max_length - len(prompt_ids)
    if len(completion_ids) > room:
        completion_ids, truncated = completion_ids[:room], True
    return Example(prompt_ids + completion_ids, [0] * len(prompt_ids) + [1] * len(completion_ids), truncated)


def pack_texts(tokenizer: PreTrainedTokenizerBase, texts: Sequence[str], block_size: int) -> list[Example]:
    """Concatenate documents (each ending in EOS) and cut the stream into ``block_size`` blocks.

    The standard pretraining layout: no padding, every token a target. The last partial block is
    dropped unless it is the only one.
    """
    stream: list[int] = []
    for ids in tokenizer(list(texts), add_special_tokens=False)["input_ids"]:
        stream.extend(ids)
        stream.append(tokenizer.eos_token_id)
    starts = range(0, max(len(stream) - block_size + 1, 1), block_size)
    return [Example(stream[s:s + block_size], [1] * len(stream[s:s + block_size])) for s in starts]


class PadCollator:
    """Pads a list of :class:`Example` into ``input_ids``, ``attention_mask`` and ``loss_mask``."""

    def __init__(self, pad_token_id: int, padding_side: str = "right"):
        if padding_side not in ("left", "right"):
            raise ValueError(f"padding_side must be 'left' or 'right', got {padding_side!r}")
        self.pad_token_id = pad_token_id
        self.padding_side = padding_side

    def __call__(self, examples: Sequence[Example]) -> dict[str, torch.Tensor]:
        width = max(len(e.input_ids) for e in examples)
        batch = {name: torch.zeros(len(examples), width, dtype=torch.long)
                 for name in ("input_ids", "attention_mask", "loss_mask")}
        batch["input_ids"].fill_(self.pad_token_id)
        for row, example in enumerate(examples):
            n = len(example.input_ids)
            span = slice(width - n, width) if self.padding_side == "left" else slice(0, n)
            batch["input_ids"][row, span] = torch.tensor(example.input_ids)
            batch["attention_mask"][row, span] = 1
            batch["loss_mask"][row, span] = torch.tensor(example.loss_mask)
        return batch
