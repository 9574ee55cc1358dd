"""Peak memory of every rlhfkit stage: full fine-tuning, LoRA (float32 or bfloat16 weights), QLoRA (4-bit
weights), and gradient checkpointing.

Each (stage, setting) trains a few steps in a fresh process on the same saved random model and reports
its peak RSS (``common.peak_rss_mib``). With LoRA the reference of DPO and PPO is the policy with its
adapters disabled, so no frozen copy is kept; the full settings keep one. Nothing is downloaded.

    python benchmarks/bench_memory.py                        # small (14.4M) model, every stage, 3 settings
    python benchmarks/bench_memory.py --size tiny --stages dpo ppo --json memory.json
    python benchmarks/bench_memory.py --size base --stages dpo ppo --settings full lora   # 113M: weights dominate
    python benchmarks/bench_memory.py --size base --stages sft dpo --settings lora lora-bf16 qlora   # QLoRA

``--mmap-threshold BYTES`` runs the children with glibc's ``MALLOC_MMAP_THRESHOLD_`` fixed: every allocation
above it is a mapping of its own, returned to the system when freed. By default glibc raises the threshold
to the largest block freed so far (up to 32 MiB), after which activations come from its heap, whose freed
holes stay resident and are not always reused: the peak RSS then counts retired activations, and what LoRA
saves (gradients, AdamW state, the frozen reference) can vanish in it. The fixed threshold shows the live
memory, at a cost in speed (page faults on every new block).

Each run is also split into phases (:class:`PhasePeaks`): loading the models, the optimizer steps (PPO:
rollouts and updates), evaluations and saves, each with its own peak RSS, so that the table says which
phase sets the peak and what the phases cost beyond the loaded models.
"""

from __future__ import annotations

import argparse
import functools
import json
import sys
import tempfile
from pathlib import Path

import common

STAGES = ("sft", "rm", "dpo", "ppo")
#: full fine-tuning, LoRA (float32 weights; lora-bf16: bfloat16 weights), QLoRA (LoRA on 4-bit NF4 weights,
#: computed in float32; needs bitsandbytes) and full fine-tuning with gradient checkpointing
SETTINGS = ("full", "lora", "lora-bf16", "qlora", "checkpointing")
DEFAULT_SETTINGS = ("full", "lora", "checkpointing")
LORA = {"r": 8, "alpha": 16.0, "dropout": 0.0, "target_modules": "all-linear"}
BATCH_SIZE = 8
STEPS = {"sft": 6, "rm": 6, "dpo": 6, "ppo": 2}
#: model sizes: a preset and the sizes overriding it; ``base`` (113.7M parameters) is large enough for what
#: LoRA saves (gradients, AdamW state, the frozen reference: about 1.7 GiB for DPO) to show in the peak
SIZES = {"tiny": ("tiny", {}), "small": ("small", {}),
         "base": ("small", {"hidden_size": 768, "num_hidden_layers": 12, "num_attention_heads": 12})}


def make_inputs(workdir: Path, size: str) -> dict:
    """Demonstrations, rankings, prompts, a saved random policy and a reward model built from it."""
    import torch

    from rlhfkit.config import ModelConfig
    from rlhfkit.models.reward import load_reward_model

    data = common.make_data(workdir, n_examples=256)
    rows = common.read_rows(data.train_path)
    paths = {"demos": data.train_path, "rankings": str(workdir / "rankings.jsonl"),
             "prompts": str(workdir / "prompts.jsonl")}
    rankings = [{"prompt": rows[i]["prompt"], "completions": [rows[i + j]["completion"] for j in range(4)],
                 "ranking": [0, 1, 2, 3]} for i in range(0, len(rows) - 3, 4)]
    Path(paths["rankings"]).write_text("".join(json.dumps(r) + "\n" for r in rankings), encoding="utf-8")
    Path(paths["prompts"]).write_text("".join(json.dumps({"prompt": r["prompt"]}) + "\n" for r in rows),
                                      encoding="utf-8")
    preset, architecture = SIZES[size]
    policy_dir, n_params = common.save_random_model(data.tokenizer_dir, preset, workdir / "policy", **architecture)
    torch.manual_seed(0)
    reward, tokenizer = load_reward_model(ModelConfig(name_or_path=policy_dir))
    reward.save_pretrained(workdir / "reward", safe_serialization=True)
    tokenizer.save_pretrained(workdir / "reward")
    return {**paths, "policy": policy_dir, "reward": str(workdir / "reward"), "n_params": n_params}


def stage_config(stage: str, setting: str, inputs: dict, output_dir: str):
    """The stage's config for ``setting``: the same data, batch and steps; only LoRA / checkpointing differ."""
    from rlhfkit.config import DPOConfig, PPOConfig, RewardConfig, SFTConfig, load_config

    model = {"name_or_path": inputs["policy"], "dtype": "bfloat16" if setting == "lora-bf16" else "float32"}
    if setting in ("lora", "lora-bf16", "qlora"):
        model["lora"] = dict(LORA)
    if setting == "qlora":
        model["quantization"] = "4bit"
    train = {"output_dir": output_dir, "batch_size": BATCH_SIZE, "max_steps": STEPS[stage], "lr": 1e-4,
             "warmup_steps": 0, "log_every": 1, "eval_every": None, "save_every": None, "resume": False,
             "progress": False, "mixed_precision": "no", "gradient_checkpointing": setting == "checkpointing"}
    data = {"max_length": 128, "max_prompt_length": 64}
    if stage == "sft":
        return load_config(SFTConfig, base={"model": model, "data": {**data, "train": inputs["demos"]}, "train": train})
    if stage == "rm":
        return load_config(RewardConfig, base={"model": model, "data": {**data, "train": inputs["rankings"]},
                                               "train": train})
    if stage == "dpo":
        return load_config(DPOConfig, base={"model": model, "data": {**data, "train": inputs["rankings"]},
                                            "train": train})
    return load_config(PPOConfig, base={
        "model": model, "data": {**data, "train": inputs["prompts"]}, "train": train,
        "ppo": {"reward_model": inputs["reward"], "rollout_batch_size": 16, "minibatch_size": 8, "ppo_epochs": 2,
                "max_new_tokens": 48, "samples_to_log": 0}})


class PhasePeaks:
    """The peak RSS of each phase of a run, in MiB.

    Linux keeps one high-water mark per process (``VmHWM``); writing ``5`` to ``/proc/self/clear_refs``
    resets it to the current RSS. Resetting it when a phase starts and reading it when the phase ends gives
    that phase's own peak. :meth:`wrap` makes every call of a method a phase (the largest call counts).
    """

    def __init__(self):
        self.peaks: dict[str, float] = {}

    @staticmethod
    def _reset() -> None:
        with open("/proc/self/clear_refs", "w", encoding="ascii") as handle:
            handle.write("5")

    def start(self) -> None:
        self._reset()

    def end(self, phase: str) -> None:
        self.peaks[phase] = max(self.peaks.get(phase, 0.0), round(common.peak_rss_mib(), 1))

    def wrap(self, owner, name: str, phase: str | None = None) -> None:
        """Measure every call of ``owner.name`` as the phase ``phase`` (default: ``name``)."""
        method = getattr(owner, name)

        @functools.wraps(method)
        def measured(*args, **kwargs):
            self.end("other")  # what ran since the last phase ended
            self.start()
            try:
                return method(*args, **kwargs)
            finally:
                self.end(phase or name)
                self.start()

        setattr(owner, name, measured)


def run_child(spec: dict) -> dict:
    """Train one stage with one setting; report its peak RSS, and the peak of each phase."""
    from rich.console import Console

    from rlhfkit.trainers import base, ppo
    from rlhfkit.trainers.dpo import build_dpo_trainer
    from rlhfkit.trainers.reward import build_reward_trainer
    from rlhfkit.trainers.sft import build_sft_trainer

    stage = spec["stage"]
    config = stage_config(stage, spec["setting"], spec["inputs"], spec["output_dir"])
    console = Console(stderr=True)
    build = {"sft": build_sft_trainer, "rm": build_reward_trainer, "dpo": build_dpo_trainer,
             "ppo": ppo.PPOTrainer}[stage]
    phases = PhasePeaks()
    phases.start()
    trainer = build(config, console)
    phases.end("load")
    steps = ("rollout", "update") if stage == "ppo" else ("_optimizer_step",)
    for name in (*steps, "evaluate", "save_checkpoint"):
        if hasattr(trainer, name):
            phases.wrap(trainer, name, "step" if name == "_optimizer_step" else name.strip("_"))
    for module in (base, ppo):  # the final (merged) model is written by the modules' save_model
        phases.wrap(module, "save_model", "final save")
    phases.start()
    trainer.train()
    phases.end("other")
    return {"stage": stage, "setting": spec["setting"],
            "peak_rss_mib": max(phases.peaks.values()), "phases": phases.peaks}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--size", default="small", choices=list(SIZES))
    parser.add_argument("--stages", nargs="+", default=list(STAGES), choices=STAGES)
    parser.add_argument("--settings", nargs="+", default=list(DEFAULT_SETTINGS), choices=SETTINGS)
    parser.add_argument("--mmap-threshold", type=int, metavar="BYTES",
                        help="fix glibc's MALLOC_MMAP_THRESHOLD_ in the runs (e.g. 131072): peaks of live memory")
    parser.add_argument("--json", type=Path, help="also write the figures to this file")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print("RESULT " + json.dumps(run_child(json.loads(args.child))), flush=True)
        return
    results = []
    allocator = {"MALLOC_MMAP_THRESHOLD_": str(args.mmap_threshold)} if args.mmap_threshold else {}
    with tempfile.TemporaryDirectory(prefix="rlhfkit-memory-") as folder:
        workdir = Path(folder)
        inputs = make_inputs(workdir, args.size)
        print(f"{args.size} model: {inputs['n_params'] / 1e6:.2f}M parameters, batch {BATCH_SIZE}"
              + (f", MALLOC_MMAP_THRESHOLD_={args.mmap_threshold}" if allocator else ""), flush=True)
        print(f"{'stage':<6} {'setting':<14} {'peak RSS MiB':>13} {'vs full':>8}  peak RSS of each phase", flush=True)
        for stage in args.stages:
            full = None
            for setting in args.settings:
                spec = {"stage": stage, "setting": setting, "inputs": inputs,
                        "output_dir": str(workdir / f"{stage}-{setting}"), "lib": "rlhfkit", "size": args.size}
                result = common.spawn_child(__file__, spec, env=allocator)
                full = result["peak_rss_mib"] if setting == "full" else full
                ratio = f"{result['peak_rss_mib'] / full:.2f}x" if full else "-"
                by_phase = ", ".join(f"{phase} {mib:.0f}" for phase, mib in result["phases"].items())
                print(f"{stage:<6} {setting:<14} {result['peak_rss_mib']:>13.1f} {ratio:>8}  {by_phase}", flush=True)
                results.append(result)
    if args.json:
        args.json.write_text(json.dumps({"size": args.size, "machine": common.cpu_model(), "allocator": allocator,
                                         "runs": results},
                                        indent=2) + "\n", encoding="utf-8")


if __name__ == "__main__":
    sys.exit(main())
