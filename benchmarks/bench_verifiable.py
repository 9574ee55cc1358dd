#!/usr/bin/env python
"""The verifiable-task recipe (``rlhfkit demo --set task=sums``): pretrain -> SFT -> GRPO on the exact answer.

    python benchmarks/bench_verifiable.py                  # in a temporary directory
    python benchmarks/bench_verifiable.py --set grpo.max_steps=100 --keep runs/bench-sums

Runs the demo command on the ``sums`` task in a fresh process, then prints the seconds of every stage, the
command's wall time (target: 10 minutes on 2 cores) and every model's held-out accuracy (the gold judge: the
answer is exactly right) with its 95 % interval, bootstrapped over the held-out prompts, and GRPO's gain over
SFT with a paired interval on the same prompts (target: at least 20 points).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_demo import run_benchmark  # noqa: E402

from rlhfkit.evaluate.metrics import mean_interval  # noqa: E402

TARGET_GAIN = 0.20


def _rows(run: Path, model: str) -> list[dict]:
    return [json.loads(line) for line in (run / "samples" / f"{model}.jsonl").read_text(encoding="utf-8").splitlines()]


def accuracy_report(run: Path, summary: dict, baseline: str = "sft", tuned: str = "grpo") -> str:
    """Each model's accuracy and share of answers that show the work, with 95 % intervals over prompts, and the
    paired gain of ``tuned`` over ``baseline`` on the same rows against :data:`TARGET_GAIN`."""
    lines = []
    for model in summary["models"]:
        rows = _rows(run, model)
        prompts = [r["prompt"] for r in rows]
        accuracy = mean_interval([r["gold"] for r in rows], groups=prompts)
        work = summary["models"][model]["gold/criteria"]["shows_work"]
        lines.append(f"  {model:<10} accuracy {accuracy['mean']:6.1%} [{accuracy['low']:.1%}, {accuracy['high']:.1%}]"
                     f"  shows its work {work:6.1%}  ({len(rows)} answers, {len(set(prompts))} prompts)")
    before, after = _rows(run, baseline), _rows(run, tuned)
    if [r["prompt"] for r in before] != [r["prompt"] for r in after]:
        raise SystemExit(f"{baseline} and {tuned} were not evaluated on the same prompts")
    gain = mean_interval([b["gold"] - a["gold"] for a, b in zip(before, after, strict=True)],
                         groups=[r["prompt"] for r in before])
    met = gain["mean"] >= TARGET_GAIN
    lines.append(f"{tuned} - {baseline}: {gain['mean']:+.1%} [{gain['low']:+.1%}, {gain['high']:+.1%}]   "
                 f"target >= +{TARGET_GAIN:.0%}: {'met' if met else 'MISSED'}")
    return "\n".join(lines)


def main() -> None:
    run_benchmark(__doc__.split("\n\n")[0], ["task=sums"], accuracy_report)


if __name__ == "__main__":
    main()
