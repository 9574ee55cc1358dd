#!/usr/bin/env python
"""Wall time of the embedded default (``rlhfkit demo``), stage by stage; the target is 10 minutes.

    python benchmarks/bench_demo.py                 # the default demo in a temporary directory
    python benchmarks/bench_demo.py --set ppo.max_steps=50 --keep runs/bench-demo

Runs ``rlhfkit demo`` in a fresh process (the very command of the README), then prints the seconds of
every stage (from ``summary.json``), the whole command's wall time, the share of the CPUs other
processes used meanwhile (timings are only meaningful on a quiet machine), and the gold-judge scores.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import common  # noqa: E402

TARGET_S = 600


def _children_cpu() -> float:
    """CPU seconds used so far by this process's finished children (the demo command)."""
    times = os.times()
    return times.children_user + times.children_system


def alignment_report(summary: dict) -> str:
    """The demo's alignment figures and targets (issue "Alignment you can see") from its ``summary.json``:
    every model's gold score, topic rate, KL and gold win rate against SFT with its 95 % interval; PPO and
    DPO's target (win rate >= 65 %, interval's lower end >= 60 %); the reward model's agreement with the gold
    judge against the simulated labelers' own on the same pairs (target: within 3 points)."""
    lines = []
    for name, m in summary["models"].items():
        win = summary["win_rates"].get(name, {}).get("gold")
        topic = m.get("gold/criteria", {}).get("topic")
        lines.append(f"  {name:<10} gold {m['gold/score']:.3f} +/- {m['gold/stderr']:.3f}"
                     + (f"  on topic {topic:.0%}" if topic is not None else "")
                     + (f"  KL {m['kl']:.2f}" if "kl" in m else "")
                     + (f"  win vs {summary['baseline']} {win['win_rate']:.1%} [{win['low']:.1%}, {win['high']:.1%}]"
                        if win else ""))
    for name in ("ppo", "dpo"):
        win = summary["win_rates"].get(name, {}).get("gold")
        if win:
            met = win["win_rate"] >= 0.65 and win["low"] >= 0.60
            lines.append(f"target {name}: gold win rate >= 65 %, lower end >= 60 %: {'met' if met else 'MISSED'}")
    rm = summary.get("reward_model", {})
    if "labeler/accuracy" in rm:
        gap = rm["labeler/accuracy"] - rm["gold/accuracy"]
        lines.append(f"reward model agrees with gold on {rm['gold/accuracy']:.1%} of {rm['gold/pairs']} SFT sample "
                     f"pairs, the simulated labelers on {rm['labeler/accuracy']:.1%}: within 3 points "
                     f"{'met' if gap <= 0.03 else 'MISSED'}")
    if "labeler/inter_agreement" in rm:
        lines.append(f"two simulated labelers agree with each other on {rm['labeler/inter_agreement']:.1%} of those "
                     "pairs (InstructGPT's labelers: 72.6 %)")
    return "\n".join(lines)


def timed_demo(settings: list[str], out: Path) -> tuple[dict, float, float]:
    """Run ``rlhfkit demo`` with the ``--set`` overrides ``settings`` into ``out`` in a fresh process: its
    ``summary.json``, its wall seconds and the share of the CPUs other processes used meanwhile."""
    rlhfkit = Path(sys.executable).with_name("rlhfkit")
    command = [str(rlhfkit), "demo", "--set", f"out_dir={out}"] + [a for item in settings for a in ("--set", item)]
    machine, children = common.cpu_snapshot()[0], _children_cpu()
    started = time.perf_counter()
    proc = subprocess.run(command, capture_output=True, text=True)
    wall = time.perf_counter() - started
    demo_cpu = _children_cpu() - children
    other = max(0.0, common.cpu_snapshot()[0] - machine - demo_cpu) / (wall * (os.cpu_count() or 1))
    if proc.returncode != 0:
        sys.stderr.write(proc.stderr[-8000:])
        raise SystemExit(f"rlhfkit demo failed (exit {proc.returncode})")
    return json.loads((out / "summary.json").read_text(encoding="utf-8")), wall, other


def print_timings(summary: dict, wall: float, other: float) -> None:
    """Every stage's seconds, the command's wall time against :data:`TARGET_S`, and the other processes' load."""
    print(f"{'stage':<18} {'seconds':>8}")
    for stage, seconds in summary["seconds"].items():
        print(f"{stage:<18} {seconds:>8.1f}")
    print(f"{'command (wall)':<18} {wall:>8.1f}   target {TARGET_S} s: {'met' if wall <= TARGET_S else 'MISSED'}")
    print(f"other processes used {other:.0%} of the CPUs meanwhile")


def run_benchmark(description: str, fixed: list[str], report: Callable[[Path, dict], str]) -> None:
    """The command line of a demo benchmark: ``--set`` overrides (after ``fixed``) and ``--keep``; runs the demo
    (:func:`timed_demo`) and prints its timings and ``report(run_dir, summary)``."""
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--set", action="append", default=[], help="demo override, e.g. ppo.max_steps=50")
    parser.add_argument("--keep", help="run directory to keep (default: a temporary one, removed)")
    args = parser.parse_args()

    out = Path(args.keep) if args.keep else Path(tempfile.mkdtemp(prefix="bench_demo-")) / "demo"
    try:
        summary, wall, other = timed_demo([*fixed, *args.set], out)
        print_timings(summary, wall, other)
        print(report(out, summary))
    finally:
        if not args.keep:
            shutil.rmtree(out.parent, ignore_errors=True)


def main() -> None:
    run_benchmark(__doc__.split("\n\n")[0], [], lambda run, summary: alignment_report(summary))


if __name__ == "__main__":
    main()
