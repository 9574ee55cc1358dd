"""How much of a reward model's held-out accuracy is length: its accuracy beside the "longer wins" and "shorter
wins" rules on the same pairs, on all of them and on the length-matched ones (replies within 20 % of each other's
length in words), each with a 95 % bootstrap interval over pairs; and the Spearman correlation of reward with length.

    python examples/hh-reward-model/length_report.py runs/examples/hh-reward-model/rm-minilm/test-scored.jsonl ...

Each file is `rlhfkit score`'s output on the held-out pairs (`reward_chosen` / `reward_rejected`); run.sh writes
them. A tie (equal rewards, equal lengths) counts as half right, as `rlhfkit score` counts it.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import pandas

from rlhfkit.evaluate.metrics import mean_interval

MATCHED = 0.2  # replies within 20 % of each other's length (in words) are length-matched


def right(a: float, b: float) -> float:
    """1 when ``a`` (the chosen reply's value) is above ``b``, 0.5 on a tie, else 0."""
    return 0.5 if a == b else float(a > b)


def report(path: Path) -> dict:
    rows = [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    words = [(len(r["chosen"].split()), len(r["rejected"].split())) for r in rows]
    outcomes = {
        "reward model": [right(r["reward_chosen"], r["reward_rejected"]) for r in rows],
        "longer wins": [right(c, j) for c, j in words],
        "shorter wins": [right(j, c) for c, j in words],
    }
    matched = [i for i, (c, j) in enumerate(words) if max(c, j) <= (1 + MATCHED) * min(c, j)]
    result: dict = {"file": str(path), "pairs": len(rows), "length_matched_pairs": len(matched)}
    for name, values in outcomes.items():
        result[name] = {"all": mean_interval(values), "length_matched": mean_interval([values[i] for i in matched])}
    rewards = pandas.Series([r[f"reward_{side}"] for r in rows for side in ("chosen", "rejected")])
    lengths = pandas.Series([n for pair in words for n in pair])
    result["spearman_reward_length"] = float(rewards.rank().corr(lengths.rank()))  # Spearman: Pearson of ranks
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("scored", nargs="+", type=Path, help="rlhfkit score outputs on held-out pairs")
    args = parser.parse_args()
    for path in args.scored:
        result = report(path)
        print(f"{result['file']}: {result['pairs']} pairs, {result['length_matched_pairs']} length-matched; "
              f"Spearman(reward, words) {result['spearman_reward_length']:+.2f}")
        for name in ("reward model", "longer wins", "shorter wins"):
            cells = [f"{part} {v['mean']:.3f} [{v['low']:.3f}, {v['high']:.3f}]"
                     for part, v in ((p, result[name][p]) for p in ("all", "length_matched"))]
            print(f"  {name:13s} " + "   ".join(cells))


if __name__ == "__main__":
    main()
