"""Reading records from JSON lines, JSON, Parquet, CSV and saved datasets; writing JSON lines."""

from __future__ import annotations

import gzip
import json
import os

import datasets
import pytest

from rlhfkit.data.readers import DataFileNotFoundError, iter_jsonl, read_records, write_jsonl
from rlhfkit.data.records import (
    DataError,
    DemonstrationRecord,
    PreferenceRecord,
    PromptRecord,
    RankingRecord,
)

DEMOS = [
    {"prompt": "Name a colour.", "completion": "Blue.", "id": 1},
    {"prompt": "Say hi.", "completion": "Hi!", "labeler": "ann"},
    {"prompt": "Count to 2.", "completion": "1, 2"},
]
DEMO_RECORDS = [
    DemonstrationRecord("Name a colour.", "Blue.", id="1"),
    DemonstrationRecord("Say hi.", "Hi!", labeler="ann"),
    DemonstrationRecord("Count to 2.", "1, 2"),
]


def dataset(rows: list[dict]) -> datasets.Dataset:
    """A dataset of ``rows``; ``Dataset.from_list`` takes its columns from the first row only, so
    missing keys are filled with None first."""
    keys = list(dict.fromkeys(key for row in rows for key in row))
    return datasets.Dataset.from_list([{key: row.get(key) for key in keys} for row in rows])


def write_lines(path, lines: list[bytes | str]) -> None:
    """Write raw lines (bytes or text), each followed by a newline."""
    data = b"".join((line if isinstance(line, bytes) else line.encode("utf-8")) + b"\n" for line in lines)
    if path.name.endswith(".gz"):
        data = gzip.compress(data)
    path.write_bytes(data)


# --- JSON lines --------------------------------------------------------------------------------


def test_iter_jsonl_numbers_file_lines_and_skips_blank_ones(tmp_path):
    path = tmp_path / "a.jsonl"
    write_lines(path, ['{"a": 1}', "", "   ", '{"a": 2}'])
    assert list(iter_jsonl(path)) == [(1, {"a": 1}), (4, {"a": 2})]


def test_iter_jsonl_reads_gzip(tmp_path):
    path = tmp_path / "a.jsonl.gz"
    write_lines(path, ['{"a": 1}', "", '{"a": "é"}'])
    assert list(iter_jsonl(path)) == [(1, {"a": 1}), (3, {"a": "é"})]


def test_iter_jsonl_accepts_a_byte_order_mark(tmp_path):
    path = tmp_path / "a.jsonl"
    path.write_bytes(b'\xef\xbb\xbf{"a": 1}\n')
    assert list(iter_jsonl(path)) == [(1, {"a": 1})]


@pytest.mark.parametrize("name", ["a.jsonl", "a.jsonl.gz"])
def test_non_utf8_line_names_file_and_line(tmp_path, name):
    path = tmp_path / name
    write_lines(path, ['{"prompt": "a"}', '{"prompt": "b"}', b'{"prompt": "caf\xe9"}'])
    with pytest.raises(DataError) as caught:
        read_records(path, "prompt")
    assert (caught.value.source, caught.value.line, caught.value.field) == (str(path), 3, None)
    assert str(caught.value).startswith(f"{path}, line 3: is not valid UTF-8")


def test_invalid_json_names_file_and_line(tmp_path):
    path = tmp_path / "a.jsonl"
    write_lines(path, ['{"prompt": "a"}', "", '{"prompt": "b",}'])
    with pytest.raises(DataError) as caught:
        list(iter_jsonl(path))
    assert (caught.value.line, caught.value.field) == (3, None)
    assert str(caught.value).startswith(f"{path}, line 3: invalid JSON")


def test_jsonl_line_that_is_not_an_object(tmp_path):
    path = tmp_path / "a.jsonl"
    write_lines(path, ['{"prompt": "a"}', "[1, 2]"])
    with pytest.raises(DataError, match="line 2: expected a JSON object, got list"):
        list(iter_jsonl(path))


def test_read_records_from_gzip_jsonl(tmp_path):
    path = tmp_path / "demos.jsonl.gz"
    write_lines(path, [json.dumps(row) for row in DEMOS])
    assert read_records(path, "demonstration") == DEMO_RECORDS


def test_read_records_limit(tmp_path):
    path = tmp_path / "demos.jsonl"
    # The bad last line is never read: the limit stops first.
    write_lines(path, [json.dumps(row) for row in DEMOS] + ['{"prompt": "p"}'])
    assert read_records(path, "demonstration", limit=2) == DEMO_RECORDS[:2]
    with pytest.raises(ValueError, match="limit"):
        read_records(path, "demonstration", limit=0)


# --- sources and their errors ------------------------------------------------------------------


def test_missing_file_is_a_file_not_found_data_error(tmp_path):
    path = tmp_path / "nope.jsonl"
    with pytest.raises(DataFileNotFoundError) as caught:
        read_records(path, "prompt")
    assert isinstance(caught.value, FileNotFoundError)
    assert isinstance(caught.value, DataError)
    assert str(path) in str(caught.value)
    with pytest.raises(FileNotFoundError):
        list(iter_jsonl(path))


def test_unknown_extension_lists_supported_ones(tmp_path):
    path = tmp_path / "data.txt"
    path.write_text('{"prompt": "p"}\n')
    with pytest.raises(DataError) as caught:
        read_records(path, "prompt")
    message = str(caught.value)
    assert message.startswith(f"{path}: unsupported file type")
    for suffix in (".jsonl", ".jsonl.gz", ".json", ".parquet", ".csv", "save_to_disk", "hf:NAME"):
        assert suffix in message


@pytest.mark.parametrize("content", ["", "\n\n  \n"])
def test_empty_file_is_an_error(tmp_path, content):
    path = tmp_path / "empty.jsonl"
    path.write_text(content)
    with pytest.raises(DataError, match="contains no records"):
        read_records(path, "prompt")


def test_unknown_kind_is_a_value_error(tmp_path):
    path = tmp_path / "a.jsonl"
    write_lines(path, ['{"prompt": "p"}'])
    with pytest.raises(ValueError, match="unknown record kind"):
        read_records(path, "rankings")


def test_split_does_not_apply_to_a_file(tmp_path):
    path = tmp_path / "a.jsonl"
    write_lines(path, ['{"prompt": "p"}'])
    with pytest.raises(DataError, match="single file without splits"):
        read_records(path, "prompt", split="train")


# --- JSON --------------------------------------------------------------------------------------


def test_json_list_of_objects(tmp_path):
    path = tmp_path / "demos.json"
    path.write_text(json.dumps(DEMOS, indent=2))
    assert read_records(path, "demonstration") == DEMO_RECORDS


def test_json_list_errors_name_the_record(tmp_path):
    path = tmp_path / "demos.json"
    path.write_text(json.dumps([DEMOS[0], {"prompt": "p", "completion": 4}], indent=2))
    with pytest.raises(DataError) as caught:
        read_records(path, "demonstration")
    assert str(caught.value) == f"{path}, record 2, field 'completion': expected a string, got int"
    assert caught.value.unit == "record"


def test_invalid_json_list_names_the_file_line(tmp_path):
    path = tmp_path / "demos.json"
    path.write_text('[\n  {"prompt": "p", "completion": "c"},\n  {"prompt": }\n]\n')
    with pytest.raises(DataError) as caught:
        read_records(path, "demonstration")
    assert caught.value.line == 3
    assert str(caught.value).startswith(f"{path}, line 3: invalid JSON")


def test_json_file_holding_json_lines(tmp_path):
    path = tmp_path / "demos.json"
    write_lines(path, [json.dumps(row) for row in DEMOS[:2]] + ['{"prompt": "p", "completion": ""}'])
    with pytest.raises(DataError) as caught:
        read_records(path, "demonstration")
    assert str(caught.value) == f"{path}, line 3, field 'completion': is empty"
    path.write_text("".join(json.dumps(row) + "\n" for row in DEMOS))
    assert read_records(path, "demonstration") == DEMO_RECORDS


# --- Parquet, CSV and saved datasets -----------------------------------------------------------

RANKINGS = [
    {"prompt": "Q1", "completions": ["a", "b", "c"], "ranking": [2, 0, 1], "id": "r1"},
    {"prompt": "Q2", "completions": ["d", "e", "f"], "ranking": [0, 1, 2], "id": "r2"},
]
RANKING_RECORDS = [
    RankingRecord("Q1", ("a", "b", "c"), ((2,), (0,), (1,)), id="r1"),
    RankingRecord("Q2", ("d", "e", "f"), ((0,), (1,), (2,)), id="r2"),
]


def test_parquet_round_trip(tmp_path):
    path = tmp_path / "rankings.parquet"
    dataset(RANKINGS).to_parquet(str(path))
    assert read_records(path, "ranking") == RANKING_RECORDS


def test_parquet_errors_name_the_row(tmp_path):
    path = tmp_path / "rankings.parquet"
    bad = dict(RANKINGS[1], ranking=[0, 1, 3])
    dataset([RANKINGS[0], bad]).to_parquet(str(path))
    with pytest.raises(DataError) as caught:
        read_records(path, "ranking")
    assert str(caught.value) == f"{path}, row 2, field 'ranking': index 3 is out of range for 3 completions"


def test_unreadable_parquet_is_a_data_error(tmp_path):
    path = tmp_path / "junk.parquet"
    path.write_bytes(b"not parquet at all")
    with pytest.raises(DataError, match="cannot read as Parquet"):
        read_records(path, "prompt")


def test_csv_round_trip_reads_cells_as_text(tmp_path):
    path = tmp_path / "prefs.csv"
    rows = [
        {"prompt": "Q1", "chosen": "NA", "rejected": "no", "id": "007"},
        {"prompt": "Q2", "chosen": "yes", "rejected": "no", "id": None},
    ]
    dataset(rows).to_csv(str(path), index=False)
    assert read_records(path, "preference") == [
        PreferenceRecord("Q1", "NA", "no", id="007"),
        PreferenceRecord("Q2", "yes", "no"),
    ]


def test_csv_errors_name_the_file_line(tmp_path):
    path = tmp_path / "demos.csv"
    path.write_text("prompt,completion\nQ1,A1\nQ2,A2\nQ3,\n", encoding="utf-8")
    with pytest.raises(DataError) as caught:
        read_records(path, "demonstration")
    # The header is line 1, so the third row is line 4.
    assert str(caught.value) == f"{path}, line 4, field 'completion': is null"


def test_save_to_disk_dataset(tmp_path):
    dataset(RANKINGS).save_to_disk(str(tmp_path / "ds"))
    assert read_records(tmp_path / "ds", "ranking") == RANKING_RECORDS
    with pytest.raises(DataError, match="without splits"):
        read_records(tmp_path / "ds", "ranking", split="train")


def test_save_to_disk_dataset_dict_picks_a_split(tmp_path):
    path = tmp_path / "dd"
    datasets.DatasetDict({"train": dataset(DEMOS), "test": dataset(DEMOS[:1])}).save_to_disk(str(path))
    assert read_records(path, "demonstration") == DEMO_RECORDS
    assert read_records(path, "demonstration", split="test") == DEMO_RECORDS[:1]
    with pytest.raises(DataError) as caught:
        read_records(path, "demonstration", split="validation")
    assert str(caught.value) == f"{path}: has no split 'validation'; available splits: train, test"


def test_save_to_disk_errors_name_the_split_and_row(tmp_path):
    path = tmp_path / "dd"
    rows = [DEMOS[0], {"prompt": "p", "completion": " "}]
    datasets.DatasetDict({"train": dataset(rows)}).save_to_disk(str(path))
    with pytest.raises(DataError) as caught:
        read_records(path, "demonstration")
    assert str(caught.value) == f"{path} (split 'train'), row 2, field 'completion': is empty"


def test_directory_that_is_not_a_saved_dataset(tmp_path):
    with pytest.raises(DataError, match="not a dataset directory"):
        read_records(tmp_path, "prompt")


# --- Hugging Face Hub (no network: load_dataset is replaced) -----------------------------------


def test_hub_source_calls_load_dataset_with_name_and_split(monkeypatch):
    calls = []

    def fake_load_dataset(name, split):
        calls.append((name, split))
        return dataset([{"prompt": "hello"}, {"prompt": ""}])

    monkeypatch.setattr(datasets, "load_dataset", fake_load_dataset)
    assert read_records("hf:org/prompts:test", "prompt", limit=1) == [PromptRecord("hello")]
    assert read_records("hf:org/prompts", "prompt", split="validation", limit=1) == [PromptRecord("hello")]
    with pytest.raises(DataError) as caught:
        read_records("hf:org/prompts", "prompt")
    assert str(caught.value) == "hf:org/prompts:train, row 2, field 'prompt': is empty"
    assert calls == [("org/prompts", "test"), ("org/prompts", "validation"), ("org/prompts", "train")]


def test_hub_load_failures_are_data_errors(monkeypatch):
    def failing_load_dataset(name, split):
        raise ConnectionError("offline")

    monkeypatch.setattr(datasets, "load_dataset", failing_load_dataset)
    with pytest.raises(DataError, match=r"^hf:org/x:train: cannot load from the Hugging Face Hub: offline"):
        read_records("hf:org/x", "prompt")


@pytest.mark.parametrize(
    "spec, split, message",
    [("hf:", None, "names no dataset"), ("hf:org/x:test", "train", "names split 'test' but split 'train'")],
)
def test_bad_hub_specs(spec, split, message):
    with pytest.raises(DataError, match=message):
        read_records(spec, "prompt", split=split)


# --- writing -----------------------------------------------------------------------------------

EVERY_KIND = {
    "prompt": [
        PromptRecord("Write a haiku.", id="1"),
        PromptRecord([{"role": "system", "content": "S"}, {"role": "user", "content": "Q"}], labeler="x"),
    ],
    "demonstration": [
        DemonstrationRecord("Q", "A", meta={"source": "web", "n": [1, 2]}),
        DemonstrationRecord([{"role": "user", "content": "Q"}], "Ünïcode ✓"),
    ],
    "ranking": [
        RankingRecord("Q", ("a", "b", "c", "d"), ((3,), (1,), (0,), (2,)), id="r"),
        RankingRecord("Q", ("a", "b", "c", "d"), ((0, 2), (1,), (3,))),
    ],
    "preference": [PreferenceRecord("Q", "good", "bad", id="p1", labeler="L")],
}


@pytest.mark.parametrize("kind", sorted(EVERY_KIND))
@pytest.mark.parametrize("name", ["out.jsonl", "out.jsonl.gz"])
def test_write_jsonl_then_read_records_round_trip(tmp_path, kind, name):
    path = tmp_path / "nested" / "dir" / name
    assert write_jsonl(path, EVERY_KIND[kind]) == len(EVERY_KIND[kind])
    assert read_records(path, kind) == EVERY_KIND[kind]
    assert os.listdir(path.parent) == [name]


def test_write_jsonl_writes_dicts_and_records_one_per_line(tmp_path):
    path = tmp_path / "out.jsonl"
    rows = [{"prompt": "a", "extra": [1]}, PreferenceRecord("Q", "x", "y")]
    assert write_jsonl(path, rows) == 2
    assert path.read_text(encoding="utf-8").splitlines() == [
        '{"prompt": "a", "extra": [1]}',
        '{"prompt": "Q", "chosen": "x", "rejected": "y"}',
    ]


def test_write_jsonl_replaces_atomically_and_cleans_up_on_failure(tmp_path):
    path = tmp_path / "out.jsonl"
    write_jsonl(path, [{"prompt": "old"}])

    def rows():
        yield {"prompt": "new"}
        raise RuntimeError("generator failed")

    with pytest.raises(RuntimeError):
        write_jsonl(path, rows())
    assert path.read_text() == '{"prompt": "old"}\n'
    assert os.listdir(tmp_path) == ["out.jsonl"]
    with pytest.raises(TypeError):
        write_jsonl(path, [["not", "a", "row"]])
    assert os.listdir(tmp_path) == ["out.jsonl"]


def test_read_texts_from_jsonl_and_txt(tmp_path):
    from rlhfkit.data.readers import read_texts

    (tmp_path / "c.jsonl").write_text('{"text": "one doc"}\n{"text": "two"}\n')
    assert read_texts(tmp_path / "c.jsonl") == ["one doc", "two"]
    (tmp_path / "c.txt").write_text("first doc\nstill first\n\n\nsecond doc\n")
    assert read_texts(tmp_path / "c.txt") == ["first doc\nstill first", "second doc"]
    assert read_texts(tmp_path / "c.txt", limit=1) == ["first doc\nstill first"]


def test_read_texts_names_line_and_field(tmp_path):
    from rlhfkit.data.readers import read_texts

    (tmp_path / "c.jsonl").write_text('{"text": "ok"}\n{"txt": "typo"}\n')
    with pytest.raises(DataError, match=r"c.jsonl, line 2, field 'text': is missing"):
        read_texts(tmp_path / "c.jsonl")
    (tmp_path / "d.jsonl").write_text('{"text": "ok"}\n\n{"text": 5}\n')
    with pytest.raises(DataError, match=r"d.jsonl, line 3, field 'text': must be a non-empty string, got int"):
        read_texts(tmp_path / "d.jsonl")
