"""The over-optimisation study (examples/overoptimisation, Gao et al. 2022): the best-of-n curve from per-prompt
scores, the study json and figure from synthetic points, the report's section, and study.py end to end on tiny
random models."""

import importlib.util
import io
import json
import math
from pathlib import Path

import pytest
from rich.console import Console

from rlhfkit.evaluate.metrics import mean_interval
from rlhfkit.evaluate.overoptimisation import (
    best_of_n_curve,
    best_of_n_kl,
    powers_of_two,
    study_figure,
    study_point,
    study_summary,
)

ROOT = Path(__file__).resolve().parents[1]
BASELINE = 0.3


def test_mean_interval_brackets_the_mean_and_collapses_on_constant_values():
    result = mean_interval([0.0, 1.0] * 50, seed=1)
    assert result["mean"] == 0.5 and result["low"] < 0.5 < result["high"]
    assert 0.35 < result["low"] and result["high"] < 0.65  # about +-1.96 * 0.05
    assert mean_interval([0.7] * 5) == {"mean": 0.7, "low": 0.7, "high": 0.7}
    with pytest.raises(ValueError, match="at least one"):
        mean_interval([])


def test_best_of_n_curve_by_hand():
    # prompt A: the proxy picks draws 0, 1, 3 for n = 1, 2, 4; prompt B: draws 0, 0 (0.4 > 0.2), 2
    proxy = [[0.1, 0.5, 0.3, 0.9], [0.4, 0.2, 0.8, 0.1]]
    gold = [[1.0, 2.0, 3.0, 4.0], [0.0, 5.0, 1.0, 7.0]]
    points = best_of_n_curve(gold, proxy)
    assert [p["n"] for p in points] == [1, 2, 4] and all(p["method"] == "best_of_n" for p in points)
    assert [p["gold"] for p in points] == [0.5, 1.0, 2.5]  # (1 + 0) / 2, (2 + 0) / 2, (4 + 1) / 2
    assert [p["proxy"] for p in points] == pytest.approx([0.25, 0.45, 0.85])
    assert [p["gold_values"] for p in points] == [[1.0, 0.0], [2.0, 0.0], [4.0, 1.0]]
    for p in points:
        assert p["kl"] == best_of_n_kl(p["n"]) and p["sqrt_kl"] == pytest.approx(math.sqrt(p["kl"]))
        assert p["prompts"] == 2
    # over 2 prompts the bootstrap means are A's, B's or their average: the 95 % interval spans B to A
    assert (points[2]["gold_low"], points[2]["gold_high"]) == (1.0, 4.0)
    assert [p["n"] for p in best_of_n_curve(gold, proxy, [3])] == [3]
    assert best_of_n_curve(gold, proxy, [3])[0]["gold"] == 1.5  # A: draw 1 (0.5), B: draw 2 (0.8) -> (2 + 1) / 2
    assert powers_of_two(64) == [1, 2, 4, 8, 16, 32, 64] and powers_of_two(6) == [1, 2, 4, 6]
    with pytest.raises(ValueError, match="between 1 and the 4 draws"):
        best_of_n_curve(gold, proxy, [8])
    with pytest.raises(ValueError, match="prompt 1: 3 gold scores for 4 proxy scores"):
        best_of_n_curve([gold[0], gold[1][:3]], proxy)
    with pytest.raises(ValueError, match="1 prompts of gold scores for 2"):
        best_of_n_curve(gold[:1], proxy)


def _bon(d):
    return d * (0.2 - 0.1 * d)  # peak d* = 1, KL* = 1, R(d*) = 0.1


def _rl(d, alpha=0.3, beta=0.15):
    return d * (alpha - beta * math.log(d)) if d > 0 else 0.0  # peak d* = exp(alpha / beta - 1)


def synthetic_points(rl_by_coef=None):
    """Noiseless points on known curves: best-of-n to n = 64 (KL 3.17, past its peak at KL 1); PPO with
    kl_coef 0 to KL 12 (past the pooled RL peak at KL e^2 = 7.39) and kl_coef 0.1 to KL 4 (before it)."""
    rl_by_coef = rl_by_coef or {0.0: (0.3, 0.15), 0.1: (0.3, 0.15)}
    points = []
    for n in powers_of_two(64):
        d = math.sqrt(best_of_n_kl(n))
        points.append(study_point([BASELINE + _bon(d)] * 4, [0.1 * n ** 0.5] * 4, best_of_n_kl(n),
                                  method="best_of_n", n=n))
    points.append(study_point([BASELINE] * 4, [0.0] * 4, 0.0, method="sft", iteration=0))
    for coef, kls in ((0.0, [1.0, 3.0, 6.0, 8.0, 12.0]), (0.1, [0.5, 1.5, 2.5, 4.0])):
        for iteration, kl in enumerate(kls, start=1):
            points.append(study_point([BASELINE + _rl(math.sqrt(kl), *rl_by_coef[coef])] * 4, [0.2 * kl] * 4, kl,
                                      method="ppo", kl_coef=coef, iteration=10 * iteration))
    return points


def test_study_summary_recovers_the_curves_their_peaks_and_the_verdicts():
    study = study_summary(synthetic_points(), baseline_gold=BASELINE, baseline_proxy=0.0, settings={"prompts": 4})
    json.dumps(study)  # json-ready
    assert study["settings"] == {"prompts": 4} and study["baseline"] == {"gold": BASELINE, "proxy": 0.0}
    assert "arXiv:2210.10760" in study["paper"]
    points = study["points"]
    assert len(points) == 7 + 1 + 9 and all("gold_values" not in p for p in points)
    for p in points:
        assert {"kl", "sqrt_kl", "gold", "gold_low", "gold_high", "proxy", "gold_delta"} <= set(p)
        assert p["gold_delta"] == pytest.approx(p["gold"] - BASELINE)
        assert ("n" in p) == (p["method"] == "best_of_n") and ("kl_coef" in p) == (p["method"] == "ppo")

    bon = study["fits"]["best_of_n"]
    assert (bon["alpha"], bon["beta"], bon["r2"]) == pytest.approx((0.2, 0.1, 1.0), abs=1e-9)
    assert bon["peak_kl"] == pytest.approx(1.0) and bon["peak_gold"] == pytest.approx(BASELINE + 0.1)
    assert bon["peak_in_range"] and bon["max_kl"] == pytest.approx(best_of_n_kl(64))
    rl = study["fits"]["rl"]
    assert (rl["alpha"], rl["beta"], rl["r2"]) == pytest.approx((0.3, 0.15, 1.0), abs=1e-9)
    assert rl["points"] == 1 + 9 and rl["peak_kl"] == pytest.approx(math.e ** 2) and rl["peak_in_range"]
    by_coef = study["fits"]["rl_by_kl_coef"]
    assert set(by_coef) == {"0", "0.1"} and by_coef["0.1"]["points"] == 1 + 4
    assert by_coef["0.1"]["alpha"] == pytest.approx(0.3) and not by_coef["0.1"]["peak_in_range"]  # KL 4 < e^2

    series = study["series"]
    assert set(series) == {"best_of_n", "ppo:kl_coef=0", "ppo:kl_coef=0.1"}
    # best-of-n: gold is highest at n = 8 (d = 1.10: R = 0.0990; n = 4, d = 0.80: 0.0959) and falls by n = 64
    assert series["best_of_n"]["best"] == "n=8" and series["best_of_n"]["last"] == "n=64"
    assert series["best_of_n"]["gold_drop"] == pytest.approx(_bon(math.sqrt(best_of_n_kl(8)))
                                                             - _bon(math.sqrt(best_of_n_kl(64))))
    assert series["best_of_n"]["gold_falls_past_peak"] and series["best_of_n"]["proxy_rises_past_gold_peak"]
    zero = series["ppo:kl_coef=0"]  # peaks at KL 8 (of 1, 3, 6, 8, 12; the curve's peak is 7.39), falls at 12
    assert (zero["best"], zero["last"], zero["best_kl"]) == ("iteration 40", "iteration 50", 8.0)
    assert zero["gold_drop"] > 0 and zero["gold_falls_past_peak"] and zero["proxy_change"] == pytest.approx(0.8)
    tenth = series["ppo:kl_coef=0.1"]  # still rising at its last checkpoint
    assert tenth["best"] == tenth["last"] == "iteration 40" and tenth["gold_drop"] == 0.0
    assert tenth["gold_falls_past_peak"] is False and tenth["proxy_rises_past_gold_peak"] is False
    assert study["fits"]["rl_comparison"]["pooled"]["parameters"] == 2
    assert study["fits"]["rl_comparison"]["by_kl_coef"]["parameters"] == 4


def test_per_coefficient_fits_are_preferred_when_the_runs_follow_different_curves():
    points = synthetic_points({0.0: (0.3, 0.15), 0.1: (0.6, 0.05)})
    study = study_summary(points, baseline_gold=BASELINE, baseline_proxy=0.0)
    comparison = study["fits"]["rl_comparison"]
    assert comparison["by_kl_coef"]["r2"] == pytest.approx(1.0) and comparison["pooled"]["r2"] < 0.99
    assert comparison["preferred"] == "by_kl_coef"
    assert study["fits"]["rl_by_kl_coef"]["0.1"]["alpha"] == pytest.approx(0.6)
    # too few points for a fit: an error entry, not an exception; no PPO: no RL fits
    few = study_summary(points[:2], baseline_gold=BASELINE, baseline_proxy=0.0)
    assert "error" in few["fits"]["best_of_n"] and set(few["fits"]) == {"best_of_n"}
    with pytest.raises(ValueError, match="at most one sft point"):
        study_summary(points + [points[7]], baseline_gold=BASELINE, baseline_proxy=0.0)


def test_study_figure_draws_every_series_and_the_fitted_curves():
    study = json.loads(json.dumps(study_summary(synthetic_points(), baseline_gold=BASELINE, baseline_proxy=0.0)))
    figure = study_figure(study)
    gold_ax, proxy_ax = [ax for ax in figure.axes if ax.get_ylabel()]
    _, gold_labels = gold_ax.get_legend_handles_labels()
    _, proxy_labels = proxy_ax.get_legend_handles_labels()
    for label in ("best-of-n", "PPO, KL coef 0", "PPO, KL coef 0.1"):
        assert label in gold_labels and label in proxy_labels, label
    assert any(label.startswith("best-of-n fit: α=0.200, β=0.100, R²=1.00, peak KL 1.00") for label in gold_labels)
    assert any(label.startswith("RL fit (pooled): α=0.300, β=0.150") for label in gold_labels)
    assert sum(label.startswith("RL fit, KL coef") for label in gold_labels) == 2
    assert gold_ax.get_xlabel().startswith("d = sqrt(KL")
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=50)
    assert buffer.getvalue().startswith(b"\x89PNG")
    # a study with best-of-n only and no fit still draws
    only = study_summary(synthetic_points()[:2], baseline_gold=BASELINE, baseline_proxy=0.0)
    assert len([ax for ax in study_figure(only).axes if ax.get_ylabel()]) == 2
    # PPO far beyond best-of-n's KL: a second row zooms in on best-of-n's range (d <= 1.25 x sqrt(KL of n = 64))
    wide = synthetic_points() + [study_point([BASELINE] * 4, [3.0] * 4, 40.0, method="ppo", kl_coef=0.0,
                                             iteration=60)]
    axes = [ax for ax in study_figure(study_summary(wide, baseline_gold=BASELINE, baseline_proxy=0.0)).axes
            if ax.get_ylabel()]
    assert len(axes) == 4 and axes[2].get_xlim() == pytest.approx((0.0, 1.25 * math.sqrt(best_of_n_kl(64))))
    assert "zoomed" in axes[3].get_title() and axes[0].get_xlim()[1] > math.sqrt(40)


def test_report_draws_the_study_when_its_json_exists(tmp_path):
    from rlhfkit.evaluate.report import write_report

    summary = {"task": "tinyworld", "eval_prompts": 3, "baseline": "sft", "win_rates": {},
               "models": {"sft": {"eos_rate": 1.0, "length/tokens": 10.0, "gold/score": 0.3, "gold/stderr": 0.01}}}
    (tmp_path / "summary.json").write_text(json.dumps(summary))
    page = write_report(tmp_path).read_text()
    assert "Reward over-optimisation study" not in page
    images = page.count("data:image/png;base64,")
    (tmp_path / "overoptimisation").mkdir()
    study = study_summary(synthetic_points(), baseline_gold=BASELINE, baseline_proxy=0.0)
    (tmp_path / "overoptimisation" / "study.json").write_text(json.dumps(study))
    page = write_report(tmp_path).read_text()
    assert "<h2>Reward over-optimisation study</h2>" in page
    assert page.count("data:image/png;base64,") == images + 1


# ---- study.py end to end, on the tiny random policy and reward model of conftest's ppo_setup -------------

def _study_module():
    spec = importlib.util.spec_from_file_location("overoptimisation_study", ROOT / "examples" / "overoptimisation"
                                                  / "study.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture
def tiny_run(ppo_setup, task, tmp_path):
    """A demo run's layout around the tiny models: sft/final, rm/final, data/eval_prompts.jsonl, ppo/config.yaml."""
    from rlhfkit.config import PPOConfig, load_config, save_config
    from rlhfkit.data.readers import write_jsonl

    run = tmp_path / "run"
    for stage, model in (("sft", "policy"), ("rm", "rm")):
        (run / stage).mkdir(parents=True)
        (run / stage / "final").symlink_to(ppo_setup / model, target_is_directory=True)
    write_jsonl(run / "data" / "eval_prompts.jsonl", [{"prompt": p} for p in task.prompts(3, split="test", seed=5)])
    config = load_config(PPOConfig, None, [
        f"train.output_dir={run / 'ppo'}", "train.max_steps=2", "train.progress=false", "train.lr=1e-3",
        f"model.name_or_path={run / 'sft' / 'final'}", f"data.train={ppo_setup / 'prompts.jsonl'}",
        "data.max_length=64", f"ppo.reward_model={run / 'rm' / 'final'}", "ppo.rollout_batch_size=4",
        "ppo.minibatch_size=4", "ppo.ppo_epochs=1", "ppo.max_new_tokens=5"])
    save_config(config, run / "ppo")
    return run


SMALL = ["--prompts", "3", "--max-n", "4", "--max-new-tokens", "5", "--temperature", "1.0", "--batch-size", "16",
         "--bootstrap", "50"]


def test_study_best_of_n_on_tiny_models(tiny_run, task, tmp_path):
    from rlhfkit.config import ModelConfig
    from rlhfkit.models.load import load_causal_lm
    from rlhfkit.models.reward import load_for_scoring
    from rlhfkit.rollout.best_of_n import sample_best_of_n
    from rlhfkit.rollout.generate import SamplingConfig

    out = tmp_path / "out"
    console = Console(file=io.StringIO(), width=200)
    study = _study_module().main(["--run", str(tiny_run), "--out", str(out), "--skip-ppo", *SMALL], console=console)
    assert json.loads((out / "study.json").read_text()) == json.loads(json.dumps(study))
    assert (out / "overoptimisation.png").read_bytes().startswith(b"\x89PNG")
    assert [p["n"] for p in study["points"]] == [1, 2, 4] and set(study["fits"]) == {"best_of_n"}
    assert study["settings"]["ppo_runs"] == {c: "not run (--skip-ppo; new)" for c in ("0", "0.01", "0.03", "0.1")}
    # the draw is sample_best_of_n's, chunk by chunk (one chunk here), judged by gold and proxy
    draw = json.loads((out / "best_of_n.json").read_text())
    policy, tokenizer = load_causal_lm(ModelConfig(name_or_path=str(tiny_run / "sft" / "final")))
    prompts = draw["prompts"]
    picks = sample_best_of_n(policy, tokenizer, load_for_scoring(str(tiny_run / "rm" / "final")), prompts, 4,
                             SamplingConfig(max_new_tokens=5, temperature=1.0, batch_size=16), seed=0)
    assert draw["completions"] == [[g.text for g in pick.samples] for pick in picks]
    assert draw["proxy"] == [pytest.approx(list(pick.scores), abs=1e-5) for pick in picks]
    assert draw["gold"] == [[task.gold_score(p, t) for t in texts]
                            for p, texts in zip(prompts, draw["completions"], strict=True)]
    for point in study["points"]:
        picked = [max(range(point["n"]), key=lambda j, s=scores: (s[j], -j)) for scores in draw["proxy"]]
        gold = [draw["gold"][i][j] for i, j in enumerate(picked)]
        assert point["gold"] == pytest.approx(sum(gold) / 3)
    assert study["baseline"]["gold"] == pytest.approx(sum(map(sum, draw["gold"])) / 12)
    printed = console.file.getvalue()  # the summary table and the verdict
    assert "n=4" in printed and "best_of_n: gold best at" in printed


def test_study_with_ppo_on_tiny_models_resumes(tiny_run, tmp_path):
    out = tmp_path / "out"
    args = ["--run", str(tiny_run), "--out", str(out), *SMALL, "--kl-coefs", "0,0.1", "--ppo-iterations", "2",
            "--save-every", "1"]
    study = _study_module().main(args, console=Console(file=io.StringIO(), width=200))
    ppo = [p for p in study["points"] if p["method"] == "ppo"]
    assert sorted((p["kl_coef"], p["iteration"]) for p in ppo) == [(0.0, 1), (0.0, 2), (0.1, 1), (0.1, 2)]
    assert [p["kl"] for p in study["points"] if p["method"] == "sft"] == [0.0]  # SFT against itself
    assert {"best_of_n", "rl", "rl_by_kl_coef", "rl_comparison"} <= set(study["fits"])
    assert set(study["series"]) == {"best_of_n", "ppo:kl_coef=0", "ppo:kl_coef=0.1"}
    for coef in ("0", "0.1"):
        directory = out / f"ppo-kl{coef}"
        assert (directory / "final").is_dir() and (directory / "checkpoint-1").is_dir()
        assert study["settings"]["ppo_runs"][coef] == str(directory)
    # run again: the finished PPO runs are skipped and every evaluation comes from the caches
    weights = out / "ppo-kl0" / "final" / "model.safetensors"
    stamps = {path: path.stat().st_mtime_ns for path in (weights, out / "ppo-kl0" / "study_eval.json",
                                                         out / "best_of_n.json", out / "sft_eval.json")}
    console = Console(file=io.StringIO(), width=200)
    again = _study_module().main(args, console=console)
    assert "finished in" in console.file.getvalue() and "skipped" in console.file.getvalue()
    assert {path: path.stat().st_mtime_ns for path in stamps} == stamps
    # the same study (compared as json text: the tiny random models' gold scores give NaN r2s, and NaN != NaN)
    assert json.dumps(again["points"]) == json.dumps(study["points"])
    assert json.dumps(again["fits"]) == json.dumps(study["fits"])
