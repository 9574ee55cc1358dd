"""Public human-feedback layouts, turned into rlhfkit records.

One function per layout takes one raw row (a decoded JSON object) and returns the records it holds; a
row that breaks its layout raises :class:`~rlhfkit.data.records.DataError` naming the source, line and
raw field, and a row that follows its layout but holds nothing to train on raises :class:`SkipRow`
with the reason (:func:`read_public` counts those). The layouts (``read_public(path, layout)``,
``rlhfkit convert-data --layout``):

* ``hh``: Anthropic hh-rlhf (Bai et al. 2022, "Training a helpful and harmless assistant with RLHF";
  github.com/anthropics/hh-rlhf), :func:`hh_rlhf`.
* ``qa-feedback``: FineGrainedRLHF's qa-feedback preferences (Wu et al. 2023, "Fine-grained human
  feedback gives better rewards for language model training"; github.com/allenai/FineGrainedRLHF),
  :func:`qa_feedback`.
* ``oasst``: Open-Assistant message trees (Köpf et al. 2023, "OpenAssistant Conversations"; the
  ``*.trees.jsonl`` files of the oasst1 / oasst2 releases), :func:`oasst_tree`.
* ``self-instruct``: the self-instruct seed tasks (Wang et al. 2023, "Self-Instruct";
  github.com/yizhongw/self-instruct, ``seed_tasks.jsonl``), :func:`self_instruct`.
* ``trl``: TRL's dataset formats, standard and conversational (huggingface.co/docs/trl, "Dataset
  formats and types"), :func:`trl_row`. Every stage reads these files as they are too; converting one
  writes rlhfkit's own forms.

The records are written as rlhfkit's own JSON forms by :func:`~rlhfkit.data.readers.write_jsonl` and read
back by :func:`~rlhfkit.data.readers.read_records`.
"""

from __future__ import annotations

import os
from collections import Counter
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field, replace
from typing import Any

from rlhfkit.data.readers import _rows
from rlhfkit.data.records import (
    DataError,
    DemonstrationRecord,
    Message,
    PairSetRecord,
    PreferenceRecord,
    RankingRecord,
    Record,
    parse_record,
)


class SkipRow(Exception):
    """A row that follows its layout but holds nothing to train on; ``str(error)`` is the reason."""


@dataclass(frozen=True)
class Where:
    """Where a raw row came from, for error messages (see :class:`~rlhfkit.data.records.DataError`)."""

    source: str | None = None
    line: int | None = None
    unit: str = "line"
    prefix: str = ""  # the path to a nested object, e.g. "prompt.replies[1]", that field names start with

    def error(self, field: str | None, message: str) -> DataError:
        if self.prefix:
            field = f"{self.prefix}.{field}" if field else self.prefix
        return DataError(message, source=self.source, line=self.line, field=field, unit=self.unit)

    def at(self, path: str) -> Where:
        """The same row, with field names inside the nested object at ``path``."""
        return replace(self, prefix=path)

    def parse(self, obj: dict, kind: str) -> Record:
        """Validate a record in rlhfkit's JSON form with the record checks, located at this row."""
        return parse_record(obj, kind, source=self.source, line=self.line, unit=self.unit)


def _text(row: dict, key: str, where: Where, *, allow_empty: bool = False) -> str:
    """The string at ``row[key]``; a missing key or another type is a :class:`DataError` on that field."""
    if key not in row:
        raise where.error(key, "is missing")
    value = row[key]
    if not isinstance(value, str):
        raise where.error(key, f"expected a string, got {type(value).__name__}")
    if not allow_empty and not value.strip():
        raise where.error(key, "is empty")
    return value


# --- Anthropic hh-rlhf ---------------------------------------------------------------------------------

HH_MARKERS = (("\n\nHuman:", "user"), ("\n\nAssistant:", "assistant"))


def hh_turns(dialogue: str) -> list[Message] | None:
    """``"\\n\\nHuman: a\\n\\nAssistant: b ..."`` as chat messages (Human -> user, Assistant -> assistant).

    A turn runs to the next ``"\\n\\nHuman:"`` or ``"\\n\\nAssistant:"`` marker; ``"Human:"`` inside a
    turn without the blank line before it stays part of the turn. Contents are stripped (and may be empty).
    None when the text does not start with a marker.
    """
    messages: list[Message] = []
    rest = dialogue
    while rest:
        for marker, role in HH_MARKERS:
            if rest.startswith(marker):
                rest = rest[len(marker):]
                ends = [i for i in (rest.find(m) for m, _ in HH_MARKERS) if i >= 0]
                cut = min(ends, default=len(rest))
                messages.append({"role": role, "content": rest[:cut].strip()})
                rest = rest[cut:]
                break
        else:
            return None
    return messages


def hh_rlhf(row: dict, where: Where = Where()) -> list[PreferenceRecord]:
    """An hh-rlhf row ``{"chosen", "rejected"}`` as one pairwise record.

    Both fields are full dialogues (``"\\n\\nHuman: ...\\n\\nAssistant: ..."``) that share every turn before
    the last assistant reply. The shared turns become the prompt as chat messages (turns left empty are
    dropped) and the two final replies the ``chosen`` / ``rejected`` completions.

    Raises:
        DataError: a field is missing, not text, or not an hh dialogue ending with an assistant reply.
        SkipRow: the dialogues differ before their last reply (in the released data a few generated
            replies contain an unmarked ``"Human:"`` turn), a final reply is empty, the two replies are
            identical, or the prompt has no text.
    """
    dialogues = {}
    for key in ("chosen", "rejected"):
        turns = hh_turns(_text(row, key, where))
        if turns is None:
            raise where.error(key, "is not an hh dialogue: it must start with '\\n\\nHuman:'")
        if turns[-1]["role"] != "assistant":
            raise where.error(key, "does not end with an assistant reply")
        dialogues[key] = turns
    chosen, rejected = dialogues["chosen"], dialogues["rejected"]
    if chosen[:-1] != rejected[:-1]:
        raise SkipRow("the dialogues differ before the last reply")
    if not chosen[-1]["content"] or not rejected[-1]["content"]:
        raise SkipRow("an empty final reply")
    if chosen[-1]["content"] == rejected[-1]["content"]:
        raise SkipRow("identical final replies")
    prompt = [m for m in chosen[:-1] if m["content"]]
    if not prompt:
        raise SkipRow("no prompt text")
    obj = {"prompt": prompt, "chosen": chosen[-1]["content"], "rejected": rejected[-1]["content"]}
    return [where.parse(obj, "preference")]


# --- qa-feedback (FineGrainedRLHF) -----------------------------------------------------------------------

QA_FEEDBACK_PAIRS = ((0, 1), (0, 2), (0, 3), (1, 2), (1, 3), (2, 3))  # the order of "preference"


def qa_feedback_prompt(question: str, passages: list) -> str:
    """Each grounding passage as ``"title: sentence sentence ..."`` on its own line, then a blank line and
    ``"Question: ..."``; the question alone when there is no passage.

    The question comes last because rlhfkit keeps the last tokens of a prompt that is too long. Runs of
    whitespace inside a passage become one space.
    """
    if not passages:
        return question.strip()
    lines = [f"{passage[0].strip()}: {' '.join(' '.join(passage[1:]).split())}" for passage in passages]
    return "\n".join(lines) + f"\n\nQuestion: {question.strip()}"


def qa_feedback(row: dict, where: Where = Where()) -> list[PairSetRecord]:
    """A qa-feedback row as one pair-set record: four answers and six pairwise human judgements.

    The row holds ``question``, ``passages`` (lists ``[title, sentence, ...]`` the answers were written
    from; a few rows have none), ``prediction 1`` .. ``prediction 4`` and ``preference``: six values for
    the pairs 1v2, 1v3, 1v4, 2v3, 2v4, 3v4, where 1 prefers the first answer, 2 the second and 0 neither.
    The judgements are kept as they are, ties included (they need not form a ranking); the prompt is
    :func:`qa_feedback_prompt` (the answers were judged against the passages).

    Raises:
        DataError: a field is missing or malformed.
        SkipRow: all six pairs are ties (the row prefers no answer).
    """
    question = _text(row, "question", where)
    passages = row.get("passages")
    if not isinstance(passages, list) or not all(
        isinstance(p, list) and len(p) >= 2 and all(isinstance(s, str) for s in p) for p in passages
    ):
        raise where.error("passages", "expected a list of passages, each a list of strings (a title, then sentences)")
    answers = [_text(row, f"prediction {n}", where) for n in range(1, 5)]
    preference = row.get("preference")
    if not isinstance(preference, list) or len(preference) != len(QA_FEEDBACK_PAIRS) or any(
        isinstance(p, bool) or p not in (0, 1, 2) for p in preference
    ):
        raise where.error("preference", f"expected 6 values, each 0, 1 or 2, got {preference!r}")
    if not any(preference):
        raise SkipRow("every pair tied")
    obj = {"prompt": qa_feedback_prompt(question, passages), "completions": answers,
           "pairs": [[i, j, p] for (i, j), p in zip(QA_FEEDBACK_PAIRS, preference, strict=True)]}
    return [where.parse(obj, "ranking")]


# --- Open-Assistant message trees -----------------------------------------------------------------------

OASST_ROLES = {"prompter": "user", "assistant": "assistant"}


def oasst_tree(row: dict, where: Where = Where()) -> list[RankingRecord]:
    """An Open-Assistant message tree as one ranking per set of ranked sibling assistant replies.

    The oasst1 / oasst2 ``*.trees.jsonl`` layout: a row is ``{"message_tree_id", "prompt": message, ...}``
    and a message is ``{"message_id", "text", "role": "prompter" | "assistant", "rank", "deleted", "lang",
    "replies": [message, ...], ...}``, where ``rank`` (0 best, null when unranked) orders the replies to
    one parent. Wherever two or more non-deleted assistant replies to one message carry a rank, they make
    a ranking: the conversation from the root down to that message is the prompt (prompter -> user), the
    replies are the completions, best first, and equal ranks are ties. A reply whose text repeats a
    better-ranked sibling's is dropped. Deleted messages and their subtrees are left out. Each record's
    ``id`` is the parent's ``message_id``; ``meta`` holds ``message_tree_id`` and the parent's ``lang``.

    Raises:
        DataError: a message is not an object, lacks ``text`` or ``role``, or has a ``rank`` that is not an
            integer or null.
        SkipRow: the tree holds no ranked assistant replies.
    """
    root = row.get("prompt")
    if not isinstance(root, dict):
        raise where.error("prompt", "expected the root message (an object)")
    tree_id = row.get("message_tree_id")
    records: list[RankingRecord] = []

    def visit(message: dict, path: str, history: list[Message]) -> None:
        role = message.get("role")
        if role not in OASST_ROLES:
            raise where.error(f"{path}.role", f"expected 'prompter' or 'assistant', got {role!r}")
        history = [*history, {"role": OASST_ROLES[role], "content": _text(message, "text", where.at(path))}]
        replies = message.get("replies", [])
        if not isinstance(replies, list) or not all(isinstance(r, dict) for r in replies):
            raise where.error(f"{path}.replies", "expected a list of message objects")
        kept = [(n, r) for n, r in enumerate(replies) if not r.get("deleted")]
        ranked = []
        for n, reply in kept:
            rank = reply.get("rank")
            if rank is not None and (isinstance(rank, bool) or not isinstance(rank, int)):
                raise where.error(f"{path}.replies[{n}].rank", f"expected an integer or null, got {rank!r}")
            if rank is not None and reply.get("role") == "assistant":
                ranked.append((rank, _text(reply, "text", where.at(f"{path}.replies[{n}]"))))
        ranked.sort(key=lambda item: item[0])
        texts: list[str] = []
        groups: dict[int, list[int]] = {}
        for rank, text in ranked:
            if text not in texts:
                groups.setdefault(rank, []).append(len(texts))
                texts.append(text)
        if len(texts) >= 2 and len(groups) >= 2:
            meta = {"message_tree_id": tree_id, "lang": message.get("lang")}
            obj = {"prompt": history, "completions": texts, "ranking": list(groups.values()),
                   "id": message.get("message_id"), "meta": {k: v for k, v in meta.items() if v is not None}}
            records.append(where.parse(obj, "ranking"))
        for n, reply in kept:
            visit(reply, f"{path}.replies[{n}]", history)

    visit(root, "prompt", [])
    if not records:
        raise SkipRow("no ranked assistant replies")
    return records


# --- self-instruct seed tasks ---------------------------------------------------------------------------


def self_instruct(row: dict, where: Where = Where()) -> list[DemonstrationRecord]:
    """A self-instruct seed task as one demonstration per instance.

    A row is ``{"id", "name", "instruction", "instances": [{"input", "output"}, ...], "is_classification"}``.
    The prompt is the instruction, followed by a blank line and the instance's input when it has one; the
    output is the human-written completion. The ``id`` is the task's (``"-<n>"`` is appended when a task has
    several instances); ``meta`` holds ``name`` and ``is_classification``.

    Raises:
        DataError: a field is missing or malformed, or an output is empty.
    """
    instruction = _text(row, "instruction", where)
    instances = row.get("instances")
    if not isinstance(instances, list) or not instances or not all(isinstance(i, dict) for i in instances):
        raise where.error("instances", "expected a non-empty list of {input, output} objects")
    task_id = row.get("id")
    meta = {key: row[key] for key in ("name", "is_classification") if row.get(key) is not None}
    records = []
    for n, instance in enumerate(instances):
        at = where.at(f"instances[{n}]")
        task_input = _text(instance, "input", at, allow_empty=True).strip()
        obj = {"prompt": f"{instruction.strip()}\n\n{task_input}" if task_input else instruction.strip(),
               "completion": _text(instance, "output", at).strip(), "meta": meta or None}
        if task_id is not None:
            obj["id"] = f"{task_id}-{n}" if len(instances) > 1 else task_id
        records.append(where.parse(obj, "demonstration"))
    return records


# --- TRL dataset formats --------------------------------------------------------------------------------


def trl_row(row: dict, where: Where = Where()) -> list[Record]:
    """A row in one of TRL's dataset formats, standard (strings) or conversational (lists of messages).

    The row's columns say which record it is, and :func:`~rlhfkit.data.records.parse_record` reads it as it is
    (it reads TRL's conversational completions and implicit prompts, so every stage reads these files without
    ``convert-data`` too):

    * preference ``{"prompt", "chosen", "rejected"}`` and implicit-prompt preference ``{"chosen",
      "rejected"}`` -> a pairwise record;
    * unpaired preference ``{"prompt", "completion", "label"}`` -> a labeled record;
    * prompt-completion ``{"prompt", "completion"}`` and conversational ``{"messages"}`` -> a demonstration;
    * prompt-only ``{"prompt"}`` -> a prompt record that keeps the row's other columns (e.g. a reference
      ``answer``) as fields, which reward functions receive.

    A conversational completion must be one assistant message. Language-modelling rows (``{"text"}``) are
    pretraining text, read by ``rlhfkit pretrain`` as they are, and stepwise supervision (``"labels"``
    per step) has no rlhfkit record: both raise :class:`~rlhfkit.data.records.DataError`. So does a K-way
    ranking (``"completions"`` with ``"ranking"`` or ``"pairs"``): TRL has no such format, and the row is
    already rlhfkit's ranking record (read as it is); were it taken for a prompt-only row, its completions
    would be dropped without a word.
    """
    keys = set(row)
    if "chosen" in keys or "rejected" in keys:
        return [where.parse(row, "preference")]
    if "labels" in keys and "completions" in keys:
        raise where.error("labels", "stepwise supervision (a label per step) has no rlhfkit record")
    ranked = [key for key in ("completions", "ranking", "pairs") if key in keys]
    if ranked:
        raise where.error(ranked[0], "a K-way ranking ('completions' with 'ranking' or 'pairs') is not one of TRL's "
                                     "formats (a TRL preference row holds one 'chosen' and one 'rejected'); it is "
                                     "rlhfkit's own ranking record, which rm, dpo and score read as it is, without "
                                     "convert-data")
    if "messages" in keys or "completion" in keys:
        return [where.parse(row, "labeled" if "label" in keys else "demonstration")]
    if "prompt" in keys:
        return [where.parse(row, "prompt")]
    if "text" in keys:
        raise where.error("text", "a language-modelling row is pretraining text: give the file to rlhfkit "
                                  "pretrain as it is")
    raise where.error(None, f"matches no TRL format (keys: {', '.join(sorted(keys)) or 'none'})")


# --- reading a file ---------------------------------------------------------------------------------------

LAYOUTS: dict[str, Callable[[dict, Where], list[Record]]] = {
    "hh": hh_rlhf,
    "qa-feedback": qa_feedback,
    "oasst": oasst_tree,
    "self-instruct": self_instruct,
    "trl": trl_row,
}


@dataclass
class PublicData:
    """What :func:`read_public` read: the records, how many raw rows, and the skipped rows by reason."""

    records: list[Record]
    rows: int
    skipped: Counter[str] = field(default_factory=Counter)


def convert_rows(rows: Iterable[tuple[int, Any]], convert: Callable[[dict, Where], list[Record]], *,
                 source: str, unit: str, limit: int | None = None) -> PublicData:
    """The records ``convert(row, where)`` makes of numbered raw rows (at most ``limit``), the rows it raised
    :class:`SkipRow` for counted by reason; a row that is not an object is a :class:`DataError` at its place."""
    data = PublicData(records=[], rows=0)
    for position, row in rows:
        where = Where(source, position, unit)
        if not isinstance(row, dict):
            raise where.error(None, f"expected a JSON object, got {type(row).__name__}")
        data.rows += 1
        try:
            data.records.extend(convert(row, where))
        except SkipRow as skip:
            data.skipped[str(skip)] += 1
        if limit is not None and len(data.records) >= limit:
            del data.records[limit:]
            break
    return data


def read_public(path: str | os.PathLike, layout: str, *, split: str | None = None,
                limit: int | None = None) -> PublicData:
    """Read a file (or saved dataset, or ``hf:NAME``) in a public ``layout`` as rlhfkit records.

    Any source :func:`~rlhfkit.data.readers.read_records` reads works (``.jsonl``, ``.jsonl.gz``, ``.json``,
    ``.parquet``, ...). ``limit`` stops after that many records. A row that breaks the layout stops the
    read with a :class:`~rlhfkit.data.records.DataError` naming file, line and field; rows the layout
    allows but that hold nothing to train on are counted in ``skipped`` by reason.

    Raises:
        ValueError: an unknown ``layout`` or a ``limit`` below 1.
        DataError: a bad row, or no records at all.
    """
    if layout not in LAYOUTS:
        raise ValueError(f"unknown layout {layout!r}; expected one of {', '.join(LAYOUTS)}")
    if limit is not None and limit < 1:
        raise ValueError(f"limit must be at least 1, got {limit}")
    source, unit, rows = _rows(path, split)
    data = convert_rows(rows, LAYOUTS[layout], source=source, unit=unit, limit=limit)
    if not data.records:
        raise DataError(f"holds no {layout} records ({data.rows} rows read, skipped: {dict(data.skipped)})",
                        source=source)
    return data


def split_held_out(records: list[Record], test_size: float, *, seed: int = 0) -> tuple[list[Record], list[Record]]:
    """``(train, test)``: a random held-out part of ``records`` that shares no prompt with the rest.

    Records are grouped by prompt (hh-rlhf repeats some opening questions, a self-instruct task gives one
    record per instance), the groups shuffled with ``seed``, and whole groups go to ``test`` until it holds
    ``test_size`` records (a count, or a fraction of all records when below 1), so a held-out score never
    rewards memorised prompts. Both parts keep the input order.

    Raises:
        ValueError: ``test_size`` is not positive, or leaves no record for training.
    """
    import json
    import random

    if not test_size > 0:
        raise ValueError(f"the held-out size must be positive, got {test_size}")
    wanted = round(test_size * len(records)) if test_size < 1 else int(test_size)
    groups: dict[str, list[int]] = {}
    for index, record in enumerate(records):
        groups.setdefault(json.dumps(record.prompt, sort_keys=True), []).append(index)
    order = list(groups.values())
    random.Random(seed).shuffle(order)
    test: set[int] = set()
    for group in order:
        if len(test) >= wanted:
            break
        test.update(group)
    if len(test) >= len(records):
        raise ValueError(f"a held-out part of {wanted} of {len(records)} records leaves none for training")
    return ([r for i, r in enumerate(records) if i not in test], [r for i, r in enumerate(records) if i in test])
