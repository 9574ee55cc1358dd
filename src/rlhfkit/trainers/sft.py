"""Step 1 of InstructGPT: supervised fine-tuning on labelers' demonstrations (loss on responses only: the last
assistant turn of a conversation, or every one with ``sft.loss_on: all_assistant_turns``)."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from rich.console import Console

from rlhfkit.algorithms.logprobs import masked_lm_loss
from rlhfkit.config import SFTConfig
from rlhfkit.data.collators import (
    ChatTemplateError,
    Example,
    PadCollator,
    encode_conversation,
    encode_demonstration,
)
from rlhfkit.data.readers import read_records
from rlhfkit.data.records import DataError, DemonstrationRecord
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


def encode_demonstrations(tokenizer, records: Sequence[DemonstrationRecord], *, max_length: int,
                          max_prompt_length: int, loss_on: str = "last_assistant_turn", source: str,
                          console: Console | None = None) -> list[Example]:
    """Tokenize demonstration records; report how many had to be truncated.

    ``loss_on`` is ``sft.loss_on``: with ``all_assistant_turns`` a record whose prompt is a list of messages is
    encoded as one conversation with its completion (:func:`encode_conversation`), so the assistant turns in the
    prompt are targets too; otherwise the completion alone is (:func:`encode_demonstration`; a reply that calls
    tools, which only the chat template renders, is the conversation's last turn and its only target).

    Raises:
        DataError: the chat template cannot separate a record's turns or render its tool use; it names ``source``
            and the record (counted from 1 among the records read).
    """
    examples = []
    for number, record in enumerate(records, start=1):
        every_turn = loss_on == "all_assistant_turns" and not isinstance(record.prompt, str)
        try:
            if every_turn or isinstance(record.completion, dict):
                examples.append(encode_conversation(tokenizer, record.conversation(), max_length=max_length,
                                                    max_prompt_length=max_prompt_length, every_turn=every_turn))
            else:
                examples.append(encode_demonstration(tokenizer, record.prompt, record.completion,
                                                     max_length=max_length, max_prompt_length=max_prompt_length))
        except ChatTemplateError as error:
            named = f"(id {record.id}) " if record.id is not None else ""
            raise DataError(f"{named}{error}", source=source, line=number, unit="record") from None
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
                                     max_prompt_length=data.max_prompt_length, loss_on=config.sft.loss_on,
                                     source=path, console=console)

    return Trainer(stage="sft", config=config, train=config.train, model=model, tokenizer=tokenizer,
                   train_examples=load(data.train), eval_examples=load(data.eval) if data.eval else (),
                   collator=PadCollator(tokenizer.pad_token_id), loss_fn=lm_loss,
                   example_units=target_tokens if config.sft.loss_average == "dataset" else None)


def run_sft(config: SFTConfig, console: Console | None = None) -> dict[str, float]:
    """Train the policy on demonstrations; writes the run directory; returns the last metrics."""
    return build_sft_trainer(config, console).train()
