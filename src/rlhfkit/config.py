"""Configuration for every stage: pydantic models, YAML files and ``--set a.b=c`` overrides.

A stage config is a YAML file with three sections shared by all stages, ``model``, ``data`` and
``train``, plus stage-specific ones added by later stages. Unknown or mistyped keys fail with a
message naming the key, the file and (for keys that come from the file) the line; an unknown key that is a
TRL name (:data:`TRL_NAMES`) or close to a key of its section gets a suggestion::

    configs/sft.yaml, line 7: train.learning_rate: unknown key; did you mean train.lr?

The resolved config (file + overrides + defaults) is written to the run directory as ``config.yaml``
so that every run can be reproduced from its own directory.
"""

from __future__ import annotations

import difflib
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, TypeVar, get_args

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator


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
    ``quantization: 4bit`` is QLoRA (Dettmers et al. 2023): the pretrained weights are loaded in bitsandbytes'
    4-bit NF4 (double-quantised, computed in ``dtype``) and frozen, and only the LoRA adapters (``lora``) train.
    """

    name_or_path: str | None = None
    preset: Literal["tiny", "small"] | None = None
    architecture: dict[str, int] = Field(default_factory=dict)
    tokenizer: str | None = None
    dtype: Literal["float32", "bfloat16", "float16"] = "float32"
    trust_remote_code: bool = False
    lora: LoraConfig | None = None
    quantization: Literal["4bit"] | None = None

    @model_validator(mode="after")
    def _one_source(self) -> ModelConfig:
        if (self.name_or_path is None) == (self.preset is None):
            raise ValueError("give exactly one of model.name_or_path or model.preset")
        if self.preset is not None and self.tokenizer is None:
            raise ValueError("model.preset needs model.tokenizer (a tokenizer directory)")
        if self.quantization is not None:
            if self.lora is None:
                raise ValueError("model.quantization: 4bit freezes the quantised weights: it trains LoRA adapters "
                                 "only (QLoRA); set model.lora")
            if self.name_or_path is None or str(self.name_or_path).lower().endswith(".gguf"):
                raise ValueError("model.quantization quantises pretrained weights: give a Hugging Face model with "
                                 "model.name_or_path (not a preset, not a .gguf file)")
        return self


class DataConfig(Section):
    """Training data: a file (JSONL, JSON, parquet, CSV), a saved HF dataset directory or ``hf:NAME``.

    ``max_length`` bounds prompt + response (or a pretraining block); prompts keep at most
    ``max_prompt_length`` tokens (default: half of ``max_length``).
    """

    train: str
    eval: str | None = None
    split: str | None = None
    limit: int | None = Field(None, gt=0)
    max_length: int = Field(256, gt=1)
    max_prompt_length: int | None = Field(None, gt=0)

    @model_validator(mode="after")
    def _prompt_fits(self) -> DataConfig:
        if self.max_prompt_length is None:
            self.max_prompt_length = self.max_length // 2
        elif self.max_prompt_length >= self.max_length:
            raise ValueError(f"data.max_prompt_length ({self.max_prompt_length}) must be below "
                             f"data.max_length ({self.max_length}) to leave room for the response")
        return self


#: the experiment trackers ``train.report_to`` may list (accelerate's names; each an extra of the package)
Tracker = Literal["tensorboard", "wandb", "mlflow", "trackio"]


class TrainConfig(Section):
    """The optimisation loop shared by every trainer."""

    output_dir: str
    seed: int = 0
    epochs: int = Field(1, gt=0)
    max_steps: int | None = Field(None, gt=0)
    batch_size: int = Field(8, gt=0)
    eval_batch_size: int | None = Field(None, gt=0)
    grad_accum: int = Field(1, gt=0)
    # batches of examples of similar length (less padding; see rlhfkit.trainers.base.epoch_order)
    group_by_length: bool = True
    lr: float = Field(3e-4, gt=0)
    weight_decay: float = Field(0.0, ge=0)
    adam_betas: tuple[float, float] = (0.9, 0.95)
    scheduler: Literal["cosine", "linear", "constant"] = "cosine"
    warmup_steps: int = Field(0, ge=0)
    max_grad_norm: float | None = Field(1.0, gt=0)
    mixed_precision: Literal["auto", "no", "bf16", "fp16"] = "auto"
    gradient_checkpointing: bool = False
    # torch.compile each repeated block (rlhfkit.engine.compile.compile_repeated_blocks); off by default: the
    # compile takes 10-60 s on a CPU and gains little on length-grouped batches (README, Performance)
    torch_compile: bool = False
    log_every: int = Field(10, gt=0)
    eval_every: int | None = Field(None, gt=0)
    # evaluate before the first step too (the start of the eval curve); off saves an eval pass whose result is
    # known, e.g. DPO's policy equal to its reference (every implicit reward 0)
    eval_at_start: bool = True
    save_every: int | None = Field(None, gt=0)
    save_total_limit: int = Field(2, gt=0)
    resume: bool = True
    progress: bool = True
    # experiment trackers beside metrics.jsonl (always written), through accelerate's tracker integration
    # (rlhfkit.engine.trackers); each needs its extra: pip install rlhfkit[wandb]
    report_to: list[Tracker] = []
    # the trackers' project (W&B project, MLflow experiment, trackio project, TensorBoard subdirectory): default
    # rlhfkit, and a pipeline's out_dir name for its stages; the run's name: default the output_dir's name
    project: str | None = None
    run_name: str | None = None

    @field_validator("report_to", mode="before")
    @classmethod
    def _one_or_none(cls, value: Any) -> Any:
        """``report_to: wandb`` is a list of one, ``report_to: none`` (TRL's spelling) or null the empty list;
        each tracker once, in the order given."""
        if value is None or value == "none":
            return []
        if isinstance(value, str):
            value = [value]
        return list(dict.fromkeys(value)) if isinstance(value, (list, tuple)) else value

    @field_validator("mixed_precision", mode="before")
    @classmethod
    def _bare_no(cls, value: Any) -> Any:
        """YAML reads a bare ``no`` as false: ``mixed_precision: no`` means ``"no"``."""
        return "no" if value is False else value


class PretrainConfig(Section):
    """Next-token prediction on raw text (``data.train`` holds ``{"text": ...}`` records or .txt)."""

    model: ModelConfig
    data: DataConfig
    train: TrainConfig


class SFTSection(Section):
    """What SFT's loss covers and how its tokens are averaged.

    ``loss_on``: which assistant turns of a conversation SFT trains on (a ``messages`` record, or a prompt of
    messages that holds earlier assistant turns; system, user and tool messages are never targets):
    ``last_assistant_turn`` (the reply that ends the conversation; the turns before it are the prompt) or
    ``all_assistant_turns`` (every assistant message, each with the EOS that ends it; TRL's
    ``assistant_only_loss``, see ``rlhfkit.data.collators.encode_conversation``).

    ``loss_average``: ``batch`` (each micro-batch's loss is the mean over its own target tokens, as in TRL) or
    ``dataset`` (each micro-batch's summed loss is divided by the training set's mean target tokens per
    micro-batch, so every target token of the training set weighs the same, whatever batch it lands in). With
    ``train.group_by_length`` a batch of short answers gives each of its tokens more weight than a batch of long
    ones, under ``batch``; on data that mixes short and long answers to the same kind of prompt, ``dataset``
    keeps the model's choice between them where the demonstrations put it (the ``sums`` task: worked answers
    in 49 % of SFT samples against 28 % under ``batch``, for the demonstrations' 50 %; see
    ``rlhfkit.trainers.base.Trainer``'s ``example_units``).
    """

    loss_on: Literal["last_assistant_turn", "all_assistant_turns"] = "last_assistant_turn"
    loss_average: Literal["batch", "dataset"] = "batch"


class SFTConfig(Section):
    """Supervised fine-tuning on demonstrations; the loss covers response tokens only."""

    model: ModelConfig
    data: DataConfig
    train: TrainConfig
    sft: SFTSection = Field(default_factory=SFTSection)


class DPOSection(Section):
    """The preference loss and its reference (see ``rlhfkit.algorithms.dpo`` for the equations).

    ``loss``: ``dpo`` (sigmoid; cDPO with ``label_smoothing``), ``ipo``, ``robust`` (robust DPO with
    flip rate ``label_smoothing``), ``hinge`` (SLiC), ``orpo`` (reference-free; ``beta`` is its lambda),
    ``kto`` (unpaired; pairs and rankings are split into desirable and undesirable completions), ``simpo``
    (reference-free, length-normalised, with the target margin ``simpo_gamma``). ``rpo_alpha``: add
    ``rpo_alpha`` x the chosen response's mean token NLL to each pair's loss (RPO, Pang et al. 2024).
    ``average_logps``: per-token mean instead of sum of response log-probs; default per loss (IPO and
    ORPO average, the others sum). ``reference``: ``auto`` = ``reference_model`` if given, else the same
    base with LoRA adapters disabled when ``model.lora`` is set, else a frozen copy of the initial
    policy; ``none`` = reference-free. ``precompute_reference`` computes the reference log-probs once
    before training (cached in the run directory) and frees the reference copy. ``share_prompt``: score
    all responses to one prompt in one row after a single copy of the prompt (a block attention mask
    keeps them apart), so the prompt is computed once per record, not once per response; default: on
    where the attention implementation takes such a mask (sdpa, eager), else one row per response.
    """

    loss: Literal["dpo", "ipo", "robust", "hinge", "orpo", "kto", "simpo"] = "dpo"
    beta: float = Field(0.1, gt=0)
    simpo_gamma: float = Field(0.5, ge=0)
    rpo_alpha: float | None = Field(None, gt=0)
    label_smoothing: float = Field(0.0, ge=0, lt=0.5)
    average_logps: bool | None = None
    reference: Literal["auto", "copy", "adapters", "none"] = "auto"
    reference_model: str | None = None
    precompute_reference: bool = False
    desirable_weight: float = Field(1.0, gt=0)
    undesirable_weight: float = Field(1.0, gt=0)
    share_prompt: bool | None = None

    @model_validator(mode="after")
    def _consistent(self) -> DPOSection:
        if self.label_smoothing and self.loss not in ("dpo", "robust"):
            raise ValueError(f"dpo.label_smoothing applies to losses dpo and robust, not {self.loss}")
        if self.reference_free and self.reference not in ("auto", "none"):
            raise ValueError(f"dpo.loss {self.loss} is reference-free: leave dpo.reference at auto or none")
        if self.rpo_alpha is not None and self.loss in ("kto", "orpo"):
            raise ValueError(f"dpo.rpo_alpha adds the chosen response's NLL to a pairwise loss; not to dpo.loss "
                             f"{self.loss} ({'unpaired' if self.loss == 'kto' else 'it has an NLL term already'})")
        if self.reference_model is not None and self.reference not in ("auto", "copy"):
            raise ValueError(f"dpo.reference_model is a frozen model; it cannot go with dpo.reference {self.reference}")
        if self.precompute_reference and (self.reference == "none" or self.reference_free):
            raise ValueError("dpo.precompute_reference needs a reference model (not reference none, or a "
                             "reference-free loss: orpo, simpo)")
        return self

    @property
    def reference_free(self) -> bool:
        """Whether the loss needs no reference model at all (ORPO, SimPO)."""
        return self.loss in ("orpo", "simpo")


class DPOConfig(Section):
    """Direct preference optimisation from pairwise preferences or rankings (their non-tied pairs)."""

    model: ModelConfig
    data: DataConfig
    train: TrainConfig
    dpo: DPOSection = Field(default_factory=DPOSection)

    @model_validator(mode="after")
    def _adapters_need_lora(self) -> DPOConfig:
        if self.dpo.reference == "adapters" and self.model.lora is None:
            raise ValueError("dpo.reference adapters needs model.lora (the reference is the base without adapters)")
        return self


class RewardSection(Section):
    """The reward-model loss (InstructGPT eq. 1) and the normalisation applied after training.

    ``pair_weighting``: ``per_prompt`` (InstructGPT: a prompt's K(K-1)/2 pairs form one batch element, so
    their losses are averaged, then the prompts) or ``per_pair`` (every pair weighs the same).
    ``margin``: the loss asks for ``r_w - r_l > margin``. ``center_coef``: adds ``center_coef * mean(r^2)``
    (Eisenstein et al. 2023). ``normalize``: shift the reward so the reference outputs (the completions of
    the training rankings, or the records of ``reference``) score mean 0; ``normalize_std``: also scale
    them to std 1. ``calibration_bins``: bins of the calibration table written to ``calibration.json``.
    ``length_head``: ODIN (Chen et al. 2024; :mod:`rlhfkit.algorithms.ranking`): train a second, length head
    beside the reward head, with ``length_corr_coef`` weighing the correlation loss (the reward head
    uncorrelated with the completions' token counts, the length head correlated) and ``orthogonal_coef`` the
    heads' orthogonality; ``final/`` keeps only the reward (quality) head, a plain one-output reward model.
    The correlations are over a micro-batch's completions (each process's share of it under DDP or FSDP).
    """

    margin: float = 0.0
    length_head: bool = False
    length_corr_coef: float = Field(1.0, ge=0)
    orthogonal_coef: float = Field(1.0, ge=0)
    center_coef: float = Field(0.0, ge=0)
    pair_weighting: Literal["per_prompt", "per_pair"] = "per_prompt"
    normalize: bool = True
    normalize_std: bool = False
    reference: str | None = None
    calibration_bins: int = Field(10, gt=0)


class RewardConfig(Section):
    """Step 2 of InstructGPT: a reward model trained on K-way rankings (or pairwise preferences).

    ``data.train`` / ``data.eval`` hold ranking records (K >= 2, ties allowed) or pairwise records;
    ``train.batch_size`` counts prompts (each with its K completions).
    """

    model: ModelConfig
    data: DataConfig
    train: TrainConfig
    reward: RewardSection = Field(default_factory=RewardSection)


class RewardSourceConfig(Section):
    """One entry of ``ppo.rewards``: a reward model directory (``model``) or a reward function (``function``:
    a built-in such as ``exact_answer``, ``package.module:function`` or ``path/to/file.py:function``; see
    :mod:`rlhfkit.rewards`), its weight in the sum, the name its mean is logged under (``rewards/<name>``) and,
    for a function, ``options`` (keyword arguments of every call)."""

    model: str | None = None
    function: str | None = None
    weight: float = 1.0
    name: str | None = None
    options: dict[str, Any] = Field(default_factory=dict)

    @model_validator(mode="after")
    def _one_source(self) -> RewardSourceConfig:
        if (self.model is None) == (self.function is None):
            raise ValueError("a reward source needs exactly one of 'model' (a reward model directory) and 'function'")
        if self.options and self.function is None:
            raise ValueError("'options' are keyword arguments of a reward function; a reward model takes none")
        return self

    @property
    def metric_name(self) -> str:
        """``name``, else the function's name or the model directory's (``runs/rm/final`` -> ``rm``)."""
        if self.name:
            return self.name
        if self.function is not None:
            return self.function.rpartition(":")[2]
        path = Path(self.model)
        return path.parent.name if path.name == "final" and path.parent.name else path.name


class PPOSection(Section):
    """Step 3 of InstructGPT: PPO against a frozen reward model (and its group-baseline relatives).

    One PPO *iteration* samples ``rollout_batch_size`` prompts x ``samples_per_prompt`` completions,
    scores them, then makes ``ppo_epochs`` passes over them in minibatches of ``minibatch_size``
    sequences (each one optimizer step; ``train.grad_accum`` splits it into micro-batches).
    ``train.max_steps`` counts iterations. Under several processes both sizes stay global counts (each a
    multiple of the number of processes; see :mod:`rlhfkit.trainers.ppo`).
    """

    # what the policy is rewarded by: the reward model, the weighted reward sources, or both (summed)
    reward_model: str | None = None
    rewards: list[RewardSourceConfig] = Field(default_factory=list)
    value_model: Literal["reward", "head"] = "reward"
    # the estimators of rlhfkit.algorithms.estimators (gae needs a value model; rloo and grpo groups of samples)
    advantage: Literal["gae", "rloo", "grpo", "dr_grpo", "reinforce++"] = "gae"
    rollout_batch_size: int = Field(16, gt=0)
    samples_per_prompt: int = Field(1, gt=0)
    minibatch_size: int = Field(8, gt=0)
    ppo_epochs: int = Field(4, gt=0)
    max_new_tokens: int = Field(48, gt=0)
    temperature: float = Field(1.0, gt=0)
    top_k: int = Field(0, ge=0)
    top_p: float = Field(1.0, gt=0, le=1)
    stop_strings: list[str] = Field(default_factory=list)
    missing_eos_penalty: float | None = Field(None, ge=0)
    kl_coef: float = Field(0.05, ge=0)
    kl_estimator: Literal["k1", "k3"] = "k1"
    adaptive_kl: bool = False
    kl_target: float = Field(6.0, gt=0)
    kl_horizon: int = Field(10_000, gt=0)
    whiten_rewards: bool = False
    reward_clip: float | None = Field(None, gt=0)
    gamma: float = Field(1.0, ge=0, le=1)
    lam: float = Field(0.95, ge=0, le=1)
    # whiten the advantages over the batch; unset: as the estimator's authors do (gae, reinforce++: yes)
    whiten_advantages: bool | None = None
    clip_range: float = Field(0.2, gt=0)
    # the upper clip of the ratio (DAPO's clip-higher, e.g. 0.28); unset: clip_range
    clip_range_high: float | None = Field(None, gt=0)
    clip_range_value: float = Field(0.2, gt=0)
    # how the per-token policy loss becomes one number (rlhfkit.algorithms.ppo.Aggregation): token_mean (PPO,
    # DAPO), sequence_mean (GRPO) or constant_length (Dr. GRPO: each sequence's sum over max_new_tokens)
    loss_aggregation: Literal["token_mean", "sequence_mean", "constant_length"] = "token_mean"
    # whose likelihood ratio is clipped: each token's (PPO) or each sequence's length-normalised one (GSPO)
    importance_ratio: Literal["token", "sequence"] = "token"
    vf_coef: float = Field(0.1, ge=0)
    value_lr_scale: float = Field(1.0, gt=0)
    target_kl: float | None = Field(None, gt=0)
    ptx_coef: float = Field(0.0, ge=0)
    ptx_data: str | None = None
    ema_decay: float | None = Field(None, gt=0, lt=1)
    samples_to_log: int = Field(4, ge=0)
    # DAPO's dynamic sampling: the groups whose samples all scored the same (nothing for a group baseline to learn)
    # are replaced by groups of further prompts, sampled up to dynamic_sampling_max_batches batches in all
    dynamic_sampling: bool = False
    dynamic_sampling_max_batches: int = Field(3, ge=1)

    @model_validator(mode="after")
    def _consistent(self) -> PPOSection:
        rollout = self.rollout_batch_size * self.samples_per_prompt
        if rollout % self.minibatch_size:
            raise ValueError(f"ppo.minibatch_size ({self.minibatch_size}) must divide the rollout of "
                             f"rollout_batch_size x samples_per_prompt = {rollout} sequences")
        if self.advantage in ("rloo", "grpo", "dr_grpo") and self.samples_per_prompt < 2:
            raise ValueError(f"ppo.advantage={self.advantage} needs ppo.samples_per_prompt >= 2")
        if self.dynamic_sampling and self.samples_per_prompt < 2:
            raise ValueError("ppo.dynamic_sampling keeps the groups whose samples scored differently: it needs "
                             "ppo.samples_per_prompt >= 2")
        if self.reward_model is None and not self.rewards:
            raise ValueError("ppo needs a reward: ppo.reward_model (a directory) or ppo.rewards (reward models "
                             "and functions with weights)")
        names = [source.metric_name for source in self.rewards]
        if len(set(names)) != len(names):
            raise ValueError(f"ppo.rewards: two sources are logged as rewards/{max(names, key=names.count)}: "
                             "give each its own 'name'")
        if self.advantage == "gae" and self.value_model == "reward" and self.reward_model is None:
            raise ValueError("ppo.value_model=reward initialises the value network from ppo.reward_model; without "
                             "one use ppo.value_model=head, or an estimator without values (rloo, grpo, dr_grpo, "
                             "reinforce++)")
        if self.ptx_coef > 0 and self.ptx_data is None:
            raise ValueError("ppo.ptx_coef > 0 needs ppo.ptx_data (pretraining text records)")
        return self


class OnlineDPOSection(Section):
    """Online DPO: preferences between the current policy's own samples, judged as it trains (Guo et al. 2024,
    "Direct Language Model Alignment from Online AI Feedback"; TRL's ``OnlineDPOTrainer``).

    One step samples ``num_generations`` completions for each of ``rollout_batch_size`` prompts from the policy
    being trained, the judge ranks each prompt's completions, and the policy takes one optimizer step of
    ``dpo.loss`` on the rankings' pairs (``pairs``: ``all`` non-tied pairs, or ``best_worst``, the best against
    the worst, one pair per prompt). The judge is ``task``'s simulated labeler (a built-in task: a human in the
    loop) or the reward sources (``reward_model`` and ``rewards``, summed with their weights, as PPO's).
    ``ref_update_every``: the reference becomes a copy of the policy every so many steps (iterative DPO, Xiong
    et al. 2024: a new reference each round); unset, it stays the initial policy. ``train.max_steps`` counts
    steps; a step's preference pairs are ``rollout_batch_size`` x the pairs of a ranking.
    """

    task: str | None = None
    reward_model: str | None = None
    rewards: list[RewardSourceConfig] = Field(default_factory=list)
    rollout_batch_size: int = Field(16, gt=0)
    num_generations: int = Field(2, ge=2)
    pairs: Literal["all", "best_worst"] = "all"
    max_new_tokens: int = Field(48, gt=0)
    temperature: float = Field(1.0, gt=0)
    top_k: int = Field(0, ge=0)
    top_p: float = Field(1.0, gt=0, le=1)
    ref_update_every: int | None = Field(None, gt=0)
    samples_to_log: int = Field(4, ge=0)

    @model_validator(mode="after")
    def _one_judge(self) -> OnlineDPOSection:
        has_rewards = self.reward_model is not None or bool(self.rewards)
        if (self.task is None) != has_rewards:
            raise ValueError("online: the judge is either a built-in task's simulated labeler (online.task) or reward "
                             "sources (online.reward_model and/or online.rewards), exactly one of the two")
        return self


class OnlineDPOConfig(Section):
    """Online DPO: ``model`` is the policy (initialised from SFT), ``data.train`` the prompts, ``dpo`` the loss
    and its reference, ``online`` the sampling and the judge."""

    model: ModelConfig
    data: DataConfig
    train: TrainConfig
    dpo: DPOSection = Field(default_factory=DPOSection)
    online: OnlineDPOSection

    @model_validator(mode="after")
    def _pairwise(self) -> OnlineDPOConfig:
        if self.dpo.loss == "kto":
            raise ValueError("online DPO trains on pairs of its samples: dpo.loss kto (unpaired) is not supported")
        if self.dpo.precompute_reference:
            raise ValueError("dpo.precompute_reference: online DPO's responses are sampled as it trains, so their "
                             "reference log-probs cannot be computed beforehand")
        if self.online.ref_update_every is not None and (self.dpo.reference != "auto" or self.dpo.reference_model
                                                          or self.model.lora is not None or self.dpo.reference_free):
            raise ValueError("online.ref_update_every refreshes a frozen copy of the policy: it needs dpo.reference "
                             "auto, no dpo.reference_model, no model.lora and a loss with a reference")
        return self


#: ``rlhfkit grpo``'s starting point: TRL's ``GRPOConfig`` defaults (trl 1.16) where they differ from
#: :class:`PPOSection`'s, on the same trainer: group baselines of 8 completions (``num_generations``), no KL
#: penalty (``beta`` 0), one pass over each rollout (``num_iterations``). ``epsilon`` (0.2), ``temperature`` (1.0)
#: and the token-mean loss (``loss_type: dapo``) are PPOSection's defaults already.
GRPO_DEFAULTS = {"ppo": {"advantage": "grpo", "samples_per_prompt": 8, "kl_coef": 0.0, "ppo_epochs": 1}}


class PPOConfig(Section):
    """PPO / RLOO / GRPO: ``model`` is the policy (initialised from SFT), ``data.train`` the prompts."""

    model: ModelConfig
    data: DataConfig
    train: TrainConfig
    ppo: PPOSection


@dataclass(frozen=True)
class TRLName:
    """An option of TRL's configs (or of transformers' ``TrainingArguments``, which they extend) and the rlhfkit key
    that means the same; ``key`` is relative to a stage config (``train.lr``), ``trl`` says which TRL configs have
    the name, ``note`` what differs."""

    name: str
    trl: str
    key: str
    note: str = ""


_EVERY = "TrainingArguments (every TRL config)"
# The one table of TRL names: read by the config errors' "did you mean" and rendered as docs/trl-names.md (a test
# keeps the two equal). Names are those of TRL 1.x (transformers 5.x TrainingArguments), PPOConfig's and RLOOConfig's
# of TRL 0.x; only names with a true rlhfkit equivalent are listed.
TRL_NAMES: tuple[TRLName, ...] = (
    TRLName("learning_rate", _EVERY, "train.lr"),
    TRLName("per_device_train_batch_size", _EVERY, "train.batch_size",
            "rlhfkit's batch is global: split over the processes, not per device"),
    TRLName("per_device_eval_batch_size", _EVERY, "train.eval_batch_size", "global, as train.batch_size"),
    TRLName("gradient_accumulation_steps", _EVERY, "train.grad_accum"),
    TRLName("num_train_epochs", _EVERY, "train.epochs", "whole epochs only"),
    TRLName("max_steps", _EVERY, "train.max_steps", "PPO: iterations"),
    TRLName("warmup_steps", _EVERY, "train.warmup_steps", "a count of steps, not a ratio"),
    TRLName("weight_decay", _EVERY, "train.weight_decay"),
    TRLName("adam_beta1", _EVERY, "train.adam_betas", "the pair (beta1, beta2)"),
    TRLName("adam_beta2", _EVERY, "train.adam_betas", "the pair (beta1, beta2)"),
    TRLName("max_grad_norm", _EVERY, "train.max_grad_norm"),
    TRLName("lr_scheduler_type", _EVERY, "train.scheduler", "cosine, linear or constant"),
    TRLName("logging_steps", _EVERY, "train.log_every"),
    TRLName("eval_steps", _EVERY, "train.eval_every"),
    TRLName("eval_on_start", _EVERY, "train.eval_at_start", "on by default in rlhfkit"),
    TRLName("save_steps", _EVERY, "train.save_every"),
    TRLName("save_total_limit", _EVERY, "train.save_total_limit"),
    TRLName("resume_from_checkpoint", _EVERY, "train.resume", "a switch: the newest checkpoint of train.output_dir"),
    TRLName("seed", _EVERY, "train.seed"),
    TRLName("bf16", _EVERY, "train.mixed_precision", "mixed_precision: bf16"),
    TRLName("fp16", _EVERY, "train.mixed_precision", "mixed_precision: fp16"),
    TRLName("gradient_checkpointing", _EVERY, "train.gradient_checkpointing"),
    TRLName("torch_compile", _EVERY, "train.torch_compile", "compiles each repeated block"),
    TRLName("output_dir", _EVERY, "train.output_dir"),
    TRLName("report_to", _EVERY, "train.report_to", "tensorboard, wandb, mlflow, trackio; none by default"),
    TRLName("run_name", _EVERY, "train.run_name", "default: the output_dir's name"),
    TRLName("project", _EVERY, "train.project", "every tracker's project, not trackio's only; default: rlhfkit"),
    TRLName("group_by_length", "TrainingArguments (transformers 4.x)", "train.group_by_length",
            "on by default in rlhfkit"),
    TRLName("trust_remote_code", "SFTConfig, RewardConfig, DPOConfig, GRPOConfig, ...", "model.trust_remote_code"),
    TRLName("max_length", "SFTConfig, RewardConfig, DPOConfig, KTOConfig", "data.max_length"),
    TRLName("assistant_only_loss", "SFTConfig", "sft.loss_on",
            "true is all_assistant_turns; rlhfkit never trains on prompt tokens, and by default on the last turn only"),
    TRLName("max_prompt_length", "DPOConfig, GRPOConfig (TRL 0.x)", "data.max_prompt_length"),
    TRLName("center_rewards_coefficient", "RewardConfig", "reward.center_coef"),
    TRLName("beta", "DPOConfig, KTOConfig", "dpo.beta"),
    TRLName("loss_type", "DPOConfig", "dpo.loss",
            "TRL's sigmoid is rlhfkit's dpo; ipo, robust and hinge are named alike"),
    TRLName("label_smoothing", "DPOConfig", "dpo.label_smoothing"),
    TRLName("simpo_gamma", "CPOConfig (loss_type simpo)", "dpo.simpo_gamma", "with dpo.loss: simpo"),
    TRLName("rpo_alpha", "DPOConfig (TRL 0.x)", "dpo.rpo_alpha"),
    TRLName("precompute_ref_log_probs", "DPOConfig, KTOConfig", "dpo.precompute_reference"),
    TRLName("desirable_weight", "KTOConfig", "dpo.desirable_weight", "with dpo.loss: kto"),
    TRLName("undesirable_weight", "KTOConfig", "dpo.undesirable_weight", "with dpo.loss: kto"),
    TRLName("beta", "GRPOConfig, RLOOConfig", "ppo.kl_coef",
            "the KL coefficient; rlhfkit puts the KL penalty in the reward, GRPO in the loss"),
    TRLName("num_generations", "GRPOConfig, RLOOConfig", "ppo.samples_per_prompt"),
    TRLName("rloo_k", "RLOOConfig (TRL 0.x)", "ppo.samples_per_prompt"),
    TRLName("max_completion_length", "GRPOConfig, RLOOConfig", "ppo.max_new_tokens"),
    TRLName("response_length", "PPOConfig, RLOOConfig (TRL 0.x)", "ppo.max_new_tokens"),
    TRLName("temperature", "GRPOConfig, RLOOConfig, PPOConfig", "ppo.temperature"),
    TRLName("top_p", "GRPOConfig, RLOOConfig", "ppo.top_p"),
    TRLName("top_k", "GRPOConfig, RLOOConfig", "ppo.top_k"),
    TRLName("num_iterations", "GRPOConfig, RLOOConfig", "ppo.ppo_epochs"),
    TRLName("num_ppo_epochs", "PPOConfig, RLOOConfig (TRL 0.x)", "ppo.ppo_epochs"),
    TRLName("epsilon", "GRPOConfig, RLOOConfig", "ppo.clip_range"),
    TRLName("epsilon_high", "GRPOConfig, RLOOConfig", "ppo.clip_range_high"),
    TRLName("loss_type", "GRPOConfig", "ppo.loss_aggregation",
            "values: grpo = sequence_mean, dr_grpo = constant_length, dapo / bnpo = token_mean"),
    TRLName("importance_sampling_level", "GRPOConfig", "ppo.importance_ratio", "token or sequence (GSPO)"),
    TRLName("cliprange", "PPOConfig (TRL 0.x)", "ppo.clip_range"),
    TRLName("cliprange_value", "PPOConfig (TRL 0.x)", "ppo.clip_range_value"),
    TRLName("vf_coef", "PPOConfig (TRL 0.x)", "ppo.vf_coef"),
    TRLName("kl_coef", "PPOConfig, RLOOConfig (TRL 0.x)", "ppo.kl_coef"),
    TRLName("kl_estimator", "PPOConfig (TRL 0.x)", "ppo.kl_estimator"),
    TRLName("gamma", "PPOConfig (TRL 0.x)", "ppo.gamma"),
    TRLName("lam", "PPOConfig (TRL 0.x)", "ppo.lam"),
    TRLName("whiten_rewards", "PPOConfig (TRL 0.x)", "ppo.whiten_rewards"),
    TRLName("normalize_advantages", "RLOOConfig", "ppo.whiten_advantages"),
    TRLName("missing_eos_penalty", "PPOConfig, RLOOConfig (TRL 0.x)", "ppo.missing_eos_penalty"),
    TRLName("reward_model_path", "PPOConfig, RLOOConfig (TRL 0.x)", "ppo.reward_model"),
    TRLName("sft_model_path", "PPOConfig, RLOOConfig (TRL 0.x)", "model.name_or_path", "the policy starts from it"),
    TRLName("max_new_tokens", "OnlineDPOConfig", "online.max_new_tokens"),
    TRLName("temperature", "OnlineDPOConfig", "online.temperature"),
    TRLName("reward_model_path", "OnlineDPOConfig", "online.reward_model",
            "or online.task: a built-in task's simulated labeler as the judge"),
)


def _section_at(cls: type[BaseModel], path: tuple[str, ...]) -> type[BaseModel] | None:
    """The config section (model class) at ``path`` inside ``cls``, or None where the path leads to no section;
    a list's item numbers (``ppo.rewards.0``) are passed over."""
    for part in path:
        if part.isdigit():
            continue
        field = cls.model_fields.get(part)
        if field is None:
            return None
        stack, cls = [field.annotation], None
        while stack and cls is None:  # the section inside ``X | None``, ``list[X]``, ...
            kind = stack.pop()
            if isinstance(kind, type) and issubclass(kind, BaseModel):
                cls = kind
            else:
                stack.extend(get_args(kind))
        if cls is None:
            return None
    return cls


def _suggest_key(cls: type[BaseModel], loc: tuple[str, ...]) -> tuple[str, ...] | None:
    """What the unknown key ``loc`` of a ``cls`` config most likely means: the rlhfkit key of a TRL name
    (:data:`TRL_NAMES`) that ``cls`` has, else the closest key of its own section
    (:func:`difflib.get_close_matches`, its default cutoff)."""
    name = loc[-1]
    for entry in TRL_NAMES:
        *section, key = entry.key.split(".")
        if entry.name == name and key in getattr(_section_at(cls, tuple(section)), "model_fields", {}):
            return tuple(entry.key.split("."))
    known = getattr(_section_at(cls, loc[:-1]), "model_fields", {})
    close = difflib.get_close_matches(name, list(known), n=1)
    return (*loc[:-1], close[0]) if close else None


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


def key_lines(text: str) -> dict[tuple[str, ...], int]:
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


def _format_errors(cls: type[BaseModel], error: ValidationError, source: str, lines: dict[tuple[str, ...], int],
                   overridden: set[tuple[str, ...]], prefix: tuple[str, ...] = ()) -> str:
    messages = []
    for item in error.errors():
        inside = tuple(str(part) for part in item["loc"])
        loc = (*prefix, *inside)
        key = ".".join(loc) or "(top level)"
        if item["type"] == "extra_forbidden":
            suggestion = _suggest_key(cls, inside)
            detail = "unknown key" + (f"; did you mean {'.'.join((*prefix, *suggestion))}?" if suggestion else "")
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
    """Build a stage config from ``base`` (defaults of the caller), a YAML file and overrides.

    When ``cls`` has a default for every field, its defaults are the starting point, so a partial
    section (``--set sft.lr=1e-4``) updates a nested default instead of replacing it.
    """
    try:
        defaults = cls().model_dump()
    except ValidationError:
        defaults = {}
    tree: dict = _merge(defaults, base or {})
    lines: dict[tuple[str, ...], int] = {}
    source = "<overrides>"
    if path is not None:
        source = str(path)
        try:
            text = Path(path).read_text(encoding="utf-8")
            loaded = yaml.safe_load(text)
            lines = key_lines(text)
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
    return validate_config(cls, tree, source=source, lines=lines, overridden=overridden)


def validate_config(cls: type[StageConfig], tree: dict, *, source: str, lines: dict[tuple[str, ...], int] | None = None,
                    overridden: set[tuple[str, ...]] = frozenset(), prefix: tuple[str, ...] = ()) -> StageConfig:
    """Validate ``tree`` as ``cls``; a :class:`ConfigError` names ``source``, the line and the key of each problem.

    ``prefix`` is where ``tree`` sits in its file (a pipeline's ``sft`` section is validated as an
    :class:`SFTConfig` with prefix ``("sft",)``), so keys and lines are those of the file.
    """
    try:
        return cls.model_validate(tree)
    except ValidationError as error:
        raise ConfigError(_format_errors(cls, error, source, lines or {}, set(overridden), prefix)) from None


def _merge(base: dict, update: dict) -> dict:
    """``update`` merged into ``base``, section by section, as new dicts: sections that YAML aliases share
    (``&anchor`` / ``*anchor``) become copies, so an override of one never changes the other."""
    merged = dict(base)
    for key, value in update.items():
        if isinstance(value, dict):
            merged[key] = _merge(merged[key] if isinstance(merged.get(key), dict) else {}, value)
        else:
            merged[key] = value
    return merged


def config_yaml(config: BaseModel) -> str:
    """The resolved config as YAML, in the order of its fields (what ``config.yaml`` and model cards hold)."""
    return yaml.safe_dump(config.model_dump(mode="json"), sort_keys=False)


def save_config(config: BaseModel, run_dir: str | os.PathLike) -> Path:
    """Write the resolved config as ``config.yaml`` in the run directory."""
    path = Path(run_dir) / "config.yaml"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(config_yaml(config), encoding="utf-8")
    return path
