"""End to end on the built-in task: the three steps and DPO, judged by the gold judge (the demo_run fixture)."""

import html
import json
import math

import pytest

from rlhfkit.engine.metrics import read_metrics


@pytest.mark.slow
def test_sft_beats_base_model_on_held_out_prompts(demo_run):
    summary = json.loads((demo_run / "summary.json").read_text())
    sft_eval = [r["eval/loss"] for r in read_metrics(demo_run / "sft") if "eval/loss" in r]
    assert sft_eval[-1] < sft_eval[0] - 0.3, sft_eval  # SFT lowers the held-out loss
    base, sft = summary["models"]["pretrain"], summary["models"]["sft"]
    assert sft["gold/score"] > base["gold/score"] + 0.2, summary
    assert sft["eos_rate"] > 0.8, summary  # it learned to end its answers
    samples = [json.loads(line) for line in (demo_run / "samples" / "sft.jsonl").read_text().splitlines()]
    assert len(samples) == 800 and {"prompt", "completion", "gold"} <= set(samples[0])


@pytest.mark.slow
def test_step_two_ranks_sft_samples_and_the_reward_model_beats_chance_by_gold(demo_run):
    rankings = [json.loads(line) for line in (demo_run / "rank" / "rankings.jsonl").read_text().splitlines()]
    assert len(rankings) > 1500  # of 2000 prompts, those with >= 2 distinct finished samples
    assert all(2 <= len(r["completions"]) <= 4 and r["labeler"] == "tinyworld-simulated" for r in rankings)
    reward_model = json.loads((demo_run / "summary.json").read_text())["reward_model"]
    # fresh samples of held-out prompts; chance is 0.5, the standard error about 0.015
    assert reward_model["gold/pairs"] > 500 and reward_model["gold/accuracy"] > 0.58, reward_model
    # the simulated labelers' own agreement on the same pairs, the reward model's ceiling (measured: 0.644,
    # the reward model 0.642): lower than on demonstrations (0.73), since SFT samples differ less
    assert 0.58 < reward_model["labeler/accuracy"] < 0.75, reward_model


@pytest.mark.slow
def test_ppo_raises_the_reward_model_score_near_the_sft_policy_and_beats_it_by_gold(demo_run):
    metrics = read_metrics(demo_run / "ppo")
    assert [m["step"] for m in metrics] == list(range(1, len(metrics) + 1))
    scores = [m["objective/scores"] for m in metrics]
    first, last = sum(scores[:5]) / 5, sum(scores[-5:]) / 5
    assert last > first + 0.1, scores
    assert max(m["objective/kl"] for m in metrics) < 3.0, [m["objective/kl"] for m in metrics]
    summary = json.loads((demo_run / "summary.json").read_text())
    # and better by the gold judge. Measured (two seeds of the whole pipeline): SFT 0.342 -> PPO 0.411 and
    # 0.358 -> 0.379; PPO runs of other seeds against one reward model: +0.034 to +0.050
    assert summary["models"]["ppo"]["gold/score"] > summary["models"]["sft"]["gold/score"], summary


@pytest.mark.slow
def test_the_demo_writes_the_report_and_the_illustration_of_its_own_run(demo_run):
    summary = json.loads((demo_run / "summary.json").read_text())
    assert {"pretrain", "sft", "ppo", "dpo", "ppo@15", "dpo@200"} <= set(summary["models"])
    assert summary["models"]["sft"]["kl"] == pytest.approx(0.0, abs=1e-3)  # SFT is the reference
    # PPO moves away from SFT, at its middle checkpoint and at its end (which of the two is further depends on
    # the machine's float kernels: 1.27 at iteration 15 and 1.04 at 30 on an AMX Xeon, the other way round on an EPYC)
    assert summary["models"]["ppo"]["kl"] > 0.1 and summary["models"]["ppo@15"]["kl"] > 0.1
    assert set(summary["win_rates"]["dpo"]) == {"gold", "rm"}
    # the alignment tax is measured for every model (best-of-n is a sampling method, not a model of its own)
    assert all(1.0 < m["heldout/ppl"] < 1e4 for m in summary["models"].values() if not m.get("kl_analytic"))
    # best-of-16 of SFT by the reward model, with its analytic KL, judged like the models
    best_of = summary["models"]["sft-bo16"]
    assert best_of["kl"] == pytest.approx(math.log(16) - 15 / 16) and set(summary["win_rates"]["sft-bo16"]) == {
        "gold", "rm"}
    assert best_of["rm/score"] > summary["models"]["sft"]["rm/score"] + 0.3  # the proxy picks its favourites
    # the gold judge's topic criterion for every model
    assert all(0.0 <= m["gold/criteria"]["topic"] <= 1.0 for m in summary["models"].values())
    stages = ("data", "tokenizer", "pretrain", "sft", "sample", "rank", "rm", "ppo", "dpo", "eval", "report")
    assert list(summary["seconds"]) == [*stages, "total"]
    assert all(summary["seconds"][s] > 0 for s in ("pretrain", "sft", "sample", "rm", "ppo", "dpo", "eval"))
    assert summary["seconds"]["total"] == pytest.approx(sum(summary["seconds"][s] for s in stages), abs=0.5)
    page = (demo_run / "report.html").read_text()
    assert page.count("data:image/png;base64,") == 4 and "Reward vs KL frontier" in page
    svg = (demo_run / "illustration.svg").read_text()
    ppo_samples = [json.loads(line) for line in (demo_run / "ppo" / "samples.jsonl").read_text().splitlines()]
    last = [s for s in ppo_samples if s["step"] == ppo_samples[-1]["step"]][0]
    # the prompt's first words (a long prompt is wrapped onto several lines) and the reward, as text
    assert html.escape(" ".join(last["prompt"].split()[:3])) in svg and f"r = {last['score']:.2f}" in svg
    assert (demo_run / "illustration.png").stat().st_size > 20_000


@pytest.mark.slow
def test_running_the_demo_again_skips_every_finished_stage(demo_run):
    from rich.console import Console

    from rlhfkit.demo import DemoConfig, run_demo

    before = {p.parent.name: p.read_text() for p in demo_run.glob("*/stage.json")}
    assert len(before) == 11
    summary = run_demo(DemoConfig(out_dir=str(demo_run), eval_prompts=800, best_of_n=16), Console(quiet=True))
    assert {p.parent.name: p.read_text() for p in demo_run.glob("*/stage.json")} == before
    assert summary["seconds"]["total"] > 60  # the recorded seconds of the first run, not of this one


def test_a_verifiable_task_runs_the_grpo_recipe_without_a_reward_model(tmp_path):
    """``rlhfkit demo --set task=sums``: pretrain -> SFT -> GRPO on the exact answer -> eval; no step 2."""
    from rlhfkit.demo import DemoConfig, demo_pipeline, prepare_task_data
    from rlhfkit.tasks import get_task

    config = DemoConfig(out_dir=str(tmp_path), task="sums", rl_prompts=50)
    pipeline = demo_pipeline(config)
    assert pipeline.stages == ["pretrain", "sft", "ppo", "eval", "report"]
    ppo = pipeline.model_dump()["ppo"]["ppo"]
    assert ppo["rewards"] == [{"function": "exact_answer"}] and "reward_model" not in ppo
    assert ppo["advantage"] == "grpo" and ppo["samples_per_prompt"] == config.grpo.num_generations
    evaluation = pipeline.model_dump()["eval"]
    assert "reward_model" not in evaluation and evaluation["models"]["grpo"] == "{ppo}"
    assert pipeline.model_dump()["report"] == {"illustrate": False}
    prepare_task_data(config, tmp_path)
    task = get_task("sums")
    records = [json.loads(line) for line in (tmp_path / "rl_prompts.jsonl").read_text().splitlines()]
    assert len(records) == 50 and all(r["answer"] == task.answer(r["prompt"]) for r in records)
    assert not (tmp_path / "rank_prompts.jsonl").exists()
    held_out = [json.loads(line)["prompt"] for line in (tmp_path / "eval_prompts.jsonl").read_text().splitlines()]
    assert not {task.addends(p) for p in held_out} & {task.addends(r["prompt"]) for r in records}


def test_a_task_has_its_own_demo_defaults_under_the_settings_given():
    from rlhfkit.demo import TASK_DEFAULTS, DemoConfig, demo_pipeline, load_demo_config

    assert load_demo_config(None, []) == DemoConfig()  # tinyworld: the class's defaults
    sums = load_demo_config(None, ["task=sums", "pretrain.lr=1e-3", "sft.max_steps=5"])
    assert sums.max_length == TASK_DEFAULTS["sums"]["max_length"] == 64
    assert sums.pretrain.max_steps == TASK_DEFAULTS["sums"]["pretrain"]["max_steps"]  # the task's default ...
    assert sums.pretrain.lr == 1e-3 and sums.sft.max_steps == 5  # ... under what was given
    assert sums.pretrain.batch_size == DemoConfig().pretrain.batch_size  # the rest of the section: the class's
    assert load_demo_config(None, ["task=sums", "max_length=96"]).max_length == 96
    # the stages built from them: sums pretrains at a constant rate and averages SFT's tokens over the training set
    pipeline = demo_pipeline(sums)
    assert pipeline.pretrain["train"]["scheduler"] == "constant" and pipeline.sft["sft"]["loss_average"] == "dataset"
    tinyworld = demo_pipeline(DemoConfig())
    assert tinyworld.pretrain["train"]["scheduler"] == "cosine" and tinyworld.sft["sft"]["loss_average"] == "batch"
    assert tinyworld.ppo["train"]["scheduler"] == "constant"


def test_every_sampling_stage_of_the_demo_draws_with_its_one_top_k():
    """Rollouts, the rank stage's samples, online DPO and the evaluation sample alike (issue 22 asked whether they
    differed): the demo's ``top_k`` reaches each of them, for both recipes."""
    from rlhfkit.demo import DemoConfig, demo_pipeline

    for config in (DemoConfig(online_dpo_enabled=True), DemoConfig(task="sums"),
                   DemoConfig(top_k=0, online_dpo_enabled=True)):
        pipeline = demo_pipeline(config)
        sampling = [pipeline.ppo["ppo"], pipeline.eval] + (
            [pipeline.sample, pipeline.online_dpo["online"]] if config.task == "tinyworld" else [])
        assert [section["top_k"] for section in sampling] == [config.top_k] * len(sampling)


@pytest.mark.slow
def test_the_verifiable_recipe_trains_and_evaluates_end_to_end(tmp_path):
    from rich.console import Console

    from rlhfkit.demo import DemoConfig, run_demo

    settings = {"max_steps": 4, "lr": 1e-3, "warmup_steps": 0}
    config = DemoConfig(out_dir=str(tmp_path), task="sums", corpus_docs=200, heldout_docs=20, sft_prompts=100,
                        sft_eval_prompts=8, eval_prompts=16, rl_prompts=32, hidden_size=32, num_hidden_layers=1,
                        pretrain=settings, sft=settings, grpo={**settings, "rollout_batch_size": 2,
                                                               "num_generations": 4, "minibatch_size": 8})
    summary = run_demo(config, Console(quiet=True))
    assert set(summary["models"]) == {"pretrain", "sft", "grpo", "grpo@2"} and "reward_model" not in summary
    assert set(summary["models"]["grpo"]["gold/criteria"]) == {"correct", "shows_work", "steps_correct"}
    assert set(summary["win_rates"]["grpo"]) == {"gold"}
    metrics = read_metrics(tmp_path / "ppo")
    assert metrics[-1]["step"] == 4 and all("rewards/exact_answer" in m for m in metrics)
    assert (tmp_path / "report.html").exists() and not (tmp_path / "illustration.svg").exists()


@pytest.mark.slow
def test_online_dpo_joins_the_demo_on_the_rank_prompts_with_the_task_labeler(tmp_path):
    """``--set online_dpo_enabled=true``: online DPO from SFT, judged by the task's labeler, evaluated beside DPO."""
    from rich.console import Console

    from rlhfkit.demo import DemoConfig, demo_pipeline, run_demo

    settings = {"max_steps": 4, "lr": 1e-3, "warmup_steps": 0}
    config = DemoConfig(out_dir=str(tmp_path), corpus_docs=200, heldout_docs=20, sft_prompts=100, sft_eval_prompts=8,
                        eval_prompts=16, rank_prompts=32, hidden_size=32, num_hidden_layers=1, pretrain=settings,
                        sft=settings, rm=settings, dpo=settings, ppo={**settings, "rollout_batch_size": 4,
                                                                      "minibatch_size": 4},
                        online_dpo_enabled=True, online_dpo={**settings, "batch_size": 8})
    pipeline = demo_pipeline(config)
    assert pipeline.stages.index("online_dpo") == pipeline.stages.index("dpo") + 1
    online = pipeline.model_dump()["online_dpo"]
    assert online["online"]["task"] == "tinyworld" and online["online"]["num_generations"] == config.k
    assert online["online"]["pairs"] == "best_worst"
    assert online["data"]["train"] == "{data:rank_prompts.jsonl}"
    assert "online_dpo" not in demo_pipeline(DemoConfig()).stages  # off by default
    summary = run_demo(config, Console(quiet=True))
    assert {"online_dpo", "online_dpo@2", "dpo"} <= set(summary["models"])
    assert set(summary["win_rates"]["online_dpo"]) >= {"gold"}
    metrics = read_metrics(tmp_path / "online_dpo")
    assert metrics[-1]["step"] == 4 and "objective/scores" not in metrics[-1]  # a labeler ranks: no scores
    rows = [json.loads(line) for line in (tmp_path / "online_dpo" / "samples.jsonl").read_text().splitlines()]
    assert rows and all(len(r["completions"]) == config.k for r in rows)
