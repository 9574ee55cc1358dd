"""Step 1 of InstructGPT: supervised fine-tuning on labelers' demonstrations (loss on responses only)."""

from __future__ import annotations

import torch
from rich.console import Console

from rlhfkit.algorithms.logprobs import masked_lm_loss
from rlhfkit.config import SFTConfig
from rlhfkit.data.collators import Example, PadCollator, encode_demonstration
from rlhfkit.data.readers import read_records
from rlhfkit.models.load import load_causal_lm, position_ids_from_mask
from rlhfkit.trainers.base import Trainer


def lm_loss(model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """Masked next-token loss of ``model`` on a padded batch, and its number of target tokens."""
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                   position_ids=position_ids_from_mask(batch["attention_mask"]), use_cache=False).logits
    return masked_lm_loss(logits, batch["input_ids"], batch["loss_mask"]), batch["loss_mask"][:, 1:].sum()


def target_tokens(example: Example) -> int:
    """The tokens of ``example`` that :func:`lm_loss` predicts (the loss mask past the first position)."""
    return sum(example.loss_mask[1:])


def encode_demonstrations(tokenizer, records, *, max_length: int, max_prompt_length: int,
                          source: str, console: Console | None = None) -> list[Example]:
    """Tokenize demonstration records; report how many had to be truncated."""
    examples = [encode_demonstration(tokenizer, r.prompt, r.completion, max_length=max_length,
                                     max_prompt_length=max_prompt_length) for r in records]
    truncated = sum(e.truncated for e in examples)
    if truncated and console is not None:
        console.print(f"[yellow]{source}: {truncated} of {len(examples)} records truncated to "
                      f"max_length={max_length} / max_prompt_length={max_prompt_length}")
    return examples


def build_sft_trainer(config: SFTConfig, console: Console | None = None) -> Trainer:
    """The policy, its tokenized demonstrations and the loop, ready to ``train()``."""
    console = console or Console(stderr=True)
    model, tokenizer = load_causal_lm(config.model, seed=config.train.seed)
    data = config.data

    def load(path: str) -> list[Example]:
        records = read_records(path, "demonstration", split=data.split, limit=data.limit)
        return encode_demonstrations(tokenizer, records, max_length=data.max_length,
                                     max_prompt_length=data.max_prompt_length, source=path, console=console)

    return Trainer(stage="sft", config=config, train=config.train, model=model, tokenizer=tokenizer,
                   train_examples=load(data.train), eval_examples=load(data.eval) if data.eval else (),
                   collator=PadCollator(tokenizer.pad_token_id), loss_fn=lm_loss, example_units=target_tokens)


def run_sft(config: SFTConfig, console: Console | None = None) -> dict[str, float]:
    """Train the policy on demonstrations; writes the run directory; returns the last metrics."""
    return build_sft_trainer(config, console).train()
