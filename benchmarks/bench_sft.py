#!/usr/bin/env python
"""SFT speed and memory: rlhfkit's trainer vs TRL's ``SFTTrainer`` on identical work.

    python benchmarks/bench_sft.py                 # parity check, then tiny and small, 3 pairs each
    python benchmarks/bench_sft.py --sizes tiny --pairs 5 --json results.json

Both libraries get the same saved random-init Llama (fp32), the same tokenizer and data (prompt rendered
with the chat template, completion + EOS, loss on completion tokens only), batch 8, AdamW (lr 1e-4,
betas (0.9, 0.95), weight decay 0), constant LR without warmup, grad clipping at 1.0, no eval, no
checkpoint during the run, logging every step. TRL's GPU-minded defaults are switched to rlhfkit's
(bf16 -> fp32, gradient checkpointing -> off, packing / padding-free -> off, no dataloader workers).

First a parity check: the token ids and loss masks of every example, the initial weights, and the
loss (and gradient norm) of both libraries' loss paths on the same batch must agree (loss to 1e-4).

Then, per size, runs alternate rlhfkit, TRL, rlhfkit, TRL, ... each in a fresh subprocess (so the
peak RSS is that run's). A run does ``--warmup`` untimed steps, then the timed steps. The time of a
step is the wall time from the end of one optimizer step to the end of the next, so it covers all
the loop does per step in both libraries (fetch + collate the batch, forward, backward, clip, AdamW,
scheduler, logging). Tokens/s counts non-padding tokens (prompt + completion). Peak RSS is the
process's high-water mark (``VmHWM``, see ``common.peak_rss_mib``) at the end of the last timed step, so
rlhfkit's final checkpoint/``final/`` save, done after the loop, is not in it. Reported: the median over
runs, and the rlhfkit/TRL ratio as the median of the per-pair ratios. Each run also reports its CPU
seconds per step and the share of the CPUs other processes used meanwhile (the table is flagged when
the machine was busy; ``--threads 1`` gives steadier numbers on a shared machine).

Each library keeps its own AdamW implementation: rlhfkit ``foreach=True``, TRL (transformers' default
``optim="adamw_torch_fused"``) ``fused=True``; same hyper-parameters. Each keeps its default batch order:
rlhfkit groups examples of similar length (``train.group_by_length``), TRL samples at random;
``--trl-group-by-length`` gives TRL its ``LengthGroupedSampler`` too.
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
MAX_LENGTH = 128
MAX_PROMPT_LENGTH = 64
SEED = 0
LOSS_TOLERANCE = 1e-4
GRAD_NORM_RTOL = 1e-3
DEFAULT_STEPS = {"tiny": 30, "small": 10}
METRICS = ("s_per_step", "tokens_per_s", "peak_rss_mib", "cpu_s_per_step", "inner_s_per_step", "other_cpu")
NOISY = 0.10  # share of the CPUs used by other processes during a run above which the table is flagged
LIBS = ("rlhfkit", "trl")



# ---- the two trainers, configured for the same work ---------------------------------------------------
def build_rlhfkit(model_dir: str, train_path: str, output_dir: str, max_steps: int, torch_compile: bool = False):
    from rich.console import Console

    from rlhfkit.config import SFTConfig, load_config
    from rlhfkit.trainers.sft import build_sft_trainer

    config = load_config(SFTConfig, base={
        "model": {"name_or_path": model_dir, "dtype": "float32"},
        "data": {"train": train_path, "max_length": MAX_LENGTH, "max_prompt_length": MAX_PROMPT_LENGTH},
        "train": {"output_dir": output_dir, "seed": SEED, "batch_size": BATCH_SIZE, "grad_accum": 1,
                  "lr": LR, "adam_betas": list(BETAS), "weight_decay": 0.0, "scheduler": "constant",
                  "warmup_steps": 0, "max_grad_norm": 1.0, "max_steps": max_steps, "mixed_precision": "no",
                  "gradient_checkpointing": False, "torch_compile": torch_compile, "log_every": 1,
                  "eval_every": None, "save_every": None,
                  "resume": False, "progress": False}})
    return build_sft_trainer(config, console=Console(stderr=True))


def trl_dataset(tokenizer, train_path: str):
    """Prompt-completion rows with the prompt already rendered by the chat template, as rlhfkit renders it
    (``render_prompt``: one user message + generation prompt). TRL appends the EOS to the completion."""
    from datasets import Dataset

    rows = common.read_rows(train_path)
    prompts = [tokenizer.apply_chat_template([{"role": "user", "content": r["prompt"]}],
                                             add_generation_prompt=True, tokenize=False) for r in rows]
    return Dataset.from_dict({"prompt": prompts, "completion": [r["completion"] for r in rows]})


def build_trl(model_dir: str, train_path: str, output_dir: str, max_steps: int, callbacks=(),
              group_by_length: bool = False):
    """TRL's SFTTrainer; ``group_by_length``: its ``LengthGroupedSampler`` (off in TRL by default; rlhfkit's
    ``train.group_by_length``, on by default, does the same)."""
    from transformers import AutoTokenizer, PrinterCallback
    from trl import SFTConfig, SFTTrainer

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    args = SFTConfig(
        output_dir=output_dir, seed=SEED, data_seed=SEED,
        per_device_train_batch_size=BATCH_SIZE, gradient_accumulation_steps=1, max_steps=max_steps,
        learning_rate=LR, adam_beta1=BETAS[0], adam_beta2=BETAS[1], adam_epsilon=1e-8, weight_decay=0.0,
        lr_scheduler_type="constant", warmup_steps=0, max_grad_norm=1.0,
        # TRL's defaults that are wrong for a CPU / unequal work, set to rlhfkit's:
        bf16=False, fp16=False, use_cpu=True, gradient_checkpointing=False, packing=False, padding_free=False,
        dataloader_num_workers=0, dataloader_pin_memory=False, torch_compile=False,
        model_init_kwargs={"dtype": "float32"},
        train_sampling_strategy="group_by_length" if group_by_length else "random",
        max_length=MAX_LENGTH, completion_only_loss=True,
        eval_strategy="no", save_strategy="no", logging_strategy="steps", logging_steps=1,
        report_to="none", disable_tqdm=True,
    )
    trainer = SFTTrainer(model=model_dir, args=args, train_dataset=trl_dataset(tokenizer, train_path),
                         processing_class=tokenizer, callbacks=list(callbacks))
    trainer.remove_callback(PrinterCallback)  # disable_tqdm=True would print the logs of every step
    return trainer


def quiet_libraries() -> None:
    """No progress bars or advisory warnings from the libraries in the parent's output."""
    import warnings

    import datasets
    import transformers

    datasets.disable_progress_bars()
    transformers.utils.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    warnings.filterwarnings("ignore", category=FutureWarning)


# ---- parity ------------------------------------------------------------------------------------------
class ParityError(AssertionError):
    pass


def parity_check(size: str, model_dir: str, train_path: str, workdir: Path) -> dict:
    """Same token ids, loss masks and initial weights; same first-step loss on one fixed batch."""
    import torch

    from rlhfkit.trainers.sft import lm_loss

    rk = build_rlhfkit(model_dir, train_path, str(workdir / f"parity-{size}-rlhfkit"), 1)
    tr = build_trl(model_dir, train_path, str(workdir / f"parity-{size}-trl"), 1)

    # 1. every example: same token ids, same loss mask (rlhfkit loss_mask == TRL labels != -100)
    if len(rk.train_examples) != len(tr.train_dataset):
        raise ParityError(f"{size}: {len(rk.train_examples)} rlhfkit examples vs {len(tr.train_dataset)} TRL rows")
    truncated = sum(e.truncated for e in rk.train_examples)
    if truncated:
        raise ParityError(f"{size}: {truncated} examples truncated by rlhfkit; the data must fit max_length")
    for i, (example, row) in enumerate(zip(rk.train_examples, tr.train_dataset, strict=True)):
        trl_mask = [int(label != -100) for label in row["labels"]]
        if example.input_ids != row["input_ids"] or example.loss_mask != trl_mask:
            raise ParityError(f"{size}: example {i} differs\n  rlhfkit ids  {example.input_ids}"
                              f"\n  TRL ids      {row['input_ids']}\n  rlhfkit mask {example.loss_mask}"
                              f"\n  TRL mask     {trl_mask}")

    # 2. identical initial weights
    rk_state, tr_state = rk.model.state_dict(), tr.model.state_dict()
    if rk_state.keys() != tr_state.keys() or not all(torch.equal(rk_state[k], tr_state[k]) for k in rk_state):
        raise ParityError(f"{size}: the two libraries did not load the same initial weights")

    # 3. first-step loss of each library's own loss path on the first BATCH_SIZE examples (file order)
    rk_batch = rk.collator(rk.train_examples[:BATCH_SIZE])
    tr_batch = tr._prepare_inputs(tr.data_collator([tr.train_dataset[i] for i in range(BATCH_SIZE)]))
    if not (torch.equal(rk_batch["input_ids"], tr_batch["input_ids"])
            and torch.equal(rk_batch["attention_mask"], tr_batch["attention_mask"])):
        raise ParityError(f"{size}: collated batches differ (input_ids / attention_mask)")
    rk.model.train()
    tr.model.train()
    rk_loss, n_targets = lm_loss(rk.model, rk_batch)
    tr_loss = tr.compute_loss(tr.model, tr_batch)
    rk_loss.backward()
    tr_loss.backward()

    def grad_norm(model) -> float:
        return float(torch.linalg.vector_norm(torch.stack([p.grad.norm() for p in model.parameters()
                                                           if p.grad is not None])))

    rk_gn, tr_gn = grad_norm(rk.model), grad_norm(tr.model)
    result = {"size": size, "rlhfkit_loss": rk_loss.item(), "trl_loss": tr_loss.item(),
              "abs_diff": abs(rk_loss.item() - tr_loss.item()), "target_tokens": int(n_targets),
              "trl_target_tokens": int((tr_batch["labels"][:, 1:] != -100).sum()),
              "rlhfkit_grad_norm": rk_gn, "trl_grad_norm": tr_gn, "n_examples": len(rk.train_examples),
              "example0_ids": rk.train_examples[0].input_ids, "example0_mask": rk.train_examples[0].loss_mask,
              "attn_implementation": (rk.model.config._attn_implementation, tr.model.config._attn_implementation)}
    if result["target_tokens"] != result["trl_target_tokens"]:
        raise ParityError(f"{size}: target token counts differ: {result}")
    if not result["abs_diff"] <= LOSS_TOLERANCE:
        raise ParityError(f"{size}: first-step loss differs by {result['abs_diff']:.3g} > {LOSS_TOLERANCE}: "
                          f"rlhfkit {rk_loss.item():.6f} vs TRL {tr_loss.item():.6f}")
    if abs(rk_gn - tr_gn) > GRAD_NORM_RTOL * max(rk_gn, tr_gn):
        raise ParityError(f"{size}: first-step gradient norms differ: rlhfkit {rk_gn:.6f} vs TRL {tr_gn:.6f}")
    return result


# ---- one timed run (in a child process) ----------------------------------------------------------------
def run_child(spec: dict) -> dict:
    """Train ``warmup + steps`` steps with one library; time the last ``steps``."""
    import torch

    if spec.get("threads"):
        torch.set_num_threads(spec["threads"])
    warmup, steps = spec["warmup"], spec["steps"]
    total = warmup + steps
    ends: list[float] = []       # perf_counter at the end of each optimizer step
    inner: list[float] = []      # duration of the step proper (see the README)
    tokens: list[int] = []       # non-padding tokens of each step
    flops: list[float] = []      # model FLOPs of each step (rlhfkit)
    peak: dict[str, float] = {}
    cpu: dict[str, tuple[float, float]] = {}

    def step_done(now: float, step_tokens: int) -> None:
        ends.append(now)
        tokens.append(step_tokens)
        if len(ends) == warmup:
            cpu["start"] = common.cpu_snapshot()
        if len(ends) == total:
            cpu["end"] = common.cpu_snapshot()
            peak["rss"] = common.peak_rss_mib()

    if spec["lib"] == "rlhfkit":
        trainer = build_rlhfkit(spec["model_dir"], spec["train_path"], spec["output_dir"], total,
                                spec.get("torch_compile", False))
        optimizer_step = trainer._optimizer_step
        counter = common.StepFlops(trainer)

        def timed_step(batches):  # wraps the loop's step (fetch + collate, fwd, bwd, clip, AdamW, scheduler)
            start = time.perf_counter()
            loss = optimizer_step(batches)
            now = time.perf_counter()
            inner.append(now - start)
            flops.append(counter.take())
            step_done(now, trainer._tokens_in_step)
            return loss

        trainer._optimizer_step = timed_step
        rss_start = common.current_rss_mib()
        trainer.train()
        from rlhfkit.engine.metrics import read_metrics

        own = [r["s_per_step"] for r in read_metrics(spec["output_dir"])
               if "s_per_step" in r and r["step"] > warmup]
        extra = {"own_s_per_step_mean": sum(own) / len(own),
                 "model_flops_per_s": sum(flops[warmup:]) / (ends[-1] - ends[warmup - 1])}
    else:
        from transformers import TrainerCallback

        class StepTimer(TrainerCallback):
            trainer = None
            began = 0.0

            def on_step_begin(self, args, state, control, **kwargs):
                self.began = time.perf_counter()

            def on_step_end(self, args, state, control, **kwargs):
                now = time.perf_counter()
                inner.append(now - self.began)
                previous = sum(tokens)
                step_done(now, self.trainer._total_train_tokens - previous)

        timer = StepTimer()
        trainer = build_trl(spec["model_dir"], spec["train_path"], spec["output_dir"], total, [timer],
                            spec.get("trl_group_by_length", False))
        timer.trainer = trainer
        rss_start = common.current_rss_mib()
        trainer.train()
        optimizer = getattr(trainer.optimizer, "optimizer", trainer.optimizer)  # under accelerate's wrapper
        extra = {"optimizer": f"{type(optimizer).__name__} fused={optimizer.defaults.get('fused')} "
                              f"foreach={optimizer.defaults.get('foreach')}",
                 "weight_decays": sorted({g["weight_decay"] for g in optimizer.param_groups}),
                 "betas": sorted({tuple(g["betas"]) for g in optimizer.param_groups})}
    if len(ends) != total:
        raise RuntimeError(f"{spec['lib']}: expected {total} steps, saw {len(ends)}")
    elapsed = ends[-1] - ends[warmup - 1]
    timed_tokens = sum(tokens[warmup:])
    return {"lib": spec["lib"], "size": spec["size"], "steps": steps, "s_per_step": elapsed / steps,
            "tokens_per_s": timed_tokens / elapsed, "tokens_per_step": timed_tokens / steps,
            "inner_s_per_step": sum(inner[warmup:]) / steps, "warmup_s": sum(inner[:warmup]),
            "peak_rss_mib": peak["rss"],
            "other_cpu": common.foreign_load(cpu["start"], cpu["end"], elapsed),
            "cpu_s_per_step": (cpu["end"][1] - cpu["start"][1]) / steps, "threads": torch.get_num_threads(),
            "rss_at_train_start_mib": rss_start, "peak_rss_at_exit_mib": common.peak_rss_mib(), **extra}


# ---- report -------------------------------------------------------------------------------------------
def summarize(runs: list[dict]) -> dict:
    by_lib = {lib: [r for r in runs if r["lib"] == lib] for lib in LIBS}
    summary = {lib: {key: common.median([r[key] for r in rs])
                     for key in METRICS} for lib, rs in by_lib.items()}
    pairs = list(zip(by_lib["rlhfkit"], by_lib["trl"], strict=True))
    summary["ratio"] = {key: common.median([a[key] / b[key] for a, b in pairs])
                        for key in METRICS if key != "other_cpu"}
    summary["max_other_cpu"] = max(r["other_cpu"] for r in runs)
    return summary


def table(results: dict) -> str:
    lines = [f"{'size':<6} {'library':<8} {'s/step':>9} {'tokens/s':>10} {'peak RSS MiB':>13} "
             f"{'CPU s/step':>11} {'other CPU':>10}", "-" * 73]
    for size, entry in results.items():
        s = entry["summary"]
        for lib in LIBS:
            lines.append(f"{size:<6} {lib:<8} {s[lib]['s_per_step']:>9.4f} {s[lib]['tokens_per_s']:>10.0f} "
                         f"{s[lib]['peak_rss_mib']:>13.0f} {s[lib]['cpu_s_per_step']:>11.4f} "
                         f"{s[lib]['other_cpu']:>10.0%}")
        r = s["ratio"]
        lines.append(f"{size:<6} {'rk/TRL':<8} {r['s_per_step']:>8.2f}x {r['tokens_per_s']:>9.2f}x "
                     f"{r['peak_rss_mib']:>12.2f}x {r['cpu_s_per_step']:>10.2f}x")
        lines.append("")
    lines.append("medians over runs; rk/TRL = rlhfkit / TRL, median of the per-pair ratios "
                 "(s/step < 1x and tokens/s > 1x mean rlhfkit is faster)")
    lines.append("CPU s/step: CPU seconds of the run's process per timed step; other CPU: share of the "
                 "machine's CPUs used by other processes during the timed steps")
    busy = {size: entry["summary"]["max_other_cpu"] for size, entry in results.items()}
    if any(value > NOISY for value in busy.values()):
        lines.append("WARNING: other processes used up to "
                     + ", ".join(f"{v:.0%} ({k})" for k, v in busy.items())
                     + " of the CPUs during timed steps: the timings are not reliable; re-run on a quiet machine")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", nargs="+", default=list(DEFAULT_STEPS), choices=list(DEFAULT_STEPS))
    parser.add_argument("--pairs", type=int, default=3, help="rlhfkit/TRL run pairs per size")
    parser.add_argument("--steps-tiny", type=int, default=DEFAULT_STEPS["tiny"])
    parser.add_argument("--steps-small", type=int, default=DEFAULT_STEPS["small"])
    parser.add_argument("--warmup", type=int, default=3, help="untimed steps at the start of each run (>= 1)")
    parser.add_argument("--quiet-below", type=float, default=0.15,
                        help="before each run, wait until other processes use less than this share of the CPUs")
    parser.add_argument("--max-wait", type=float, default=15, help="longest wait (s) for a quiet machine per run")
    parser.add_argument("--retries", type=int, default=2,
                        help="re-run a run during which other processes used over 10%% of the CPUs, this many times")
    parser.add_argument("--threads", type=int, help="torch threads in every run (default: torch's, one per core)")
    parser.add_argument("--trl-group-by-length", action="store_true",
                        help="TRL with train_sampling_strategy='group_by_length' (rlhfkit groups by length by default)")
    parser.add_argument("--torch-compile", action="store_true",
                        help="rlhfkit with train.torch_compile (compiled in the warm-up steps; TRL stays eager)")
    parser.add_argument("--json", help="also write all raw results to this file")
    parser.add_argument("--workdir", help="keep data, models and run directories here (default: a temp dir)")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args()

    if args.child:
        print("RESULT " + json.dumps(run_child(json.loads(args.child))), flush=True)
        return
    if args.warmup < 1:
        parser.error("--warmup must be at least 1 (the timing starts at the end of a warm-up step)")
    for key, value in common.CHILD_ENV.items():
        os.environ.setdefault(key, value)
    quiet_libraries()
    steps = {"tiny": args.steps_tiny, "small": args.steps_small}
    workdir = Path(args.workdir) if args.workdir else Path(tempfile.mkdtemp(prefix="bench_sft-"))
    workdir.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    try:
        data = common.make_data(workdir)
        print(f"data: {data.n_examples} examples, rendered prompt {data.prompt_tokens_mean:.1f} tokens, "
              f"completion+EOS {data.completion_tokens_mean:.1f} tokens on average; vocab 512", flush=True)
        models = {}
        for size in args.sizes:
            models[size] = common.save_random_model(data.tokenizer_dir, size, workdir / f"model-{size}", seed=SEED)
            print(f"model {size}: {models[size][1] / 1e6:.2f}M parameters (random init, seed {SEED}, fp32)")

        print("\nparity check (first-step loss on the first batch, same weights, same token ids):")
        parity = {}
        for size in args.sizes:
            try:
                p = parity_check(size, models[size][0], data.train_path, workdir)
            except ParityError as error:
                print(f"\nPARITY CHECK FAILED: {error}", file=sys.stderr)
                raise SystemExit(2) from None
            parity[size] = p
            print(f"  {size:<5} rlhfkit {p['rlhfkit_loss']:.6f}  TRL {p['trl_loss']:.6f}  |diff| "
                  f"{p['abs_diff']:.2e} (<= {LOSS_TOLERANCE:g})  grad norm {p['rlhfkit_grad_norm']:.5f} vs "
                  f"{p['trl_grad_norm']:.5f}  targets {p['target_tokens']}  OK")
        p = next(iter(parity.values()))
        print(f"  token ids identical for all {p['n_examples']} examples; example 0: {len(p['example0_ids'])} "
              f"tokens, {sum(p['example0_mask'])} loss targets")

        results = {}
        for size in args.sizes:
            print(f"\n{size}: {args.pairs} pairs x ({args.warmup} warm-up + {steps[size]} timed steps), "
                  f"alternating rlhfkit / TRL, fresh process each", flush=True)
            runs = []
            for pair in range(args.pairs):
                for lib in LIBS:
                    out = workdir / f"run-{size}-{lib}-{pair}"
                    for attempt in range(args.retries + 1):
                        load = common.wait_until_quiet(args.quiet_below, args.max_wait)
                        if load >= args.quiet_below:
                            print(f"  (machine still {load:.0%} busy after {args.max_wait:.0f} s; running anyway)")
                        shutil.rmtree(out, ignore_errors=True)
                        run = common.spawn_child(__file__, {
                            "lib": lib, "size": size, "model_dir": models[size][0], "train_path": data.train_path,
                            "output_dir": str(out), "warmup": args.warmup, "steps": steps[size],
                            "threads": args.threads, "trl_group_by_length": args.trl_group_by_length,
                            "torch_compile": args.torch_compile})
                        shutil.rmtree(out, ignore_errors=True)
                        print(f"  pair {pair + 1} {lib:<8} {run['s_per_step']:.4f} s/step  "
                              f"{run['tokens_per_s']:8.0f} tokens/s  peak RSS {run['peak_rss_mib']:.0f} MiB  "
                              f"other processes {run['other_cpu']:.0%} CPU", flush=True)
                        if run["other_cpu"] <= NOISY:
                            break
                        if attempt < args.retries:
                            print("  (other processes were busy during that run: running it again)")
                    runs.append(run)
            results[size] = {"runs": runs, "summary": summarize(runs), "params": models[size][1]}

        print("\n" + table(results))
        print(f"\ntotal {time.perf_counter() - started:.0f} s")
        if args.json:
            meta = {"date": datetime.now(timezone.utc).isoformat(timespec="seconds"), "cpu": common.cpu_model(),
                    "cpus": os.cpu_count(), "versions": common.versions("torch", "transformers", "trl",
                                                                       "accelerate", "datasets", "rlhfkit"),
                    "batch_size": BATCH_SIZE, "trl_group_by_length": args.trl_group_by_length,
                    "torch_compile": args.torch_compile,
                    "warmup": args.warmup, "steps": steps, "pairs": args.pairs,
                    "data": data.__dict__}
            Path(args.json).write_text(json.dumps({"meta": meta, "parity": parity, "results": results}, indent=1))
    finally:
        if not args.workdir:
            shutil.rmtree(workdir, ignore_errors=True)


if __name__ == "__main__":
    main()
