"""Model cards: the ``README.md`` of every ``final/`` model, in the Hugging Face Hub's model-card format.

A card is YAML front matter between ``---`` lines, then Markdown (the Hub's model-card specification,
https://huggingface.co/docs/hub/model-cards; the metadata keys are those of ``huggingface_hub.ModelCardData``):
``library_name: rlhfkit``, ``tags`` (rlhfkit and the stage's method), ``pipeline_tag``, ``base_model`` and
``license`` where the stage started from a named model (a Hub id, or a local model whose own card names one),
``datasets`` where the data came from the Hub (``hf:NAME``). The body holds the stage, the data, the final
metrics and the resolved config, so ``huggingface-cli upload`` publishes a documented model. The pipeline's eval
stage adds its results to the card of each model it evaluated (:func:`add_evaluation`).
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from pathlib import Path

import yaml
from pydantic import BaseModel

from rlhfkit.config import config_yaml

CARD_FILE = "README.md"
LIBRARY = "rlhfkit"
# what each stage does, for the card's first line
STAGE_TITLES = {"pretrain": "pretraining (next-token prediction)", "sft": "supervised fine-tuning (SFT)",
                "rm": "reward modelling", "dpo": "direct preference optimisation", "ppo": "reinforcement learning",
                "online_dpo": "online direct preference optimisation"}
_EVALUATION = re.compile(r"\n<!-- rlhfkit:evaluation -->\n.*<!-- /rlhfkit:evaluation -->\n", re.DOTALL)


def method_tags(stage: str, config: BaseModel) -> list[str]:
    """The card's tags for what the stage trained: ``sft``, ``reward-model``, ``dpo`` (and its loss when another:
    ``ipo``, ``kto``, ...), ``ppo`` or the group-baseline estimator (``grpo``, ``rloo``, ...), and ``lora``."""
    if stage in ("dpo", "online_dpo"):
        tags = (["online-dpo"] if stage == "online_dpo" else []) + ["dpo"] + (
            [config.dpo.loss] if config.dpo.loss != "dpo" else [])
    elif stage == "ppo":
        tags = ["ppo" if config.ppo.advantage == "gae" else config.ppo.advantage.replace("_", "-")]
    else:
        tags = [{"pretrain": "pretraining", "rm": "reward-model"}.get(stage, stage)]
    return tags + (["lora"] if config.model.lora is not None else []) + (
        ["qlora", "4-bit"] if config.model.quantization is not None else [])


def _front_matter(source: str) -> dict:
    """The front matter of the card of ``source``: a local model directory's ``README.md`` or a Hub model's card
    ({} where there is none, or the Hub cannot be reached)."""
    from huggingface_hub import ModelCard

    local = Path(source)
    try:
        if local.is_dir():
            return ModelCard.load(local / CARD_FILE).data.to_dict() if (local / CARD_FILE).is_file() else {}
        return ModelCard.load(source).data.to_dict()
    except (OSError, ValueError, yaml.YAMLError):  # offline, no such repository or card, front matter unreadable
        return {}


def _hub_id(name: str) -> bool:
    """Whether ``name`` (not a local path) is a valid Hub repository id."""
    from huggingface_hub.errors import HFValidationError
    from huggingface_hub.utils import validate_repo_id

    if Path(name).exists():
        return False
    try:
        validate_repo_id(name)
    except HFValidationError:
        return False
    return True


def card_metadata(stage: str, config: BaseModel) -> dict:
    """The front matter of the card of ``stage``'s ``final/`` model (module docstring)."""
    metadata: dict = {"library_name": LIBRARY, "tags": [LIBRARY, *method_tags(stage, config)],
                      "pipeline_tag": "text-classification" if stage == "rm" else "text-generation"}
    start = config.model.name_or_path
    if start is not None:
        parent = _front_matter(start)
        base = start if _hub_id(start) else parent.get("base_model")
        if base:
            metadata["base_model"] = base
        if parent.get("license"):
            metadata["license"] = parent["license"]
    sources = [config.data.train, config.data.eval, getattr(getattr(config, "ppo", None), "ptx_data", None)]
    datasets = [s.removeprefix("hf:").split(":")[0] for s in sources if s and s.startswith("hf:")]
    if datasets:
        metadata["datasets"] = list(dict.fromkeys(datasets))
    return metadata


def _number(value) -> str:
    return f"{value:.4g}" if isinstance(value, float) else str(value)


def write_model_card(directory: str | Path, *, stage: str, config: BaseModel, metrics: Mapping[str, float]) -> Path:
    """Write ``directory/README.md``, the card of a stage's ``final/`` model: front matter (:func:`card_metadata`),
    then the stage, what it started from, its data, the final ``metrics`` and the resolved ``config``."""
    metadata = card_metadata(stage, config)
    data = config.data
    started = config.model.name_or_path or f"a new `{config.model.preset}` model (rlhfkit preset)"
    tags = method_tags(stage, config)
    lines = [f"# {Path(config.train.output_dir).name or stage}", "",
             f"Trained with rlhfkit, stage `{stage}`: {STAGE_TITLES[stage]}"
             + (f" ({', '.join(tags)})" if tags != [stage] else "") + ".", "",
             "## Training", "", f"- started from: {started}", f"- training data: `{data.train}`"]
    if data.eval:
        lines.append(f"- evaluation data: `{data.eval}`")
    if stage in ("ppo", "online_dpo"):
        judged = config.ppo if stage == "ppo" else config.online
        rewards = [judged.reward_model, *(s.model or s.function for s in judged.rewards)]
        if stage == "online_dpo" and judged.task:
            rewards = [f"{judged.task}'s simulated labeler"]
        lines.append(f"- {'rewarded' if stage == 'ppo' else 'judged'} by: {', '.join(f'`{r}`' for r in rewards if r)}")
    lines += ["", "## Final metrics", ""]
    if metrics:
        lines += ["| metric | value |", "| --- | --- |", *(f"| {k} | {_number(v)} |" for k, v in metrics.items())]
    else:
        lines.append("none logged")
    lines += ["", "## Config", "", "The resolved config (`rlhfkit " + stage + " --config` reads it):", "",
              "```yaml", config_yaml(config).rstrip("\n"), "```", ""]
    path = Path(directory) / CARD_FILE
    path.write_text("---\n" + yaml.safe_dump(metadata, sort_keys=False) + "---\n\n" + "\n".join(lines),
                    encoding="utf-8")
    return path


def add_evaluation(directory: str | Path, name: str, summary: Mapping) -> bool:
    """Put the results of model ``name`` in an evaluation ``summary`` (the pipeline's ``summary.json``: the models'
    metrics and win rates against the baseline) into the rlhfkit card at ``directory``, replacing those of an
    earlier evaluation. False where ``directory`` holds no card rlhfkit wrote (nothing is written there)."""
    path = Path(directory) / CARD_FILE
    if not path.is_file() or _front_matter(str(directory)).get("library_name") != LIBRARY:
        return False
    metrics, baseline = summary["models"][name], summary["baseline"]
    lines = ["", "<!-- rlhfkit:evaluation -->", "## Evaluation", "",
             f"On {summary['eval_prompts']} held-out prompts"
             + (f" x {summary['samples_per_prompt']} samples" if summary.get("samples_per_prompt", 1) > 1 else "")
             + (f" of task `{summary['task']}`" if summary.get("task") else "") + f", as `{name}`.", ""]
    wins = summary.get("win_rates", {}).get(name, {})
    if wins:
        lines += [f"| win rate vs `{baseline}` | judged by | 95% bootstrap interval |", "| --- | --- | --- |",
                  *(f"| {w['win_rate']:.1%} | {judge} | [{w['low']:.1%}, {w['high']:.1%}] |"
                    for judge, w in wins.items()), ""]
    elif name == baseline:
        lines += ["The baseline of the win rates.", ""]
    scalars = {k: v for k, v in metrics.items() if isinstance(v, int | float) and not isinstance(v, bool)}
    lines += ["| metric | value |", "| --- | --- |", *(f"| {k} | {_number(v)} |" for k, v in scalars.items()),
              "<!-- /rlhfkit:evaluation -->", ""]
    text = _EVALUATION.sub("", path.read_text(encoding="utf-8"))
    path.write_text(text.rstrip("\n") + "\n" + "\n".join(lines), encoding="utf-8")
    return True
