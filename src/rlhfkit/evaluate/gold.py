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


def gold_pairwise_accuracy(task: Task, prompts: Sequence[str], completions: Sequence[Sequence[str]],
                           rewards: Sequence[Sequence[float]]) -> dict[str, float]:
    """How often a reward model orders two completions of a prompt as the gold judge does.

    Every pair of completions of a prompt whose gold scores differ counts (pairs ordered by gold score,
    gold ties skipped); a reward tie counts as half right. Returns ``gold/accuracy`` and ``gold/pairs``.
    """
    from rlhfkit.tasks.base import GOLD_TIE_EPS

    agree, total = 0.0, 0
    for prompt, texts, scores in zip(prompts, completions, rewards, strict=True):
        gold = [task.gold_score(prompt, text) for text in texts]
        for i in range(len(texts)):
            for j in range(i + 1, len(texts)):
                if abs(gold[i] - gold[j]) <= GOLD_TIE_EPS:
                    continue
                total += 1
                if scores[i] == scores[j]:
                    agree += 0.5
                else:
                    agree += (gold[i] > gold[j]) == (scores[i] > scores[j])
    return {"gold/accuracy": agree / total if total else float("nan"), "gold/pairs": total}
