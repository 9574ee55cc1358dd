#!/usr/bin/env python
"""GRPO speed and memory: rlhfkit (``ppo.advantage: grpo``) vs TRL's ``GRPOTrainer`` on identical work.

    python benchmarks/bench_grpo.py                 # parity check, then tiny and small, 3 pairs each
    python benchmarks/bench_grpo.py --sizes small --pairs 5 --json grpo.json

One iteration, in both: ``PROMPTS`` prompts x ``GROUP`` samples (up to ``RESPONSE_LENGTH`` new tokens at
temperature 1, stop at EOS), scored by the same reward model (a saved random-init Llama with a seeded
score head), group-normalised advantages ``(r - mean) / (std + 1e-4)``, a reference pass for the KL
term (coefficient ``BETA``), then ``EPOCHS`` passes over the ``PROMPTS x GROUP`` sequences in minibatches
of ``MINIBATCH`` (one optimizer step each: TRL ``steps_per_generation`` = sequences / minibatch,
``num_iterations`` = epochs), the clipped surrogate loss (0.2) as a token mean over the minibatch (TRL
``loss_type="bnpo"``), AdamW lr 1e-5, constant schedule, no gradient clipping, fp32. The KL term enters
where each library puts it (rlhfkit: the k3 estimate subtracted from the sequence reward before the group
baseline; TRL: ``beta`` x k3 added to the loss): the same reference pass, a different place in the maths,
no difference in work. TRL's GPU-minded defaults are switched off (bf16, gradient checkpointing).

First a parity check of the update's loss: on one fixed minibatch (prompts of equal length, fixed responses
with padding after EOS, fixed advantages, "old" log-probs a seeded perturbation of the policy's own, so that
ratios move off 1 and some clip) the response log-probs of both libraries, rlhfkit's update loss
(``PPOTrainer._micro_loss``) and TRL's ``compute_loss`` agree to 1e-4 and their gradient norms to 1e-3
(relative), with ``beta=0``.

Then runs alternate rlhfkit / TRL (the order swapped every other pair), each in a fresh subprocess. A run
does ``--warmup`` untimed iterations, then the timed ones; an iteration is timed from the end of one
update to the end of the next (generation + scoring + update). Reported: seconds per iteration and per
optimizer step, tokens/s (prompt + generated tokens of the rollout, per second of iteration), peak RSS,
CPU time, and the generated length (with random weights EOS is rare: both generate the full length).
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

import bench_ppo  # noqa: E402
import common  # noqa: E402

PROMPTS = 4
GROUP = 4
MINIBATCH = 8
EPOCHS = 2
RESPONSE_LENGTH = 48
BETA = 0.04
LR = 1e-5
SEED = 0
TOLERANCE = 1e-4
GRAD_NORM_RTOL = 1e-3
DEFAULT_STEPS = {"tiny": 10, "small": 4}
LIBS = ("rlhfkit", "trl")
SEQUENCES = PROMPTS * GROUP
STEPS_PER_ITERATION = SEQUENCES // MINIBATCH * EPOCHS


# ---- the two trainers, configured for the same work ---------------------------------------------------
def build_rlhfkit(policy_dir: str, reward_dir: str, prompts_path: str, output_dir: str, iterations: int,
                  mixed_precision: str = "no"):

    from rlhfkit.config import PPOConfig, load_config
    from rlhfkit.trainers.ppo import PPOTrainer

    config = load_config(PPOConfig, base={
        "model": {"name_or_path": policy_dir, "dtype": "float32"},
        "data": {"train": prompts_path, "max_length": 128, "max_prompt_length": 64},
        "train": {"output_dir": output_dir, "seed": SEED, "max_steps": iterations, "lr": LR,
                  "adam_betas": [0.9, 0.999], "weight_decay": 0.0, "scheduler": "constant", "warmup_steps": 0,
                  "max_grad_norm": None, "mixed_precision": mixed_precision, "log_every": 1, "save_every": None,
                  "resume": False, "progress": False},
        "ppo": {"reward_model": reward_dir, "advantage": "grpo", "rollout_batch_size": PROMPTS,
                "samples_per_prompt": GROUP, "minibatch_size": MINIBATCH, "ppo_epochs": EPOCHS,
                "max_new_tokens": RESPONSE_LENGTH, "temperature": 1.0, "kl_coef": BETA, "kl_estimator": "k3",
                "clip_range": 0.2, "samples_to_log": 0}})
    return PPOTrainer(config)


def build_trl(policy_dir: str, reward_dir: str, prompts_path: str, output_dir: str, iterations: int,
              mixed_precision: str = "no", beta: float = BETA, callbacks=()):
    from datasets import Dataset
    from transformers import AutoModelForSequenceClassification, AutoTokenizer, PrinterCallback
    from trl import GRPOConfig, GRPOTrainer

    tokenizer = AutoTokenizer.from_pretrained(policy_dir, padding_side="left")
    prompts = [tokenizer.apply_chat_template([{"role": "user", "content": r["prompt"]}], add_generation_prompt=True,
                                             tokenize=False) for r in common.read_rows(prompts_path)]
    args = GRPOConfig(
        output_dir=output_dir, seed=SEED, data_seed=SEED, max_steps=iterations * STEPS_PER_ITERATION,
        per_device_train_batch_size=MINIBATCH, gradient_accumulation_steps=1,
        steps_per_generation=SEQUENCES // MINIBATCH, num_iterations=EPOCHS, num_generations=GROUP,
        max_completion_length=RESPONSE_LENGTH, temperature=1.0, top_p=1.0, top_k=0, beta=beta, epsilon=0.2,
        loss_type="bnpo", scale_rewards="group", learning_rate=LR, adam_beta1=0.9, adam_beta2=0.999,
        weight_decay=0.0, lr_scheduler_type="constant", warmup_steps=0, max_grad_norm=0.0,  # 0: no clipping
        # TRL's defaults that are wrong for a CPU / unequal work, set to rlhfkit's:
        bf16=mixed_precision == "bf16", fp16=False, use_cpu=True, gradient_checkpointing=False,
        dataloader_num_workers=0, dataloader_pin_memory=False, model_init_kwargs={"dtype": "float32"},
        save_strategy="no", eval_strategy="no", logging_steps=1, report_to="none", disable_tqdm=True,
        log_completions=False)
    reward = AutoModelForSequenceClassification.from_pretrained(reward_dir, dtype="float32")
    reward_tokenizer = AutoTokenizer.from_pretrained(reward_dir)
    trainer = GRPOTrainer(model=policy_dir, reward_funcs=reward, args=args,
                          train_dataset=Dataset.from_dict({"prompt": prompts}), processing_class=tokenizer,
                          reward_processing_classes=reward_tokenizer, callbacks=list(callbacks))
    trainer.remove_callback(PrinterCallback)
    return trainer


# ---- parity: the update's loss on one fixed minibatch ---------------------------------------------------
class ParityError(AssertionError):
    pass


def fixed_minibatch(tokenizer, prompts_path: str, response_length: int = 16) -> dict:
    """``MINIBATCH`` prompts of the most common token length (no left padding: TRL's loss forward passes no
    position ids), random responses ending in EOS at seeded lengths, seeded advantages."""
    import torch

    from rlhfkit.data.collators import encode_prompt

    encoded = [encode_prompt(tokenizer, r["prompt"]) for r in common.read_rows(prompts_path)]
    lengths = [len(ids) for ids in encoded]
    common_length = max(set(lengths), key=lengths.count)
    chosen = [ids for ids in encoded if len(ids) == common_length][:MINIBATCH]
    if len(chosen) < MINIBATCH:
        raise ParityError(f"only {len(chosen)} prompts of {common_length} tokens; need {MINIBATCH}")
    generator = torch.Generator().manual_seed(SEED)
    queries = torch.tensor(chosen)
    special = {tokenizer.eos_token_id, tokenizer.pad_token_id, *tokenizer.all_special_ids}
    vocab = torch.tensor([t for t in range(len(tokenizer)) if t not in special])
    responses = vocab[torch.randint(len(vocab), (MINIBATCH, response_length), generator=generator)]
    response_mask = torch.zeros(MINIBATCH, response_length, dtype=torch.long)
    for row in range(MINIBATCH):
        n = int(torch.randint(response_length // 2, response_length + 1, (1,), generator=generator))
        response_mask[row, :n] = 1
        if n < response_length:
            responses[row, n - 1] = tokenizer.eos_token_id
            responses[row, n:] = tokenizer.pad_token_id
    return {"queries": queries, "query_mask": torch.ones_like(queries), "responses": responses,
            "response_mask": response_mask, "advantages": torch.randn(MINIBATCH, generator=generator)}


def parity_check(size: str, policy_dir: str, reward_dir: str, prompts_path: str, workdir: Path) -> dict:
    import torch

    from rlhfkit.models.policy_value import policy_forward

    rk = build_rlhfkit(policy_dir, reward_dir, prompts_path, str(workdir / f"parity-{size}-rlhfkit"), 1)
    tr = build_trl(policy_dir, reward_dir, prompts_path, str(workdir / f"parity-{size}-trl"), 1, beta=0.0)
    rk_policy = rk._unwrapped_policy()
    rk_state, tr_state = rk_policy.state_dict(), tr.model.state_dict()
    if rk_state.keys() != tr_state.keys() or not all(torch.equal(rk_state[k], tr_state[k]) for k in rk_state):
        raise ParityError(f"{size}: the two libraries did not load the same policy weights")
    fixed = fixed_minibatch(rk.tokenizer, prompts_path)
    mask = fixed["response_mask"]
    with torch.no_grad():
        current = policy_forward(rk_policy, fixed, 1.0)[0]
    noise = torch.randn(current.shape, generator=torch.Generator().manual_seed(SEED + 1))
    old = (current + 0.3 * noise) * mask  # ratios between about 0.5 and 2: some tokens clip
    batch = {**fixed, "logprobs": old, "advantages": fixed["advantages"][:, None] * mask}
    rk_policy.train()
    rk_loss, _, rk_stats = rk._micro_loss(batch, None)
    rk_loss.backward()

    tr.model.train()
    tr.current_gradient_accumulation_steps = 1
    inputs = {"prompt_ids": fixed["queries"], "prompt_mask": fixed["query_mask"],
              "completion_ids": fixed["responses"], "completion_mask": mask, "advantages": fixed["advantages"],
              "old_per_token_logps": old, "num_items_in_batch": mask.sum()}
    tr_loss = tr.compute_loss(tr.model, inputs)
    tr_loss.backward()
    with torch.no_grad():  # the loss above depends on the log-probs only through the ratio's gradient: also
        trl_logps = tr._get_per_token_logps_and_entropies(  # compare the log-probs themselves
            tr.model, torch.cat([fixed["queries"], fixed["responses"]], 1),
            torch.cat([fixed["query_mask"], mask], 1), fixed["responses"].size(1))[0]
    logp_diff = float(((trl_logps - current) * mask).abs().max())

    def grad_norm(model) -> float:
        return float(torch.linalg.vector_norm(torch.stack([p.grad.norm() for p in model.parameters()
                                                           if p.grad is not None])))

    rk_gn, tr_gn = grad_norm(rk_policy), grad_norm(tr.model)
    result = {"size": size, "rlhfkit_loss": rk_loss.item(), "trl_loss": tr_loss.item(),
              "abs_diff": abs(rk_loss.item() - tr_loss.item()), "clipfrac": rk_stats["policy/clipfrac_avg"],
              "rlhfkit_grad_norm": rk_gn, "trl_grad_norm": tr_gn, "tokens": int(mask.sum()),
              "max_logprob_diff": logp_diff}
    if not logp_diff <= TOLERANCE:
        raise ParityError(f"{size}: response log-probs differ by up to {logp_diff:.3g} > {TOLERANCE}")
    if not result["abs_diff"] <= TOLERANCE:
        raise ParityError(f"{size}: losses differ by {result['abs_diff']:.3g} > {TOLERANCE}: {result}")
    if abs(rk_gn - tr_gn) > GRAD_NORM_RTOL * max(rk_gn, tr_gn):
        raise ParityError(f"{size}: gradient norms differ: rlhfkit {rk_gn:.6f} vs TRL {tr_gn:.6f}")
    if not 0 < result["clipfrac"] < 1:
        raise ParityError(f"{size}: the parity batch must clip some tokens, not {result['clipfrac']:.2f}")
    return result


# ---- one run in a child process ---------------------------------------------------------------------------
def run_child(spec: dict) -> dict:
    import torch

    if spec.get("threads"):
        torch.set_num_threads(spec["threads"])
    warmup, steps = spec["warmup"], spec["steps"]
    total = warmup + steps
    ends: list[float] = []
    tokens: list[tuple[float, float]] = []  # (prompt tokens, generated tokens) of each iteration's rollout
    flops: list[float] = []  # model FLOPs of each iteration (rlhfkit)
    peak: dict[str, float] = {}
    cpu: dict[str, tuple[float, float]] = {}

    def iteration_done(now: float) -> None:
        ends.append(now)
        if len(ends) == warmup:
            cpu["start"] = common.cpu_snapshot()
        if len(ends) == total:
            cpu["end"] = common.cpu_snapshot()
            peak["rss"] = common.peak_rss_mib()

    args = (spec["policy_dir"], spec["reward_dir"], spec["prompts_path"], spec["output_dir"], total,
            spec["mixed_precision"])
    if spec["lib"] == "rlhfkit":
        trainer = build_rlhfkit(*args)
        update = trainer.update
        count_flops = bench_ppo.rollout_flops_counter(trainer)

        def timed_update(rollout):
            stats = update(rollout)
            tokens.append((float(rollout.query_mask.sum()), float(rollout.response_mask.sum())))
            flops.append(count_flops(rollout))
            iteration_done(time.perf_counter())
            return stats

        trainer.update = timed_update
        trainer.train()
        split = bench_ppo.rollout_update_split(spec["output_dir"], warmup)
    else:
        from transformers import TrainerCallback

        class IterationTimer(TrainerCallback):
            def on_step_end(self, args, state, control, **kwargs):
                if state.global_step % STEPS_PER_ITERATION == 0:
                    iteration_done(time.perf_counter())

        trainer = build_trl(*args, callbacks=[IterationTimer()])
        generate = trainer._generate_and_score_completions

        def counted_generation(inputs):
            out = generate(inputs)
            tokens.append((float(out["prompt_mask"].sum()), float(out["completion_mask"].sum())))
            return out

        trainer._generate_and_score_completions = counted_generation
        trainer.train()
        split = {}
    if len(ends) != total or len(tokens) != total:
        raise RuntimeError(f"{spec['lib']}: expected {total} iterations, saw {len(ends)} ({len(tokens)} rollouts)")
    elapsed = ends[-1] - ends[warmup - 1]
    prompt_tokens = sum(p for p, _ in tokens[warmup:]) / steps
    generated = sum(g for _, g in tokens[warmup:]) / steps
    extra = {"model_flops_per_s": sum(flops[warmup:]) / elapsed} if flops else {}
    return {**split, **extra, "lib": spec["lib"], "size": spec["size"], "s_per_iteration": elapsed / steps,
            "s_per_step": elapsed / steps / STEPS_PER_ITERATION,
            "tokens_per_s": (prompt_tokens + generated) * steps / elapsed, "prompt_tokens": prompt_tokens,
            "generated_tokens": generated / SEQUENCES, "peak_rss_mib": peak["rss"],
            "cpu_s_per_iteration": (cpu["end"][1] - cpu["start"][1]) / steps, "threads": torch.get_num_threads(),
            "other_cpu": common.foreign_load(cpu["start"], cpu["end"], elapsed)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", nargs="+", default=list(DEFAULT_STEPS), choices=list(DEFAULT_STEPS))
    parser.add_argument("--pairs", type=int, default=3, help="rlhfkit/TRL run pairs per size")
    parser.add_argument("--steps-tiny", type=int, default=DEFAULT_STEPS["tiny"])
    parser.add_argument("--steps-small", type=int, default=DEFAULT_STEPS["small"])
    parser.add_argument("--warmup", type=int, default=2, help="untimed iterations at the start of each run (>= 1)")
    parser.add_argument("--quiet-below", type=float, default=0.15,
                        help="before each run, wait until other processes use less than this share of the CPUs")
    parser.add_argument("--max-wait", type=float, default=60, help="longest wait (s) for a quiet machine per run")
    parser.add_argument("--mixed-precision", choices=("no", "bf16"), default="no",
                        help="'bf16': autocast in both libraries (rlhfkit train.mixed_precision=bf16: every forward of "
                             "rollout and update; TRL bf16=True); default 'no' (fp32)")
    parser.add_argument("--threads", type=int, help="torch threads in every run (default: torch's, one per core)")
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
    for key, value in common.CHILD_ENV.items():
        os.environ.setdefault(key, value)
    steps = {"tiny": args.steps_tiny, "small": args.steps_small}
    workdir = Path(args.workdir) if args.workdir else Path(tempfile.mkdtemp(prefix="bench_grpo-"))
    workdir.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    try:
        prompts_path, models = bench_ppo.make_inputs(workdir, args.sizes)
        print(f"{PROMPTS} prompts x {GROUP} samples of up to {RESPONSE_LENGTH} tokens per iteration, {EPOCHS} epochs "
              f"of minibatches of {MINIBATCH} ({STEPS_PER_ITERATION} optimizer steps), KL coefficient {BETA}",
              flush=True)
        print("\nparity check (the update's loss on one fixed minibatch, same weights, beta 0):")
        parity = {}
        for size in args.sizes:
            policy_dir, reward_dir, _ = models[size]
            try:
                p = parity_check(size, policy_dir, reward_dir, prompts_path, workdir)
            except ParityError as error:
                print(f"\nPARITY CHECK FAILED: {error}", file=sys.stderr)
                raise SystemExit(2) from None
            parity[size] = p
            print(f"  {size:<5} rlhfkit {p['rlhfkit_loss']:.6f}  TRL {p['trl_loss']:.6f}  |diff| {p['abs_diff']:.1e}"
                  f"  log-probs |diff| <= {p['max_logprob_diff']:.1e}"
                  f"  grad norm {p['rlhfkit_grad_norm']:.5f} vs {p['trl_grad_norm']:.5f}  clipped "
                  f"{p['clipfrac']:.0%} of {p['tokens']} tokens  OK")

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
                        "steps": steps[size], "threads": args.threads, "mixed_precision": args.mixed_precision}

            runs = common.alternate_runs(
                __file__, args.pairs, spec_of, quiet_below=args.quiet_below, max_wait=args.max_wait,
                describe=bench_ppo.describe_iteration_run)
            results[size] = {"runs": runs, "summary": bench_ppo.summarize(runs), "params": n_params}
        print("\n" + bench_ppo.table(results))
        print(f"\ntotal {time.perf_counter() - started:.0f} s")
        if args.json:
            meta = {"date": datetime.now(timezone.utc).isoformat(timespec="seconds"), "cpu": common.cpu_model(),
                    "cpus": os.cpu_count(), "versions": common.versions("torch", "transformers", "trl", "accelerate",
                                                                       "rlhfkit"),
                    "threads": args.threads, "mixed_precision": args.mixed_precision, "prompts": PROMPTS,
                    "group": GROUP, "minibatch": MINIBATCH,
                    "epochs": EPOCHS, "response_length": RESPONSE_LENGTH, "beta": BETA,
                    "steps_per_iteration": STEPS_PER_ITERATION, "warmup": args.warmup, "steps": steps,
                    "pairs": args.pairs}
            Path(args.json).write_text(json.dumps({"meta": meta, "parity": parity, "results": results}, indent=1),
                                       encoding="utf-8")
    finally:
        if not args.workdir:
            shutil.rmtree(workdir, ignore_errors=True)


if __name__ == "__main__":
    main()
