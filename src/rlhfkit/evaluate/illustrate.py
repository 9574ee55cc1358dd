"""The three-step InstructGPT diagram (Ouyang et al. 2022, figure 2), filled with a real run's examples.

Three panels side by side, headed "Step 1", "Step 2", "Step 3":

1. a prompt (green box) from the SFT data, the labeler's demonstration, "fine-tune with supervised learning";
2. a prompt with K sampled outputs labelled A, B, C, ... and the labeler's ranking (e.g. ``D > C > A = B``),
   "train our reward model";
3. a new prompt, the PPO policy's output, the reward model's reward for it, and the loop back to the policy.

The examples come from the run directory: the SFT and reward-model stages' training data (``data.train``
of ``sft/config.yaml`` and ``rm/config.yaml``) and ``ppo/samples.jsonl`` (the last iteration's first
sample). One drawing, written as ``illustration.svg``
(text kept as text, so the examples can be searched) and ``illustration.png``.
"""

from __future__ import annotations

import string
import textwrap
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # must precede pyplot
import matplotlib.pyplot as plt  # noqa: E402
import yaml  # noqa: E402
from matplotlib.patches import FancyArrowPatch, FancyBboxPatch  # noqa: E402

from rlhfkit.data.readers import iter_jsonl, read_records  # noqa: E402
from rlhfkit.data.records import DataError, RankingRecord  # noqa: E402

GREEN, GREY, BLUE, ORANGE = "#c8e6c9", "#f5f5f5", "#bbdefb", "#ffe0b2"


def _short(text: str, width: int, lines: int) -> str:
    """Wrap to ``width`` characters, at most ``lines`` lines (an ellipsis marks a cut)."""
    wrapped = textwrap.wrap(" ".join(str(text).split()), width) or [""]
    if len(wrapped) > lines:
        wrapped = wrapped[:lines]
        wrapped[-1] = wrapped[-1][: width - 1].rstrip() + "…"
    return "\n".join(wrapped)


def ranking_label(groups) -> str:
    """``[[3], [2], [0, 1]]`` -> ``"D > C > A = B"``: letters for completions, ``=`` inside a tie group."""
    return " > ".join(" = ".join(string.ascii_uppercase[i] for i in sorted(group)) for group in groups)


def _rows(path: Path) -> list[dict]:
    """The records of a run file (``iter_jsonl``: bad lines are named); a missing or empty file is an error."""
    if not path.exists():
        raise FileNotFoundError(f"{path}: not found; the illustration needs a pipeline run (rlhfkit demo)")
    rows = [row for _, row in iter_jsonl(path)]
    if not rows:
        raise DataError("no records", source=str(path))
    return rows


def _training_data(run_dir: Path, stage: str, kind: str) -> list:
    """The first records of what a stage of the run trained on (``data.train`` of its ``config.yaml``)."""
    config_path = run_dir / stage / "config.yaml"
    if not config_path.exists():
        raise FileNotFoundError(f"{config_path}: not found; the illustration needs a pipeline run (rlhfkit demo)")
    return read_records(yaml.safe_load(config_path.read_text(encoding="utf-8"))["data"]["train"], kind, limit=500)


def run_examples(run_dir: Path) -> dict:
    """The examples the diagram shows, read from a run directory."""
    # a demonstration that fits its box: the first of a few sentences
    demos = _training_data(run_dir, "sft", "demonstration")
    demo = next((r for r in demos if 60 <= len(r.completion) <= 200), demos[0])
    # a ranking of four outputs, with a tie when there is one (it shows the "=" of the ranking)
    # pair sets (judgements that need not form a ranking) have no ranking to draw
    rankings = [r for r in _training_data(run_dir, "rm", "ranking") if isinstance(r, RankingRecord)]
    if not rankings:
        raise DataError("the reward model's data holds no ranking to draw (only pair sets)", source=str(run_dir / "rm"))
    four = [r for r in rankings if len(r.completions) == 4] or rankings
    ranking = next((r for r in four if any(len(group) > 1 for group in r.ranking)), four[0])
    # the first sample of PPO's last logged iteration
    samples = _rows(run_dir / "ppo" / "samples.jsonl")
    last_step = max(r["step"] for r in samples)
    ppo = next(r for r in samples if r["step"] == last_step)
    return {"demo_prompt": demo.prompt, "demonstration": demo.completion,
            "rank_prompt": ranking.prompt, "outputs": list(ranking.completions),
            "ranking": ranking_label(ranking.ranking),
            "ppo_prompt": ppo["prompt"], "ppo_output": ppo["completion"], "reward": ppo["score"],
            "ppo_step": ppo["step"]}


def _box(ax, x, y, w, h, text, color, *, size=9, weight="normal"):
    ax.add_patch(FancyBboxPatch((x - w / 2, y - h / 2), w, h, boxstyle="round,pad=0.008,rounding_size=0.015",
                                facecolor=color, edgecolor="#555555", linewidth=1))
    ax.text(x, y, text, ha="center", va="center", fontsize=size, weight=weight, wrap=False)


def _note(ax, x, y, text, size=9):
    ax.text(x, y, text, ha="center", va="center", fontsize=size, style="italic", color="#333333")


def _arrow(ax, start, end, **style):
    ax.add_patch(FancyArrowPatch(start, end, arrowstyle="-|>", mutation_scale=14, color="#444444", linewidth=1.3,
                                 **style))


def draw(examples: dict):
    """The figure (matplotlib) of the three steps with ``examples`` (see :func:`run_examples`)."""
    figure = plt.figure(figsize=(15, 9.5))
    ax = figure.add_axes((0, 0, 1, 1))
    ax.set_xlim(0, 3)
    ax.set_ylim(0, 1)
    ax.axis("off")
    for i in (1, 2):
        ax.plot([i, i], [0.03, 0.97], color="#dddddd", linewidth=1)
    titles = ("Collect demonstration data,\nand train a supervised policy.",
              "Collect comparison data,\nand train a reward model.",
              "Optimize a policy against\nthe reward model using PPO.")
    for i, title in enumerate(titles):
        ax.text(i + 0.5, 0.955, f"Step {i + 1}", ha="center", va="center", fontsize=15, weight="bold")
        ax.text(i + 0.5, 0.9, title, ha="center", va="center", fontsize=11)

    # Step 1
    _note(ax, 0.5, 0.83, "A prompt is sampled from\nour prompt dataset.")
    _box(ax, 0.5, 0.74, 0.8, 0.08, _short(examples["demo_prompt"], 44, 3), GREEN)
    _arrow(ax, (0.5, 0.695), (0.5, 0.645))
    _note(ax, 0.5, 0.615, "A labeler demonstrates the\ndesired output behavior.")
    _box(ax, 0.5, 0.5, 0.8, 0.15, _short(examples["demonstration"], 46, 6), GREY, size=8.5)
    _arrow(ax, (0.5, 0.42), (0.5, 0.34))
    _note(ax, 0.5, 0.3, "This data is used to fine-tune\nthe policy with supervised learning.")
    _box(ax, 0.5, 0.19, 0.3, 0.08, "SFT", BLUE, size=13, weight="bold")

    # Step 2
    _note(ax, 1.5, 0.83, "A prompt and several model\noutputs are sampled.")
    _box(ax, 1.5, 0.755, 0.8, 0.07, _short(examples["rank_prompt"], 44, 2), GREEN)
    outputs = examples["outputs"][:4]
    for k, text in enumerate(outputs):
        x, y = 1.5 + (-0.2 if k % 2 == 0 else 0.2), 0.64 - 0.115 * (k // 2)
        _box(ax, x, y, 0.38, 0.1, f"{string.ascii_uppercase[k]}\n{_short(text, 24, 3)}", GREY, size=7.5)
    _arrow(ax, (1.5, 0.47), (1.5, 0.42))
    _note(ax, 1.5, 0.39, "A labeler ranks the outputs\nfrom best to worst.")
    ax.text(1.5, 0.33, examples["ranking"], ha="center", va="center", fontsize=16, weight="bold")
    _arrow(ax, (1.5, 0.3), (1.5, 0.26))
    _note(ax, 1.5, 0.23, "This data is used to train\nour reward model.")
    _box(ax, 1.5, 0.13, 0.3, 0.08, "RM", ORANGE, size=13, weight="bold")

    # Step 3
    _note(ax, 2.5, 0.83, "A new prompt is sampled\nfrom the dataset.")
    _box(ax, 2.5, 0.755, 0.8, 0.07, _short(examples["ppo_prompt"], 44, 2), GREEN)
    _arrow(ax, (2.5, 0.715), (2.5, 0.67))
    _box(ax, 2.5, 0.635, 0.3, 0.06, "PPO policy", BLUE, size=11, weight="bold")
    ax.text(2.72, 0.635, "initialised\nfrom SFT", fontsize=8, va="center", color="#555555")
    _arrow(ax, (2.5, 0.6), (2.5, 0.565))
    _note(ax, 2.5, 0.545, "The policy generates an output.")
    _box(ax, 2.5, 0.455, 0.8, 0.13, _short(examples["ppo_output"], 46, 5), GREY, size=8.5)
    _arrow(ax, (2.5, 0.385), (2.5, 0.345))
    _note(ax, 2.5, 0.325, "The reward model calculates\na reward for the output.")
    _box(ax, 2.5, 0.245, 0.3, 0.06, "RM", ORANGE, size=11, weight="bold")
    _arrow(ax, (2.5, 0.212), (2.5, 0.175))
    ax.text(2.5, 0.145, f"r = {examples['reward']:.2f}", ha="center", va="center", fontsize=15, weight="bold")
    _arrow(ax, (2.33, 0.145), (2.33, 0.635), connectionstyle="arc3,rad=-0.45")
    _note(ax, 2.5, 0.07, f"The reward is used to update the policy\nusing PPO (iteration {examples['ppo_step']}).")
    return figure


def illustrate(run_dir: str | Path, out_dir: str | Path | None = None) -> tuple[Path, Path]:
    """Write ``illustration.svg`` and ``illustration.png`` for a run; return their paths."""
    run_dir = Path(run_dir)
    out_dir = Path(out_dir) if out_dir else run_dir
    out_dir.mkdir(parents=True, exist_ok=True)
    figure = draw(run_examples(run_dir))
    svg, png = out_dir / "illustration.svg", out_dir / "illustration.png"
    with matplotlib.rc_context({"svg.fonttype": "none"}):  # text stays text in the SVG
        figure.savefig(svg, format="svg")
    figure.savefig(png, format="png", dpi=100)
    plt.close(figure)
    return svg, png
