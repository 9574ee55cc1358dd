"""Shared pieces of the benchmarks: deterministic synthetic data, a tokenizer, a saved random model,
and peak-memory / timing helpers.

Nothing here downloads anything: the tokenizer is trained on generated English-like text and the
models are randomly initialised presets (``rlhfkit.models.build``) saved to a local directory, so
that every library under comparison loads the very same weights from disk.
"""

from __future__ import annotations

import json
import platform
import random
import resource
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

# A small closed vocabulary: enough variety for a 512-token BPE to learn real merges.
SUBJECTS = ("the fox", "a farmer", "the old boat", "my sister", "the river", "a small robot", "the teacher",
            "our neighbour", "the green kite", "a tired dog", "the baker", "the captain", "a quiet child",
            "the village", "the winter wind", "a lost letter", "the red train", "the garden")
VERBS = ("found", "carried", "painted", "watched", "followed", "remembered", "opened", "built", "visited",
         "cleaned", "forgot", "discovered", "repaired", "described", "counted", "shared", "planted", "sold")
OBJECTS = ("a wooden box", "the bright lamp", "three apples", "the long road", "an empty cup", "the map",
           "a heavy stone", "the morning light", "some warm bread", "the broken gate", "a blue feather",
           "the last page", "two silver coins", "the tall tower", "a paper boat", "the quiet lake")
ENDINGS = ("before dinner", "after the storm", "near the market", "in the evening", "with great care",
           "without a word", "on a sunny day", "at the edge of town", "for the first time", "again and again",
           "under the old bridge", "while it rained")
QUESTIONS = ("Write a short story about {s}.", "Explain why {s} {v} {o}.", "Describe {o} in a few sentences.",
             "Tell me what happened when {s} {v} {o}.", "Summarise the day {s} {v} {o} {e}.",
             "Give an account of {s} and {o}.")

PROMPT_TOKENS = (30, 38)      # rendered prompt (chat template included): ~34 on average
COMPLETION_TOKENS = (32, 64)  # completion tokens including the EOS rlhfkit / TRL append


def sentence(rng: random.Random) -> str:
    text = f"{rng.choice(SUBJECTS)} {rng.choice(VERBS)} {rng.choice(OBJECTS)} {rng.choice(ENDINGS)}."
    return text[0].upper() + text[1:]


def corpus(n: int, seed: int = 1) -> list[str]:
    """``n`` short English-like paragraphs (tokenizer training text)."""
    rng = random.Random(seed)
    return [" ".join(sentence(rng) for _ in range(rng.randint(1, 4))) for _ in range(n)]


def _grow(rng: random.Random, head: str, n_tokens, target: int) -> str:
    """Append sentence fragments (word by word) to ``head`` until it is ``target`` tokens long."""
    text = head
    words: list[str] = []
    while n_tokens(text) < target:
        if not words:
            words = sentence(rng).split(" ")
        text = f"{text} {words.pop(0)}" if text else words.pop(0)
    return text


@dataclass(frozen=True)
class BenchData:
    tokenizer_dir: str
    train_path: str
    n_examples: int
    prompt_tokens_mean: float
    completion_tokens_mean: float


def make_data(workdir: Path, n_examples: int = 512, seed: int = 0) -> BenchData:
    """Train the tokenizer and write ``train.jsonl`` of ``{"prompt", "completion"}`` rows.

    Lengths are drawn uniformly in :data:`PROMPT_TOKENS` (the prompt as rlhfkit renders it, i.e. with the
    chat template) and :data:`COMPLETION_TOKENS` (with the EOS token), and checked with the tokenizer.
    """
    from rlhfkit.data.collators import encode_prompt
    from rlhfkit.models.tokenizer import train_bpe_tokenizer

    tok_dir = workdir / "tokenizer"
    tokenizer = train_bpe_tokenizer(corpus(4000), vocab_size=512, save_dir=tok_dir)

    def text_tokens(text: str) -> int:
        return len(tokenizer(text, add_special_tokens=False)["input_ids"])

    def prompt_tokens(text: str) -> int:
        return len(encode_prompt(tokenizer, text))

    rng = random.Random(seed)
    rows, p_lens, c_lens = [], [], []
    while len(rows) < n_examples:
        p_target = rng.randint(*PROMPT_TOKENS)
        c_target = rng.randint(*COMPLETION_TOKENS) - 1  # the EOS is appended by the trainers
        s, v, o, e = rng.choice(SUBJECTS), rng.choice(VERBS), rng.choice(OBJECTS), rng.choice(ENDINGS)
        question = rng.choice(QUESTIONS).format(s=s, v=v, o=o, e=e)
        prompt = _grow(rng, question, prompt_tokens, p_target)
        completion = _grow(rng, "", text_tokens, c_target)
        p_len, c_len = prompt_tokens(prompt), text_tokens(completion) + 1
        lo_p, hi_p = PROMPT_TOKENS
        lo_c, hi_c = COMPLETION_TOKENS
        if not (lo_p <= p_len <= hi_p and lo_c <= c_len <= hi_c):
            continue  # a long last word overshot the range: draw again
        rows.append({"prompt": prompt, "completion": completion})
        p_lens.append(p_len)
        c_lens.append(c_len)
    train_path = workdir / "train.jsonl"
    with train_path.open("w", encoding="utf-8") as handle:
        for row in rows:
            handle.write(json.dumps(row) + "\n")
    return BenchData(str(tok_dir), str(train_path), len(rows),
                     sum(p_lens) / len(p_lens), sum(c_lens) / len(c_lens))


def save_random_model(tokenizer_dir: str, preset: str, out_dir: Path, seed: int = 0,
                      **architecture: int) -> tuple[str, int]:
    """Build the random-init preset Llama (``architecture`` overrides its sizes), save it (with the tokenizer)
    in HF format; return (dir, n_params)."""
    from rlhfkit.models.build import build_causal_lm
    from rlhfkit.models.load import load_tokenizer

    tokenizer = load_tokenizer(tokenizer_dir)
    model = build_causal_lm(tokenizer, preset, seed=seed, **architecture)
    model.save_pretrained(out_dir, safe_serialization=True)
    tokenizer.save_pretrained(out_dir)
    return str(out_dir), sum(p.numel() for p in model.parameters())


#: Environment of every benchmark child process: offline, no tokenizer thread pool, quiet transformers.
CHILD_ENV = {"TOKENIZERS_PARALLELISM": "false", "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1",
             "TRANSFORMERS_NO_ADVISORY_WARNINGS": "1"}


def spawn_child(script: str, spec: dict, pythonpath: str | None = None, env: dict[str, str] | None = None) -> dict:
    """Run ``script --child SPEC`` in a fresh process of this Python; return the JSON it prints after ``RESULT ``.

    ``pythonpath``: a directory put first on the child's ``sys.path`` (say, another release of a library);
    ``env``: more environment variables for the child. A failed run prints the end of its output and stops
    the benchmark.
    """
    import os

    env = {**os.environ, **CHILD_ENV, **(env or {})}
    if pythonpath:
        env["PYTHONPATH"] = os.pathsep.join(p for p in (pythonpath, env.get("PYTHONPATH")) if p)
    proc = subprocess.run([sys.executable, str(Path(script).resolve()), "--child", json.dumps(spec)],
                          capture_output=True, text=True, env=env)
    lines = [line for line in proc.stdout.splitlines() if line.startswith("RESULT ")]
    if proc.returncode != 0 or not lines:
        sys.stderr.write(proc.stdout[-4000:] + proc.stderr[-8000:])
        raise SystemExit(f"benchmark run failed: {spec['lib']} {spec['size']} (exit {proc.returncode})")
    return json.loads(lines[-1][len("RESULT "):])


def read_rows(path: str) -> list[dict]:
    with open(path, encoding="utf-8") as handle:
        return [json.loads(line) for line in handle if line.strip()]


def peak_rss_mib() -> float:
    """Peak resident set size of this process so far, in MiB.

    Linux: ``VmHWM`` of ``/proc/self/status``, the high-water mark of this program's address space.
    Not ``ru_maxrss``: Linux carries it over ``execve``, so a child started from a big parent reports at
    least the parent's RSS at the fork. Elsewhere ``ru_maxrss`` (KiB on Linux, bytes on macOS).
    """
    try:
        with open("/proc/self/status", encoding="ascii") as handle:
            for line in handle:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    maxrss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return maxrss / 2**20 if sys.platform == "darwin" else maxrss / 1024


def current_rss_mib() -> float:
    import psutil

    return psutil.Process().memory_info().rss / 2**20


def cpu_snapshot() -> tuple[float, float]:
    """(CPU seconds used by the whole machine, CPU seconds used by this process), for :func:`foreign_load`."""
    import time

    import psutil

    t = psutil.cpu_times()
    busy = t.user + t.nice + t.system + getattr(t, "irq", 0.0) + getattr(t, "softirq", 0.0)
    return busy, time.process_time()


def foreign_load(before: tuple[float, float], after: tuple[float, float], wall: float) -> float:
    """Share of the machine's CPU (0..1) that *other* processes used between two snapshots."""
    import os

    machine, own = after[0] - before[0], after[1] - before[1]
    return max(0.0, machine - own) / (wall * (os.cpu_count() or 1))


def wait_until_quiet(threshold: float, max_wait: float, sample: float = 1.0) -> float:
    """Wait (up to ``max_wait`` s) until the machine is less than ``threshold`` (0..1) busy; return the last
    measured load. The benchmark itself is idle while it waits, so what is measured is other processes."""
    import time

    import psutil

    deadline = time.monotonic() + max_wait
    while True:
        load = psutil.cpu_percent(interval=sample) / 100
        if load < threshold or time.monotonic() >= deadline:
            return load


def median(values: list[float]) -> float:
    ordered = sorted(values)
    mid = len(ordered) // 2
    return ordered[mid] if len(ordered) % 2 else (ordered[mid - 1] + ordered[mid]) / 2


def cpu_model() -> str:
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True, check=True).stdout
        for line in out.splitlines():
            if line.startswith("Model name:"):
                return line.split(":", 1)[1].strip()
    except (OSError, subprocess.CalledProcessError):
        pass
    return platform.processor() or "unknown"


def versions(*packages: str) -> dict[str, str]:
    from importlib.metadata import PackageNotFoundError, version

    found = {"python": sys.version.split()[0]}
    for name in packages:
        try:
            found[name] = version(name)
        except PackageNotFoundError:
            found[name] = "not installed"
    return found


def alternate_runs(script: str, pairs: int, spec_of, *, libs: tuple[str, ...] = ("rlhfkit", "trl"),
                   pythonpath_of=None, quiet_below: float = 0.15, max_wait: float = 60, describe=None) -> list[dict]:
    """``pairs`` pairs of runs, one per library, each in a fresh process, the order swapped every other pair
    (A B, B A, ...) so that a slow drift of the machine weighs on both; ``spec_of(lib, pair)`` gives a run's
    spec, ``pythonpath_of(lib)`` a directory first on its path (or None), ``describe(run)`` the line printed
    after it."""
    runs = []
    for pair in range(pairs):
        for lib in (libs if pair % 2 == 0 else tuple(reversed(libs))):
            wait_until_quiet(quiet_below, max_wait)
            run = spawn_child(script, spec_of(lib, pair), pythonpath=pythonpath_of(lib) if pythonpath_of else None)
            runs.append(run)
            if describe:
                print(f"  pair {pair + 1} {lib:<8} {describe(run)}", flush=True)
    return runs


def paired(runs: list[dict], libs: tuple[str, str] = ("rlhfkit", "trl")) -> list[tuple[dict, dict]]:
    """The runs of :func:`alternate_runs` as (first library's run, second library's run) pairs."""
    first = [r for r in runs if r["lib"] == libs[0]]
    second = [r for r in runs if r["lib"] == libs[1]]
    return list(zip(first, second, strict=True))


def matmul_flops_per_s(n: int = 2048, repeats: int = 10, threads: int | None = None) -> float:
    """The fp32 matmul FLOP/s torch reaches on this machine: the best of ``repeats`` ``n x n @ n x n`` products
    (2 n^3 FLOPs each) after a warm-up, with ``threads`` torch threads (default: torch's). The denominator of
    model-FLOP utilisation."""
    import time

    import torch

    previous = torch.get_num_threads()
    if threads:
        torch.set_num_threads(threads)
    try:
        a, b = torch.randn(n, n), torch.randn(n, n)
        out = torch.empty(n, n)
        for _ in range(2):
            torch.mm(a, b, out=out)
        best = float("inf")
        for _ in range(repeats):
            start = time.perf_counter()
            torch.mm(a, b, out=out)
            best = min(best, time.perf_counter() - start)
        return 2 * n**3 / best
    finally:
        torch.set_num_threads(previous)


class StepFlops:
    """Model FLOPs of each optimizer step of an rlhfkit trainer, from the batches its collator builds.

    ``passes`` counts forward-pass equivalents per sequence: 3 for training (forward + backward), plus 1 for
    each frozen model that scores the same sequences every step (DPO's reference). See
    :mod:`rlhfkit.models.flops`; FLOPs are counted on the real (non-padding) tokens of every row.
    """

    def __init__(self, trainer, passes: int = 3):
        from rlhfkit.models.flops import FlopModel, lengths_of

        self.model = FlopModel(trainer.accelerator.unwrap_model(trainer.model))
        self.passes, self.lengths = passes, []
        collate = trainer.collator

        def counting_collator(examples):
            batch = collate(examples)
            self.lengths += lengths_of(batch["attention_mask"])
            return batch

        trainer.collator = counting_collator

    def take(self) -> float:
        """FLOPs of the batches collated since the last call."""
        flops, self.lengths = self.passes * self.model.forward(self.lengths), []
        return flops
