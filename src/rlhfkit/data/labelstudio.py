"""Label Studio projects written from rlhfkit data, and Label Studio's JSON exports read back as rlhfkit records.

A labeling team that works in Label Studio gets (:func:`write_project`, ``rlhfkit labelstudio-project``) a folder
with ``label_config.xml`` (the labeling interface: paste it in the project's settings, or give it to the API's
``label_config``) and ``tasks.json`` (import it into the project), for one of three kinds of work:

* ``rankings``: rank a prompt's K completions (samples: ``{"prompt", "completions": [...]}``) with a ``Ranker`` on
  a ``List``. The list is shown in an order shuffled per task (the position bias of a fixed order goes into the
  data otherwise); each item's ``id`` is the completion's index in the record, so the order shown changes nothing
  that is read back. With ``ties``, the ranker has one ``Bucket`` per place (``rank_1`` best, ... ``rank_K``) and
  completions put in one bucket tie.
* ``pairs``: choose the better of two completions (samples with exactly two) with ``Pairwise``; which one is on the
  left is drawn per task.
* ``demonstrations``: write the answer to a prompt (``{"prompt"}`` records) in a ``TextArea``.

Every task keeps the rlhfkit record it came from under ``data.rlhfkit`` (the prompt as given, chat messages
included, its ``id`` and ``meta``), which Label Studio exports unchanged. :func:`read_labelstudio`
(``rlhfkit convert-labelstudio``) reads the JSON export (``exportType=JSON``: a list of tasks with their
``annotations``) into ``rankings``, ``pairs`` (every untied chosen/rejected pair of each ranking, or the choice of
a pairwise task) or ``demonstrations``: one record per annotation, ``labeler`` being Label Studio's
``completed_by``. Cancelled (skipped) annotations and tasks without annotations are skipped and counted. A task
exported from a project built by hand reads too, where its data has ``prompt`` and the completions as a ranker's
list (``[{"id", "body"}]``) or pairwise ``a`` / ``b`` texts. A task that breaks the format stops the read with a
:class:`~rlhfkit.data.records.DataError` naming the file, the task and the field.
"""

from __future__ import annotations

import json
import os
import random
import re
from pathlib import Path
from typing import Any
from xml.sax.saxutils import quoteattr

from rlhfkit.data.collators import plain_chat_text
from rlhfkit.data.public import PublicData, SkipRow, Where, convert_rows
from rlhfkit.data.readers import _rows
from rlhfkit.data.records import DataError, Prompt, Record, tools_of

LABELSTUDIO_KINDS = ("rankings", "pairs", "demonstrations")
#: the names of the labeling config's tags: what :func:`read_labelstudio` looks for in a result
LIST, RANKER, PAIRWISE, TEXTAREA = "completions", "ranking", "preference", "demonstration"
CONFIG_FILE, TASKS_FILE = "label_config.xml", "tasks.json"
_BUCKET = re.compile(r"(\d+)$")
_RESULT_TYPES = {"rankings": ("ranker",), "pairs": ("ranker", "pairwise"), "demonstrations": ("textarea",)}


def labeling_config(kind: str, *, k: int = 4, ties: bool = False, instructions: str | None = None) -> str:
    """The labeling interface (Label Studio's XML config) of ``kind``; ``k`` and ``ties``: a ranking's places."""
    if kind not in LABELSTUDIO_KINDS:
        raise ValueError(f"unknown kind {kind!r}; expected one of {', '.join(LABELSTUDIO_KINDS)}")
    header = [f"  <Header value={quoteattr(instructions)}/>"] if instructions else []
    prompt = '  <Text name="prompt" value="$prompt"/>'
    if kind == "demonstrations":
        body = [prompt, f'  <TextArea name="{TEXTAREA}" toName="prompt" rows="6" maxSubmissions="1" editable="true" '
                        'required="true" placeholder="Write the answer you would want"/>']
    elif kind == "pairs":
        body = [prompt, f'  <Pairwise name="{PAIRWISE}" toName="a,b" selectionStyle="border: 3px solid green"/>',
                '  <Text name="a" value="$a"/>', '  <Text name="b" value="$b"/>']
    else:
        ranker = f'  <Ranker name="{RANKER}" toName="{LIST}"'
        if ties:
            buckets = [f'    <Bucket name="rank_{n}" title="{_place(n, k)}"/>' for n in range(1, k + 1)]
            ranker_tags = [ranker + ">", *buckets, "  </Ranker>"]
        else:
            ranker_tags = [ranker + "/>"]
        body = [prompt, f'  <List name="{LIST}" value="${LIST}" title="Best first"/>', *ranker_tags]
    return "\n".join(["<View>", *header, *body, "</View>"]) + "\n"


def _place(n: int, k: int) -> str:
    return f"{n} (best)" if n == 1 else f"{n} (worst)" if n == k else str(n)


def _display(prompt: Prompt) -> str:
    """A prompt as the labeler reads it: the text, or a chat in rlhfkit's plain form (``role: text`` paragraphs,
    with the tools it offers, tool calls and tool results: :func:`~rlhfkit.data.collators.plain_chat_text`)."""
    if isinstance(prompt, str):
        return prompt
    return plain_chat_text(prompt, tools_of(prompt))


def _source_record(row: dict, where: Where, kind: str) -> tuple[dict, Prompt]:
    """What a task keeps of its rlhfkit record under ``data.rlhfkit`` (the prompt as given, the ``tools`` it offers,
    ``id`` and ``meta``), and its prompt as read (a string, or chat messages with their tools)."""
    if "prompt" not in row:
        raise where.error("prompt", "is missing")
    prompt = where.parse({key: row[key] for key in ("prompt", "tools") if key in row}, "prompt").prompt
    kept = {"prompt": row["prompt"]}
    for key in ("tools", "id", "meta"):
        if row.get(key) is not None:
            kept[key] = row[key]
    if kind != "demonstrations":
        completions = row.get("completions")
        want = "exactly 2" if kind == "pairs" else "at least 2"
        if not isinstance(completions, list) or not all(isinstance(c, str) and c.strip() for c in completions):
            raise where.error("completions", "expected a list of completion texts (non-empty strings)")
        if len(completions) < 2 or (kind == "pairs" and len(completions) != 2):
            raise where.error("completions", f"holds {len(completions)} completion(s); {kind} need {want}")
        kept["completions"] = completions
    return kept, prompt


def project_tasks(rows: list[tuple[int, Any]], kind: str, *, seed: int = 0, source: str | None = None,
                  unit: str = "line") -> list[dict]:
    """Label Studio tasks of ``kind`` from rlhfkit rows (``(line, object)``); the order shown is drawn with
    ``seed`` (per task, so adding tasks leaves the others' order as it was)."""
    tasks = []
    for line, row in rows:
        where = Where(source, line, unit)
        if not isinstance(row, dict):
            raise where.error(None, f"expected a JSON object, got {type(row).__name__}")
        record, prompt = _source_record(row, where, kind)
        data: dict[str, Any] = {"prompt": _display(prompt), "rlhfkit": record}
        order = list(range(len(record.get("completions", []))))
        random.Random(f"{seed}:{line}").shuffle(order)
        if kind == "rankings":
            data[LIST] = [{"id": str(i), "title": f"Completion {i + 1}", "body": record["completions"][i]}
                          for i in order]
        elif kind == "pairs":
            data.update(a=record["completions"][order[0]], b=record["completions"][order[1]])
            record["shown"] = order  # a is completions[shown[0]]
        tasks.append({"data": data})
    return tasks


def write_project(source: str | os.PathLike, kind: str, out_dir: str | os.PathLike, *, ties: bool = False,
                  instructions: str | None = None, seed: int = 0) -> dict:
    """Write ``label_config.xml`` and ``tasks.json`` for ``kind`` into ``out_dir`` from the rlhfkit records in
    ``source`` (samples for rankings and pairs, prompts for demonstrations). Returns what was written."""
    if kind not in LABELSTUDIO_KINDS:
        raise ValueError(f"unknown kind {kind!r}; expected one of {', '.join(LABELSTUDIO_KINDS)}")
    label, unit, rows = _rows(Path(source), None)
    tasks = project_tasks(list(rows), kind, seed=seed, source=label, unit=unit)
    if not tasks:
        raise DataError("holds no records", source=label)
    k = max((len(task["data"]["rlhfkit"].get("completions", [])) for task in tasks), default=0)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / CONFIG_FILE).write_text(labeling_config(kind, k=k or 4, ties=ties, instructions=instructions),
                                   encoding="utf-8")
    (out / TASKS_FILE).write_text(json.dumps(tasks, ensure_ascii=False, indent=1), encoding="utf-8")
    return {"tasks": len(tasks), "kind": kind, "label_config": str(out / CONFIG_FILE),
            "tasks_file": str(out / TASKS_FILE)}


class _Reader:
    """Turns one exported task into rlhfkit records (see the module docstring)."""

    def __init__(self, kind: str) -> None:
        self.kind = kind

    def __call__(self, task: dict, where: Where) -> list[Record]:
        data = task.get("data")
        if not isinstance(data, dict):
            raise where.error("data", "is missing (is this Label Studio's JSON export?)")
        annotations = task.get("annotations") or []
        if not isinstance(annotations, list):
            raise where.error("annotations", f"expected a list, got {type(annotations).__name__}")
        kept = [(n, a) for n, a in enumerate(annotations) if isinstance(a, dict) and not a.get("was_cancelled")]
        if not kept:
            raise SkipRow("cancelled annotations only" if annotations else "no annotation")
        source = data.get("rlhfkit") if isinstance(data.get("rlhfkit"), dict) else {}
        prompt = source.get("prompt", data.get("prompt"))
        if prompt is None:
            raise where.error("data.prompt", "is missing")
        common: dict[str, Any] = {"prompt": prompt}
        task_id = source.get("id", task.get("id"))
        if task_id is not None:
            common["id"] = str(task_id)
        for key in ("tools", "meta"):
            if source.get(key):
                common[key] = source[key]
        records: list[Record] = []
        for number, annotation in kept:
            field = f"annotations[{number}].result"
            labeler = annotation.get("completed_by")
            if isinstance(labeler, dict):  # some exports give the user object
                labeler = labeler.get("email") or labeler.get("id")
            labelled = {**common, **({"labeler": str(labeler)} if labeler is not None else {})}
            result = self._result(annotation.get("result"), field, where)
            value = result.get("value") if isinstance(result.get("value"), dict) else {}
            if result["type"] == "textarea":
                texts = value.get("text")
                if not isinstance(texts, list) or not texts or not all(isinstance(t, str) for t in texts):
                    raise where.error(f"{field}.value.text", "expected the text the labeler wrote (a list of strings)")
                records.append(where.parse({**labelled, "completion": "\n".join(texts)}, "demonstration"))
            elif result["type"] == "pairwise":
                records.append(where.parse({**labelled, **self._choice(value, data, source, field, where)},
                                           "preference"))
            else:
                ranking = where.parse({**labelled, **self._ranking(value, data, source, field, where)}, "ranking")
                records.extend(ranking.to_preferences() if self.kind == "pairs" else [ranking])
        return records

    def _result(self, results: Any, field: str, where: Where) -> dict:
        """The annotation's result of the type ``kind`` reads."""
        if not isinstance(results, list):
            raise where.error(field, "expected a list of results")
        wanted = _RESULT_TYPES[self.kind]
        found = [r for r in results if isinstance(r, dict) and r.get("type") in wanted]
        if not found:
            types = sorted({str(r.get("type")) for r in results if isinstance(r, dict)})
            raise where.error(field, f"has no {' or '.join(wanted)} result "
                                     f"(found: {', '.join(types) or 'none'}); is this a {self.kind} project?")
        if len(found) > 1:
            raise where.error(field, f"has {len(found)} {found[0]['type']} results; expected one")
        return found[0]

    @staticmethod
    def _ranked_items(data: dict, source: dict, where: Where) -> tuple[list[str], dict[str, int]]:
        """A ranking task's completions in their rlhfkit order, and each list id's index among them."""
        if "completions" in source:  # written by write_project: the ids are the indices
            return source["completions"], {str(i): i for i in range(len(source["completions"]))}
        items = data.get(LIST)
        if not isinstance(items, list) or not all(isinstance(i, dict) and "id" in i and "body" in i for i in items):
            raise where.error(f"data.{LIST}", "expected the ranked list: [{id, body}, ...]")
        return [item["body"] for item in items], {str(item["id"]): n for n, item in enumerate(items)}

    def _ranking(self, value: dict, data: dict, source: dict, field: str, where: Where) -> dict:
        """``{"completions", "ranking"}`` of a ranker result: its list's ids best first (one key, the list's name),
        or its buckets in the order of the numbers their names end with (ties within a bucket)."""
        ranked = value.get("ranker")
        if not isinstance(ranked, dict) or not ranked:
            raise where.error(f"{field}.value.ranker", "expected the ranked ids: {list or bucket name: [id, ...]}")
        completions, index = self._ranked_items(data, source, where)
        buckets = {name: items for name, items in ranked.items() if name != "_"}  # "_": items left in the list
        if all(_BUCKET.search(name) for name in buckets):
            groups = [buckets[name] for name in sorted(buckets, key=lambda n: int(_BUCKET.search(n).group(1)))]
        elif len(buckets) == 1:
            groups = [[item] for item in next(iter(buckets.values()))]  # a plain list: best first, no ties
        else:
            raise where.error(f"{field}.value.ranker", "has buckets without a place number (name them rank_1 "
                                                       "(best), rank_2, ...)")
        groups = [[str(item) for item in group] for group in groups if group]
        placed = [item for group in groups for item in group]
        unknown = [item for item in placed if item not in index]
        if unknown:
            raise where.error(f"{field}.value.ranker", f"ranks id {unknown[0]!r}, which is no completion of the task")
        missing = [item for item in index if item not in placed]
        if missing:
            raise where.error(f"{field}.value.ranker", f"leaves completion(s) {', '.join(missing)} unranked")
        return {"completions": completions, "ranking": [sorted(index[item] for item in group) for group in groups]}

    @staticmethod
    def _choice(value: dict, data: dict, source: dict, field: str, where: Where) -> dict:
        """``{"chosen", "rejected"}`` of a pairwise result (``selected``: ``left`` is ``a``)."""
        selected = value.get("selected")
        if selected not in ("left", "right"):
            raise where.error(f"{field}.value.selected", f"expected 'left' or 'right', got {selected!r}")
        a, b = data.get("a"), data.get("b")
        if "completions" in source and "shown" in source:
            a, b = (source["completions"][i] for i in source["shown"])
        if not isinstance(a, str) or not isinstance(b, str):
            raise where.error("data.a", "expected the two texts of the pair in data.a and data.b")
        return {"chosen": a, "rejected": b} if selected == "left" else {"chosen": b, "rejected": a}


def read_labelstudio(path: str | os.PathLike, kind: str) -> PublicData:
    """Read Label Studio's JSON export (see the module docstring) as rlhfkit ``kind`` records.

    Raises:
        ValueError: an unknown ``kind``.
        DataError: a task that breaks the format (file, task and field named), or no records at all.
    """
    if kind not in LABELSTUDIO_KINDS:
        raise ValueError(f"unknown kind {kind!r}; expected one of {', '.join(LABELSTUDIO_KINDS)}")
    source, unit, rows = _rows(Path(path), None)
    data = convert_rows(rows, _Reader(kind), source=source, unit=unit)
    if not data.records:
        raise DataError(f"holds no {kind} ({data.rows} tasks read, skipped: {dict(data.skipped)})", source=source)
    return data
