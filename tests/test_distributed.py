"""Data parallel training on CPU: ``torchrun`` with 2 processes (gloo) trains the same model as 1 process
with the same global batch, for SFT, the reward model and DPO (real subprocesses of ``python -m rlhfkit``);
so do ``accelerate launch`` with the shipped ``configs/accelerate/`` files for DDP and FSDP2 (whose
checkpoints resume exactly); the engines that are not supported are refused. PPO's distributed
statistics, its update on a fixed rollout (equal to one process's, under DDP and FSDP2), its FSDP rollout
(sampled with the gathered weights), and a whole PPO run under 2 processes (DDP, FSDP2) that resumes
exactly; online DPO on 2 processes (DDP, FSDP2) trains what one process trains on the same samples, refreshes its
reference and resumes exactly, and samples its shares with the policy."""

from __future__ import annotations

import json
import math
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file
from test_reward import task_rankings

from rlhfkit.data.readers import write_jsonl

WORKERS = Path(__file__).parent / "distributed_workers.py"
ACCELERATE_CONFIGS = Path(__file__).parents[1] / "configs" / "accelerate"

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


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def launcher(processes: int, accelerate_config: str | None = None) -> list[str]:
    """The command that starts a Python program in one process, under ``torchrun`` with ``processes``, or under
    ``accelerate launch --config_file configs/accelerate/<accelerate_config>`` (its number of processes)."""
    if accelerate_config:
        return [sys.executable, "-m", "accelerate.commands.launch", "--config_file",
                str(ACCELERATE_CONFIGS / accelerate_config), "--main_process_port", str(free_port())]
    if processes > 1:
        return [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={processes}"]
    return [sys.executable]


def run(stage: str, config, out, processes: int, *overrides: str, accelerate_config: str | None = None) -> str:
    """``python -m rlhfkit STAGE`` started by :func:`launcher`."""
    command = [*launcher(processes, accelerate_config), "-m", "rlhfkit", stage, "--config", str(config),
               "--set", f"train.output_dir={out}",
               *(part for override in overrides for part in ("--set", override))]
    result = subprocess.run(command, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return result.stdout + result.stderr


def losses(run_dir) -> list[float]:
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text(encoding="utf-8").splitlines()]
    return [row["loss"] for row in rows if "loss" in row]


def assert_same_training(one, two, steps: int = 6) -> None:
    """Run ``two`` logged the losses of run ``one`` and wrote its weights (``final/`` and the last checkpoint)."""
    assert len(losses(one)) == len(losses(two)) == steps
    assert losses(one) == pytest.approx(losses(two), rel=1e-5, abs=1e-6)
    for directory in ("final", f"checkpoint-{steps}"):
        weights_one = load_file(one / directory / "model.safetensors")
        weights_two = load_file(two / directory / "model.safetensors")
        assert weights_one.keys() == weights_two.keys()
        for name, tensor in weights_one.items():
            torch.testing.assert_close(weights_two[name], tensor, rtol=1e-4, atol=1e-5, msg=f"{directory}: {name}")


@pytest.fixture(scope="module")
def one_process(configs, tmp_path_factory):
    """The run directory of each stage trained in one process (run once per stage, on demand)."""
    done = {}

    def trained(stage: str) -> Path:
        if stage not in done:
            done[stage] = tmp_path_factory.mktemp(f"one-{stage}")
            run(stage, configs[stage], done[stage], 1)
        return done[stage]
    return trained


@pytest.mark.slow
@pytest.mark.parametrize("stage", ["sft", "rm", "dpo"])
def test_two_processes_train_what_one_process_trains(stage, configs, one_process, tmp_path):
    output = run(stage, configs[stage], tmp_path / "two", 2)
    assert "data parallel over 2 processes (MULTI_CPU, global batch 8)" in output
    assert_same_training(one_process(stage), tmp_path / "two")
    final = load_file(one_process(stage) / "final" / "model.safetensors")
    moved = load_file(one_process(stage) / "checkpoint-6" / "model.safetensors")
    assert all(torch.equal(moved[name], tensor) for name, tensor in final.items())


@pytest.mark.slow
@pytest.mark.parametrize(("accelerate_config", "stage", "engine"), [
    ("ddp-cpu.yaml", "sft", "MULTI_CPU"), ("fsdp-cpu.yaml", "sft", "FSDP"), ("fsdp-cpu.yaml", "rm", "FSDP"),
    ("fsdp-cpu.yaml", "dpo", "FSDP")])
def test_accelerate_configs_train_what_one_process_trains(accelerate_config, stage, engine, configs, one_process,
                                                          tmp_path):
    """``accelerate launch`` with the shipped CPU configs: under FSDP2 each process holds a shard of the weights,
    and the gathered checkpoints and ``final/`` are those of one process (tied weights written once)."""
    from transformers import AutoConfig

    output = run(stage, configs[stage], tmp_path / "two", 2, accelerate_config=accelerate_config)
    assert f"data parallel over 2 processes ({engine}, global batch 8)" in output
    assert_same_training(one_process(stage), tmp_path / "two")
    assert AutoConfig.from_pretrained(tmp_path / "two" / "final").architectures == \
        AutoConfig.from_pretrained(one_process(stage) / "final").architectures  # not FSDP<class>


@pytest.mark.slow
@pytest.mark.parametrize("accelerate_config", ["ddp-cpu.yaml", "fsdp-cpu.yaml"])
def test_a_reward_model_with_a_length_head_trains_on_two_processes(accelerate_config, configs, tmp_path):
    """ODIN's length head under DDP and FSDP2 (its orthogonality loss reads the sharded head's weight); each
    process's correlation loss is over its own share of the batch, so the run is not one process's, but
    ``final/`` is the one-output quality head as ever."""
    from transformers import AutoConfig

    run("rm", configs["rm"], tmp_path / "two", 2, "reward.length_head=true", accelerate_config=accelerate_config)
    rows = [json.loads(line) for line in (tmp_path / "two" / "metrics.jsonl").read_text().splitlines()]
    assert all(math.isfinite(row["loss"]) and "length_corr/length" in row for row in rows if "loss" in row)
    final = AutoConfig.from_pretrained(tmp_path / "two" / "final")
    assert final.num_labels == 1 and not hasattr(final, "rlhfkit_length_head")


@pytest.mark.slow
def test_fsdp_checkpoints_resume_exactly(configs, tmp_path):
    from rlhfkit.config import SFTConfig, load_config
    from rlhfkit.engine.errors import TrainingError
    from rlhfkit.trainers.sft import build_sft_trainer

    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    run("sft", configs["sft"], straight, 2, "train.save_every=2", accelerate_config="fsdp-cpu.yaml")
    state = torch.load(straight / "checkpoint-4" / "trainer_state.pt", weights_only=False)
    assert "lm_head.weight" not in state["optimizer"]["state"]  # the full optimizer state, by parameter name
    embeddings = load_file(straight / "checkpoint-4" / "model.safetensors")["model.embed_tokens.weight"]
    assert state["optimizer"]["state"]["model.embed_tokens.weight"]["exp_avg"].shape == embeddings.shape  # unsharded
    shutil.copytree(straight, resumed)
    for leftover in ("checkpoint-6", "final"):  # as if the run had died after its checkpoint at step 4
        shutil.rmtree(resumed / leftover)
    output = run("sft", configs["sft"], resumed, 2, "train.save_every=2", accelerate_config="fsdp-cpu.yaml")
    assert "resumed from" in output and "checkpoint-4 at step 4" in output
    assert_same_training(straight, resumed)
    assert [row["step"] for row in map(json.loads, (resumed / "metrics.jsonl").read_text().splitlines())] == \
        [1, 2, 3, 4, 5, 6]
    # the optimizer state is keyed by parameter name: one process without FSDP refuses it (clearly)
    config = load_config(SFTConfig, configs["sft"], [f"train.output_dir={resumed}", "train.max_steps=8"])
    with pytest.raises(TrainingError, match=r"checkpoint-6 was written under FSDP; resume it under FSDP too"):
        build_sft_trainer(config).train()


def test_untested_engines_are_refused(monkeypatch, tmp_path, tokenizer_dir, task, ppo_setup):
    from types import SimpleNamespace

    from accelerate.utils import DistributedType
    from test_ppo import ppo_config

    from rlhfkit.config import SFTConfig, load_config
    from rlhfkit.engine import accelerator, errors, loop
    from rlhfkit.trainers.ppo import PPOTrainer
    from rlhfkit.trainers.sft import build_sft_trainer

    # what accelerate launch sets for configs/accelerate/deepspeed-zero*.yaml, or an FSDP config of version 1
    for env, message in [({"ACCELERATE_USE_DEEPSPEED": "true"}, "DeepSpeed is not supported: rlhfkit has not been"),
                         ({"ACCELERATE_USE_MEGATRON_LM": "true"}, "Megatron-LM is not supported"),
                         ({"ACCELERATE_USE_FSDP": "true", "FSDP_VERSION": "1"}, "FSDP version 1 is not supported")]:
        with monkeypatch.context() as patch:
            for name, value in env.items():
                patch.setenv(name, value)
            with pytest.raises(errors.TrainingError, match=message):
                accelerator.make_accelerator("no")

    write_jsonl(tmp_path / "demos.jsonl", task.demonstrations(task.prompts(8, seed=3), seed=3))
    sft = {"model": {"preset": "tiny", "tokenizer": str(tokenizer_dir)},
           "data": {"train": str(tmp_path / "demos.jsonl")},
           "train": {"output_dir": str(tmp_path / "run"), "batch_size": 3, "progress": False}}
    fsdp = SimpleNamespace(distributed_type=DistributedType.FSDP, num_processes=2, process_index=0)
    monkeypatch.setattr(loop, "make_accelerator", lambda mixed_precision: fsdp)
    lora = load_config(SFTConfig, base={**sft, "model": {**sft["model"], "lora": {"r": 4}}})
    with pytest.raises(errors.TrainingError, match="LoRA under FSDP is not supported yet"):
        build_sft_trainer(lora)
    compiled = load_config(SFTConfig, base={**sft, "train": {**sft["train"], "torch_compile": True}})
    with pytest.raises(errors.TrainingError, match="sft: train.torch_compile under FSDP is not supported yet"):
        build_sft_trainer(compiled)
    with pytest.raises(errors.TrainingError, match="ppo: LoRA under FSDP is not supported yet"):
        PPOTrainer(ppo_config(ppo_setup, "refused", "model.lora.r=4"))
    with pytest.raises(errors.TrainingError, match="ppo: ppo.ema_decay under FSDP is not supported yet"):
        PPOTrainer(ppo_config(ppo_setup, "refused", "ppo.ema_decay=0.9"))
    ddp = SimpleNamespace(distributed_type=DistributedType.MULTI_CPU, num_processes=2)
    monkeypatch.setattr(loop, "make_accelerator", lambda mixed_precision: ddp)
    with pytest.raises(errors.TrainingError, match=r"batch_size \(3\) is the global batch and must be a multiple"):
        build_sft_trainer(load_config(SFTConfig, base=sft))


def torchrun_worker(kind: str, out, *args, processes: int = 2, accelerate_config: str | None = None) -> None:
    """Run ``tests/distributed_workers.py KIND OUT ARGS`` in ``processes`` torchrun processes (or those of
    ``accelerate_config``, see :func:`launcher`)."""
    command = [*launcher(processes, accelerate_config), str(WORKERS), kind, str(out), *map(str, args)]
    result = subprocess.run(command, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]


def test_distributed_statistics_equal_those_of_the_concatenated_rows(tmp_path):
    from distributed_workers import STATISTICS_ROWS, statistics_data

    from rlhfkit.algorithms.advantages import masked_mean, masked_whiten

    torchrun_worker("statistics", tmp_path)
    ranks = [torch.load(tmp_path / f"rank{r}.pt") for r in range(2)]
    values, mask = statistics_data()
    torch.testing.assert_close(torch.cat([r["whiten"] for r in ranks]), masked_whiten(values, mask))
    torch.testing.assert_close(torch.cat([r["whiten_unshifted"] for r in ranks]),
                               masked_whiten(values, mask, shift_mean=False))
    for rank in ranks:
        torch.testing.assert_close(rank["mean"], masked_mean(values, mask))
        # pooled: the token mean of all rows, and the mean of each process's maximum (one unit each)
        maxima = torch.stack([values[rows].max() for rows in STATISTICS_ROWS[2]])
        torch.testing.assert_close(rank["pooled"], torch.stack([masked_mean(values, mask), maxima.mean()]))
    tokens = [mask[rows].sum().item() for rows in STATISTICS_ROWS[2]]
    assert [r["share"][0].item() for r in ranks] == pytest.approx([t / sum(tokens) for t in tokens])
    assert tokens[0] != tokens[1]  # the shares are unequal: the pooling is weighted, not a mean of means


def test_ppo_global_counts_must_split_over_the_processes(monkeypatch, ppo_setup):
    from types import SimpleNamespace

    from accelerate.utils import DistributedType
    from test_ppo import ppo_config

    from rlhfkit.engine import errors, loop
    from rlhfkit.trainers.ppo import PPOTrainer

    ddp = SimpleNamespace(distributed_type=DistributedType.MULTI_CPU, num_processes=2, process_index=0)
    monkeypatch.setattr(loop, "make_accelerator", lambda mixed_precision: ddp)
    cases = {"ppo.rollout_batch_size=3": r"ppo.rollout_batch_size \(3\) is a global count and must be a multiple",
             "ppo.minibatch_size=1": r"ppo.minibatch_size \(1\) is a global count",
             "train.grad_accum=4": r"minibatch share \(ppo.minibatch_size / 2 = 2\) must be a multiple of train.grad"}
    for override, message in cases.items():
        extra = ["ppo.samples_per_prompt=4"] if override.startswith("ppo.rollout") else []  # 12 % 4 == 0
        with pytest.raises(errors.TrainingError, match=message):
            PPOTrainer(ppo_config(ppo_setup, "refused", override, *extra))
    # a process's share of the prompts is a contiguous slice: a prompt's samples stay on one process
    assert PPOTrainer._prompt_share(SimpleNamespace(world=2, rank=1), list("abcdefgh")) == list("efgh")


@pytest.mark.slow
def test_fsdp_rollout_samples_with_the_gathered_policy_and_value_network(ppo_setup, tmp_path):
    """Under FSDP2 ``generate`` and the value network run on the gathered weights: at the start the policy is
    its reference (an unsharded copy), so the log-probs of the sampled tokens are the reference's, and the
    values are those of the unsharded network the value network was initialised from. Process 0 samples 3
    new tokens, process 1 up to 12: without ``synced_gpus`` the processes' forwards would not pair up."""
    torchrun_worker("rollout", tmp_path, ppo_setup, accelerate_config="fsdp-cpu.yaml")
    ranks = [torch.load(tmp_path / f"rank{r}.pt", weights_only=False) for r in range(2)]
    assert ranks[0]["rollout"].responses.size(1) == 3 < ranks[1]["rollout"].responses.size(1)
    for rank in ranks:
        rollout = rank["rollout"]
        assert rollout.responses.size(0) == 2  # this process's share of the 4 prompts
        torch.testing.assert_close(rollout.logprobs, rollout.ref_logprobs, atol=1e-4, rtol=0)
        torch.testing.assert_close(rollout.values, rank["values"], atol=1e-5, rtol=1e-5)


UPDATE_OPTIONS = {  # each minibatch is the whole rollout: the same minibatches with 1 and 2 processes
    "gae-reward-value": ["ppo.ppo_epochs=3", "ppo.target_kl=1e-6"],  # stops after the second epoch's step
    "value-head-ptx": ["ppo.value_model=head", "ppo.ptx_coef=0.5"],
    "rloo": ["ppo.advantage=rloo", "ppo.samples_per_prompt=2", "ppo.minibatch_size=8"],
    # GRPO rewarded by a reward function alone (no reward model)
    "grpo-reward-function": ["ppo.advantage=grpo", "ppo.samples_per_prompt=2", "ppo.minibatch_size=8",
                             "ppo.reward_model=null",
                             "ppo.rewards=[{function: length_penalty, options: {max_words: 3}}]"],
    # GSPO: sequence ratios and a sequence mean, pooled over the processes by sequences, not tokens
    "gspo": ["ppo.advantage=grpo", "ppo.samples_per_prompt=2", "ppo.minibatch_size=8", "ppo.importance_ratio=sequence",
             "ppo.loss_aggregation=sequence_mean"],
}


@pytest.mark.slow
@pytest.mark.parametrize(("name", "accelerate_config"), [
    ("gae-reward-value", None), ("value-head-ptx", None),
    ("gae-reward-value", "fsdp-cpu.yaml"), ("value-head-ptx", "fsdp-cpu.yaml"), ("rloo", "fsdp-cpu.yaml"),
    ("grpo-reward-function", None), ("gspo", None)])
def test_ppo_update_on_two_processes_equals_one_process(ppo_setup, tmp_path, name, accelerate_config):
    """A fixed rollout's update on 2 processes (DDP, or FSDP2 with each process holding a shard of the policy
    and value network, gathered for the comparison) gives the weights and statistics of one process."""
    from distributed_workers import trained_weights
    from test_ppo import ppo_config

    from rlhfkit.trainers.ppo import PPOTrainer

    options = [*UPDATE_OPTIONS[name], f"ppo.ptx_data={ppo_setup / 'corpus.jsonl'}"]
    one = PPOTrainer(ppo_config(ppo_setup, f"update-1-{name}", *options))
    rollout = one.rollout(one._prompt_batch(0))
    rollout.response_mask[0, 3:] = 0  # process 0's share has fewer tokens: the losses' weighting matters
    rollout.response_mask[1, 7:] = 0
    torch.save(rollout, tmp_path / "rollout.pt")
    stats_one = one.update(rollout)
    torchrun_worker("update", tmp_path, ppo_setup, tmp_path / "rollout.pt", *options,
                    accelerate_config=accelerate_config)
    two = torch.load(tmp_path / "update.pt", weights_only=False)
    weights_one = trained_weights(one)
    assert weights_one.keys() == two["weights"].keys()
    for weight, tensor in weights_one.items():
        torch.testing.assert_close(two["weights"][weight], tensor, rtol=1e-4, atol=1e-5, msg=weight)
    assert two["stats"].keys() == stats_one.keys()
    assert ("policy/early_stop" in stats_one) == ("ppo.target_kl=1e-6" in options)
    for stat, value in stats_one.items():
        assert two["stats"][stat] == pytest.approx(value, rel=1e-4, abs=1e-5), stat


@pytest.mark.slow
def test_grpo_with_lora_and_gradient_accumulation_on_two_processes(ppo_setup, tmp_path):
    """... and dynamic sampling, whose further batches every process samples together."""
    from test_ppo import ppo_config
    from transformers import AutoModelForCausalLM

    from rlhfkit.engine.metrics import read_metrics

    config = ppo_config(ppo_setup, "unused", "train.max_steps=1", "ppo.advantage=grpo", "ppo.samples_per_prompt=2",
                        "model.lora.r=4", "train.grad_accum=2", "ppo.dynamic_sampling=true")
    path = tmp_path / "grpo.yaml"
    path.write_text(yaml.safe_dump(config.model_dump(mode="json")), encoding="utf-8")
    run("ppo", path, tmp_path / "run", 2)
    rows = read_metrics(tmp_path / "run")
    assert [(row["step"], row["rollout/sequences"]) for row in rows] == [(1, 4 * 2)]
    assert rows[0]["dynamic_sampling/batches"] >= 1 and 0 <= rows[0]["dynamic_sampling/informative_frac"] <= 1
    AutoModelForCausalLM.from_pretrained(tmp_path / "run" / "final")  # the LoRA policy, merged


@pytest.mark.slow
@pytest.mark.parametrize(("accelerate_config", "engine"), [(None, "MULTI_CPU"), ("fsdp-cpu.yaml", "FSDP")])
def test_ppo_on_two_processes_uses_the_global_rollout_and_resumes_exactly(ppo_setup, tmp_path, accelerate_config,
                                                                          engine):
    """A whole PPO run (GAE with a value network initialised from the reward model) under torchrun (DDP) or
    FSDP2: its final/ and checkpoints are plain HF models (gathered from the shards under FSDP), and a run
    resumed from a checkpoint ends on the weights of the uninterrupted run."""
    from test_ppo import ppo_config
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

    from rlhfkit.engine.errors import TrainingError
    from rlhfkit.engine.metrics import read_metrics
    from rlhfkit.trainers.ppo import PPOTrainer

    config = ppo_config(ppo_setup, "unused", "train.max_steps=3", "train.save_every=1", "ppo.samples_per_prompt=2",
                        "ppo.adaptive_kl=true", "ppo.whiten_rewards=true", "ppo.kl_coef=0.2")
    path = tmp_path / "ppo.yaml"
    path.write_text(yaml.safe_dump(config.model_dump(mode="json")), encoding="utf-8")
    run_dir = tmp_path / "run"
    output = run("ppo", path, run_dir, 2, accelerate_config=accelerate_config)
    assert f"[ppo] data parallel over 2 processes ({engine}, 4 prompts per rollout, minibatch 4, global)" in output
    rows = read_metrics(run_dir)
    assert [row["step"] for row in rows] == [1, 2, 3]
    assert {row["rollout/sequences"] for row in rows} == {4 * 2}  # both processes' shares
    assert len({row["kl_coef"] for row in rows}) == 3  # the adaptive coefficient moves (from the pooled KL)
    policy = AutoModelForCausalLM.from_pretrained(run_dir / "final")
    assert policy.config.architectures == ["LlamaForCausalLM"]  # not FSDPLlamaForCausalLM
    value = AutoModelForSequenceClassification.from_pretrained(run_dir / "checkpoint-3" / "value_model")
    assert value.config.architectures == ["LlamaForSequenceClassification"]
    state = torch.load(run_dir / "checkpoint-3" / "trainer_state.pt", weights_only=False)
    first, second = state["rng_per_process"]
    assert not torch.equal(first["torch"], second["torch"])  # each process draws its own samples
    if engine == "FSDP":  # the full optimizer state, by parameter name (policy.*, value.*)
        embeddings = "policy.model.embed_tokens.weight"
        assert state["optimizer"]["state"][embeddings]["exp_avg"].shape == policy.model.embed_tokens.weight.shape
    straight = load_file(run_dir / "final" / "model.safetensors")
    checkpoint = load_file(run_dir / "checkpoint-3" / "model.safetensors")
    assert straight.keys() == checkpoint.keys() and all(torch.equal(checkpoint[n], t) for n, t in straight.items())
    straight_rows = rows

    # resume at iteration 2 (as if the run had died during iteration 3): the same iteration 3 again
    for leftover in ("checkpoint-3", "final"):
        shutil.rmtree(run_dir / leftover)
    output = run("ppo", path, run_dir, 2, accelerate_config=accelerate_config)
    assert "resumed from" in output  # (rich wraps the long path of the checkpoint)
    resumed = load_file(run_dir / "final" / "model.safetensors")
    for weight, tensor in straight.items():
        torch.testing.assert_close(resumed[weight], tensor, rtol=1e-5, atol=1e-6, msg=weight)
    rows = read_metrics(run_dir)
    assert [row["step"] for row in rows] == [1, 2, 3]  # no duplicated lines
    assert rows[2]["objective/scores"] == pytest.approx(straight_rows[2]["objective/scores"], abs=1e-5)
    samples = [json.loads(line)["step"] for line in (run_dir / "samples.jsonl").read_text().splitlines()]
    assert samples == sorted(samples) and samples.count(3) == samples.count(1)
    # the checkpoint holds two processes' sampling streams: one process refuses to resume it
    more = config.model_copy(update={"train": config.train.model_copy(update={"output_dir": str(run_dir),
                                                                                "max_steps": 4})})
    with pytest.raises(TrainingError, match=r"written by 2 process\(es\) .* resume it with 2, not 1"):
        PPOTrainer(more).train()


def online_dpo_config(ppo_setup, path: Path, *overrides: str) -> Path:
    """``test_online_dpo.online_config``'s run (reward function ``shortness``) as a YAML file at ``path``."""
    from test_online_dpo import online_config

    config = online_config(ppo_setup, "unused", *overrides)
    path.write_text(yaml.safe_dump(config.model_dump(mode="json")), encoding="utf-8")
    return path


def online_dpo_rows(run_dir: Path, name: str = "metrics.jsonl") -> list[dict]:
    return [json.loads(line) for line in (run_dir / name).read_text(encoding="utf-8").splitlines()]


@pytest.mark.slow
@pytest.mark.parametrize("accelerate_config", [None, "fsdp-cpu.yaml"])
def test_online_dpo_on_two_processes_trains_what_one_process_trains(ppo_setup, tmp_path, accelerate_config):
    """On the same (fixed) samples, judged by a reward function, 2 processes (DDP, or FSDP2) log the losses, metrics
    and rankings of one process and write its weights, with 3 micro-batches per step (of at most 4 examples: in one
    at least, process 1 has none and runs a stand-in forward of weight 0) and the reference refreshed at step 2; a
    run resumed from checkpoint-2 (which holds the refreshed reference) ends on the same weights."""
    config = online_dpo_config(ppo_setup, tmp_path / "online.yaml", "train.max_steps=3", "train.grad_accum=3",
                               "online.ref_update_every=2", "train.save_every=2")
    one, two, resumed = tmp_path / "one", tmp_path / "two", tmp_path / "resumed"
    torchrun_worker("online_dpo", one, config, "fixed", processes=1)
    torchrun_worker("online_dpo", two, config, "fixed", accelerate_config=accelerate_config)
    assert_same_training(one, two, steps=3)
    metrics_one, metrics_two = online_dpo_rows(one), online_dpo_rows(two)
    for row_one, row_two in zip(metrics_one, metrics_two, strict=True):
        for name in ("online/pairs", "online/prompts_without_pair", "objective/scores", "response_length",
                     "rewards/accuracies", "rewards/margins", "logps/chosen", "grad_norm"):
            assert row_two[name] == pytest.approx(row_one[name], rel=1e-4, abs=1e-5), name
    samples = online_dpo_rows(two, "samples.jsonl")
    assert samples == online_dpo_rows(one, "samples.jsonl") and len(samples) == 3 * 4  # every process's share
    assert all(row["online/pairs"] > 0 for row in metrics_one)
    state = torch.load(two / "checkpoint-2" / "trainer_state.pt", weights_only=False)
    policy_at_2 = load_file(two / "checkpoint-2" / "model.safetensors")
    assert len(state["rng_per_process"]) == 2
    for name, tensor in policy_at_2.items():  # the refreshed reference: the policy at step 2
        torch.testing.assert_close(state["reference"][name], tensor, rtol=0, atol=0, msg=name)

    shutil.copytree(two, resumed)
    for leftover in ("checkpoint-3", "final"):  # as if the run had died during step 3
        shutil.rmtree(resumed / leftover)
    torchrun_worker("online_dpo", resumed, config, "fixed", accelerate_config=accelerate_config)
    assert_same_training(two, resumed, steps=3)
    assert online_dpo_rows(resumed, "samples.jsonl") == samples


@pytest.mark.slow
@pytest.mark.parametrize(("accelerate_config", "engine"), [(None, "MULTI_CPU"), ("fsdp-cpu.yaml", "FSDP")])
def test_online_dpo_samples_its_shares_on_two_processes(ppo_setup, tmp_path, accelerate_config, engine):
    """The policy samples each process's share (under FSDP with the gathered weights, every process running as
    many forwards as the longest generation); process 0 logs every share's samples and rankings."""
    config = online_dpo_config(ppo_setup, tmp_path / "online.yaml", "online.samples_to_log=4", "train.max_steps=2")
    torchrun_worker("online_dpo", tmp_path / "run", config, "sampled", accelerate_config=accelerate_config)
    rows = online_dpo_rows(tmp_path / "run")
    assert [row["step"] for row in rows] == [1, 2] and all(row["loss"] == row["loss"] for row in rows)
    samples = online_dpo_rows(tmp_path / "run", "samples.jsonl")
    assert [row["step"] for row in samples] == [1] * 4 + [2] * 4
    for row in samples:
        assert len(row["scores"]) == 3 and row["scores"] == [-float(len(c.split())) for c in row["completions"]]
    assert (tmp_path / "run" / "final" / "config.json").exists()
