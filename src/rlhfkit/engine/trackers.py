"""Experiment trackers (``train.report_to``): TensorBoard, Weights & Biases, MLflow and trackio, through accelerate.

``metrics.jsonl`` is always written (:mod:`rlhfkit.engine.metrics`); a run that lists trackers sends the same
records to each through accelerate's tracker integration: the ``Accelerator`` is made with ``log_with`` (and, for
TensorBoard, a logging directory in the run directory: ``<run>/tensorboard/<project>/``),
:meth:`Trackers.start` is ``init_trackers`` with the resolved config, :meth:`Trackers.log` is
``accelerator.log``. Sampled completions (PPO's ``samples_to_log``) go to a table where the tracker has one
(:meth:`Trackers.table`: a ``wandb.Table``, a ``trackio.Table``, ``mlflow.log_table``; TensorBoard gets them as
a Markdown table in its text tab).

Names: the project is ``train.project`` (default ``rlhfkit``; a pipeline's stages get its ``out_dir`` name), the
run ``train.run_name`` (default the run directory's name, so a pipeline's runs are named by stage). Where each
tracker writes is its own default, set with its environment variables: ``WANDB_MODE=offline`` and ``WANDB_DIR``
(default: the run directory), ``MLFLOW_TRACKING_URI`` (a ``file:`` URI for a local store), ``TRACKIO_DIR``.

A resumed run continues the tracker runs it started (their ids are kept in ``trackers.json`` in the run directory):
the W&B run and the MLflow run by id, the trackio run by name. A run that starts afresh starts new ones.
"""

from __future__ import annotations

import contextlib
import importlib.util
import json
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from accelerate import Accelerator

from rlhfkit.config import ConfigError

#: the module each tracker needs: tracker name -> importable module (the extra is named after the tracker)
TRACKER_MODULES = {"tensorboard": "tensorboard", "wandb": "wandb", "mlflow": "mlflow", "trackio": "trackio"}
#: where TensorBoard writes inside the run directory (accelerate adds the project below it)
TENSORBOARD_DIR = "tensorboard"
#: the ids of the tracker runs a run started, read back when it resumes
TRACKERS_FILE = "trackers.json"
DEFAULT_PROJECT = "rlhfkit"


def check_trackers(names: Sequence[str], key: str = "train.report_to") -> None:
    """Stop with a :class:`~rlhfkit.config.ConfigError` naming ``key`` when a listed tracker's package is missing."""
    for name in names:
        if importlib.util.find_spec(TRACKER_MODULES[name]) is None:
            raise ConfigError(f"{key}: {name} needs `pip install rlhfkit[{name}]` (its package is not installed)")


def accelerator_options(names: Sequence[str], run_dir: Path) -> dict[str, Any]:
    """The ``Accelerator`` arguments that enable ``names``: ``log_with`` and the logging directory TensorBoard
    needs (none without trackers, so a run without them makes the accelerator it always made)."""
    if not names:
        return {}
    from accelerate.utils import ProjectConfiguration

    logging = ProjectConfiguration(project_dir=str(run_dir), logging_dir=str(run_dir / TENSORBOARD_DIR))
    return {"log_with": list(names), "project_config": logging}


def flat_config(tree: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    """A nested config as one level of ``section.key`` names whose values every tracker takes as a hyperparameter
    (a bool, number, string or None; a list as its JSON text)."""
    flat: dict[str, Any] = {}
    for name, value in tree.items():
        if isinstance(value, Mapping):
            flat.update(flat_config(value, f"{prefix}{name}."))
        elif value is None or isinstance(value, (bool, int, float, str)):
            flat[f"{prefix}{name}"] = value
        else:
            flat[f"{prefix}{name}"] = json.dumps(value)
    return flat


class Trackers:
    """The trackers of one run (``train.report_to``), on the run's accelerator; nothing without any.

    Every method may be called on every process: only process 0 writes.
    """

    def __init__(self, accelerator: Accelerator, names: Sequence[str], run_dir: Path, *, stage: str,
                 project: str | None, run_name: str | None):
        self.accelerator, self.names, self.run_dir, self.stage = accelerator, list(names), run_dir, stage
        self.project = project or DEFAULT_PROJECT
        self.run_name = run_name or run_dir.resolve().name
        self.started = False

    def start(self, config: Mapping[str, Any], *, resumed: bool) -> None:
        """``init_trackers`` with the flattened ``config``; a ``resumed`` run continues its tracker runs (MLflow's
        keeps the parameters it started with: MLflow cannot change one)."""
        if not self.names:
            return
        ids = self._ids() if resumed else {}
        wandb_dir = os.environ.get("WANDB_DIR", str(self.run_dir))
        init_kwargs: dict[str, dict[str, Any]] = {
            "wandb": {"name": self.run_name, "tags": [self.stage], "dir": wandb_dir,
                      **({"id": ids["wandb"], "resume": "allow"} if "wandb" in ids else {})},
            "mlflow": {"run_name": self.run_name, "tags": {"stage": self.stage},
                       **({"run_id": ids["mlflow"]} if "mlflow" in ids else {})},
            "trackio": {"name": ids.get("trackio", self.run_name), **({"resume": "allow"} if "trackio" in ids else {})},
        }
        if "wandb" in self.names:
            Path(wandb_dir).mkdir(parents=True, exist_ok=True)
        self.accelerator.init_trackers(self.project, init_kwargs={name: kwargs for name, kwargs in init_kwargs.items()
                                                                  if name in self.names})
        hyperparameters = flat_config(config)
        for tracker in self.accelerator.trackers:  # accelerate's config=..., but MLflow's params are written once
            if not (resumed and tracker.name == "mlflow"):  # (a resumed run may have changed train.max_steps)
                tracker.store_init_configuration(hyperparameters)
        self.started = True
        if self.accelerator.is_main_process:
            (self.run_dir / TRACKERS_FILE).write_text(json.dumps(self._started_ids(), indent=2), encoding="utf-8")

    def log(self, step: int, record: Mapping[str, float]) -> None:
        """``accelerator.log`` of one record of ``metrics.jsonl`` (process 0)."""
        if self.started and record:
            self.accelerator.log(dict(record), step=step)

    def table(self, name: str, rows: Sequence[Mapping[str, Any]], step: int) -> None:
        """Log ``rows`` (dicts with the same keys, e.g. prompt, completion, score) as table ``name`` at ``step``
        to every tracker that has tables (process 0)."""
        if not (self.started and rows and self.accelerator.is_main_process):
            return
        columns = list(rows[0])
        data = [[row.get(column) for column in columns] for row in rows]
        for tracker in self.accelerator.trackers:
            if tracker.name == "wandb":
                tracker.log_table(name, columns=columns, data=data, step=step)
            elif tracker.name == "trackio":
                import trackio

                tracker.log({name: trackio.Table(columns=columns, data=data)}, step=step)
            elif tracker.name == "mlflow":
                import mlflow

                mlflow.log_table({column: [row[i] for row in data] for i, column in enumerate(columns)},
                                 artifact_file=f"{name}/step-{step:06d}.json")
            elif tracker.name == "tensorboard":
                tracker.log({name: _markdown_table(columns, data)}, step=step)

    def finish(self) -> None:
        """Close every tracker run (accelerate's ``end_training`` without its ``destroy_process_group``: a
        pipeline's next stage runs in the same processes); also those of a :meth:`start` that failed half-way."""
        trackers, self.accelerator.trackers, self.started = self.accelerator.trackers, [], False
        for tracker in trackers:
            with contextlib.suppress(AttributeError):  # a tracker whose start failed has no run to close
                tracker.finish()

    def _ids(self) -> dict[str, str]:
        path = self.run_dir / TRACKERS_FILE
        return json.loads(path.read_text(encoding="utf-8")) if path.exists() else {}

    def _started_ids(self) -> dict[str, str]:
        ids = {}
        for tracker in self.accelerator.trackers:
            if tracker.name == "wandb":
                ids["wandb"] = tracker.run.id
            elif tracker.name == "mlflow":
                ids["mlflow"] = tracker.active_run.info.run_id
            elif tracker.name == "trackio":
                ids["trackio"] = tracker.run.name
        return ids


def _markdown_table(columns: Sequence[str], data: Sequence[Sequence[Any]]) -> str:
    def cell(value: Any) -> str:
        text = f"{value:.4g}" if isinstance(value, float) else str(value)
        return text.replace("|", "\\|").replace("\n", " ")

    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(cell(value) for value in row) + " |" for row in data]
    return "\n".join(lines)
