"""The one-table benchmark (``python -m benchmarks``): rows from the stages' runs, ratios, MFU and targets;
and the FLOP count of a PPO iteration. The timed runs themselves need TRL and are not part of the suite."""

import importlib.util
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"


@pytest.fixture(scope="module")
def bench():
    sys.path.insert(0, str(BENCHMARKS))
    spec = importlib.util.spec_from_file_location("benchmarks_main", BENCHMARKS / "__main__.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    yield module
    del sys.modules[spec.name]
    sys.path.remove(str(BENCHMARKS))


def _run(lib, **values):
    return {"lib": lib, "other_cpu": 0.0, **values}


def test_a_row_takes_medians_and_the_median_of_per_pair_ratios(bench):
    runs = []
    for rk, trl in ((100.0, 50.0), (90.0, 60.0), (120.0, 40.0)):  # per-pair ratios 2.0, 1.5, 3.0
        runs += [_run("rlhfkit", tokens_per_s=rk, s_per_step=1 / rk, peak_rss_mib=500.0, model_flops_per_s=rk * 1e9),
                 _run("trl", tokens_per_s=trl, s_per_step=1 / trl, peak_rss_mib=600.0)]
    row = bench.row_of("sft", "", "small", runs, peak_flops=200e9)
    assert row.speed == 2.0  # the median of 2.0, 1.5, 3.0, not the ratio of the medians (100 / 50)
    assert row.rlhfkit_tokens_per_s == 100.0 and row.trl_tokens_per_s == 50.0
    assert row.rss_ratio == pytest.approx(500 / 600)
    assert row.mfu == pytest.approx(0.5)  # median 100 GFLOP/s over a 200 GFLOP/s peak
    assert row.target == 1.0 and row.checks() == []


def test_a_row_names_each_missed_target(bench):
    runs = [_run("rlhfkit", steps_per_s=1.1, s_per_step=0.9, tokens_per_s=1.0, peak_rss_mib=700.0,
                 model_flops_per_s=50e9),
            _run("trl", steps_per_s=1.0, s_per_step=1.0, tokens_per_s=1.0, peak_rss_mib=600.0)]
    row = bench.row_of("dpo", "ref", "small", runs, peak_flops=200e9)
    assert row.checks() == ["speed 1.10x < 1.2x", "RSS 1.17x > 1x", "MFU 25% < 40%"]
    tiny = bench.row_of("dpo", "ref", "tiny", runs, peak_flops=200e9)
    assert "MFU 25% < 40%" not in tiny.checks()  # the MFU target is the small model's


def test_iteration_stages_compare_iterations_per_second(bench):
    runs = [_run("rlhfkit", s_per_iteration=2.0, s_per_step=0.5, tokens_per_s=10.0, peak_rss_mib=1.0),
            _run("trl", s_per_iteration=3.0, s_per_step=0.75, tokens_per_s=7.0, peak_rss_mib=1.0)]
    row = bench.row_of("grpo", "", "tiny", runs, peak_flops=1.0)
    assert row.speed == pytest.approx(1.5) and row.rlhfkit_s_per_iteration == 2.0 and row.mfu is None
    assert "**1.50x**" in bench.table([row]) and "speed 1.50x" not in bench.table([row])


def test_ppo_stage_is_skipped_with_the_reason_without_trl_112(bench, tmp_path, capsys):
    args = SimpleNamespace(sizes=["tiny"], pairs=1, threads=None, quick=False, trl_ppo_path=str(tmp_path),
                           mixed_precision="bf16")
    assert bench.stage_command("ppo", args, tmp_path / "ppo.json") is None
    assert "--make-trl-ppo-env" in capsys.readouterr().out
    (tmp_path / "trl").mkdir()
    assert bench.stage_command("ppo", args, tmp_path / "ppo.json")[-4:] == ["--mixed-precision", "bf16", "--trl-path",
                                                                         str(tmp_path)]


def test_ppo_iteration_flops(bench, tokenizer):
    """Generation + reference (2 forwards) + ppo_epochs training passes of the policy, the reward model's
    forward, and 1 + 3 x epochs passes of a value network."""
    import bench_ppo

    from rlhfkit.models.build import build_causal_lm
    from rlhfkit.models.flops import FlopModel

    policy = build_causal_lm(tokenizer, "tiny", seed=0)
    rollout = SimpleNamespace(query_mask=torch.tensor([[0, 1, 1], [1, 1, 1]]),
                              response_mask=torch.tensor([[1, 1, 0, 0], [1, 1, 1, 1]]))
    lengths = [4, 7]
    one = FlopModel(policy).forward(lengths)
    trainer = SimpleNamespace(ppo=SimpleNamespace(ppo_epochs=2, value_model="reward"), reward_model=policy,
                              _unwrapped_policy=lambda: policy, _unwrapped_value=lambda: policy)
    assert bench_ppo.rollout_flops_counter(trainer)(rollout) == pytest.approx((2 + 6) * one + one + (1 + 6) * one)
    trainer._unwrapped_value = lambda: None  # GRPO: no value network
    assert bench_ppo.rollout_flops_counter(trainer)(rollout) == pytest.approx((2 + 6) * one + one)


@pytest.mark.skipif(not Path("/proc/self/clear_refs").exists(), reason="needs Linux's /proc/self/clear_refs")
def test_memory_phases_each_get_their_own_peak(bench):
    """bench_memory's PhasePeaks: a phase that briefly holds 200 MiB peaks ~200 MiB above one that holds 20."""
    import bench_memory

    def hold(mib: int) -> None:
        block = torch.ones(mib * 2**18)  # float32: mib MiB, touched
        del block

    owner = SimpleNamespace(big=lambda: hold(200), small=lambda: hold(20))
    phases = bench_memory.PhasePeaks()
    phases.wrap(owner, "big")
    phases.wrap(owner, "small", "a small phase")
    phases.start()
    owner.big()
    owner.small()
    phases.end("other")
    assert set(phases.peaks) == {"big", "a small phase", "other"}
    assert phases.peaks["big"] - phases.peaks["a small phase"] > 150  # the big block is not counted twice
    assert phases.peaks["big"] - phases.peaks["other"] > 150


def test_rlhfkit_bench_runs_python_m_benchmarks_with_its_arguments(tmp_path, monkeypatch):
    """``rlhfkit bench ARGS`` is ``python -m benchmarks ARGS`` in the checkout; outside one it says what is missing."""
    from typer.testing import CliRunner

    from rlhfkit.cli import app, benchmarks_checkout

    assert benchmarks_checkout(tmp_path) == BENCHMARKS.parent  # found from the editable install
    calls = []
    monkeypatch.setattr("subprocess.call", lambda command, cwd: calls.append((command, cwd)) or 3)
    result = CliRunner().invoke(app, ["bench", "--stages", "sft", "--quick", "--help"])
    assert result.exit_code == 3  # the benchmarks' own exit status
    assert calls == [([sys.executable, "-m", "benchmarks", "--stages", "sft", "--quick", "--help"], BENCHMARKS.parent)]

    monkeypatch.setattr("rlhfkit.cli.__file__", str(tmp_path / "site-packages" / "rlhfkit" / "cli.py"))
    monkeypatch.chdir(tmp_path)
    result = CliRunner().invoke(app, ["bench"])
    assert result.exit_code == 2 and "benchmarks/__main__.py" in result.output and "repository root" in result.output


def test_bench_demo_reports_the_alignment_targets(bench):
    """bench_demo's alignment report: win rates with intervals, the targets met or missed, the RM's ceiling."""
    import bench_demo

    def win(rate, low):
        return {"gold": {"win_rate": rate, "low": low, "high": rate + 0.04}}

    summary = {"baseline": "sft",
               "models": {"sft": {"gold/score": 0.4, "gold/stderr": 0.01, "kl": 0.0, "gold/criteria": {"topic": 0.47}},
                          "ppo": {"gold/score": 0.5, "gold/stderr": 0.01, "kl": 1.2},
                          "dpo": {"gold/score": 0.45, "gold/stderr": 0.01, "kl": 0.5}},
               "win_rates": {"ppo": win(0.66, 0.61), "dpo": win(0.66, 0.59)},
               "reward_model": {"gold/accuracy": 0.62, "gold/pairs": 900, "labeler/accuracy": 0.66}}
    text = bench_demo.alignment_report(summary)
    assert "on topic 47%" in text and "win vs sft 66.0% [61.0%, 70.0%]" in text
    assert "target ppo: gold win rate >= 65 %, lower end >= 60 %: met" in text
    assert "target dpo: gold win rate >= 65 %, lower end >= 60 %: MISSED" in text  # its interval starts at 59 %
    assert "62.0% of 900 SFT sample pairs, the simulated labelers on 66.0%: within 3 points MISSED" in text
    assert "agree with each other" not in text
    summary["reward_model"].update({"gold/accuracy": 0.64, "labeler/inter_agreement": 0.6})
    text = bench_demo.alignment_report(summary)
    assert "within 3 points met" in text
    assert "agree with each other on 60.0% of those pairs (InstructGPT's labelers: 72.6 %)" in text


def test_bench_verifiable_reports_accuracy_and_the_paired_gain(bench, tmp_path):
    """bench_verifiable's report: accuracy with intervals over prompts, the gain over SFT on the same rows."""
    import json

    import bench_verifiable

    samples = tmp_path / "samples"
    samples.mkdir()
    prompts = [f"What is {i} + 1 + 1 + 1?" for i in range(1, 10)] * 2  # 9 prompts, 2 rows each
    golds = {"sft": [1.0] * 6 + [0.0] * 12, "grpo": [1.0] * 12 + [0.0] * 6}
    for model, gold in golds.items():
        (samples / f"{model}.jsonl").write_text("".join(json.dumps({"prompt": p, "completion": "", "gold": g}) + "\n"
                                                        for p, g in zip(prompts, gold, strict=True)))
    summary = {"models": {m: {"gold/criteria": {"shows_work": 0.25}} for m in golds}}
    text = bench_verifiable.accuracy_report(tmp_path, summary)
    assert "sft        accuracy  33.3%" in text and "grpo       accuracy  66.7%" in text
    assert "(18 answers, 9 prompts)" in text and "shows its work  25.0%" in text
    assert "grpo - sft: +33.3%" in text and "target >= +20%: met" in text
    (samples / "grpo.jsonl").write_text((samples / "sft.jsonl").read_text())
    assert "grpo - sft: +0.0% [+0.0%, +0.0%]   target >= +20%: MISSED" in bench_verifiable.accuracy_report(
        tmp_path, summary)
    (samples / "grpo.jsonl").write_text((samples / "sft.jsonl").read_text().replace("What", "Wat"))
    with pytest.raises(SystemExit, match="not evaluated on the same prompts"):
        bench_verifiable.accuracy_report(tmp_path, summary)
