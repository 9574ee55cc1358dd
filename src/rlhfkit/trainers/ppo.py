"""Step 3 of InstructGPT: optimise the policy against a frozen reward model with PPO (or RLOO, GRPO,
REINFORCE++: the advantage estimators of :mod:`rlhfkit.algorithms.estimators`), on the shared loop.

One iteration is one step of the :class:`~rlhfkit.engine.loop.Engine`: the experience of
``rollout_batch_size`` prompts (:mod:`rlhfkit.rollout.experience`: sample, score, reference and value
forwards, KL-shaped rewards, advantages), then the update (this module): ``ppo_epochs`` passes in minibatches,
each one optimizer step, of the clipped policy loss + ``vf_coef`` x the clipped value loss (+ ``ptx_coef`` x
the pretraining loss, PPO-ptx), with an early stop past ``1.5 x target_kl``; then Ziegler's adaptive KL
coefficient and the EMA of the weights. Everything that decides the next iteration (weights, optimizer,
scheduler, KL coefficient, EMA, every process's RNG state, iteration count) is in the checkpoint, so a
resumed run continues exactly.

Data parallelism (N processes; ``ppo.rollout_batch_size`` and ``ppo.minibatch_size`` stay global counts,
multiples of N). Process ``r`` takes the ``r``-th contiguous slice of each iteration's prompts; process 0
keeps the random stream of a one-process run, process ``r > 0`` is reseeded with ``seed + r`` after the
weights are built (so a checkpoint resumes with the same number of processes only). Statistics of the whole
rollout are reduced over every process (sums and counts): the whitening, the adaptive KL controller's input,
the logged rollout metrics. A minibatch is the union of each process's ``minibatch_size / N`` sequences; every
loss term is a token mean, which each process weights by N x its share of the micro-batch's tokens, so that
the gradient DDP averages is the whole micro-batch's; the logged statistics and the target-KL early stop use
the means pooled over every process's tokens, so every process stops at the same minibatch. The policy and
the value network are one prepared module (:class:`~rlhfkit.models.policy_value.PolicyAndValue`) called
through its forward, so DDP averages the gradients of both and FSDP2 gathers the parameters of both; the
frozen reference and reward model are a whole copy on every process. LoRA and ``ppo.ema_decay`` are refused
under FSDP. Tested with 2 gloo processes, DDP and FSDP2: a fixed rollout's update equals one process's, and
a whole run resumes exactly.
"""

from __future__ import annotations

import copy
import json
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from rich.console import Console

from rlhfkit.algorithms.advantages import masked_mean, pooled_loss
from rlhfkit.algorithms.estimators import ESTIMATORS
from rlhfkit.algorithms.kl import AdaptiveKLController, FixedKLController
from rlhfkit.algorithms.logprobs import masked_lm_loss
from rlhfkit.algorithms.ppo import aggregation_count, entropy_from_logits, policy_loss, value_loss
from rlhfkit.config import PPOConfig
from rlhfkit.data.collators import PadCollator, pack_texts
from rlhfkit.data.readers import read_records, read_texts
from rlhfkit.engine.accelerator import refuse_lora_under_fsdp, sum_over_processes
from rlhfkit.engine.checkpoint import load_weights
from rlhfkit.engine.ema import WeightAverage
from rlhfkit.engine.errors import TrainingError
from rlhfkit.engine.loop import Engine
from rlhfkit.engine.metrics import MetricsWindow
from rlhfkit.engine.sharding import state_loader, submodule_state
from rlhfkit.models.load import load_causal_lm, save_model
from rlhfkit.models.policy_value import VALUE_DIR, PolicyAndValue, ValueHead, value_network
from rlhfkit.models.reward import load_for_scoring
from rlhfkit.rollout.experience import (
    ExperienceMaker,
    Rollout,
    Scored,
    informative_groups,
    iteration_prompts,
    process_share,
    rollout_statistics,
)
from rlhfkit.rollout.scoring import reward_sources
from rlhfkit.trainers.base import SAMPLES_FILE, model_card

#: TRL's ``GRPOTrainer`` metric name -> rlhfkit's (TRL's ``PPOTrainer`` names), logged under both for GRPO.
TRL_GRPO_METRICS = {"reward": "objective/scores", "kl": "objective/kl", "entropy": "objective/entropy",
                    "completions/mean_length": "response_length", "clip_ratio/region_mean": "policy/clipfrac_avg"}


class PPOTrainer(Engine):
    """The PPO recipe on the engine; see the module docstring. ``train()`` runs (or resumes) to
    ``train.max_steps`` iterations. ``self.model`` is the prepared :class:`PolicyAndValue`. PPO's messages go
    through accelerate (process 0 prints them)."""

    step_logs = (SAMPLES_FILE,)
    progress_metrics = {"objective/scores": "score", "objective/kl": "kl"}
    own_random_streams = True  # each process samples its own sequences

    def __init__(self, config: PPOConfig):
        if config.train.max_steps is None:
            raise TrainingError("ppo: set train.max_steps (the number of PPO iterations)")
        if config.train.torch_compile:
            raise TrainingError("ppo: train.torch_compile is not supported yet (untested with the rollout's generate; "
                                "pretrain, sft, rm and dpo take it)")
        self.ppo = config.ppo
        super().__init__(stage="ppo", config=config, train=config.train)
        if self.sharded and self.ppo.ema_decay:
            raise TrainingError("ppo: ppo.ema_decay under FSDP is not supported yet (the EMA would be kept per shard "
                                "and is not gathered for checkpoints and final-ema/). Use DDP with ppo.ema_decay.")
        self._check_global_counts()
        # sums over every process of the rollout and update statistics (module docstring); None with one
        self.reduce_sum = sum_over_processes if self.world > 1 else None
        policy, self.tokenizer = load_causal_lm(config.model, seed=config.train.seed)
        refuse_lora_under_fsdp("ppo", policy, self.sharded)
        records = read_records(config.data.train, "prompt", split=config.data.split, limit=config.data.limit)
        self.prompts = [r.prompt for r in records]
        self.prompt_fields = [r.fields for r in records]  # e.g. reference answers, for reward functions
        main_reward = load_for_scoring(self.ppo.reward_model) if self.ppo.reward_model else None
        self.reward_model = main_reward[0] if main_reward else None
        # with LoRA the reference is the policy with its adapters disabled: no second copy in memory. The
        # reference and the reward model are frozen and never prepared: a whole copy on every process, also
        # under FSDP (their forwards are no collectives)
        lora = hasattr(policy, "disable_adapter")
        self.reference = None if lora else copy.deepcopy(policy).eval().requires_grad_(False)
        # the value network the estimator needs: a head on the policy, or the reward model (InstructGPT)
        value = (value_network(self.ppo.value_model, policy, self.ppo.reward_model)
                 if ESTIMATORS[self.ppo.advantage].needs_values else None)
        parts = [policy] if value is None else [policy, value]
        self.ptx_blocks = (pack_texts(self.tokenizer, read_texts(self.ppo.ptx_data), config.data.max_length)
                           if self.ppo.ptx_coef > 0 else [])
        updates_per_epoch = self.ppo.rollout_batch_size * self.ppo.samples_per_prompt // self.ppo.minibatch_size
        self.prepare(PolicyAndValue(policy, value), total_steps=self.cfg.max_steps, parts=parts,
                     optimizer_steps=self.cfg.max_steps * self.ppo.ppo_epochs * updates_per_epoch,
                     lr_scales=[1.0, self.ppo.value_lr_scale][:len(parts)])
        self.has_value = value is not None
        self.kl_controller = (AdaptiveKLController(self.ppo.kl_coef, self.ppo.kl_target, self.ppo.kl_horizon)
                              if self.ppo.adaptive_kl else FixedKLController(self.ppo.kl_coef))
        self.ema = WeightAverage(self._unwrapped_policy(), self.ppo.ema_decay) if self.ppo.ema_decay else None
        rewards = reward_sources(self.ppo.rewards, max_length=config.data.max_length + self.ppo.max_new_tokens,
                                 max_prompt_length=config.data.max_prompt_length, reward_model=main_reward)
        self.experience = ExperienceMaker(
            self.tokenizer, self.reference, rewards, ppo=self.ppo,
            max_prompt_length=config.data.max_prompt_length, reduce_sum=self.reduce_sum,
            synced_gpus=self.sharded and self.world > 1, device=self.accelerator.device)
        self.start_own_random_stream()
        if self.world > 1:
            self.accelerator.print(f"[ppo] data parallel over {self.world} processes "
                                   f"({self.accelerator.distributed_type.value}, {self.ppo.rollout_batch_size} "
                                   f"prompts per rollout, minibatch {self.ppo.minibatch_size}, global)")

    def _check_global_counts(self) -> None:
        """The global rollout and minibatch sizes must split evenly over the processes (and a process's
        minibatch share over ``train.grad_accum`` micro-batches)."""
        if self.world == 1:
            return
        for name in ("rollout_batch_size", "minibatch_size"):
            size = getattr(self.ppo, name)
            if size % self.world:
                raise TrainingError(f"ppo: ppo.{name} ({size}) is a global count and must be a multiple of the "
                                    f"number of processes ({self.world})")
        share = self.ppo.minibatch_size // self.world
        if share % self.cfg.grad_accum:
            raise TrainingError(f"ppo: each process's minibatch share (ppo.minibatch_size / {self.world} = {share}) "
                                f"must be a multiple of train.grad_accum ({self.cfg.grad_accum})")

    # ---- helpers -----------------------------------------------------------------------------
    def _unwrapped_policy(self):
        """The policy itself (its parameters are shards under FSDP: call it through ``self.model``)."""
        return self.accelerator.unwrap_model(self.model).policy

    def _unwrapped_value(self) -> torch.nn.Module | None:
        """The value network itself (a :class:`ValueHead`, a reward-model-shaped network, or None)."""
        return self.accelerator.unwrap_model(self.model).value

    def _prompt_batch(self, iteration: int) -> list[int]:
        """The positions in the prompt data of an iteration's prompts (:func:`iteration_prompts`)."""
        return iteration_prompts(len(self.prompts), self.ppo.rollout_batch_size, iteration, self.cfg.seed)

    def _prompt_share(self, prompts: list) -> list:
        """This process's contiguous slice of an iteration's prompts (:func:`process_share`)."""
        return process_share(prompts, self.rank, self.world)

    def _ptx_batches(self) -> Iterator[dict[str, torch.Tensor]]:
        """Pretraining micro-batches: consecutive blocks, ``minibatch_size / grad_accum`` per micro-batch of
        all processes, of which this process takes every N-th."""
        collate = PadCollator(self.tokenizer.pad_token_id)
        size = self.ppo.minibatch_size // self.cfg.grad_accum
        index = self.step * self.ppo.ppo_epochs * len(self.ptx_blocks)  # a deterministic place to resume
        while True:
            start = (index * size) % len(self.ptx_blocks)
            blocks = [self.ptx_blocks[(start + i) % len(self.ptx_blocks)] for i in range(size)]
            yield collate(blocks[self.rank::self.world])
            index += 1

    # ---- experience, then the update ------------------------------------------------------------
    @torch.no_grad()
    def rollout(self, prompt_positions: list[int]) -> Rollout:
        """The experience of the prompts at ``prompt_positions`` (this process's share,
        :mod:`rlhfkit.rollout.experience`).

        With ``train.mixed_precision`` bf16/fp16 every forward of the rollout (generation, reference, values,
        reward model) runs under one autocast region: the same precision as the update, and the low-precision
        copies of the policy's weights are cast once for all generation steps, not per token.
        """
        with self.accelerator.autocast():
            scored = self._sample_and_score(prompt_positions)
            if self.ppo.dynamic_sampling:
                scored = self._informative(scored)
            return self.experience.complete(self.model, scored, self.kl_controller.value)

    def _sample_and_score(self, prompt_positions: list[int]) -> Scored:
        return self.experience.sample_and_score(self.model, [self.prompts[i] for i in prompt_positions],
                                                prompt_positions, [self.prompt_fields[i] for i in prompt_positions])

    def _informative(self, scored: Scored) -> Scored:
        """DAPO's dynamic sampling: ``scored``'s groups whose samples did not all score the same, then those of
        further prompts (each batch as many as the iteration's, from a stream of their own) until there are as
        many groups as ``scored`` has, or ``ppo.dynamic_sampling_max_batches`` batches were sampled; any place
        left is filled with the first batch's uninformative groups, so that the rollout keeps its size. Every
        process samples as many batches as the one that needs the most (their generations may be collective).
        Logs ``dynamic_sampling/batches`` and ``dynamic_sampling/informative_frac`` (of the groups sampled)."""
        ppo, k = self.ppo, self.ppo.samples_per_prompt
        need = scored.scores.numel() // k

        def rows_of(groups: list[int]) -> list[int]:
            return [g * k + j for g in groups for j in range(k)]

        kept: list[Scored] = []
        have, found, batches, batch = 0, 0, 0, scored
        while True:
            batches += 1
            informative = informative_groups(batch.scores, k)
            found += len(informative)
            kept.append(batch.rows(rows_of(informative[:need - have])))
            have += min(len(informative), need - have)
            missing = torch.tensor(float(need - have), device=self.accelerator.device)
            if self.reduce_sum is not None:  # a process still lacking groups keeps every process sampling
                missing = self.reduce_sum(missing)
            if missing.item() <= 0 or batches == ppo.dynamic_sampling_max_batches:
                break
            extra = iteration_prompts(len(self.prompts), ppo.rollout_batch_size,
                                      self.step * (ppo.dynamic_sampling_max_batches - 1) + batches - 1,
                                      self.cfg.seed + 1)
            batch = self._sample_and_score(self._prompt_share(extra))
        first = set(informative_groups(scored.scores, k))
        kept.append(scored.rows(rows_of([g for g in range(need) if g not in first][:need - have])))
        informative_count = torch.tensor([float(found), float(batches * need)], device=self.accelerator.device)
        if self.reduce_sum is not None:
            informative_count = self.reduce_sum(informative_count)
        self._sampling = {"dynamic_sampling/batches": float(batches),
                          "dynamic_sampling/informative_frac": (informative_count[0] / informative_count[1]).item()}
        return Scored.concat([x for x in kept if x.prompts], self.tokenizer.pad_token_id)

    def update(self, rollout: Rollout) -> dict[str, float]:
        """``ppo_epochs`` passes of minibatch updates over this process's ``rollout``; returns averaged
        training statistics (``grad_norm``: the mean over the optimizer steps).

        With N processes each one passes over its own share in minibatches of ``minibatch_size / N``
        sequences (the same permutation seed on every process); the losses, statistics and the early stop
        are those of the whole minibatch (:meth:`_micro_loss`, module docstring). A minibatch is one
        :meth:`~rlhfkit.engine.loop.Engine.optimizer_step`, whose non-finite guard names the positions of the
        minibatch's prompts.
        """
        ppo, n = self.ppo, rollout.responses.size(0)
        minibatch = ppo.minibatch_size // self.world
        micro = minibatch // self.cfg.grad_accum
        stats, approxkls = MetricsWindow(), []
        ptx = self._ptx_batches() if self.ptx_blocks else None

        def loss(batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, float]:
            loss, loss_value, micro_stats = self._micro_loss(batch, next(ptx) if ptx else None)
            stats.add(micro_stats)
            approxkls.append(micro_stats["policy/approxkl_avg"])
            return loss, loss_value

        generator = torch.Generator().manual_seed(self.cfg.seed * 7919 + self.step)
        for _ in range(ppo.ppo_epochs):
            order = torch.randperm(n, generator=generator)
            for start in range(0, n, minibatch):
                rows = order[start:start + minibatch]
                approxkls.clear()
                micro_batches = [rollout.select(rows[i:i + micro]) for i in range(0, minibatch, micro)]
                grad_norm = self.optimizer_step(micro_batches, loss, rollout.prompt_positions[rows].tolist())
                stats.add({"grad_norm": grad_norm})
                if self.ema is not None:
                    self.ema.update(self._unwrapped_policy())
                if ppo.target_kl is not None and sum(approxkls) / len(approxkls) > 1.5 * ppo.target_kl:
                    stats.add({"policy/early_stop": 1.0})
                    return stats.means()
        return stats.means()

    def _micro_loss(self, batch: dict[str, torch.Tensor], ptx_batch: dict[str, torch.Tensor] | None):
        """The loss of this process's micro-batch share to backpropagate, the whole micro-batch's loss value
        and its statistics (:func:`~rlhfkit.algorithms.advantages.pooled_loss`)."""
        ppo = self.ppo
        mask = batch["response_mask"]
        tokens = mask.sum()
        hidden = self.has_value and ppo.value_model == "head"
        logprobs, logits, states = self.model("policy_outputs", batch, ppo.temperature, hidden=hidden)
        pg_loss, pg_stats = policy_loss(logprobs, batch["logprobs"], batch["advantages"], mask, ppo.clip_range,
                                        ppo.clip_range_high, aggregation=ppo.loss_aggregation,
                                        max_tokens=ppo.max_new_tokens, ratio_level=ppo.importance_ratio)
        # name: (a mean over this process's share, what it counts: tokens, or sequences for a sequence-level
        # policy loss); loss terms and their coefficients
        means = {"loss/policy_avg": (pg_loss, aggregation_count(mask, ppo.loss_aggregation)),
                 "policy/approxkl_avg": (pg_stats["approxkl"], tokens),
                 "policy/clipfrac_avg": (pg_stats["clipfrac"], tokens), "val/ratio": (pg_stats["ratio"], tokens)}
        coefs = {"loss/policy_avg": 1.0}
        with torch.no_grad():
            means["objective/entropy"] = (masked_mean(entropy_from_logits(logits), mask), tokens)
        if self.has_value:
            values = self.model("values", batch, states)
            vf_loss, vf_stats = value_loss(values, batch["values"], batch["returns"], mask, ppo.clip_range_value)
            means.update({"loss/value_avg": (vf_loss, tokens), "val/clipfrac_avg": (vf_stats["clipfrac"], tokens)})
            coefs["loss/value_avg"] = ppo.vf_coef
        if ptx_batch is not None:
            ptx_logits = self.model("lm_logits", ptx_batch["input_ids"], ptx_batch["attention_mask"])
            ptx_loss = masked_lm_loss(ptx_logits, ptx_batch["input_ids"], ptx_batch["loss_mask"])
            means["loss/ptx_avg"] = (ptx_loss, ptx_batch["loss_mask"][:, 1:].sum())
            coefs["loss/ptx_avg"] = ppo.ptx_coef
        return pooled_loss(means, coefs, self.reduce_sum, self.world)

    # ---- the engine's hooks ---------------------------------------------------------------------
    def train_step(self) -> None:
        """One iteration: the experience of this process's prompts, the update, the KL controller."""
        started = time.perf_counter()
        rollout = self.rollout(self._prompt_share(self._prompt_batch(self.step)))
        rollout_s = time.perf_counter() - started
        train_stats = self.update(rollout)
        train_s = time.perf_counter() - started - rollout_s
        coef = self.kl_controller.value
        means, counts = rollout_statistics(rollout, coef, self.reduce_sum, self.ppo.samples_per_prompt)
        self.kl_controller.update(means["objective/kl"], counts["sequences"])
        self._last_rollout = rollout
        self._record = {"objective/scores": means["objective/scores"], "objective/kl": means["objective/kl"],
                        "objective/rlhf_reward": means["objective/rlhf_reward"],
                        **train_stats, "kl_coef": coef, "response_length": means["response_length"],
                        "lr": self.scheduler.get_last_lr()[0], "time/rollout_s": rollout_s, "time/train_s": train_s,
                        "tokens_per_s": counts["tokens"] * (1 + self.ppo.ppo_epochs) / (rollout_s + train_s),
                        "rollout/sequences": counts["sequences"],
                        **{name: value for name, value in means.items()
                           if name.startswith("rewards/") or name in ("reward_std", "frac_reward_zero_std")},
                        **(self._sampling if self.ppo.dynamic_sampling else {})}
        if self.ppo.advantage in ("grpo", "dr_grpo"):  # the same figures under TRL's GRPO names too
            self._record.update({trl: self._record[ours] for trl, ours in TRL_GRPO_METRICS.items()})

    def log_record(self, elapsed_s: float, steps: int) -> dict[str, float]:
        """The last iteration's metrics; process 0 also appends its first ``samples_to_log`` samples to
        ``samples.jsonl`` (``score``: the weighted sum; ``rewards``: each reward source's) and logs them as the
        trackers' ``samples`` table (a column per reward source: ``rewards/<name>``)."""
        rollout = self._last_rollout
        if self.accelerator.is_main_process:
            table = []
            with (self.run_dir / SAMPLES_FILE).open("a", encoding="utf-8") as handle:
                for i in range(min(self.ppo.samples_to_log, len(rollout.texts))):
                    sample = {"step": self.step, "prompt": rollout.prompts[i], "completion": rollout.texts[i],
                              "score": rollout.scores[i].item(),
                              "rewards": {name: values[i].item() for name, values in rollout.source_scores.items()}}
                    handle.write(json.dumps(sample) + "\n")
                    rewards = sample.pop("rewards")
                    table.append({**sample, **{f"rewards/{name}": value for name, value in rewards.items()}})
            self.log_table("samples", table)
        return self._record

    def save_state(self, directory: Path, weights: dict[str, torch.Tensor] | None) -> dict[str, Any]:
        """The policy in the layout of the other trainers' checkpoints, plus the value network
        (``value_model/``, or ``value_head`` in the state file), the KL controller and the EMA."""
        save_model(self._unwrapped_policy(), self.tokenizer, str(directory), merge_lora=False,
                   state_dict=submodule_state(weights, "policy"))
        value_state = self.accelerator.unwrap_model(self.model).save_value(directory, submodule_state(weights, "value"))
        return {"kl_controller": self.kl_controller.state_dict(),
                "ema": None if self.ema is None else self.ema.state_dict(), **value_state}

    def load_state(self, directory: Path, state: dict[str, Any]) -> None:
        load_weights(self._unwrapped_policy(), directory, state_loader(self.accelerator, self.model, "policy"))
        value = self._unwrapped_value()
        if isinstance(value, ValueHead):
            missing, unexpected = state_loader(self.accelerator, self.model, "value")(state["value_head"])
            if missing or unexpected:
                raise TrainingError(f"{directory}: the value head does not match (missing {missing}, "
                                    f"unexpected {unexpected})")
        elif value is not None:
            load_weights(value, directory / VALUE_DIR, state_loader(self.accelerator, self.model, "value"))
        self.kl_controller.load_state_dict(state["kl_controller"])
        if self.ema is not None:
            self.ema.load_state_dict(state["ema"])

    describe_final = model_card

    def save_final(self, directory: Path, weights: dict[str, torch.Tensor] | None) -> None:
        """The policy (and, with ``ppo.ema_decay``, its EMA in ``final-ema/``)."""
        policy = self._unwrapped_policy()
        save_model(policy, self.tokenizer, str(directory), state_dict=submodule_state(weights, "policy"))
        if self.ema is not None:
            save_model(self.ema.averaged_copy(policy), self.tokenizer, str(self.run_dir / "final-ema"))


def run_ppo(config: PPOConfig, console: Console | None = None) -> dict[str, float]:
    """Optimise the policy of ``config`` against its reward model; returns the last metrics.

    ``console`` is the stage runners' common argument (:data:`rlhfkit.pipeline.STAGES`); PPO prints through
    accelerate instead, so that only process 0 speaks."""
    return PPOTrainer(config).train()
