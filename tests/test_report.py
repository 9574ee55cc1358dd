"""The HTML report and the three-step illustration, on a small hand-written run directory."""

import base64
import json
import re

import pytest
from typer.testing import CliRunner

from rlhfkit import cli
from rlhfkit.data.readers import write_jsonl
from rlhfkit.evaluate.illustrate import illustrate, ranking_label
from rlhfkit.evaluate.report import write_report

PROMPT = "Write a short story about a goat."
STORY = "Ann was a goat. Ann had a home on a hill. Ann ate grass. The end."


@pytest.fixture
def run_dir(tmp_path, task):
    prompts = task.prompts(3, split="test", seed=0)
    write_jsonl(tmp_path / "data" / "sft_train.jsonl", [{"prompt": PROMPT, "completion": STORY}])
    write_jsonl(tmp_path / "data" / "rankings.jsonl", [
        {"prompt": "Is a duck a bird?", "completions": ["No.", "Yes. A duck is a bird.", "Yes.", "No."],
         "ranking": [[1], [2], [0, 3]]}])
    for stage, data in (("sft", "sft_train.jsonl"), ("rm", "rankings.jsonl")):  # the illustration reads these
        (tmp_path / stage).mkdir(exist_ok=True)
        (tmp_path / stage / "config.yaml").write_text(f"data:\n  train: {tmp_path / 'data' / data}\n")
    write_jsonl(tmp_path / "ppo" / "samples.jsonl", [
        {"step": step, "prompt": PROMPT, "completion": f"Ann was a goat {step}. The end.", "score": 0.1 * step}
        for step in (1, 2, 3)])
    write_jsonl(tmp_path / "ppo" / "metrics.jsonl", [
        {"stage": "ppo", "step": s, "objective/scores": 0.1 * s, "objective/kl": 0.05 * s} for s in (1, 2, 3)])
    sft_rows = [{"stage": "sft", "step": s, "loss": 3.0 / s} for s in (1, 2, 3)]
    evals = [{"stage": "sft", "step": 0, "eval/loss": 3.0}, {"stage": "sft", "step": 3, "eval/loss": 1.2}]
    write_jsonl(tmp_path / "sft" / "metrics.jsonl", evals[:1] + sft_rows + evals[1:])
    models = {}
    for name, gold, kl in (("sft", 0.3, 0.0), ("ppo@1", 0.35, 1.0), ("ppo", 0.4, 2.0), ("dpo", 0.38, 1.5)):
        models[name] = {"gold/score": gold, "gold/stderr": 0.01, "rm/score": gold - 0.3, "kl": kl,
                        "eos_rate": 1.0, "length/tokens": 20.0, "distinct/1": 0.3, "distinct/2": 0.5,
                        "heldout/ppl": 3.0 + kl, "gold/criteria": {"topic": 0.5 + kl / 10, "length": 1.0}}
        if "@" not in name:
            write_jsonl(tmp_path / "samples" / f"{name}.jsonl",
                        [{"prompt": p, "completion": f"<{name}> answer & more", "gold": gold} for p in prompts])
    wins = {"win_rate": 0.6, "low": 0.5, "high": 0.7, "wins": 6, "ties": 0, "losses": 4}
    summary = {"task": "tinyworld", "eval_prompts": 3, "baseline": "sft", "models": models,
               "win_rates": {n: {"gold": wins, "rm": wins} for n in models if n != "sft"},
               "reward_model": {"gold/accuracy": 0.65, "gold/pairs": 100, "labeler/accuracy": 0.68}}
    (tmp_path / "summary.json").write_text(json.dumps(summary))
    return tmp_path


def test_ranking_label_names_outputs_with_letters_and_ties_with_equals():
    assert ranking_label([[3], [2], [0, 1]]) == "D > C > A = B"
    assert ranking_label(((1,), (0,))) == "B > A"


def test_report_is_self_contained_with_every_section(run_dir):
    page = write_report(run_dir).read_text()
    assert page.startswith("<!DOCTYPE html>") and "src='http" not in page and "<script" not in page
    for title in ("Models", "Gold score", "Training curves", "Reward over-optimisation", "Reward vs KL frontier",
                  "Samples side by side"):
        assert f"<h2>{title}</h2>" in page, title
    images = re.findall(r"data:image/png;base64,([A-Za-z0-9+/=]+)", page)
    assert len(images) == 4 and all(base64.b64decode(i).startswith(b"\x89PNG") for i in images)
    assert "60.0% [50.0%, 70.0%]" in page  # win rate with its interval
    assert "&lt;ppo&gt; answer &amp; more" in page  # samples are escaped, side by side
    assert "65.0% of 100 pairs" in page and "68.0% of the same pairs" in page  # the RM and its ceiling
    assert "<th>on topic</th>" in page and "<td>70%</td>" in page  # PPO's topic criterion rate
    assert "<th>held-out ppl</th>" in page and "<td>5.00</td>" in page  # PPO's alignment tax column


def test_illustration_shows_the_runs_examples(run_dir, tmp_path):
    svg, png = illustrate(run_dir, tmp_path / "out")
    text = svg.read_text()
    assert png.read_bytes().startswith(b"\x89PNG") and png.stat().st_size > 20_000
    for expected in ("Step 1", "Step 2", "Step 3", PROMPT, "Is a duck a bird?", "B &gt; C &gt; A = D", "r = 0.30",
                     "Ann had a home on a hill."):
        assert expected in text, expected


def test_report_and_illustrate_commands(run_dir, tmp_path):
    runner = CliRunner()
    assert runner.invoke(cli.app, ["report", str(run_dir)]).exit_code == 0
    assert (run_dir / "report.html").exists()
    assert runner.invoke(cli.app, ["illustrate", str(run_dir)]).exit_code == 0
    assert (run_dir / "illustration.svg").exists() and (run_dir / "illustration.png").exists()
    empty = tmp_path / "empty"
    empty.mkdir()
    for command in ("report", "illustrate"):
        result = runner.invoke(cli.app, [command, str(empty)])
        assert result.exit_code == 2 and "not found" in result.output, result.output


def test_report_renders_in_a_real_browser(run_dir, tmp_path):
    """Headless Chromium loads the page and paints its embedded plots (Debian's chromium; .ci/run installs it)."""
    import shutil
    import subprocess

    import numpy as np
    from PIL import Image

    browser = shutil.which("chromium") or shutil.which("chromium-browser") or shutil.which("google-chrome")
    if browser is None:
        pytest.skip("no Chromium on this machine (.ci/run installs Debian's chromium)")
    page, shot = write_report(run_dir), tmp_path / "report.png"
    subprocess.run([browser, "--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars",
                    "--window-size=1280,2400", f"--screenshot={shot}", page.resolve().as_uri()],
                   capture_output=True, timeout=120, check=True)
    pixels = np.asarray(Image.open(shot).convert("RGB"), dtype=np.int16)
    assert pixels.shape == (2400, 1280, 3)
    # matplotlib's default blue (the gold-score bars and curves) only appears if the PNGs were decoded
    blue = int((np.abs(pixels - np.array([31, 119, 180])).max(axis=-1) < 12).sum())
    assert blue > 2000, blue
    assert (pixels != 255).any(axis=-1).mean() > 0.05  # not a blank page


def test_the_illustration_draws_a_ranking_not_a_pair_set(run_dir):
    from rlhfkit.data.records import DataError

    pair_sets = [{"prompt": "Q", "completions": ["a", "b", "c"], "pairs": [[0, 1, 1], [1, 2, 0]]}]
    write_jsonl(run_dir / "data" / "rankings.jsonl", pair_sets)
    with pytest.raises(DataError, match="no ranking to draw"):
        illustrate(run_dir)
    ranking = {"prompt": "Is a duck a bird?", "completions": ["No.", "Yes."], "ranking": [1, 0]}
    write_jsonl(run_dir / "data" / "rankings.jsonl", [*pair_sets, ranking])
    svg, _ = illustrate(run_dir)
    assert "B &gt; A" in svg.read_text()
