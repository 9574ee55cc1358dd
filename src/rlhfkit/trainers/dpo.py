"""Direct preference optimisation: DPO, IPO, robust DPO, hinge, ORPO and KTO on one trainer.

The policy learns from preferences directly, without a reward model or sampling (Rafailov et al. 2023).
Data: pairwise records ``{"prompt", "chosen", "rejected"}`` or K-way rankings (trained on their non-tied
pairs); for KTO also unpaired records ``{"prompt", "completion", "label": bool}``.

How a step works (every detail in one place):

* An example is one prompt with its responses: a pair (K = 2), a whole K-way ranking with the list of
  its non-tied (winner, loser) pairs, or for KTO a completion and, for the KL estimate, another
  example's completion after the same prompt. ``train.batch_size`` counts examples; the loss is the
  mean over the batch's pairs (KTO: over its completions). As in InstructGPT, the K(K-1)/2 pairs of a
  ranking share one batch element, so each response is scored once, not once per pair.
* **One forward** scores every response of the batch. With ``dpo.share_prompt`` (the default where the
  attention implementation allows it) a row is ``prompt | response_1 | ... | response_K``: positions
  restart after the prompt for every response and a block attention mask lets each response see the
  prompt and itself only, so the prompt is computed once per example. Otherwise (``share_prompt:
  false``) each response gets its own row ``prompt | response``, all rows left-padded to a common width
  (the concatenated batch). Both give the same log-probs (tested); positions come from the layout,
  never from the padding.
* Log-probs are summed over response tokens only (``gathered_logprobs`` picks, for every response
  token, the logits of the position that predicts it), optionally averaged per token
  (``dpo.average_logps``; IPO and ORPO average by default). The LM head runs only from the first
  response position on (``logits_to_keep``).
* The reference is a frozen copy of the initial policy, or with LoRA the same weights with adapters
  disabled (no second copy), or a separate ``dpo.reference_model``; it runs without gradient. With
  ``dpo.precompute_reference`` it runs once over the data before training, the results are cached in
  ``reference_logps.pt`` in the run directory (reused on resume) and no reference stays in memory.
* KTO's reference point (the KL estimate) uses the mismatched responses, detached.

Metrics (TRL's names): ``loss``, ``rewards/chosen``, ``rewards/rejected`` (implicit rewards
``beta * (log pi - log ref)`` on the loss's scale; ORPO: ``beta * mean log pi``), ``rewards/accuracies``,
``rewards/margins``, ``logps/chosen``, ``logps/rejected`` (summed policy log-probs); KTO adds ``kl``,
ORPO ``log_odds_ratio`` and ``nll_loss``.
"""

from __future__ import annotations

import copy
import hashlib
import json
import os
import random
from collections.abc import Callable, Sequence
from contextlib import nullcontext
from dataclasses import dataclass, field, replace
from pathlib import Path

import torch
from rich.console import Console

from rlhfkit.algorithms.dpo import (
    AVERAGES_LOGPS,
    implicit_rewards,
    kto_kl_estimate,
    kto_loss,
    orpo_log_odds_ratio,
    pairwise_loss,
    rpo_nll,
)
from rlhfkit.algorithms.logprobs import gathered_logprobs
from rlhfkit.config import DPOConfig, DPOSection, ModelConfig
from rlhfkit.data.collators import encode_demonstration
from rlhfkit.data.readers import read_records
from rlhfkit.data.records import DataError, LabeledRecord, RankingRecord
from rlhfkit.models.load import load_causal_lm
from rlhfkit.trainers.base import Trainer

REFERENCE_CACHE = "reference_logps.pt"
SHARED_PROMPT_ATTENTION = ("sdpa", "eager")  # implementations that take a custom 4D mask


# ---- examples and batches -------------------------------------------------------------------------


@dataclass(frozen=True)
class PreferenceExample:
    """One prompt and the responses trained on it, tokenized (each response ends with EOS unless truncated).

    Pairwise losses: ``pairs`` lists (winner, loser) indices into ``responses``. KTO: ``responses`` is
    (completion, another example's completion) and ``desirable`` labels the first. ``ref_logps`` are the
    summed response log-probs under the reference, once precomputed.
    """

    prompt: list[int]
    responses: tuple[list[int], ...]
    pairs: tuple[tuple[int, int], ...] = ()
    desirable: bool | None = None
    ref_logps: tuple[float, ...] | None = None
    truncated: bool = field(default=False, compare=False)


class PreferenceCollator:
    """Lays out a batch of :class:`PreferenceExample` for one forward (see the module docstring).

    Returns, for R rows of width T and S responses (numbered example by example):

    * ``input_ids``, ``attention_mask`` (1 on real tokens), ``position_ids`` ``[R, T]``, left-padded;
      with ``share_prompt`` also ``segment_ids`` ``[R, T]``: -1 padding, 0 prompt, k + 1 response k;
    * ``target_row``, ``target_pos``, ``target_pred``, ``target_seq`` ``[N]``: for every response token,
      its row, its column, the column whose logits predict it, and its response index;
    * ``pairs`` ``[P, 2]``: (winner, loser) response indices; ``n_responses`` ``[S]`` zeros (its length is S);
    * when every example has them, ``ref_logps`` ``[S]`` and ``desirable`` ``[B]``.
    """

    def __init__(self, pad_token_id: int, *, share_prompt: bool = True):
        self.pad_token_id, self.share_prompt = pad_token_id, share_prompt

    def row_width(self, example: PreferenceExample) -> int:
        """The width of the widest row ``example`` is laid out in."""
        widths = [len(r) for r in example.responses]
        return len(example.prompt) + (sum(widths) if self.share_prompt else max(widths))

    def _rows(self, examples: Sequence[PreferenceExample]):
        """(ids, positions, segments, [(column, predictor column, response index)]) per row, unpadded."""
        rows, seq = [], 0
        for e in examples:
            p = len(e.prompt)
            if self.share_prompt:
                ids, positions, segments, targets = list(e.prompt), list(range(p)), [0] * p, []
                for k, response in enumerate(e.responses):
                    start = len(ids)
                    ids += response
                    positions += range(p, p + len(response))
                    segments += [k + 1] * len(response)
                    targets += [(start + j, start + j - 1 if j else p - 1, seq) for j in range(len(response))]
                    seq += 1
                rows.append((ids, positions, segments, targets))
            else:
                for response in e.responses:
                    targets = [(p + j, p + j - 1, seq) for j in range(len(response))]
                    rows.append((e.prompt + response, list(range(p + len(response))),
                                 [0] * p + [1] * len(response), targets))
                    seq += 1
        return rows, seq

    def __call__(self, examples: Sequence[PreferenceExample]) -> dict[str, torch.Tensor]:
        rows, n_seq = self._rows(examples)
        width = max(len(ids) for ids, *_ in rows)
        shape = (len(rows), width)
        input_ids = torch.full(shape, self.pad_token_id, dtype=torch.long)
        attention_mask = torch.zeros(shape, dtype=torch.long)
        position_ids = torch.zeros(shape, dtype=torch.long)
        segment_ids = torch.full(shape, -1, dtype=torch.long)
        target = []
        for r, (ids, positions, segments, targets) in enumerate(rows):
            offset = width - len(ids)
            input_ids[r, offset:] = torch.tensor(ids)
            attention_mask[r, offset:] = 1
            position_ids[r, offset:] = torch.tensor(positions)
            segment_ids[r, offset:] = torch.tensor(segments)
            target += [(r, offset + col, offset + pred, seq) for col, pred, seq in targets]
        target_t = torch.tensor(target, dtype=torch.long)
        offsets, pairs = 0, []
        for e in examples:
            pairs += [(offsets + win, offsets + lose) for win, lose in e.pairs]
            offsets += len(e.responses)
        batch = {"input_ids": input_ids, "attention_mask": attention_mask, "position_ids": position_ids,
                 "target_row": target_t[:, 0], "target_pos": target_t[:, 1], "target_pred": target_t[:, 2],
                 "target_seq": target_t[:, 3], "pairs": torch.tensor(pairs, dtype=torch.long).view(-1, 2),
                 "n_responses": torch.zeros(n_seq, dtype=torch.long)}
        if self.share_prompt:
            batch["segment_ids"] = segment_ids
        if all(e.ref_logps is not None for e in examples):
            batch["ref_logps"] = torch.tensor([x for e in examples for x in e.ref_logps], dtype=torch.float32)
        if all(e.desirable is not None for e in examples):
            batch["desirable"] = torch.tensor([e.desirable for e in examples])
        return batch


def block_attention_mask(segment_ids: torch.Tensor, attn_implementation: str, dtype: torch.dtype) -> torch.Tensor:
    """The ``[R, 1, T, T]`` mask of a shared-prompt row: token q sees token k <= q when k is in the prompt
    or in q's own response (padding sees only itself, which keeps its softmax finite).

    Boolean (True = attend) for sdpa; additive (0 or the dtype's minimum) for eager attention.
    """
    width = segment_ids.size(1)
    q, k = segment_ids.unsqueeze(2), segment_ids.unsqueeze(1)
    causal = torch.ones(width, width, dtype=torch.bool, device=segment_ids.device).tril()
    allowed = causal & (k >= 0) & ((k == 0) | (k == q))
    allowed |= torch.eye(width, dtype=torch.bool, device=segment_ids.device)
    allowed = allowed.unsqueeze(1)
    if attn_implementation == "sdpa":
        return allowed
    return torch.zeros(allowed.shape, dtype=dtype, device=allowed.device).masked_fill(~allowed,
                                                                                      torch.finfo(dtype).min)


# ---- log-probs --------------------------------------------------------------------------------------


def _base_model(model: torch.nn.Module) -> torch.nn.Module:
    from accelerate.utils import extract_model_from_parallel

    model = extract_model_from_parallel(model)
    return model.get_base_model() if hasattr(model, "get_base_model") else model


def supports_shared_prompt(model: torch.nn.Module) -> bool:
    """Whether the model's attention takes the block mask of :func:`block_attention_mask`."""
    base = _base_model(model)
    return getattr(base.config, "_attn_implementation", None) in SHARED_PROMPT_ATTENTION


def response_logps(model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """Summed log-probs ``[S]`` of every response of a collated batch, and their token counts ``[S]``."""
    input_ids, pred = batch["input_ids"], batch["target_pred"]
    if "segment_ids" in batch:
        base = _base_model(model)
        mask = block_attention_mask(batch["segment_ids"], base.config._attn_implementation, base.dtype)
    else:
        mask = batch["attention_mask"]
    first = int(pred.min())  # columns before it predict no response token: no logits for them
    keep = input_ids.size(1) - first
    logits = model(input_ids=input_ids, attention_mask=mask, position_ids=batch["position_ids"],
                   use_cache=False, logits_to_keep=keep).logits
    logits = logits[:, logits.size(1) - keep:]  # a model without logits_to_keep returns every column
    token_logps = gathered_logprobs(logits, batch["target_row"], pred - first, input_ids[batch["target_row"],
                                                                                        batch["target_pos"]])
    n = batch["n_responses"].numel()
    sums = torch.zeros(n, dtype=token_logps.dtype, device=token_logps.device).index_add(
        0, batch["target_seq"], token_logps)
    return sums, torch.bincount(batch["target_seq"], minlength=n)


class Reference:
    """The frozen reference policy: a separate module, or the policy itself with LoRA adapters disabled."""

    def __init__(self, module: torch.nn.Module | None = None, *, adapters: bool = False):
        if (module is None) != adapters:
            raise ValueError("a reference is either a module or the policy's disabled adapters")
        self.module, self.adapters = module, adapters
        if module is not None:
            module.eval().requires_grad_(False)

    @torch.no_grad()
    def logps(self, policy: torch.nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        if self.module is not None:
            return response_logps(self.module, batch)[0]
        from accelerate.utils import extract_model_from_parallel

        peft_model = extract_model_from_parallel(policy)
        with peft_model.disable_adapter():
            return response_logps(peft_model, batch)[0]

    def to(self, device: torch.device) -> Reference:
        if self.module is not None:
            self.module.to(device)
        return self


class InitialPolicy(Reference):
    """The untrained policy as its own reference, in eval mode: valid only before the first step (precomputing)."""

    def __init__(self, policy: torch.nn.Module):
        self.module, self.adapters, self.policy = None, False, policy

    @torch.no_grad()
    def logps(self, policy, batch) -> torch.Tensor:
        was_training = self.policy.training
        self.policy.eval()
        try:
            return response_logps(self.policy, batch)[0]
        finally:
            self.policy.train(was_training)


# ---- the loss -----------------------------------------------------------------------------------------


class PreferenceLoss:
    """``loss_fn`` for the shared :class:`Trainer`: (model, batch) -> (loss, units, metrics).

    Reference log-probs come from the batch (precomputed), else from ``reference``, else are zero
    (reference-free; ORPO never needs them). Units are pairs (KTO: completions).
    """

    def __init__(self, settings: DPOSection, reference: Reference | None):
        self.settings, self.reference = settings, reference
        self.average = AVERAGES_LOGPS[settings.loss] if settings.average_logps is None else settings.average_logps
        self.autocast: Callable = nullcontext  # the trainer's autocast, for a reference under mixed precision

    def _reference(self, model, batch) -> torch.Tensor | None:
        if "ref_logps" in batch:
            return batch["ref_logps"]
        if self.reference is None or self.settings.reference_free:
            return None
        with self.autocast():
            return self.reference.logps(model, batch).float()

    def __call__(self, model: torch.nn.Module, batch: dict[str, torch.Tensor]):
        sums, lengths = response_logps(model, batch)  # one forward: every response of the batch
        ref = self._reference(model, batch)
        scale = lengths.clamp(min=1).to(sums.dtype) if self.average else 1.0
        pi = sums / scale
        ref = ref / scale if ref is not None else None
        if self.settings.loss == "kto":
            return self._kto(batch, sums, pi, ref)
        return self._pairwise(batch, sums, lengths, pi, ref)

    def _pairwise(self, batch, sums, lengths, pi, ref):
        s, winners, losers = self.settings, batch["pairs"][:, 0], batch["pairs"][:, 1]
        pi_c, pi_r = pi[winners], pi[losers]
        ref_c, ref_r = (ref[winners], ref[losers]) if ref is not None else (None, None)
        losses = pairwise_loss(s.loss, pi_c, pi_r, ref_c, ref_r, beta=s.beta, label_smoothing=s.label_smoothing,
                               simpo_gamma=s.simpo_gamma)
        if s.rpo_alpha is not None:
            nll = rpo_nll(sums[winners] / lengths[winners].clamp(min=1).to(sums.dtype))
            losses = losses + s.rpo_alpha * nll
        with torch.no_grad():
            if s.reference_free:
                chosen, rejected = s.beta * pi_c, s.beta * pi_r
            else:
                zeros = torch.zeros_like(pi_c)
                chosen = implicit_rewards(pi_c, ref_c if ref_c is not None else zeros, s.beta)
                rejected = implicit_rewards(pi_r, ref_r if ref_r is not None else zeros, s.beta)
            metrics = {"rewards/chosen": chosen.mean(), "rewards/rejected": rejected.mean(),
                       "rewards/accuracies": (chosen > rejected).float().mean(),
                       "rewards/margins": (chosen - rejected).mean(),
                       "logps/chosen": sums[winners].mean(), "logps/rejected": sums[losers].mean()}
            if s.loss == "orpo":
                metrics["log_odds_ratio"] = orpo_log_odds_ratio(pi_c, pi_r).mean()
                metrics["nll_loss"] = -pi_c.mean()
            if s.rpo_alpha is not None:
                metrics["nll_loss"] = nll.mean()
        return losses.mean(), torch.tensor(len(winners)), metrics

    def _kto(self, batch, sums, pi, ref):
        s = self.settings
        ref = ref if ref is not None else torch.zeros_like(pi)
        kl = kto_kl_estimate(pi[1::2], ref[1::2])  # mismatched (prompt, completion) pairs, detached
        desirable = batch["desirable"].bool()
        losses = kto_loss(pi[0::2], ref[0::2], desirable, kl, beta=s.beta, desirable_weight=s.desirable_weight,
                          undesirable_weight=s.undesirable_weight)
        metrics = {"kl": kl}
        with torch.no_grad():
            rewards = implicit_rewards(pi[0::2], ref[0::2], s.beta)
            for name, rows in (("chosen", desirable), ("rejected", ~desirable)):
                if rows.any():
                    metrics[f"rewards/{name}"] = rewards[rows].mean()
                    metrics[f"logps/{name}"] = sums[0::2][rows].mean()
            if desirable.any() and (~desirable).any():
                metrics["rewards/margins"] = metrics["rewards/chosen"] - metrics["rewards/rejected"]
        return losses.mean(), torch.tensor(len(desirable)), metrics


def evaluate_preferences(loss_fn: PreferenceLoss, collator: PreferenceCollator, batch_size: int,
                         device: torch.device) -> Callable:
    """The trainer's ``eval_fn``: loss and metrics over the eval set, each weighted by its units."""

    def evaluate(model: torch.nn.Module, examples: Sequence[PreferenceExample]) -> dict[str, float]:
        sums: dict[str, float] = {}
        weights: dict[str, float] = {}
        for start in range(0, len(examples), batch_size):
            batch = {k: v.to(device) for k, v in collator(examples[start:start + batch_size]).items()}
            loss, units, metrics = loss_fn(model, batch)
            for name, value in {"loss": loss, **metrics}.items():
                sums[name] = sums.get(name, 0.0) + float(value) * int(units)
                weights[name] = weights.get(name, 0.0) + int(units)
        return {name: total / weights[name] for name, total in sums.items()}

    return evaluate


# ---- data ----------------------------------------------------------------------------------------------


@dataclass
class EncodeStats:
    truncated: int = 0
    dropped_pairs: int = 0


def _encode(tokenizer, prompt, completions: Sequence[str], data, stats: EncodeStats) -> tuple[list[int], list]:
    """The prompt's tokens and each completion's (+ EOS), truncated as ``encode_demonstration`` does:
    the prompt keeps its last ``max_prompt_length`` tokens, each response what fits in ``max_length``."""
    prompt_ids, responses = None, []
    for text in completions:
        example = encode_demonstration(tokenizer, prompt, text, max_length=data.max_length,
                                       max_prompt_length=data.max_prompt_length)
        n_prompt = example.loss_mask.index(1)
        prompt_ids = example.input_ids[:n_prompt]
        responses.append(example.input_ids[n_prompt:])
        stats.truncated += example.truncated
    return prompt_ids, responses


def ranking_examples(records: Sequence[RankingRecord], tokenizer, data, stats: EncodeStats) -> list[PreferenceExample]:
    """One example per ranking (a pair is a ranking of two) with its non-tied pairs.

    A pair whose two responses are identical after truncation carries no preference and is dropped
    (counted in ``stats``); a ranking left without pairs is dropped.
    """
    examples = []
    for record in records:
        prompt, responses = _encode(tokenizer, record.prompt, record.completions, data, stats)
        pairs = tuple((win, lose) for win, lose in record.pairs() if responses[win] != responses[lose])
        stats.dropped_pairs += len(record.pairs()) - len(pairs)
        if pairs:
            used = sorted({i for pair in pairs for i in pair})
            index = {old: new for new, old in enumerate(used)}
            examples.append(PreferenceExample(prompt, tuple(responses[i] for i in used),
                                              tuple((index[win], index[lose]) for win, lose in pairs)))
    return examples


def labeled_completions(records: Sequence[LabeledRecord | RankingRecord]) -> list[tuple[object, str, bool]]:
    """(prompt, completion, desirable) triples for KTO.

    Unpaired records keep their label. In a ranking (a pair is a ranking of two) a completion is
    desirable when it beats more completions than beat it, undesirable when the reverse; one that wins
    as often as it loses (the middle of an odd ranking) carries no label and is left out, and a text
    that appears twice counts once.
    """
    triples = []
    for record in records:
        if isinstance(record, LabeledRecord):
            triples.append((record.prompt, record.completion, record.label))
            continue
        balance = [0] * len(record.completions)
        for winner, loser in record.pairs():
            balance[winner] += 1
            balance[loser] -= 1
        seen = set()
        for index, text in enumerate(record.completions):
            if balance[index] != 0 and text not in seen:
                seen.add(text)
                triples.append((record.prompt, text, balance[index] > 0))
    return triples


def kto_examples(records, tokenizer, data, stats: EncodeStats, *, seed: int) -> list[PreferenceExample]:
    """KTO examples: each completion with its label and, for the KL estimate, the completion of another
    example after the same prompt (a fixed seeded cycle, so its reference log-probs can be precomputed)."""
    triples = labeled_completions(records)
    order = list(range(len(triples)))
    random.Random(seed).shuffle(order)
    partner = {order[k]: order[(k + 1) % len(order)] for k in range(len(order))}
    examples = []
    for i, (prompt, completion, desirable) in enumerate(triples):
        prompt_ids, (response,) = _encode(tokenizer, prompt, [completion], data, stats)
        _, (mismatched,) = _encode(tokenizer, prompt, [triples[partner[i]][1]], data, EncodeStats())
        examples.append(PreferenceExample(prompt_ids, (response, mismatched), desirable=desirable))
    return examples


def load_examples(path: str, config: DPOConfig, tokenizer, console: Console | None = None) -> list[PreferenceExample]:
    """Read, validate and tokenize preference data for ``config.dpo.loss``.

    Bad records stop with a :class:`DataError` naming file, line and field (the readers' checks: a
    missing prompt, an empty response, chosen identical to rejected, identical completions ranked apart).
    """
    data, stats = config.data, EncodeStats()
    if config.dpo.loss == "kto":
        records = read_records(path, "labeled", split=data.split, limit=data.limit)
        examples = kto_examples(records, tokenizer, data, stats, seed=config.train.seed)
        if examples and console is not None:
            good = sum(e.desirable for e in examples)
            console.print(f"{path}: {good} desirable and {len(examples) - good} undesirable completions for KTO")
    else:
        records = read_records(path, "ranking", split=data.split, limit=data.limit)
        examples = ranking_examples(records, tokenizer, data, stats)
    if console is not None:
        if stats.truncated:
            console.print(f"[yellow]{path}: {stats.truncated} responses truncated to max_length={data.max_length} "
                          f"/ max_prompt_length={data.max_prompt_length}")
        if stats.dropped_pairs:
            console.print(f"[yellow]{path}: {stats.dropped_pairs} pairs dropped: their responses are identical "
                          "after truncation (raise data.max_length)")
    if not examples:
        raise DataError("holds no preference to train on (every pair identical after truncation)", source=str(path))
    return examples


# ---- the reference ---------------------------------------------------------------------------------


def build_reference(config: DPOConfig, policy: torch.nn.Module) -> Reference | None:
    """The reference ``config.dpo`` asks for (None when reference-free); built before any training step."""
    s = config.dpo
    if s.reference_free or s.reference == "none":
        return None
    if s.reference_model is not None:
        reference, _ = load_causal_lm(ModelConfig(name_or_path=s.reference_model, dtype=config.model.dtype,
                                                  trust_remote_code=config.model.trust_remote_code))
        return Reference(reference)
    if s.reference == "adapters" or (s.reference == "auto" and config.model.lora is not None):
        return Reference(adapters=True)
    if s.precompute_reference:
        return InitialPolicy(policy)  # used once, before training: no copy needed
    return Reference(copy.deepcopy(policy))


@torch.no_grad()
def compute_reference_logps(reference: Reference, policy: torch.nn.Module, examples: Sequence[PreferenceExample],
                            collator: PreferenceCollator, batch_size: int, device: torch.device) -> list[list[float]]:
    """Reference log-probs of every response of every example, in length-sorted batches."""
    order = sorted(range(len(examples)), key=lambda i: len(examples[i].prompt) + sum(map(len, examples[i].responses)))
    out: list[list[float]] = [[] for _ in examples]
    for start in range(0, len(order), batch_size):
        chunk = order[start:start + batch_size]
        batch = {k: v.to(device) for k, v in collator([examples[i] for i in chunk]).items()}
        logps = reference.logps(policy, batch).double().cpu().tolist()
        for i in chunk:
            k = len(examples[i].responses)
            out[i], logps = logps[:k], logps[k:]
    return out


def _fingerprint(config: DPOConfig, splits: dict[str, Sequence[PreferenceExample]]) -> str:
    """What cached reference log-probs depend on: the reference model and every token sequence."""
    digest = hashlib.sha256(json.dumps({"model": config.model.model_dump(mode="json"),
                                        "reference": config.dpo.reference,
                                        "reference_model": config.dpo.reference_model,
                                        "seed": config.train.seed}, sort_keys=True).encode())
    for name, examples in sorted(splits.items()):
        digest.update(name.encode())
        for e in examples:
            digest.update(json.dumps([e.prompt, e.responses]).encode())
    return digest.hexdigest()


def precompute_reference(config: DPOConfig, reference: Reference, policy: torch.nn.Module,
                         splits: dict[str, list[PreferenceExample]], collator: PreferenceCollator,
                         device: torch.device, console: Console | None = None) -> dict[str, list[PreferenceExample]]:
    """Attach reference log-probs to every example: from ``reference_logps.pt`` in the run directory when it
    was made from these data and this reference, else computed once and saved there."""
    path = Path(config.train.output_dir) / REFERENCE_CACHE
    fingerprint = _fingerprint(config, splits)
    cached = torch.load(path, weights_only=True) if path.exists() else None
    if cached is None or cached.get("fingerprint") != fingerprint:
        batch_size = config.train.eval_batch_size or config.train.batch_size
        cached = {"fingerprint": fingerprint}
        for name, examples in splits.items():
            cached[name] = compute_reference_logps(reference, policy, examples, collator, batch_size, device)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(f".{os.getpid()}.tmp")  # several processes may write the same file
        torch.save(cached, tmp)
        tmp.replace(path)
        if console is not None:
            console.print(f"reference log-probs of {sum(len(e) for e in splits.values())} examples saved to {path}")
    return {name: [replace(e, ref_logps=tuple(logps)) for e, logps in zip(examples, cached[name], strict=True)]
            for name, examples in splits.items()}


# ---- the stage ---------------------------------------------------------------------------------------


def build_dpo_trainer(config: DPOConfig, console: Console | None = None) -> Trainer:
    """The policy, its reference, the tokenized preferences and the loop, ready to ``train()``."""
    console = console or Console(stderr=True)
    model, tokenizer = load_causal_lm(config.model, seed=config.train.seed)
    splits = {"train": load_examples(config.data.train, config, tokenizer, console)}
    if config.data.eval:
        splits["eval"] = load_examples(config.data.eval, config, tokenizer, console)
    share = config.dpo.share_prompt
    if share is None:
        share = supports_shared_prompt(model) and not config.model.trust_remote_code
    collator = PreferenceCollator(tokenizer.pad_token_id, share_prompt=share)
    reference = build_reference(config, model)
    if reference is not None and config.dpo.precompute_reference:
        from accelerate import PartialState

        device = PartialState().device  # this process's device (each process scores the data once)
        model.to(device)
        reference.to(device)
        splits = precompute_reference(config, reference, model, splits, collator, device, console)
        reference = None  # every batch now carries its reference log-probs; nothing else is kept
    loss_fn = PreferenceLoss(config.dpo, reference)
    trainer = Trainer(stage="dpo", config=config, train=config.train, model=model, tokenizer=tokenizer,
                      train_examples=splits["train"], eval_examples=splits.get("eval", ()), collator=collator,
                      loss_fn=loss_fn, log_ppl=False, example_length=collator.row_width)
    if reference is not None:
        reference.to(trainer.accelerator.device)
    loss_fn.autocast = trainer.accelerator.autocast
    trainer.eval_fn = evaluate_preferences(loss_fn, collator, config.train.eval_batch_size or config.train.batch_size,
                                           trainer.accelerator.device)
    return trainer


def run_dpo(config: DPOConfig, console: Console | None = None) -> dict[str, float]:
    """Train the policy on preferences; writes the run directory; returns the last metrics."""
    return build_dpo_trainer(config, console).train()
