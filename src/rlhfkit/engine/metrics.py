"""``metrics.jsonl``: one JSON object per logged step; reading it back; the means of a logging window.

Reading needs nothing but the standard library (the report imports :func:`read_metrics`).
"""

from __future__ import annotations

import json
import time
from pathlib import Path

METRICS_FILE = "metrics.jsonl"


def read_metrics(run_dir: str | Path) -> list[dict]:
    """All records of a run's ``metrics.jsonl``."""
    path = Path(run_dir) / METRICS_FILE
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


def truncate_step_log(path: Path, step: int) -> None:
    """Keep the records of a JSONL file of step records (``metrics.jsonl``, PPO's ``samples.jsonl``) up to
    ``step``, the step a run resumes at: what a run wrote after its last checkpoint is written again.
    A run that starts afresh (``step`` 0) keeps none, its evaluation before the first step included."""
    if not path.exists():
        return
    kept = [line for line in path.read_text(encoding="utf-8").splitlines()
            if step > 0 and line.strip() and json.loads(line).get("step", 0) <= step]
    path.write_text("".join(line + "\n" for line in kept), encoding="utf-8")


class MetricsLog:
    """Appends one JSON object per logged step to ``metrics.jsonl`` in the run directory."""

    def __init__(self, run_dir: Path, stage: str):
        self.path = run_dir / METRICS_FILE
        self.stage = stage

    def write(self, step: int, metrics: dict[str, float]) -> None:
        record = {"stage": self.stage, "step": step, "time": round(time.time(), 3), **metrics}
        with self.path.open("a", encoding="utf-8") as handle:
            handle.write(json.dumps(record) + "\n")


class MetricsWindow:
    """The mean of each metric over the reports that carry it since the last :meth:`means`.

    A metric missing from a report is not counted as zero (KTO's rewards of desirable completions are
    absent from a micro-batch without any).
    """

    def __init__(self):
        self.totals: dict[str, float] = {}
        self.counts: dict[str, int] = {}

    def add(self, metrics: dict[str, float]) -> None:
        for name, value in metrics.items():
            self.totals[name] = self.totals.get(name, 0.0) + float(value)
            self.counts[name] = self.counts.get(name, 0) + 1

    def means(self) -> dict[str, float]:
        """The means, in the order the metrics were first reported; the window starts again empty."""
        means = {name: total / self.counts[name] for name, total in self.totals.items()}
        self.totals, self.counts = {}, {}
        return means
