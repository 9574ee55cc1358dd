"""The workflows' one set of input checks: the same bad input stops ``rlhfkit <workflow>`` and the pipeline's stage
with the same message; data sources registered outside ``data/`` (the feedback store) are read by both."""

from __future__ import annotations

import json

import pytest
import yaml
from typer.testing import CliRunner

from rlhfkit import cli
from rlhfkit.data import sources
from rlhfkit.data.readers import read_records
from rlhfkit.data.sources import SourceRows, register_source
from rlhfkit.tasks import get_task


@pytest.fixture(autouse=True)
def wide_console(monkeypatch):
    monkeypatch.setattr(cli.console, "width", 1000)  # one error message on one line


def error_line(result) -> str:
    assert result.exit_code == 2, result.output
    assert "Traceback" not in result.output
    return next(line for line in result.output.splitlines() if line.startswith("error:"))


def run_pipeline(tmp_path, tree: dict):
    path = tmp_path / "pipeline.yaml"
    path.write_text(yaml.safe_dump({"out_dir": str(tmp_path / "run"), **tree}, sort_keys=False))
    return CliRunner().invoke(cli.app, ["pipeline", "--config", str(path)])


def jsonl(path, rows) -> str:
    path.write_text("".join(json.dumps(row) + "\n" for row in rows), encoding="utf-8")
    return str(path)


PROMPT = get_task("tinyworld").prompts(1, seed=0)[0]
GOOD_SAMPLES = {"prompt": PROMPT, "completions": ["The fox is red.", "Foxes run."]}


@pytest.mark.parametrize(("bad", "where"), [
    ({"prompt": PROMPT, "completions": "The fox is red."}, "line 2, field 'completions': expected a list of strings"),
    ({"prompt": PROMPT, "completions": ["The fox is red.", 7]}, "line 2, field 'completions'"),
    ({"prompt": " ", "completions": ["a", "b"]}, "line 2, field 'prompt': expected a non-empty string"),
    ({"completions": ["a", "b"]}, "line 2, field 'prompt'"),
    ({"prompt": "Tell me of the moon.", "completions": ["a", "b"]}, "line 2, field 'prompt': not a tinyworld prompt"),
])
def test_a_bad_samples_file_stops_rank_and_the_rank_stage_with_one_message(tmp_path, bad, where):
    samples = jsonl(tmp_path / "samples.jsonl", [GOOD_SAMPLES, bad])
    from_cli = error_line(CliRunner().invoke(cli.app, ["rank", "--task", "tinyworld", "--samples", samples,
                                                       "--out", str(tmp_path / "rankings.jsonl")]))
    from_pipeline = error_line(run_pipeline(tmp_path, {"task": "tinyworld", "stages": ["rank"],
                                                       "rank": {"samples": samples}}))
    assert from_cli == from_pipeline
    assert f"samples.jsonl, {where}" in from_cli
    assert not (tmp_path / "rankings.jsonl").exists() and not (tmp_path / "run" / "rank" / "rankings.jsonl").exists()


def test_an_unknown_task_is_one_message_from_the_cli_and_the_pipeline(tmp_path):
    samples = jsonl(tmp_path / "samples.jsonl", [GOOD_SAMPLES])
    from_cli = error_line(CliRunner().invoke(cli.app, ["rank", "--task", "nope", "--samples", samples,
                                                       "--out", str(tmp_path / "rankings.jsonl")]))
    from_pipeline = error_line(run_pipeline(tmp_path, {"task": "nope", "stages": ["sample", "rank"],
                                                       "sample": {"model": "policy", "prompts": samples},
                                                       "rank": {"samples": samples}}))
    assert from_cli == from_pipeline == "error: unknown task 'nope'; known tasks: sums, tinyworld"
    assert not (tmp_path / "run" / "sample").exists()  # found before the first stage runs


@pytest.mark.parametrize(("row", "where"), [
    ({"prompt": 3}, "line 2, field 'prompt'"),
    ({"text": "no prompt"}, "line 2, field 'prompt': is missing"),
])
def test_bad_prompts_stop_sample_and_eval_before_any_model_loads(tmp_path, row, where):
    prompts = jsonl(tmp_path / "prompts.jsonl", [{"prompt": PROMPT}, row])
    model = tmp_path / "policy"
    model.mkdir()  # never loaded: the prompts are read first
    from_cli = error_line(CliRunner().invoke(cli.app, ["sample", "--model", str(model), "--prompts", prompts,
                                                       "--out", str(tmp_path / "samples.jsonl")]))
    from_pipeline = error_line(run_pipeline(tmp_path, {"stages": ["sample"], "sample": {"model": str(model),
                                                                                         "prompts": prompts}}))
    assert from_cli == from_pipeline and f"prompts.jsonl, {where}" in from_cli

    from_cli = error_line(CliRunner().invoke(cli.app, ["eval", "--models", f"sft={model}", "--prompts", prompts,
                                                       "--out", str(tmp_path / "eval")]))
    from_pipeline = error_line(run_pipeline(tmp_path, {"stages": ["eval"], "eval": {"models": {"sft": str(model)},
                                                                                     "prompts": prompts}}))
    assert from_cli == from_pipeline and f"prompts.jsonl, {where}" in from_cli



def test_sample_refuses_greedy_decoding_from_the_cli_as_the_pipeline_does(tmp_path):
    prompts = jsonl(tmp_path / "prompts.jsonl", [{"prompt": PROMPT}])
    from_cli = error_line(CliRunner().invoke(cli.app, ["sample", "--model", str(tmp_path / "policy"), "--prompts",
                                                       prompts, "--out", str(tmp_path / "samples.jsonl"),
                                                       "--temperature", "0"]))
    assert "temperature must be > 0, got 0.0" in from_cli
    result = run_pipeline(tmp_path, {"stages": ["sample"], "sample": {"model": "policy", "prompts": prompts,
                                                                      "temperature": 0}})
    assert result.exit_code == 2 and "sample.temperature" in result.output
    assert not (tmp_path / "samples.jsonl").exists()

def test_eval_refuses_several_greedy_samples_per_prompt_from_the_cli_as_the_pipeline_does(tmp_path):
    prompts = jsonl(tmp_path / "prompts.jsonl", [{"prompt": PROMPT}])
    eval_cli = ["eval", "--models", f"sft={tmp_path / 'policy'}", "--prompts", prompts, "--out", str(tmp_path / "e")]
    message = "eval: 2 samples per prompt need a temperature > 0"
    assert message in error_line(CliRunner().invoke(cli.app, [*eval_cli, "--greedy", "--samples-per-prompt", "2"]))
    result = run_pipeline(tmp_path, {"stages": ["eval"], "eval": {"models": {"sft": "policy"}, "prompts": prompts,
                                                                  "temperature": 0, "samples_per_prompt": 2}})
    assert result.exit_code == 2 and message in result.output and "pipeline.yaml, line 4: eval:" in result.output
    assert "--greedy is temperature 0" in error_line(CliRunner().invoke(cli.app, [*eval_cli, "--greedy",
                                                                                  "--temperature", "0.5"]))
    assert "top_p must be in (0, 1], got 0.0" in error_line(CliRunner().invoke(cli.app, [*eval_cli, "--top-p", "0"]))
    assert not (tmp_path / "e").exists() and not (tmp_path / "run" / "eval").exists()


def test_the_eval_stage_takes_the_sampling_controls_of_rlhfkit_eval(tmp_path, tiny_model, tokenizer):
    from rlhfkit.models.load import save_model

    save_model(tiny_model, tokenizer, str(tmp_path / "policy"))
    prompts = jsonl(tmp_path / "prompts.jsonl", [{"prompt": p} for p in get_task("tinyworld").prompts(3, seed=4)])
    result = run_pipeline(tmp_path, {"task": "tinyworld", "stages": ["eval"], "eval": {
        "models": {"a": str(tmp_path / "policy"), "b": str(tmp_path / "policy")}, "prompts": prompts,
        "max_new_tokens": 5, "temperature": 1.0, "top_k": 1, "samples_per_prompt": 2}})
    assert result.exit_code == 0, result.output
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["eval_prompts"] == 3 and summary["samples_per_prompt"] == 2
    rows = [json.loads(line) for line in (tmp_path / "run" / "samples" / "a.jsonl").read_text().splitlines()]
    assert len(rows) == 6 and all(rows[i] == rows[i + 1] for i in (0, 2, 4))  # top-k 1: a prompt's samples agree
    assert summary["win_rates"]["b"]["gold"]["ties"] == 6
    assert not (tmp_path / "policy" / "README.md").exists()  # a model from outside the run keeps its card as it is


def test_the_rank_stage_collects_the_feedback_databases_rankings(tmp_path):
    from rlhfkit.feedback.store import Store

    url = f"sqlite:///{tmp_path / 'feedback.db'}"
    store = Store(url)
    ann = store.create_user("ann", "hash")
    store.import_samples([{"prompt": "Name a colour", "completions": ["red", "blue", "seven"], "id": "s1"}])
    store.submit(ann.id, store.next_item(ann.id).id, {"ratings": [7, 4, 1], "flags": [[], [], []],
                                                               "ranking": [[0], [1, 2]]})
    store.close()
    result = run_pipeline(tmp_path, {"stages": ["rank"], "rank": {"feedback": url}})
    assert result.exit_code == 0, result.output
    rankings = read_records(tmp_path / "run" / "rank" / "rankings.jsonl", "ranking")
    assert [(r.id, r.labeler, r.ranking) for r in rankings] == [("s1", "ann", ((0,), (1, 2)))]
    missing = f"sqlite:///{tmp_path / 'nope.db'}"
    assert "nope.db: no such database file" in error_line(run_pipeline(tmp_path, {
        "stages": ["rank"], "rank": {"feedback": missing}}))
    assert not (tmp_path / "nope.db").exists()


def test_read_records_reads_a_registered_source(monkeypatch):
    class Memory:
        def owns(self, location: str) -> bool:
            return location.startswith("memory:")

        def rows(self, location: str, kind: str, split: str | None) -> SourceRows:
            return SourceRows(location, "record", enumerate([{"prompt": "a"}, {"prompt": ""}], start=1))

    monkeypatch.setattr(sources, "_SOURCES", list(sources._SOURCES))
    register_source(Memory())
    assert read_records("memory:prompts", "prompt", limit=1)[0].prompt == "a"
    with pytest.raises(ValueError, match="memory:prompts, record 2, field 'prompt'"):
        read_records("memory:prompts", "prompt")
