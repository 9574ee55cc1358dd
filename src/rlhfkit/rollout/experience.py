"""PPO's experience: sample -> score -> reference and value forwards -> KL-shaped rewards -> advantages.

One iteration's rollout (Ouyang et al. 2022; Ziegler et al. 2019; the choices of Huang et al. 2024, "The N+
implementation details of RLHF with PPO", noted where they apply), all without gradients:

1. **Sample** ``samples_per_prompt`` completions of each prompt with the policy
   (:func:`rlhfkit.rollout.generate.sample`: left-padded prompts, KV cache, temperature / top-k / top-p, stop
   at EOS or a stop string): rlhfkit's decoding loop (:mod:`rlhfkit.rollout.decode`: one prompt forward per
   group of ``samples_per_prompt`` rows, finished rows dropped from the batch), or HF ``generate`` where it
   does not apply (under FSDP, among others). A response ends at its first EOS (:func:`response_masks`). The
   sampling log-probs are those of the logits the sampler already computed, divided by the temperature
   (:func:`rlhfkit.algorithms.logprobs.logprobs_of`): no extra forward.
2. **Score** with the reward sources (:mod:`rlhfkit.rollout.scoring`: the reward model, normalised so SFT
   outputs score 0, and the weighted reward models and functions of ``ppo.rewards``); a missing EOS can be
   penalised, scores clipped.
3. **Reference and values**: the frozen reference's log-probs (the SFT model, or the LoRA policy with its
   adapters disabled) and the value network's values, when the estimator uses one.
4. **Rewards and advantages**: the per-token KL estimate and the estimator of ``ppo.advantage``
   (:func:`rlhfkit.algorithms.estimators.estimate_advantages`: where the KL penalty goes, whitening).

With several processes a rollout is this process's share of the iteration's sequences (a prompt's samples
stay on one process, for the group baselines); the whitening statistics are those of every process's share
(``reduce_sum``). Under FSDP every forward of the trained networks gathers each layer's parameters from every
process, so they are all calls of the prepared :class:`~rlhfkit.models.policy_value.PolicyAndValue`
(``generate`` included, with ``synced_gpus``: a process whose sequences have ended keeps running discarded
forwards until every process's have, so that all run the same number; transformers detects only its own
FSDP wrapping, not accelerate's).
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import partial

import torch
from accelerate.utils import extract_model_from_parallel
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from rlhfkit.algorithms.advantages import ReduceSum
from rlhfkit.algorithms.estimators import ESTIMATORS, estimate_advantages
from rlhfkit.algorithms.kl import kl_estimate, kl_penalized_score
from rlhfkit.config import PPOSection
from rlhfkit.models.policy_value import policy_forward
from rlhfkit.rewards.functions import RewardSource, combined_rewards
from rlhfkit.rollout.generate import SamplingConfig, sample
from rlhfkit.rollout.scoring import fields_by_name


@dataclass
class Rollout:
    """One iteration's sampled sequences and everything computed from them (no gradients).

    Token tensors are ``[N, R]`` over response tokens; ``queries`` is ``[N, Q]`` left-padded;
    ``prompt_positions`` ``[N]`` are the positions of each sequence's prompt in the prompt data; ``scores`` is
    the weighted sum of ``source_scores``, each reward source's own ``[N]``. With several processes a rollout
    is this process's share of the iteration's sequences.
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
    prompt_positions: torch.Tensor
    source_scores: dict[str, torch.Tensor]

    def select(self, index: torch.Tensor) -> dict[str, torch.Tensor]:
        """The rows ``index`` of what an update reads."""
        names = ("queries", "query_mask", "responses", "response_mask", "logprobs", "values", "advantages", "returns",
                 "prompt_positions")
        return {name: getattr(self, name)[index] for name in names if getattr(self, name) is not None}


def iteration_prompts(n_prompts: int, batch_size: int, iteration: int, seed: int) -> list[int]:
    """The positions in the prompt data of iteration ``iteration``'s ``batch_size`` prompts: consecutive slices of
    per-epoch seeded permutations (a pure function of the seed, so a resumed run samples the same prompts)."""
    picked = []
    for index in range(iteration * batch_size, (iteration + 1) * batch_size):
        epoch, position = divmod(index, n_prompts)
        order = torch.randperm(n_prompts, generator=torch.Generator().manual_seed(seed * 100_003 + epoch))
        picked.append(int(order[position]))
    return picked


def process_share(items: list, rank: int, world: int) -> list:
    """Process ``rank``'s contiguous slice of an iteration's ``items`` (its prompts), of ``len(items) // world``
    (a multiple of ``world``; all of them with one process): the shares are disjoint and, in process order, the
    whole list, so gathering them in process order gives back the iteration's order."""
    size = len(items) // world
    return items[rank * size:(rank + 1) * size]


@dataclass
class Scored:
    """Sampled and scored sequences (steps 1 and 2), before the reference and value forwards: the fields of
    :class:`Rollout` that they have, ``prompt_positions`` as ``positions``."""

    queries: torch.Tensor
    query_mask: torch.Tensor
    responses: torch.Tensor
    response_mask: torch.Tensor
    logprobs: torch.Tensor
    scores: torch.Tensor
    prompts: list
    texts: list[str]
    positions: torch.Tensor
    source_scores: dict[str, torch.Tensor]

    def rows(self, index: list[int]) -> Scored:
        """The sequences ``index``, in that order."""
        at = torch.tensor(index, dtype=torch.long)
        return Scored(self.queries[at], self.query_mask[at], self.responses[at], self.response_mask[at],
                      self.logprobs[at], self.scores[at], [self.prompts[i] for i in index],
                      [self.texts[i] for i in index], self.positions[at],
                      {name: values[at] for name, values in self.source_scores.items()})

    @staticmethod
    def concat(parts: list[Scored], pad_token_id: int) -> Scored:
        """``parts`` one after the other: prompts left-padded, responses right-padded to the widest."""
        def pad(name: str, value: int, left: bool) -> torch.Tensor:
            width = max(getattr(part, name).size(1) for part in parts)
            padded = []
            for part in parts:
                tensor = getattr(part, name)
                gap = (width - tensor.size(1), 0) if left else (0, width - tensor.size(1))
                padded.append(torch.nn.functional.pad(tensor, gap, value=value))
            return torch.cat(padded)

        return Scored(pad("queries", pad_token_id, True), pad("query_mask", 0, True),
                      pad("responses", pad_token_id, False), pad("response_mask", 0, False), pad("logprobs", 0, False),
                      torch.cat([p.scores for p in parts]), [x for p in parts for x in p.prompts],
                      [x for p in parts for x in p.texts], torch.cat([p.positions for p in parts]),
                      {name: torch.cat([p.source_scores[name] for p in parts]) for name in parts[0].source_scores})


def alike_groups(scores: torch.Tensor, group_size: int) -> torch.Tensor:
    """Per group (``group_size`` consecutive samples of one prompt), whether its samples all scored the same: a
    group baseline learns nothing from such a group (its advantages are zero)."""
    groups = scores.view(-1, group_size)
    return groups.amax(-1) == groups.amin(-1)


def informative_groups(scores: torch.Tensor, group_size: int) -> list[int]:
    """The groups whose scores are not all equal (:func:`alike_groups`): the groups a group baseline learns from
    (DAPO's dynamic sampling keeps only these; Yu et al. 2025, eq. 11)."""
    return torch.nonzero(~alike_groups(scores, group_size)).flatten().tolist()


def response_masks(responses: torch.Tensor, eos_token_id: int, pad_token_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Mask of real response tokens (up to and including the first EOS) and whether each row ended.

    Rows that stopped without EOS (length limit or stop string) end at their last non-pad token.
    """
    positions = torch.arange(responses.size(1), device=responses.device).expand_as(responses)
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


@dataclass
class ExperienceMaker:
    """What a rollout needs besides the trained networks: the tokenizer, the frozen ``reference`` (None: the
    policy with its LoRA adapters disabled), the reward sources (:func:`rlhfkit.rollout.scoring.reward_sources`),
    ``ppo``'s settings, the prompt window, the sums over processes (None with one) and the device."""

    tokenizer: PreTrainedTokenizerBase
    reference: PreTrainedModel | None
    rewards: list[RewardSource]
    ppo: PPOSection
    max_prompt_length: int
    reduce_sum: ReduceSum | None
    synced_gpus: bool
    device: torch.device

    def __call__(self, networks: torch.nn.Module, prompts: list, prompt_positions: list[int],
                 kl_coef: float, prompt_fields: list[dict | None] | None = None) -> Rollout:
        """The rollout of ``prompts`` (each sampled ``samples_per_prompt`` times, prompt-major) by ``networks``
        (the prepared :class:`~rlhfkit.models.policy_value.PolicyAndValue`) with KL coefficient ``kl_coef``;
        ``prompt_fields``: each prompt record's extra fields, for the reward functions."""
        return self.complete(networks, self.sample_and_score(networks, prompts, prompt_positions, prompt_fields),
                             kl_coef)

    @torch.no_grad()
    def sample_and_score(self, networks: torch.nn.Module, prompts: list, prompt_positions: list[int],
                         prompt_fields: list[dict | None] | None = None) -> Scored:
        """Steps 1 and 2 of the module docstring: ``samples_per_prompt`` samples of each prompt, scored."""
        ppo, tok = self.ppo, self.tokenizer
        k = ppo.samples_per_prompt
        prompts = [p for p in prompts for _ in range(k)]  # prompt-major groups
        fields = fields_by_name([f for f in prompt_fields or [None] * len(prompt_positions) for _ in range(k)])
        positions = torch.tensor([p for p in prompt_positions for _ in range(k)])
        policy = extract_model_from_parallel(networks).policy
        policy.eval()
        sampling = SamplingConfig(max_new_tokens=ppo.max_new_tokens, temperature=ppo.temperature, top_k=ppo.top_k,
                                  top_p=ppo.top_p, stop_strings=tuple(ppo.stop_strings))
        sampled = sample(partial(networks, "generate"), tok, prompts, sampling, device=self.device,
                         max_prompt_length=self.max_prompt_length, return_logprobs=True,
                         policy_call=partial(networks, "with_policy"), synced_gpus=self.synced_gpus)
        policy.train()
        responses = sampled.responses
        response_mask, finished = response_masks(responses, tok.eos_token_id, tok.pad_token_id)
        texts, completion_ids = [], []
        for row, mask in zip(responses.tolist(), response_mask.tolist(), strict=True):
            ids = [t for t, m in zip(row, mask, strict=True) if m]
            completion_ids.append(ids)
            texts.append(truncate_at_stop(tok.decode(ids, skip_special_tokens=True).strip(), ppo.stop_strings))
        # reward functions also get each completion's token ids (its EOS included), as TRL passes them
        totals, per_source = combined_rewards(self.rewards, prompts, texts,
                                              {**fields, "completion_ids": completion_ids})
        scores = torch.tensor(totals, device=self.device)
        source_scores = {name: torch.tensor(values, device=self.device) for name, values in per_source.items()}
        if ppo.missing_eos_penalty is not None:
            scores = scores - ppo.missing_eos_penalty * (~finished).float()
        if ppo.reward_clip is not None:
            scores = scores.clamp(-ppo.reward_clip, ppo.reward_clip)
        return Scored(sampled.queries, sampled.query_mask, responses, response_mask,
                      sampled.logprobs * response_mask, scores, prompts, texts, positions, source_scores)

    @torch.no_grad()
    def complete(self, networks: torch.nn.Module, scored: Scored, kl_coef: float) -> Rollout:
        """Steps 3 and 4 of the module docstring on ``scored``: the reference and value forwards, the KL-shaped
        rewards and the advantages."""
        ppo = self.ppo
        response_mask = scored.response_mask
        batch = {"queries": scored.queries, "query_mask": scored.query_mask, "responses": scored.responses,
                 "response_mask": response_mask}
        if self.reference is None:  # LoRA (never under FSDP): the policy without its adapters
            with extract_model_from_parallel(networks).policy.disable_adapter():
                ref_logprobs = networks("policy_outputs", batch, ppo.temperature)[0]
        else:
            ref_logprobs = policy_forward(self.reference, batch, ppo.temperature)[0]
        ref_logprobs = ref_logprobs * response_mask
        values = None
        if ESTIMATORS[ppo.advantage].needs_values:  # a value head reads the policy's hidden states
            states = (networks("policy_outputs", batch, ppo.temperature, hidden=True)[2]
                      if ppo.value_model == "head" else None)
            values = networks("values", batch, states) * response_mask
        kl = kl_estimate(scored.logprobs, ref_logprobs, ppo.kl_estimator) * response_mask
        advantages, returns = estimate_advantages(
            ppo.advantage, scored.scores, kl, response_mask, kl_coef=kl_coef, values=values,
            group_size=ppo.samples_per_prompt, gamma=ppo.gamma, lam=ppo.lam, whiten_rewards=ppo.whiten_rewards,
            whiten_advantages=ppo.whiten_advantages, reduce_sum=self.reduce_sum)
        return Rollout(scored.queries, scored.query_mask, scored.responses, response_mask, scored.logprobs,
                       ref_logprobs, values, scored.scores, advantages, returns, scored.prompts, scored.texts,
                       scored.positions, scored.source_scores)


def rollout_statistics(rollout: Rollout, kl_coef: float, reduce_sum: ReduceSum | None = None,
                       group_size: int = 1) -> tuple[dict[str, float], dict[str, int]]:
    """Per-sequence means over the whole rollout (every process's share: one reduction of sums) of the score,
    each reward source's rewards (``rewards/<name>``), the summed k1 KL (the adaptive controller's input), the
    KL-penalised reward and the response length; and the rollout's numbers of sequences and of tokens (prompts
    and responses).

    With groups (``group_size`` > 1 samples of each prompt, prompt-major), also the spread of the scores within
    a group, under TRL's GRPO names: ``reward_std``, the mean over groups of their (sample) standard deviation,
    and ``frac_reward_zero_std``, the share of groups whose samples all scored the same (their group-relative
    advantages are zero: the update learns nothing from them, as DAPO's dynamic sampling points out).
    """
    kl = kl_estimate(rollout.logprobs, rollout.ref_logprobs, "k1")
    per_sequence = {"objective/scores": rollout.scores, "objective/kl": kl.mul(rollout.response_mask).sum(-1),
                    "objective/rlhf_reward": kl_penalized_score(rollout.scores, kl, rollout.response_mask, kl_coef),
                    "response_length": rollout.response_mask.sum(-1).float(),
                    **{f"rewards/{name}": values for name, values in rollout.source_scores.items()}}
    if group_size > 1:  # every sequence carries its group's figure: equal groups, so the mean is over groups
        groups = rollout.scores.float().view(-1, group_size)
        per_sequence["reward_std"] = groups.std(-1).repeat_interleave(group_size)
        per_sequence["frac_reward_zero_std"] = alike_groups(groups, group_size).float().repeat_interleave(group_size)
    n_tokens = rollout.response_mask.sum() + rollout.query_mask.sum()
    if reduce_sum is None:
        means = {name: values.mean().item() for name, values in per_sequence.items()}
        return means, {"sequences": rollout.responses.size(0), "tokens": int(n_tokens)}
    local = [values.float().sum() for values in per_sequence.values()]
    sequences = torch.tensor(float(rollout.responses.size(0)), device=n_tokens.device)
    *sums, sequences, tokens = reduce_sum(torch.stack([*local, sequences, n_tokens.float()])).tolist()
    means = {name: total / sequences for name, total in zip(per_sequence, sums, strict=True)}
    return means, {"sequences": int(sequences), "tokens": int(tokens)}
