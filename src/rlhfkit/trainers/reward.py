"""Step 2 of InstructGPT: a reward model trained on K-way rankings of the SFT model's outputs.

A training example is one prompt with its K completions and the (winner, loser) pairs of its ranking
(ties make no pair; a pairwise record is a ranking with K = 2). A micro-batch of B prompts is one
forward pass over all their completions, flattened to ``sum_b K_b`` rows; the loss of
:mod:`rlhfkit.algorithms.ranking` then gathers the pair rewards by index, each prompt one batch element.

After training, the run directory holds, besides the shared layout (``final/``, ``metrics.jsonl``, ...):

* ``final/config.json`` with ``rlhfkit_reward_mean`` (and ``rlhfkit_reward_std`` with
  ``reward.normalize_std``): the reference (SFT) outputs score mean 0 (std 1) through
  :func:`~rlhfkit.models.reward.normalized_rewards`;
* ``calibration.json``: held-out accuracy overall and per K, the mean margin, and the calibration table
  (predicted ``sigmoid(r_w - r_l)`` in bins vs observed accuracy).

Metrics (``metrics.jsonl``): ``loss``, ``accuracy``, ``margin`` on training batches, and ``eval/loss``,
``eval/accuracy``, ``eval/margin``, ``eval/accuracy/k<K>`` on the eval set. ``margin`` is TRL's
``RewardTrainer`` name and quantity: the mean of ``r_chosen - r_rejected`` over the batch's pairs (a
ranking's non-tied pairs, each counted once); ``reward_margin`` (and ``eval/reward_margin``), the same value,
stays for readers of rlhfkit's earlier name. ``accuracy`` is TRL's too, except that an exact tie counts as
half right (TRL counts it wrong).

With ``reward.length_head`` (ODIN, :func:`make_loss_fn`) the model trains a second output, a length head,
logged as ``length_corr/quality``, ``length_corr/length`` and ``orthogonality``; ``eval/`` metrics,
``calibration.json``, the normalisation and ``final/`` (rewritten as a one-output model by
:func:`~rlhfkit.models.reward.drop_length_head`) are the quality head's alone, the reward RL sees.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from rich.console import Console

from rlhfkit.algorithms.ranking import (
    PairIndex,
    calibration_table,
    expand_pairs,
    head_orthogonality,
    length_disentangle_loss,
    length_preference_sign,
    pair_margins,
    pairwise_accuracy,
    pearson,
    ranking_loss,
)
from rlhfkit.config import RewardConfig, RewardSection
from rlhfkit.data.readers import iter_jsonl, read_records
from rlhfkit.data.records import DataError, Prompt, RankingRecord
from rlhfkit.models.reward import (
    drop_length_head,
    encode_for_reward,
    head_weight,
    is_decoder_only,
    load_reward_model,
    pad_rows,
    padding_side,
    reward_outputs,
    score_texts,
    sequence_rewards,
    set_normalization,
    set_window,
)
from rlhfkit.trainers.base import Trainer, TrainingError


@dataclass(frozen=True)
class RankingExample:
    """One prompt's K tokenized completions (prompt included), its ranking's (winner, loser) pairs and the
    completions' lengths in tokens."""

    sequences: tuple[tuple[int, ...], ...]
    pairs: tuple[tuple[int, int], ...]
    truncated: bool = False
    lengths: tuple[int, ...] = ()

    @property
    def k(self) -> int:
        return len(self.sequences)


class RankingCollator:
    """Flattens the completions of a batch of :class:`RankingExample` into one padded batch.

    Returns ``input_ids`` / ``attention_mask`` ``[N, T]`` (N = sum of the K's), the pair indices
    ``winner``, ``loser``, ``pair_prompt`` ``[P]`` (see :func:`~rlhfkit.algorithms.ranking.expand_pairs`)
    ``k`` ``[B]``, each prompt's number of completions, and ``lengths`` ``[N]``, the completions' token counts.
    """

    def __init__(self, pad_token_id: int, side: str):
        self.pad_token_id, self.side = pad_token_id, side

    def __call__(self, examples: Sequence[RankingExample]) -> dict[str, torch.Tensor]:
        input_ids, attention_mask = pad_rows([s for e in examples for s in e.sequences], self.pad_token_id,
                                             self.side)
        index = expand_pairs([e.pairs for e in examples], [e.k for e in examples])
        return {"input_ids": input_ids, "attention_mask": attention_mask, "winner": index.winner,
                "loser": index.loser, "pair_prompt": index.prompt,
                "k": torch.tensor([e.k for e in examples], dtype=torch.long),
                "lengths": torch.tensor([n for e in examples for n in e.lengths], dtype=torch.float32)}


def encode_rankings(tokenizer, records: Sequence[RankingRecord], *, decoder: bool, max_length: int,
                    max_prompt_length: int, source: str = "", console: Console | None = None) -> list[RankingExample]:
    """Tokenize ranking records; report how many completions had to be truncated."""
    examples = []
    for record in records:
        encoded = encode_for_reward(tokenizer, record.prompt, record.completions, decoder=decoder,
                                    max_length=max_length, max_prompt_length=max_prompt_length)
        examples.append(RankingExample(tuple(tuple(e.ids) for e in encoded), tuple(record.pairs()),
                                       any(e.truncated for e in encoded), tuple(e.completion_tokens for e in encoded)))
    truncated = sum(e.truncated for e in examples)
    if truncated and console is not None:
        console.print(f"[yellow]{source}: {truncated} of {len(examples)} rankings have completions truncated to "
                      f"max_length={max_length} / max_prompt_length={max_prompt_length} (their reward is read "
                      "before the end of the completion)")
    return examples


def _pairs(batch: dict[str, torch.Tensor]) -> PairIndex:
    return PairIndex(batch["winner"], batch["loser"], batch["pair_prompt"])


def make_loss_fn(reward: RewardSection, *, decoder: bool, length_sign: float = 1.0):
    """The trainer's loss: one forward over the batch's completions, the ranking loss over its pairs.

    With ``reward.length_head`` (ODIN) the ranking loss sees the sum of the quality and length heads, plus the
    length-correlation loss (towards ``length_sign``, the training labels' length preference) and the
    orthogonality loss; ``accuracy`` and ``margin`` are then the sum's, and
    ``length_corr/quality`` and ``length_corr/length`` each head's Pearson correlation with the completions'
    token counts over the batch.
    """

    def loss_fn(model, batch: dict[str, torch.Tensor]):
        outputs = reward_outputs(model, batch["input_ids"], batch["attention_mask"], decoder=decoder)
        rewards = outputs.sum(-1) if reward.length_head else outputs[:, 0]
        pairs = _pairs(batch)
        loss = ranking_loss(rewards, pairs, margin=reward.margin, pair_weighting=reward.pair_weighting,
                            center_coef=reward.center_coef)
        margins = pair_margins(rewards.detach(), pairs.winner, pairs.loser)
        mean_margin = margins.mean()
        stats = {"accuracy": pairwise_accuracy(margins), "margin": mean_margin, "reward_margin": mean_margin}
        if reward.length_head:
            quality, length_reward, lengths = outputs[:, 0], outputs[:, 1], batch["lengths"]
            orthogonality = head_orthogonality(head_weight(model))
            loss = loss + reward.length_corr_coef * length_disentangle_loss(quality, length_reward, lengths,
                                                                                   length_sign) \
                + reward.orthogonal_coef * orthogonality
            stats.update({"length_corr/quality": pearson(quality.detach(), lengths),
                          "length_corr/length": pearson(length_reward.detach(), lengths),
                          "orthogonality": orthogonality.detach()})
        # what the loss averages over: prompts (each one batch element, InstructGPT) or pairs
        units = pairs.prompt.unique().numel() if reward.pair_weighting == "per_prompt" else len(pairs)
        return loss, torch.tensor(units), stats

    return loss_fn


@torch.no_grad()
def ranking_margins(model, examples: Sequence[RankingExample], collator: RankingCollator, *, decoder: bool,
                    batch_size: int, reward: RewardSection) -> dict[str, torch.Tensor | float]:
    """Margins ``r_w - r_l`` of every pair of ``examples`` ``[P]``, each pair's K ``[P]``, and the loss.

    The loss is the training loss of each batch, averaged over batches weighted by their prompts.
    """
    device = next(model.parameters()).device
    margins, ks, loss_sum = [], [], 0.0
    for start in range(0, len(examples), batch_size):
        chunk = examples[start:start + batch_size]
        batch = {k: v.to(device) for k, v in collator(chunk).items()}
        rewards = sequence_rewards(model, batch["input_ids"], batch["attention_mask"], decoder=decoder)
        pairs = _pairs(batch)
        loss = ranking_loss(rewards, pairs, margin=reward.margin, pair_weighting=reward.pair_weighting,
                            center_coef=reward.center_coef)
        loss_sum += loss.item() * len(chunk)
        margins.append(pair_margins(rewards, pairs.winner, pairs.loser).cpu())
        ks.append(batch["k"][pairs.prompt].cpu())
    return {"margins": torch.cat(margins), "k": torch.cat(ks), "loss": loss_sum / len(examples)}


def ranking_metrics(margins: torch.Tensor, ks: torch.Tensor, loss: float | None = None) -> dict[str, float]:
    """``loss``, pairwise ``accuracy``, mean ``margin`` (TRL's name; also as ``reward_margin``), ``pairs`` and
    ``accuracy/k<K>`` per K."""
    metrics = {} if loss is None else {"loss": loss}
    mean_margin = float(margins.mean())
    metrics.update({"accuracy": float(pairwise_accuracy(margins)), "margin": mean_margin,
                    "reward_margin": mean_margin, "pairs": margins.numel()})
    for k in sorted(set(ks.tolist())):
        metrics[f"accuracy/k{k}"] = float(pairwise_accuracy(margins[ks == k]))
    return metrics


def make_eval_fn(collator: RankingCollator, *, decoder: bool, batch_size: int, reward: RewardSection):
    def eval_fn(model, examples):
        found = ranking_margins(model, examples, collator, decoder=decoder, batch_size=batch_size, reward=reward)
        return ranking_metrics(found["margins"], found["k"], found["loss"])

    return eval_fn


def iter_scorable(path: str | os.PathLike) -> Iterator[tuple[int, dict, Prompt, list[str], str]]:
    """Rows of a JSONL file that hold texts to score: ``(line, row, prompt, completions, field)``.

    A row holds a ``prompt`` and either a ``completion`` (field ``"completion"``), a list of
    ``completions`` (field ``"completions"``: samples, rankings) or ``chosen``/``rejected`` (field
    ``"chosen"``: a pairwise record, scored as [chosen, rejected]). A completion, ``chosen`` or ``rejected`` may
    also be TRL's conversational form, a list of one assistant message (its content is scored). Other rows stop
    with a :class:`DataError` naming the file, line and field.
    """
    source = str(path)
    for line, row in iter_jsonl(path):
        def error(field: str, message: str, line: int = line) -> DataError:
            return DataError(message, source=source, line=line, field=field)

        prompt = row.get("prompt")
        if not (isinstance(prompt, str) and prompt.strip()) and not (isinstance(prompt, list) and prompt):
            raise error("prompt", "is missing" if prompt is None else "expected a non-empty string or messages")
        if "completion" in row:
            field, texts = "completion", [row["completion"]]
        elif "completions" in row:
            field, texts = "completions", row["completions"]
            if not isinstance(texts, list) or not texts:
                raise error("completions", "expected a non-empty list of strings")
        elif "chosen" in row and "rejected" in row:
            field, texts = "chosen", [row["chosen"], row["rejected"]]
        else:
            raise error("completion", "is missing (expected 'completion', 'completions' or 'chosen'/'rejected')")
        texts = [text[0].get("content") if _one_assistant_message(text) else text for text in texts]
        for i, text in enumerate(texts):
            if not isinstance(text, str):
                raise error(field if field == "completion" else f"{field}[{i}]",
                            f"expected a string or a list of one assistant message, got {type(text).__name__}")
        yield line, row, prompt, texts, field


def _one_assistant_message(value: Any) -> bool:
    """Whether ``value`` is TRL's conversational completion: a list of one assistant message."""
    return isinstance(value, list) and len(value) == 1 and isinstance(value[0], dict) \
        and value[0].get("role") == "assistant"


def reference_texts(config: RewardConfig, train_records: Sequence[RankingRecord]) -> tuple[list, list[str]]:
    """(prompts, completions) whose rewards the normalisation centres: ``reward.reference`` or, by default,
    every completion of the training rankings (the SFT model's samples)."""
    if config.reward.reference is not None:
        prompts, completions = [], []
        for _, _, prompt, texts, _ in iter_scorable(config.reward.reference):
            for text in texts:
                prompts.append(prompt)
                completions.append(text)
        return prompts, completions
    return ([r.prompt for r in train_records for _ in r.completions],
            [c for r in train_records for c in r.completions])


def normalize_reward_model(model, tokenizer, prompts, completions, *, with_std: bool, batch_size: int,
                           max_length: int, max_prompt_length: int) -> tuple[float, float | None]:
    """Set the model config's normalisation so the given outputs score mean 0 (and std 1 with ``with_std``)."""
    set_normalization(model.config, None, None)
    raw = torch.tensor(score_texts(model, tokenizer, prompts, completions, batch_size=batch_size,
                                   max_length=max_length, max_prompt_length=max_prompt_length, normalize=False))
    mean = float(raw.mean())
    std = float(raw.std()) if with_std and raw.numel() > 1 else None
    if std is not None and not std > 0:
        raise TrainingError(f"cannot normalise the reward's scale: the reference outputs' rewards have std {std}")
    set_normalization(model.config, mean, std)
    return mean, std


class RewardTrainer:
    """The shared :class:`Trainer` loop plus what a reward model needs after it: normalisation and
    calibration. ``trainer`` is the underlying loop (its ``evaluate()`` gives the ranking metrics)."""

    def __init__(self, config: RewardConfig, console: Console | None = None):
        self.config, self.console = config, console or Console(stderr=True)
        data = config.data
        self.train_records = self._read(data.train)  # bad data fails before the model is loaded
        self.eval_records = self._read(data.eval) if data.eval else []
        model, tokenizer = load_reward_model(config.model, seed=config.train.seed,
                                             length_head=config.reward.length_head)
        set_normalization(model.config, None, None)  # from an earlier reward model: recomputed after training
        self.decoder = is_decoder_only(model.config)
        self.tokenizer = tokenizer
        self.collator = RankingCollator(tokenizer.pad_token_id, padding_side(self.decoder))
        self.eval_batch_size = config.train.eval_batch_size or config.train.batch_size
        train_examples = self._encode(self.train_records, data.train)
        length_sign = 1.0
        if config.reward.length_head:
            length_sign = length_preference_sign([e.lengths[winner] - e.lengths[loser] for e in train_examples
                                                  for winner, loser in e.pairs])
            favoured = "longer" if length_sign > 0 else "shorter"
            self.console.print(f"length head: the training labels favour {favoured} replies")
        self.trainer = Trainer(
            stage="rm", config=config, train=config.train, model=model, tokenizer=tokenizer,
            train_examples=train_examples,
            eval_examples=self._encode(self.eval_records, data.eval) if data.eval else (),
            collator=self.collator, loss_fn=make_loss_fn(config.reward, decoder=self.decoder,
                                                         length_sign=length_sign),
            eval_fn=make_eval_fn(self.collator, decoder=self.decoder, batch_size=self.eval_batch_size,
                                 reward=config.reward),
            log_ppl=False, example_length=lambda example: max(map(len, example.sequences)))

    def _read(self, path: str) -> list[RankingRecord]:
        return read_records(path, "ranking", split=self.config.data.split, limit=self.config.data.limit)

    def _encode(self, records, source: str) -> list[RankingExample]:
        data = self.config.data
        return encode_rankings(self.tokenizer, records, decoder=self.decoder, max_length=data.max_length,
                               max_prompt_length=data.max_prompt_length, source=source, console=self.console)

    @property
    def model(self):
        """The trained model, unwrapped from accelerate (a peft model with LoRA)."""
        return self.trainer.accelerator.unwrap_model(self.trainer.model)

    def train(self) -> dict[str, float]:
        metrics = self.trainer.train()
        run_dir = self.trainer.run_dir
        accelerator = self.trainer.accelerator
        data, reward = self.config.data, self.config.reward
        set_window(self.model.config, data.max_length, data.max_prompt_length)
        if accelerator.is_main_process:
            if reward.length_head:
                drop_length_head(run_dir / "final")
            self._store(run_dir / "final", lambda saved: set_window(saved, data.max_length, data.max_prompt_length))
        if reward.normalize:
            prompts, completions = reference_texts(self.config, self.train_records)
            mean, std = normalize_reward_model(self.model, self.tokenizer, prompts, completions,
                                               with_std=reward.normalize_std, batch_size=self.eval_batch_size,
                                               max_length=data.max_length, max_prompt_length=data.max_prompt_length)
            if accelerator.is_main_process:
                self._store(run_dir / "final", lambda saved: set_normalization(saved, mean, std))
            metrics.update({"reward_mean": mean, **({"reward_std": std} if std is not None else {})})
        if self.trainer.eval_examples:  # on every process: under FSDP each forward pass is a collective
            self.model.eval()
            found = ranking_margins(self.model, self.trainer.eval_examples, self.collator, decoder=self.decoder,
                                    batch_size=self.eval_batch_size, reward=reward)
            if accelerator.is_main_process:
                report = {**ranking_metrics(found["margins"], found["k"], found["loss"]),
                          "calibration": calibration_table(found["margins"], reward.calibration_bins)}
                (run_dir / "calibration.json").write_text(json.dumps(report, indent=2), encoding="utf-8")
        accelerator.wait_for_everyone()
        return metrics

    @staticmethod
    def _store(final: Path, update) -> None:
        """Apply ``update`` to the saved model's config (normalisation, training window) and save it."""
        from transformers import AutoConfig

        saved = AutoConfig.from_pretrained(final)
        update(saved)
        saved.save_pretrained(final)


def build_reward_trainer(config: RewardConfig, console: Console | None = None) -> RewardTrainer:
    """The reward model, its tokenized rankings and the loop, ready to ``train()``."""
    return RewardTrainer(config, console)


def run_reward(config: RewardConfig, console: Console | None = None) -> dict[str, float]:
    """Train a reward model on rankings; writes the run directory; returns the last metrics."""
    return build_reward_trainer(config, console).train()
