"""The trial side of a sweep: Tune's function trainable (``run_trial``) and the actor that runs
one trial's pipeline (``PipelineHost``).

Each trial runs the WHOLE stage DAG (``pipeline(cfg, output, ...).run()``, by default
``stages.runner.PipelineRun``, which launches its own Ray Train fits and Ray Data jobs) with the
trial's values applied to the experiment config, in its own run directory
``DIR/trials/<trial id>/``. The pipeline reports to Tune after every evaluate(t) stage with
``tasks_learned = t`` as the time attribute, so ASHA can stop bad trials after a few tasks. The
pipeline class reaches the trial as an object (``tune.with_parameters``, which cloudpickles it:
a class is pickled by reference, so its module must be importable in Ray's workers).

Resources: a trial's function does no work itself; it starts its pipeline in a 0-CPU actor on the
same node and relays the evaluations to Tune. Tune places each trial's function in a placement
group that *captures* child tasks, so a pipeline started inside that function would have its
untyped tasks (e.g. the base stage's pre-training task) squeezed into the trial's bundle;
running it in an actor with its own scheduling strategy escapes that. The trial therefore
requests no CPU (``tune.cpus_per_trial: 0``; Tune refuses an empty bundle, so the request is a
token 1 MiB of the ``memory`` resource) and the stages request what they use (Train workers:
``train.cpus_per_worker``; Ray Data decode/eval: ``eval.cpus_per_actor`` ...). Reserving a CPU for
the idle trial function instead starves Ray Data on a 2-CPU machine (measured on the project's
2-CPU machines).

Stopping: after each evaluation but the last the pipeline blocks until Tune has taken the report
(Tune's function API is synchronous; a trial's pipeline therefore never overlaps evaluate(t) with
train(t+1), see ``PipelineRun.run``); the last evaluation is reported once the pipeline has
written its results. When ASHA stops a trial, nothing is running in its pipeline (no Train worker
group, no Ray Data actor pool): the trial function kills its pipeline actor and the sweep driver
marks the MLflow runs it left open KILLED. Killing a trial in the middle of a Ray Train fit is
what leaked CPUs before (measured on the project's 2-CPU machines): Train v2 removes a dead controller's worker
placement group through a detached cleaner that polls the State API, which is unavailable without
the dashboard ("Failed to query Ray Train Controller actor state"), so the group stayed reserved.
"""

from __future__ import annotations

import json
import math
import threading
from pathlib import Path
from typing import Any

from pipeline.config import config_from_dict
from stages.tune.objective import report_metrics, resolve_objective
from stages.tune.space import Param, apply_values

TRIALS_DIR = "trials"


def trial_dir(sweep_dir: Path | str, trial_id: str) -> Path:
    return Path(sweep_dir) / TRIALS_DIR / trial_id


def trial_dirname(trial: Any) -> str:
    """Tune's folder of a trial is named by its id (the same id names DIR/trials/<id>)."""
    return trial.trial_id


class PipelineHost:
    """Runs one trial's pipeline (a ``PipelineRun``-like class) in its own actor. After every
    evaluation the pipeline waits until the trial function has handed that report to Tune
    (``ack``), so a trial that Tune stops is stopped between stages, with no Train or Ray Data
    workers alive."""

    def __init__(self, cfg: dict[str, Any], output: str, parent_run_id: str | None, pipeline: Any) -> None:
        self._cfg, self._output, self._parent, self._pipeline = cfg, output, parent_run_id, pipeline
        self._run: Any = None
        self._events: list[tuple[int, dict[str, Any]]] = []
        self._acked = 0
        self._cond = threading.Condition()

    def run(self) -> dict[str, Any]:
        """Run (or resume) the pipeline; returns its results dict."""
        import ray

        ctx = ray.data.DataContext.get_current()  # as stages.runner.init_ray does for its driver
        ctx.execution_options.preserve_order = True
        ctx.enable_progress_bars = False
        cfg = config_from_dict(self._cfg)
        self._run = self._pipeline(cfg, Path(self._output), log=lambda m: print(m, flush=True),
                                   on_evaluated=self._on_evaluated, mlflow_parent=self._parent)
        return self._run.run()

    def _on_evaluated(self, t: int, metrics: dict[str, Any]) -> None:
        """Publish evaluation t; unless it is the last one, wait until it was reported."""
        metrics = dict(metrics) | train_losses(self._run, t)
        with self._cond:
            self._events.append((t, metrics))
            n = len(self._events)
            self._cond.notify_all()
            if t < len(self._cfg["tasks"]):
                self._cond.wait_for(lambda: self._acked >= n)

    def next_event(self, index: int, timeout: float) -> tuple[int, dict[str, Any]] | None:
        """Evaluation number ``index`` (0-based) once it happened, or None after ``timeout`` s."""
        with self._cond:
            self._cond.wait_for(lambda: len(self._events) > index, timeout=timeout)
            return self._events[index] if len(self._events) > index else None

    def ack(self, index: int) -> None:
        """Evaluation ``index`` was reported: let the pipeline go on."""
        with self._cond:
            self._acked = max(self._acked, index + 1)
            self._cond.notify_all()


def train_losses(run: Any, t: int) -> dict[str, float]:
    """``train_loss`` (mean over the tasks learned so far of each train stage's final loss) and
    ``train_loss_last`` (the latest one), read from the completed train stages' markers."""
    stages = [s for s in getattr(run, "stages", []) if s.kind == "train" and s.task_index < t]
    losses = []
    for stage in sorted(stages, key=lambda s: s.task_index):
        marker = run.rundir.marker(stage.id)
        loss = json.loads(marker.read_text()).get("result", {}).get("final_loss") if marker.exists() else None
        if isinstance(loss, (int, float)) and math.isfinite(loss):
            losses.append(float(loss))
    return {"train_loss": sum(losses) / len(losses), "train_loss_last": losses[-1]} if losses else {}


def _start_host(cfg: dict[str, Any], output: Path, parent_run_id: str | None, pipeline: Any) -> Any:
    """The trial's pipeline actor: 0 CPU, pinned to this node, NOT in the trial's placement group
    (an explicit scheduling strategy escapes Tune's child-task capture)."""
    import ray
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    node = ray.get_runtime_context().get_node_id()
    actor_cls = ray.remote(PipelineHost).options(
        num_cpus=0, max_concurrency=4, max_restarts=0,
        scheduling_strategy=NodeAffinitySchedulingStrategy(node_id=node, soft=False),
    )
    return actor_cls.remote(cfg, str(output), parent_run_id, pipeline)


def run_trial(config: dict[str, Any], sweep: dict[str, Any], pipeline: Any) -> None:
    """Tune's function trainable: one whole pipeline run, reporting after every evaluation.
    ``sweep`` is ``Sweep.payload()``; ``pipeline`` the class each trial runs.

    Every report but the last is made while the pipeline waits between stages (a stop there
    leaves nothing running); the last one only once the pipeline has finished (results written),
    so a scheduler's decision at the final report cannot cut the run short."""
    import ray
    from ray import tune

    params = [Param.from_dict(d) for d in sweep["params"]]
    objective = resolve_objective(sweep["objective"])
    tree = apply_values(sweep["base"], {p.path: config[p.key] for p in params if p.key in config})
    tree["tracking"] = {**tree.get("tracking", {}), **sweep["tracking"]}
    n_tasks = len(tree["tasks"])
    output = trial_dir(sweep["directory"], tune.get_context().get_trial_id())
    host = _start_host(tree, output, sweep["parent_run_id"], pipeline)
    done_ref = host.run.remote()
    try:
        index = 0
        while True:
            event = ray.get(host.next_event.remote(index, 2.0))
            if event is None:
                if ray.wait([done_ref], timeout=0)[0]:
                    break
                continue
            t, metrics = event
            if t >= n_tasks:
                ray.get(done_ref)  # the last evaluation: let the pipeline finish first
            tune.report(report_metrics(t, metrics, objective, n_tasks))  # blocks until Tune continues
            host.ack.remote(index)
            index += 1
            if t >= n_tasks:
                break
        ray.get(done_ref)  # a pipeline error fails the trial
    finally:
        ray.kill(host, no_restart=True)
