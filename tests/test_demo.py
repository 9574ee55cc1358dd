"""End to end on the built-in task: pretrain -> SFT, judged by the gold judge."""

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
    assert len(samples) == 100 and {"prompt", "completion", "gold"} <= set(samples[0])
