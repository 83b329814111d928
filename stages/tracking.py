"""MLflow tracking for a pipeline run: one parent run per pipeline run, one nested run per stage.

All logging happens in the driver process through one ``MlflowClient``, one call at a time
(SQLite stores lock under concurrent writers, and an evaluate stage logs from a background thread
while a training stage logs its progress). The default store is local to the run directory:
``sqlite:///DIR/mlflow.db`` with artifacts under ``DIR/mlartifacts``; ``MLFLOW_TRACKING_URI`` (or
``tracking.uri``) points it elsewhere. A resumed run re-attaches to the same parent run (its id is kept in ``DIR/mlflow.json``);
stage runs a killed driver left RUNNING are then marked KILLED.
"""

from __future__ import annotations

import functools
import json
import os
import re
import threading
import time
from pathlib import Path
from typing import Any, Callable, Iterable

from mlflow.entities import Metric, Param, RunStatus
from mlflow.tracking import MlflowClient

from pipeline.redaction import redact, strip_tracking_credentials
from stages.artifacts import DONE_FILE

_SECRET = re.compile(r"(secret|password|token|access_key|credential)", re.I)


EXPERIMENT_KIND_TAG, EXPERIMENT_KIND = "mlflow.experimentKind", "custom_model_development"


def flatten(tree: dict[str, Any], prefix: str = "") -> dict[str, str]:
    """Nested config -> {"train.lr": "0.003", ...}; keys that look like secrets are dropped and
    credentials inside values (a URL's password, ...) masked."""
    out: dict[str, str] = {}
    for key, value in tree.items():
        name = f"{prefix}{key}"
        if _SECRET.search(name):
            continue
        if isinstance(value, dict):
            out.update(flatten(value, name + "."))
        else:
            out[name] = redact(json.dumps(value) if isinstance(value, (list, tuple)) else str(value))
    return out


def tracking_uri_for(run_root: Path, configured: str | None) -> str:
    """``MLFLOW_TRACKING_URI``, else ``tracking.uri``, else SQLite in the run directory. Credentials
    in the environment's URI move to MLflow's credential variables (``pipeline.redaction``), and
    the variable is set to the clean URI, for MLflow and for the processes the run starts."""
    env = os.environ.get("MLFLOW_TRACKING_URI")
    if env:
        os.environ["MLFLOW_TRACKING_URI"] = env = strip_tracking_credentials(env)
    return env or configured or f"sqlite:///{run_root / 'mlflow.db'}"  # a loaded config's URI is clean


def _serialised(method):
    @functools.wraps(method)
    def call(self, *args, **kwargs):
        with self._lock:
            return method(self, *args, **kwargs)

    return call


class Tracker:
    """Thin, explicit wrapper over MlflowClient for the pipeline's parent/stage runs (thread-safe:
    every call holds the tracker's lock)."""

    def __init__(self, run_root: Path, *, uri: str | None, experiment: str):
        self.run_root = Path(run_root)
        self.uri = tracking_uri_for(self.run_root, uri)
        self._lock = threading.RLock()
        self.client = MlflowClient(tracking_uri=self.uri)
        exp = self.client.get_experiment_by_name(experiment)
        if exp is None:
            location = None
            if self.uri.startswith("sqlite:///") and not os.environ.get("MLFLOW_TRACKING_URI"):
                location = (self.run_root / "mlartifacts").resolve().as_uri()
            self.experiment_id = self.client.create_experiment(experiment, artifact_location=location)
        else:
            self.experiment_id = exp.experiment_id
        # the MLflow UI opens an experiment by its kind; without the tag it guesses "GenAI"
        # (Evaluations, Traces). This is model training; a kind set by the user is kept.
        if exp is None or EXPERIMENT_KIND_TAG not in (exp.tags or {}):
            self.client.set_experiment_tag(self.experiment_id, EXPERIMENT_KIND_TAG, EXPERIMENT_KIND)
        self.experiment = experiment
        self.parent_id: str | None = None
        self._state_file = self.run_root / "mlflow.json"

    # --- runs ---------------------------------------------------------------------------------
    @_serialised
    def start_parent(self, run_name: str, params: dict[str, str], tags: dict[str, str],
                     completed: Callable[[str], dict[str, Any] | None] | None = None) -> str:
        """The run's parent MLflow run: the one recorded in ``DIR/mlflow.json`` when the run
        resumes (``completed``: the stage id -> its verified completion marker or None, see
        ``_close_abandoned_stages``), else a new one."""
        state = json.loads(self._state_file.read_text()) if self._state_file.exists() else {}
        if state.get("parent_run_id") and state.get("tracking_uri") == self.uri:
            self.parent_id = state["parent_run_id"]
            self.client.update_run(self.parent_id, status="RUNNING")
            self._close_abandoned_stages(completed)
            return self.parent_id
        run = self.client.create_run(self.experiment_id, run_name=run_name, tags=tags)
        self.parent_id = run.info.run_id
        self.log_params(self.parent_id, params)
        self._state_file.write_text(json.dumps({"parent_run_id": self.parent_id, "tracking_uri": self.uri}))
        return self.parent_id

    def _close_abandoned_stages(self, completed: Callable[[str], dict[str, Any] | None] | None) -> None:
        """On resume: a stage run still RUNNING belongs to a driver that was killed (the run
        directory's lock rules out a live one, ``RunDir.open``). If the stage completed (its
        marker verifies: the driver died between the marker and the run's end), the run gets what
        the driver did not log (``stage_wall_s``, the marker) and ends FINISHED: the stage is not
        run again. Otherwise it is marked KILLED, so that the UI does not show it running forever
        beside the re-run's stage run."""
        stale = self.client.search_runs(
            [self.experiment_id],
            filter_string=f"tags.mlflow.parentRunId = '{self.parent_id}' and attributes.status = 'RUNNING'",
            max_results=1000,
        )
        for run in stale:
            stage = run.data.tags.get("stage")
            if stage is None:  # e.g. a sweep's trial runs: Tune resumes those itself
                continue
            try:
                marker = completed(stage) if completed is not None else None
            except Exception:  # damaged outputs: the DAG reports them when it reaches the stage
                marker = None
            if marker is not None:
                if "stage_wall_s" not in run.data.metrics:
                    self.client.log_metric(run.info.run_id, "stage_wall_s", float(marker["wall_s"]))
                self.client.log_dict(run.info.run_id, marker, DONE_FILE)
                self.client.set_tag(run.info.run_id, "finalised",
                                    "its driver ended after the stage completed; finished on resume")
                self.client.set_terminated(run.info.run_id, status=RunStatus.to_string(RunStatus.FINISHED))
                continue
            self.client.set_tag(run.info.run_id, "stopped",
                                "its driver ended while the stage ran; the stage is re-run on resume")
            self.client.set_terminated(run.info.run_id, status=RunStatus.to_string(RunStatus.KILLED))

    @_serialised
    def has_metric_at(self, run_id: str, key: str, step: int) -> bool:
        """Whether ``key`` was already logged at ``step`` (a resumed run does not log it again)."""
        return any(m.step == step for m in self.client.get_metric_history(run_id, key))

    @_serialised
    def start_stage(self, stage_id: str, tags: dict[str, str] | None = None) -> str:
        assert self.parent_id, "start_parent first"
        run = self.client.create_run(
            self.experiment_id,
            run_name=stage_id,
            tags={"mlflow.parentRunId": self.parent_id, "stage": stage_id, **(tags or {})},
        )
        return run.info.run_id

    @_serialised
    def end(self, run_id: str, ok: bool = True) -> None:
        status = RunStatus.to_string(RunStatus.FINISHED if ok else RunStatus.FAILED)
        self.client.set_terminated(run_id, status=status)

    # --- logging ------------------------------------------------------------------------------
    @_serialised
    def log_params(self, run_id: str, params: dict[str, str]) -> None:
        items = [Param(k, v[:6000]) for k, v in params.items()]
        for i in range(0, len(items), 100):
            self.client.log_batch(run_id, params=items[i : i + 100])

    @_serialised
    def log_metrics(self, run_id: str, metrics: dict[str, float], step: int | None = None) -> None:
        ts = int(time.time() * 1000)
        items = [Metric(k, float(v), ts, step or 0) for k, v in metrics.items() if v is not None]
        for i in range(0, len(items), 500):
            self.client.log_batch(run_id, metrics=items[i : i + 500])

    @_serialised
    def log_metric_series(self, run_id: str, rows: Iterable[dict[str, Any]], step_key: str = "step") -> None:
        ts = int(time.time() * 1000)
        items = [
            Metric(k, float(v), ts, int(row[step_key]))
            for row in rows
            for k, v in row.items()
            if k != step_key and isinstance(v, (int, float))
        ]
        for i in range(0, len(items), 500):
            self.client.log_batch(run_id, metrics=items[i : i + 500])

    @_serialised
    def log_artifact(self, run_id: str, path: Path, artifact_path: str | None = None) -> None:
        path = Path(path)
        if path.is_dir():
            self.client.log_artifacts(run_id, str(path), artifact_path)
        else:
            self.client.log_artifact(run_id, str(path), artifact_path)

    @_serialised
    def set_tag(self, run_id: str, key: str, value: str) -> None:
        self.client.set_tag(run_id, key, value)
