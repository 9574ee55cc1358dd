"""End to end on the built-in task: pretrain -> SFT, judged by the gold judge (about a minute)."""

import json

import pytest

from rlhfkit.pipeline import DemoConfig, run_demo
from rlhfkit.trainers.base import read_metrics


@pytest.mark.slow
def test_sft_beats_base_model_on_held_out_prompts(tmp_path):
    config = DemoConfig(out_dir=str(tmp_path), hidden_size=64, num_hidden_layers=2, vocab_size=512,
                        corpus_docs=800, sft_prompts=600, sft_eval_prompts=64, eval_prompts=80,
                        pretrain={"max_steps": 150, "lr": 3e-3}, sft={"max_steps": 150, "lr": 2e-3})
    summary = run_demo(config)

    sft_eval = [r["eval/loss"] for r in read_metrics(tmp_path / "sft") if "eval/loss" in r]
    assert sft_eval[-1] < sft_eval[0] - 0.3, sft_eval  # SFT lowers the held-out loss
    base, sft = summary["models"]["pretrain"], summary["models"]["sft"]
    assert sft["gold/score"] > base["gold/score"] + 0.2, summary
    assert sft["eos_rate"] > 0.8, summary  # it learned to end its answers
    assert json.loads((tmp_path / "summary.json").read_text()) == summary
    samples = [json.loads(line) for line in (tmp_path / "samples" / "sft.jsonl").read_text().splitlines()]
    assert len(samples) == 80 and {"prompt", "completion", "gold"} <= set(samples[0])
