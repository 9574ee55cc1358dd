"""Train a byte-level BPE tokenizer locally and save it in Hugging Face format.

The tokenizer carries the special tokens every stage relies on: ``<|pad|>`` for padding, ``<|end|>``
which ends a turn (it is the EOS token, so generation stops at the end of an answer) and the role
markers used by the chat template::

    <|user|>
    Write a story about otters.<|end|>
    <|assistant|>
    Once upon a time ...<|end|>

Tool use reads as in rlhfkit's plain chat form (:data:`rlhfkit.data.collators.TOOL_MACROS`): the tools offered
after the system message's text (in a system turn of their own when there is none), ``call NAME {arguments}``
lines after an assistant's text, and a tool's result as ``NAME returned RESULT`` in a ``<|tool|>`` turn.
"""

from __future__ import annotations

import os
from collections.abc import Iterable
from pathlib import Path

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast

from rlhfkit.data.collators import TOOL_MACROS

PAD_TOKEN = "<|pad|>"
EOS_TOKEN = "<|end|>"
ROLE_TOKENS = ("<|system|>", "<|user|>", "<|assistant|>")
SPECIAL_TOKENS = (PAD_TOKEN, EOS_TOKEN, *ROLE_TOKENS)

CHAT_TEMPLATE = TOOL_MACROS + (
    "{%- set system_first = messages and messages[0].role == 'system' -%}"
    "{%- if tools and not system_first -%}{{ '<|system|>\n' + tools_text(tools) + '<|end|>\n' }}{%- endif -%}"
    "{% for message in messages %}"
    "{{ '<|' + message['role'] + '|>\n' + body(message) }}"
    "{%- if loop.first and tools and system_first -%}{{ '\n' + tools_text(tools) }}{%- endif -%}"
    "{{ '<|end|>\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|assistant|>\n' }}{% endif %}"
)


def train_bpe_tokenizer(texts: Iterable[str], vocab_size: int = 1024,
                        save_dir: str | os.PathLike | None = None) -> PreTrainedTokenizerFast:
    """Train byte-level BPE on ``texts``; return it wrapped for transformers (saved if ``save_dir``).

    Byte-level BPE never meets an unknown character: any UTF-8 text round-trips exactly.
    """
    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=list(SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    bpe.train_from_iterator(texts, trainer=trainer)
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=bpe,
        pad_token=PAD_TOKEN,
        eos_token=EOS_TOKEN,
        additional_special_tokens=list(ROLE_TOKENS),
        chat_template=CHAT_TEMPLATE,
        clean_up_tokenization_spaces=False,
    )
    if save_dir is not None:
        Path(save_dir).mkdir(parents=True, exist_ok=True)
        tokenizer.save_pretrained(save_dir)
    return tokenizer
