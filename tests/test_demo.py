"""End to end on the built-in task: the three steps and DPO, judged by the gold judge (the demo_run fixture)."""

import json

import pytest

from rlhfkit.trainers.base import read_metrics


@pytest.mark.slow
def test_sft_beats_base_model_on_held_out_prompts(demo_run):
    summary = json.loads((demo_run / "summary.json").read_text())
    sft_eval = [r["eval/loss"] for r in read_metrics(demo_run / "sft") if "eval/loss" in r]
    assert sft_eval[-1] < sft_eval[0] - 0.3, sft_eval  # SFT lowers the held-out loss
    base, sft = summary["models"]["pretrain"], summary["models"]["sft"]
    assert sft["gold/score"] > base["gold/score"] + 0.2, summary
    assert sft["eos_rate"] > 0.8, summary  # it learned to end its answers
    samples = [json.loads(line) for line in (demo_run / "samples" / "sft.jsonl").read_text().splitlines()]
    assert len(samples) == 400 and {"prompt", "completion", "gold"} <= set(samples[0])


@pytest.mark.slow
def test_step_two_ranks_sft_samples_and_the_reward_model_beats_chance_by_gold(demo_run):
    rankings = [json.loads(line) for line in (demo_run / "data" / "rankings.jsonl").read_text().splitlines()]
    assert len(rankings) > 1500  # of 2000 prompts, those with >= 2 distinct finished samples
    assert all(2 <= len(r["completions"]) <= 4 and r["labeler"] == "tinyworld-simulated" for r in rankings)
    reward_model = json.loads((demo_run / "summary.json").read_text())["reward_model"]
    # fresh samples of held-out prompts; chance is 0.5, the standard error about 0.015
    assert reward_model["gold/pairs"] > 500 and reward_model["gold/accuracy"] > 0.58, reward_model


@pytest.mark.slow
def test_ppo_raises_the_reward_model_score_and_stays_near_the_sft_policy(demo_run):
    metrics = read_metrics(demo_run / "ppo")
    assert [m["step"] for m in metrics] == list(range(1, len(metrics) + 1))
    scores = [m["objective/scores"] for m in metrics]
    first, last = sum(scores[:5]) / 5, sum(scores[-5:]) / 5
    assert last > first + 0.1, scores
    assert max(m["objective/kl"] for m in metrics) < 3.0, [m["objective/kl"] for m in metrics]
    summary = json.loads((demo_run / "summary.json").read_text())
    # close to SFT by the gold judge too (the reward model's errors are not exploited much)
    assert summary["models"]["ppo"]["gold/score"] > summary["models"]["sft"]["gold/score"] - 0.03, summary
