"""Commands for public data, labeling tools and models: ``rlhfkit convert-data``, ``convert-argilla``,
``labelstudio-project``, ``convert-labelstudio`` and ``convert``.

``cli.py`` adds them to its app with :func:`register`; like every command, they report on the shared console and
end a data error or a missing file with one clear message and exit code 2 (:mod:`rlhfkit.cli_common`).
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Annotated

import typer

from rlhfkit.cli_common import console, fail_cleanly
from rlhfkit.data.public import LAYOUTS


def _check_kind(kind: str, kinds: tuple[str, ...]) -> None:
    if kind not in kinds:
        raise typer.BadParameter(f"expected one of {', '.join(kinds)}", param_hint="--kind")


def _write_converted(data, out: Path) -> None:
    """Write the records read (a :class:`~rlhfkit.data.public.PublicData`) to ``out`` and print what was done."""
    from rlhfkit.data.readers import write_jsonl

    summary = {"rows": data.rows, "records": write_jsonl(out, data.records), "skipped": dict(data.skipped),
               "out": str(out)}
    console.print_json(json.dumps(summary))


def register(app: typer.Typer) -> None:
    """Add ``convert-data``, ``convert-argilla``, ``labelstudio-project``, ``convert-labelstudio`` and ``convert``
    to ``app`` (the ``rlhfkit`` app of :mod:`rlhfkit.cli`)."""
    @app.command("convert-data")
    @fail_cleanly
    def convert_data(
        layout: Annotated[str, typer.Option(help=f"The input's layout: {', '.join(LAYOUTS)}.")],
        source: Annotated[str, typer.Option("--in", help="Input file (.jsonl, .jsonl.gz, .json, .parquet, ...), "
                                                         "saved dataset directory or hf:NAME[:SPLIT].")],
        out: Annotated[Path, typer.Option(help="Output JSONL of rlhfkit records (.gz to compress).")],
        limit: Annotated[int | None, typer.Option(help="Write at most this many records.")] = None,
        test_out: Annotated[Path | None, typer.Option(help="Also write a held-out part here (records whose "
                                                           "prompts OUT does not have); OUT gets the rest.")] = None,
        test_size: Annotated[float, typer.Option(help="Records held out for --test-out: a count, or a "
                                                      "fraction when below 1.")] = 0.2,
        seed: Annotated[int, typer.Option(help="Seed of the held-out draw.")] = 0,
    ) -> None:
        """Turn a public human-feedback layout (hh-rlhf, qa-feedback, Open-Assistant trees, self-instruct,
        TRL formats) into rlhfkit records; rows that hold nothing to train on are skipped and counted.
        With --test-out, a random part of the records (whole prompts, none shared with OUT) is held out."""
        from rlhfkit.data.public import read_public, split_held_out
        from rlhfkit.data.readers import write_jsonl

        if layout not in LAYOUTS:
            raise typer.BadParameter(f"expected one of {', '.join(LAYOUTS)}", param_hint="--layout")
        if test_out is not None and not test_size > 0:
            raise typer.BadParameter(f"must be positive, got {test_size}", param_hint="--test-size")
        data = read_public(source, layout, limit=limit)
        summary: dict = {"rows": data.rows}
        records = data.records
        if test_out is not None:
            try:
                records, held_out = split_held_out(records, test_size, seed=seed)
            except ValueError as error:
                raise typer.BadParameter(str(error), param_hint="--test-size") from None
            summary.update({"test_records": write_jsonl(test_out, held_out), "test_out": str(test_out)})
        summary.update({"records": write_jsonl(out, records), "skipped": dict(data.skipped), "out": str(out)})
        console.print_json(json.dumps(summary))

    @app.command("convert-argilla")
    @fail_cleanly
    def convert_argilla(
        source: Annotated[Path, typer.Option("--in", help="Argilla's exported records: records.json (to_json), a "
                                                          "to_disk folder, a save_to_disk folder of to_datasets(), "
                                                          "or JSON lines / Parquet of records.")],
        kind: Annotated[str, typer.Option(help="rankings or pairs (from a ranking question), demonstrations (from "
                                               "a text question).")],
        question: Annotated[str, typer.Option(help="The question whose responses to read.")],
        out: Annotated[Path, typer.Option(help="Output JSONL of rlhfkit records (.gz to compress).")],
        prompt_field: Annotated[str, typer.Option(help="The field that holds the prompt.")] = "prompt",
        option: Annotated[list[str] | None, typer.Option(
            help="OPTION=FIELD: the text field a ranking option stands for (repeat; by default the options are "
                 "the fields' names).")] = None,
        split: Annotated[str | None, typer.Option(help="The split of a saved DatasetDict.")] = None,
    ) -> None:
        """Turn Argilla's exported records (one per labeler's submitted response) into rlhfkit rankings, pairs
        or demonstrations; records without a submitted response are skipped and counted."""
        from rlhfkit.data.argilla import ARGILLA_KINDS, read_argilla

        _check_kind(kind, ARGILLA_KINDS)
        options = {}
        for mapping in option or []:
            name, _, field = mapping.partition("=")
            if not name or not field:
                raise typer.BadParameter(f"expected OPTION=FIELD, got {mapping!r}", param_hint="--option")
            options[name] = field
        _write_converted(read_argilla(source, kind, question=question, prompt_field=prompt_field, options=options,
                                      split=split), out)

    @app.command("labelstudio-project")
    @fail_cleanly
    def labelstudio_project(
        source: Annotated[Path, typer.Option("--in", help="rlhfkit records: samples ({prompt, completions}) for "
                                                          "rankings and pairs, prompts for demonstrations.")],
        kind: Annotated[str, typer.Option(help="rankings (rank K completions), pairs (choose one of two) or "
                                               "demonstrations (write the answer).")],
        out: Annotated[Path, typer.Option(help="Folder for label_config.xml and tasks.json.")],
        ties: Annotated[bool, typer.Option(help="Rankings: one bucket per place, so labelers can tie "
                                                "completions.")] = False,
        instructions: Annotated[str | None, typer.Option(help="Shown above every task.")] = None,
        seed: Annotated[int, typer.Option(help="Seed of the order shown (drawn per task).")] = 0,
    ) -> None:
        """Write a Label Studio project from rlhfkit data: the labeling interface (label_config.xml) and the
        tasks to import (tasks.json); the completions are shown in an order drawn per task."""
        from rlhfkit.data.labelstudio import LABELSTUDIO_KINDS, write_project

        _check_kind(kind, LABELSTUDIO_KINDS)
        console.print_json(json.dumps(write_project(source, kind, out, ties=ties, instructions=instructions,
                                                    seed=seed)))

    @app.command("convert-labelstudio")
    @fail_cleanly
    def convert_labelstudio(
        source: Annotated[Path, typer.Option("--in", help="Label Studio's JSON export (a list of tasks with their "
                                                          "annotations).")],
        kind: Annotated[str, typer.Option(help="rankings or pairs (from a ranker or pairwise project), "
                                               "demonstrations (from a text area).")],
        out: Annotated[Path, typer.Option(help="Output JSONL of rlhfkit records (.gz to compress).")],
    ) -> None:
        """Turn Label Studio's JSON export (one record per annotation) into rlhfkit rankings, pairs or
        demonstrations; tasks without annotations, and cancelled annotations, are skipped and counted."""
        from rlhfkit.data.labelstudio import LABELSTUDIO_KINDS, read_labelstudio

        _check_kind(kind, LABELSTUDIO_KINDS)
        _write_converted(read_labelstudio(source, kind), out)

    @app.command("convert")
    @fail_cleanly
    def convert(
        gguf: Annotated[Path, typer.Argument(help="A .gguf model file (needs the gguf package: rlhfkit[gguf]).")],
        out: Annotated[Path, typer.Option(help="Directory for the Hugging Face checkpoint.")],
        dtype: Annotated[str, typer.Option(help="float32, bfloat16 or float16.")] = "float32",
    ) -> None:
        """Write a GGUF model (weights de-quantised, tokenizer, chat template) as a plain Hugging Face
        checkpoint that ``model.name_or_path`` and plain transformers load."""
        from rlhfkit.models.load import DTYPES, convert_gguf

        if dtype not in DTYPES:
            raise typer.BadParameter(f"expected one of {', '.join(DTYPES)}", param_hint="--dtype")
        started = time.perf_counter()
        try:
            convert_gguf(gguf, out, dtype=dtype)
        except (ImportError, ValueError) as error:  # the gguf extra is missing; not a .gguf file
            console.print(f"[bold red]error:[/] {error}", markup=True, highlight=False)
            raise typer.Exit(2) from None
        console.print_json(json.dumps({"out": str(out), "seconds": round(time.perf_counter() - started, 1)}))
