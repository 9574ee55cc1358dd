"""Win rates judged by people: A/B pairs for the feedback app, and the verdicts it exports.

The loop: :func:`ab_pairs` turns a run's samples (``samples/<model>.jsonl``, one completion per held-out
prompt and model) into A/B records; ``rlhfkit feedback import --kind ab`` loads them into the app,
where labelers judge which output is better; ``rlhfkit export --kind ab`` writes their verdicts;
:func:`human_win_rates` turns those into win rates with bootstrap intervals, as for the gold judge.

Each pair shows the two outputs in a random order (recorded in ``meta.models``), so a labeler who prefers
the left output does not favour either model.
"""

from __future__ import annotations

import random
from collections import defaultdict
from collections.abc import Iterable, Mapping, Sequence

from rlhfkit.data.records import DataError
from rlhfkit.evaluate.metrics import win_rate

VERDICTS = ("a", "b", "tie")


def ab_pairs(samples: Mapping[str, Sequence[dict]], models: Sequence[str], baseline: str, *,
             seed: int = 0) -> list[dict]:
    """One A/B record per prompt and model: the model's completion and the baseline's, in a random order.

    ``samples[name]`` holds ``{"prompt", "completion"}`` rows in the same prompt order for every model (as
    ``rlhfkit eval`` and the pipeline write them). Returns ``{"id", "prompt", "completions": [a, b],
    "meta": {"models": [name_a, name_b]}}`` records.
    """
    for name in (*models, baseline):
        if name not in samples:
            raise ValueError(f"no samples of {name!r} (have: {', '.join(sorted(samples))})")
    rng = random.Random(seed)
    records = []
    for name in models:
        if name == baseline:
            raise ValueError(f"{name!r} is the baseline; compare other models with it")
        if len(samples[name]) != len(samples[baseline]):
            raise ValueError(f"{name!r} has {len(samples[name])} samples, {baseline!r} {len(samples[baseline])}")
        for index, (ours, theirs) in enumerate(zip(samples[name], samples[baseline], strict=True)):
            if ours["prompt"] != theirs["prompt"]:
                raise ValueError(f"sample {index + 1} of {name!r} and of {baseline!r} answer different prompts")
            pair = [(name, ours["completion"]), (baseline, theirs["completion"])]
            rng.shuffle(pair)
            records.append({"id": f"{name}-vs-{baseline}-{index + 1}", "prompt": ours["prompt"],
                            "completions": [text for _, text in pair], "meta": {"models": [m for m, _ in pair]}})
    return records


def human_win_rates(verdicts: Iterable[dict], baseline: str, *, source: str = "<verdicts>",
                    seed: int = 0) -> dict[str, dict]:
    """Win rate of every model against ``baseline`` from A/B verdicts (``rlhfkit export --kind ab``).

    Each verdict (``"a"``, ``"b"`` or ``"tie"``, by one labeler on one pair) counts once; a tie counts
    half. Pairs that do not involve the baseline are ignored. Returns ``{model: win_rate(...)}`` with
    :func:`~rlhfkit.evaluate.metrics.win_rate`'s fields.
    """
    outcomes: dict[str, list[float]] = defaultdict(list)
    for line, record in enumerate(verdicts, start=1):
        models = (record.get("meta") or {}).get("models")
        if not (isinstance(models, list) and len(models) == 2 and all(isinstance(m, str) for m in models)):
            raise DataError("expected meta.models: the two models' names, in display order", source=source,
                            line=line, field="meta")
        verdict = record.get("verdict")
        if verdict not in VERDICTS:
            raise DataError(f"expected one of {VERDICTS}, got {verdict!r}", source=source, line=line,
                            field="verdict")
        if baseline not in models or models[0] == models[1]:
            continue
        other = models[1 - models.index(baseline)]
        winner = None if verdict == "tie" else models["ab".index(verdict)]
        outcomes[other].append(0.5 if winner is None else float(winner == other))
    return {name: win_rate(scores, [1.0 - s for s in scores], seed=seed) for name, scores in outcomes.items()}
