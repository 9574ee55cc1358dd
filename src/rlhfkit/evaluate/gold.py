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


def _labeler_scores(task: Task, prompt: str, texts: Sequence[str], rng) -> list[int]:
    """One draw of the task's simulated labeler ranking ``texts``, as a score per completion: minus its group's
    place in the ranking (the best group 0, tied completions alike)."""
    place = {i: -g for g, group in enumerate(task.rank(prompt, list(texts), rng=rng)) for i in group}
    return [place[i] for i in range(len(texts))]


def labeler_gold_accuracy(task: Task, prompts: Sequence[str], completions: Sequence[Sequence[str]], *,
                          seed: int = 0, repeats: int = 5) -> float:
    """How often the task's simulated labeler orders two completions of a prompt as the gold judge does.

    The ceiling a reward model trained on that labeler's rankings is measured against: the same pairs as
    :func:`gold_pairwise_accuracy` (gold ties skipped), each prompt's completions ranked ``repeats`` times
    (independent draws of the labeler's noise, averaged: a lower-variance estimate of its expected
    agreement). This is agreement with gold; InstructGPT's ~73 % is agreement between labelers, which
    :func:`inter_labeler_agreement` measures.
    """
    import random

    rng = random.Random(seed)
    accuracies = []
    for _ in range(repeats):
        scores = [_labeler_scores(task, prompt, texts, rng) for prompt, texts in zip(prompts, completions, strict=True)]
        accuracies.append(gold_pairwise_accuracy(task, prompts, completions, scores)["gold/accuracy"])
    return sum(accuracies) / len(accuracies)


def inter_labeler_agreement(task: Task, prompts: Sequence[str], completions: Sequence[Sequence[str]], *,
                            seed: int = 0, repeats: int = 5) -> float:
    """How often two independent draws of the task's simulated labeler order two completions alike.

    The figure InstructGPT reports for its labelers (72.6 +- 1.5 % agreement between training labelers;
    Ouyang et al. 2022, section 5.1), so a simulated labeler's noise can be compared with real ones'. Every
    pair of completions of a prompt with different texts counts (identical texts are tied by every
    labeler); each of ``repeats`` rounds ranks each prompt's completions twice.
    """
    import random

    from rlhfkit.tasks.base import normalize_whitespace

    rng = random.Random(seed)
    agree = total = 0
    for _ in range(repeats):
        for prompt, texts in zip(prompts, completions, strict=True):
            first, second = (_labeler_scores(task, prompt, texts, rng) for _ in range(2))
            distinct = [normalize_whitespace(t) for t in texts]
            for i in range(len(texts)):
                for j in range(i + 1, len(texts)):
                    if distinct[i] != distinct[j]:
                        total += 1
                        agree += (first[i] > first[j]) == (second[i] > second[j])
    return agree / total if total else float("nan")


def reward_model_gold_accuracy(task: Task, reward_model: str, policy: str, prompts: Sequence[str], *, k: int,
                               sampling, seed: int = 0) -> dict[str, float]:
    """How often ``reward_model`` orders ``k`` fresh samples of ``policy`` per prompt as the gold judge does.

    The reward model's accuracy on the distribution it is used on (samples of the policy it was trained
    to judge), against the truth rather than against noisy labelers; see :func:`gold_pairwise_accuracy`.
    ``labeler/accuracy`` is the simulated labeler's own agreement with gold on the same pairs
    (:func:`labeler_gold_accuracy`): the ceiling of a reward model learnt from its rankings.
    ``labeler/inter_agreement`` is two simulated labelers' agreement with each other on the same completions
    (:func:`inter_labeler_agreement`), the figure to hold against InstructGPT's 72.6 %.
    """
    from rlhfkit.config import ModelConfig
    from rlhfkit.models.load import load_causal_lm
    from rlhfkit.models.reward import load_for_scoring, score_texts
    from rlhfkit.rollout.generate import generate_k

    model, tokenizer = load_causal_lm(ModelConfig(name_or_path=policy))
    groups = [[g.text for g in group] for group in generate_k(model, tokenizer, prompts, k, sampling, seed=seed)]
    scorer, scorer_tokenizer = load_for_scoring(reward_model)
    rewards = iter(score_texts(scorer, scorer_tokenizer, [p for p, group in zip(prompts, groups, strict=True)
                                                          for _ in group],
                               [text for group in groups for text in group], batch_size=64))
    result = gold_pairwise_accuracy(task, prompts, groups, [[next(rewards) for _ in group] for group in groups])
    return {**result, "labeler/accuracy": labeler_gold_accuracy(task, prompts, groups, seed=seed),
            "labeler/inter_agreement": inter_labeler_agreement(task, prompts, groups, seed=seed)}
