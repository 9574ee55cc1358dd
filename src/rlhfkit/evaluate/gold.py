"""Score a model's samples with a built-in task's gold judge."""

from __future__ import annotations

import math
from collections.abc import Sequence

from rlhfkit.rollout.generate import SamplingConfig, generate
from rlhfkit.tasks.base import Task


def gold_evaluation(model, tokenizer, task: Task, prompts: Sequence[str], sampling: SamplingConfig,
                    *, seed: int = 0) -> tuple[dict[str, float], list[dict]]:
    """Sample one completion per prompt; return summary metrics and the scored samples.

    Metrics: ``gold/score`` (mean), ``gold/stderr`` (standard error of the mean), ``eos_rate``
    (share of samples that ended by themselves) and ``length/tokens`` (mean response length).
    """
    generations = generate(model, tokenizer, prompts, sampling, seed=seed)
    scores = [task.gold_score(p, g.text) for p, g in zip(prompts, generations, strict=True)]
    n = len(scores)
    mean = sum(scores) / n
    variance = sum((s - mean) ** 2 for s in scores) / max(n - 1, 1)
    metrics = {"gold/score": mean, "gold/stderr": math.sqrt(variance / n),
               "eos_rate": sum(g.finished for g in generations) / n,
               "length/tokens": sum(len(g.token_ids) for g in generations) / n}
    samples = [{"prompt": p, "completion": g.text, "gold": s}
               for p, g, s in zip(prompts, generations, scores, strict=True)]
    return metrics, samples
