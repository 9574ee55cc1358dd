#!/usr/bin/env python
"""Generation speed: rlhfkit's decoding loop (``rlhfkit.rollout.decode``) vs HF ``generate`` on a model that stops.

    python benchmarks/bench_generate.py                      # tiny model, K = 4 and 8, greedy and T = 0.7
    python benchmarks/bench_generate.py --ks 4 --repeats 5 --threads 2 --json generate.json

The model learns to stop first: the ``tiny`` preset (random init, a BPE tokenizer trained on the built-in
task's text, as the tests build them) gets ``--sft-steps`` AdamW steps of SFT on the task's demonstrations
(short answers ending in EOS), so that samples end at different lengths, as the demo's SFT model's do.

Then, for each K, ``--prompts`` prompts each repeated K times (prompt-major, as PPO / GRPO groups,
``rlhfkit sample --k`` and best-of-n lay them out) are sampled in one batch by both paths of
:func:`rlhfkit.rollout.generate.sample`, alternated, ``--repeats`` times each: greedy (both return the same
tokens, so the same work is asked of both) and at temperature 0.7 (the demo's; each path its own draws).
Printed per row: seconds (median), generated tokens per second (real response tokens, up to and including
EOS), the speed ratio decode / generate (of the medians' tokens/s), the rows of the prompt forwards and the
row-forwards of the decode steps (the sum over steps of the rows in each step's forward), and the mean and
longest response length.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

from rlhfkit.algorithms.logprobs import masked_lm_loss
from rlhfkit.data.collators import PadCollator, encode_demonstration
from rlhfkit.models.build import build_causal_lm
from rlhfkit.models.load import load_tokenizer
from rlhfkit.models.tokenizer import train_bpe_tokenizer
from rlhfkit.rollout.experience import response_masks
from rlhfkit.rollout.generate import SamplingConfig, sample
from rlhfkit.tasks import get_task


def stopping_model(preset: str, sft_steps: int, batch_size: int, seed: int, workdir: Path):
    """A ``preset`` model and its tokenizer after ``sft_steps`` SFT steps on the task's demonstrations; the
    last step's loss."""
    task = get_task("tinyworld")
    demos = task.demonstrations(task.prompts(400, seed=seed), seed=seed)
    texts = task.pretraining_corpus(300, seed=seed) + [d["prompt"] for d in demos] + [d["completion"] for d in demos]
    train_bpe_tokenizer(texts, vocab_size=512, save_dir=workdir / "tokenizer")
    tokenizer = load_tokenizer(str(workdir / "tokenizer"))
    model = build_causal_lm(tokenizer, preset, seed=seed)
    examples = [encode_demonstration(tokenizer, d["prompt"], d["completion"], max_length=256, max_prompt_length=128)
                for d in demos]
    collate = PadCollator(tokenizer.pad_token_id, padding_side="right")
    optimizer = torch.optim.AdamW(model.parameters(), lr=2e-3)
    generator = torch.Generator().manual_seed(seed)
    model.train()
    loss = float("nan")
    for _ in range(sft_steps):
        picked = torch.randint(len(examples), (batch_size,), generator=generator).tolist()
        batch = collate([examples[i] for i in picked])
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        loss_t = masked_lm_loss(logits, batch["input_ids"], batch["loss_mask"])
        optimizer.zero_grad()
        loss_t.backward()
        optimizer.step()
        loss = loss_t.item()
    return model.eval(), tokenizer, task, loss


def timed(model, tokenizer, prompts, sampling, use_decode: bool, seed: int) -> dict:
    """One :func:`sample` of ``prompts``: seconds, real response tokens, work counts, lengths."""
    torch.manual_seed(seed)
    start = time.perf_counter()
    out = sample(model.generate, tokenizer, prompts, sampling,
                 policy_call=(lambda fn: fn(model)) if use_decode else None)
    seconds = time.perf_counter() - start
    assert out.path == ("decode" if use_decode else "generate"), out.path
    mask, finished = response_masks(out.responses, tokenizer.eos_token_id, tokenizer.pad_token_id)
    lengths = mask.sum(-1)
    return {"seconds": seconds, "tokens": int(lengths.sum()), "prompt_rows": out.prompt_rows,
            "decode_rows": out.decode_rows, "mean_length": float(lengths.float().mean()),
            "longest": int(lengths.max()), "finished": float(finished.float().mean()), "responses": out.responses}


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--preset", default="tiny")
    parser.add_argument("--sft-steps", type=int, default=60)
    parser.add_argument("--ks", type=int, nargs="+", default=[4, 8])
    parser.add_argument("--prompts", type=int, default=8)
    parser.add_argument("--max-new-tokens", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", default=None)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory() as tmp:
        start = time.perf_counter()
        model, tokenizer, task, loss = stopping_model(args.preset, args.sft_steps, 16, args.seed, Path(tmp))
    print(f"{args.preset} model after {args.sft_steps} SFT steps ({time.perf_counter() - start:.0f} s): "
          f"loss {loss:.3f}; torch threads {args.threads}")
    rows = []
    print(f"{'K':>2} {'sampling':<8} {'path':<8} {'s':>7} {'tok/s':>8} {'ratio':>6} {'prompt rows':>11} "
          f"{'decode rows':>11} {'mean len':>8} {'longest':>7} {'EOS':>5}")
    for k in args.ks:
        prompts = [p for p in task.prompts(args.prompts, split="test", seed=args.seed) for _ in range(k)]
        for name, temperature in (("greedy", 0.0), ("T=0.7", 0.7)):
            sampling = SamplingConfig(max_new_tokens=args.max_new_tokens, temperature=temperature)
            timed(model, tokenizer, prompts[:k], sampling, True, args.seed)  # warm-up
            runs = {"generate": [], "decode": []}
            for repeat in range(args.repeats):
                order = ("generate", "decode") if repeat % 2 == 0 else ("decode", "generate")
                for path in order:
                    runs[path].append(timed(model, tokenizer, prompts, sampling, path == "decode",
                                            args.seed + repeat))
            if temperature == 0:
                assert torch.equal(runs["decode"][0]["responses"], runs["generate"][0]["responses"])
            rates = {}
            for path in ("generate", "decode"):
                done = runs[path]
                seconds = statistics.median(r["seconds"] for r in done)
                rates[path] = statistics.median(r["tokens"] / r["seconds"] for r in done)
                first = done[0]
                row = {"k": k, "sampling": name, "path": path, "rows": len(prompts), "seconds": seconds,
                       "tokens_per_s": rates[path], **{key: first[key] for key in
                                                       ("prompt_rows", "decode_rows", "mean_length", "longest",
                                                        "finished")}}
                row["decode_rows"] = statistics.mean(r["decode_rows"] for r in done)
                row["ratio"] = rates[path] / rates["generate"]
                rows.append(row)
                print(f"{k:>2} {name:<8} {path:<8} {seconds:7.3f} {rates[path]:8.0f} {row['ratio']:6.2f} "
                      f"{row['prompt_rows']:>11} {row['decode_rows']:>11.0f} {row['mean_length']:8.1f} "
                      f"{row['longest']:>7} {row['finished']:5.2f}")
    result = {"preset": args.preset, "sft_steps": args.sft_steps, "sft_loss": loss, "threads": args.threads,
              "prompts": args.prompts, "max_new_tokens": args.max_new_tokens, "repeats": args.repeats,
              "torch": torch.__version__, "rows": rows}
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2))
    return result


if __name__ == "__main__":
    sys.exit(0 if main() else 1)
