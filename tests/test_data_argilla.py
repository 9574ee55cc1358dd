"""Argilla's exported records read as rlhfkit records, from small hand-written exports of each shape."""

from __future__ import annotations

import json

import pytest

from rlhfkit.data.argilla import read_argilla
from rlhfkit.data.records import DataError, DemonstrationRecord, PreferenceRecord, RankingRecord

ANN, BOB = "11111111-aaaa-4aaa-8aaa-000000000001", "11111111-aaaa-4aaa-8aaa-000000000002"

# dataset.records.to_json(): nested records (fields, metadata, responses per question, suggestions)
NESTED = [
    {"id": "r1", "_server_id": "9f0c", "fields": {"prompt": "Name a colour", "response1": "red", "response2": "seven",
                                                 "response3": "blue"},
     "metadata": {"source": "sft-v2"}, "vectors": {},
     "suggestions": {"ranking": {"value": ["response1", "response3", "response2"], "score": None, "agent": "rm"}},
     "responses": {"ranking": [{"value": ["response3", "response1", "response2"], "user_id": ANN},
                               {"value": ["response1", "response3", "response2"], "user_id": BOB,
                                "status": "submitted"}],
                   "better": [{"value": "Blue.", "user_id": ANN}]}},
    {"id": "r2", "_server_id": "9f0d", "fields": {"prompt": "Say hi", "response1": "hi", "response2": "go away",
                                                 "response3": "hello"},
     "metadata": {}, "vectors": {}, "suggestions": {},
     "responses": {"ranking": [{"value": ["response2", "response1", "response3"], "user_id": ANN,
                                "status": "discarded"}]}},
    {"id": "r3", "_server_id": "9f0e", "fields": {"prompt": "Count", "response1": "1 2 3", "response2": "one",
                                                 "response3": "3"},
     "metadata": {}, "vectors": {}, "suggestions": {}, "responses": {}},
]


def _write(path, rows):
    path.write_text(json.dumps(rows), encoding="utf-8")
    return path


def test_rankings_from_a_to_json_export_keep_labeler_id_and_metadata(tmp_path):
    data = read_argilla(_write(tmp_path / "records.json", NESTED), "rankings", question="ranking")
    assert data.rows == 3 and dict(data.skipped) == {"no submitted response to question 'ranking'": 1,
                                                      "no response to question 'ranking'": 1}
    ann, bob = data.records
    assert isinstance(ann, RankingRecord) and ann.completions == ("red", "seven", "blue")  # the fields' order
    assert ann.ranking == ((2,), (0,), (1,)) and bob.ranking == ((0,), (2,), (1,))
    assert (ann.id, ann.labeler, ann.meta) == ("r1", ANN, {"source": "sft-v2"}) and bob.labeler == BOB


def test_pairs_are_every_untied_pair_of_each_ranking(tmp_path):
    data = read_argilla(_write(tmp_path / "records.json", NESTED), "pairs", question="ranking")
    assert len(data.records) == 6 and all(isinstance(record, PreferenceRecord) for record in data.records)
    assert [(r.chosen, r.rejected) for r in data.records[:3]] == [("blue", "red"), ("blue", "seven"),
                                                                  ("red", "seven")]


def test_demonstrations_from_a_text_question(tmp_path):
    data = read_argilla(_write(tmp_path / "records.json", NESTED), "demonstrations", question="better")
    [record] = data.records
    assert isinstance(record, DemonstrationRecord)
    assert (record.prompt, record.completion, record.labeler) == ("Name a colour", "Blue.", ANN)


def test_a_to_disk_folder_and_json_lines_are_read_alike(tmp_path):
    folder = tmp_path / "exported"
    (folder / ".argilla").mkdir(parents=True)
    (folder / ".argilla" / "settings.json").write_text("{}", encoding="utf-8")
    _write(folder / "records.json", NESTED)
    lines = tmp_path / "records.jsonl"
    lines.write_text("".join(json.dumps(row) + "\n" for row in NESTED), encoding="utf-8")
    expected = read_argilla(folder / "records.json", "rankings", question="ranking").records
    assert read_argilla(folder, "rankings", question="ranking").records == expected
    assert read_argilla(lines, "rankings", question="ranking").records == expected


def test_a_flattened_saved_dataset_with_ties_and_mapped_options(tmp_path):
    import datasets

    flat = {"id": ["f1", "f2"], "_server_id": ["a", "b"], "status": ["completed", "pending"],
            "instruction": ["Pick a fruit", "Pick a tree"], "answer_a": ["apple", "oak"], "answer_b": ["pear", "elm"],
            "answer_c": ["plum", "rose"],
            "rank.responses": [[[{"value": "c", "rank": 1}, {"value": "a", "rank": 1}, {"value": "b", "rank": 2}],
                                [{"value": "a", "rank": 2}, {"value": "b", "rank": 1}, {"value": "c", "rank": 3}]],
                               None],
            "rank.responses.users": [[ANN, BOB], None], "rank.responses.status": [["submitted", "draft"], None]}
    folder = tmp_path / "saved"
    datasets.Dataset.from_dict(flat).save_to_disk(str(folder))
    data = read_argilla(folder, "rankings", question="rank", prompt_field="instruction",
                        options={"a": "answer_a", "b": "answer_b", "c": "answer_c"})
    [record] = data.records  # bob's draft and the record without responses are left out
    assert record.prompt == "Pick a fruit" and record.completions == ("apple", "pear", "plum")
    assert record.ranking == ((0, 2), (1,)) and record.labeler == ANN and record.id == "f1"
    assert dict(data.skipped) == {"no response to question 'rank'": 1}


def test_a_chat_prompt_is_kept_as_messages(tmp_path):
    chat = [{"role": "user", "content": "Hi!"}]
    rows = [{"id": "c1", "fields": {"prompt": chat, "r1": "Hello.", "r2": "Go."},
             "responses": {"ranking": [{"value": ["r1", "r2"], "user_id": ANN}]}}]
    [record] = read_argilla(_write(tmp_path / "records.json", rows), "rankings", question="ranking").records
    assert record.prompt == chat and record.ranking == ((0,), (1,))


def _error(tmp_path, rows, kind="rankings", question="ranking", **options) -> DataError:
    path = tmp_path / "bad.jsonl"
    path.write_text("".join(json.dumps(row) + "\n" for row in rows), encoding="utf-8")
    with pytest.raises(DataError) as error:
        read_argilla(path, kind, question=question, **options)
    assert error.value.source == str(path)
    return error.value


@pytest.mark.parametrize(("change", "field", "message"), [
    ({"fields": {"text": "no prompt"}}, "fields.prompt", "is missing (the prompt"),
    ({"responses": {"ranking": {"value": ["response1"]}}}, "responses.ranking", "expected a list of responses"),
    ({"responses": {"ranking": [["response1"]]}}, "responses.ranking[0]", "expected an object with value"),
    ({"responses": {"ranking": [{"value": "response1", "user_id": ANN}]}}, "responses.ranking[0].value",
     "expected the ranked options, best first"),
    ({"responses": {"ranking": [{"value": ["response1", "response9"], "user_id": ANN}]}},
     "responses.ranking[0].value", "ranks option 'response9', which is no field of the record"),
    ({"responses": {"ranking": [{"value": ["response1", "response1"], "user_id": ANN}]}},
     "responses.ranking[0].value", "ranks option 'response1' more than once"),
    ({"responses": {"ranking": [{"value": ["response1"], "user_id": ANN}]}}, "responses.ranking[0].value",
     "ranks 1 option(s); a ranking needs at least 2"),
    ({"responses": {"ranking": [{"value": [{"value": "response1", "rank": "1"}], "user_id": ANN}]}},
     "responses.ranking[0].value[0].rank", "expected an integer rank"),
    ({"fields": {"prompt": "p", "response1": "", "response2": "b", "response3": "c"}}, "fields.response1",
     "expected the text of a completion"),
])
def test_a_bad_record_names_the_file_line_and_field(tmp_path, change, field, message):
    error = _error(tmp_path, [NESTED[0], {**NESTED[0], **change}])
    assert (error.line, error.field) == (2, field) and message in error.message, str(error)


def test_other_errors_name_what_to_fix(tmp_path):
    error = _error(tmp_path, [NESTED[0]], kind="demonstrations")
    assert error.field == "responses.ranking[0].value" and "is 'ranking' a text question?" in error.message
    error = _error(tmp_path, [{"prompt": "p", "q.responses": ["x", "y"], "q.responses.users": [ANN]}],
                   kind="demonstrations", question="q")
    assert error.field == "q.responses.users" and "expected a list of 2 entries" in error.message
    error = _error(tmp_path, [NESTED[0]], question="rating")
    assert error.line is None and "holds no rankings from question 'rating'" in error.message
    assert "no response to question 'rating'" in error.message
    error = _error(tmp_path, [NESTED[0], ["not", "a", "record"]])
    assert error.line == 2 and "expected a JSON object" in error.message
    with pytest.raises(DataError) as listed:
        read_argilla(_write(tmp_path / "list.json", [NESTED[0], 5]), "rankings", question="ranking")
    assert str(listed.value).endswith("list.json, record 2: expected a JSON object, got int")
    with pytest.raises(ValueError, match="unknown kind 'votes'"):
        read_argilla(tmp_path / "bad.jsonl", "votes", question="q")


def test_the_convert_argilla_command_writes_records_rlhfkit_reads(tmp_path):
    import typer
    from typer.testing import CliRunner

    from rlhfkit.cli_public import register
    from rlhfkit.data.readers import read_records

    app = typer.Typer()
    register(app)
    source, out = _write(tmp_path / "records.json", NESTED), tmp_path / "pairs.jsonl"
    renamed = [{**row, "responses": {"ranking": [{"value": ["x", "z", "y"], "user_id": ANN}]}} for row in NESTED[:1]]
    result = CliRunner().invoke(app, ["convert-argilla", "--in", str(source), "--kind", "pairs", "--question",
                                      "ranking", "--out", str(out)])
    assert result.exit_code == 0, result.output
    assert json.loads(result.output) == {"rows": 3, "records": 6, "out": str(out), "skipped": {
        "no submitted response to question 'ranking'": 1, "no response to question 'ranking'": 1}}
    assert len(read_records(out, "preference")) == 6
    mapped = CliRunner().invoke(app, ["convert-argilla", "--in", str(_write(tmp_path / "renamed.json", renamed)),
                                      "--kind", "rankings", "--question", "ranking", "--out", str(out),
                                      "--option", "x=response1", "--option", "y=response2", "--option", "z=response3"])
    assert mapped.exit_code == 0, mapped.output
    [record] = read_records(out, "ranking")
    assert record.completions == ("red", "seven", "blue") and record.ranking == ((0,), (2,), (1,))
    for args, message in ((["--kind", "votes"], "expected one of rankings, pairs, demonstrations"),
                          (["--kind", "rankings", "--option", "x"], "expected OPTION=FIELD, got 'x'"),
                          (["--kind", "rankings", "--prompt-field", "text"],
                           "record 1, field 'fields.text': is missing")):
        result = CliRunner().invoke(app, ["convert-argilla", "--in", str(source), "--question", "ranking", "--out",
                                          str(tmp_path / "x.jsonl"), *args])
        assert result.exit_code == 2 and message in " ".join(result.output.split()), result.output
