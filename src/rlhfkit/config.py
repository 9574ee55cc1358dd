"""Configuration for every stage: pydantic models, YAML files and ``--set a.b=c`` overrides.

A stage config is a YAML file with three sections shared by all stages, ``model``, ``data`` and
``train``, plus stage-specific ones added by later stages. Unknown or mistyped keys fail with a
message naming the key, the file and (for keys that come from the file) the line::

    configs/sft.yaml, line 7: train.lrr: unknown key (known: lr, ...)

The resolved config (file + overrides + defaults) is written to the run directory as ``config.yaml``
so that every run can be reproduced from its own directory.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Literal, TypeVar

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator


class ConfigError(ValueError):
    """A config file or override that cannot be used; the message names file, line and key."""


class Section(BaseModel):
    """Base of every config section: unknown keys are errors, assignments are validated."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class LoraConfig(Section):
    """LoRA adapters (peft). With LoRA, a frozen reference is the same base with adapters disabled."""

    r: int = Field(8, gt=0)
    alpha: float = Field(16.0, gt=0)
    dropout: float = Field(0.0, ge=0, lt=1)
    target_modules: list[str] | str = "all-linear"


class ModelConfig(Section):
    """Which model to train.

    ``name_or_path`` is a local Hugging Face directory or a hub id (when online). Without it, a
    Llama-style model is built from ``preset`` (no download) with the tokenizer at ``tokenizer``;
    ``architecture`` overrides preset fields (e.g. ``hidden_size``, ``num_hidden_layers``).
    """

    name_or_path: str | None = None
    preset: Literal["tiny", "small"] | None = None
    architecture: dict[str, int] = Field(default_factory=dict)
    tokenizer: str | None = None
    dtype: Literal["float32", "bfloat16", "float16"] = "float32"
    trust_remote_code: bool = False
    lora: LoraConfig | None = None

    @model_validator(mode="after")
    def _one_source(self) -> ModelConfig:
        if (self.name_or_path is None) == (self.preset is None):
            raise ValueError("give exactly one of model.name_or_path or model.preset")
        if self.preset is not None and self.tokenizer is None:
            raise ValueError("model.preset needs model.tokenizer (a tokenizer directory)")
        return self


class DataConfig(Section):
    """Training data: a file (JSONL, JSON, parquet, CSV), a saved HF dataset directory or ``hf:NAME``."""

    train: str
    eval: str | None = None
    split: str | None = None
    limit: int | None = Field(None, gt=0)
    max_length: int = Field(256, gt=1)
    max_prompt_length: int = Field(128, gt=0)

    @model_validator(mode="after")
    def _prompt_fits(self) -> DataConfig:
        if self.max_prompt_length >= self.max_length:
            raise ValueError(f"data.max_prompt_length ({self.max_prompt_length}) must be below "
                             f"data.max_length ({self.max_length}) to leave room for the response")
        return self


class TrainConfig(Section):
    """The optimisation loop shared by every trainer."""

    output_dir: str
    seed: int = 0
    epochs: int = Field(1, gt=0)
    max_steps: int | None = Field(None, gt=0)
    batch_size: int = Field(8, gt=0)
    eval_batch_size: int | None = Field(None, gt=0)
    grad_accum: int = Field(1, gt=0)
    lr: float = Field(3e-4, gt=0)
    weight_decay: float = Field(0.0, ge=0)
    adam_betas: tuple[float, float] = (0.9, 0.95)
    scheduler: Literal["cosine", "linear", "constant"] = "cosine"
    warmup_steps: int = Field(0, ge=0)
    max_grad_norm: float | None = Field(1.0, gt=0)
    mixed_precision: Literal["auto", "no", "bf16", "fp16"] = "auto"
    gradient_checkpointing: bool = False
    log_every: int = Field(10, gt=0)
    eval_every: int | None = Field(None, gt=0)
    save_every: int | None = Field(None, gt=0)
    save_total_limit: int = Field(2, gt=0)
    resume: bool = True
    progress: bool = True


class PretrainConfig(Section):
    """Next-token prediction on raw text (``data.train`` holds ``{"text": ...}`` records or .txt)."""

    model: ModelConfig
    data: DataConfig
    train: TrainConfig


class SFTConfig(Section):
    """Supervised fine-tuning on demonstrations; the loss covers response tokens only."""

    model: ModelConfig
    data: DataConfig
    train: TrainConfig


StageConfig = TypeVar("StageConfig", bound=BaseModel)


def parse_override(item: str) -> tuple[list[str], Any]:
    """Split ``a.b=c`` into (``["a", "b"]``, YAML-parsed ``c``)."""
    key, sep, raw = item.partition("=")
    if not sep or not key.strip():
        raise ConfigError(f"--set {item!r}: expected KEY=VALUE, e.g. train.lr=1e-4")
    try:
        value = yaml.safe_load(raw) if raw.strip() else None
    except yaml.YAMLError as error:
        raise ConfigError(f"--set {item!r}: value is not valid YAML: {error}") from None
    return key.strip().split("."), value


def _key_lines(text: str) -> dict[tuple[str, ...], int]:
    """Map each key path of a YAML mapping to its 1-based line, for error messages."""
    lines: dict[tuple[str, ...], int] = {}

    def walk(node: yaml.Node, prefix: tuple[str, ...]) -> None:
        if isinstance(node, yaml.MappingNode):
            for key_node, value_node in node.value:
                path = (*prefix, str(key_node.value))
                lines[path] = key_node.start_mark.line + 1
                walk(value_node, path)

    root = yaml.compose(text)
    if root is not None:
        walk(root, ())
    return lines


def _set_path(tree: dict, path: list[str], value: Any, item: str) -> None:
    node = tree
    for part in path[:-1]:
        child = node.setdefault(part, {})
        if not isinstance(child, dict):
            raise ConfigError(f"--set {item!r}: {part!r} is not a section")
        node = child
    node[path[-1]] = value


def _format_errors(error: ValidationError, source: str, lines: dict[tuple[str, ...], int],
                   overridden: set[tuple[str, ...]]) -> str:
    messages = []
    for item in error.errors():
        loc = tuple(str(part) for part in item["loc"])
        key = ".".join(loc) or "(top level)"
        if item["type"] == "extra_forbidden":
            detail = "unknown key"
        elif item["type"] == "missing":
            detail = "missing required key"
        else:
            detail = f"{item['msg']} (got {item.get('input')!r})"
        if loc in overridden:
            where = f"--set {key}"
        else:
            line = next((lines[loc[:n]] for n in range(len(loc), 0, -1) if loc[:n] in lines), None)
            where = f"{source}, line {line}" if line else source
        messages.append(f"{where}: {key}: {detail}")
    return "invalid config:\n  " + "\n  ".join(messages)


def load_config(cls: type[StageConfig], path: str | os.PathLike | None = None,
                overrides: list[str] | tuple[str, ...] = (), base: dict | None = None) -> StageConfig:
    """Build a stage config from ``base`` (defaults of the caller), a YAML file and overrides."""
    tree: dict = dict(base or {})
    lines: dict[tuple[str, ...], int] = {}
    source = "<overrides>"
    if path is not None:
        source = str(path)
        try:
            text = Path(path).read_text(encoding="utf-8")
            loaded = yaml.safe_load(text)
            lines = _key_lines(text)
        except FileNotFoundError:
            raise ConfigError(f"{source}: config file not found") from None
        except yaml.YAMLError as error:
            raise ConfigError(f"{source}: not valid YAML: {error}") from None
        if loaded is not None and not isinstance(loaded, dict):
            raise ConfigError(f"{source}: the top level must be a mapping of sections")
        tree = _merge(tree, loaded or {})
    overridden = set()
    for item in overrides:
        keys, value = parse_override(item)
        _set_path(tree, keys, value, item)
        overridden.add(tuple(keys))
    try:
        return cls.model_validate(tree)
    except ValidationError as error:
        raise ConfigError(_format_errors(error, source, lines, overridden)) from None


def _merge(base: dict, update: dict) -> dict:
    merged = dict(base)
    for key, value in update.items():
        if isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key] = _merge(merged[key], value)
        else:
            merged[key] = value
    return merged


def save_config(config: BaseModel, run_dir: str | os.PathLike) -> Path:
    """Write the resolved config as ``config.yaml`` in the run directory."""
    path = Path(run_dir) / "config.yaml"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(config.model_dump(mode="json"), sort_keys=False), encoding="utf-8")
    return path
