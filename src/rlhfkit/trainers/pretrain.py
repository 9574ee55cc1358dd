"""Pretraining: next-token prediction on raw text, packed into fixed-length blocks."""

from __future__ import annotations

from rich.console import Console

from rlhfkit.config import PretrainConfig
from rlhfkit.data.collators import PadCollator, pack_texts
from rlhfkit.data.readers import read_texts
from rlhfkit.models.load import load_causal_lm
from rlhfkit.trainers.base import Trainer
from rlhfkit.trainers.sft import lm_loss


def run_pretrain(config: PretrainConfig, console: Console | None = None) -> dict[str, float]:
    """Train a causal LM on the documents of ``data.train``; returns the last metrics."""
    console = console or Console(stderr=True)
    model, tokenizer = load_causal_lm(config.model, seed=config.train.seed)
    data = config.data

    def load(path: str):
        documents = read_texts(path, limit=data.limit)
        blocks = pack_texts(tokenizer, documents, block_size=data.max_length)
        console.print(f"{path}: {len(documents)} documents -> {len(blocks)} blocks of {data.max_length} tokens")
        return blocks

    trainer = Trainer(stage="pretrain", config=config, train=config.train, model=model, tokenizer=tokenizer,
                      train_examples=load(data.train), eval_examples=load(data.eval) if data.eval else (),
                      collator=PadCollator(tokenizer.pad_token_id), loss_fn=lm_loss)
    return trainer.train()
