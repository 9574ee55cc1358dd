"""Step 3 of InstructGPT: optimise the policy against a frozen reward model with PPO.

One iteration (Ouyang et al. 2022; Ziegler et al. 2019; the choices of Huang et al. 2024, "The N+
implementation details of RLHF with PPO", noted where they apply):

1. **Rollout.** Sample completions for a batch of prompts with the policy (left-padded prompts, KV
   cache, temperature / top-k / top-p, stop at EOS or a stop string). The sampling log-probs come
   from the logits ``generate`` already computed, divided by the temperature: no extra forward.
2. **Score.** Reference log-probs (the frozen SFT model, or the LoRA policy with adapters disabled),
   values (a value network initialised from the reward model, or a value head on the policy) and
   the normalised reward-model score; a missing EOS can be penalised, scores clipped.
3. **Rewards and advantages.** Per-token reward = -beta * KL_t, plus the score on the last token;
   GAE with the values, or the group baselines RLOO / GRPO (no value model needed).
4. **Update.** ``ppo_epochs`` passes in minibatches: clipped policy loss + ``vf_coef`` x clipped
   value loss (+ ``ptx_coef`` x pretraining loss, PPO-ptx), early stop past ``1.5 x target_kl``.
5. Adapt beta (Ziegler's controller), update the EMA of the weights, log, checkpoint.

Everything that decides the next iteration (weights, optimizer, scheduler, KL coefficient, EMA, RNG
state, iteration count) is in the checkpoint, so a resumed run continues exactly.

Data parallelism (``torchrun`` / ``accelerate launch`` with N processes). ``ppo.rollout_batch_size`` and
``ppo.minibatch_size`` stay global counts and must be multiples of N:

- Process ``r`` takes the ``r``-th contiguous slice of each iteration's prompts and samples, scores and
  computes the advantages of its share; a prompt's ``samples_per_prompt`` samples stay on one process, so
  the RLOO / GRPO group baselines are those of one process. Process 0 keeps the random stream of a
  one-process run; process ``r > 0`` is reseeded with ``seed + r`` (accelerate's ``device_specific``
  seed) after the weights are built, so every process draws different samples, reproducibly.
- Statistics of the whole rollout are reduced over every process (sums and counts, never whole tensors):
  the advantage whitening and reward whitening, the adaptive KL controller's input (so every process
  keeps the same coefficient) and the logged rollout metrics (``rollout/sequences`` is the global count).
- A minibatch is the union of each process's ``minibatch_size / N`` sequences (each process permutes its
  own share). Every loss term is a token mean; each process weights its share by N x its share of the
  micro-batch's tokens, so that the gradient DDP averages is the gradient of the whole micro-batch's loss.
  The logged update statistics are pooled over every process's tokens, and the target-KL early stop uses
  the pooled ``approxkl``: every process stops at the same minibatch. The policy and the value network are
  one prepared module (:class:`PolicyAndValue`) and every use of them is a call of its forward, so DDP
  averages the gradients of both (a value network's trunk included).
- Only process 0 writes ``metrics.jsonl`` (with its share's ``samples.jsonl`` samples), checkpoints and
  ``final/``; the others wait at barriers. A checkpoint holds every process's RNG state and is resumed
  with the same number of processes.

With a fixed rollout, an update on N processes gives the weights of one process (tested with 2 gloo
processes); sampled runs differ from one-process runs only by their random streams.

FSDP2 (``accelerate launch --config_file configs/accelerate/fsdp-*.yaml``; :mod:`rlhfkit.trainers.base`)
shards the policy and the value network (:class:`PolicyAndValue`: accelerate prepares one model per
optimizer under FSDP2) over the processes, each decoder layer a unit of its own; all of the above holds.

- Every forward gathers each unit's parameters in the FSDP hooks of its module, so nothing calls the
  networks past :class:`PolicyAndValue`'s forward: ``generate`` runs inside it, with ``synced_gpus`` (a
  process whose samples have all ended keeps running discarded forwards until every process's have, so
  that the gathers pair up; transformers turns it on by itself only for its own FSDP wrapping).
- The frozen reference and reward model are not sharded: a whole copy on every process, whose forwards
  are no collectives. LoRA (whose reference is the policy without adapters) and ``ppo.ema_decay`` (the
  EMA would be kept per shard) are refused under FSDP.
- Gradients of the sharded parameters are reduce-scattered by FSDP itself (also those of a value head,
  and of a policy used twice in a micro-batch for PPO-ptx); gradient clipping takes the norm over every
  shard.
- Checkpoints and ``final/`` are those of a run without FSDP, gathered from every process and written by
  process 0 with the base loop's helpers, except that the optimizer state is keyed by parameter name (as
  in the base loop; ``policy.`` / ``value.`` prefixed), so an FSDP checkpoint resumes under FSDP only.

Tested on CPU with 2 gloo processes: a fixed rollout's update equals one process's (GAE with a value
network or a value head with PPO-ptx, RLOO), the sampled log-probs and values are those of the unsharded
networks, and a whole run resumes exactly.
"""

from __future__ import annotations

import copy
import json
import math
import time
from collections.abc import Iterator
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path

import torch
from rich.console import Console
from transformers import AutoModelForSequenceClassification

from rlhfkit.algorithms.advantages import (
    gae,
    grpo_advantages,
    masked_mean,
    masked_whiten,
    pool_means,
    rloo_advantages,
)
from rlhfkit.algorithms.kl import AdaptiveKLController, FixedKLController, kl_estimate, kl_penalized_rewards
from rlhfkit.algorithms.logprobs import masked_lm_loss
from rlhfkit.algorithms.ppo import entropy_from_logits, policy_loss, value_loss
from rlhfkit.config import PPOConfig, save_config
from rlhfkit.data.collators import Example, PadCollator, encode_prompt, pack_texts
from rlhfkit.data.readers import read_records, read_texts
from rlhfkit.models.load import load_causal_lm, position_ids_from_mask, save_model
from rlhfkit.models.reward import load_for_scoring, score_texts
from rlhfkit.trainers.base import (
    CHECKPOINT_PREFIX,
    STATE_FILE,
    MetricsLog,
    TrainingError,
    build_optimizer,
    build_scheduler,
    check_optimizer_layout,
    checkpoints,
    gather_model_state,
    gather_optimizer_state,
    is_sharded,
    load_optimizer_state,
    load_weights,
    refuse_lora_under_fsdp,
    rng_states_of_processes,
    set_rng_state,
    state_loader,
    submodule_state,
    sum_over_processes,
    write_checkpoint,
)

VALUE_DIR = "value_model"


@dataclass
class Rollout:
    """One iteration's sampled sequences and everything computed from them (no gradients).

    Token tensors are ``[N, R]`` over response tokens; ``queries`` is ``[N, Q]`` left-padded. With several
    processes a rollout is this process's share of the iteration's sequences.
    """

    queries: torch.Tensor
    query_mask: torch.Tensor
    responses: torch.Tensor
    response_mask: torch.Tensor
    logprobs: torch.Tensor
    ref_logprobs: torch.Tensor
    values: torch.Tensor | None
    scores: torch.Tensor
    advantages: torch.Tensor
    returns: torch.Tensor | None
    prompts: list
    texts: list[str]

    def select(self, index: torch.Tensor) -> dict[str, torch.Tensor]:
        names = ("queries", "query_mask", "responses", "response_mask", "logprobs", "values", "advantages", "returns")
        return {name: getattr(self, name)[index] for name in names if getattr(self, name) is not None}


class ValueHead(torch.nn.Module):
    """A linear value head on the policy's last hidden state (``value_model: head``)."""

    def __init__(self, hidden_size: int):
        super().__init__()
        self.linear = torch.nn.Linear(hidden_size, 1)
        torch.nn.init.normal_(self.linear.weight, std=1.0 / math.sqrt(hidden_size + 1))
        torch.nn.init.zeros_(self.linear.bias)

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.linear(hidden).squeeze(-1)


def _sequence_inputs(queries, query_mask, responses, response_mask):
    input_ids = torch.cat([queries, responses], dim=1)
    attention_mask = torch.cat([query_mask, response_mask], dim=1)
    return input_ids, attention_mask, position_ids_from_mask(attention_mask)


def policy_forward(policy, batch: dict[str, torch.Tensor], temperature: float, *, hidden: bool = False):
    """Log-probs ``[N, R]`` of the response tokens under ``policy`` (at the sampling temperature),
    the logits that gave them, and the hidden states before each response token when asked.

    Only the last ``R + 1`` positions are turned into logits (``logits_to_keep``): the prompt's
    vocabulary projections are never computed.
    """
    input_ids, attention_mask, position_ids = _sequence_inputs(
        batch["queries"], batch["query_mask"], batch["responses"], batch["response_mask"])
    width = batch["responses"].size(1)
    out = policy(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids, use_cache=False,
                 logits_to_keep=width + 1, output_hidden_states=hidden)
    logits = out.logits[:, :-1] / temperature
    logprobs = -torch.nn.functional.cross_entropy(logits.reshape(-1, logits.size(-1)).float(),
                                                  batch["responses"].reshape(-1), reduction="none")
    states = out.hidden_states[-1][:, -width - 1:-1] if hidden else None
    return logprobs.view_as(batch["responses"].float()), logits, states


def value_forward(value_model, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """Per-token values ``[N, R]`` from a reward-model-shaped network: its score head applied to the
    hidden state before each response token (InstructGPT initialises the value function from the RM)."""
    input_ids, attention_mask, position_ids = _sequence_inputs(
        batch["queries"], batch["query_mask"], batch["responses"], batch["response_mask"])
    trunk = getattr(value_model, value_model.base_model_prefix)
    width = batch["responses"].size(1)
    states = trunk(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                   use_cache=False).last_hidden_state[:, -width - 1:-1]
    return value_model.score(states).squeeze(-1).float()


class PolicyAndValue(torch.nn.Module):
    """The trained networks, the policy and the value network (a :class:`ValueHead`, a reward-model-shaped
    network, or None), as the one module accelerate prepares with the optimizer.

    Every use of them is a call of this module, ``networks(task, ...)``, which runs the method ``task``
    (:meth:`generate`, :meth:`policy_outputs`, :meth:`values`, :meth:`lm_logits`) inside ``forward``, so
    that the engine's hooks see every call: FSDP2 (which accelerate applies to one model per optimizer)
    gathers a unit's parameters in the hooks of its forward, so a call past it (``generate``, a value
    network's trunk) would meet the root's parameters as shards; DDP averages the gradients of whatever a
    call through its forward used, the value network's included.
    """

    def __init__(self, policy: torch.nn.Module, value: torch.nn.Module | None):
        super().__init__()
        self.policy, self.value = policy, value
        # the layer classes FSDP's TRANSFORMER_BASED_WRAP shards as units of their own
        self._no_split_modules = sorted({name for network in (policy, value)
                                         for name in getattr(network, "_no_split_modules", None) or []})

    def forward(self, task: str, *args, **kwargs):
        return getattr(self, task)(*args, **kwargs)

    def generate(self, **kwargs):
        """``generate`` of the policy (with ``synced_gpus`` under FSDP: see :meth:`PPOTrainer._rollout`)."""
        return self.policy.generate(**kwargs)

    def policy_outputs(self, batch: dict[str, torch.Tensor], temperature: float, *, hidden: bool = False):
        """:func:`policy_forward` of the policy."""
        return policy_forward(self.policy, batch, temperature, hidden=hidden)

    def values(self, batch: dict[str, torch.Tensor], states: torch.Tensor | None = None) -> torch.Tensor:
        """Per-token values ``[N, R]``: the value head on the policy's ``states`` (from :meth:`policy_outputs`
        with ``hidden=True``), or :func:`value_forward` of a reward-model-shaped value network."""
        if isinstance(self.value, ValueHead):
            return self.value(states.float())
        return value_forward(self.value, batch)

    def lm_logits(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """The policy's logits on pretraining text (PPO-ptx)."""
        return self.policy(input_ids=input_ids, attention_mask=attention_mask, use_cache=False).logits


def response_masks(responses: torch.Tensor, eos_token_id: int, pad_token_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Mask of real response tokens (up to and including the first EOS) and whether each row ended.

    Rows that stopped without EOS (length limit or stop string) end at their last non-pad token.
    """
    positions = torch.arange(responses.size(1)).expand_as(responses)
    is_eos = responses == eos_token_id
    finished = is_eos.any(-1)
    first_eos = torch.where(finished, is_eos.float().argmax(-1), responses.size(1))
    not_pad = (responses != pad_token_id).long()
    last_real = torch.where(not_pad.any(-1), responses.size(1) - 1 - not_pad.flip(-1).argmax(-1), -1)
    end = torch.where(finished, first_eos, last_real)
    return (positions <= end.unsqueeze(-1)).long(), finished


def truncate_at_stop(text: str, stop_strings: list[str]) -> str:
    """Cut ``text`` right after the earliest stop string it contains."""
    cuts = [text.index(s) + len(s) for s in stop_strings if s in text]
    return text[:min(cuts)] if cuts else text


class PPOTrainer:
    """The PPO loop; see the module docstring. ``train()`` runs (or resumes) to ``train.max_steps``."""

    def __init__(self, config: PPOConfig, console: Console | None = None):
        from accelerate.utils import set_seed

        from rlhfkit.trainers.base import make_accelerator

        if config.train.max_steps is None:
            raise TrainingError("ppo: set train.max_steps (the number of PPO iterations)")
        if config.train.torch_compile:
            raise TrainingError("ppo: train.torch_compile is not supported yet (untested with the rollout's generate; "
                                "pretrain, sft, rm and dpo take it)")
        self.config, self.cfg, self.ppo = config, config.train, config.ppo
        self.console = console or Console(stderr=True)
        self.run_dir = Path(config.train.output_dir)
        set_seed(config.train.seed)  # sampling draws from the global RNG (restored on resume)
        self.accelerator = make_accelerator(config.train.mixed_precision)
        self.sharded = is_sharded(self.accelerator)
        if self.sharded and self.ppo.ema_decay:
            raise TrainingError("ppo: ppo.ema_decay under FSDP is not supported yet (the EMA would be kept per shard "
                                "and is not gathered for checkpoints and final-ema/). Use DDP with ppo.ema_decay.")
        self.world, self.rank = self.accelerator.num_processes, self.accelerator.process_index
        self._check_global_counts()
        # sums over every process of the rollout and update statistics (module docstring); None with one
        self.reduce_sum = sum_over_processes if self.world > 1 else None
        policy, self.tokenizer = load_causal_lm(config.model, seed=config.train.seed)
        refuse_lora_under_fsdp("ppo", policy, self.sharded)
        self.prompts = [r.prompt for r in read_records(config.data.train, "prompt", split=config.data.split,
                                                        limit=config.data.limit)]
        self.reward_model, self.reward_tokenizer = load_for_scoring(self.ppo.reward_model)
        # with LoRA the reference is the policy with its adapters disabled: no second copy in memory. The
        # reference and the reward model are frozen and never prepared: a whole copy on every process, also
        # under FSDP (their forwards are no collectives)
        lora = hasattr(policy, "disable_adapter")
        self.reference = None if lora else copy.deepcopy(policy).eval().requires_grad_(False)
        if self.ppo.advantage != "gae":
            value = None
        elif self.ppo.value_model == "reward":
            value = AutoModelForSequenceClassification.from_pretrained(self.ppo.reward_model)
            if not hasattr(value, "score"):
                raise TrainingError("ppo.value_model=reward needs a decoder reward model with a `score` head; "
                                    "use ppo.value_model=head")
        else:
            value = ValueHead(policy.config.hidden_size)
        modules = [policy] if value is None else [policy, value]
        self.ptx_blocks = (pack_texts(self.tokenizer, read_texts(self.ppo.ptx_data), self.config.data.max_length)
                           if self.ppo.ptx_coef > 0 else [])
        updates_per_epoch = self.ppo.rollout_batch_size * self.ppo.samples_per_prompt // self.ppo.minibatch_size
        self.total_updates = self.cfg.max_steps * self.ppo.ppo_epochs * updates_per_epoch
        optimizer = build_optimizer(modules, self.cfg, "ppo", lr_scales=[1.0, self.ppo.value_lr_scale][:len(modules)])
        scheduler = build_scheduler(optimizer, self.cfg, self.total_updates)
        self.networks, self.optimizer, self.scheduler = self.accelerator.prepare(PolicyAndValue(policy, value),
                                                                                optimizer, scheduler)
        self.has_value = value is not None
        self.kl_controller = (AdaptiveKLController(self.ppo.kl_coef, self.ppo.kl_target, self.ppo.kl_horizon)
                              if self.ppo.adaptive_kl else FixedKLController(self.ppo.kl_coef))
        self.ema = ({n: p.detach().clone() for n, p in self._unwrapped_policy().named_parameters() if p.requires_grad}
                    if self.ppo.ema_decay else None)
        self.metrics = MetricsLog(self.run_dir, "ppo")
        self.step = 0
        if self.rank > 0:  # its own sampling stream; the weights above were built from the shared seed
            set_seed(config.train.seed, device_specific=True)
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
        """The policy itself (its parameters are shards under FSDP: call it through ``self.networks``)."""
        return self.accelerator.unwrap_model(self.networks).policy

    def _unwrapped_value(self) -> torch.nn.Module | None:
        """The value network itself (a :class:`ValueHead`, a reward-model-shaped network, or None)."""
        return self.accelerator.unwrap_model(self.networks).value

    def _prompt_batch(self, iteration: int) -> list:
        """The prompts of an iteration: consecutive slices of per-epoch seeded permutations."""
        size, n = self.ppo.rollout_batch_size, len(self.prompts)
        picked = []
        for index in range(iteration * size, (iteration + 1) * size):
            epoch, position = divmod(index, n)
            order = torch.randperm(n, generator=torch.Generator().manual_seed(self.cfg.seed * 100_003 + epoch))
            picked.append(self.prompts[order[position]])
        return picked

    def _prompt_share(self, prompts: list) -> list:
        """This process's contiguous slice of an iteration's prompts (all of them with one process)."""
        size = len(prompts) // self.world
        return prompts[self.rank * size:(self.rank + 1) * size]

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

    # ---- 1-3: rollout, scores, advantages ------------------------------------------------------
    @torch.no_grad()
    def rollout(self, prompts: list) -> Rollout:
        """Sample, score and compute advantages for ``prompts`` (each ``samples_per_prompt`` times): this
        process's share; the whitening statistics are those of every process's share.

        With ``train.mixed_precision`` bf16/fp16 every forward of the rollout (generation, reference,
        values, reward model) runs under one autocast region: the same precision as the update, and the
        low-precision copies of the policy's weights are cast once for all generation steps, not per token.
        """
        with self.accelerator.autocast():
            return self._rollout(prompts)

    def _rollout(self, prompts: list) -> Rollout:
        ppo, tok = self.ppo, self.tokenizer
        prompts = [p for p in prompts for _ in range(ppo.samples_per_prompt)]  # prompt-major groups
        max_prompt = self.config.data.max_prompt_length
        encoded = [encode_prompt(tok, p)[-max_prompt:] for p in prompts]
        queries_batch = PadCollator(tok.pad_token_id, "left")([Example(ids, [0] * len(ids)) for ids in encoded])
        queries, query_mask = queries_batch["input_ids"], queries_batch["attention_mask"]
        policy = self._unwrapped_policy()
        policy.eval()
        sampling = {"do_sample": True, "temperature": ppo.temperature, "top_k": ppo.top_k or None, "top_p": ppo.top_p}
        stop = {"stop_strings": ppo.stop_strings, "tokenizer": tok} if ppo.stop_strings else {}
        # under FSDP every forward gathers each layer's parameters from every process: synced_gpus keeps a
        # process whose sequences have ended running (discarded) forwards until every process's have, so
        # all run the same number (transformers detects only its own FSDP wrapping, not accelerate's)
        out = self.networks("generate", input_ids=queries, attention_mask=query_mask,
                            max_new_tokens=ppo.max_new_tokens, pad_token_id=tok.pad_token_id,
                            eos_token_id=tok.eos_token_id, return_dict_in_generate=True, output_logits=True,
                            synced_gpus=self.sharded and self.world > 1, **sampling, **stop)
        policy.train()
        responses = out.sequences[:, queries.size(1):]
        response_mask, finished = response_masks(responses, tok.eos_token_id, tok.pad_token_id)
        raw_logits = torch.stack(out.logits, dim=1)[:, :responses.size(1)].float() / ppo.temperature
        logprobs = torch.log_softmax(raw_logits, -1).gather(-1, responses.unsqueeze(-1)).squeeze(-1) * response_mask
        batch = {"queries": queries, "query_mask": query_mask, "responses": responses, "response_mask": response_mask}
        if self.reference is None:  # LoRA (never under FSDP): the policy without its adapters
            with policy.disable_adapter():
                ref_logprobs = self.networks("policy_outputs", batch, ppo.temperature)[0]
        else:
            ref_logprobs = policy_forward(self.reference, batch, ppo.temperature)[0]
        ref_logprobs = ref_logprobs * response_mask
        values = self._values(batch) * response_mask if self.has_value else None

        texts = []
        for row, mask in zip(responses.tolist(), response_mask.tolist(), strict=True):
            ids = [t for t, m in zip(row, mask, strict=True) if m]
            texts.append(truncate_at_stop(tok.decode(ids, skip_special_tokens=True).strip(), ppo.stop_strings))
        scores = torch.tensor(score_texts(self.reward_model, self.reward_tokenizer, prompts, texts,
                                          max_length=self.config.data.max_length + ppo.max_new_tokens,
                                          max_prompt_length=max_prompt))
        if ppo.missing_eos_penalty is not None:
            scores = scores - ppo.missing_eos_penalty * (~finished).float()
        if ppo.reward_clip is not None:
            scores = scores.clamp(-ppo.reward_clip, ppo.reward_clip)

        kl = kl_estimate(logprobs, ref_logprobs, ppo.kl_estimator) * response_mask
        if ppo.advantage == "gae":
            rewards = kl_penalized_rewards(scores, kl, response_mask, self.kl_controller.value)
            if ppo.whiten_rewards:
                rewards = masked_whiten(rewards, response_mask, shift_mean=False, reduce_sum=self.reduce_sum)
            advantages, returns = gae(rewards, values, response_mask, ppo.gamma, ppo.lam)
        else:  # group baselines on the sequence reward (score minus the summed KL penalty)
            sequence_reward = scores - self.kl_controller.value * kl.sum(-1)
            estimator = rloo_advantages if ppo.advantage == "rloo" else grpo_advantages
            advantages = estimator(sequence_reward, ppo.samples_per_prompt).unsqueeze(-1) * response_mask
            returns = None
        if ppo.whiten_advantages and ppo.advantage == "gae":
            advantages = masked_whiten(advantages, response_mask, reduce_sum=self.reduce_sum)
        return Rollout(queries, query_mask, responses, response_mask, logprobs, ref_logprobs, values, scores,
                       advantages, returns, prompts, texts)

    def _values(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """The value network's per-token values of a rollout batch (a value head: on the policy's states)."""
        states = (self.networks("policy_outputs", batch, self.ppo.temperature, hidden=True)[2]
                  if self.ppo.value_model == "head" else None)
        return self.networks("values", batch, states)

    # ---- 4: update ---------------------------------------------------------------------------
    def update(self, rollout: Rollout) -> dict[str, float]:
        """``ppo_epochs`` passes of minibatch updates over this process's ``rollout``; returns averaged
        training statistics.

        With N processes each one passes over its own share in minibatches of ``minibatch_size / N``
        sequences (the same permutation seed on every process); the losses, statistics and the early stop
        are those of the whole minibatch (:meth:`_micro_loss`, module docstring).
        """
        ppo, n = self.ppo, rollout.responses.size(0)
        minibatch = ppo.minibatch_size // self.world
        micro = minibatch // self.cfg.grad_accum
        stats: dict[str, list[float]] = {}
        ptx = self._ptx_batches() if self.ptx_blocks else None
        generator = torch.Generator().manual_seed(self.cfg.seed * 7919 + self.step)
        for _ in range(ppo.ppo_epochs):
            order = torch.randperm(n, generator=generator)
            for start in range(0, n, minibatch):
                approxkls = []
                for micro_start in range(start, start + minibatch, micro):
                    batch = rollout.select(order[micro_start:micro_start + micro])
                    last_micro = micro_start + micro >= start + minibatch
                    with self.accelerator.no_sync(self.networks) if not last_micro else nullcontext():
                        loss, loss_value, step_stats = self._micro_loss(batch, next(ptx) if ptx else None)
                        if not math.isfinite(loss_value):
                            raise TrainingError(f"[ppo] non-finite loss ({loss_value}) at iteration {self.step + 1};"
                                                f" the last good checkpoint is kept in {self.run_dir}")
                        self.accelerator.backward(loss / self.cfg.grad_accum)
                    for name, value in step_stats.items():
                        stats.setdefault(name, []).append(value)
                    approxkls.append(step_stats["policy/approxkl_avg"])
                if self.cfg.max_grad_norm is not None:  # the norm over every process's shard under FSDP: accelerate
                    # recognises the prepared model by the exact list of its parameters
                    self.accelerator.clip_grad_norm_(self.networks.parameters(), self.cfg.max_grad_norm)
                self.optimizer.step()
                self.scheduler.step()
                self.optimizer.zero_grad(set_to_none=True)
                self._update_ema()
                if ppo.target_kl is not None and sum(approxkls) / len(approxkls) > 1.5 * ppo.target_kl:
                    stats.setdefault("policy/early_stop", []).append(1.0)
                    return {name: sum(v) / len(v) for name, v in stats.items()}
        return {name: sum(v) / len(v) for name, v in stats.items()}

    def _micro_loss(self, batch: dict[str, torch.Tensor], ptx_batch: dict[str, torch.Tensor] | None):
        """The loss of this process's micro-batch share to backpropagate, the whole micro-batch's loss value
        and its statistics (:meth:`_pool`)."""
        ppo = self.ppo
        mask = batch["response_mask"]
        tokens = mask.sum()
        hidden = self.has_value and ppo.value_model == "head"
        logprobs, logits, states = self.networks("policy_outputs", batch, ppo.temperature, hidden=hidden)
        pg_loss, pg_stats = policy_loss(logprobs, batch["logprobs"], batch["advantages"], mask, ppo.clip_range)
        # name: (a token mean over this process's share, its number of tokens); loss terms and their coefficients
        means = {"loss/policy_avg": (pg_loss, tokens), "policy/approxkl_avg": (pg_stats["approxkl"], tokens),
                 "policy/clipfrac_avg": (pg_stats["clipfrac"], tokens), "val/ratio": (pg_stats["ratio"], tokens)}
        coefs = {"loss/policy_avg": 1.0}
        with torch.no_grad():
            means["objective/entropy"] = (masked_mean(entropy_from_logits(logits), mask), tokens)
        if self.has_value:
            values = self.networks("values", batch, states)
            vf_loss, vf_stats = value_loss(values, batch["values"], batch["returns"], mask, ppo.clip_range_value)
            means.update({"loss/value_avg": (vf_loss, tokens), "val/clipfrac_avg": (vf_stats["clipfrac"], tokens)})
            coefs["loss/value_avg"] = ppo.vf_coef
        if ptx_batch is not None:
            ptx_logits = self.networks("lm_logits", ptx_batch["input_ids"], ptx_batch["attention_mask"])
            ptx_loss = masked_lm_loss(ptx_logits, ptx_batch["input_ids"], ptx_batch["loss_mask"])
            means["loss/ptx_avg"] = (ptx_loss, ptx_batch["loss_mask"][:, 1:].sum())
            coefs["loss/ptx_avg"] = ppo.ptx_coef
        return self._pool(means, coefs)

    def _pool(self, means: dict[str, tuple[torch.Tensor, torch.Tensor]],
              coefs: dict[str, float]) -> tuple[torch.Tensor, float, dict[str, float]]:
        """(loss to backpropagate, the micro-batch's loss value, {name: the micro-batch's statistic}).

        ``means`` maps each loss term and statistic to its token mean over this process's share and its
        number of tokens; the loss is ``sum(coef x term)``. With one process that is all. With N, the
        micro-batch is every process's share: the means are pooled over every process's tokens (one
        reduction; equal on every process, so the non-finite check and the early stop decide alike) and
        each term is weighted by N x this process's share of its tokens, so that the gradient DDP averages
        over processes is the gradient of the whole micro-batch's loss.
        """
        if self.reduce_sum is None:
            loss = sum(coef * means[name][0] for name, coef in coefs.items())
            return loss, loss.item(), {name: mean.item() for name, (mean, _) in means.items()}
        names = list(means)
        pooled, shares = pool_means([means[n][0] for n in names], [means[n][1] for n in names], self.reduce_sum)
        stats, share = dict(zip(names, pooled.tolist(), strict=True)), dict(zip(names, shares, strict=True))
        loss = sum(coef * means[name][0] * (share[name] * self.world) for name, coef in coefs.items())
        return loss, sum(coef * stats[name] for name, coef in coefs.items()), stats

    @torch.no_grad()
    def _update_ema(self) -> None:
        if self.ema is None:
            return
        for name, param in self._unwrapped_policy().named_parameters():
            if name in self.ema:
                self.ema[name].lerp_(param.detach(), 1.0 - self.ppo.ema_decay)

    # ---- 5: the loop, logging and checkpoints ---------------------------------------------------
    def train(self) -> dict[str, float]:
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

        self.run_dir.mkdir(parents=True, exist_ok=True)
        if self.accelerator.is_main_process:
            save_config(self.config, self.run_dir)
        self._resume()
        last: dict[str, float] = {}
        progress = Progress(TextColumn("[bold]ppo"), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn(),
                            TextColumn("{task.fields[status]}"),
                            disable=not (self.cfg.progress and self.accelerator.is_main_process))
        with progress:
            task = progress.add_task("ppo", total=self.cfg.max_steps, completed=self.step, status="")
            while self.step < self.cfg.max_steps:
                started = time.perf_counter()
                rollout = self.rollout(self._prompt_share(self._prompt_batch(self.step)))
                rollout_s = time.perf_counter() - started
                train_stats = self.update(rollout)
                train_s = time.perf_counter() - started - rollout_s
                coef = self.kl_controller.value
                means, counts = self._rollout_statistics(rollout, coef)
                self.kl_controller.update(means["objective/kl"], counts["sequences"])
                self.step += 1
                last = {"objective/scores": means["objective/scores"], "objective/kl": means["objective/kl"],
                        "objective/rlhf_reward": means["objective/rlhf_reward"],
                        **train_stats, "kl_coef": coef, "response_length": means["response_length"],
                        "lr": self.scheduler.get_last_lr()[0], "time/rollout_s": rollout_s, "time/train_s": train_s,
                        "tokens_per_s": counts["tokens"] * (1 + self.ppo.ppo_epochs) / (rollout_s + train_s),
                        "rollout/sequences": counts["sequences"]}
                if self.step % self.cfg.log_every == 0 or self.step == self.cfg.max_steps:
                    self._log(last, rollout)
                progress.update(task, completed=self.step,
                                status=f"score {last['objective/scores']:.3f} kl {last['objective/kl']:.3f}")
                if self.cfg.save_every and self.step % self.cfg.save_every == 0:
                    self.save_checkpoint()
        self.save_checkpoint()
        weights = submodule_state(gather_model_state(self.accelerator, self.networks), "policy")  # on every process
        if self.accelerator.is_main_process:
            policy = self._unwrapped_policy()
            save_model(policy, self.tokenizer, str(self.run_dir / "final"), state_dict=weights)
            if self.ema is not None:
                ema_policy = copy.deepcopy(policy)
                ema_policy.load_state_dict(self.ema, strict=False)
                save_model(ema_policy, self.tokenizer, str(self.run_dir / "final-ema"))
        self.accelerator.wait_for_everyone()
        return last

    def _rollout_statistics(self, rollout: Rollout, kl_coef: float) -> tuple[dict[str, float], dict[str, int]]:
        """Per-sequence means over the whole rollout (every process's share: one reduction of sums) of the
        score, the summed KL (the adaptive controller's input), the KL-penalised reward and the response
        length; and the rollout's numbers of sequences and of tokens (prompts and responses)."""
        kl_sum = kl_estimate(rollout.logprobs, rollout.ref_logprobs, "k1").mul(rollout.response_mask).sum(-1)
        per_sequence = {"objective/scores": rollout.scores, "objective/kl": kl_sum,
                        "objective/rlhf_reward": rollout.scores - kl_coef * kl_sum,
                        "response_length": rollout.response_mask.sum(-1).float()}
        n_tokens = rollout.response_mask.sum() + rollout.query_mask.sum()
        if self.reduce_sum is None:
            means = {name: values.mean().item() for name, values in per_sequence.items()}
            return means, {"sequences": rollout.responses.size(0), "tokens": int(n_tokens)}
        local = [values.float().sum() for values in per_sequence.values()]
        sequences = torch.tensor(float(rollout.responses.size(0)), device=n_tokens.device)
        *sums, sequences, tokens = self.reduce_sum(torch.stack([*local, sequences, n_tokens.float()])).tolist()
        means = {name: total / sequences for name, total in zip(per_sequence, sums, strict=True)}
        return means, {"sequences": int(sequences), "tokens": int(tokens)}

    def _log(self, metrics: dict[str, float], rollout: Rollout) -> None:
        if not self.accelerator.is_main_process:
            return
        self.metrics.write(self.step, metrics)
        with (self.run_dir / "samples.jsonl").open("a", encoding="utf-8") as handle:
            for i in range(min(self.ppo.samples_to_log, len(rollout.texts))):
                sample = {"step": self.step, "prompt": rollout.prompts[i], "completion": rollout.texts[i],
                          "score": rollout.scores[i].item()}
                handle.write(json.dumps(sample) + "\n")

    def save_checkpoint(self) -> Path:
        """Write ``checkpoint-<step>`` from process 0 (the others wait); ``rng`` is process 0's RNG state and,
        with several processes, ``rng_per_process`` every process's (each draws its own samples).

        The layout of the base loop's checkpoints (:meth:`rlhfkit.trainers.base.Trainer.save_checkpoint`),
        plus the value network (``value_model/``, or ``value_head`` in the state file); under FSDP every
        process joins the gathering of the full weights and optimizer state (keyed by parameter name, with
        the ``policy.`` / ``value.`` prefixes of :class:`PolicyAndValue`)."""
        directory = self.run_dir / f"{CHECKPOINT_PREFIX}{self.step}"
        rng_states = rng_states_of_processes()  # collectives: every process takes part
        weights = gather_model_state(self.accelerator, self.networks)
        optimizer = gather_optimizer_state(self.accelerator, self.networks, self.optimizer)

        def write(tmp: Path) -> None:
            save_model(self._unwrapped_policy(), self.tokenizer, str(tmp), merge_lora=False,
                       state_dict=submodule_state(weights, "policy"))
            state = {"step": self.step, "optimizer": optimizer,
                     "scheduler": self.scheduler.state_dict(), "rng": rng_states[0],
                     "kl_controller": self.kl_controller.state_dict(), "ema": self.ema}
            if self.world > 1:
                state["rng_per_process"] = rng_states
            value, value_weights = self._unwrapped_value(), submodule_state(weights, "value")
            if isinstance(value, ValueHead):
                state["value_head"] = value_weights if value_weights is not None else value.state_dict()
            elif value is not None:
                value.save_pretrained(tmp / VALUE_DIR, state_dict=value_weights)
            torch.save(state, tmp / STATE_FILE)

        if self.accelerator.is_main_process:
            write_checkpoint(directory, write, keep=self.cfg.save_total_limit)
        self.accelerator.wait_for_everyone()
        return directory

    def _resume(self) -> None:
        found = checkpoints(self.run_dir)
        if not (self.cfg.resume and found):
            return
        latest = found[-1]
        state = torch.load(latest / STATE_FILE, weights_only=False)
        per_process = state.get("rng_per_process", [state["rng"]])  # one state per process that wrote it
        if len(per_process) != self.world:
            raise TrainingError(f"ppo: {latest} was written by {len(per_process)} process(es) and holds each one's "
                                f"sampling RNG state; resume it with {len(per_process)}, not {self.world}")
        check_optimizer_layout("ppo", latest, state["optimizer"], self.sharded)
        load_weights(self._unwrapped_policy(), latest, state_loader(self.accelerator, self.networks, "policy"))
        value = self._unwrapped_value()
        if isinstance(value, ValueHead):
            missing, unexpected = state_loader(self.accelerator, self.networks, "value")(state["value_head"])
            if missing or unexpected:
                raise TrainingError(f"{latest}: the value head does not match (missing {missing}, "
                                    f"unexpected {unexpected})")
        elif value is not None:
            load_weights(value, latest / VALUE_DIR, state_loader(self.accelerator, self.networks, "value"))
        load_optimizer_state(self.accelerator, self.networks, self.optimizer, state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        self.kl_controller.load_state_dict(state["kl_controller"])
        self.ema = state["ema"]
        set_rng_state(per_process[self.rank])
        self.step = state["step"]
        if self.accelerator.is_main_process:
            self._truncate_logs()
            self.console.print(f"[ppo] resumed from {latest} at iteration {self.step}")
        self.accelerator.wait_for_everyone()

    def _truncate_logs(self) -> None:
        """Drop the metrics and samples past the resumed iteration (written after the last checkpoint)."""
        self.metrics.truncate_after(self.step)
        samples = self.run_dir / "samples.jsonl"
        if samples.exists():
            kept = [line for line in samples.read_text(encoding="utf-8").splitlines()
                    if line.strip() and json.loads(line)["step"] <= self.step]
            samples.write_text("".join(line + "\n" for line in kept), encoding="utf-8")


def run_ppo(config: PPOConfig, console: Console | None = None) -> dict[str, float]:
    """Optimise the policy of ``config`` against its reward model; returns the last metrics."""
    return PPOTrainer(config, console).train()

