"""Best-of-n: the pure selection, the sampler with a tiny policy and reward model, the command and eval's row."""

import json

import pytest
from typer.testing import CliRunner

from rlhfkit.rollout.best_of_n import BestOfN, best_index, best_of_prefix, sample_best_of_n, select_best
from rlhfkit.rollout.generate import Generation, SamplingConfig


def _generations(texts):
    return [Generation(text, [i], True) for i, text in enumerate(texts)]


def test_best_index_picks_the_maximum_and_the_first_on_ties():
    assert best_index([0.1, 0.7, 0.3]) == 1
    assert best_index([0.2, 0.9, 0.9, 0.1]) == 1  # tie: the earlier draw
    assert best_index([-3.0, -1.0, -2.0]) == 1
    assert best_index([5.0]) == 0
    assert best_index((1.0, 1.0, 1.0)) == 0
    with pytest.raises(ValueError, match="at least one score"):
        best_index([])
    with pytest.raises(ValueError, match="NaN"):
        best_index([0.1, float("nan")])


def test_best_of_prefix_starts_at_the_first_sample_and_never_gets_worse():
    scores = [0.3, 0.1, 0.5, 0.5, -1.0, 0.9, 0.2, 0.9]
    assert best_of_prefix(scores, 1) == 0  # best-of-1 is a plain sample: the first draw
    picks = [best_of_prefix(scores, m) for m in range(1, len(scores) + 1)]
    assert picks == [0, 0, 2, 2, 2, 5, 5, 5]  # ties keep the earlier draw
    picked = [scores[i] for i in picks]
    assert picked == sorted(picked)  # non-decreasing in m
    assert best_of_prefix(scores, len(scores)) == best_index(scores)
    for m in (0, len(scores) + 1):
        with pytest.raises(ValueError, match="between 1 and the 8"):
            best_of_prefix(scores, m)


def test_select_best_slices_the_flat_scores_per_prompt():
    groups = [_generations(["a", "b", "c"]), _generations(["d", "e", "f"])]
    picks = select_best(["p", "q"], groups, [0.1, 0.4, 0.2, 0.6, 0.6, -1.0])
    assert [(p.prompt, p.index, p.text, p.score) for p in picks] == [("p", 1, "b", 0.4), ("q", 0, "d", 0.6)]
    assert picks[1].scores == (0.6, 0.6, -1.0) and picks[1].best is groups[1][0]
    assert isinstance(picks[0], BestOfN)
    with pytest.raises(ValueError, match="5 scores for 6 samples"):
        select_best(["p", "q"], groups, [0.1] * 5)


def test_sample_best_of_n_keeps_the_highest_scored_of_the_n_draws(ppo_setup, task):
    from rlhfkit.config import ModelConfig
    from rlhfkit.models.load import load_causal_lm
    from rlhfkit.models.reward import load_for_scoring, score_texts
    from rlhfkit.rollout.generate import generate_k

    policy, tokenizer = load_causal_lm(ModelConfig(name_or_path=str(ppo_setup / "policy")))
    scorer = load_for_scoring(str(ppo_setup / "rm"))
    prompts = task.prompts(3, seed=4)
    sampling = SamplingConfig(max_new_tokens=5, temperature=1.0, batch_size=12)
    picks = sample_best_of_n(policy, tokenizer, scorer, prompts, 4, sampling, seed=3)
    groups = generate_k(policy, tokenizer, prompts, 4, sampling, seed=3)  # the same draws, with the same seed
    assert [p.prompt for p in picks] == prompts
    for pick, group in zip(picks, groups, strict=True):
        assert [g.text for g in pick.samples] == [g.text for g in group]
        rescored = score_texts(*scorer, [pick.prompt] * 4, [g.text for g in group])
        assert list(pick.scores) == pytest.approx(rescored, abs=1e-5)
        assert pick.score == max(pick.scores) and pick.index == pick.scores.index(max(pick.scores))
    with pytest.raises(ValueError, match="at least 1"):
        sample_best_of_n(policy, tokenizer, scorer, prompts, 0, sampling)


def test_best_of_n_command_writes_sft_rows_with_the_best_reward(ppo_setup, tmp_path):
    from rlhfkit import cli
    from rlhfkit.config import ModelConfig
    from rlhfkit.data.readers import read_records
    from rlhfkit.models.load import load_causal_lm
    from rlhfkit.models.reward import load_for_scoring

    out = tmp_path / "best.jsonl"
    args = ["best-of-n", "--model", str(ppo_setup / "policy"), "--reward-model", str(ppo_setup / "rm"),
            "--prompts", str(ppo_setup / "prompts.jsonl"), "--n", "4", "--out", str(out), "--limit", "3",
            "--max-new-tokens", "5", "--batch-size", "8", "--seed", "7", "--temperature", "1.0", "--top-p", "1.0"]
    result = CliRunner().invoke(cli.app, args)
    assert result.exit_code == 0, result.output
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert len(rows) == 3 and all(set(r) == {"prompt", "completion", "reward", "n"} and r["n"] == 4 for r in rows)
    # the same draw again: every row's reward is the max of its prompt's 4 scores, its completion that sample
    policy, tokenizer = load_causal_lm(ModelConfig(name_or_path=str(ppo_setup / "policy")))
    prompts = [r.prompt for r in read_records(ppo_setup / "prompts.jsonl", "prompt", limit=3)]
    picks = sample_best_of_n(policy, tokenizer, load_for_scoring(str(ppo_setup / "rm")), prompts, 4,
                             SamplingConfig(max_new_tokens=5, batch_size=8), seed=7)
    for row, pick in zip(rows, picks, strict=True):
        assert row["prompt"] == pick.prompt and row["completion"] == pick.text
        assert row["reward"] == pytest.approx(max(pick.scores))
    assert len(read_records(out, "demonstration")) == 3  # directly usable as SFT data

    missing = [str(tmp_path / "missing.jsonl") if a == str(ppo_setup / "prompts.jsonl") else a for a in args]
    result = CliRunner().invoke(cli.app, missing)
    assert result.exit_code == 2 and "missing.jsonl" in result.output, result.output


def test_evaluate_models_adds_the_best_of_n_row_with_the_analytic_kl(ppo_setup, task, tmp_path):
    from rlhfkit import cli
    from rlhfkit.evaluate.compare import comparison_rows, evaluate_models
    from rlhfkit.evaluate.overoptimisation import best_of_n_kl
    from rlhfkit.pipeline import EvalStage

    policy, rm = str(ppo_setup / "policy"), str(ppo_setup / "rm")
    prompts = task.prompts(4, split="test", seed=2)
    sampling = SamplingConfig(max_new_tokens=5, temperature=1.0, batch_size=16)
    report, samples = evaluate_models({"base": policy}, prompts, sampling, task=task, reward_model=rm,
                                      reference=policy, heldout_texts=task.pretraining_corpus(2, seed=1), seed=0,
                                      best_of_n=3)
    assert list(report["models"]) == ["base", "base-bo3"]
    row = report["models"]["base-bo3"]
    assert row["kl"] == best_of_n_kl(3) and row["kl_analytic"] is True
    assert "kl_analytic" not in report["models"]["base"] and "heldout/ppl" not in row
    assert {"gold/score", "rm/score", "eos_rate", "length/tokens"} <= set(row)
    assert set(report["win_rates"]) == {"base-bo3"} and set(report["win_rates"]["base-bo3"]) == {"gold", "rm"}
    assert len(samples["base-bo3"]) == 4 and {"prompt", "completion", "gold", "rm"} <= set(samples["base-bo3"][0])
    headers, rows = comparison_rows(report)
    assert rows[1][headers.index("KL to reference")].endswith("(analytic)")

    with pytest.raises(ValueError, match="needs a reward model"):
        evaluate_models({"base": policy}, prompts, sampling, best_of_n=3)
    with pytest.raises(ValueError, match="already named base-bo2"):
        evaluate_models({"base": policy, "base-bo2": policy}, prompts, sampling, reward_model=rm, best_of_n=2)
    with pytest.raises(ValueError, match="eval.best_of_n needs eval.reward_model"):
        EvalStage(models={"base": policy}, prompts="p.jsonl", best_of_n=4)
    result = CliRunner().invoke(cli.app, ["eval", "--models", f"base={policy}", "--prompts",
                                          str(ppo_setup / "prompts.jsonl"), "--best-of-n", "4"])
    assert result.exit_code == 2 and "--best-of-n needs --reward-model" in result.output, result.output
