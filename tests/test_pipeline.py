"""``rlhfkit pipeline``: stages from one config, skipped when done, re-run downstream of a change, resumed."""

import json
import os
import signal
import subprocess
import sys
import time

import pytest
import yaml
from rich.console import Console
from typer.testing import CliRunner

from rlhfkit import cli
from rlhfkit.config import ConfigError
from rlhfkit.data.readers import write_jsonl
from rlhfkit.pipeline import StageRunner, load_pipeline, run_pipeline


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory, task):
    directory = tmp_path_factory.mktemp("pipeline-data")
    write_jsonl(directory / "corpus.jsonl", ({"text": t} for t in task.pretraining_corpus(200, seed=0)))
    write_jsonl(directory / "demos.jsonl", task.demonstrations(task.prompts(64, seed=0), seed=0))
    write_jsonl(directory / "prompts.jsonl", ({"prompt": p} for p in task.prompts(16, split="test", seed=0)))
    return directory


def small_pipeline(out_dir, data_dir, tokenizer_dir, stages=None) -> dict:
    """Every stage on the tiny model, a few steps each (about 20 s in all on 2 cores)."""
    train = {"max_steps": 4, "batch_size": 8, "log_every": 2, "save_every": 2, "progress": False}
    lengths = {"max_length": 64, "max_prompt_length": 32}
    return {
        "out_dir": str(out_dir), "task": "tinyworld",
        "stages": stages or ["pretrain", "sft", "sample", "rank", "rm", "ppo", "dpo", "eval", "report"],
        "pretrain": {"model": {"preset": "tiny", "tokenizer": str(tokenizer_dir)},
                     "data": {"train": str(data_dir / "corpus.jsonl"), "max_length": 64}, "train": dict(train)},
        "sft": {"model": {"name_or_path": "{pretrain}"}, "data": {"train": str(data_dir / "demos.jsonl"), **lengths},
                "train": dict(train)},
        "sample": {"prompts": str(data_dir / "demos.jsonl"), "limit": 24, "k": 3, "max_new_tokens": 24,
                   "finished_only": False},
        "rank": {},
        "rm": {"model": {"name_or_path": "{sft}"}, "data": {"train": "{rank}", **lengths}, "train": dict(train)},
        "ppo": {"model": {"name_or_path": "{sft}"}, "data": {"train": str(data_dir / "prompts.jsonl"), **lengths},
                "train": {**train, "max_steps": 2, "save_every": 1},
                "ppo": {"reward_model": "{rm}", "rollout_batch_size": 8, "minibatch_size": 4, "ppo_epochs": 1,
                        "max_new_tokens": 16, "samples_to_log": 8}},
        "dpo": {"model": {"name_or_path": "{sft}"}, "data": {"train": "{rank}", **lengths}, "train": dict(train)},
        "eval": {"models": {"sft": "{sft}", "ppo": "{ppo}", "ppo@1": "{ppo:checkpoint-1}", "dpo": "{dpo}"},
                 "prompts": str(data_dir / "prompts.jsonl"), "reward_model": "{rm}", "reference": "{sft}",
                 "baseline": "sft", "max_new_tokens": 16, "rm_gold_samples": 2},
        "report": {},
    }


def write_config(path, tree) -> str:
    path.write_text(yaml.safe_dump(tree, sort_keys=False))
    return str(path)


def states(out_dir) -> dict:
    return {p.parent.name: json.loads(p.read_text()) for p in out_dir.glob("*/stage.json")}


@pytest.mark.slow
def test_the_whole_loop_runs_then_skips_and_reruns_only_what_a_change_touches(tmp_path, data_dir, tokenizer_dir):
    out = tmp_path / "run"
    path = write_config(tmp_path / "pipeline.yaml", small_pipeline(out, data_dir, tokenizer_dir))
    result = CliRunner().invoke(cli.app, ["pipeline", "--config", path])
    assert result.exit_code == 0, result.output
    first = states(out)
    assert set(first) == {"pretrain", "sft", "sample", "rank", "rm", "ppo", "dpo", "eval", "report"}
    assert all(s["status"] == "done" for s in first.values())
    for output in ("pretrain/final/config.json", "sft/final/model.safetensors", "sample/samples.jsonl",
                   "rank/rankings.jsonl", "rm/final/config.json", "ppo/samples.jsonl", "dpo/final/config.json",
                   "eval/eval.json", "samples/dpo.jsonl", "report.html", "illustration.svg", "illustration.png"):
        assert (out / output).exists(), output
    summary = json.loads((out / "summary.json").read_text())
    assert set(summary["models"]) == {"sft", "ppo", "ppo@1", "dpo"} and "gold/score" in summary["models"]["ppo"]
    assert "gold/accuracy" in summary["reward_model"] and set(summary["seconds"]) >= {"sft", "ppo", "total"}
    cards = {name: (out / name / "final" / "README.md").read_text() for name in ("sft", "rm", "ppo", "dpo")}
    assert "The baseline of the win rates." in cards["sft"]  # the eval stage's results in each evaluated card
    assert all("| gold | [" in cards[name] and "| rm | [" in cards[name] for name in ("ppo", "dpo"))
    assert "## Evaluation" not in cards["rm"] and not (out / "ppo" / "checkpoint-1" / "README.md").exists()
    rankings = [json.loads(line) for line in (out / "rank" / "rankings.jsonl").read_text().splitlines()]
    assert rankings and all(r["labeler"] == "tinyworld-simulated" for r in rankings)
    assert yaml.safe_load((out / "sft" / "config.yaml").read_text())["model"]["name_or_path"] == \
        str(out / "pretrain" / "final")

    # the same config again: nothing runs
    runner = StageRunner(out, Console(quiet=True))
    config, lines = load_pipeline(path)
    run_pipeline(config, Console(quiet=True), source=path, lines=lines, runner=runner)
    assert states(out) == first

    # a changed SFT learning rate re-runs SFT and everything downstream of it, not the pretraining
    result = CliRunner().invoke(cli.app, ["pipeline", "--config", path, "--set", "sft.train.lr=1e-3",
                                          "--set", "stages=[pretrain, sft, sample, rank, rm]"])
    assert result.exit_code == 0, result.output
    second = states(out)
    assert second["pretrain"] == first["pretrain"]
    for stage in ("sft", "sample", "rank", "rm"):
        assert second[stage]["fingerprint"] != first[stage]["fingerprint"], stage
    # stages not listed keep what they had (PPO was trained from the old SFT; it re-runs when listed)
    assert second["ppo"] == first["ppo"]


@pytest.mark.slow
def test_an_interrupted_pipeline_resumes_its_stage_from_the_last_checkpoint(tmp_path, data_dir, tokenizer_dir):
    out = tmp_path / "run"
    tree = small_pipeline(out, data_dir, tokenizer_dir, stages=["pretrain", "sft"])
    tree["sft"]["train"] = {**tree["sft"]["train"], "max_steps": 400, "save_every": 5}
    path = write_config(tmp_path / "pipeline.yaml", tree)
    command = [sys.executable, "-m", "rlhfkit", "pipeline", "--config", path]
    process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        deadline = time.monotonic() + 240
        while not list((out / "sft").glob("checkpoint-*")) and time.monotonic() < deadline:
            assert process.poll() is None, "the pipeline ended before SFT saved a checkpoint"
            time.sleep(0.2)
        time.sleep(1.0)
    finally:
        os.killpg(process.pid, signal.SIGKILL)  # kill -9: no cleanup runs
        process.wait()
    assert states(out)["sft"]["status"] == "running"
    assert not (out / "sft" / "final").exists()
    result = CliRunner().invoke(cli.app, ["pipeline", "--config", path])
    assert result.exit_code == 0, result.output
    assert "resuming an interrupted run" in result.output and "skipped" in result.output  # pretrain skipped
    assert "resumed from" in result.output
    metrics = [json.loads(line) for line in (out / "sft" / "metrics.jsonl").read_text().splitlines()]
    steps = [m["step"] for m in metrics if "loss" in m]
    assert steps[-1] == 400 and steps.count(400) == 1
    assert states(out)["sft"]["status"] == "done"


def test_a_bad_section_fails_before_any_stage_runs_naming_file_line_and_key(tmp_path, data_dir, tokenizer_dir):
    out = tmp_path / "run"
    tree = small_pipeline(out, data_dir, tokenizer_dir)
    tree["dpo"]["train"]["lrr"] = 1e-4
    path = write_config(tmp_path / "pipeline.yaml", tree)
    result = CliRunner().invoke(cli.app, ["pipeline", "--config", path])
    assert result.exit_code == 2
    line = next(i for i, text in enumerate(open(path).read().splitlines(), start=1) if "lrr" in text)
    assert f"pipeline.yaml, line {line}: dpo.train.lrr: unknown key" in result.output.replace("\n", "")
    assert not (out / "pretrain").exists()


@pytest.mark.parametrize("change, message", [
    ({"stages": ["sft", "pretrain"]}, "list them in pipeline order"),
    ({"stages": ["sft", "sft"]}, "each stage may be listed once"),
    ({"rank": {"samples": "{smaple}"}, "stages": ["rank"]}, "{smaple} is not a stage"),
    ({"stages": ["rm"]}, "neither runs before it nor finished earlier"),
    ({"task": None, "stages": ["sample", "rank"]}, "the rank stage needs `task:`"),
])
def test_pipeline_config_errors_are_clear(tmp_path, data_dir, tokenizer_dir, change, message):
    tree = {**small_pipeline(tmp_path / "run", data_dir, tokenizer_dir), **change}
    path = write_config(tmp_path / "pipeline.yaml", tree)
    with pytest.raises(ConfigError, match="".join("\\" + c if c in "{}()[]`." else c for c in message)):
        config, lines = load_pipeline(path)
        run_pipeline(config, Console(quiet=True), source=path, lines=lines)
    assert not (tmp_path / "run" / "pretrain").exists()


def test_a_changed_input_file_reruns_the_stage(tmp_path, task):
    runner = StageRunner(tmp_path / "run", Console(quiet=True))
    data = tmp_path / "prompts.jsonl"
    data.write_text('{"prompt": "a"}\n')
    calls = []
    assert runner.run("sample", {"prompts": str(data)}, set(), lambda: calls.append(1))
    assert not runner.run("sample", {"prompts": str(data)}, set(), lambda: calls.append(2))
    data.write_text('{"prompt": "b"}\n')
    assert runner.run("sample", {"prompts": str(data)}, set(), lambda: calls.append(3))
    assert calls == [1, 3]


def test_a_directory_the_pipeline_did_not_write_is_never_deleted(tmp_path):
    (tmp_path / "run" / "sft").mkdir(parents=True)
    (tmp_path / "run" / "sft" / "precious.txt").write_text("keep me")
    runner = StageRunner(tmp_path / "run", Console(quiet=True))
    with pytest.raises(ConfigError, match="was not written by rlhfkit pipeline"):
        runner.run("sft", {}, set(), lambda: None)
    assert (tmp_path / "run" / "sft" / "precious.txt").read_text() == "keep me"


def test_the_shipped_pipeline_config_is_valid_and_wires_every_stage(tmp_path):
    from pathlib import Path

    from rlhfkit.pipeline import resolve_stages

    path = Path(__file__).parents[1] / "configs" / "pipeline.yaml"
    config, lines = load_pipeline(path, [f"out_dir={tmp_path}"])
    stages = resolve_stages(config, StageRunner(tmp_path, Console(quiet=True)), source=str(path), lines=lines)
    assert list(stages) == list(config.stages)
    assert stages["rm"][1] == {"sft", "rank"} and stages["ppo"][1] == {"sft", "rm"}
    assert stages["ppo"][0].ppo.reward_model == str(tmp_path / "rm" / "final")
    assert stages["eval"][0].models["ppo@15"] == str(tmp_path / "ppo" / "checkpoint-15")
