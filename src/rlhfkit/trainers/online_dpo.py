"""Online DPO: the DPO family's pairwise losses on preferences between the policy's own samples, judged while it
trains (Guo et al. 2024, "Direct Language Model Alignment from Online AI Feedback"; TRL's ``OnlineDPOTrainer``;
with ``online.ref_update_every``, iterative DPO with a new reference each round, Xiong et al. 2024).

Offline DPO learns from rankings of another policy's samples (the SFT policy's, in the InstructGPT recipe); as
the policy moves away from it, those preferences say less and less about what it now writes. Online DPO asks for
its preferences on its current samples, as PPO asks its reward model.

One step of the :class:`~rlhfkit.engine.loop.Engine`:

1. ``online.rollout_batch_size`` prompts, in the seeded order PPO reads them (:func:`iteration_prompts`);
2. ``online.num_generations`` samples of each from the current policy (:func:`~rlhfkit.rollout.generate.generate_k`);
3. each prompt's samples ranked by the judge (:func:`judge_rankings`): the task's simulated labeler, or the reward
   sources' weighted sum (the best score first; equal scores tie). A prompt whose samples are one text, or all
   tie, carries no preference and is left out of the step;
4. one optimizer step of :class:`~rlhfkit.trainers.dpo.PreferenceLoss` (``dpo.loss``, ``dpo.beta``) over the
   rankings' pairs (``online.pairs``: every non-tied pair, or the best against the worst), the batch laid out as
   the DPO trainer lays it out, split into ``train.grad_accum`` micro-batches; the loss is the mean over the
   step's pairs;
5. every ``online.ref_update_every`` steps the reference becomes a copy of the policy.

Metrics: the DPO trainer's (``loss``, ``rewards/chosen``, ``rewards/rejected``, ``rewards/accuracies``,
``rewards/margins``, ``logps/chosen``, ``logps/rejected``), ``online/pairs`` and ``online/prompts_without_pair``,
``response_length`` (tokens), with reward sources ``objective/scores`` (the weighted sum's mean) and
``rewards/<source>``; ``samples.jsonl`` holds the first ``online.samples_to_log`` prompts' samples and ranking of
each logged step. Checkpoints hold the reference when it is refreshed, so a resumed run continues exactly.

Data parallelism (N processes, DDP or FSDP2; ``online.rollout_batch_size`` stays a global count, a multiple of N).
Process ``r`` samples and judges the ``r``-th contiguous share of each step's prompts
(:func:`~rlhfkit.rollout.experience.process_share`, as PPO's rollout); process 0 keeps the random streams of a
one-process run (sampling, and the labeler's noise), process ``r > 0`` draws from streams of its own (seed
``train.seed + r``), so a checkpoint resumes with the same number of processes only. Under FSDP every process
samples with the gathered weights and runs as many forwards as the longest generation (``synced_gpus``). Then every
process's judged share is gathered on every process, in process order (:class:`JudgedSamples`): every process holds
the step's rankings as one process would, so the pairs, the micro-batches, the logged metrics and rankings are
those of one process, computed by the same code. Each micro-batch's examples are dealt out (every N-th to each
process) and each process weights its share's mean loss by N x its share of the step's pairs, so that the update
DDP averages is the one-process update on the union of the pairs. A process dealt no example of a micro-batch
(fewer examples than processes) runs the micro-batch's first one with weight 0: every process runs as many
forwards and backwards, which DDP's gradient reduction and FSDP's gathering of the weights need. Gathering the
judged samples, rather than training each process on the pairs of its own prompts, keeps the work even when the
judge leaves one process's prompts without pairs, and leaves a stand-in forward only to micro-batches of fewer
examples than processes. The refreshed reference is a whole copy on every process (gathered from the shards under
FSDP); LoRA is refused under FSDP. Tested with 2 gloo processes, DDP and FSDP2: on fixed samples the run equals one
process's, and it resumes exactly.
"""

from __future__ import annotations

import json
import random
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from rich.console import Console

from rlhfkit.config import OnlineDPOConfig
from rlhfkit.data.readers import read_records
from rlhfkit.data.records import RankingRecord
from rlhfkit.engine.accelerator import gather_objects, refuse_lora_under_fsdp, sum_over_processes
from rlhfkit.engine.checkpoint import load_weights
from rlhfkit.engine.errors import TrainingError
from rlhfkit.engine.loop import Engine
from rlhfkit.engine.sharding import full_model_state, state_loader
from rlhfkit.models.load import load_causal_lm, save_model
from rlhfkit.models.reward import load_for_scoring
from rlhfkit.rewards.functions import RewardSource, combined_rewards
from rlhfkit.rollout.experience import iteration_prompts, process_share
from rlhfkit.rollout.generate import SamplingConfig, generate_k
from rlhfkit.rollout.scoring import fields_by_name, reward_sources
from rlhfkit.tasks import get_task
from rlhfkit.tasks.base import Task
from rlhfkit.trainers.base import SAMPLES_FILE, model_card
from rlhfkit.trainers.dpo import (
    EncodeStats,
    PreferenceCollator,
    PreferenceExample,
    PreferenceLoss,
    build_reference,
    ranking_examples,
    supports_shared_prompt,
)


def score_ranking(scores: Sequence[float]) -> tuple[tuple[int, ...], ...]:
    """Indices of ``scores`` grouped by equal score, the highest group first (each group's indices sorted)."""
    groups: dict[float, list[int]] = {}
    for index, score in enumerate(scores):
        groups.setdefault(score, []).append(index)
    return tuple(tuple(groups[score]) for score in sorted(groups, reverse=True))


def best_against_worst(record: RankingRecord) -> RankingRecord:
    """``record`` cut to one pair: the first of its best group against the first of its worst."""
    best, worst = record.ranking[0][0], record.ranking[-1][0]
    return RankingRecord(record.prompt, (record.completions[best], record.completions[worst]), ((0,), (1,)),
                         labeler=record.labeler)


Judged = tuple[list[RankingRecord | None], list[list[float]] | None, dict[str, list[float]]]


def judge_rankings(prompts: Sequence, samples: Sequence[Sequence[str]], *, task: Task | None = None,
                   sources: Sequence[RewardSource] = (), fields: dict[str, list] | None = None,
                   completion_ids: Sequence[Sequence[list[int]]] | None = None,
                   rng: random.Random | None = None) -> Judged:
    """Each prompt's ``samples`` ranked best first by ``task``'s simulated labeler (drawing from ``rng``) or by the
    weighted sum of ``sources`` (scored in one batch; ``fields``: each prompt's extra fields, one list per name;
    ``completion_ids``: each sample's token ids, passed to reward functions as PPO passes them);
    None where nothing can be preferred (fewer than two distinct texts, or every score equal). Also returns the
    weighted scores per prompt and each source's scores (flat), with reward sources; None and {} with a task."""
    if task is not None:
        if rng is None:
            raise ValueError("a task's simulated labeler needs rng")
        return [task.rank_samples(p, list(s), rng=rng) for p, s in zip(prompts, samples, strict=True)], None, {}
    k = [len(s) for s in samples]
    flat_fields = {name: [v for v, n in zip(values, k, strict=True) for _ in range(n)]
                   for name, values in (fields or {}).items()}
    if completion_ids is not None:
        flat_fields["completion_ids"] = [ids for group in completion_ids for ids in group]
    totals, per_source = combined_rewards(sources, [p for p, n in zip(prompts, k, strict=True) for _ in range(n)],
                                          [c for s in samples for c in s], flat_fields)
    records, scores, start = [], [], 0
    for prompt, texts in zip(prompts, samples, strict=True):
        mine = totals[start:start + len(texts)]
        start += len(texts)
        scores.append(mine)
        ranking = score_ranking(mine)
        records.append(RankingRecord(prompt, tuple(texts), ranking) if len(ranking) > 1 else None)
    return records, scores, per_source


@dataclass
class JudgedSamples:
    """One step's prompts (``positions`` in the prompt data, in the step's order), each prompt's sampled ``texts``,
    the judge's ``records`` (None: no preference), with reward sources the weighted ``scores`` per prompt and each
    source's flat scores (``per_source``), and every sample's ``lengths`` in tokens."""

    positions: list[int]
    prompts: list
    texts: list[list[str]]
    records: list[RankingRecord | None]
    scores: list[list[float]] | None
    per_source: dict[str, list[float]]
    lengths: list[int]

    @staticmethod
    def concat(parts: Sequence[JudgedSamples]) -> JudgedSamples:
        """``parts`` one after the other (every process's share, in process order: the whole step)."""
        first = parts[0]
        return JudgedSamples([x for p in parts for x in p.positions], [x for p in parts for x in p.prompts],
                             [x for p in parts for x in p.texts], [x for p in parts for x in p.records],
                             None if first.scores is None else [x for p in parts for x in p.scores],
                             {name: [x for p in parts for x in p.per_source[name]] for name in first.per_source},
                             [x for p in parts for x in p.lengths])


class OnlineDPOTrainer(Engine):
    """Online DPO on the engine; see the module docstring. ``self.model`` is the prepared policy."""

    step_logs = (SAMPLES_FILE,)
    progress_metrics = {"loss": "loss", "online/pairs": "pairs"}
    own_random_streams = True  # each process samples its own share

    def __init__(self, config: OnlineDPOConfig):
        if config.train.max_steps is None:
            raise TrainingError("online_dpo: set train.max_steps (the number of steps, each one round of sampling, "
                                "judging and one update)")
        self.online = config.online
        super().__init__(stage="online_dpo", config=config, train=config.train)
        if self.online.rollout_batch_size % self.world:
            raise TrainingError(f"online_dpo: online.rollout_batch_size ({self.online.rollout_batch_size}) is a global "
                                f"count and must be a multiple of the number of processes ({self.world})")
        policy, self.tokenizer = load_causal_lm(config.model, seed=config.train.seed)
        refuse_lora_under_fsdp("online_dpo", policy, self.sharded)
        records = read_records(config.data.train, "prompt", split=config.data.split, limit=config.data.limit)
        self.prompts = [r.prompt for r in records]
        self.prompt_fields = [r.fields for r in records]
        self.task = get_task(self.online.task) if self.online.task else None
        main_reward = load_for_scoring(self.online.reward_model) if self.online.reward_model else None
        self.sources = [] if self.task else reward_sources(
            self.online.rewards, max_length=config.data.max_length + self.online.max_new_tokens,
            max_prompt_length=config.data.max_prompt_length, reward_model=main_reward)
        share = config.dpo.share_prompt
        if share is None:
            share = supports_shared_prompt(policy) and not config.model.trust_remote_code
        self.collator = PreferenceCollator(self.tokenizer.pad_token_id, share_prompt=share)
        self.reference = build_reference(config, policy)
        self.loss_fn = PreferenceLoss(config.dpo, self.reference)
        self.prepare(policy, total_steps=config.train.max_steps)
        if self.reference is not None:
            self.reference.to(self.accelerator.device)
        self.loss_fn.autocast = self.accelerator.autocast
        per_process = self.online.rollout_batch_size // self.world
        self.sampling = SamplingConfig(max_new_tokens=self.online.max_new_tokens, temperature=self.online.temperature,
                                       top_k=self.online.top_k, top_p=self.online.top_p,
                                       batch_size=per_process * self.online.num_generations)
        self.model.train()
        self.start_own_random_stream()
        if self.world > 1:
            self.accelerator.print(f"[online_dpo] data parallel over {self.world} processes "
                                   f"({self.accelerator.distributed_type.value}, {self.online.rollout_batch_size} "
                                   "prompts per step, global)")

    def _policy(self) -> torch.nn.Module:
        return self.accelerator.unwrap_model(self.model)

    # ---- one step -------------------------------------------------------------------------------
    def _sample_and_judge(self, positions: list[int]) -> JudgedSamples:
        """This process's share of the step: its prompts (at ``positions``) sampled and judged. Under FSDP every
        process runs as many forwards of the sharded policy as the one whose samples end last (``synced_gpus``).
        The labeler's noise: process ``r`` draws from a stream of seed ``(train.seed + r, step)``."""
        online = self.online
        prompts = [self.prompts[i] for i in positions]
        with torch.no_grad(), self.accelerator.autocast():
            samples = generate_k(self._policy(), self.tokenizer, prompts, online.num_generations, self.sampling,
                                 synced_gpus=self.sharded and self.world > 1)
        texts = [[g.text for g in group] for group in samples]
        records, scores, per_source = judge_rankings(
            prompts, texts, task=self.task, sources=self.sources,
            fields=fields_by_name([self.prompt_fields[i] for i in positions]),
            completion_ids=[[g.token_ids + [self.tokenizer.eos_token_id] * g.finished for g in group]
                            for group in samples],
            rng=random.Random((self.cfg.seed + self.rank) * 1_000_003 + self.step))
        return JudgedSamples(positions, prompts, texts, records, scores, per_source,
                             [len(g.token_ids) for group in samples for g in group])

    def train_step(self) -> None:
        started = time.perf_counter()
        online = self.online
        positions = iteration_prompts(len(self.prompts), online.rollout_batch_size, self.step, self.cfg.seed)
        # every process's share, gathered in process order: the step's samples as one process has them
        step = JudgedSamples.concat(gather_objects(self._sample_and_judge(process_share(positions, self.rank,
                                                                                         self.world))))
        judged = [r if r is None or online.pairs == "all" else best_against_worst(r) for r in step.records]
        rollout_s = time.perf_counter() - started
        stats = EncodeStats()
        examples = [(position, example) for position, record in zip(step.positions, judged, strict=True)
                    if record is not None
                    for example in ranking_examples([record], self.tokenizer, self.config.data, stats)]
        pairs = sum(len(e.pairs) for _, e in examples)
        update = self._update(examples) if examples else {}
        if online.ref_update_every and (self.step + 1) % online.ref_update_every == 0:
            self.reference.module.load_state_dict(full_model_state(self.accelerator, self.model))
        self._record = {**update, "online/pairs": pairs,
                        "online/prompts_without_pair": len(step.prompts) - len(examples),
                        "response_length": sum(step.lengths) / len(step.lengths),
                        "lr": self.scheduler.get_last_lr()[0],
                        "time/rollout_s": rollout_s, "time/train_s": time.perf_counter() - started - rollout_s}
        if step.scores is not None:
            flat = [s for group in step.scores for s in group]
            self._record["objective/scores"] = sum(flat) / len(flat)
            self._record.update({f"rewards/{name}": sum(v) / len(v) for name, v in step.per_source.items()})
        # a ranking's indices are into its record's completions (a labeler leaves empty ones out)
        self._logged = [{"step": self.step + 1, "prompt": prompt,
                         "completions": group if record is None else list(record.completions),
                         "ranking": None if record is None else [list(g) for g in record.ranking],
                         **({} if step.scores is None else {"scores": step.scores[i]})}
                        for i, (prompt, group, record) in enumerate(zip(step.prompts, step.texts, step.records,
                                                                        strict=True))
                        ][:online.samples_to_log]

    def _update(self, examples: list[tuple[int, PreferenceExample]]) -> dict[str, float]:
        """One optimizer step of the preference loss over the step's ``examples`` (each with its prompt's position)
        in ``train.grad_accum`` micro-batches; the step's loss and metrics are means over its pairs.

        Every process holds the whole list: a micro-batch is the same on every process, each takes every N-th of
        its examples, and weights its share's mean loss by N x its share of the step's pairs (the gradient DDP
        averages is then the one-process gradient). A process left without examples in a micro-batch (fewer than
        N) runs the micro-batch's first example with weight 0: every process runs as many forwards and backwards
        (FSDP gathers the weights in each). The metrics are sums over every process's share (one reduction per
        micro-batch, which also gives every process the micro-batch's loss for the non-finite guard)."""
        chunks = [c for c in (examples[i::self.cfg.grad_accum] for i in range(self.cfg.grad_accum)) if c]
        total = sum(len(e.pairs) for _, e in examples)
        means: dict[str, float] = {}
        device = self.accelerator.device

        def loss(chunk: list[tuple[int, PreferenceExample]]) -> tuple[torch.Tensor, float]:
            share = [e for _, e in chunk[self.rank::self.world]]
            batch = {k: v.to(device) for k, v in self.collator(share or [chunk[0][1]]).items()}
            value, units, metrics = self.loss_fn(self.model, batch)
            units = int(units) if share else 0  # a stand-in forward weighs nothing
            sums = sum_over_processes(torch.stack([m.detach().float() for m in (value, *metrics.values())]) * units)
            for name, total_value in zip(("loss", *metrics), sums.tolist(), strict=True):
                means[name] = means.get(name, 0.0) + total_value / total
            # optimizer_step divides each micro-batch's loss by the number of micro-batches
            return (value * (units * self.world * len(chunks) / total),
                    sums[0].item() / sum(len(e.pairs) for _, e in chunk))

        mine = [position for chunk in chunks for position, _ in chunk[self.rank::self.world]]
        grad_norm = self.optimizer_step(chunks, loss, mine)
        return {**means, "grad_norm": grad_norm}

    # ---- the engine's hooks ---------------------------------------------------------------------
    def log_record(self, elapsed_s: float, steps: int) -> dict[str, float]:
        """The last step's metrics; process 0 appends its first ``online.samples_to_log`` prompts' samples and
        rankings (of every process's share) to ``samples.jsonl``."""
        if self.accelerator.is_main_process:
            with (self.run_dir / SAMPLES_FILE).open("a", encoding="utf-8") as handle:
                for row in self._logged:
                    handle.write(json.dumps(row) + "\n")
        return {**self._record, "s_per_step": elapsed_s / steps}

    def save_state(self, directory: Path, weights: dict[str, torch.Tensor] | None) -> dict[str, Any]:
        save_model(self._policy(), self.tokenizer, str(directory), merge_lora=False, state_dict=weights)
        refreshed = self.online.ref_update_every and self.step >= self.online.ref_update_every
        return {"reference": self.reference.module.state_dict() if refreshed else None}  # written at once

    def load_state(self, directory: Path, state: dict[str, Any]) -> None:
        load_weights(self._policy(), directory, state_loader(self.accelerator, self.model))
        if state.get("reference") is not None:
            self.reference.module.load_state_dict(state["reference"])

    describe_final = model_card

    def save_final(self, directory: Path, weights: dict[str, torch.Tensor] | None) -> None:
        save_model(self._policy(), self.tokenizer, str(directory), state_dict=weights)


def run_online_dpo(config: OnlineDPOConfig, console: Console | None = None) -> dict[str, float]:
    """Train the policy by online DPO; writes the run directory; returns the last metrics. ``console`` is the stage
    runners' common argument (:data:`rlhfkit.pipeline.STAGES`); the engine's progress bar reports instead."""
    return OnlineDPOTrainer(config).train()
