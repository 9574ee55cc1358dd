"""The ``rlhfkit`` command line: one sub-command per stage, all sharing ``--config`` and ``--set``."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console

from rlhfkit.config import ConfigError, ModelConfig, PretrainConfig, SFTConfig, load_config
from rlhfkit.data.records import DataError
from rlhfkit.trainers.base import TrainingError

app = typer.Typer(help="Align language models with human feedback: SFT, reward models, PPO, DPO.",
                  no_args_is_help=True, pretty_exceptions_enable=False)
console = Console(stderr=True)

ConfigOption = Annotated[Path | None, typer.Option("--config", "-c", help="YAML config file.")]
SetOption = Annotated[list[str] | None, typer.Option("--set", "-s", help="Override: a.b=value (repeatable).")]


def _fail_cleanly(function):
    """Show configuration, data and training errors as one clear message (exit code 2)."""
    import functools

    @functools.wraps(function)
    def wrapper(*args, **kwargs):
        try:
            return function(*args, **kwargs)
        except (ConfigError, DataError, TrainingError) as error:
            console.print(f"[bold red]error:[/] {error}", markup=True, highlight=False)
            raise typer.Exit(2) from None

    return wrapper


@app.command()
@_fail_cleanly
def pretrain(config: ConfigOption = None, set_: SetOption = None) -> None:
    """Pretrain a causal LM on raw text (next-token prediction)."""
    from rlhfkit.trainers.pretrain import run_pretrain

    metrics = run_pretrain(load_config(PretrainConfig, config, set_ or []))
    console.print_json(json.dumps(metrics))


@app.command()
@_fail_cleanly
def sft(config: ConfigOption = None, set_: SetOption = None) -> None:
    """Supervised fine-tuning on demonstrations (loss on the response only)."""
    from rlhfkit.trainers.sft import run_sft

    metrics = run_sft(load_config(SFTConfig, config, set_ or []), console)
    console.print_json(json.dumps(metrics))


@app.command()
@_fail_cleanly
def tokenizer(
    data: Annotated[Path, typer.Option(help="Text records ({'text': ...} JSONL or .txt) to train on.")],
    out: Annotated[Path, typer.Option(help="Directory for the tokenizer (HF format).")],
    vocab_size: Annotated[int, typer.Option(help="Vocabulary size, special tokens included.")] = 1024,
) -> None:
    """Train a byte-level BPE tokenizer (with pad/EOS tokens and a chat template) locally."""
    from rlhfkit.data.readers import read_texts
    from rlhfkit.models.tokenizer import train_bpe_tokenizer

    trained = train_bpe_tokenizer(read_texts(data), vocab_size=vocab_size, save_dir=out)
    console.print(f"tokenizer with {len(trained)} tokens written to {out}")


@app.command()
@_fail_cleanly
def generate(
    model: Annotated[str, typer.Option(help="Model directory (HF format) or hub id.")],
    prompts: Annotated[Path, typer.Option(help="Prompt records: JSONL, JSON, parquet, CSV or dataset dir.")],
    out: Annotated[Path, typer.Option(help="Output JSONL: prompt + completion per line.")],
    max_new_tokens: int = 64,
    temperature: Annotated[float, typer.Option(help="0 for greedy decoding.")] = 1.0,
    top_p: float = 1.0,
    top_k: Annotated[int, typer.Option(help="0 disables top-k.")] = 0,
    batch_size: int = 16,
    seed: int = 0,
) -> None:
    """Sample one completion per prompt from a checkpoint (stops at EOS)."""
    from rlhfkit.data.readers import read_records, write_jsonl
    from rlhfkit.models.load import load_causal_lm
    from rlhfkit.rollout.generate import SamplingConfig
    from rlhfkit.rollout.generate import generate as sample

    records = read_records(prompts, "prompt")
    policy, tok = load_causal_lm(ModelConfig(name_or_path=model))
    sampling = SamplingConfig(max_new_tokens=max_new_tokens, temperature=temperature, top_p=top_p,
                              top_k=top_k, batch_size=batch_size)
    generations = sample(policy, tok, [r.prompt for r in records], sampling, seed=seed)
    rows = [{"prompt": r.prompt, "completion": g.text, "finished": g.finished,
             **({"id": r.id} if r.id is not None else {})} for r, g in zip(records, generations, strict=True)]
    count = write_jsonl(out, rows)
    console.print(f"{count} completions written to {out}")


@app.command()
@_fail_cleanly
def demo(config: ConfigOption = None, set_: SetOption = None) -> None:
    """The embedded default, offline: tokenizer, tiny model, pretrain, SFT, gold-judge evaluation."""
    from rlhfkit.pipeline import DemoConfig, run_demo

    run_demo(load_config(DemoConfig, config, set_ or []), console)

