"""rlhfkit against TRL, every stage in one run: ``python -m benchmarks``.

    python -m benchmarks                                  # SFT, RM, DPO, PPO, GRPO; tiny and small; 3 pairs each
    python -m benchmarks --stages sft dpo --sizes small --pairs 5 --json bench.json --markdown bench.md
    python -m benchmarks --make-trl-ppo-env               # once: trl 1.12 (TRL's last PPO) in .trl112

Each stage is its own benchmark script (``bench_sft.py``, ``bench_rm.py``, ``bench_dpo.py``, ``bench_ppo.py``,
``bench_grpo.py``; their docstrings say what "the same work" means there): a parity check first (the same
first-step loss on the same batch, or the run stops), then runs alternated rlhfkit / TRL in fresh
processes. This command runs them one after another, measures the fp32 matmul FLOP/s torch reaches on
this machine before and after (the best of the two), and prints one table: seconds per optimizer step
(PPO and GRPO: per iteration too, rollout included), tokens/s, peak RSS, the rlhfkit/TRL ratios (medians
of the per-pair ratios), rlhfkit's model-FLOP utilisation, and each target of the project.

TRL's PPO trainer was last shipped in trl 1.12.0: TRL's PPO runs put a directory holding it first on their
path (``--trl-ppo-path``, default ``.trl112``; ``--make-trl-ppo-env`` installs it there, without its
dependencies: torch, transformers and the rest are this environment's). Without it the PPO row is skipped
with the reason.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from dataclasses import asdict, dataclass
from datetime import datetime, timezone
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

import common  # noqa: E402

STAGES = ("sft", "rm", "dpo", "ppo", "grpo")
SIZES = ("tiny", "small")
TRL_PPO_PATH = HERE.parent / ".trl112"
#: the project's speed targets (rlhfkit / TRL, medians of paired runs), per stage and setting
SPEED_TARGETS = {("sft", ""): 1.0, ("rm", "K=4"): 1.5, ("dpo", "ref"): 1.2, ("dpo", "precompute"): 2.0,
                 ("ppo", ""): 1.5, ("grpo", ""): 1.2, ("ppo", "bf16"): 1.5, ("grpo", "bf16"): 1.2}
MFU_TARGET = 0.40  # training steps on the ~10M (small) model
RSS_TARGET = 1.0   # peak RSS at most TRL's
#: per stage: the rate (higher is faster) whose rlhfkit/TRL ratio is the speed, and what it counts
SPEED_KEYS = {"sft": ("tokens_per_s", "tokens/s (prompt + completion)"), "rm": ("comparisons_per_s", "comparisons/s"),
              "dpo": ("steps_per_s", "steps/s (8 pairs each)"), "ppo": ("iterations_per_s", "iterations/s"),
              "grpo": ("iterations_per_s", "iterations/s")}


@dataclass
class Row:
    stage: str
    setting: str
    size: str
    rlhfkit_s_per_step: float
    trl_s_per_step: float
    rlhfkit_s_per_iteration: float | None
    trl_s_per_iteration: float | None
    rlhfkit_tokens_per_s: float
    trl_tokens_per_s: float
    speed: float
    speed_unit: str
    rlhfkit_rss_mib: float
    trl_rss_mib: float
    rss_ratio: float
    mfu: float | None
    target: float | None
    pairs: int
    max_other_cpu: float

    def checks(self) -> list[str]:
        """What this row misses of the targets (empty: all met)."""
        missed = []
        if self.target is not None and self.speed < self.target:
            missed.append(f"speed {self.speed:.2f}x < {self.target:g}x")
        if self.rss_ratio > RSS_TARGET:
            missed.append(f"RSS {self.rss_ratio:.2f}x > {RSS_TARGET:g}x")
        if self.size == "small" and self.stage in ("sft", "rm", "dpo") and self.mfu is not None \
                and self.mfu < MFU_TARGET:
            missed.append(f"MFU {self.mfu:.0%} < {MFU_TARGET:.0%}")
        return missed


# ---- the stage benchmarks --------------------------------------------------------------------------------
def stage_command(stage: str, args, json_path: Path) -> list[str] | None:
    """The command line of one stage's benchmark (None: skipped, the reason printed)."""
    command = [sys.executable, str(HERE / f"bench_{stage}.py"), "--sizes", *args.sizes, "--pairs", str(args.pairs),
               "--json", str(json_path)]
    if args.threads:
        command += ["--threads", str(args.threads)]
    if args.quick:  # a smoke run: a few steps, no waiting for a quiet machine
        steps = {"sft": 3, "rm": 3, "dpo": 3, "ppo": 2, "grpo": 2}[stage]
        command += ["--steps-tiny", str(steps), "--steps-small", str(steps), "--warmup", "1"]
    if stage == "dpo":
        command += ["--variants", "ref", "precompute"]
    if stage in ("ppo", "grpo"):
        command += ["--mixed-precision", args.mixed_precision]
    if stage == "ppo":
        path = Path(args.trl_ppo_path or TRL_PPO_PATH)
        if not (path / "trl").is_dir():
            print(f"ppo: skipped: TRL's PPO needs trl 1.12 in {path}; run `python -m benchmarks --make-trl-ppo-env` "
                  "once, or pass --trl-ppo-path", flush=True)
            return None
        command += ["--trl-path", str(path)]
    return command


def make_trl_ppo_env() -> None:
    """trl 1.12.0 alone (``--no-deps``) in ``.trl112``: TRL's PPO runs put it first on their path and use this
    environment's torch and transformers, the same files as rlhfkit's runs (so nothing else is downloaded)."""
    subprocess.run([sys.executable, "-m", "pip", "install", "--quiet", "--no-deps", "--target", str(TRL_PPO_PATH),
                    "trl==1.12.0"], check=True)
    print(f"installed trl 1.12.0 in {TRL_PPO_PATH}")


# ---- one table from the stages' results --------------------------------------------------------------------
def _median(runs: list[dict], lib: str, key: str) -> float:
    return common.median([r[key] for r in runs if r["lib"] == lib])


def row_of(stage: str, setting: str, size: str, runs: list[dict], peak_flops: float) -> Row:
    for run in runs:  # PPO and GRPO time iterations; their speed is iterations per second
        if "s_per_iteration" in run:
            run["iterations_per_s"] = 1 / run["s_per_iteration"]
    key, unit = SPEED_KEYS[stage]
    pairs = common.paired(runs)
    flops = [r["model_flops_per_s"] for r in runs if r["lib"] == "rlhfkit" and "model_flops_per_s" in r]
    iterations = "s_per_iteration" in runs[0]
    return Row(
        stage=stage, setting=setting, size=size,
        rlhfkit_s_per_step=_median(runs, "rlhfkit", "s_per_step"), trl_s_per_step=_median(runs, "trl", "s_per_step"),
        rlhfkit_s_per_iteration=_median(runs, "rlhfkit", "s_per_iteration") if iterations else None,
        trl_s_per_iteration=_median(runs, "trl", "s_per_iteration") if iterations else None,
        rlhfkit_tokens_per_s=_median(runs, "rlhfkit", "tokens_per_s"),
        trl_tokens_per_s=_median(runs, "trl", "tokens_per_s"),
        speed=common.median([a[key] / b[key] for a, b in pairs]), speed_unit=unit,
        rlhfkit_rss_mib=_median(runs, "rlhfkit", "peak_rss_mib"), trl_rss_mib=_median(runs, "trl", "peak_rss_mib"),
        rss_ratio=common.median([a["peak_rss_mib"] / b["peak_rss_mib"] for a, b in pairs]),
        mfu=common.median(flops) / peak_flops if flops else None,
        target=SPEED_TARGETS.get((stage, setting)), pairs=len(pairs),
        max_other_cpu=max(r.get("other_cpu", 0.0) for r in runs))


def rows_of(stage: str, result: dict, peak_flops: float, k: int | None = None) -> list[Row]:
    rows = []
    for size, entry in result["results"].items():
        if stage == "dpo":
            rows += [row_of(stage, variant, size, e["runs"], peak_flops) for variant, e in entry.items()]
        else:
            setting = {"rm": f"K={k}"}.get(stage, "bf16" if result["meta"].get("mixed_precision") == "bf16" else "")
            rows.append(row_of(stage, setting, size, entry["runs"], peak_flops))
    return rows


def table(rows: list[Row]) -> str:
    header = ("| stage | size | rlhfkit s/step | TRL s/step | rlhfkit tokens/s | TRL tokens/s | speed (rlhfkit/TRL) "
              "| peak RSS rlhfkit / TRL | rlhfkit MFU | target |")
    lines = [header, "|" + "---|" * (header.count("|") - 1)]
    for r in rows:
        name = f"{r.stage} {r.setting}".strip()
        step = f"{r.rlhfkit_s_per_step:.4f}"
        trl_step = f"{r.trl_s_per_step:.4f}"
        if r.rlhfkit_s_per_iteration is not None:
            step += f" ({r.rlhfkit_s_per_iteration:.3f}/iter)"
            trl_step += f" ({r.trl_s_per_iteration:.3f}/iter)"
        missed = r.checks()
        target = (f"{r.target:g}x" if r.target is not None else "-") + (": " + "; ".join(missed) if missed else
                                                                        ": met")
        mfu = f"{r.mfu:.0%}" if r.mfu is not None else "-"
        lines.append(f"| {name} | {r.size} | {step} | {trl_step} | {r.rlhfkit_tokens_per_s:.0f} | "
                     f"{r.trl_tokens_per_s:.0f} | **{r.speed:.2f}x** | {r.rlhfkit_rss_mib:.0f} / {r.trl_rss_mib:.0f} "
                     f"MiB ({r.rss_ratio:.2f}x) | {mfu} | {target} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m benchmarks", description=__doc__.split("\n\n")[0])
    parser.add_argument("--stages", nargs="+", default=list(STAGES), choices=STAGES)
    parser.add_argument("--sizes", nargs="+", default=list(SIZES), choices=SIZES)
    parser.add_argument("--pairs", type=int, default=3, help="rlhfkit/TRL run pairs per stage and size")
    parser.add_argument("--threads", type=int, help="torch threads in every run and in the matmul peak "
                                                    "(default: torch's, one per core)")
    parser.add_argument("--trl-ppo-path", help="a directory holding trl 1.12 for TRL's PPO runs (default: .trl112)")
    parser.add_argument("--make-trl-ppo-env", action="store_true", help="install trl 1.12 in .trl112 and exit")
    parser.add_argument("--mixed-precision", choices=("no", "bf16"), default="no",
                        help="PPO and GRPO: 'bf16' autocast in both libraries (default: fp32)")
    parser.add_argument("--quick", action="store_true", help="a smoke run: 1 warm-up + a few timed steps per run")
    parser.add_argument("--out", default="runs/bench", help="each stage's raw results, <stage>.json, go here")
    parser.add_argument("--json", help="write the rows, every stage's raw results and the machine to this file")
    parser.add_argument("--markdown", help="write the table (markdown) and the machine to this file")
    args = parser.parse_args()
    if args.make_trl_ppo_env:
        make_trl_ppo_env()
        return
    for key, value in common.CHILD_ENV.items():
        os.environ.setdefault(key, value)

    started = time.perf_counter()
    peaks = [common.matmul_flops_per_s(threads=args.threads)]
    print(f"fp32 matmul (2048 x 2048, torch {'default' if not args.threads else args.threads} threads): "
          f"{peaks[0] / 1e9:.1f} GFLOP/s", flush=True)
    raw: dict[str, dict] = {}
    failed: list[str] = []
    out_dir = Path(args.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    for stage in args.stages:
        json_path = out_dir / f"{stage}.json"  # kept: a later stage's failure loses nothing measured
        command = stage_command(stage, args, json_path)
        if command is None:
            continue
        print(f"\n==== {stage}: {' '.join(Path(c).name if i < 2 else c for i, c in enumerate(command))}", flush=True)
        if subprocess.run(command).returncode != 0:
            print(f"{stage}: its benchmark failed (see above); going on with the other stages", flush=True)
            failed.append(stage)
            continue
        raw[stage] = json.loads(json_path.read_text(encoding="utf-8"))
    peaks.append(common.matmul_flops_per_s(threads=args.threads))
    peak = max(peaks)
    rows = [row for stage, result in raw.items()
            for row in rows_of(stage, result, peak, k=result["meta"].get("k"))]
    machine = {"date": datetime.now(timezone.utc).isoformat(timespec="seconds"), "cpu": common.cpu_model(),
               "cpus": os.cpu_count(), "threads": args.threads or "torch default",
               "matmul_gflops": [p / 1e9 for p in peaks],
               "versions": common.versions("torch", "transformers", "trl", "accelerate", "peft", "rlhfkit"),
               "trl_ppo": raw.get("ppo", {}).get("meta", {}).get("trl"), "pairs": args.pairs, "quick": args.quick,
               "mixed_precision": args.mixed_precision}
    text = table(rows)
    notes = [f"{machine['date']}, {machine['cpu']} ({machine['cpus']} CPUs), torch threads {machine['threads']}; "
             + ", ".join(f"{k} {v}" for k, v in machine["versions"].items())
             + (f"; PPO against trl {machine['trl_ppo']}" if machine["trl_ppo"] else ""),
             f"fp32 matmul peak {peak / 1e9:.1f} GFLOP/s (the best of {len(peaks)} measurements: "
             + ", ".join(f"{p / 1e9:.1f}" for p in peaks) + "); MFU = rlhfkit's model FLOP/s over it "
             "(rlhfkit.models.flops; PPO/GRPO: the whole iteration, generation included)",
             "speed: " + "; ".join(f"{stage} {unit}" for stage, (_, unit) in SPEED_KEYS.items() if stage in raw)
             + f"; medians of {args.pairs} alternated pairs; targets: speed as listed, peak RSS <= TRL's, "
             f"MFU >= {MFU_TARGET:.0%} for SFT, RM and DPO on the small model"]
    busy = max((r.max_other_cpu for r in rows), default=0.0)
    if busy > 0.10:
        notes.append(f"WARNING: other processes used up to {busy:.0%} of the CPUs during timed runs: re-run on a "
                     "quiet machine before trusting the figures")
    if failed:
        notes.append(f"FAILED (no row): {', '.join(failed)}")
    print("\n" + text + "\n\n" + "\n".join(notes))
    print(f"\ntotal {time.perf_counter() - started:.0f} s")
    if args.json:
        Path(args.json).write_text(json.dumps({"machine": machine, "rows": [asdict(r) for r in rows], "raw": raw},
                                              indent=1), encoding="utf-8")
    if args.markdown:
        Path(args.markdown).write_text(text + "\n\n" + "\n".join(f"- {n}" for n in notes) + "\n", encoding="utf-8")
    if failed:
        raise SystemExit(1)


if __name__ == "__main__":
    main()
