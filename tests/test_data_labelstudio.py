"""Label Studio projects written from rlhfkit data and its JSON exports read back (data/labelstudio.py): by hand
on exports shaped as Label Studio writes them, and a round trip through a real Label Studio server."""

from __future__ import annotations

import json
import xml.etree.ElementTree as ElementTree

import pytest
from labelstudio_server import LabelStudioServer, why_unavailable
from typer.testing import CliRunner

from rlhfkit.cli import app
from rlhfkit.data.labelstudio import read_labelstudio, write_project
from rlhfkit.data.records import DataError, PreferenceRecord, RankingRecord

SAMPLES = [
    {"prompt": "Name a fruit.", "completions": ["An apple.", "A pear.", "A car.", "Plum."], "id": "p1",
     "meta": {"source": "test"}},
    {"prompt": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Say hi."}],
     "completions": ["Hi!", "Hello there, how are you doing today?", "Bye.", "Hi."]},
]


def write_jsonl(path, rows) -> None:
    path.write_text("".join(json.dumps(row) + "\n" for row in rows), encoding="utf-8")


def project(tmp_path, kind, rows, **options):
    source = tmp_path / f"{kind}-in.jsonl"
    write_jsonl(source, rows)
    write_project(source, kind, tmp_path / kind, **options)
    config = (tmp_path / kind / "label_config.xml").read_text()
    return ElementTree.fromstring(config), json.loads((tmp_path / kind / "tasks.json").read_text())


def annotated(task, result, **annotation):
    """The task as Label Studio's JSON export has it, with one annotation holding ``result``."""
    return {"id": 7, **task, "annotations": [{"id": 1, "completed_by": 3, "was_cancelled": False,
                                              "result": [result], **annotation}]}


def ranker(order, name="completions"):
    return {"from_name": "ranking", "to_name": "completions", "type": "ranker", "value": {"ranker": {name: order}}}


def read(tmp_path, kind, tasks):
    path = tmp_path / f"export-{kind}.json"
    path.write_text(json.dumps(tasks))
    return read_labelstudio(path, kind)


def test_rankings_round_trip_through_a_shuffled_list(tmp_path):
    root, tasks = project(tmp_path, "rankings", SAMPLES)
    assert [tag.tag for tag in root] == ["Text", "List", "Ranker"]
    assert root.find("Ranker").get("toName") == root.find("List").get("name") == "completions"
    shown = [[item["id"] for item in task["data"]["completions"]] for task in tasks]
    assert shown[0] != ["0", "1", "2", "3"] or shown[1] != ["0", "1", "2", "3"]  # an order drawn per task
    assert tasks[1]["data"]["prompt"] == "system: Be brief.\n\nuser: Say hi."
    for task in tasks:  # each item's id is its completion's index in the record
        record = task["data"]["rlhfkit"]
        assert all(record["completions"][int(item["id"])] == item["body"] for item in task["data"]["completions"])
    # the labeler ranks by the ids: 1 > 3 > 0 > 2 for the first task, 0 > 3 > 1 > 2 for the second
    data = read(tmp_path, "rankings", [annotated(tasks[0], ranker(["1", "3", "0", "2"])),
                                       annotated(tasks[1], ranker(["0", "3", "1", "2"]))])
    first, second = data.records
    assert isinstance(first, RankingRecord) and first.ranking == ((1,), (3,), (0,), (2,))
    assert first.completions == tuple(SAMPLES[0]["completions"]) and first.prompt == "Name a fruit."
    assert (first.id, first.labeler, first.meta) == ("p1", "3", {"source": "test"})
    assert second.ranking == ((0,), (3,), (1,), (2,))
    assert [m["role"] for m in second.prompt] == ["system", "user"]  # the chat prompt as given, not its display


WEATHER_TOOL = {"type": "function", "function": {"name": "get_temperature", "description": "Current temperature",
                                                   "parameters": {"type": "object",
                                                                  "properties": {"city": {"type": "string"}}}}}


def test_a_tool_using_chat_shows_its_tools_calls_and_results_and_keeps_its_tools(tmp_path):
    chat = [{"role": "user", "content": "How warm is it in Paris?"},
            {"role": "assistant", "tool_calls": [{"type": "function", "function": {
                "name": "get_temperature", "arguments": '{"city": "Paris"}'}}]},  # arguments as a JSON string
            {"role": "tool", "name": "get_temperature", "content": "22"}]
    row = {"prompt": chat, "tools": [WEATHER_TOOL], "completions": ["It is 22 degrees.", "I do not know."]}
    _, tasks = project(tmp_path, "rankings", [row])
    shown = tasks[0]["data"]["prompt"]
    assert shown.startswith("system: tools:\n" + json.dumps(WEATHER_TOOL))
    assert shown.endswith("user: How warm is it in Paris?\n\nassistant: call get_temperature {\"city\": \"Paris\"}"
                          "\n\ntool: get_temperature returned 22")
    [record] = read(tmp_path, "rankings", [annotated(tasks[0], ranker(["0", "1"]))]).records
    assert record.prompt.tools == [WEATHER_TOOL]  # the record read back still offers its tools
    assert record.prompt[1]["tool_calls"][0]["function"]["arguments"] == {"city": "Paris"}


def test_ties_come_from_buckets_and_pairs_skip_them(tmp_path):
    root, tasks = project(tmp_path, "rankings", SAMPLES[:1], ties=True)
    assert [bucket.get("name") for bucket in root.find("Ranker")] == ["rank_1", "rank_2", "rank_3", "rank_4"]
    buckets = ranker(None)
    buckets["value"]["ranker"] = {"rank_2": ["2"], "rank_1": ["0", "3"], "rank_4": ["1"], "rank_3": []}
    [record] = read(tmp_path, "rankings", [annotated(tasks[0], buckets)]).records
    assert record.ranking == ((0, 3), (2,), (1,))
    pairs = read(tmp_path, "pairs", [annotated(tasks[0], buckets)]).records
    assert {(p.chosen, p.rejected) for p in pairs} == {
        ("An apple.", "A car."), ("Plum.", "A car."), ("An apple.", "A pear."), ("Plum.", "A pear."),
        ("A car.", "A pear.")}  # 5 pairs: the tie of 0 and 3 gives none


def test_pairwise_choices_follow_the_side_shown(tmp_path):
    rows = [{"prompt": f"Say {n}.", "completions": [f"good {n}", f"bad {n}"]} for n in range(8)]
    root, tasks = project(tmp_path, "pairs", rows, instructions="Pick the better answer.")
    assert root.find("Header").get("value") == "Pick the better answer."
    assert root.find("Pairwise").get("toName") == "a,b"
    sides = [task["data"]["a"].startswith("good") for task in tasks]
    assert any(sides) and not all(sides)  # the good one is on either side
    exports = [annotated(task, {"from_name": "preference", "to_name": "a,b", "type": "pairwise",
                                "value": {"selected": "left" if task["data"]["a"].startswith("good") else "right"}})
               for task in tasks]
    records = read(tmp_path, "pairs", exports).records
    assert all(isinstance(r, PreferenceRecord) and r.chosen.startswith("good") for r in records) and len(records) == 8
    with pytest.raises(DataError, match="ranker"):  # a rankings read of a pairwise project says what it found
        read(tmp_path, "rankings", exports)


def test_demonstrations_cancelled_and_unlabelled_tasks(tmp_path):
    root, tasks = project(tmp_path, "demonstrations", [{"prompt": "Explain rain."}, {"prompt": "Explain snow."},
                                                       {"prompt": "Explain wind."}])
    assert root.find("TextArea").get("toName") == "prompt"
    written = {"from_name": "demonstration", "to_name": "prompt", "type": "textarea",
               "value": {"text": ["Water falls", "from clouds."]}}
    exports = [annotated(tasks[0], written), annotated(tasks[1], written, was_cancelled=True), tasks[2]]
    data = read(tmp_path, "demonstrations", exports)
    [record] = data.records
    assert (record.prompt, record.completion) == ("Explain rain.", "Water falls\nfrom clouds.")
    assert dict(data.skipped) == {"cancelled annotations only": 1, "no annotation": 1}


def test_a_hand_built_project_reads_too(tmp_path):
    """No rlhfkit record in the data: the prompt and the list's bodies, in the order imported, are read."""
    items = [{"id": "x", "body": "first"}, {"id": "y", "body": "second"}]
    task = {"data": {"prompt": "Pick one.", "completions": items}}
    [record] = read(tmp_path, "rankings", [annotated(task, ranker(["y", "x"]))]).records
    assert (record.completions, record.ranking) == (("first", "second"), ((1,), (0,)))


@pytest.mark.parametrize("result, message", [
    (ranker(["1", "3", "0"]), "field 'annotations\\[0\\].result.value.ranker': leaves completion\\(s\\) 2 unranked"),
    (ranker(["1", "3", "0", "2", "9"]), "ranks id '9'"),
    ({"type": "ranker", "value": {"ranker": {"best": ["0"], "worst": ["1", "2", "3"]}}}, "place number"),
    ({"type": "choices", "value": {"choices": ["a"]}}, "has no ranker result \\(found: choices\\)"),
])
def test_bad_exports_name_the_task_and_field(tmp_path, result, message):
    _, tasks = project(tmp_path, "rankings", SAMPLES[:1])
    with pytest.raises(DataError, match=message) as error:
        read(tmp_path, "rankings", [annotated(tasks[0], result)])
    assert "export-rankings.json" in str(error.value)


def test_bad_input_is_refused_where_it_enters(tmp_path):
    source = tmp_path / "samples.jsonl"
    write_jsonl(source, [{"prompt": "x", "completions": ["a", "b"]}, {"prompt": "x", "completions": ["a", "b", "c"]}])
    with pytest.raises(DataError, match="line 2, field 'completions': holds 3 completion\\(s\\); pairs need exactly 2"):
        write_project(source, "pairs", tmp_path / "out")
    write_jsonl(source, [{"completions": ["a", "b"]}])
    with pytest.raises(DataError, match="line 1, field 'prompt': is missing"):
        write_project(source, "rankings", tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_cli_writes_and_reads(tmp_path):
    source = tmp_path / "samples.jsonl"
    write_jsonl(source, SAMPLES)
    runner = CliRunner()
    made = runner.invoke(app, ["labelstudio-project", "--in", str(source), "--kind", "rankings", "--out",
                               str(tmp_path / "ls")])
    assert made.exit_code == 0, made.output
    tasks = json.loads((tmp_path / "ls" / "tasks.json").read_text())
    (tmp_path / "export.json").write_text(json.dumps([annotated(t, ranker(["0", "1", "2", "3"])) for t in tasks]))
    read_back = runner.invoke(app, ["convert-labelstudio", "--in", str(tmp_path / "export.json"), "--kind", "pairs",
                                    "--out", str(tmp_path / "pairs.jsonl")])
    assert read_back.exit_code == 0, read_back.output
    assert len((tmp_path / "pairs.jsonl").read_text().splitlines()) == 12  # 6 pairs from each ranking of 4
    bad = runner.invoke(app, ["convert-labelstudio", "--in", str(tmp_path / "export.json"), "--kind", "votes",
                              "--out", str(tmp_path / "x.jsonl")])
    assert bad.exit_code == 2 and "rankings, pairs, demonstrations" in bad.output


@pytest.mark.skipif(why_unavailable() is not None, reason=str(why_unavailable()))
def test_round_trip_through_a_real_label_studio_server(tmp_path):
    """Projects made from rlhfkit's files on a running Label Studio, annotated through its API as a labeler's
    browser does, exported with its own JSON export, and read back: the rankings, ties, choices and texts given."""
    rows = [*SAMPLES, {"prompt": "Name a colour.", "completions": ["Red.", "Blue.", "Green.", "A dog."]}]
    answers = {
        "rankings": lambda task: ranker([item["id"] for item in task["data"]["completions"]][::-1]),
        "ties": lambda task: {"from_name": "ranking", "to_name": "completions", "type": "ranker",
                              "value": {"ranker": {"rank_1": ["0", "1"], "rank_2": ["2"], "rank_3": ["3"]}}},
        "pairs": lambda task: {"from_name": "preference", "to_name": "a,b", "type": "pairwise",
                               "value": {"selected": "right"}},
        "demonstrations": lambda task: {"from_name": "demonstration", "to_name": "prompt", "type": "textarea",
                                        "value": {"text": [f"answer to {task['data']['prompt'][:12]}"]}},
    }
    inputs = {"rankings": rows, "ties": rows, "pairs": [{**r, "completions": r["completions"][:2]} for r in rows],
              "demonstrations": [{"prompt": r["prompt"]} for r in rows]}
    exported, expected = {}, {}
    with LabelStudioServer() as server:
        for name, answer in answers.items():
            kind = "rankings" if name == "ties" else name
            source = tmp_path / f"{name}.jsonl"
            write_jsonl(source, inputs[name])
            write_project(source, kind, tmp_path / name, ties=name == "ties")
            config = (tmp_path / name / "label_config.xml").read_text()
            made = server.api.post("/api/projects", json={"title": f"rlhfkit {name}", "label_config": config})
            assert made.status_code == 201, made.text
            project_id = made.json()["id"]
            tasks = json.loads((tmp_path / name / "tasks.json").read_text())
            imported = server.api.post(f"/api/projects/{project_id}/import", json=tasks)
            assert imported.status_code == 201 and imported.json()["task_count"] == 3, imported.text
            listed = server.api.get("/api/tasks", params={"project": project_id, "fields": "all"}).json()["tasks"]
            expected[name] = [expectation(name, task["data"]) for task in listed]
            for task in listed:
                saved = server.api.post(f"/api/tasks/{task['id']}/annotations", json={"result": [answer(task)]})
                assert saved.status_code == 201, saved.text
            export = server.api.get(f"/api/projects/{project_id}/export", params={"exportType": "JSON"})
            assert export.status_code == 200, export.text
            (tmp_path / f"{name}-export.json").write_text(export.text)
            exported[name] = read_labelstudio(tmp_path / f"{name}-export.json", kind).records
    for name, records in exported.items():
        assert sorted(json.dumps(read_back(r)) for r in records) == sorted(map(json.dumps, expected[name])), name
        assert all(record.labeler is not None for record in records)


def expectation(name: str, data: dict) -> tuple:
    """What reading back the answer given to a task showing ``data`` must yield (see the round-trip test)."""
    if name == "rankings":  # the order shown, reversed, in the record's own indices
        return data["rlhfkit"]["completions"], [[int(item["id"])] for item in data["completions"]][::-1]
    if name == "ties":
        return data["rlhfkit"]["completions"], [[0, 1], [2], [3]]
    if name == "pairs":  # "right" is b, whichever completion was shown there
        return data["b"], data["a"]
    return data["rlhfkit"]["prompt"], f"answer to {data['prompt'][:12]}"


def read_back(record) -> tuple:
    if isinstance(record, RankingRecord):
        return list(record.completions), [list(group) for group in record.ranking]
    if isinstance(record, PreferenceRecord):
        return record.chosen, record.rejected
    return record.prompt, record.completion
