#!/usr/bin/env python
"""DPO speed and memory: rlhfkit's trainer vs TRL's ``DPOTrainer`` on identical work.

    python benchmarks/bench_dpo.py                       # parity check, then tiny and small, 3 pairs each
    python benchmarks/bench_dpo.py --sizes small --variants ref lora --pairs 5 --json results.json

Both libraries get the same saved random-init Llama (fp32), the same tokenizer and the same preference
pairs (prompt rendered with the chat template; chosen and rejected completions + EOS; log-probs summed
over completion tokens), the sigmoid DPO loss with beta 0.1, batch 8 pairs, AdamW (lr 1e-4, betas
(0.9, 0.95), weight decay 0), constant LR without warmup, grad clipping at 1.0, no eval, no checkpoint
during the run, logging every step. TRL's GPU-minded defaults are switched to rlhfkit's (bf16 -> fp32,
gradient checkpointing -> off, no dataloader workers).

Variants (each library in its own equivalent setting):

* ``ref``: full fine-tuning, the reference is a frozen copy scored on the fly every step (TRL's default);
* ``precompute``: full fine-tuning, reference log-probs computed once before training
  (rlhfkit ``dpo.precompute_reference``, TRL ``precompute_ref_log_probs``); that pass is not timed;
* ``lora``: LoRA r=8 on all linear layers, the reference is the base with adapters disabled.

First a parity check on the ``ref`` setting: the token ids and completion masks of every pair agree,
then the policy is perturbed away from the reference (the same seeded noise in both) and both libraries'
loss paths score the same first batch: the loss, ``rewards/chosen``, ``rewards/rejected``,
``rewards/margins`` and ``rewards/accuracies`` must agree to 1e-4, and the gradient norms to 1e-3
(relative). The shared-prompt layout is rlhfkit's default; the check runs on it.

Then runs alternate rlhfkit, TRL, rlhfkit, TRL, ... each in a fresh subprocess (so the peak RSS is
that run's). Timing is as in ``bench_sft.py``: ``--warmup`` untimed steps, then the wall time from the
end of one optimizer step to the end of the next; peak RSS is ``ru_maxrss`` at the end of the last
timed step. Reported: medians over runs, and the rlhfkit/TRL ratios as medians of per-pair ratios;
also each rlhfkit variant against TRL's default (``ref``).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import common  # noqa: E402

BATCH_SIZE = 8
LR = 1e-4
BETAS = (0.9, 0.95)
BETA = 0.1
MAX_LENGTH = 128
MAX_PROMPT_LENGTH = 64
N_PAIRS = 256
SEED = 0
TOLERANCE = 1e-4
GRAD_NORM_RTOL = 1e-3
DEFAULT_STEPS = {"tiny": 20, "small": 8}
VARIANTS = ("ref", "precompute", "lora")
LORA = {"r": 8, "alpha": 16.0, "dropout": 0.0, "target_modules": "all-linear"}
NOISY = 0.10
LIBS = ("rlhfkit", "trl")
METRICS = ("loss", "rewards/chosen", "rewards/rejected", "rewards/margins", "rewards/accuracies")



# ---- data ------------------------------------------------------------------------------------------------
def make_pairs(workdir: Path) -> tuple[common.BenchData, str]:
    """``N_PAIRS`` preference pairs from ``common.make_data`` rows: the prompt of row 2i, the completion of
    row 2i as chosen and of row 2i+1 as rejected (so both are 32-64 tokens, like the SFT benchmark)."""
    data = common.make_data(workdir, n_examples=2 * N_PAIRS)
    rows = common.read_rows(data.train_path)
    pairs = [{"prompt": rows[2 * i]["prompt"], "chosen": rows[2 * i]["completion"],
              "rejected": rows[2 * i + 1]["completion"]} for i in range(N_PAIRS)]
    path = workdir / "pairs.jsonl"
    path.write_text("".join(json.dumps(p) + "\n" for p in pairs), encoding="utf-8")
    return data, str(path)


# ---- the two trainers, configured for the same work --------------------------------------------------------
def build_rlhfkit(model_dir: str, pairs_path: str, output_dir: str, max_steps: int, variant: str):
    from rich.console import Console

    from rlhfkit.config import DPOConfig, load_config
    from rlhfkit.trainers.dpo import build_dpo_trainer

    model = {"name_or_path": model_dir, "dtype": "float32"}
    if variant == "lora":
        model["lora"] = dict(LORA)
    config = load_config(DPOConfig, base={
        "model": model,
        "data": {"train": pairs_path, "max_length": MAX_LENGTH, "max_prompt_length": MAX_PROMPT_LENGTH},
        "train": {"output_dir": output_dir, "seed": SEED, "batch_size": BATCH_SIZE, "grad_accum": 1,
                  "lr": LR, "adam_betas": list(BETAS), "weight_decay": 0.0, "scheduler": "constant",
                  "warmup_steps": 0, "max_grad_norm": 1.0, "max_steps": max_steps, "mixed_precision": "no",
                  "gradient_checkpointing": False, "log_every": 1, "eval_every": None, "save_every": None,
                  "resume": False, "progress": False},
        "dpo": {"loss": "dpo", "beta": BETA, "precompute_reference": variant == "precompute"}})
    return build_dpo_trainer(config, console=Console(stderr=True))


def trl_dataset(tokenizer, pairs_path: str):
    """Pairs with the prompt already rendered by the chat template, as rlhfkit renders it; TRL appends EOS."""
    from datasets import Dataset

    rows = common.read_rows(pairs_path)
    prompts = [tokenizer.apply_chat_template([{"role": "user", "content": r["prompt"]}],
                                             add_generation_prompt=True, tokenize=False) for r in rows]
    return Dataset.from_dict({"prompt": prompts, "chosen": [r["chosen"] for r in rows],
                              "rejected": [r["rejected"] for r in rows]})


def build_trl(model_dir: str, pairs_path: str, output_dir: str, max_steps: int, variant: str, callbacks=()):
    from transformers import AutoModelForCausalLM, AutoTokenizer, PrinterCallback
    from trl import DPOConfig, DPOTrainer

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    args = DPOConfig(
        output_dir=output_dir, seed=SEED, data_seed=SEED,
        per_device_train_batch_size=BATCH_SIZE, gradient_accumulation_steps=1, max_steps=max_steps,
        learning_rate=LR, adam_beta1=BETAS[0], adam_beta2=BETAS[1], adam_epsilon=1e-8, weight_decay=0.0,
        lr_scheduler_type="constant", warmup_steps=0, max_grad_norm=1.0,
        loss_type=["sigmoid"], beta=BETA, precompute_ref_log_probs=variant == "precompute",
        # TRL's defaults that are wrong for a CPU / unequal work, set to rlhfkit's:
        bf16=False, fp16=False, use_cpu=True, gradient_checkpointing=False,
        dataloader_num_workers=0, dataloader_pin_memory=False, torch_compile=False,
        max_length=MAX_LENGTH, eval_strategy="no", save_strategy="no", logging_strategy="steps",
        logging_steps=1, report_to="none", disable_tqdm=True,
    )
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype="float32")
    peft_config = None
    if variant == "lora":
        from peft import LoraConfig

        peft_config = LoraConfig(r=LORA["r"], lora_alpha=LORA["alpha"], lora_dropout=LORA["dropout"],
                                 target_modules=LORA["target_modules"], task_type="CAUSAL_LM")
    trainer = DPOTrainer(model=model, args=args, train_dataset=trl_dataset(tokenizer, pairs_path),
                         processing_class=tokenizer, peft_config=peft_config, callbacks=list(callbacks))
    trainer.remove_callback(PrinterCallback)
    return trainer


def quiet_libraries() -> None:
    import warnings

    import datasets
    import transformers

    datasets.disable_progress_bars()
    transformers.utils.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    warnings.filterwarnings("ignore", category=FutureWarning)
    warnings.filterwarnings("ignore", category=UserWarning)


# ---- parity --------------------------------------------------------------------------------------------
class ParityError(AssertionError):
    pass


def _perturb(model, seed: int, scale: float = 0.02) -> None:
    """Add the same seeded Gaussian noise to every weight (by name), so the policy leaves the reference."""
    import torch

    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, param in sorted(model.named_parameters(), key=lambda item: item[0]):
            param.add_(torch.randn(param.shape, generator=generator) * scale)


def parity_check(size: str, model_dir: str, pairs_path: str, workdir: Path) -> dict:
    """Same token ids and masks for every pair; same loss and rewards on the first batch of a perturbed policy."""
    import torch

    rk = build_rlhfkit(model_dir, pairs_path, str(workdir / f"parity-{size}-rlhfkit"), 1, "ref")
    tr = build_trl(model_dir, pairs_path, str(workdir / f"parity-{size}-trl"), 1, "ref")

    # 1. every pair: same prompt, chosen and rejected token ids
    if len(rk.train_examples) != len(tr.train_dataset):
        raise ParityError(f"{size}: {len(rk.train_examples)} rlhfkit pairs vs {len(tr.train_dataset)} TRL rows")
    for i, (example, row) in enumerate(zip(rk.train_examples, tr.train_dataset, strict=True)):
        ours = (example.prompt, *example.responses, example.pairs)
        theirs = (row["prompt_ids"], row["chosen_ids"], row["rejected_ids"], ((0, 1),))
        if ours != theirs:
            raise ParityError(f"{size}: pair {i} differs\n  rlhfkit {ours}\n  TRL     {theirs}")

    # 2. identical initial weights, then the same perturbation of both policies (references stay put)
    rk_state, tr_state = rk.model.state_dict(), tr.model.state_dict()
    if rk_state.keys() != tr_state.keys() or not all(torch.equal(rk_state[k], tr_state[k]) for k in rk_state):
        raise ParityError(f"{size}: the two libraries did not load the same initial weights")
    _perturb(rk.model, SEED + 1)
    _perturb(tr.model, SEED + 1)

    # 3. each library's own loss path on the first BATCH_SIZE pairs (file order)
    rk.model.train()
    tr.model.train()
    batch = rk.collator(rk.train_examples[:BATCH_SIZE])
    loss, _, metrics = rk.loss_fn(rk.model, batch)
    ours = {"loss": loss.item(), **{k: float(v) for k, v in metrics.items()}}
    tr._metrics["train"].clear()
    inputs = tr._prepare_inputs(tr.data_collator([tr.train_dataset[i] for i in range(BATCH_SIZE)]))
    tr_loss = tr.compute_loss(tr.model, inputs)
    theirs = {"loss": tr_loss.item(), **{k: v[-1] for k, v in tr._metrics["train"].items()
                                          if k.startswith(("rewards/", "logps/"))}}
    loss.backward()
    tr_loss.backward()

    def grad_norm(model) -> float:
        return float(torch.linalg.vector_norm(torch.stack([p.grad.norm() for p in model.parameters()
                                                           if p.grad is not None])))

    ours["grad_norm"], theirs["grad_norm"] = grad_norm(rk.model), grad_norm(tr.model)
    diffs = {k: abs(ours[k] - theirs[k]) for k in (*METRICS, "logps/chosen", "logps/rejected", "grad_norm")}
    result = {"size": size, "rlhfkit": ours, "trl": theirs, "abs_diff": diffs, "n_pairs": len(rk.train_examples)}
    if diffs["grad_norm"] > GRAD_NORM_RTOL * max(ours["grad_norm"], theirs["grad_norm"]):
        raise ParityError(f"{size}: gradient norms differ: rlhfkit {ours['grad_norm']:.6f} vs "
                          f"TRL {theirs['grad_norm']:.6f}")
    bad = {k: d for k, d in diffs.items() if k in METRICS and not d <= TOLERANCE}
    if bad:
        raise ParityError(f"{size}: rlhfkit and TRL disagree beyond {TOLERANCE}: {bad}\n"
                          f"  rlhfkit {ours}\n  TRL {theirs}")
    return result


# ---- one timed run (in a child process) ----------------------------------------------------------------
def run_child(spec: dict) -> dict:
    """Train ``warmup + steps`` steps with one library and variant; time the last ``steps``."""
    warmup, steps = spec["warmup"], spec["steps"]
    total = warmup + steps
    ends: list[float] = []
    tokens: list[int] = []   # prompt + chosen + prompt + rejected tokens of the step's pairs (the same in both)
    flops: list[float] = []  # model FLOPs of each step (rlhfkit, full fine-tuning)
    peak: dict[str, float] = {}
    cpu: dict[str, tuple[float, float]] = {}

    def step_done(now: float) -> None:
        ends.append(now)
        if len(ends) == warmup:
            cpu["start"] = common.cpu_snapshot()
        if len(ends) == total:
            cpu["end"] = common.cpu_snapshot()
            peak["rss"] = common.peak_rss_mib()

    setup_start = time.perf_counter()
    if spec["lib"] == "rlhfkit":
        trainer = build_rlhfkit(spec["model_dir"], spec["pairs_path"], spec["output_dir"], total, spec["variant"])
        optimizer_step = trainer._optimizer_step
        # training passes over each row (prompt, chosen, rejected), plus the frozen reference copy's forward
        counter = common.StepFlops(trainer, passes=4 if spec["variant"] == "ref" else 3)
        collate = trainer.collator

        def counting_collator(examples):
            tokens.append(sum(len(e.prompt) * 2 + len(e.responses[0]) + len(e.responses[1]) for e in examples))
            return collate(examples)

        trainer.collator = counting_collator

        def timed_step(batches):
            loss = optimizer_step(batches)
            flops.append(counter.take())
            step_done(time.perf_counter())
            return loss

        trainer._optimizer_step = timed_step
    else:
        from transformers import TrainerCallback

        class StepTimer(TrainerCallback):
            trainer = None

            def on_step_end(self, args, state, control, **kwargs):
                tokens.append(self.trainer._total_train_tokens - sum(tokens))  # its rows: prompt + response
                step_done(time.perf_counter())

        timer = StepTimer()
        trainer = build_trl(spec["model_dir"], spec["pairs_path"], spec["output_dir"], total, spec["variant"],
                            [timer])
        timer.trainer = trainer
    setup_s = time.perf_counter() - setup_start
    trainer.train()
    if len(ends) != total:
        raise RuntimeError(f"{spec['lib']}: expected {total} steps, saw {len(ends)}")
    elapsed = ends[-1] - ends[warmup - 1]
    result = {"tokens_per_s": sum(tokens[warmup:total]) / elapsed}
    if flops and spec["variant"] != "lora":  # LoRA's backward skips the frozen weights' gradients: not counted
        result["model_flops_per_s"] = sum(flops[warmup:]) / elapsed
    return {**result, "lib": spec["lib"], "size": spec["size"], "variant": spec["variant"], "steps": steps,
            "s_per_step": elapsed / steps, "steps_per_s": steps / elapsed, "peak_rss_mib": peak["rss"],
            "setup_s": setup_s, "other_cpu": common.foreign_load(cpu["start"], cpu["end"], elapsed)}


# ---- report ---------------------------------------------------------------------------------------------
KEYS = ("s_per_step", "steps_per_s", "tokens_per_s", "peak_rss_mib", "setup_s")


def summarize(runs: list[dict]) -> dict:
    by_lib = {lib: [r for r in runs if r["lib"] == lib] for lib in LIBS}
    summary = {lib: {key: common.median([r[key] for r in rs]) for key in KEYS} for lib, rs in by_lib.items()}
    pairs = list(zip(by_lib["rlhfkit"], by_lib["trl"], strict=True))
    summary["ratio"] = {key: common.median([a[key] / b[key] for a, b in pairs]) for key in KEYS}
    summary["max_other_cpu"] = max(r["other_cpu"] for r in runs)
    return summary


def table(results: dict) -> str:
    lines = [f"{'size':<6} {'variant':<11} {'library':<8} {'s/step':>9} {'steps/s':>9} {'peak RSS MiB':>13}",
             "-" * 62]
    for size, by_variant in results.items():
        for variant, entry in by_variant.items():
            s = entry["summary"]
            for lib in LIBS:
                lines.append(f"{size:<6} {variant:<11} {lib:<8} {s[lib]['s_per_step']:>9.4f} "
                             f"{s[lib]['steps_per_s']:>9.2f} {s[lib]['peak_rss_mib']:>13.0f}")
            r = s["ratio"]
            lines.append(f"{size:<6} {variant:<11} {'rk/TRL':<8} {r['s_per_step']:>8.2f}x {r['steps_per_s']:>8.2f}x "
                         f"{r['peak_rss_mib']:>12.2f}x")
            if variant != "ref" and "ref" in by_variant:
                base = by_variant["ref"]["summary"]["trl"]
                lines.append(f"{size:<6} {variant:<11} {'vs TRL ref':<8} {'':>9} "
                             f"{s['rlhfkit']['steps_per_s'] / base['steps_per_s']:>8.2f}x "
                             f"{s['rlhfkit']['peak_rss_mib'] / base['peak_rss_mib']:>12.2f}x")
            lines.append("")
    lines.append("medians over runs; rk/TRL = rlhfkit / TRL in the same variant, median of per-pair ratios "
                 "(steps/s > 1x: rlhfkit faster; RSS < 1x: rlhfkit smaller); 'vs TRL ref' = this rlhfkit "
                 "variant against TRL's default setting")
    busy = max(e["summary"]["max_other_cpu"] for v in results.values() for e in v.values())
    if busy > NOISY:
        lines.append(f"WARNING: other processes used up to {busy:.0%} of the CPUs during timed steps: "
                     "the timings are not reliable; re-run on a quiet machine")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", nargs="+", default=list(DEFAULT_STEPS), choices=list(DEFAULT_STEPS))
    parser.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=VARIANTS)
    parser.add_argument("--pairs", type=int, default=3, help="rlhfkit/TRL run pairs per size and variant")
    parser.add_argument("--steps-tiny", type=int, default=DEFAULT_STEPS["tiny"])
    parser.add_argument("--steps-small", type=int, default=DEFAULT_STEPS["small"])
    parser.add_argument("--warmup", type=int, default=3, help="untimed steps at the start of each run (>= 1)")
    parser.add_argument("--quiet-below", type=float, default=0.15,
                        help="before each run, wait until other processes use less than this share of the CPUs")
    parser.add_argument("--max-wait", type=float, default=60, help="longest wait (s) for a quiet machine per run")
    parser.add_argument("--skip-parity", action="store_true")
    parser.add_argument("--json", help="also write all raw results to this file")
    parser.add_argument("--workdir", help="keep data, models and run directories here (default: a temp dir)")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args()

    if args.child:
        quiet_libraries()
        print("RESULT " + json.dumps(run_child(json.loads(args.child))), flush=True)
        return
    if args.warmup < 1:
        parser.error("--warmup must be at least 1 (the timing starts at the end of a warm-up step)")
    for key, value in common.CHILD_ENV.items():
        os.environ.setdefault(key, value)
    quiet_libraries()
    steps = {"tiny": args.steps_tiny, "small": args.steps_small}
    workdir = Path(args.workdir) if args.workdir else Path(tempfile.mkdtemp(prefix="bench_dpo-"))
    workdir.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    try:
        data, pairs_path = make_pairs(workdir)
        print(f"data: {N_PAIRS} pairs, rendered prompt {data.prompt_tokens_mean:.1f} tokens, chosen/rejected "
              f"completion+EOS {data.completion_tokens_mean:.1f} tokens on average; vocab 512", flush=True)
        models = {}
        for size in args.sizes:
            models[size] = common.save_random_model(data.tokenizer_dir, size, workdir / f"model-{size}", seed=SEED)
            print(f"model {size}: {models[size][1] / 1e6:.2f}M parameters (random init, seed {SEED}, fp32)")

        parity = {}
        if not args.skip_parity:
            print("\nparity check (perturbed policy vs its initial weights as reference, first batch of 8 pairs):")
            for size in args.sizes:
                try:
                    p = parity_check(size, models[size][0], pairs_path, workdir)
                except ParityError as error:
                    print(f"\nPARITY CHECK FAILED: {error}", file=sys.stderr)
                    raise SystemExit(2) from None
                parity[size] = p
                print(f"  {size:<5} token ids identical for all {p['n_pairs']} pairs")
                for key in (*METRICS, "logps/chosen", "logps/rejected", "grad_norm"):
                    print(f"        {key:<19} rlhfkit {p['rlhfkit'][key]:>12.6f}  TRL {p['trl'][key]:>12.6f}  "
                          f"|diff| {p['abs_diff'][key]:.1e}")

        results: dict = {}
        for size in args.sizes:
            results[size] = {}
            for variant in args.variants:
                print(f"\n{size} / {variant}: {args.pairs} pairs x ({args.warmup} warm-up + {steps[size]} timed "
                      "steps), alternating libraries, fresh process each", flush=True)
                runs = []
                for pair in range(args.pairs):
                    order = list(LIBS) if pair % 2 == 0 else list(reversed(LIBS))  # neither always first
                    for lib in order:
                        out = workdir / f"run-{size}-{variant}-{lib}-{pair}"
                        shutil.rmtree(out, ignore_errors=True)
                        load = common.wait_until_quiet(args.quiet_below, args.max_wait)
                        if load >= args.quiet_below:
                            print(f"  (machine still {load:.0%} busy after {args.max_wait:.0f} s; running anyway)")
                        run = common.spawn_child(__file__, {
                            "lib": lib, "size": size, "variant": variant, "model_dir": models[size][0],
                            "pairs_path": pairs_path, "output_dir": str(out), "warmup": args.warmup,
                            "steps": steps[size]})
                        shutil.rmtree(out, ignore_errors=True)
                        runs.append(run)
                        print(f"  pair {pair + 1} {lib:<8} {run['s_per_step']:.4f} s/step  {run['steps_per_s']:.2f} "
                              f"steps/s  peak RSS {run['peak_rss_mib']:.0f} MiB  setup {run['setup_s']:.1f} s  "
                              f"other processes {run['other_cpu']:.0%} CPU", flush=True)
                results[size][variant] = {"runs": runs, "summary": summarize(runs), "params": models[size][1]}

        print("\n" + table(results))
        print(f"\ntotal {time.perf_counter() - started:.0f} s")
        if args.json:
            meta = {"date": datetime.now(timezone.utc).isoformat(timespec="seconds"), "cpu": common.cpu_model(),
                    "cpus": os.cpu_count(), "versions": common.versions("torch", "transformers", "trl", "peft",
                                                                       "accelerate", "datasets", "rlhfkit"),
                    "batch_size": BATCH_SIZE, "warmup": args.warmup, "steps": steps, "pairs": args.pairs,
                    "data": data.__dict__}
            Path(args.json).write_text(json.dumps({"meta": meta, "parity": parity, "results": results}, indent=1))
    finally:
        if not args.workdir:
            shutil.rmtree(workdir, ignore_errors=True)


if __name__ == "__main__":
    main()
