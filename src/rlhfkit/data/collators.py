"""Turn records into token tensors: prompt rendering, response-only loss masks, packing, padding.

Prompts and responses are tokenized separately and concatenated, so the boundary between them is
exact (no BPE merge across it) and matches what the model sees at generation time: the rendered
prompt, then the tokens it generates, then EOS. A conversation whose every assistant turn is a target
(:func:`encode_conversation`) is built the same way, turn by turn.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from transformers import PreTrainedTokenizerBase

from rlhfkit.data.records import Message, Prompt, common_prefix_length, tools_of

#: Jinja macros rlhfkit's own chat templates share (:data:`PLAIN_TEMPLATE` and the trained tokenizer's
#: ``rlhfkit.models.tokenizer.CHAT_TEMPLATE``): ``tools_text`` renders the tools a record offers as ``tools:`` and one
#: line of JSON per function schema (the templates put it in the system turn); ``body`` renders a message's text: a
#: tool's result as ``NAME returned RESULT`` when the message names its function, and after an assistant's text
#: each tool call on a line of its own, ``call NAME {"argument": value, ...}``.
TOOL_MACROS = (
    "{%- macro tools_text(tools) -%}"
    "{{ 'tools:' }}{%- for tool in tools -%}{{ '\n' + tool | tojson }}{%- endfor -%}"
    "{%- endmacro -%}"
    "{%- macro body(message) -%}"
    "{%- if message.role == 'tool' and message.name -%}{{ message.name + ' returned ' }}{%- endif -%}"
    "{{ message.content }}"
    "{%- for call in message.tool_calls or [] -%}"
    "{{ ('\n' if message.content or not loop.first else '') + 'call ' + call.function.name + ' '"
    " + call.function.arguments | tojson }}"
    "{%- endfor -%}"
    "{%- endmacro -%}"
)

#: rlhfkit's plain chat form, for a tokenizer without a chat template: ``role: body`` turns (:data:`TOOL_MACROS`)
#: separated by a blank line, the tools after the system message's text (in a system turn of their own when the
#: conversation has none), and the generation prompt ``assistant: `` as a turn of its own. For example::
#:
#:     system: You are a weather assistant.
#:     tools:
#:     {"type": "function", "function": {"name": "get_current_temperature", ...}}
#:
#:     user: How warm is it in Paris?
#:
#:     assistant: call get_current_temperature {"location": "Paris, France"}
#:
#:     tool: get_current_temperature returned 22.0
#:
#:     assistant: It is 22 °C in Paris.
PLAIN_TEMPLATE = TOOL_MACROS + (
    "{%- set ns = namespace(separator='') -%}"
    "{%- set system_first = messages and messages[0].role == 'system' -%}"
    "{%- if tools and not system_first -%}"
    "{{ 'system: ' + tools_text(tools) }}{%- set ns.separator = '\n\n' -%}"
    "{%- endif -%}"
    "{%- for message in messages -%}"
    "{{ ns.separator + message.role + ': ' + body(message) }}"
    "{%- if loop.first and tools and system_first -%}{{ '\n' + tools_text(tools) }}{%- endif -%}"
    "{%- set ns.separator = '\n\n' -%}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{ ns.separator + 'assistant: ' }}{%- endif -%}"
)


class ChatTemplateError(ValueError):
    """A chat template that cannot render a conversation as rlhfkit needs it."""


def render_chat(tokenizer: PreTrainedTokenizerBase, messages: Sequence[Message], *, add_generation_prompt: bool,
                tools: Sequence[dict] | None = None) -> str:
    """A conversation as text, with the ``tools`` it offers (``apply_chat_template(..., tools=...)``): the
    tokenizer's chat template when it has one, else rlhfkit's plain form (:data:`PLAIN_TEMPLATE`).

    Raises:
        ChatTemplateError: the template drops a tool call or the tools: a function's name is not in the text (a
            template written before tool use, as SmolLM2's, renders neither).
    """
    text = tokenizer.apply_chat_template(list(messages), tools=list(tools) if tools else None,
                                         chat_template=None if tokenizer.chat_template else PLAIN_TEMPLATE,
                                         add_generation_prompt=add_generation_prompt, tokenize=False)
    offered = [("the tools offered", tool["function"]["name"]) for tool in tools or ()]
    called = [(f"message {i}'s tool call", call["function"]["name"])
              for i, message in enumerate(messages) for call in message.get("tool_calls", ())]
    for what, name in offered + called:
        if name not in text:
            raise ChatTemplateError(f"the chat template drops {what} ({name!r} is not in its rendering); it cannot "
                                    "render tool use (use a model whose template can, or none for rlhfkit's own)")
    return text


def plain_chat_text(messages: Sequence[Message], tools: Sequence[dict] | None = None) -> str:
    """A conversation in rlhfkit's plain form (:data:`PLAIN_TEMPLATE`, no generation prompt), as a person reads it:
    ``role: text`` turns, tool calls and results included (what a labeling tool shows of a chat prompt)."""
    from transformers.utils.chat_template_utils import render_jinja_template

    rendered, _ = render_jinja_template([list(messages)], tools=list(tools) if tools else None,
                                        chat_template=PLAIN_TEMPLATE)
    return rendered[0]


def render_prompt(tokenizer: PreTrainedTokenizerBase, prompt: Prompt) -> str:
    """The text the model continues: the chat template with a generation prompt when the tokenizer
    has one (a plain string becomes one user message), else the plain prompt text (a list of messages
    in rlhfkit's plain form, see :func:`render_chat`). A :class:`~rlhfkit.data.records.Chat` prompt's tools are
    rendered with it."""
    if tokenizer.chat_template is None and isinstance(prompt, str):
        return prompt
    messages = [{"role": "user", "content": prompt}] if isinstance(prompt, str) else prompt
    return render_chat(tokenizer, messages, tools=tools_of(prompt), add_generation_prompt=True)


def token_ids(tokenizer: PreTrainedTokenizerBase, text: str | Sequence[str]) -> list[int] | list[list[int]]:
    """Token ids of ``text`` (or of each of a list of texts), no special tokens added. Every caller cuts them to its
    own window, so the tokenizer's warning about sequences longer than the model's maximum is not asked for."""
    return tokenizer(text if isinstance(text, str) else list(text), add_special_tokens=False,
                     verbose=False)["input_ids"]


def encode_prompt(tokenizer: PreTrainedTokenizerBase, prompt: Prompt) -> list[int]:
    """Token ids of the rendered prompt (the template itself holds any BOS token)."""
    return token_ids(tokenizer, render_prompt(tokenizer, prompt))


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
    completion_ids = token_ids(tokenizer, completion) + [tokenizer.eos_token_id]
    truncated = False
    if len(prompt_ids) > max_prompt_length:
        prompt_ids, truncated = prompt_ids[-max_prompt_length:], True
    room = max_length - len(prompt_ids)
    if len(completion_ids) > room:
        completion_ids, truncated = completion_ids[:room], True
    return Example(prompt_ids + completion_ids, [0] * len(prompt_ids) + [1] * len(completion_ids), truncated)


class TemplatePrefixError(ChatTemplateError):
    """A chat template whose rendering of a conversation does not extend its rendering of the conversation's
    start, so turns cannot be told apart by rendering prefixes (:func:`encode_conversation`)."""


def _extends(text: str, start: str, what: str) -> None:
    """Raise :class:`TemplatePrefixError` unless ``text`` begins with ``start``, showing where they part."""
    if text.startswith(start):
        return
    at = common_prefix_length(text, start)
    raise TemplatePrefixError(f"the chat template breaks the prefix property: {what} (at character {at}, expected "
                              f"{start[at:at + 40]!r}, the template gives {text[at:at + 40]!r}); with this template "
                              "only the last assistant turn can be trained (sft.loss_on: last_assistant_turn)")


def _reply_text(tokenizer: PreTrainedTokenizerBase, message: Message, before: str, after: str, i: int) -> str:
    """The text assistant message ``i`` generates, between ``before`` (the conversation up to it with the generation
    prompt) and ``after`` (up to and with it): its content; for a reply that calls tools, all the template adds for
    the message up to the EOS text (to the end when it has none), as it renders the calls its own way."""
    if "tool_calls" not in message:
        _extends(after, before + message["content"], f"messages[:{i + 1}] does not begin with messages[:{i}] and "
                                                     f"the generation prompt, then message {i}'s content")
        return message["content"]
    _extends(after, before, f"messages[:{i + 1}] does not begin with messages[:{i}] and the generation prompt")
    part = after[len(before):]
    end = part.find(tokenizer.eos_token)
    return part if end < 0 else part[:end]


def encode_conversation(tokenizer: PreTrainedTokenizerBase, messages: Sequence[Message], *,
                        max_length: int, max_prompt_length: int, every_turn: bool = True) -> Example:
    """A conversation with the loss on every assistant message (TRL's ``assistant_only_loss``), or on the last
    message only (``every_turn=False``; it must be the assistant's), and on nothing of its system, user and tool
    messages. A :class:`~rlhfkit.data.records.Chat` conversation's tools are rendered with it.

    The sequence is built turn by turn from renderings of the conversation's prefixes (:func:`render_chat`), not
    by searching the text: for a target assistant message ``i``, ``messages[:i]`` rendered with the generation
    prompt must extend the text placed so far, and its new part is context (tokenized on its own); ``messages[:i +
    1]`` rendered without it must extend that by the message's reply text: its content, or for a reply that calls
    tools, all the template adds for it up to the EOS text (:func:`_reply_text`). The target is the reply's
    tokens and EOS, as :func:`encode_demonstration` encodes a completion; the text the template puts after the
    reply is context, less the EOS text where the template puts it first (rlhfkit's template and ChatML's
    ``<|im_end|>`` do). With such a template the sequence is the template's rendering, tokenized turn by turn, and
    each turn's targets are exactly what the model generates in it, EOS included; a template that ends a turn with
    another marker gets the EOS as an extra token before it, as a single completion does. One assistant turn gives
    what :func:`encode_demonstration` gives.

    Too long: the context before the first reply keeps its last ``max_prompt_length`` tokens, then the sequence
    is cut to ``max_length`` (later turns are lost, their mask with them).

    Raises:
        TemplatePrefixError: the template's rendering of a longer prefix does not begin with that of a shorter
            one (a template that rewrites earlier turns, e.g. one that drops past reasoning).
        ChatTemplateError: the template drops the tools or a tool call (:func:`render_chat`).
    """
    tools = tools_of(messages)
    ids: list[int] = []
    mask: list[int] = []
    placed = ""  # the rendered text whose tokens are in ids
    targets = [i for i, m in enumerate(messages) if m["role"] == "assistant" and (every_turn or i == len(messages) - 1)]
    for i in targets:
        before = render_chat(tokenizer, messages[:i], tools=tools, add_generation_prompt=True)
        _extends(before, placed, f"messages[:{i}] with the generation prompt does not begin with the turns before")
        after = render_chat(tokenizer, messages[:i + 1], tools=tools, add_generation_prompt=False)
        reply_text = _reply_text(tokenizer, messages[i], before, after, i)
        context = token_ids(tokenizer, before[len(placed):])
        reply = token_ids(tokenizer, reply_text) + [tokenizer.eos_token_id]
        ids += context + reply
        mask += [0] * len(context) + [1] * len(reply)
        placed = before + reply_text
        if after.startswith(tokenizer.eos_token, len(placed)):
            placed += tokenizer.eos_token
    if not mask:
        raise ValueError("the conversation has no assistant message" if every_turn
                         else "the conversation does not end with an assistant message")
    truncated = False
    first = mask.index(1)
    if first > max_prompt_length:
        ids, mask, truncated = ids[first - max_prompt_length:], mask[first - max_prompt_length:], True
    if len(ids) > max_length:
        ids, mask, truncated = ids[:max_length], mask[:max_length], True
    return Example(ids, mask, truncated)


def pack_texts(tokenizer: PreTrainedTokenizerBase, texts: Sequence[str], block_size: int) -> list[Example]:
    """Concatenate documents (each ending in EOS) and cut the stream into ``block_size`` blocks.

    The standard pretraining layout: no padding, every token a target. The last partial block is
    dropped unless it is the only one.
    """
    stream: list[int] = []
    for ids in token_ids(tokenizer, texts):
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
