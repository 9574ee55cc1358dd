#!/usr/bin/env python
"""PPO speed and memory: rlhfkit's ``PPOTrainer`` vs TRL's (``trl.experimental.ppo``) on identical work.

    pip install --no-deps --target .trl112 trl==1.12.0     # once (or: python -m benchmarks --make-trl-ppo-env)
    python benchmarks/bench_ppo.py --trl-path .trl112       # tiny and small, 3 pairs each

TRL's PPO trainer was last shipped in trl 1.12.0 (it was moved to ``trl.experimental`` and then
removed), so TRL's runs put a directory holding trl 1.12 (``--trl-path``) first on their path; torch,
transformers and the rest are this environment's, the very same files as rlhfkit's runs load (a
separate environment maps other copies of the shared libraries, which alone moved the peak RSS by
50 MiB in a test), so speed and memory compare the trainers and nothing else.

Both libraries get the same saved random-init Llama as the policy (its frozen copy is the reference),
the same saved reward model (the policy's weights with a seeded score head), a value model loaded from
the reward model, the same prompts (rendered with the chat template, left-padded) and the same PPO
iteration: ``ROLLOUT`` prompts, one sample each, up to ``RESPONSE_LENGTH`` new tokens at temperature 1
(stop at EOS), k1 KL penalty with coefficient 0.05 on per-token rewards, the reward-model score on the
last token, GAE (gamma 1, lambda 0.95), whitened advantages, ``EPOCHS`` passes in ``MINIBATCH``-sized
minibatches (one optimizer step each), clipped policy and value losses (0.2, 0.2, vf_coef 0.1), AdamW
lr 1e-5, constant schedule, fp32. TRL's GPU-minded defaults are switched off (bf16, gradient
checkpointing, sample generations during training, checkpoints). ``--mixed-precision bf16`` turns bf16
autocast on in both (rlhfkit ``train.mixed_precision: bf16``; TRL ``bf16=True``), each library applying
it where it does: rlhfkit to every forward of rollout and update, TRL to the update's forward (its
generation, reference, value and reward passes of the rollout stay fp32).

Runs alternate rlhfkit, TRL, rlhfkit, TRL, ... each in a fresh subprocess (so the peak RSS is that
run's). A run does ``--warmup`` untimed iterations, then the timed ones; the time of an iteration is the
wall time from the end of one update to the end of the next (rollout + scoring + update). Peak RSS is
the process's high-water mark after the last timed iteration. Reported: medians over runs, and the
rlhfkit/TRL ratios as medians of per-pair ratios (of wall time, and of the CPU time of the run's process,
which is what to compare with ``--threads 1`` on a shared machine); rlhfkit's rollout / update split comes from its
``time/rollout_s`` and ``time/train_s`` metrics. Both libraries' mean generated length per iteration
is printed: with random weights EOS is rare, so both generate the full length and do the same work.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import common  # noqa: E402

ROLLOUT = 16
MINIBATCH = 8
EPOCHS = 4
RESPONSE_LENGTH = 48
KL_COEF = 0.05
LR = 1e-5
SEED = 0
N_PROMPTS = 256
DEFAULT_STEPS = {"tiny": 10, "small": 4}
LIBS = ("rlhfkit", "trl")
NOISY = 0.10


# ---- models and data (built in this environment, read by both) -------------------------------------------
def make_inputs(workdir: Path, sizes: list[str]) -> tuple[str, dict[str, tuple[str, str, int]]]:
    """Prompts (``prompts.jsonl``), and per size a saved policy and a reward model built from it."""
    import torch

    from rlhfkit.config import ModelConfig
    from rlhfkit.models.reward import load_reward_model

    data = common.make_data(workdir, n_examples=N_PROMPTS)
    prompts_path = workdir / "prompts.jsonl"
    prompts_path.write_text("".join(json.dumps({"prompt": r["prompt"]}) + "\n"
                                    for r in common.read_rows(data.train_path)), encoding="utf-8")
    models = {}
    for size in sizes:
        policy_dir, n_params = common.save_random_model(data.tokenizer_dir, size, workdir / f"policy-{size}", seed=SEED)
        torch.manual_seed(SEED)
        reward, tokenizer = load_reward_model(ModelConfig(name_or_path=policy_dir))
        reward_dir = workdir / f"reward-{size}"
        reward.save_pretrained(reward_dir, safe_serialization=True)
        tokenizer.save_pretrained(reward_dir)
        models[size] = (policy_dir, str(reward_dir), n_params)
    return str(prompts_path), models


# ---- one run in a child process --------------------------------------------------------------------------
def rollout_flops_counter(trainer):
    """Model FLOPs of one rlhfkit PPO / GRPO iteration, from its rollout's sequence lengths (prompt + response):
    generation (one forward over the sequence, through the KV cache) and the reference pass, a forward of the
    value network and one of the reward model, then ``ppo_epochs`` training passes of policy and value network
    (a value head on the policy's trunk is a rounding error and not counted)."""
    from rlhfkit.models.flops import TRAINING_MULTIPLIER, FlopModel, lengths_of

    epochs = trainer.ppo.ppo_epochs
    policy, reward = FlopModel(trainer._unwrapped_policy()), FlopModel(trainer.reward_model)
    value_network = trainer._unwrapped_value()
    value = FlopModel(value_network) if value_network is not None and trainer.ppo.value_model == "reward" else None

    def count(rollout) -> float:
        lengths = [q + r for q, r in zip(lengths_of(rollout.query_mask), lengths_of(rollout.response_mask),
                                         strict=True)]
        flops = (2 + TRAINING_MULTIPLIER * epochs) * policy.forward(lengths) + reward.forward(lengths)
        if value is not None:
            flops += (1 + TRAINING_MULTIPLIER * epochs) * value.forward(lengths)
        return flops

    return count


def run_rlhfkit(spec: dict, iteration_done) -> dict:

    from rlhfkit.config import PPOConfig, load_config
    from rlhfkit.trainers.ppo import PPOTrainer

    total = spec["warmup"] + spec["steps"]
    config = load_config(PPOConfig, base={
        "model": {"name_or_path": spec["policy_dir"], "dtype": "float32"},
        "data": {"train": spec["prompts_path"], "max_length": 128, "max_prompt_length": 64},
        "train": {"output_dir": spec["output_dir"], "seed": SEED, "max_steps": total, "lr": LR,
                  "adam_betas": [0.9, 0.999], "weight_decay": 0.0, "scheduler": "constant", "warmup_steps": 0,
                  "max_grad_norm": None, "mixed_precision": spec["mixed_precision"], "log_every": 1,
                  "save_every": None, "resume": False, "progress": False},
        "ppo": {"reward_model": spec["reward_dir"], "value_model": spec["value_model"], "advantage": "gae",
                "rollout_batch_size": ROLLOUT, "minibatch_size": MINIBATCH, "ppo_epochs": EPOCHS,
                "max_new_tokens": RESPONSE_LENGTH, "temperature": 1.0, "kl_coef": KL_COEF, "kl_estimator": "k1",
                "gamma": 1.0, "lam": 0.95, "whiten_advantages": True, "clip_range": 0.2, "clip_range_value": 0.2,
                "vf_coef": 0.1, "samples_to_log": 0}})
    trainer = PPOTrainer(config)
    update = trainer.update
    count_flops = rollout_flops_counter(trainer)
    flops: list[float] = []

    def timed_update(rollout):
        stats = update(rollout)
        flops.append(count_flops(rollout))
        iteration_done(time.perf_counter(), rollout.responses.size(1), rollout_tokens(rollout))
        return stats

    trainer.update = timed_update
    trainer.train()
    return {**rollout_update_split(spec["output_dir"], spec["warmup"]),
            "model_flops_per_iteration": sum(flops[spec["warmup"]:]) / spec["steps"]}


def rollout_update_split(run_dir: str, warmup: int) -> dict:
    """rlhfkit's median rollout and update seconds of the timed iterations (its own metrics)."""
    from rlhfkit.engine.metrics import read_metrics

    timed = read_metrics(Path(run_dir))[warmup:]
    return {"rollout_s": common.median([m["time/rollout_s"] for m in timed]),
            "update_s": common.median([m["time/train_s"] for m in timed])}


def rollout_tokens(rollout) -> int:
    """Prompt + generated tokens of a rollout (rlhfkit's)."""
    return int(rollout.query_mask.sum() + rollout.response_mask.sum())


def run_trl(spec: dict, iteration_done) -> dict:
    from datasets import Dataset
    from transformers import (
        AutoModelForCausalLM,
        AutoModelForSequenceClassification,
        AutoTokenizer,
        PrinterCallback,
        TrainerCallback,
    )
    from trl.experimental.ppo import PPOConfig, PPOTrainer, ppo_trainer

    total = spec["warmup"] + spec["steps"]
    tokenizer = AutoTokenizer.from_pretrained(spec["policy_dir"], padding_side="left")
    prompts = [r["prompt"] for r in common.read_rows(spec["prompts_path"])]
    rendered = [tokenizer.apply_chat_template([{"role": "user", "content": p}], add_generation_prompt=True,
                                              tokenize=True, return_dict=False) for p in prompts]
    dataset = Dataset.from_dict({"input_ids": [ids[-64:] for ids in rendered]})
    args = PPOConfig(
        output_dir=spec["output_dir"], seed=SEED, data_seed=SEED,
        per_device_train_batch_size=ROLLOUT, gradient_accumulation_steps=1, num_mini_batches=ROLLOUT // MINIBATCH,
        num_ppo_epochs=EPOCHS, total_episodes=total * ROLLOUT, local_rollout_forward_batch_size=ROLLOUT,
        response_length=RESPONSE_LENGTH, temperature=1.0, stop_token="eos", kl_coef=KL_COEF, kl_estimator="k1",
        gamma=1.0, lam=0.95, cliprange=0.2, cliprange_value=0.2, vf_coef=0.1, whiten_rewards=False,
        learning_rate=LR, adam_beta1=0.9, adam_beta2=0.999, weight_decay=0.0, lr_scheduler_type="constant",
        warmup_steps=0,  # TRL's PPO loop never clips gradients (rlhfkit: max_grad_norm None)
        # TRL's defaults that are wrong for a CPU / unequal work, set to rlhfkit's:
        bf16=spec["mixed_precision"] == "bf16", fp16=False, use_cpu=True, gradient_checkpointing=False,
        num_sample_generations=0, dataloader_num_workers=0, dataloader_pin_memory=False, save_strategy="no",
        eval_strategy="no", logging_steps=1, report_to="none", disable_tqdm=True)
    policy = AutoModelForCausalLM.from_pretrained(spec["policy_dir"], dtype="float32")
    reference = AutoModelForCausalLM.from_pretrained(spec["policy_dir"], dtype="float32")
    reward = AutoModelForSequenceClassification.from_pretrained(spec["reward_dir"], dtype="float32")
    value = AutoModelForSequenceClassification.from_pretrained(spec["reward_dir"], dtype="float32")
    lengths: list[int] = []
    tokens: list[int] = []
    generate = ppo_trainer.batch_generation

    def measured_generation(model, queries, *rest, **kwargs):
        query_responses, logits = generate(model, queries, *rest, **kwargs)
        lengths.append(query_responses.size(1) - queries.size(1))
        tokens.append(int((query_responses != tokenizer.pad_token_id).sum()))  # prompt + response, not padding
        return query_responses, logits

    ppo_trainer.batch_generation = measured_generation

    class IterationTimer(TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):
            iteration_done(time.perf_counter(), lengths[-1], tokens[-1])

    trainer = PPOTrainer(args=args, processing_class=tokenizer, model=policy, ref_model=reference,
                         reward_model=reward, value_model=value, train_dataset=dataset, callbacks=[IterationTimer()])
    trainer.remove_callback(PrinterCallback)
    trainer.train()
    return {}


def run_child(spec: dict) -> dict:
    import torch

    if spec.get("threads"):
        torch.set_num_threads(spec["threads"])
    warmup, steps = spec["warmup"], spec["steps"]
    ends: list[float] = []
    lengths: list[int] = []
    tokens: list[int] = []
    peak: dict[str, float] = {}
    cpu: dict[str, tuple[float, float]] = {}

    def iteration_done(now: float, length: int, n_tokens: int) -> None:
        ends.append(now)
        lengths.append(length)
        tokens.append(n_tokens)
        if len(ends) == warmup:
            cpu["start"] = common.cpu_snapshot()
        if len(ends) == warmup + steps:
            cpu["end"] = common.cpu_snapshot()
            peak["rss"] = common.peak_rss_mib()

    split = (run_rlhfkit if spec["lib"] == "rlhfkit" else run_trl)(spec, iteration_done)
    if len(ends) != warmup + steps:
        raise RuntimeError(f"{spec['lib']}: expected {warmup + steps} iterations, saw {len(ends)}")
    elapsed = ends[-1] - ends[warmup - 1]
    if "model_flops_per_iteration" in split:
        split["model_flops_per_s"] = split["model_flops_per_iteration"] * steps / elapsed
    return {"lib": spec["lib"], "size": spec["size"], "s_per_iteration": elapsed / steps,
            "peak_rss_mib": peak["rss"], "generated_tokens": sum(lengths[warmup:]) / steps,
            "tokens_per_s": sum(tokens[warmup:]) / elapsed,
            "s_per_step": elapsed / steps / (EPOCHS * ROLLOUT // MINIBATCH),
            "cpu_s_per_iteration": (cpu["end"][1] - cpu["start"][1]) / steps, "threads": torch.get_num_threads(),
            "other_cpu": common.foreign_load(cpu["start"], cpu["end"], elapsed), **split}


def check_trl_path(path: str) -> str:
    """The version of the trl under ``path``; exits with instructions when it has no ``trl.experimental.ppo``."""
    probe = subprocess.run([sys.executable, "-c", "import trl, trl.experimental.ppo; print(trl.__version__)"],
                           capture_output=True, text=True, env={**os.environ, "PYTHONPATH": path})
    if probe.returncode != 0:
        raise SystemExit(f"{path!r} holds no trl with trl.experimental.ppo (TRL's PPO was last shipped in trl 1.12.0); "
                         "install it there:\n  pip install --no-deps --target .trl112 trl==1.12.0\n"
                         "then pass --trl-path .trl112")
    return probe.stdout.strip()


# ---- report ---------------------------------------------------------------------------------------------
def describe_iteration_run(run: dict) -> str:
    """The line printed after one PPO / GRPO run."""
    return (f"{run['s_per_iteration']:.3f} s/iteration  {run['cpu_s_per_iteration']:.3f} CPU s  peak RSS "
            f"{run['peak_rss_mib']:.0f} MiB  {run['generated_tokens']:.1f} tokens/seq  other processes "
            f"{run['other_cpu']:.0%} CPU")


def summarize(runs: list[dict]) -> dict:
    by_lib = {lib: [r for r in runs if r["lib"] == lib] for lib in LIBS}
    keys = ("s_per_iteration", "s_per_step", "tokens_per_s", "cpu_s_per_iteration", "peak_rss_mib",
            "generated_tokens")
    summary = {lib: {key: common.median([r[key] for r in rs]) for key in keys} for lib, rs in by_lib.items()}
    for key in ("rollout_s", "update_s"):
        summary["rlhfkit"][key] = common.median([r[key] for r in by_lib["rlhfkit"]])
    pairs = list(zip(by_lib["rlhfkit"], by_lib["trl"], strict=True))
    summary["speedup"] = common.median([b["s_per_iteration"] / a["s_per_iteration"] for a, b in pairs])
    summary["cpu_speedup"] = common.median([b["cpu_s_per_iteration"] / a["cpu_s_per_iteration"] for a, b in pairs])
    summary["rss_ratio"] = common.median([a["peak_rss_mib"] / b["peak_rss_mib"] for a, b in pairs])
    summary["max_other_cpu"] = max(r["other_cpu"] for r in runs)
    return summary


def table(results: dict) -> str:
    lines = [f"{'size':<6} {'library':<8} {'s/iteration':>12} {'CPU s/iter':>11} {'peak RSS MiB':>13} "
             f"{'tokens/seq':>11} {'rollout s':>10} {'update s':>9}", "-" * 87]
    for size, entry in results.items():
        s = entry["summary"]
        for lib in LIBS:
            split = (f"{s[lib]['rollout_s']:>10.3f} {s[lib]['update_s']:>9.3f}" if lib == "rlhfkit" else "")
            lines.append(f"{size:<6} {lib:<8} {s[lib]['s_per_iteration']:>12.3f} "
                         f"{s[lib]['cpu_s_per_iteration']:>11.3f} "
                         f"{s[lib]['peak_rss_mib']:>13.0f} {s[lib]['generated_tokens']:>11.1f} {split}")
        lines.append(f"{size:<6} {'rk/TRL':<8} {s['speedup']:>11.2f}x {s['cpu_speedup']:>10.2f}x "
                     f"{s['rss_ratio']:>12.2f}x   (speed: > 1x rlhfkit faster; RSS: < 1x rlhfkit smaller)")
        lines.append("")
    busy = max(e["summary"]["max_other_cpu"] for e in results.values())
    if busy > NOISY:
        lines.append(f"WARNING: other processes used up to {busy:.0%} of the CPUs during timed iterations: "
                     "the timings are not reliable; re-run on a quiet machine")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--trl-path", default=".trl112",
                        help="a directory holding trl 1.12 (TRL's last release with PPO), put first on the path of "
                             "TRL's runs (default: .trl112)")
    parser.add_argument("--sizes", nargs="+", default=list(DEFAULT_STEPS), choices=list(DEFAULT_STEPS))
    parser.add_argument("--pairs", type=int, default=3, help="rlhfkit/TRL run pairs per size")
    parser.add_argument("--steps-tiny", type=int, default=DEFAULT_STEPS["tiny"])
    parser.add_argument("--steps-small", type=int, default=DEFAULT_STEPS["small"])
    parser.add_argument("--warmup", type=int, default=2, help="untimed iterations at the start of each run (>= 1)")
    parser.add_argument("--quiet-below", type=float, default=0.15,
                        help="before each run, wait until other processes use less than this share of the CPUs")
    parser.add_argument("--max-wait", type=float, default=60, help="longest wait (s) for a quiet machine per run")
    parser.add_argument("--rlhfkit-value-model", choices=("reward", "head"), default="reward",
                        help="rlhfkit's value model: 'reward' (a network initialised from the reward model, the "
                             "same work as TRL) or 'head' (a value head on the policy's trunk: one backbone "
                             "pass instead of two; TRL's PPOTrainer has no such option)")
    parser.add_argument("--mixed-precision", choices=("no", "bf16"), default="no",
                        help="'bf16': mixed precision in both libraries (rlhfkit train.mixed_precision=bf16, TRL "
                             "bf16=True); default 'no' (fp32)")
    parser.add_argument("--threads", type=int, help="torch threads in every run (default: torch's, one per core); "
                        "--threads 1 is steadier on a shared machine (compare CPU s/iteration then)")
    parser.add_argument("--json", help="also write all raw results to this file")
    parser.add_argument("--workdir", help="keep data, models and run directories here (default: a temp dir)")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args()

    if args.child:
        import warnings

        warnings.filterwarnings("ignore")
        print("RESULT " + json.dumps(run_child(json.loads(args.child))), flush=True)
        return
    if args.warmup < 1:
        parser.error("--warmup must be at least 1 (the timing starts at the end of a warm-up iteration)")
    trl_version = check_trl_path(args.trl_path)
    steps = {"tiny": args.steps_tiny, "small": args.steps_small}
    workdir = Path(args.workdir) if args.workdir else Path(tempfile.mkdtemp(prefix="bench_ppo-"))
    workdir.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    try:
        prompts_path, models = make_inputs(workdir, args.sizes)
        print(f"TRL {trl_version} from {args.trl_path}; {N_PROMPTS} prompts; rollout {ROLLOUT} x up to "
              f"{RESPONSE_LENGTH} tokens, {EPOCHS} epochs of minibatches of {MINIBATCH}; rlhfkit's value model: "
              f"{args.rlhfkit_value_model} (TRL's: a network initialised from the reward model)", flush=True)
        results: dict = {}
        for size in args.sizes:
            policy_dir, reward_dir, n_params = models[size]
            print(f"\n{size} ({n_params / 1e6:.2f}M parameters): {args.pairs} pairs x ({args.warmup} warm-up + "
                  f"{steps[size]} timed iterations), alternating libraries, fresh process each", flush=True)

            def spec_of(lib: str, pair: int, size=size, policy_dir=policy_dir, reward_dir=reward_dir) -> dict:
                out = workdir / f"run-{size}-{lib}-{pair}"
                shutil.rmtree(out, ignore_errors=True)
                return {"lib": lib, "size": size, "policy_dir": policy_dir, "reward_dir": reward_dir,
                        "prompts_path": prompts_path, "output_dir": str(out), "warmup": args.warmup,
                        "steps": steps[size], "value_model": args.rlhfkit_value_model,
                        "mixed_precision": args.mixed_precision, "threads": args.threads}

            runs = common.alternate_runs(
                __file__, args.pairs, spec_of, quiet_below=args.quiet_below, max_wait=args.max_wait,
                pythonpath_of=lambda lib: args.trl_path if lib == "trl" else None,
                describe=describe_iteration_run)
            results[size] = {"runs": runs, "summary": summarize(runs), "params": n_params}
        print("\n" + table(results))
        print(f"\ntotal {time.perf_counter() - started:.0f} s")
        if args.json:
            meta = {"date": datetime.now(timezone.utc).isoformat(timespec="seconds"), "cpu": common.cpu_model(),
                    "cpus": os.cpu_count(), "trl": trl_version,
                    "versions": common.versions("torch", "transformers", "accelerate", "rlhfkit"),
                    "rlhfkit_value_model": args.rlhfkit_value_model, "mixed_precision": args.mixed_precision,
                    "threads": args.threads, "rollout": ROLLOUT, "minibatch": MINIBATCH,
                    "epochs": EPOCHS, "response_length": RESPONSE_LENGTH,
                    "warmup": args.warmup, "steps": steps, "pairs": args.pairs}
            Path(args.json).write_text(json.dumps({"meta": meta, "results": results}, indent=2), encoding="utf-8")
    finally:
        if not args.workdir:
            shutil.rmtree(workdir, ignore_errors=True)


if __name__ == "__main__":
    main()
