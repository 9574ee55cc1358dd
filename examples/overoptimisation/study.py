"""Reward over-optimisation study on a finished ``rlhfkit demo`` run (Gao, Schulman & Hilton 2022).

Gao et al. 2022 ("Scaling laws for reward model overoptimization", arXiv:2210.10760) optimise a policy against
a proxy reward model and watch a gold reward along the way. Here the demo's reward model is the proxy and the
built-in task's gold judge (``tinyworld``) plays the human. Two ways of optimising, both from the SFT policy:

1. best-of-n: one draw of ``--max-n`` samples per held-out prompt, scored by the proxy and by gold; for
   n = 1, 2, 4, ..., max_n the best-of-n pick of the first n draws
   (:func:`rlhfkit.evaluate.overoptimisation.best_of_n_curve`), at the analytic
   ``KL = log n - (n - 1) / n``;
2. PPO against the proxy, one run per ``--kl-coefs`` coefficient (0 included), checkpointed every
   ``--save-every`` iterations; every checkpoint is judged on the same held-out prompts with the KL to SFT
   measured on its samples (:func:`rlhfkit.evaluate.compare.evaluate_models`).

Gold relative to SFT's expected gold is fitted against ``d = sqrt(KL)`` with the paper's two forms,
``R_bon(d) = d (alpha - beta d)`` and ``R_RL(d) = d (alpha - beta log d)``
(:func:`~rlhfkit.evaluate.overoptimisation.study_summary`). Writes ``study.json`` and ``overoptimisation.png``
into ``--out`` (default ``<run>/overoptimisation``, where ``rlhfkit report <run>`` finds it).

Every stage is cached under ``--out`` and resumes: the best-of-n draw, SFT's evaluation, each PPO run (its own
directory ``ppo-kl<coef>``; a finished one is skipped, an interrupted one resumes from its last checkpoint)
and each run's checkpoint evaluations. Run from the repository root::

    python examples/overoptimisation/study.py --run runs/demo
"""

from __future__ import annotations

import argparse
import gc
import hashlib
import json
import math
import time
from pathlib import Path
from typing import Any

import yaml
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn
from rich.table import Table

from rlhfkit.evaluate.overoptimisation import (
    best_of_n_curve,
    series_key,
    study_figure,
    study_point,
    study_summary,
)

CHUNK_PROMPTS = 8  # prompts per best-of-n sampling call (each its own seed): the unit of progress


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--run", required=True, type=Path, help="a finished demo run (sft/final, rm/final, ppo/)")
    parser.add_argument("--out", type=Path, default=None, help="output directory (default: <run>/overoptimisation)")
    parser.add_argument("--prompts", type=int, default=200, help="held-out prompts to use (the first N)")
    parser.add_argument("--prompts-file", type=Path, default=None,
                        help="held-out prompts (default: <run>/data/eval_prompts.jsonl)")
    parser.add_argument("--max-n", type=int, default=64, help="samples per prompt of the best-of-n draw")
    parser.add_argument("--kl-coefs", default="0,0.01,0.03,0.1", help="comma-separated PPO KL coefficients")
    parser.add_argument("--ppo-iterations", type=int, default=60, help="PPO iterations per run")
    parser.add_argument("--save-every", type=int, default=10, help="checkpoint (and evaluate) every N iterations")
    parser.add_argument("--skip-ppo", action="store_true",
                        help="train no PPO (finished PPO runs already under --out are still included)")
    parser.add_argument("--temperature", type=float, default=None, help="default: the run's eval temperature")
    parser.add_argument("--max-new-tokens", type=int, default=None, help="default: the run's eval max_new_tokens")
    parser.add_argument("--batch-size", type=int, default=256, help="sequences per generation batch")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--bootstrap", type=int, default=1000, help="bootstrap resamples for the intervals")
    parser.add_argument("--ppo-set", action="append", default=[], metavar="KEY=VALUE",
                        help="extra override of the run's PPO config (repeatable), e.g. train.lr=1e-4")
    args = parser.parse_args(argv)
    args.kl_coefs = [float(c) for c in args.kl_coefs.split(",") if c.strip()]
    if args.prompts < 1 or args.max_n < 1 or args.ppo_iterations < 1 or args.save_every < 1:
        parser.error("--prompts, --max-n, --ppo-iterations and --save-every must be at least 1")
    if any(c < 0 for c in args.kl_coefs) or len(set(args.kl_coefs)) != len(args.kl_coefs):
        parser.error(f"--kl-coefs must be distinct numbers >= 0, got {args.kl_coefs}")
    return args


# ---- the run ---------------------------------------------------------------------------------------------

def run_settings(args: argparse.Namespace) -> dict[str, Any]:
    """The demo run's models, prompts, task and evaluation sampling (its pipeline config, where present)."""
    run = args.run
    for needed in (run / "sft" / "final", run / "rm" / "final"):
        if not needed.exists():
            raise SystemExit(f"{needed}: not found; --run must be a finished demo run (rlhfkit demo)")
    pipeline = run / "config.yaml"
    config = yaml.safe_load(pipeline.read_text(encoding="utf-8")) if pipeline.exists() else {}
    evaluation = (config or {}).get("eval") or {}
    prompts_file = args.prompts_file or run / "data" / "eval_prompts.jsonl"
    if not prompts_file.exists():
        raise SystemExit(f"{prompts_file}: no held-out prompts (pass --prompts-file)")
    return {"run": str(run), "sft": str(run / "sft" / "final"), "rm": str(run / "rm" / "final"),
            "prompts_file": str(prompts_file), "task": (config or {}).get("task") or "tinyworld",
            "temperature": args.temperature if args.temperature is not None else evaluation.get("temperature", 0.7),
            "max_new_tokens": args.max_new_tokens or evaluation.get("max_new_tokens", 64)}


def _cached(path: Path, key: dict[str, Any]) -> dict[str, Any] | None:
    """The cache file's content when it was written for ``key``, else None."""
    if path.exists():
        content = json.loads(path.read_text(encoding="utf-8"))
        if content.get("key") == key:
            return content
    return None


def _write_json(path: Path, content: dict[str, Any]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(content, indent=1), encoding="utf-8")
    tmp.replace(path)  # never a half-written cache


def _sampling(settings: dict[str, Any], batch_size: int):
    from rlhfkit.rollout.generate import SamplingConfig

    return SamplingConfig(max_new_tokens=settings["max_new_tokens"], temperature=settings["temperature"],
                          batch_size=batch_size)


# ---- 1. best-of-n ----------------------------------------------------------------------------------------

def best_of_n_draw(args, settings, prompts, task, console: Console) -> dict[str, Any]:
    """``max_n`` samples of SFT per prompt with their proxy and gold scores (cached in ``best_of_n.json``)."""
    from rlhfkit.config import ModelConfig
    from rlhfkit.models.load import load_causal_lm
    from rlhfkit.models.reward import load_for_scoring
    from rlhfkit.rollout.best_of_n import sample_best_of_n

    key = {"sft": settings["sft"], "rm": settings["rm"], "prompts": _digest(prompts), "max_n": args.max_n,
           "temperature": settings["temperature"], "max_new_tokens": settings["max_new_tokens"], "seed": args.seed,
           "chunk_prompts": CHUNK_PROMPTS}
    path = args.out / "best_of_n.json"
    cached = _cached(path, key)
    if cached is not None:
        console.print(f"best-of-n: {len(prompts)} prompts x {args.max_n} samples from {path}")
        return cached
    model, tokenizer = load_causal_lm(ModelConfig(name_or_path=settings["sft"]))
    scorer = load_for_scoring(settings["rm"])
    sampling = _sampling(settings, args.batch_size)
    rows: dict[str, list] = {"completions": [], "proxy": [], "gold": []}
    with _progress(console) as progress:
        bar = progress.add_task(f"best-of-{args.max_n} draw", total=len(prompts))
        for chunk, start in enumerate(range(0, len(prompts), CHUNK_PROMPTS)):
            part = prompts[start:start + CHUNK_PROMPTS]
            picks = sample_best_of_n(model, tokenizer, scorer, part, args.max_n, sampling,
                                     seed=args.seed + 1000 * chunk, score_batch_size=args.batch_size)
            for prompt, pick in zip(part, picks, strict=True):
                rows["completions"].append([g.text for g in pick.samples])
                rows["proxy"].append(list(pick.scores))
                rows["gold"].append([task.gold_score(prompt, g.text) for g in pick.samples])
            progress.update(bar, advance=len(part))
    content = {"key": key, "prompts": [str(p) for p in prompts], **rows}
    _write_json(path, content)
    return content


# ---- 2. PPO and its checkpoints ----------------------------------------------------------------------

def ppo_directory(out: Path, coef: float) -> Path:
    return out / f"ppo-kl{coef:g}"


def ppo_overrides(args, settings, coef: float) -> list[str]:
    """``--set`` overrides of the run's PPO config for one run of the study."""
    keep = args.ppo_iterations // args.save_every + 1  # every checkpoint of the run (+ the final one)
    overrides = [f"train.output_dir={ppo_directory(args.out, coef)}", f"ppo.kl_coef={coef}",
                 f"train.max_steps={args.ppo_iterations}", f"train.save_every={args.save_every}",
                 f"train.save_total_limit={keep}", f"model.name_or_path={settings['sft']}",
                 f"ppo.reward_model={settings['rm']}", "ppo.adaptive_kl=false"]
    return [*overrides, *args.ppo_set]


def _ppo_status(directory: Path, coef: float, iterations: int) -> str:
    """``finished`` (a ``final/`` of at least ``iterations``), ``partial`` or ``new``."""
    config = directory / "config.yaml"
    if not config.exists():
        return "new"
    saved = yaml.safe_load(config.read_text(encoding="utf-8"))
    if not math.isclose(float(saved["ppo"]["kl_coef"]), coef):
        raise SystemExit(f"{directory} holds a run with kl_coef {saved['ppo']['kl_coef']}, not {coef}: "
                         "use another --out or delete it")
    if (directory / "final").exists() and saved["train"]["max_steps"] >= iterations:
        return "finished"
    return "partial"


def run_ppo_once(args, settings, coef: float, console: Console) -> None:
    from rlhfkit.config import PPOConfig, load_config
    from rlhfkit.trainers.ppo import run_ppo

    base = args.run / "ppo" / "config.yaml"
    if not base.exists():
        raise SystemExit(f"{base}: not found; the study's PPO runs start from the demo run's PPO config")
    # a run that died before its first checkpoint starts afresh: the engine truncates its logs
    overrides = ppo_overrides(args, settings, coef)
    config = load_config(PPOConfig, base, overrides)
    if not Path(config.data.train).exists():  # the run was moved: its own copy of the prompts
        moved = args.run / "data" / Path(config.data.train).name
        config = load_config(PPOConfig, base, [*overrides, f"data.train={moved}"])
    run_ppo(config, console)
    gc.collect()


def evaluate_checkpoints(args, settings, directory: Path, prompts, task, console: Console) -> dict[str, dict]:
    """``{iteration: {kl, gold, proxy}}`` of a PPO run's checkpoints (every ``save_every``, up to
    ``ppo_iterations``), each judged on the held-out prompts (cached in ``<run dir>/study_eval.json``)."""
    from rlhfkit.engine.checkpoint import checkpoints
    from rlhfkit.evaluate.compare import evaluate_models

    key = {"sft": settings["sft"], "rm": settings["rm"], "prompts": _digest(prompts), "seed": args.seed,
           "temperature": settings["temperature"], "max_new_tokens": settings["max_new_tokens"], "version": 2}
    path = directory / "study_eval.json"
    cached = _cached(path, key) or {"key": key, "checkpoints": {}}
    wanted = {int(p.name.split("-")[-1]): p for p in checkpoints(directory)}
    wanted = {step: p for step, p in wanted.items()
              if step <= args.ppo_iterations and (step % args.save_every == 0 or step == args.ppo_iterations)}
    missing = {f"it{step}": str(p) for step, p in sorted(wanted.items()) if str(step) not in cached["checkpoints"]}
    if missing:
        with console.status(f"judging {len(missing)} checkpoints of {directory.name} on {len(prompts)} prompts"):
            report, samples = evaluate_models(missing, prompts, _sampling(settings, args.batch_size), task=task,
                                              reward_model=settings["rm"], reference=settings["sft"], seed=args.seed)
        for name in missing:
            cached["checkpoints"][name[2:]] = _judged(report["models"][name]["kl"], samples[name])
        _write_json(path, cached)
    return {step: value for step, value in cached["checkpoints"].items() if int(step) in wanted}


def _judged(kl: float, rows: list[dict]) -> dict[str, Any]:
    """What the study keeps of a policy's :func:`evaluate_models` samples: the KL and, per prompt, the gold and
    proxy scores, the completion and its length in words."""
    return {"kl": kl, "gold": [r["gold"] for r in rows], "proxy": [r["rm"] for r in rows],
            "words": [len(r["completion"].split()) for r in rows], "completions": [r["completion"] for r in rows]}


def evaluate_sft(args, settings, prompts, task, console: Console) -> dict[str, Any]:
    """SFT judged like the checkpoints (iteration 0 of every PPO series; cached in ``sft_eval.json``)."""
    from rlhfkit.evaluate.compare import evaluate_models

    key = {"sft": settings["sft"], "rm": settings["rm"], "prompts": _digest(prompts), "seed": args.seed,
           "temperature": settings["temperature"], "max_new_tokens": settings["max_new_tokens"], "version": 2}
    path = args.out / "sft_eval.json"
    cached = _cached(path, key)
    if cached is None:
        with console.status(f"judging SFT on {len(prompts)} prompts"):
            report, samples = evaluate_models({"sft": settings["sft"]}, prompts, _sampling(settings, args.batch_size),
                                              task=task, reward_model=settings["rm"], reference=settings["sft"],
                                              seed=args.seed)
        cached = {"key": key, **_judged(report["models"]["sft"]["kl"], samples["sft"])}
        _write_json(path, cached)
    return cached


# ---- the study -------------------------------------------------------------------------------------------

def main(argv: list[str] | None = None, console: Console | None = None) -> dict[str, Any]:
    """Run (or resume) the study; returns the ``study.json`` content."""
    import transformers

    from rlhfkit.data.readers import read_records
    from rlhfkit.tasks import get_task

    transformers.utils.logging.disable_progress_bar()
    console = console or Console()
    args = parse_args(argv)
    args.out = args.out or args.run / "overoptimisation"
    args.out.mkdir(parents=True, exist_ok=True)
    settings = run_settings(args)
    task = get_task(settings["task"])
    prompts = [r.prompt for r in read_records(settings["prompts_file"], "prompt", limit=args.prompts)]
    seconds: dict[str, float] = {}
    console.rule(f"reward over-optimisation study of {args.run}: {len(prompts)} held-out prompts")

    started = time.perf_counter()
    draw = best_of_n_draw(args, settings, prompts, task, console)
    seconds["best_of_n"] = time.perf_counter() - started
    words = [[len(text.split()) for text in row] for row in draw["completions"]]
    points = best_of_n_curve(draw["gold"], draw["proxy"], extras={"words": words}, n_bootstrap=args.bootstrap,
                             seed=args.seed)
    every_gold = [g for row in draw["gold"] for g in row]
    every_proxy = [p for row in draw["proxy"] for p in row]
    baseline_gold, baseline_proxy = sum(every_gold) / len(every_gold), sum(every_proxy) / len(every_proxy)

    runs: dict[str, str] = {}
    for coef in args.kl_coefs:
        directory = ppo_directory(args.out, coef)
        status = _ppo_status(directory, coef, args.ppo_iterations)
        if status != "finished" and args.skip_ppo:
            runs[f"{coef:g}"] = f"not run (--skip-ppo; {status})"
            continue
        if status == "finished":
            console.print(f"PPO kl_coef={coef:g}: finished in {directory}, skipped")
        else:
            console.rule(f"PPO kl_coef={coef:g}, {args.ppo_iterations} iterations ({status}) -> {directory}")
            started = time.perf_counter()
            run_ppo_once(args, settings, coef, console)
            seconds[f"ppo:kl_coef={coef:g}"] = time.perf_counter() - started
        runs[f"{coef:g}"] = str(directory)
        started = time.perf_counter()
        for step, value in evaluate_checkpoints(args, settings, directory, prompts, task, console).items():
            points.append(study_point(value["gold"], value["proxy"], value["kl"], n_bootstrap=args.bootstrap,
                                      seed=args.seed, method="ppo", kl_coef=coef, iteration=int(step),
                                      words=sum(value["words"]) / len(value["words"])))
        seconds[f"eval:kl_coef={coef:g}"] = time.perf_counter() - started
    if any(p["method"] == "ppo" for p in points):
        sft = evaluate_sft(args, settings, prompts, task, console)
        points.append(study_point(sft["gold"], sft["proxy"], sft["kl"], n_bootstrap=args.bootstrap, seed=args.seed,
                                  method="sft", iteration=0, words=sum(sft["words"]) / len(sft["words"])))

    ppo_file = args.run / "ppo" / "config.yaml"
    ppo_config = yaml.safe_load(ppo_file.read_text(encoding="utf-8")) if ppo_file.exists() else {}
    ppo_section, train_section = ppo_config.get("ppo") or {}, ppo_config.get("train") or {}
    described = {
        **settings, "prompts": len(prompts), "max_n": args.max_n, "kl_coefs": args.kl_coefs,
        "ppo_iterations": args.ppo_iterations, "save_every": args.save_every, "seed": args.seed,
        "bootstrap": args.bootstrap, "ppo_runs": runs, "ppo_set": args.ppo_set,
        "ppo": {**{k: ppo_section.get(k) for k in ("advantage", "value_model", "rollout_batch_size", "minibatch_size",
                                                   "ppo_epochs", "temperature", "max_new_tokens")},
                "lr": train_section.get("lr")},
        "baseline": f"SFT's expected gold and proxy: the mean over all {args.max_n} draws of every prompt",
        "seconds": seconds, "written": time.strftime("%Y-%m-%d %H:%M:%S")}
    study = study_summary(points, baseline_gold=baseline_gold, baseline_proxy=baseline_proxy,
                          settings=described, n_bootstrap=args.bootstrap, seed=args.seed)
    _write_json(args.out / "study.json", study)
    study_figure(study).savefig(args.out / "overoptimisation.png", dpi=100)
    print_summary(study, console)
    console.print(f"[bold]written:[/] {args.out / 'study.json'}, {args.out / 'overoptimisation.png'}")
    if args.out.resolve() == (args.run / "overoptimisation").resolve():
        console.print(f"`rlhfkit report {args.run}` now draws the study in the run's report.html")
    return study


def print_summary(study: dict[str, Any], console: Console) -> None:
    baseline = study["baseline"]["gold"]
    table = Table(title=f"points (SFT's expected gold {baseline:.3f}, proxy {study['baseline']['proxy']:.3f})")
    for header in ("series", "point", "KL", "sqrt KL", "gold [95% CI]", "gold - SFT", "proxy", "words"):
        table.add_column(header, justify="left" if header in ("series", "point") else "right")
    for p in study["points"]:
        point = f"n={p['n']}" if p["method"] == "best_of_n" else f"iteration {p['iteration']}"
        table.add_row(series_key(p), point, f"{p['kl']:.3f}", f"{p['sqrt_kl']:.3f}",
                      f"{p['gold']:.3f} [{p['gold_low']:.3f}, {p['gold_high']:.3f}]", f"{p['gold_delta']:+.3f}",
                      f"{p['proxy']:.3f}", f"{p['words']:.1f}" if "words" in p else "")
    console.print(table)
    fits = Table(title="fits of gold - SFT against d = sqrt(KL) (Gao et al. 2022)")
    for header in ("fit", "alpha", "beta", "R²", "peak KL", "peak gold", "max KL measured"):
        fits.add_column(header, justify="left" if header == "fit" else "right")
    entries = [(name, study["fits"][name]) for name in ("best_of_n", "rl") if name in study["fits"]]
    entries += [(f"rl, kl_coef={c}", e) for c, e in study["fits"].get("rl_by_kl_coef", {}).items()]
    for name, e in entries:
        if "error" in e:
            fits.add_row(name, "-", "-", "-", "-", "-", f"{e['max_kl']:.3f}")
            continue
        fits.add_row(name, f"{e['alpha']:.4f}", f"{e['beta']:.4f}", f"{e['r2']:.3f}",
                     "none" if e["peak_kl"] is None else f"{e['peak_kl']:.3g}",
                     "-" if e["peak_gold"] is None else f"{e['peak_gold']:.3f}", f"{e['max_kl']:.3f}")
    console.print(fits)
    comparison = study["fits"].get("rl_comparison")
    if comparison:
        console.print("RL fit: " + ", ".join(f"{k} adjusted R² {v['adjusted_r2']:.3f}" for k, v in comparison.items()
                                             if isinstance(v, dict) and v["adjusted_r2"] is not None)
                      + f"; preferred: {comparison['preferred']}")
    for name, s in study["series"].items():
        drop = (f" (95% CI [{s['gold_drop_low']:+.3f}, {s['gold_drop_high']:+.3f}])"
                if s["gold_drop_low"] is not None else "")
        console.print(f"{name}: gold best at {s['best']} (KL {s['best_kl']:.2f}, gold {s['best_gold']:.3f}); "
                      f"at {s['last']} (KL {s['last_kl']:.2f}) gold {s['last_gold']:.3f}, "
                      f"{s['gold_drop']:+.3f} below the best{drop}; proxy {s['proxy_change']:+.3f} "
                      f"({'still rising' if s['proxy_rises_past_gold_peak'] else 'not rising'} past the gold peak)")


def _digest(prompts) -> str:
    return hashlib.sha256("\n".join(str(p) for p in prompts).encode("utf-8")).hexdigest()[:16]


def _progress(console: Console) -> Progress:
    return Progress(TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                    TimeRemainingColumn(), console=console)


if __name__ == "__main__":
    main()
