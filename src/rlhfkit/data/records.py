"""Record types for every kind of training data, and their validation.

Five kinds of record flow through rlhfkit (the JSON forms are the project's data formats):

* ``prompt``: ``{"prompt": str}`` or ``{"prompt": [{"role": ..., "content": ...}, ...]}`` (roles: system,
  user, assistant, tool)
* ``demonstration`` (SFT): ``{"prompt", "completion"}`` or ``{"messages": [...]}``, where the last
  message is the assistant's reply and the messages before it are the prompt (SFT can train the earlier
  assistant turns too: ``sft.loss_on``); the reply may call tools (its completion is then the message)
* ``ranking``: ``{"prompt", "completions": [str, ...], "ranking": [...]}``, best first; ties are
  groups, e.g. ``[[0, 2], [1], [3]]``. The same kind reads a set of pairwise judgements,
  ``{"prompt", "completions": [str, ...], "pairs": [[i, j, preference], ...]}`` (a :class:`PairSetRecord`):
  ``preference`` 1 means completion ``i`` is preferred, 2 means ``j`` is, 0 is a tie. Judgements need not
  form a ranking (qa-feedback's human preferences may be intransitive); a trainer uses both forms through
  ``prompt``, ``completions`` and ``pairs()``, the (winner, loser) pairs (tied pairs make none)
* ``preference``: ``{"prompt", "chosen", "rejected"}``, a ranking of two completions
* ``labeled`` (unpaired feedback, as KTO trains on): ``{"prompt", "completion", "label": bool}``, true
  when the completion is desirable; this kind also reads pairwise, ranking and pair-set objects (as
  kind ``ranking`` does), which a trainer can split into desirable and undesirable completions

Every record may also carry ``id`` (str or int, kept as str), ``labeler`` (str) and ``meta``
(dict). A prompt record keeps its other keys as ``fields`` (reward functions receive them, e.g. a reference
answer) and reads GSM8K's ``{"question", "answer"}`` with ``question`` as the prompt; other kinds ignore
other keys.

These forms include TRL's dataset formats (huggingface.co/docs/trl, "Dataset formats and types"), standard and
conversational, so a TRL file is read as it is: a completion, ``chosen`` or ``rejected`` may be a list of one
assistant message (TRL's conversational form), and a pairwise object without ``prompt`` has TRL's implicit prompt,
the start ``chosen`` and ``rejected`` share (:meth:`_Checker.implicit_prompt`). :func:`parse_record` validates a
decoded JSON object and raises a :class:`DataError` that names the source, line and field of the first problem it
finds.

Tool use (TRL's and transformers' chat format): an assistant message may carry ``tool_calls``, a list of
``{"type": "function", "function": {"name": str, "arguments": object or JSON string}}`` (an ``id`` is kept), and
then needs no ``content``; a ``tool`` message holds a tool's result in ``content`` and may name the function
(``name``) and the call (``tool_call_id``). A record with a conversational prompt may carry ``tools``, the JSON
schemas of the functions the model may call (``{"type": "function", "function": {"name", "description",
"parameters"}}``), which the chat template renders; the prompt is then a :class:`Chat`. Messages are normalized:
arguments become objects and a tool-calling reply without text gets ``content`` ``""``.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

#: A chat message: ``role`` and ``content`` (str), and for tool use ``tool_calls`` (assistant) or ``name`` and
#: ``tool_call_id`` (tool); see the module's docstring.
Message = dict[str, Any]


class Chat(list):
    """A conversational prompt that offers the model tools: the list of its messages, with the record's ``tools``
    (the JSON schemas of the functions it may call), which the chat template renders (``apply_chat_template(...,
    tools=...)``). A conversation without tools is a plain list. A slice or copy of a :class:`Chat` is a plain list,
    so code that builds a conversation from a prompt passes :func:`tools_of` on."""

    def __init__(self, messages: Sequence[Message], tools: Sequence[dict[str, Any]]) -> None:
        super().__init__(messages)
        self.tools = list(tools)

    def __eq__(self, other: object) -> bool:
        return list.__eq__(self, other) and tools_of(self) == tools_of(other)  # type: ignore[arg-type]

    def __ne__(self, other: object) -> bool:
        return not self == other

    __hash__ = None  # type: ignore[assignment]  # mutable, as a list is


Prompt = str | list[Message]


def tools_of(prompt: Prompt) -> list[dict[str, Any]] | None:
    """The tools a prompt offers the model (a :class:`Chat`'s), or None."""
    return prompt.tools if isinstance(prompt, Chat) else None


def with_tools(messages: Sequence[Message], tools: Sequence[dict[str, Any]] | None) -> list[Message]:
    """``messages`` as a prompt that offers ``tools``: a :class:`Chat`, or a plain list when there are none."""
    return Chat(messages, tools) if tools else list(messages)


def prompt_fields(prompt: Prompt) -> dict[str, Any]:
    """The JSON fields of a prompt, as :func:`parse_record` reads them back: ``prompt`` and, when it offers tools,
    the record-level ``tools``."""
    fields: dict[str, Any] = {"prompt": prompt if isinstance(prompt, str) else [dict(m) for m in prompt]}
    if tools_of(prompt):
        fields["tools"] = tools_of(prompt)
    return fields


RECORD_KINDS = ("prompt", "demonstration", "ranking", "preference", "labeled")
#: The optional keys every kind of record may carry.
_COMMON_KEYS = ("id", "labeler", "meta")
CHAT_ROLES = ("system", "user", "assistant", "tool")


class DataError(ValueError):
    """A bad record or data source, located by source, line (or row/record) and field.

    ``str(error)`` reads like ``"data/train.jsonl, line 12, field 'ranking': index 5 is out of
    range for 4 completions"``; the parts that are unknown are left out. ``unit`` names what
    ``line`` counts: ``"line"`` for text files, ``"record"`` for the items of a JSON list,
    ``"row"`` for dataset rows.
    """

    def __init__(
        self,
        message: str,
        *,
        source: str | None = None,
        line: int | None = None,
        field: str | None = None,
        unit: str = "line",
    ) -> None:
        super().__init__(message)
        self.message = message
        self.source = source
        self.line = line
        self.field = field
        self.unit = unit

    def __str__(self) -> str:
        parts = []
        if self.source is not None:
            parts.append(self.source)
        if self.line is not None:
            parts.append(f"{self.unit} {self.line}")
        if self.field is not None:
            parts.append(f"field {self.field!r}")
        where = ", ".join(parts)
        return f"{where}: {self.message}" if where else self.message


@dataclass(frozen=True)
class PromptRecord:
    """A prompt to generate from (PPO rollouts, evaluation); ``fields``: the object's other keys (for example
    GSM8K's reference ``answer``), which reward functions receive."""

    prompt: Prompt
    id: str | None = None
    labeler: str | None = None
    meta: dict[str, Any] | None = None
    fields: dict[str, Any] | None = None


@dataclass(frozen=True)
class DemonstrationRecord:
    """A prompt with a human-written completion, for supervised fine-tuning: the reply's text, or the assistant
    message itself when the reply calls tools (``tool_calls``)."""

    prompt: Prompt
    completion: str | Message
    id: str | None = None
    labeler: str | None = None
    meta: dict[str, Any] | None = None

    def conversation(self) -> list[Message]:
        """The prompt's messages (a string prompt is one user message) and the reply, with the prompt's tools."""
        prompt = [{"role": "user", "content": self.prompt}] if isinstance(self.prompt, str) else self.prompt
        reply = self.completion if isinstance(self.completion, dict) else {"role": "assistant",
                                                                            "content": self.completion}
        return with_tools([*prompt, reply], tools_of(self.prompt))


@dataclass(frozen=True)
class PreferenceRecord:
    """A prompt with two completions, ``chosen`` preferred over ``rejected``."""

    prompt: Prompt
    chosen: str
    rejected: str
    id: str | None = None
    labeler: str | None = None
    meta: dict[str, Any] | None = None

    def as_ranking(self) -> RankingRecord:
        """The same judgement as a ranking of K = 2 completions: ``(chosen, rejected)``."""
        return RankingRecord(
            prompt=self.prompt,
            completions=(self.chosen, self.rejected),
            ranking=((0,), (1,)),
            id=self.id,
            labeler=self.labeler,
            meta=self.meta,
        )


@dataclass(frozen=True)
class RankingRecord:
    """A prompt with K >= 2 completions ranked best first.

    ``ranking`` is always a tuple of tie groups, best group first, each group's indices sorted;
    together the groups cover every completion index exactly once. A ranking without ties has
    one index per group.
    """

    prompt: Prompt
    completions: tuple[str, ...]
    ranking: tuple[tuple[int, ...], ...]
    id: str | None = None
    labeler: str | None = None
    meta: dict[str, Any] | None = None

    def __post_init__(self) -> None:
        indices = sorted(i for group in self.ranking for i in group)
        if len(self.completions) < 2 or indices != list(range(len(self.completions))):
            raise ValueError(
                f"ranking {self.ranking!r} does not cover {len(self.completions)} completions "
                "exactly once (K must be at least 2)"
            )
        if any(not group for group in self.ranking):
            raise ValueError(f"ranking {self.ranking!r} has an empty group")

    def pairs(self) -> list[tuple[int, int]]:
        """Every ``(winner, loser)`` pair of indices where the winner's group ranks strictly higher.

        Tied completions make no pair. The order is deterministic: by the winner's group, then the
        winner's index, then the loser's group, then the loser's index. Without ties there are
        K(K-1)/2 pairs.
        """
        return [
            (winner, loser)
            for position, group in enumerate(self.ranking)
            for winner in group
            for worse_group in self.ranking[position + 1 :]
            for loser in worse_group
        ]

    def to_preferences(self) -> list[PreferenceRecord]:
        """One :class:`PreferenceRecord` per pair from :meth:`pairs`, sharing this record's id,
        labeler and meta."""
        return [
            PreferenceRecord(
                prompt=self.prompt,
                chosen=self.completions[winner],
                rejected=self.completions[loser],
                id=self.id,
                labeler=self.labeler,
                meta=self.meta,
            )
            for winner, loser in self.pairs()
        ]


PAIR_PREFERENCES = (0, 1, 2)  # tie, the first completion preferred, the second preferred


@dataclass(frozen=True)
class PairSetRecord:
    """A prompt with K >= 2 completions and a set of pairwise judgements among them.

    ``judgements`` holds ``(i, j, preference)`` triples: preference 1 means completion ``i`` is preferred,
    2 means ``j`` is, 0 means neither (a tie). Each unordered pair is judged at most once, at least one
    judgement prefers a completion, and the set need not be consistent with any ranking: it can hold a
    cycle (0 over 1, 1 over 2, 2 over 0), as qa-feedback's pairwise human preferences can. Its JSON form
    names the judgements ``"pairs"``.
    """

    prompt: Prompt
    completions: tuple[str, ...]
    judgements: tuple[tuple[int, int, int], ...]
    id: str | None = None
    labeler: str | None = None
    meta: dict[str, Any] | None = None

    def __post_init__(self) -> None:
        k = len(self.completions)
        if k < 2:
            raise ValueError(f"a pair set needs at least 2 completions, got {k}")
        judged: set[frozenset[int]] = set()
        for i, j, preference in self.judgements:
            if not (0 <= i < k and 0 <= j < k) or i == j or preference not in PAIR_PREFERENCES:
                raise ValueError(f"bad judgement ({i}, {j}, {preference}) for {k} completions")
            if frozenset((i, j)) in judged:
                raise ValueError(f"completions {i} and {j} are judged more than once")
            judged.add(frozenset((i, j)))
        if not self.pairs():
            raise ValueError("every judgement is a tie, so the set prefers no completion")

    def pairs(self) -> list[tuple[int, int]]:
        """The ``(winner, loser)`` pair of every judgement that is not a tie, in the judgements' order."""
        return [(i, j) if preference == 1 else (j, i) for i, j, preference in self.judgements if preference]

    def ties(self) -> list[tuple[int, int]]:
        """The ``(i, j)`` pairs judged a tie (no trainer learns from them; they are kept as the labelers said)."""
        return [(i, j) for i, j, preference in self.judgements if not preference]


@dataclass(frozen=True)
class LabeledRecord:
    """A prompt with one completion judged on its own: ``label`` is True when it is desirable (KTO)."""

    prompt: Prompt
    completion: str
    label: bool
    id: str | None = None
    labeler: str | None = None
    meta: dict[str, Any] | None = None


Record = PromptRecord | DemonstrationRecord | RankingRecord | PairSetRecord | PreferenceRecord | LabeledRecord


class _Checker:
    """Validates the fields of one raw object, raising :class:`DataError` at its location."""

    def __init__(self, obj: dict, source: str | None, line: int | None, unit: str) -> None:
        self.obj = obj
        self.source = source
        self.line = line
        self.unit = unit

    def error(self, field: str | None, message: str) -> DataError:
        return DataError(message, source=self.source, line=self.line, field=field, unit=self.unit)

    def require(self, key: str) -> Any:
        """The value of a required key; a missing key or a null value is an error."""
        value = self.obj.get(key)
        if value is None:
            raise self.error(key, "is missing" if key not in self.obj else "is null")
        return value

    def text(self, value: Any, field: str) -> str:
        """A string with some non-whitespace content."""
        if not isinstance(value, str):
            raise self.error(field, f"expected a string, got {_type_name(value)}")
        if not value.strip():
            raise self.error(field, "is empty")
        return value

    def prompt(self) -> Prompt:
        """The required ``prompt``: non-empty text or a non-empty list of chat messages (with the record's
        ``tools``, see :meth:`chat`)."""
        value = self.require("prompt")
        if isinstance(value, list):
            if not value:
                raise self.error("prompt", "has no messages")
            return self.chat(self.messages(value, "prompt"))
        if not isinstance(value, str):
            raise self.error("prompt", f"expected a string or a list of messages, got {_type_name(value)}")
        if self.obj.get("tools") is not None:
            raise self.error("tools", "needs a conversational prompt (a list of messages) to offer the tools in")
        return self.text(value, "prompt")

    def chat(self, messages: list[Message]) -> list[Message]:
        """A conversational prompt with the record's optional ``tools``: a list of function schemas, objects
        that name their function (``{"type": "function", "function": {"name": ..., ...}}``)."""
        tools = self.obj.get("tools")
        if tools is None:
            return messages
        if not isinstance(tools, list):
            raise self.error("tools", f"expected a list of function schemas (objects), got {_type_name(tools)}")
        for position, tool in enumerate(tools):
            where = f"tools[{position}]"
            if not isinstance(tool, dict):
                raise self.error(where, f"expected a function schema (an object), got {_type_name(tool)}")
            self.function_name(tool, where)
        return with_tools(messages, tools)

    def function_name(self, obj: dict, where: str) -> str:
        """The name in ``obj["function"]`` (a tool call's or a tool schema's), which must be an object."""
        function = obj.get("function")
        if not isinstance(function, dict):
            raise self.error(f"{where}.function", "is missing" if function is None
                             else f"expected an object, got {_type_name(function)}")
        if function.get("name") is None:
            raise self.error(f"{where}.function.name", "is missing")
        return self.text(function["name"], f"{where}.function.name")

    def messages(self, value: Any, field: str) -> list[Message]:
        """A list of chat messages, each reduced to what a chat template reads: ``role`` and ``content``, an
        assistant's ``tool_calls`` (:meth:`tool_calls`; with them ``content`` may be absent, read as ``""``) and a
        tool message's ``name`` and ``tool_call_id``."""
        if not isinstance(value, list):
            raise self.error(field, f"expected a list of messages, got {_type_name(value)}")
        messages = []
        for position, message in enumerate(value):
            where = f"{field}[{position}]"
            if not isinstance(message, dict):
                raise self.error(where, f"expected a message object, got {_type_name(message)}")
            role = message.get("role")
            if role is None:
                raise self.error(f"{where}.role", "is missing")
            if role not in CHAT_ROLES:
                raise self.error(f"{where}.role", f"unknown role {role!r}; expected one of {CHAT_ROLES}")
            calls = message.get("tool_calls")
            if calls is not None and role != "assistant":
                raise self.error(f"{where}.tool_calls", f"only an assistant message calls tools, not a {role} message")
            content = message.get("content")
            if calls is not None and content in (None, ""):
                content = ""
            elif content is None:
                result = " (the tool's result)" if role == "tool" else ""
                raise self.error(f"{where}.content", f"is missing{result}")
            else:
                content = self.text(content, f"{where}.content")
            normalized: Message = {"role": role, "content": content}
            if calls is not None:
                normalized["tool_calls"] = self.tool_calls(calls, f"{where}.tool_calls")
            if role == "tool":
                for key in ("name", "tool_call_id"):
                    if message.get(key) is not None:
                        normalized[key] = self.text(message[key], f"{where}.{key}")
            messages.append(normalized)
        return messages

    def tool_calls(self, value: Any, field: str) -> list[dict[str, Any]]:
        """An assistant's tool calls, ``[{"type": "function", "function": {"name", "arguments"}}, ...]`` (an ``id``
        is kept), with each call's arguments as an object (a JSON string of one is decoded)."""
        if not isinstance(value, list) or not value:
            raise self.error(field, f"expected a non-empty list of tool calls, got {value!r}"[:200])
        calls = []
        for position, call in enumerate(value):
            where = f"{field}[{position}]"
            if not isinstance(call, dict):
                raise self.error(where, f"expected a tool call object, got {_type_name(call)}")
            if call.get("type", "function") != "function":
                raise self.error(f"{where}.type", f"expected 'function', got {call['type']!r}")
            name = self.function_name(call, where)
            arguments = call["function"].get("arguments")
            if isinstance(arguments, str):
                try:
                    arguments = json.loads(arguments)
                except json.JSONDecodeError as exc:
                    raise self.error(f"{where}.function.arguments",
                                     f"is a string but not JSON: {exc.msg} (column {exc.colno})") from None
            if not isinstance(arguments, dict):
                raise self.error(f"{where}.function.arguments", "is missing" if arguments is None else
                                 f"expected an object (or a JSON string of one), got {_type_name(arguments)}")
            normalized: dict[str, Any] = {"type": "function", "function": {"name": name, "arguments": arguments}}
            if call.get("id") is not None:
                normalized["id"] = self.text(call["id"], f"{where}.id")
            calls.append(normalized)
        return calls

    def common(self) -> dict[str, Any]:  # the keys of _COMMON_KEYS
        """The optional ``id``, ``labeler`` and ``meta`` fields (null counts as absent)."""
        record_id = self.obj.get("id")
        if record_id is not None:
            if isinstance(record_id, bool) or not isinstance(record_id, (str, int)):
                raise self.error("id", f"expected a string or an integer, got {_type_name(record_id)}")
            record_id = str(record_id)
        labeler = self.obj.get("labeler")
        if labeler is not None and not isinstance(labeler, str):
            raise self.error("labeler", f"expected a string, got {_type_name(labeler)}")
        meta = self.obj.get("meta")
        if meta is not None and not isinstance(meta, dict):
            raise self.error("meta", f"expected an object, got {_type_name(meta)}")
        return {"id": record_id, "labeler": labeler, "meta": meta}

    def ranking(self, value: Any, k: int) -> tuple[tuple[int, ...], ...]:
        """Tie groups, best first, each sorted, covering ``range(k)`` exactly once.

        A flat list of indices is a ranking without ties; a bare index among groups is a group
        of one.
        """
        if not isinstance(value, list):
            raise self.error("ranking", f"expected a list, got {_type_name(value)}")
        groups = [item if isinstance(item, list) else [item] for item in value]
        for group in groups:
            if not group:
                raise self.error("ranking", "has an empty tie group")
            for index in group:
                if isinstance(index, bool) or not isinstance(index, int):
                    raise self.error("ranking", f"index {index!r} is not an integer")
        count = sum(len(group) for group in groups)
        if count != k:
            raise self.error("ranking", f"ranks {count} indices but there are {k} completions")
        seen: set[int] = set()
        for index in (index for group in groups for index in group):
            if not 0 <= index < k:
                raise self.error("ranking", f"index {index} is out of range for {k} completions")
            if index in seen:
                raise self.error("ranking", f"index {index} appears more than once")
            seen.add(index)
        if len(groups) < 2:
            raise self.error("ranking", "ties every completion, so it prefers none")
        return tuple(tuple(sorted(group)) for group in groups)

    def judgements(self, value: Any, k: int) -> tuple[tuple[int, int, int], ...]:
        """``[[i, j, preference], ...]``: indices into ``k`` completions, preference 0 (tie), 1 or 2."""
        if not isinstance(value, list):
            raise self.error("pairs", f"expected a list of (i, j, preference) triples, got {_type_name(value)}")
        if not value:
            raise self.error("pairs", "has no judgement")
        triples: list[tuple[int, int, int]] = []
        judged: dict[frozenset[int], int] = {}
        for n, item in enumerate(value):
            where = f"pairs[{n}]"
            if not isinstance(item, list) or len(item) != 3 or any(
                isinstance(x, bool) or not isinstance(x, int) for x in item
            ):
                raise self.error(where, f"expected three integers (i, j, preference), got {item!r}")
            i, j, preference = item
            for index in (i, j):
                if not 0 <= index < k:
                    raise self.error(where, f"index {index} is out of range for {k} completions")
            if i == j:
                raise self.error(where, f"judges completion {i} against itself")
            if preference not in PAIR_PREFERENCES:
                raise self.error(where, f"preference {preference} is not 0 (tie), 1 (i preferred) or 2 (j preferred)")
            earlier = judged.setdefault(frozenset((i, j)), n)
            if earlier != n:
                raise self.error(where, f"judges completions {i} and {j} again (pairs[{earlier}] did)")
            triples.append((i, j, preference))
        if not any(preference for _, _, preference in triples):
            raise self.error("pairs", "ties every pair, so it prefers none")
        return tuple(triples)

    def completion(self, key: str, *, calls_tools: bool = False) -> str | Message:
        """The completion at ``key``: text, or TRL's conversational form, a list of one assistant message (its
        text; the message itself when it calls tools, which only ``calls_tools`` allows)."""
        value = self.require(key)
        if not isinstance(value, list):
            return self.text(value, key)
        messages = self.messages(value, key)
        if len(messages) != 1 or messages[0]["role"] != "assistant":
            roles = ", ".join(m["role"] for m in messages) or "none"
            raise self.error(key, f"expected a string or a list of one assistant message, got messages of roles "
                                  f"{roles} (an rlhfkit completion is one reply)")
        return self.reply(messages[0], key, calls_tools=calls_tools)

    def reply(self, message: Message, field: str, *, calls_tools: bool) -> str | Message:
        """An assistant message as a completion: its text, or (``calls_tools``) the message when it calls tools."""
        if "tool_calls" not in message:
            return message["content"]
        if not calls_tools:
            raise self.error(field, "a reply that calls tools is read as a demonstration only (SFT); compared or "
                                    "labeled completions are text")
        return message

    def implicit_prompt(self) -> tuple[Prompt, str, str]:
        """TRL's preference with an implicit prompt: ``chosen`` and ``rejected`` each hold the whole text, and the
        prompt is what they share at the start.

        Conversational (lists of messages): the leading messages both hold are the prompt, and after them each
        must hold one assistant message. Standard (strings): the shared text up to its last whitespace is the
        prompt (so a word both start alike is not split), and the rest of each is its completion.
        """
        chosen, rejected = self.require("chosen"), self.require("rejected")
        if isinstance(chosen, list) and isinstance(rejected, list):
            chosen, rejected = self.messages(chosen, "chosen"), self.messages(rejected, "rejected")
            shared = common_prefix_length(chosen, rejected)
            if shared == 0:
                raise self.error("prompt", "is missing, and 'chosen' and 'rejected' start with different messages "
                                           "(no implicit prompt)")
            replies = []
            for key, messages in (("chosen", chosen), ("rejected", rejected)):
                rest = messages[shared:]
                if len(rest) != 1 or rest[0]["role"] != "assistant":
                    raise self.error(key, f"expected one assistant message after the implicit prompt (the leading "
                                          f"messages both sides share: {shared}), got {len(rest)}")
                replies.append(self.reply(rest[0], key, calls_tools=False))
            return self.chat(chosen[:shared]), replies[0], replies[1]
        if isinstance(chosen, str) and isinstance(rejected, str):
            if self.obj.get("tools") is not None:
                raise self.error("tools", "needs conversational 'chosen' and 'rejected' (lists of messages)")
            shared = common_prefix_length(chosen, rejected)
            cut = max((i + 1 for i in range(shared) if chosen[i].isspace()), default=0)
            if not chosen[:cut].strip():
                raise self.error("prompt", "is missing, and 'chosen' and 'rejected' share no leading words "
                                           "(no implicit prompt)")
            return chosen[:cut], self.text(chosen[cut:], "chosen"), self.text(rejected[cut:], "rejected")
        raise self.error("prompt", "is missing; for an implicit prompt 'chosen' and 'rejected' must be both strings "
                                   "or both lists of messages")

    def pairwise(self) -> tuple[Prompt, str, str]:
        """The prompt, chosen and rejected completions of a pairwise object (TRL's preference formats: with a
        ``prompt``, or an implicit one when it is absent)."""
        if "prompt" in self.obj:
            prompt, chosen, rejected = self.prompt(), self.completion("chosen"), self.completion("rejected")
        else:
            prompt, chosen, rejected = self.implicit_prompt()
        if chosen == rejected:
            raise self.error("rejected", "is identical to 'chosen'")
        return prompt, chosen, rejected


def common_prefix_length(a: Sequence, b: Sequence) -> int:
    """How many leading elements (characters, messages) ``a`` and ``b`` share."""
    return next((i for i, (x, y) in enumerate(zip(a, b, strict=False)) if x != y), min(len(a), len(b)))


def _type_name(value: Any) -> str:
    return "null" if value is None else type(value).__name__


def parse_record(
    obj: object,
    kind: str,
    *,
    source: str | None = None,
    line: int | None = None,
    unit: str = "line",
) -> Record:
    """Validate one decoded JSON object and build the record of the given ``kind``.

    Kind ``"ranking"`` also accepts a pairwise object (``chosen``/``rejected``) and turns it into a
    K = 2 ranking, and reads an object with ``pairs`` as a :class:`PairSetRecord`; kind ``"preference"``
    accepts only pairwise objects. Kind ``"labeled"`` reads an object with a ``label`` as a
    :class:`LabeledRecord` and any other object as kind ``"ranking"`` does.
    ``source``, ``line`` and ``unit`` locate the object in error messages (see :class:`DataError`).

    Raises:
        ValueError: ``kind`` is not one of :data:`RECORD_KINDS`.
        DataError: the object is not a valid record of that kind.
    """
    if kind not in RECORD_KINDS:
        raise ValueError(f"unknown record kind {kind!r}; expected one of {RECORD_KINDS}")
    if not isinstance(obj, dict):
        raise DataError(f"expected a JSON object, got {_type_name(obj)}", source=source, line=line, unit=unit)
    check = _Checker(obj, source, line, unit)

    if kind == "prompt":
        if "prompt" not in obj and "question" in obj:  # GSM8K's {"question", "answer"}
            prompt, used = check.text(obj["question"], "question"), "question"
        else:
            prompt, used = check.prompt(), "prompt"
        fields = {key: value for key, value in obj.items() if key not in (used, "tools", *_COMMON_KEYS)}
        return PromptRecord(prompt, **check.common(), fields=fields or None)

    if kind == "demonstration":
        if "text" in obj and not {"prompt", "messages"} & set(obj):
            raise check.error("text", "a language-modelling row is pretraining text (rlhfkit pretrain reads it); "
                                      "a demonstration needs 'prompt' and 'completion', or 'messages'")
        if "completion" not in obj and "messages" in obj:
            messages = check.messages(obj["messages"], "messages")
            if not messages:
                raise check.error("messages", "has no messages")
            if messages[-1]["role"] != "assistant":
                raise check.error("messages", "the last message must be the assistant's reply")
            if len(messages) < 2:
                raise check.error("messages", "needs at least one message before the assistant's reply")
            reply = check.reply(messages[-1], f"messages[{len(messages) - 1}]", calls_tools=True)
            return DemonstrationRecord(check.chat(messages[:-1]), reply, **check.common())
        prompt = check.prompt()
        return DemonstrationRecord(prompt, check.completion("completion", calls_tools=True), **check.common())

    if kind == "labeled" and ("label" in obj or "completion" in obj):
        prompt = check.prompt()
        completion = check.completion("completion")
        label = check.require("label")
        if isinstance(label, str) and label.strip().lower() in ("true", "false"):  # CSV cells are text
            label = label.strip().lower() == "true"
        if not isinstance(label, bool):
            raise check.error("label", f"expected true (desirable) or false (undesirable), got {label!r}")
        return LabeledRecord(prompt, completion, label, **check.common())

    if kind == "preference":
        if "chosen" not in obj and "completions" in obj:
            raise check.error("chosen", "is missing (a K-way ranking needs kind 'ranking')")
        return PreferenceRecord(*check.pairwise(), **check.common())

    if "completions" not in obj and ("chosen" in obj or "rejected" in obj):
        return PreferenceRecord(*check.pairwise(), **check.common()).as_ranking()
    prompt = check.prompt()
    completions = check.require("completions")
    if not isinstance(completions, list):
        raise check.error("completions", f"expected a list of strings, got {_type_name(completions)}")
    if len(completions) < 2:
        raise check.error("completions", f"needs at least 2 completions, got {len(completions)}")
    texts = tuple(check.text(text, f"completions[{i}]") for i, text in enumerate(completions))
    if "pairs" in obj:
        if "ranking" in obj:
            raise check.error("pairs", "give either 'ranking' or 'pairs', not both")
        judgements = check.judgements(obj["pairs"], len(texts))
        for n, (i, j, preference) in enumerate(judgements):
            if preference and texts[i] == texts[j]:
                raise check.error(f"pairs[{n}]", f"completions {i} and {j} are identical but one is preferred "
                                  "(judge them a tie)")
        return PairSetRecord(prompt, texts, judgements, **check.common())
    ranking = check.ranking(check.require("ranking"), len(texts))
    group_of = {i: g for g, group in enumerate(ranking) for i in group}
    first_seen: dict[str, int] = {}
    for i, text in enumerate(texts):
        j = first_seen.setdefault(text, i)
        if group_of[j] != group_of[i]:
            raise check.error("ranking", f"completions {j} and {i} are identical but ranked apart (tie them)")
    return RankingRecord(prompt, texts, ranking, **check.common())


def record_to_dict(record: Record) -> dict[str, Any]:
    """The JSON form of a record, as :func:`parse_record` reads it back.

    A ranking is written as a flat list of indices when it has no ties, as groups otherwise;
    ``id``, ``labeler`` and ``meta`` are left out when they are None.
    """
    if not isinstance(record, Record):
        raise TypeError(f"not a record: {type(record).__name__}")
    row = prompt_fields(record.prompt)
    if isinstance(record, DemonstrationRecord):
        completion = record.completion
        row["completion"] = [completion] if isinstance(completion, dict) else completion
    elif isinstance(record, LabeledRecord):
        row["completion"] = record.completion
        row["label"] = record.label
    elif isinstance(record, PreferenceRecord):
        row["chosen"] = record.chosen
        row["rejected"] = record.rejected
    elif isinstance(record, PairSetRecord):
        row["completions"] = list(record.completions)
        row["pairs"] = [list(judgement) for judgement in record.judgements]
    elif isinstance(record, RankingRecord):
        row["completions"] = list(record.completions)
        if all(len(group) == 1 for group in record.ranking):
            row["ranking"] = [group[0] for group in record.ranking]
        else:
            row["ranking"] = [list(group) for group in record.ranking]
    for key in _COMMON_KEYS:
        value = getattr(record, key)
        if value is not None:
            row[key] = value
    if isinstance(record, PromptRecord) and record.fields:
        row.update(record.fields)
    return row
