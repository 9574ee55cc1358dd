"""A built-in task's gold judge applied to a reward model's orderings."""

from __future__ import annotations

from collections.abc import Sequence

from rlhfkit.tasks.base import Task


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
