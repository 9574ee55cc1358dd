#!/usr/bin/env python
"""Train a small reward model on real human preferences (Anthropic hh-rlhf, harmless) and report accuracy.

    python examples/hh_rlhf_reward_model.py                       # ../shared/data/hh-rlhf-harmless
    python examples/hh_rlhf_reward_model.py --data pairs.jsonl.gz --out runs/hh --pretrain-steps 0

hh-rlhf stores each judgement as two full dialogues, ``chosen`` and ``rejected``
(``"\n\nHuman: ...\n\nAssistant: ..."``) that share everything up to the last ``Assistant:`` turn.
:func:`rlhfkit.data.public.hh_rlhf` (through ``read_public(path, "hh")``, or ``rlhfkit convert-data --layout hh``)
splits them into rlhfkit's pairwise record: the shared turns become the prompt, as chat messages (Human -> user,
Assistant -> assistant, rendered by the tokenizer's chat template), and the two final replies the ``chosen`` /
``rejected`` completions. Pairs whose replies are empty or identical, or whose dialogues do not share their
turns, are skipped and counted.

Then, all offline: a byte-level BPE tokenizer trained on the train part, a tiny Llama (optionally
pretrained on the train dialogues first, ``--pretrain-steps``), and ``rlhfkit rm`` on the train pairs;
held-out pairwise accuracy is printed with its standard error and written to ``<out>/result.json``.
The data are not copied into the repository: everything is written under ``--out``.
"""

from __future__ import annotations

import argparse
import json
import math
import random
import time
from pathlib import Path

DEFAULT_DATA = Path(__file__).resolve().parents[1] / ".." / "shared" / "data" / "hh-rlhf-harmless" / "pairs.jsonl.gz"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", type=Path, default=DEFAULT_DATA)
    parser.add_argument("--out", type=Path, default=Path("runs/hh-rlhf-rm"))
    parser.add_argument("--test-fraction", type=float, default=0.2)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--vocab-size", type=int, default=2048)
    parser.add_argument("--hidden-size", type=int, default=128)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--max-length", type=int, default=256)
    parser.add_argument("--max-prompt-length", type=int, default=160)
    parser.add_argument("--pretrain-steps", type=int, default=400, help="LM pretraining on the train dialogues")
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--lr", type=float, default=3e-4)
    parser.add_argument("--batch-size", type=int, default=16)
    args = parser.parse_args()

    from rlhfkit.config import PretrainConfig, RewardConfig, load_config
    from rlhfkit.data.public import read_public
    from rlhfkit.data.readers import write_jsonl
    from rlhfkit.models.tokenizer import train_bpe_tokenizer
    from rlhfkit.trainers.pretrain import run_pretrain
    from rlhfkit.trainers.reward import run_reward

    started = time.perf_counter()
    data = read_public(args.data, "hh")
    records = data.records
    random.Random(args.seed).shuffle(records)
    n_test = round(len(records) * args.test_fraction)
    test, train = records[:n_test], records[n_test:]
    out = args.out
    write_jsonl(out / "data" / "train.jsonl", train)
    write_jsonl(out / "data" / "test.jsonl", test)
    print(f"{data.rows} pairs read, {len(records)} converted ({len(train)} train, {len(test)} test); "
          f"skipped: {dict(data.skipped) or 'none'}")

    # the tokenizer sees the train part only
    texts = [m["content"] for r in train for m in r.prompt] + [t for r in train for t in (r.chosen, r.rejected)]
    tokenizer_dir = out / "tokenizer"
    train_bpe_tokenizer(texts, vocab_size=args.vocab_size, save_dir=tokenizer_dir)
    architecture = {"hidden_size": args.hidden_size, "num_hidden_layers": args.layers}
    model: dict = {"preset": "tiny", "tokenizer": str(tokenizer_dir), "architecture": architecture}
    if args.pretrain_steps:
        def dialogue(r, reply: str) -> str:
            return "\n\n".join(f"{m['role']}: {m['content']}" for m in r.prompt) + f"\n\nassistant: {reply}"

        write_jsonl(out / "data" / "lm.jsonl",
                    ({"text": dialogue(r, reply)} for r in train for reply in (r.chosen, r.rejected)))
        pretrain = load_config(PretrainConfig, base={
            "model": model, "data": {"train": str(out / "data" / "lm.jsonl"), "max_length": args.max_length},
            "train": {"output_dir": str(out / "pretrain"), "seed": args.seed, "max_steps": args.pretrain_steps,
                      "batch_size": 16, "lr": 3e-3, "warmup_steps": 20, "log_every": 50, "progress": False}})
        run_pretrain(pretrain)
        model = {"name_or_path": str(out / "pretrain" / "final")}

    config = load_config(RewardConfig, base={
        "model": model,
        "data": {"train": str(out / "data" / "train.jsonl"), "eval": str(out / "data" / "test.jsonl"),
                 "max_length": args.max_length, "max_prompt_length": args.max_prompt_length},
        "train": {"output_dir": str(out / "rm"), "seed": args.seed, "epochs": args.epochs, "lr": args.lr,
                  "batch_size": args.batch_size, "warmup_steps": 10, "log_every": 20, "progress": False},
    })
    metrics = run_reward(config)
    from transformers import AutoModelForSequenceClassification

    final = AutoModelForSequenceClassification.from_pretrained(out / "rm" / "final")
    n_params = sum(p.numel() for p in final.parameters())
    accuracy = metrics["eval/accuracy"]
    result = {"held_out_accuracy": accuracy, "stderr": math.sqrt(accuracy * (1 - accuracy) / len(test)),
              "held_out_pairs": len(test), "train_pairs": len(train), "parameters": n_params,
              "pretrain_steps": args.pretrain_steps, "reward_margin": metrics["eval/reward_margin"],
              "architecture": architecture, "vocab_size": args.vocab_size, "max_length": args.max_length,
              "seconds": round(time.perf_counter() - started)}
    (out / "result.json").write_text(json.dumps(result, indent=2), encoding="utf-8")
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
