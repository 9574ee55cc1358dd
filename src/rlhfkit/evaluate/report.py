"""``report.html`` of a pipeline run: one self-contained page (PNG plots embedded as data URIs).

Sections: the models judged on held-out prompts (gold score, win rates with bootstrap intervals, reward
model score, KL to SFT); the training curves of every stage; reward over-optimisation (the proxy reward
model's score against the gold score of PPO's rollouts over training, as in Gao et al. 2022); the
best-of-n and PPO study of ``examples/overoptimisation`` when the run holds its ``study.json``; the
reward-vs-KL frontier of the PPO and DPO checkpoints (as in the DPO paper's figure 2); side-by-side
samples of SFT, PPO and DPO for the same prompts.
"""

from __future__ import annotations

import base64
import html
import io
import json
from collections import defaultdict
from datetime import datetime, timezone
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # no display needed; must precede pyplot
import matplotlib.pyplot as plt  # noqa: E402

from rlhfkit.engine.metrics import read_metrics  # noqa: E402
from rlhfkit.evaluate.compare import comparison_rows  # noqa: E402
from rlhfkit.evaluate.metrics import standard_error  # noqa: E402

STAGES = ("pretrain", "sft", "rm", "ppo", "dpo")
SIDE_BY_SIDE = ("sft", "ppo", "dpo")


def _png(figure) -> str:
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=100, bbox_inches="tight")
    plt.close(figure)
    return base64.b64encode(buffer.getvalue()).decode("ascii")


def _curves(run_dir: Path) -> str | None:
    """One panel per stage: its training loss (PPO: the reward-model score and the KL)."""
    stages = [s for s in STAGES if (run_dir / s / "metrics.jsonl").exists()]
    if not stages:
        return None
    figure, axes = plt.subplots(1, len(stages), figsize=(3.6 * len(stages), 3.0), squeeze=False)
    for ax, stage in zip(axes[0], stages, strict=True):
        rows = read_metrics(run_dir / stage)
        if stage == "ppo":
            steps = [r["step"] for r in rows if "objective/scores" in r]
            ax.plot(steps, [r["objective/scores"] for r in rows if "objective/scores" in r], label="RM score")
            ax.plot(steps, [r["objective/kl"] for r in rows if "objective/kl" in r], label="KL to SFT")
            ax.set_xlabel("PPO iteration")
            ax.legend(fontsize=8)
        else:
            train = [r for r in rows if "loss" in r]
            ax.plot([r["step"] for r in train], [r["loss"] for r in train], label="train loss")
            evals = [r for r in rows if "eval/loss" in r]
            if evals:
                ax.plot([r["step"] for r in evals], [r["eval/loss"] for r in evals], "o--", label="eval loss")
                ax.legend(fontsize=8)
            ax.set_xlabel("step")
        ax.set_title(stage)
    figure.tight_layout()
    return _png(figure)


def _overoptimisation(run_dir: Path, task) -> str | None:
    """Proxy (reward model) and gold score of PPO's logged rollouts over training.

    Each iteration's rollout is a few dozen prompts, so its mean is noisy (a standard error of ~0.04 in
    gold for 64 prompts): the lines are means over a sliding window of ``window`` iterations, the band
    their 95 % interval (+-1.96 standard errors of the pooled samples). The rollouts' prompts are PPO's
    training prompts, not the held-out ones of the model table: compare the trend, not the level.
    """
    path = run_dir / "ppo" / "samples.jsonl"
    if task is None or not path.exists():
        return None
    proxy, gold = defaultdict(list), defaultdict(list)
    for line in path.read_text(encoding="utf-8").splitlines():
        row = json.loads(line)
        proxy[row["step"]].append(row["score"])
        gold[row["step"]].append(task.gold_score(row["prompt"], row["completion"]))
    steps = sorted(proxy)
    window = max(1, min(5, len(steps) // 6))
    figure, ax = plt.subplots(figsize=(5.5, 3.4))
    twin = ax.twinx()
    for axis, values, color, label in ((ax, proxy, "tab:blue", "reward model (proxy)"),
                                       (twin, gold, "tab:green", "gold judge")):
        means, halves = [], []
        for i in range(len(steps)):
            pooled = [v for s in steps[max(0, i - window + 1):i + 1] for v in values[s]]
            means.append(sum(pooled) / len(pooled))
            halves.append(1.96 * standard_error(pooled))
        axis.plot(steps, means, color=color, label=label)
        axis.fill_between(steps, [m - h for m, h in zip(means, halves, strict=True)],
                          [m + h for m, h in zip(means, halves, strict=True)], color=color, alpha=0.2)
    ax.set_xlabel("PPO iteration")
    ax.set_ylabel("reward-model score")
    twin.set_ylabel("gold score")
    figure.legend(loc="lower right", fontsize=8)
    ax.set_title(f"PPO rollouts (training prompts): proxy vs gold, {window}-iteration means, 95 % band",
                 fontsize=9)
    figure.tight_layout()
    return _png(figure)


def _frontier(summary: dict) -> str | None:
    """Gold score (and reward-model score) against the KL to SFT of every evaluated checkpoint."""
    models = {name: m for name, m in summary["models"].items() if "kl" in m and name != "pretrain"}
    if len(models) < 2:
        return None
    figure, axes = plt.subplots(1, 2, figsize=(10, 3.6))
    for ax, key, label in ((axes[0], "gold/score", "gold score"), (axes[1], "rm/score", "reward-model score")):
        for family, marker in (("sft", "s"), ("ppo", "o"), ("dpo", "^")):
            points = sorted((m["kl"], m[key]) for name, m in models.items()
                            if name.split("@")[0] == family and key in m)
            if points:
                ax.plot([p[0] for p in points], [p[1] for p in points], marker=marker, label=family)
        for name, m in models.items():
            if key in m:
                ax.annotate(name, (m["kl"], m[key]), fontsize=7, xytext=(3, 3), textcoords="offset points")
        ax.set_xlabel("KL to SFT (nats per sample)")
        ax.set_ylabel(label)
        ax.legend(fontsize=8)
    figure.suptitle("reward vs KL: checkpoints of PPO and DPO")
    figure.tight_layout()
    return _png(figure)


def _overoptimisation_study(run_dir: Path) -> str | None:
    """The figure of ``examples/overoptimisation/study.py`` (best-of-n and PPO: gold and proxy against
    sqrt(KL), with Gao et al. 2022's fitted curves) when the run holds its ``overoptimisation/study.json``."""
    path = run_dir / "overoptimisation" / "study.json"
    if not path.exists():
        return None
    from rlhfkit.evaluate.overoptimisation import study_figure

    return _png(study_figure(json.loads(path.read_text(encoding="utf-8"))))


def _gold_bars(summary: dict) -> str | None:
    models = {name: m for name, m in summary["models"].items() if "gold/score" in m and "@" not in name}
    if not models:
        return None
    figure, ax = plt.subplots(figsize=(5, 3.2))
    ax.bar(list(models), [m["gold/score"] for m in models.values()],
           yerr=[m["gold/stderr"] for m in models.values()], capsize=4, color="tab:blue")
    ax.set_ylabel("gold score")
    ax.set_title(f"gold judge on {summary['eval_prompts']} held-out prompts")
    figure.tight_layout()
    return _png(figure)


def _models_table(summary: dict) -> str:
    headers, rows = comparison_rows(summary)
    cells = "".join("<tr>" + "".join(f"<td>{html.escape(c)}</td>" for c in row) + "</tr>" for row in rows)
    return "<table><tr>" + "".join(f"<th>{html.escape(h)}</th>" for h in headers) + "</tr>" + cells + "</table>"


def _side_by_side(run_dir: Path, n: int) -> str:
    samples = {}
    for name in SIDE_BY_SIDE:
        path = run_dir / "samples" / f"{name}.jsonl"
        if path.exists():
            samples[name] = [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()[:n]]
    if not samples:
        return "<p>No samples.</p>"
    names = list(samples)
    out = ["<table class='samples'><tr><th>prompt</th>" + "".join(f"<th>{n}</th>" for n in names) + "</tr>"]
    for i, first in enumerate(samples[names[0]]):
        cells = []
        for name in names:
            row = samples[name][i]
            score = f"<div class='score'>gold {row['gold']:.2f}</div>" if "gold" in row else ""
            cells.append(f"<td>{html.escape(row['completion'])}{score}</td>")
        out.append(f"<tr><td class='prompt'>{html.escape(str(first['prompt']))}</td>{''.join(cells)}</tr>")
    return "".join(out) + "</table>"


STYLE = """
body { font-family: system-ui, sans-serif; margin: 2em auto; max-width: 1200px; color: #222; }
table { border-collapse: collapse; margin: 1em 0; font-size: 14px; }
th, td { border: 1px solid #ccc; padding: 4px 8px; vertical-align: top; text-align: left; }
th { background: #f0f4f8; }
td.prompt { background: #e8f5e9; font-weight: 500; }
div.score { color: #555; font-size: 12px; margin-top: 4px; }
img { max-width: 100%; display: block; margin: 0.5em 0 1.5em; }
"""


def write_report(run_dir: str | Path, *, samples: int = 8) -> Path:
    """Write ``report.html`` into ``run_dir`` (a pipeline run with ``summary.json``); return its path."""
    from rlhfkit.tasks import get_task

    run_dir = Path(run_dir)
    summary_path = run_dir / "summary.json"
    if not summary_path.exists():
        raise FileNotFoundError(f"{summary_path}: not found; run the pipeline (rlhfkit demo) first")
    summary = json.loads(summary_path.read_text(encoding="utf-8"))
    try:
        task = get_task(summary["task"])
    except (KeyError, ValueError):
        task = None
    sections = [f"<h1>rlhfkit run: {html.escape(str(run_dir))}</h1>",
                f"<p>task <b>{html.escape(str(summary.get('task')))}</b>, {summary['eval_prompts']} held-out "
                f"prompts; written {datetime.now(timezone.utc):%Y-%m-%d %H:%M} UTC</p>",
                "<h2>Models</h2>", _models_table(summary)]
    if "reward_model" in summary:
        rm = summary["reward_model"]
        ceiling = (f"; the simulated labelers whose rankings it learnt from order {rm['labeler/accuracy']:.1%} of "
                   "the same pairs as the gold judge does (its ceiling)" if "labeler/accuracy" in rm else "")
        sections.append(f"<p>The reward model orders {rm['gold/accuracy']:.1%} of {rm['gold/pairs']} pairs of "
                        f"fresh SFT samples of held-out prompts as the gold judge does{ceiling}.</p>")
    plots = (("Gold score", _gold_bars(summary)), ("Training curves", _curves(run_dir)),
             ("Reward over-optimisation", _overoptimisation(run_dir, task)),
             ("Reward over-optimisation study", _overoptimisation_study(run_dir)),
             ("Reward vs KL frontier", _frontier(summary)))
    for title, png in plots:
        if png is not None:
            sections.append(f"<h2>{title}</h2><img alt='{title}' src='data:image/png;base64,{png}'>")
    sections += ["<h2>Samples side by side</h2>", _side_by_side(run_dir, samples)]
    page = (f"<!DOCTYPE html><html><head><meta charset='utf-8'><title>rlhfkit report</title>"
            f"<style>{STYLE}</style></head><body>{''.join(sections)}</body></html>")
    path = run_dir / "report.html"
    path.write_text(page, encoding="utf-8")
    return path
