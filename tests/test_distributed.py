"""Data parallel training on CPU: ``torchrun`` with 2 processes (gloo) trains the same model as 1 process
with the same global batch, for SFT, the reward model and DPO (real subprocesses of ``python -m rlhfkit``)."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch
import yaml
from safetensors.torch import load_file
from test_reward import task_rankings

from rlhfkit.data.readers import write_jsonl

pytestmark = pytest.mark.skipif(not torch.distributed.is_available() or not torch.distributed.is_gloo_available(),
                                reason="torch without the gloo backend")


@pytest.fixture(scope="module")
def configs(tmp_path_factory, task, tokenizer_dir):
    """One config per stage: the tiny model, global batch 8, 6 steps, no evaluation."""
    folder = tmp_path_factory.mktemp("ddp")
    write_jsonl(folder / "demos.jsonl", task.demonstrations(task.prompts(40, seed=3), seed=3))
    write_jsonl(folder / "rankings.jsonl", task_rankings(task, 40, seed=4, temperature=0))
    train = {"batch_size": 8, "lr": 3e-3, "warmup_steps": 1, "max_steps": 6, "log_every": 1, "eval_every": None,
             "progress": False, "save_every": None}
    model = {"preset": "tiny", "tokenizer": str(tokenizer_dir)}
    sections = {
        "sft": {"data": {"train": str(folder / "demos.jsonl"), "max_length": 96}},
        "rm": {"data": {"train": str(folder / "rankings.jsonl"), "max_length": 128}},
        "dpo": {"data": {"train": str(folder / "rankings.jsonl"), "max_length": 128}},
    }
    paths = {}
    for stage, section in sections.items():
        paths[stage] = folder / f"{stage}.yaml"
        paths[stage].write_text(yaml.safe_dump({"model": model, "train": train, **section}), encoding="utf-8")
    return paths


def run(stage: str, config, out, processes: int) -> str:
    launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={processes}"] \
        if processes > 1 else [sys.executable]
    command = [*launcher, "-m", "rlhfkit", stage, "--config", str(config), "--set", f"train.output_dir={out}"]
    result = subprocess.run(command, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return result.stdout + result.stderr


def losses(run_dir) -> list[float]:
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text(encoding="utf-8").splitlines()]
    return [row["loss"] for row in rows if "loss" in row]


@pytest.mark.slow
@pytest.mark.parametrize("stage", ["sft", "rm", "dpo"])
def test_two_processes_train_what_one_process_trains(stage, configs, tmp_path):
    run(stage, configs[stage], tmp_path / "one", 1)
    output = run(stage, configs[stage], tmp_path / "two", 2)
    assert "data parallel over 2 processes (MULTI_CPU, global batch 8)" in output
    one, two = losses(tmp_path / "one"), losses(tmp_path / "two")
    assert len(one) == len(two) == 6
    assert one == pytest.approx(two, rel=1e-5, abs=1e-6)
    weights_one = load_file(tmp_path / "one" / "final" / "model.safetensors")
    weights_two = load_file(tmp_path / "two" / "final" / "model.safetensors")
    assert weights_one.keys() == weights_two.keys()
    for name, tensor in weights_one.items():
        torch.testing.assert_close(weights_two[name], tensor, rtol=1e-4, atol=1e-5, msg=name)
    moved = load_file(tmp_path / "one" / "checkpoint-6" / "model.safetensors")
    assert all(torch.equal(moved[name], tensor) for name, tensor in weights_one.items())


def test_sharding_engines_are_refused_until_checkpoints_gather_them(monkeypatch, tmp_path, tokenizer_dir, task):
    from types import SimpleNamespace

    from accelerate.utils import DistributedType

    from rlhfkit.config import SFTConfig, load_config
    from rlhfkit.trainers import base
    from rlhfkit.trainers.sft import build_sft_trainer

    write_jsonl(tmp_path / "demos.jsonl", task.demonstrations(task.prompts(8, seed=3), seed=3))
    config = load_config(SFTConfig, base={
        "model": {"preset": "tiny", "tokenizer": str(tokenizer_dir)}, "data": {"train": str(tmp_path / "demos.jsonl")},
        "train": {"output_dir": str(tmp_path / "run"), "batch_size": 3, "progress": False}})
    fsdp = SimpleNamespace(distributed_type=DistributedType.FSDP, num_processes=2)
    monkeypatch.setattr(base, "make_accelerator", lambda mixed_precision: fsdp)
    with pytest.raises(base.TrainingError, match="FSDP is not supported yet"):
        build_sft_trainer(config)
    ddp = SimpleNamespace(distributed_type=DistributedType.MULTI_CPU, num_processes=2)
    monkeypatch.setattr(base, "make_accelerator", lambda mixed_precision: ddp)
    with pytest.raises(base.TrainingError, match=r"batch_size \(3\) is the global batch and must be a multiple"):
        build_sft_trainer(config)


@pytest.mark.slow
def test_ppo_with_several_processes_is_refused_clearly(tmp_path, tokenizer_dir):
    config = tmp_path / "ppo.yaml"
    config.write_text(yaml.safe_dump({
        "model": {"preset": "tiny", "tokenizer": str(tokenizer_dir)}, "data": {"train": str(tmp_path / "p.jsonl")},
        "train": {"output_dir": str(tmp_path / "run"), "max_steps": 1}, "ppo": {"reward_model": str(tmp_path / "rm")}}),
        encoding="utf-8")
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "-m", "rlhfkit",
               "ppo", "--config", str(config)]
    result = subprocess.run(command, capture_output=True, text=True, timeout=300)
    assert result.returncode != 0
    assert "several processes are not supported yet" in " ".join((result.stdout + result.stderr).split())
    assert not (tmp_path / "run").exists()
