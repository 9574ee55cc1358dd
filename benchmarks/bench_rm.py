#!/usr/bin/env python
"""Reward-model training speed and memory: rlhfkit (K-way rankings) vs TRL's ``RewardTrainer`` (pairs).

    python benchmarks/bench_rm.py                    # parity check, then tiny and small, 3 pairs of runs each
    python benchmarks/bench_rm.py --sizes tiny --pairs 5 --k 4 --json results.json

The same comparisons, as each library takes them: rankings of K completions per prompt (K = 4 by default,
no ties) for rlhfkit, which scores the K completions of a prompt in one forward pass and trains on all
K(K-1)/2 pairs (InstructGPT); the same rankings expanded to their K(K-1)/2 (chosen, rejected) pairs for
TRL, which scores both sequences of every pair. Both get the same saved random-init Llama (fp32) loaded as
``AutoModelForSequenceClassification`` (num_labels=1), the same token ids (TRL gets them pre-tokenized:
rendered prompt + completion + EOS, as rlhfkit encodes them), AdamW (lr 1e-4, betas (0.9, 0.95), weight
decay 0), constant LR, grad clipping at 1.0, no eval, no checkpoint during the run, logging every step,
TRL's GPU defaults switched off (bf16, gradient checkpointing, dataloader workers).

Batch sizes are matched in sequences per forward: rlhfkit ``--prompts-per-batch`` prompts x K
completions, TRL ``--trl-pairs-per-batch`` pairs x 2 (8 x 4 = 32 = 16 x 2 by default).

First a parity check: on one prompt's K completions, rlhfkit's loss equals TRL's ``compute_loss`` on the
prompt's K(K-1)/2 pairs (same initial weights; the mean over one prompt's pairs is the same in both).

Then, per size, runs alternate rlhfkit, TRL, ... each in a fresh subprocess (peak RSS is that run's);
``--warmup`` untimed steps, then the timed steps, timed from the end of one optimizer step to the end of
the next (fetch + collate, forward, backward, clip, AdamW, scheduler, logging). Reported: comparisons/s
(pairs trained on per second), sequences/s, s/step and peak RSS, medians over runs, and rlhfkit/TRL
ratios as the median of the per-pair ratios.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import sys
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import common  # noqa: E402

LR = 1e-4
BETAS = (0.9, 0.95)
MAX_LENGTH = 128
MAX_PROMPT_LENGTH = 64
SEED = 0
LOSS_TOLERANCE = 1e-5
DEFAULT_STEPS = {"tiny": 30, "small": 8}
LIBS = ("rlhfkit", "trl")


# ---- data: rankings of K completions (rlhfkit) and their pairs (TRL) ------------------------------------
def make_rankings(workdir: Path, k: int, n_prompts: int) -> tuple[common.BenchData, str]:
    """Group the synthetic prompt/completion rows of :func:`common.make_data` into rankings of ``k``
    completions (the prompt of the first row, a random order without ties); return the data and the path."""
    data = common.make_data(workdir, n_examples=n_prompts * k)
    rows = common.read_rows(data.train_path)
    rng = random.Random(SEED)
    path = workdir / f"rankings-k{k}.jsonl"
    with path.open("w", encoding="utf-8") as handle:
        for i in range(n_prompts):
            group = rows[i * k:(i + 1) * k]
            ranking = list(range(k))
            rng.shuffle(ranking)
            handle.write(json.dumps({"prompt": group[0]["prompt"], "completions": [r["completion"] for r in group],
                                     "ranking": ranking}) + "\n")
    return data, str(path)


# ---- the two trainers, configured for the same work -------------------------------------------------------
def build_rlhfkit(model_dir: str, rankings: str, output_dir: str, max_steps: int, batch_size: int):
    from rich.console import Console

    from rlhfkit.config import RewardConfig, load_config
    from rlhfkit.trainers.reward import build_reward_trainer

    config = load_config(RewardConfig, base={
        "model": {"name_or_path": model_dir, "dtype": "float32"},
        "data": {"train": rankings, "max_length": MAX_LENGTH, "max_prompt_length": MAX_PROMPT_LENGTH},
        "train": {"output_dir": output_dir, "seed": SEED, "batch_size": batch_size, "grad_accum": 1, "lr": LR,
                  "adam_betas": list(BETAS), "weight_decay": 0.0, "scheduler": "constant", "warmup_steps": 0,
                  "max_grad_norm": 1.0, "max_steps": max_steps, "mixed_precision": "no",
                  "gradient_checkpointing": False, "log_every": 1, "eval_every": None, "save_every": None,
                  "resume": False, "progress": False},
        "reward": {"normalize": False}})
    return build_reward_trainer(config, console=Console(stderr=True))


def trl_pairs(model_dir: str, rankings: str) -> list[dict]:
    """Every (chosen, rejected) pair of every ranking, as the token ids rlhfkit trains on, in file order."""
    from rlhfkit.data.readers import read_records
    from rlhfkit.models.load import load_tokenizer
    from rlhfkit.trainers.reward import encode_rankings

    examples = encode_rankings(load_tokenizer(model_dir), read_records(rankings, "ranking"), decoder=True,
                               max_length=MAX_LENGTH, max_prompt_length=MAX_PROMPT_LENGTH)
    return [{"chosen_ids": list(e.sequences[w]), "rejected_ids": list(e.sequences[lo])}
            for e in examples for w, lo in e.pairs]


def build_trl(model_dir: str, pairs: list[dict], output_dir: str, max_steps: int, batch_size: int, callbacks=()):
    from datasets import Dataset
    from transformers import AutoTokenizer, PrinterCallback
    from trl import RewardConfig, RewardTrainer

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    args = RewardConfig(
        output_dir=output_dir, seed=SEED, data_seed=SEED,
        per_device_train_batch_size=batch_size, gradient_accumulation_steps=1, max_steps=max_steps,
        learning_rate=LR, adam_beta1=BETAS[0], adam_beta2=BETAS[1], adam_epsilon=1e-8, weight_decay=0.0,
        lr_scheduler_type="constant", warmup_steps=0, max_grad_norm=1.0,
        bf16=False, fp16=False, use_cpu=True, gradient_checkpointing=False, dataloader_num_workers=0,
        dataloader_pin_memory=False, torch_compile=False, model_init_kwargs={"dtype": "float32"},
        max_length=MAX_LENGTH, disable_dropout=True,
        eval_strategy="no", save_strategy="no", logging_strategy="steps", logging_steps=1,
        report_to="none", disable_tqdm=True,
    )
    dataset = Dataset.from_list(pairs)
    trainer = RewardTrainer(model=model_dir, args=args, train_dataset=dataset, processing_class=tokenizer,
                            callbacks=list(callbacks))
    trainer.remove_callback(PrinterCallback)
    return trainer


# ---- parity ------------------------------------------------------------------------------------------------
class ParityError(AssertionError):
    pass


def parity_check(size: str, model_dir: str, rankings: str, workdir: Path, k: int) -> dict:
    """Same initial weights, same token ids; one prompt's ranking loss == TRL's loss on its pairs."""
    import torch

    from rlhfkit.trainers.reward import make_loss_fn

    rk = build_rlhfkit(model_dir, rankings, str(workdir / f"parity-{size}-rlhfkit"), 1, 1)
    pairs = trl_pairs(model_dir, rankings)
    expected = [{"chosen_ids": list(e.sequences[w]), "rejected_ids": list(e.sequences[lo])}
                for e in rk.trainer.train_examples for w, lo in e.pairs]
    if pairs != expected:
        raise ParityError(f"{size}: the pairs given to TRL are not the token ids rlhfkit trains on")
    n_pairs = k * (k - 1) // 2
    tr = build_trl(model_dir, pairs, str(workdir / f"parity-{size}-trl"), 1, n_pairs)
    if len(tr.train_dataset) != len(pairs):
        raise ParityError(f"{size}: TRL kept {len(tr.train_dataset)} of {len(pairs)} pairs (max_length filter?)")
    rk_state, tr_state = rk.model.state_dict(), tr.model.state_dict()
    if rk_state.keys() != tr_state.keys():
        raise ParityError(f"{size}: different parameters: {sorted(set(rk_state) ^ set(tr_state))}")
    if not all(torch.equal(rk_state[name], tr_state[name]) for name in rk_state):
        tr.model.load_state_dict(rk_state)  # the new score heads may be drawn differently: use rlhfkit's
        head_copied = True
    else:
        head_copied = False
    rk.model.train()
    tr.model.train()
    rk_batch = rk.collator(rk.trainer.train_examples[:1])
    rk_loss, n, _ = make_loss_fn(rk.config.reward, decoder=True)(rk.model, rk_batch)
    tr_batch = tr._prepare_inputs(tr.data_collator([tr.train_dataset[i] for i in range(n_pairs)]))
    tr_loss = tr.compute_loss(tr.model, tr_batch)
    result = {"size": size, "rlhfkit_loss": rk_loss.item(), "trl_loss": tr_loss.item(),
              "abs_diff": abs(rk_loss.item() - tr_loss.item()), "pairs": int(n), "score_head_copied": head_copied,
              "rlhfkit_rows": int(rk_batch["input_ids"].shape[0]), "trl_rows": int(tr_batch["input_ids"].shape[0])}
    if not result["abs_diff"] <= LOSS_TOLERANCE:
        raise ParityError(f"{size}: losses differ by {result['abs_diff']:.3g}: {result}")
    return result


# ---- one timed run (in a child process) --------------------------------------------------------------------
def run_child(spec: dict) -> dict:
    import torch

    if spec.get("threads"):
        torch.set_num_threads(spec["threads"])
    warmup, steps = spec["warmup"], spec["steps"]
    total = warmup + steps
    ends: list[float] = []
    comparisons: list[int] = []
    sequences: list[int] = []
    step_tokens: list[int] = []  # non-padding tokens through the model in each step
    flops: list[float] = []      # model FLOPs of each step (rlhfkit)
    peak: dict[str, float] = {}

    def step_done(now: float, n_comparisons: int, n_sequences: int, n_tokens: int) -> None:
        ends.append(now)
        comparisons.append(n_comparisons)
        sequences.append(n_sequences)
        step_tokens.append(n_tokens)
        if len(ends) == total:
            peak["rss"] = common.peak_rss_mib()

    if spec["lib"] == "rlhfkit":
        rk = build_rlhfkit(spec["model_dir"], spec["rankings"], spec["output_dir"], total, spec["prompts_per_batch"])
        trainer = rk.trainer
        collate = trainer.collator
        seen: list[tuple[int, int]] = []

        def counting_collator(examples):  # count the work of each micro-batch as it is built
            batch = collate(examples)
            seen.append((int(batch["winner"].numel()), int(batch["input_ids"].shape[0])))
            return batch

        trainer.collator = counting_collator
        counter = common.StepFlops(trainer)
        optimizer_step = trainer._optimizer_step

        def timed_step(batches):
            loss = optimizer_step(batches)
            flops.append(counter.take())
            step_done(time.perf_counter(), *seen[-1], trainer._tokens_in_step)
            return loss

        trainer._optimizer_step = timed_step
        rss_start = common.current_rss_mib()
        rk.train()
    else:
        from transformers import TrainerCallback

        pairs = common.read_rows(spec["pairs"])  # the same rankings' pairs, tokenized as rlhfkit does

        class StepTimer(TrainerCallback):
            trainer = None

            def on_step_end(self, args, state, control, **kwargs):
                n_tokens = self.trainer._total_train_tokens - sum(step_tokens)
                step_done(time.perf_counter(), spec["trl_pairs_per_batch"], 2 * spec["trl_pairs_per_batch"], n_tokens)

        timer = StepTimer()
        trainer = build_trl(spec["model_dir"], pairs, spec["output_dir"], total, spec["trl_pairs_per_batch"], [timer])
        timer.trainer = trainer
        rss_start = common.current_rss_mib()
        trainer.train()
    if len(ends) != total:
        raise RuntimeError(f"{spec['lib']}: expected {total} steps, saw {len(ends)}")
    elapsed = ends[-1] - ends[warmup - 1]
    return {"lib": spec["lib"], "size": spec["size"], "steps": steps, "s_per_step": elapsed / steps,
            "comparisons_per_s": sum(comparisons[warmup:]) / elapsed,
            "sequences_per_s": sum(sequences[warmup:]) / elapsed,
            "comparisons_per_step": sum(comparisons[warmup:]) / steps, "peak_rss_mib": peak["rss"],
            "tokens_per_s": sum(step_tokens[warmup:]) / elapsed,
            **({"model_flops_per_s": sum(flops[warmup:]) / elapsed} if flops else {}),
            "rss_at_train_start_mib": rss_start, "threads": torch.get_num_threads()}


# ---- report ------------------------------------------------------------------------------------------------
KEYS = ("comparisons_per_s", "sequences_per_s", "tokens_per_s", "s_per_step", "peak_rss_mib")


def summarize(runs: list[dict]) -> dict:
    by_lib = {lib: [r for r in runs if r["lib"] == lib] for lib in LIBS}
    summary = {lib: {key: common.median([r[key] for r in rs]) for key in KEYS} for lib, rs in by_lib.items()}
    pairs = list(zip(by_lib["rlhfkit"], by_lib["trl"], strict=True))
    summary["ratio"] = {key: common.median([a[key] / b[key] for a, b in pairs]) for key in KEYS}
    return summary


def table(results: dict, k: int) -> str:
    lines = [f"{'size':<6} {'library':<8} {'comparisons/s':>14} {'sequences/s':>12} {'s/step':>8} "
             f"{'peak RSS MiB':>13}", "-" * 66]
    for size, entry in results.items():
        s = entry["summary"]
        for lib in LIBS:
            lines.append(f"{size:<6} {lib:<8} {s[lib]['comparisons_per_s']:>14.1f} {s[lib]['sequences_per_s']:>12.1f} "
                         f"{s[lib]['s_per_step']:>8.4f} {s[lib]['peak_rss_mib']:>13.0f}")
        r = s["ratio"]
        lines.append(f"{size:<6} {'rk/TRL':<8} {r['comparisons_per_s']:>13.2f}x {r['sequences_per_s']:>11.2f}x "
                     f"{r['s_per_step']:>7.2f}x {r['peak_rss_mib']:>12.2f}x")
        lines.append("")
    lines.append(f"K = {k}; medians over runs; rk/TRL = rlhfkit / TRL, median of the per-pair ratios "
                 "(comparisons/s > 1x means rlhfkit trains on more comparisons per second)")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", nargs="+", default=list(DEFAULT_STEPS), choices=list(DEFAULT_STEPS))
    parser.add_argument("--k", type=int, default=4, help="completions per ranking")
    parser.add_argument("--prompts", type=int, default=128, help="rankings in the data set")
    parser.add_argument("--pairs", type=int, default=3, help="rlhfkit/TRL run pairs per size")
    parser.add_argument("--prompts-per-batch", type=int, default=8, help="rlhfkit batch (rankings)")
    parser.add_argument("--trl-pairs-per-batch", type=int, default=None,
                        help="TRL batch (pairs); default: the same number of sequences as rlhfkit's batch")
    parser.add_argument("--steps-tiny", type=int, default=DEFAULT_STEPS["tiny"])
    parser.add_argument("--steps-small", type=int, default=DEFAULT_STEPS["small"])
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--threads", type=int, default=None, help="torch threads in every run (default: torch's)")
    parser.add_argument("--json", help="also write all raw results to this file")
    parser.add_argument("--workdir", help="keep data, models and run directories here (default: a temp dir)")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args()

    if args.child:
        print("RESULT " + json.dumps(run_child(json.loads(args.child))), flush=True)
        return
    if args.warmup < 1:
        parser.error("--warmup must be at least 1")
    for key, value in common.CHILD_ENV.items():
        os.environ.setdefault(key, value)
    trl_batch = args.trl_pairs_per_batch or args.prompts_per_batch * args.k // 2
    steps = {"tiny": args.steps_tiny, "small": args.steps_small}
    workdir = Path(args.workdir) if args.workdir else Path(tempfile.mkdtemp(prefix="bench_rm-"))
    workdir.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    try:
        data, rankings = make_rankings(workdir, args.k, args.prompts)
        print(f"data: {args.prompts} rankings of K = {args.k} ({args.prompts * args.k * (args.k - 1) // 2} pairs), "
              f"rendered prompt {data.prompt_tokens_mean:.1f} tokens, completion+EOS "
              f"{data.completion_tokens_mean:.1f} tokens on average; vocab 512", flush=True)
        print(f"batches: rlhfkit {args.prompts_per_batch} rankings ({args.prompts_per_batch * args.k} sequences, "
              f"{args.prompts_per_batch * args.k * (args.k - 1) // 2} comparisons); TRL {trl_batch} pairs "
              f"({2 * trl_batch} sequences, {trl_batch} comparisons)")
        models = {}
        for size in args.sizes:
            models[size] = common.save_random_model(data.tokenizer_dir, size, workdir / f"model-{size}", seed=SEED)
            print(f"model {size}: {models[size][1] / 1e6:.2f}M parameters (random init, seed {SEED}, fp32)")

        pairs_path = workdir / "pairs.jsonl"
        with pairs_path.open("w", encoding="utf-8") as handle:
            for row in trl_pairs(models[args.sizes[0]][0], rankings):
                handle.write(json.dumps(row) + "\n")

        print("\nparity check (one prompt's loss: rlhfkit on its K completions, TRL on its pairs):")
        parity = {}
        for size in args.sizes:
            try:
                p = parity_check(size, models[size][0], rankings, workdir, args.k)
            except ParityError as error:
                print(f"\nPARITY CHECK FAILED: {error}", file=sys.stderr)
                raise SystemExit(2) from None
            parity[size] = p
            print(f"  {size:<5} rlhfkit {p['rlhfkit_loss']:.6f} ({p['rlhfkit_rows']} sequences)  TRL "
                  f"{p['trl_loss']:.6f} ({p['trl_rows']} sequences)  |diff| {p['abs_diff']:.1e}  OK")

        results = {}
        for size in args.sizes:
            print(f"\n{size}: {args.pairs} pairs x ({args.warmup} warm-up + {steps[size]} timed steps), "
                  "alternating rlhfkit / TRL, fresh process each", flush=True)
            runs = []
            for pair in range(args.pairs):
                for lib in LIBS:
                    out = workdir / f"run-{size}-{lib}-{pair}"
                    spec = {"lib": lib, "size": size, "model_dir": models[size][0], "rankings": rankings,
                            "output_dir": str(out), "warmup": args.warmup, "steps": steps[size],
                            "prompts_per_batch": args.prompts_per_batch, "trl_pairs_per_batch": trl_batch,
                            "threads": args.threads, "pairs": str(pairs_path)}
                    run = common.spawn_child(__file__, spec)
                    shutil.rmtree(out, ignore_errors=True)
                    runs.append(run)
                    print(f"  pair {pair + 1} {lib:<8} {run['comparisons_per_s']:8.1f} comparisons/s  "
                          f"{run['s_per_step']:.4f} s/step  peak RSS {run['peak_rss_mib']:.0f} MiB", flush=True)
            results[size] = {"runs": runs, "summary": summarize(runs), "params": models[size][1]}

        print("\n" + table(results, args.k))
        print(f"\ntotal {time.perf_counter() - started:.0f} s")
        if args.json:
            meta = {"date": datetime.now(timezone.utc).isoformat(timespec="seconds"), "cpu": common.cpu_model(),
                    "cpus": os.cpu_count(), "versions": common.versions("torch", "transformers", "trl",
                                                                       "accelerate", "datasets", "rlhfkit"),
                    "k": args.k, "prompts_per_batch": args.prompts_per_batch, "trl_pairs_per_batch": trl_batch,
                    "warmup": args.warmup, "steps": steps, "pairs": args.pairs, "threads": args.threads,
                    "data": data.__dict__}
            Path(args.json).write_text(json.dumps({"meta": meta, "parity": parity, "results": results}, indent=1))
    finally:
        if not args.workdir:
            shutil.rmtree(workdir, ignore_errors=True)


if __name__ == "__main__":
    main()
