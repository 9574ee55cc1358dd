"""Online DPO: the judge's rankings (pure), the trainer's steps, its reference refresh, resume and errors."""

from __future__ import annotations

import json
import random

import pytest
import torch

from rlhfkit.config import OnlineDPOConfig, load_config
from rlhfkit.data.records import RankingRecord
from rlhfkit.engine.errors import TrainingError
from rlhfkit.models.load import load_causal_lm
from rlhfkit.rewards.functions import RewardSource
from rlhfkit.trainers.online_dpo import (
    OnlineDPOTrainer,
    best_against_worst,
    judge_rankings,
    score_ranking,
)

REWARD_FILE = '''
def shortness(prompts, completions, **fields):
    return [-float(len(c.split())) for c in completions]


def tokens(prompts, completions, completion_ids, **fields):
    return [float(len(ids)) for ids in completion_ids]


def low_ids(prompts, completions, completion_ids, **fields):
    return [sum(i < 256 for i in ids) / len(ids) for ids in completion_ids]
'''


def online_config(setup, name, *overrides):
    reward_file = setup / "online_rewards.py"
    reward_file.write_text(REWARD_FILE, encoding="utf-8")
    return load_config(OnlineDPOConfig, None, [
        f"train.output_dir={setup / name}", "train.max_steps=2", "train.progress=false", "train.lr=1e-3",
        "train.scheduler=constant", "train.log_every=1", f"model.name_or_path={setup / 'policy'}",
        f"data.train={setup / 'prompts.jsonl'}", "data.max_length=64", "online.rollout_batch_size=4",
        "online.num_generations=3", "online.max_new_tokens=12",
        f"online.rewards=[{{function: '{reward_file}:shortness'}}]", *overrides])


def test_score_ranking_groups_equal_scores_best_first():
    assert score_ranking([0.5, 1.0, 0.5, -1.0]) == ((1,), (0, 2), (3,))
    assert score_ranking([2.0, 2.0]) == ((0, 1),)


def test_best_against_worst_keeps_one_pair():
    record = RankingRecord("p", ("a", "b", "c", "d"), ((2,), (0, 3), (1,)))
    pair = best_against_worst(record)
    assert pair.completions == ("c", "b") and pair.pairs() == [(0, 1)]


def test_reward_sources_rank_by_their_weighted_sum():
    def length(prompts, completions, **fields):
        return [float(len(c)) for c in completions]

    def prompt_bonus(prompts, completions, bonus, **fields):
        return [float(b) for b in bonus]

    sources = [RewardSource("length", length, 1.0), RewardSource("bonus", prompt_bonus, 2.0)]
    records, scores, per_source = judge_rankings(["p", "q"], [["aa", "a", "aaa"], ["x", "y"]], sources=sources,
                                                 fields={"bonus": [1, 5]})
    assert scores == [[4.0, 3.0, 5.0], [11.0, 11.0]]
    assert records[0].ranking == ((2,), (0,), (1,)) and records[0].completions == ("aa", "a", "aaa")
    assert records[1] is None  # every score equal: nothing to prefer
    assert per_source["bonus"] == [1.0, 1.0, 1.0, 5.0, 5.0]


def test_a_task_labeler_ranks_with_its_noise_and_skips_identical_texts(task):
    prompt = "List three fruits."
    good, bad = "Here are three fruits: apple, pear and plum.", "Apples."
    records, scores, _ = judge_rankings([prompt, prompt], [[bad, good], [good, good]], task=task,
                                        rng=random.Random(0))
    assert scores is None and records[1] is None
    assert records[0].completions == (bad, good) and sorted(i for g in records[0].ranking for i in g) == [0, 1]
    wins = 0
    for seed in range(50):  # the labeler prefers the gold-better answer, not always (its temperature)
        record, = judge_rankings([prompt], [[bad, good]], task=task, rng=random.Random(seed))[0]
        wins += record.ranking[0] == (1,)
    assert 40 <= wins < 50


def test_online_dpo_steps_log_rankings_that_follow_the_scores(ppo_setup):
    trainer = OnlineDPOTrainer(online_config(ppo_setup, "steps", "online.rewards=[{function: "
                                             f"'{ppo_setup / 'online_rewards.py'}:shortness'}}, {{function: "
                                             f"'{ppo_setup / 'online_rewards.py'}:tokens', weight: 0.0}}]"))
    metrics = trainer.train()
    for name in ("loss", "rewards/chosen", "rewards/rejected", "rewards/accuracies", "rewards/margins",
                 "logps/chosen", "logps/rejected", "online/pairs", "objective/scores", "rewards/shortness",
                 "rewards/tokens", "grad_norm"):
        assert name in metrics, name
    assert 0 < metrics["online/pairs"] <= 4 * 3  # K = 3: up to 3 pairs per prompt
    assert metrics["online/pairs"] >= 4 - metrics["online/prompts_without_pair"]
    rows = [json.loads(line) for line in (ppo_setup / "steps" / "samples.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1] * 4 + [2] * 4
    for row in rows:
        assert row["scores"] == [-float(len(c.split())) for c in row["completions"]]
        if row["ranking"] is not None:
            best, worst = row["ranking"][0][0], row["ranking"][-1][0]
            assert row["scores"][best] > row["scores"][worst]
    assert (ppo_setup / "steps" / "final" / "config.json").exists()


def test_online_dpo_learns_what_the_judge_prefers(ppo_setup):
    """Rewarded for the share of its tokens with ids below 256 (about half of a random policy's), the tiny policy
    writes more of them within a few steps (a swapped chosen and rejected would make it write fewer). It samples from
    its 50 likeliest tokens: a random policy's whole distribution over 1024 tokens spreads 12 steps' changes thin."""
    config = online_config(ppo_setup, "learns", "train.max_steps=12", "train.lr=3e-3", "online.top_k=50",
                           "online.rollout_batch_size=8",
                           "online.num_generations=2", "dpo.beta=0.5",
                           f"online.rewards=[{{function: '{ppo_setup / 'online_rewards.py'}:low_ids'}}]")
    OnlineDPOTrainer(config).train()
    records = [json.loads(line) for line in (ppo_setup / "learns" / "metrics.jsonl").read_text().splitlines()]
    scores = [r["objective/scores"] for r in records if "objective/scores" in r]
    assert len(scores) == 12
    assert sum(scores[-3:]) / 3 > sum(scores[:3]) / 3 + 0.2, scores


def test_the_reference_is_refreshed_every_n_steps_and_restored_on_resume(ppo_setup):
    def weights(module):
        return {k: v.clone() for k, v in module.state_dict().items()}

    initial = weights(load_causal_lm(online_config(ppo_setup, "x").model)[0])
    kept = OnlineDPOTrainer(online_config(ppo_setup, "kept"))
    kept.train()
    assert all(torch.equal(initial[k], v) for k, v in kept.reference.module.state_dict().items())

    straight = OnlineDPOTrainer(online_config(ppo_setup, "straight", "train.max_steps=3",
                                              "online.ref_update_every=2"))
    straight.train()
    policy_at_2 = OnlineDPOTrainer(online_config(ppo_setup, "resumed", "online.ref_update_every=2",
                                                 "train.save_every=2"))
    policy_at_2.train()
    snapshot = weights(policy_at_2._policy())
    assert all(torch.equal(snapshot[k], v) for k, v in policy_at_2.reference.module.state_dict().items())
    resumed = OnlineDPOTrainer(online_config(ppo_setup, "resumed", "train.max_steps=3",
                                             "online.ref_update_every=2", "train.save_every=2"))
    resumed.train()  # from checkpoint-2: the refreshed reference comes back with it
    for a, b in ((straight._policy(), resumed._policy()), (straight.reference.module, resumed.reference.module)):
        for (name, x), y in zip(a.state_dict().items(), b.state_dict().values(), strict=True):
            assert torch.allclose(x, y, atol=1e-6), name


@pytest.mark.parametrize("overrides, message", [
    (["dpo.loss=kto"], "kto"),
    (["dpo.precompute_reference=true"], "cannot be computed beforehand"),
    (["online.task=tinyworld"], "exactly one of the two"),
    (["online.rewards=[]"], "exactly one of the two"),
    (["online.ref_update_every=2", "model.lora.r=4"], "ref_update_every"),
    (["online.ref_update_every=2", "dpo.loss=simpo"], "ref_update_every"),
])
def test_bad_online_settings_are_refused(ppo_setup, overrides, message):
    with pytest.raises(ValueError, match=message):
        online_config(ppo_setup, "bad", *overrides)


def test_several_processes_need_a_shareable_rollout_and_no_lora_under_fsdp(ppo_setup, monkeypatch):
    """With 2 processes ``online.rollout_batch_size`` is a global count, split evenly; LoRA under FSDP is refused."""
    from types import SimpleNamespace

    from accelerate.utils import DistributedType

    from rlhfkit.engine import loop

    for engine, overrides, message in [
            (DistributedType.MULTI_CPU, ["online.rollout_batch_size=3"],
             r"online.rollout_batch_size \(3\) is a global count and must be a multiple of the number of processes"),
            (DistributedType.FSDP, ["model.lora.r=4"], "online_dpo: LoRA under FSDP is not supported yet")]:
        accelerator = SimpleNamespace(distributed_type=engine, num_processes=2, process_index=0)
        monkeypatch.setattr(loop, "make_accelerator", lambda mixed_precision, accelerator=accelerator: accelerator)
        with pytest.raises(TrainingError, match=message):
            OnlineDPOTrainer(online_config(ppo_setup, "two", *overrides))


def test_the_shipped_config_validates():
    from pathlib import Path

    config = load_config(OnlineDPOConfig, Path(__file__).resolve().parents[1] / "configs" / "online_dpo.yaml")
    assert config.online.reward_model and config.online.num_generations == 4


@pytest.mark.parametrize("overrides", [["dpo.loss=simpo"], ["model.lora.r=4", "online.pairs=best_worst"],
                                       ["dpo.loss=ipo", "train.grad_accum=2"]])
def test_other_losses_lora_and_micro_batches_train(ppo_setup, overrides):
    metrics = OnlineDPOTrainer(online_config(ppo_setup, "variant", "train.resume=false", *overrides)).train()
    assert metrics["loss"] == metrics["loss"] and "rewards/margins" in metrics
    if "online.pairs=best_worst" in overrides:  # one pair per prompt that has one
        assert metrics["online/pairs"] == 4 - metrics["online/prompts_without_pair"]
