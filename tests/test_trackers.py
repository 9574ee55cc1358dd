"""``train.report_to``: what each experiment tracker received, read back with the tracker's own reader.

TensorBoard's event files with its ``EventAccumulator``; W&B in offline mode (its ``.wandb`` transaction log,
decoded with wandb's own protobuf records); MLflow with ``MlflowClient`` on a local file store; trackio from its
local database. A test is skipped, with the reason, where the tracker's extra is not installed.
"""

from __future__ import annotations

import json
import os
import shutil
import struct
import sys
import time
from pathlib import Path

import pytest
import yaml
from rich.console import Console

from rlhfkit.config import ConfigError, PPOConfig, SFTConfig, TrainConfig, load_config
from rlhfkit.data.readers import write_jsonl
from rlhfkit.engine.metrics import read_metrics
from rlhfkit.engine.trackers import TENSORBOARD_DIR, TRACKERS_FILE, check_trackers, flat_config


def needs(name: str):
    return pytest.importorskip(name, reason=f"train.report_to: {name} needs `pip install rlhfkit[{name}]`")


@pytest.fixture(autouse=True)
def offline_trackers(tmp_path, monkeypatch):
    """Every tracker writes under ``tmp_path`` and nothing goes online: W&B offline, MLflow's file store, trackio's
    local database (its directory is read when trackio is imported, so patched where it already was)."""
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_DIR", str(tmp_path / "wandb"))
    monkeypatch.setenv("WANDB_SILENT", "true")
    monkeypatch.setenv("MLFLOW_TRACKING_URI", (tmp_path / "mlruns").as_uri())
    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")  # MLflow 3 refuses the file store without it
    monkeypatch.setenv("TRACKIO_DIR", str(tmp_path / "trackio"))
    for module in [m for name, m in sys.modules.items() if name == "trackio" or name.startswith("trackio.")]:
        if isinstance(getattr(module, "TRACKIO_DIR", None), Path):
            monkeypatch.setattr(module, "TRACKIO_DIR", tmp_path / "trackio")
    return tmp_path


@pytest.fixture(scope="module")
def demos(tmp_path_factory, task):
    path = tmp_path_factory.mktemp("tracker-data") / "demos.jsonl"
    write_jsonl(path, task.demonstrations(task.prompts(32, seed=0), seed=0))
    return path


def sft_config(run_dir, tokenizer_dir, demos, *report_to, **train):
    return load_config(SFTConfig, base={
        "model": {"preset": "tiny", "tokenizer": str(tokenizer_dir)},
        "data": {"train": str(demos), "eval": str(demos), "max_length": 64, "max_prompt_length": 32},
        "train": {"output_dir": str(run_dir), "batch_size": 8, "max_steps": 4, "log_every": 2, "progress": False,
                  "report_to": list(report_to), "project": "trackers-test", **train}})


def train_sft(run_dir, tokenizer_dir, demos, *report_to, **train) -> list[dict]:
    from rlhfkit.trainers.sft import build_sft_trainer

    build_sft_trainer(sft_config(run_dir, tokenizer_dir, demos, *report_to, **train)).train()
    return read_metrics(run_dir)


def logged(records: list[dict], name: str) -> list[tuple[int, float]]:
    """``(step, value)`` of every record of ``metrics.jsonl`` that has ``name``."""
    return [(r["step"], r[name]) for r in records if name in r]


# ---- the config and the missing package -----------------------------------------------------------
def test_report_to_takes_a_list_one_name_or_none(tmp_path):
    def report_to(value):
        return TrainConfig(output_dir=str(tmp_path), report_to=value).report_to

    assert report_to([]) == [] and TrainConfig(output_dir=str(tmp_path)).report_to == []
    assert report_to("wandb") == ["wandb"] and report_to("none") == [] and report_to(None) == []
    assert report_to(["mlflow", "tensorboard", "mlflow"]) == ["mlflow", "tensorboard"]
    with pytest.raises(ConfigError, match=r"train.report_to.*comet"):
        load_config(SFTConfig, base={"model": {"preset": "tiny"}, "data": {"train": "x.jsonl"},
                                     "train": {"output_dir": str(tmp_path), "report_to": ["comet"]}})


def test_a_missing_tracker_package_is_a_config_error_naming_the_key_and_the_extra(tmp_path, monkeypatch, tokenizer_dir,
                                                                                   demos):
    from rlhfkit.engine import trackers
    from rlhfkit.trainers.sft import build_sft_trainer

    monkeypatch.setitem(trackers.TRACKER_MODULES, "wandb", "rlhfkit_no_such_module")
    with pytest.raises(ConfigError, match=r"^train.report_to: wandb needs `pip install rlhfkit\[wandb\]`"):
        check_trackers(["wandb"])
    with pytest.raises(ConfigError, match=r"train.report_to: wandb needs `pip install rlhfkit\[wandb\]`"):
        build_sft_trainer(sft_config(tmp_path / "run", tokenizer_dir, demos, "wandb"))
    assert not (tmp_path / "run").exists()  # stopped before it wrote anything


def test_the_config_is_flattened_into_hyperparameters_every_tracker_takes():
    flat = flat_config({"train": {"lr": 0.1, "adam_betas": [0.9, 0.95], "report_to": ["wandb"], "resume": True},
                        "model": {"name_or_path": None, "lora": {"r": 8}}})
    assert flat == {"train.lr": 0.1, "train.adam_betas": "[0.9, 0.95]", "train.report_to": '["wandb"]',
                    "train.resume": True, "model.name_or_path": None, "model.lora.r": 8}


def test_without_trackers_nothing_but_metrics_jsonl_is_written(tmp_path, tokenizer_dir, demos):
    train_sft(tmp_path / "run", tokenizer_dir, demos)
    assert not (tmp_path / "run" / TENSORBOARD_DIR).exists() and not (tmp_path / "run" / TRACKERS_FILE).exists()
    assert not (tmp_path / "wandb").exists() and not (tmp_path / "mlruns").exists()


# ---- each tracker, read back ------------------------------------------------------------------------
def test_tensorboard_event_files_hold_every_metric_of_metrics_jsonl(tmp_path, tokenizer_dir, demos):
    needs("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    records = train_sft(tmp_path / "run", tokenizer_dir, demos, "tensorboard")
    logdir = tmp_path / "run" / TENSORBOARD_DIR / "trackers-test"  # in the run directory, below the project
    events = EventAccumulator(str(logdir)).Reload()
    for name in ("loss", "eval/loss", "lr", "grad_norm"):
        assert [(e.step, pytest.approx(e.value)) for e in events.Scalars(name)] == logged(records, name), name
    assert logged(records, "loss") and [step for step, _ in logged(records, "loss")] == [2, 4]
    hparams = yaml.safe_load(next(logdir.glob("*/hparams.yml")).read_text())
    assert hparams["train.max_steps"] == 4 and hparams["model.preset"] == "tiny"


def wandb_records(run_dir: Path):
    """The records of a W&B offline run's ``.wandb`` file (wandb's LevelDB-style log of its protobuf ``Record``s:
    a 7-byte header, 32 KiB blocks of chunks with a 7-byte header each: checksum, length, type)."""
    from wandb.proto import wandb_internal_pb2

    data = next(run_dir.glob("run-*.wandb")).read_bytes()
    ident, magic, _version = struct.unpack("<4sHB", data[:7])
    assert (ident, magic) == (b":W&B", 0xBEE1)
    position, block, pending = 7, 32768, b""
    while position + 7 <= len(data):
        left = block - position % block
        _checksum, length, kind = struct.unpack("<IHB", data[position:position + 7])
        if left < 7 or (kind == 0 and length == 0):  # the zero padding at the end of a block
            position += left
            continue
        pending += data[position + 7:position + 7 + length]
        position += 7 + length
        if kind in (1, 4):  # a whole record, or the last chunk of one
            record = wandb_internal_pb2.Record()
            record.ParseFromString(pending)
            pending = b""
            yield record


def wandb_run(tmp_path: Path) -> tuple[dict, dict[int, dict], dict, Path]:
    """The run record, the history by step, the config and the directory of the one offline W&B run."""
    (run_dir,) = (tmp_path / "wandb" / "wandb").glob("offline-run-*")
    for _ in range(100):  # wandb's service may still be writing when the run's finish() returns: up to its exit
        records = list(wandb_records(run_dir))
        if records and records[-1].WhichOneof("record_type") == "exit":
            break
        time.sleep(0.2)
    run, history, config = {}, {}, {}
    for record in records:
        kind = record.WhichOneof("record_type")
        if kind == "run":
            run = {"id": record.run.run_id, "project": record.run.project, "name": record.run.display_name,
                   "tags": list(record.run.tags)}
        elif kind == "history":
            row: dict = {}
            for item in record.history.item:  # a table's fields come as nested keys: ("samples", "path")
                *outer, key = [item.key] if item.key else list(item.nested_key)
                place = row
                for name in outer:
                    place = place.setdefault(name, {})
                place[key] = json.loads(item.value_json)
            history.setdefault(row["_step"], {}).update(row)
        elif kind == "config":
            config.update({item.key: json.loads(item.value_json) for item in record.config.update})
    return run, history, config, run_dir


def test_wandb_offline_run_holds_the_metrics_the_config_and_the_names(tmp_path, tokenizer_dir, demos):
    needs("wandb")
    records = train_sft(tmp_path / "sft-run", tokenizer_dir, demos, "wandb")
    run, history, config, _ = wandb_run(tmp_path)
    assert run["project"] == "trackers-test" and run["name"] == "sft-run" and run["tags"] == ["sft"]
    for name in ("loss", "eval/loss", "tokens_per_s"):
        assert [(step, pytest.approx(row[name])) for step, row in sorted(history.items()) if name in row] == \
            logged(records, name), name
    assert config["train.max_steps"] == 4 and config["train.lr"] == 3e-4
    assert json.loads((tmp_path / "sft-run" / TRACKERS_FILE).read_text())["wandb"] == run["id"]


def mlflow_client(tmp_path):
    from mlflow.tracking import MlflowClient

    return MlflowClient(tracking_uri=(tmp_path / "mlruns").as_uri())


def test_mlflow_file_store_holds_the_metrics_and_params_and_a_resumed_run_continues_its_run(tmp_path, tokenizer_dir,
                                                                                          demos):
    needs("mlflow")
    records = train_sft(tmp_path / "run", tokenizer_dir, demos, "mlflow", save_every=2)
    client = mlflow_client(tmp_path)
    experiment = client.get_experiment_by_name("trackers-test")
    (run,) = client.search_runs([experiment.experiment_id])
    assert run.info.run_name == "run" and run.data.tags["stage"] == "sft"
    assert run.data.params["train.max_steps"] == "4" and run.data.params["model.preset"] == "tiny"
    for name in ("loss", "eval/loss", "lr"):
        history = sorted((m.step, m.value) for m in client.get_metric_history(run.info.run_id, name))
        assert [(step, pytest.approx(value)) for step, value in history] == logged(records, name), name
    # two more steps from the last checkpoint: the same MLflow run goes on
    records = train_sft(tmp_path / "run", tokenizer_dir, demos, "mlflow", save_every=2, max_steps=6)
    (again,) = client.search_runs([experiment.experiment_id])
    assert again.info.run_id == run.info.run_id
    steps = sorted(m.step for m in client.get_metric_history(run.info.run_id, "loss"))
    assert steps == [2, 4, 6] == [step for step, _ in logged(records, "loss")]


def test_trackio_local_database_holds_the_metrics(tmp_path, tokenizer_dir, demos):
    needs("trackio")
    from trackio.sqlite_storage import SQLiteStorage

    records = train_sft(tmp_path / "run", tokenizer_dir, demos, "trackio")
    assert SQLiteStorage.get_runs("trackers-test") == ["run"]
    logs = SQLiteStorage.get_logs("trackers-test", "run")
    for name in ("loss", "eval/loss"):
        assert [(row["step"], pytest.approx(row[name])) for row in logs if name in row] == logged(records, name), name
    assert SQLiteStorage.get_run_config("trackers-test", "run")["train.max_steps"] == 4


# ---- PPO's sampled completions, as tables -----------------------------------------------------------
def test_ppo_samples_with_their_rewards_are_a_table_in_each_tracker(tmp_path, ppo_setup):
    from rlhfkit.trainers.ppo import PPOTrainer

    available = [name for name in ("wandb", "trackio", "mlflow", "tensorboard") if _installed(name)]
    if not available:
        pytest.skip("no tracker installed: pip install rlhfkit[tensorboard,wandb,mlflow,trackio]")
    run_dir = tmp_path / "ppo"
    config = load_config(PPOConfig, base={
        "model": {"name_or_path": str(ppo_setup / "policy")}, "data": {"train": str(ppo_setup / "prompts.jsonl"),
                                                                        "max_length": 64},
        "train": {"output_dir": str(run_dir), "max_steps": 2, "log_every": 1, "progress": False,
                  "report_to": available, "project": "trackers-ppo"},
        "ppo": {"reward_model": str(ppo_setup / "rm"), "rollout_batch_size": 4, "minibatch_size": 4, "ppo_epochs": 1,
                "max_new_tokens": 8, "samples_to_log": 3}})
    PPOTrainer(config).train()
    samples = [json.loads(line) for line in (run_dir / "samples.jsonl").read_text().splitlines()]
    last = [s for s in samples if s["step"] == 2]
    sources = list(last[0]["rewards"])  # a column per reward source (none beside the score with one reward model)
    expected = [[2, s["prompt"], s["completion"], pytest.approx(s["score"]),
                 *(pytest.approx(s["rewards"][name]) for name in sources)] for s in last]
    columns = ["step", "prompt", "completion", "score", *(f"rewards/{name}" for name in sources)]
    assert len(last) == 3
    if "wandb" in available:
        _, history, _, run = wandb_run(tmp_path)
        table = json.loads((run / "files" / history[2]["samples"]["path"]).read_text())
        assert table["columns"] == columns and table["data"] == expected
        assert history[2]["objective/scores"] == pytest.approx(read_metrics(run_dir)[-1]["objective/scores"])
    if "trackio" in available:
        from trackio.sqlite_storage import SQLiteStorage

        (row,) = [r for r in SQLiteStorage.get_logs("trackers-ppo", "ppo") if r["step"] == 2 and "samples" in r]
        table = row["samples"]
        assert table["_type"] == "trackio.table"
        assert [[r[c] for c in columns] for r in table["_value"]] == expected
    if "mlflow" in available:
        client = mlflow_client(tmp_path)
        (run,) = client.search_runs([client.get_experiment_by_name("trackers-ppo").experiment_id])
        table = json.loads(Path(client.download_artifacts(run.info.run_id, "samples/step-000002.json", str(tmp_path)))
                           .read_text())
        assert table["columns"] == columns and table["data"] == expected
    if "tensorboard" in available:
        from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

        logdir = run_dir / TENSORBOARD_DIR / "trackers-ppo"
        events = EventAccumulator(str(logdir), size_guidance={"tensors": 0}).Reload()
        (text,) = [e for e in events.Tensors("samples/text_summary") if e.step == 2]
        markdown = text.tensor_proto.string_val[0].decode()
        assert markdown.startswith("| " + " | ".join(columns) + " |") and last[0]["prompt"][:20] in markdown


def _installed(name: str) -> bool:
    import importlib.util

    return importlib.util.find_spec(name) is not None


# ---- a pipeline: one project, a run per stage ---------------------------------------------------------
def test_a_pipelines_stages_are_runs_of_one_project_and_a_new_tracker_reruns_nothing(tmp_path, monkeypatch,
                                                                                     tokenizer_dir, demos, task):
    needs("mlflow")
    from rlhfkit.engine import trackers
    from rlhfkit.pipeline import load_pipeline, run_pipeline

    corpus = tmp_path / "corpus.jsonl"
    write_jsonl(corpus, ({"text": t} for t in task.pretraining_corpus(40, seed=0)))
    train = {"max_steps": 2, "batch_size": 8, "log_every": 1, "progress": False}
    out = tmp_path / "my-pipeline"
    tree = {"out_dir": str(out), "stages": ["pretrain", "sft"],
            "pretrain": {"model": {"preset": "tiny", "tokenizer": str(tokenizer_dir)},
                         "data": {"train": str(corpus), "max_length": 64}, "train": train},
            "sft": {"model": {"name_or_path": "{pretrain}"},
                    "data": {"train": str(demos), "max_length": 64, "max_prompt_length": 32}, "train": train}}
    console = Console(file=open(os.devnull, "w"))  # noqa: SIM115

    def run(tree):
        path = tmp_path / "pipeline.yaml"
        path.write_text(yaml.safe_dump(tree))
        return run_pipeline(load_pipeline(str(path))[0], console)

    first = run(tree)
    reporting = {**tree, "report_to": ["mlflow"]}
    assert run(reporting) == first  # both stages done earlier: a tracker is no reason to train again
    assert not (tmp_path / "mlruns").exists()
    with monkeypatch.context() as patch:  # without the package: stopped before any stage, naming the stage's key
        patch.setitem(trackers.TRACKER_MODULES, "mlflow", "rlhfkit_no_such_module")
        quiet_pretrain = {**reporting, "pretrain": {**tree["pretrain"], "train": {**train, "report_to": "none"}}}
        with pytest.raises(ConfigError, match=r"sft.train.report_to: mlflow needs `pip install rlhfkit\[mlflow\]`"):
            run(quiet_pretrain)
    for stage in ("pretrain", "sft"):
        shutil.rmtree(out / stage)
    run(reporting)
    client = mlflow_client(tmp_path)
    runs = client.search_runs([client.get_experiment_by_name("my-pipeline").experiment_id])
    assert sorted((r.info.run_name, r.data.tags["stage"]) for r in runs) == [("pretrain", "pretrain"), ("sft", "sft")]
    sft = next(r for r in runs if r.info.run_name == "sft")
    assert [m.step for m in client.get_metric_history(sft.info.run_id, "loss")] == [1, 2]


# ---- several processes: process 0 reports, once ----------------------------------------------------------
@pytest.mark.slow
def test_two_processes_report_once_from_process_0(tmp_path, tokenizer_dir, demos):
    needs("tensorboard")
    needs("mlflow")
    import subprocess

    import torch
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    if not (torch.distributed.is_available() and torch.distributed.is_gloo_available()):
        pytest.skip("torch without the gloo backend")
    config = tmp_path / "sft.yaml"
    config.write_text(yaml.safe_dump(sft_config(tmp_path / "ddp", tokenizer_dir, demos, "tensorboard", "mlflow")
                                     .model_dump(mode="json")))
    result = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                             "-m", "rlhfkit", "sft", "--config", str(config)], capture_output=True, text=True,
                            timeout=600)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    records = read_metrics(tmp_path / "ddp")
    (logdir,) = (tmp_path / "ddp" / TENSORBOARD_DIR).iterdir()
    assert len(list(logdir.glob("events.out.tfevents.*"))) == 1  # one writer
    scalars = EventAccumulator(str(logdir)).Reload().Scalars("loss")
    assert [(e.step, pytest.approx(e.value)) for e in scalars] == logged(records, "loss")
    client = mlflow_client(tmp_path)
    (run,) = client.search_runs([client.get_experiment_by_name("trackers-test").experiment_id])
    assert [m.step for m in client.get_metric_history(run.info.run_id, "loss")] == [2, 4]
