"""The stage DAG: an explicit list of stages with dependencies, printed by ``--dry-run`` and
executed by ``execute`` (in list order; evaluate stages may overlap the next training stage).

Sequential methods:  data -> base -> train(1) -> freeze(1) -> eval(1) -> train(2) -> ... ,
                     with freeze(t) -> train(t+1) and freeze(t) -> eval(t).
Joint (multi-task):  data -> base -> train(all) -> freeze(all) -> eval(all)
None (zero-shot):    data -> base -> eval(all)

Every stage writes under ``DIR/stages/<id>/`` and finishes with a verified completion marker;
re-running skips complete stages, so a killed run resumes where it stopped.
"""

from __future__ import annotations

import queue
import threading
import time
import traceback
from pathlib import Path
from typing import Any, Callable, Collection

from pipeline.config import ExperimentConfig
from pipeline.failpoints import failpoint
from stages.artifacts import DONE_FILE, ERROR_FILE
from stages.schedules import Stage, schedule_for


def build_dag(cfg: ExperimentConfig, schedule: str) -> list[Stage]:
    """The stages of one run in execution order (a topological order of the DAG)."""
    tasks = list(cfg.tasks)
    head = [Stage("00-data", "data", tasks=tasks), Stage("01-base", "base", deps=["00-data"])]
    return head + schedule_for(schedule).stages(tasks, first=2, after="01-base")


def describe_dag(stages: list[Stage]) -> str:
    return "\n".join(s.describe() for s in stages)


class StageFailed(RuntimeError):
    pass


class DagExecutor:
    """Runs the stages in list order. A complete stage (verified marker) is skipped; any other is
    run in a fresh directory inside its own nested MLflow run (``run_and_mark``).

    Stages whose kind is in ``background`` (the evaluate stages, which nothing else depends on but
    their own reports) run one at a time on a background thread, so that evaluate(t) overlaps
    train(t+1); every other stage runs on the calling thread. A stage waits for all its
    dependencies, wherever they run. ``on_done`` is always called on the calling thread and in
    list order (evaluate(t) is reported before anything after it), whichever stage finished first.
    After a failure no new stage starts; the stages already running finish (their outputs and
    markers are kept) and the first error is raised. After SIGTERM (``SystemExit``) they are
    abandoned instead (see ``_stopping_message``).
    """

    def __init__(self, stages: list[Stage], run_one: Callable[[Stage, Path, str], dict[str, Any]], *, rundir,
                 tracker, on_done: Callable[[Stage, dict[str, Any], bool], None], log: Callable[[str], None] = print,
                 background: Collection[str] = ()) -> None:
        self.stages, self.run_one, self.rundir, self.tracker = stages, run_one, rundir, tracker
        self.on_done, self.log, self.background = on_done, log, set(background)
        self.markers: dict[str, dict[str, Any]] = {}
        self.finished: dict[str, bool] = {}  # stage id -> skipped, for stages whose marker is in markers
        self.order = {s.id: i for i, s in enumerate(stages)}
        self.reported = 0  # stages[:reported] have had on_done
        self.results: queue.Queue = queue.Queue()  # (stage, marker or exception) from the background thread
        self.jobs: queue.Queue = queue.Queue()  # background stages to run, None = stop
        self.worker: threading.Thread | None = None
        self.in_flight: set[str] = set()
        self.failure: BaseException | None = None

    def run_and_mark(self, stage: Stage) -> dict[str, Any]:
        i, n = self.order[stage.id] + 1, len(self.stages)
        self.log(f"[{i}/{n}] {stage.id}: running" + (" (in the background)" if stage.kind in self.background else ""))
        stage_dir = self.rundir.begin(stage.id)
        run_id = self.tracker.start_stage(stage.id, tags={"kind": stage.kind, "tasks": ",".join(stage.tasks)})
        t0 = time.time()
        try:
            result = self.run_one(stage, stage_dir, run_id) | {"mlflow_run_id": run_id}
        except BaseException as exc:
            (stage_dir / ERROR_FILE).write_text("".join(traceback.format_exception(exc)))
            self.tracker.set_tag(run_id, "error", f"{type(exc).__name__}: {exc}"[:4000])
            self.tracker.end(run_id, ok=False)
            raise
        wall = time.time() - t0
        marker = self.rundir.complete(stage.id, wall_s=wall, result=result)
        failpoint(f"marked-{stage.kind}")
        self.tracker.log_metrics(run_id, {"stage_wall_s": wall})
        self.tracker.log_artifact(run_id, stage_dir / DONE_FILE)
        self.tracker.end(run_id, ok=True)
        self.log(f"[{i}/{n}] {stage.id}: done in {wall:.1f}s {_summary(result)}".rstrip())
        return marker

    def _background_loop(self) -> None:
        failed = False
        while (stage := self.jobs.get()) is not None:
            if failed:  # queued before the calling thread saw the failure: not started
                self.results.put((stage, None))
                continue
            try:
                self.results.put((stage, self.run_and_mark(stage)))
            except BaseException as exc:  # reported to the calling thread, which stops the run
                self.results.put((stage, exc))
                failed = True

    def _collect(self, block: bool) -> None:
        while self.in_flight:
            try:  # a timeout keeps the wait interruptible (Ctrl-C)
                stage, out = self.results.get(timeout=1.0) if block else self.results.get_nowait()
            except queue.Empty:
                if block:
                    continue
                return
            self.in_flight.discard(stage.id)
            if isinstance(out, BaseException):
                self.failure = self.failure or out
            elif out is not None:
                self.markers[stage.id], self.finished[stage.id] = out, False
            block = False  # after one blocking wait, take only what is already there

    def _report(self) -> None:
        while self.reported < len(self.stages) and self.stages[self.reported].id in self.finished:
            stage = self.stages[self.reported]
            # after the stage's own run ended: a sweep may stop the trial here
            self.on_done(stage, self.markers[stage.id], self.finished[stage.id])
            self.reported += 1

    def _submit(self, stage: Stage) -> None:
        if self.worker is None:
            self.worker = threading.Thread(target=self._background_loop, name="stages-background", daemon=True)
            self.worker.start()
        self.in_flight.add(stage.id)
        self.jobs.put(stage)

    def run(self) -> dict[str, dict[str, Any]]:
        """Returns {stage id: marker}."""
        try:
            for i, stage in enumerate(self.stages, 1):
                self._collect(block=False)
                self._report()
                while self.failure is None and any(d in self.in_flight for d in stage.deps):
                    self._collect(block=True)
                    self._report()
                if self.failure is not None:
                    break
                missing = [d for d in stage.deps if d not in self.markers]
                if missing:
                    raise StageFailed(f"stage {stage.id}: dependencies {missing} did not complete")
                done = self.rundir.completed(stage.id)
                if done is not None:
                    self.log(f"[{i}/{len(self.stages)}] {stage.id}: complete (outputs verified), skipped")
                    self.markers[stage.id], self.finished[stage.id] = done, True
                    self._report()
                    continue
                if stage.kind in self.background:
                    self._submit(stage)
                    continue
                try:
                    self.markers[stage.id], self.finished[stage.id] = self.run_and_mark(stage), False
                except BaseException as exc:
                    self.failure = exc
                    break
                self._report()
            if self.failure is not None and self.in_flight:
                self.log(_stopping_message(self.failure, sorted(self.in_flight)))
            # the stages already running finish, also after a failure, but not after SIGTERM: see
            # _stopping_message
            while self.in_flight and not isinstance(self.failure, SystemExit):
                self._collect(block=True)
            self._report()
        finally:
            if self.worker is not None:
                self.jobs.put(None)
        if self.failure is not None:
            raise self.failure
        return self.markers


def execute(stages: list[Stage], run_one: Callable[[Stage, Path, str], dict[str, Any]], *, rundir, tracker,
            on_done: Callable[[Stage, dict[str, Any], bool], None], log: Callable[[str], None] = print,
            background: Collection[str] = ()) -> dict[str, dict[str, Any]]:
    """``DagExecutor(...).run()``."""
    return DagExecutor(stages, run_one, rundir=rundir, tracker=tracker, on_done=on_done, log=log,
                       background=background).run()


def _stopping_message(failure: BaseException, in_flight: list[str]) -> str:
    """What happens to the stages still running when the run stops.

    After a stage's error, or Ctrl-C (``KeyboardInterrupt``), they are waited for and kept. SIGTERM
    is different: Ray's driver turns it into ``SystemExit(15)``, and Ray's own fatal-signal handler
    aborts the process about 3 s later whatever Python does (measured with Ray 2.60, whether the
    signal reached the driver alone or its whole process group). Waiting would only promise what
    cannot happen, so the run stops at once and the stages in flight are abandoned.
    """
    if isinstance(failure, SystemExit):
        why = "SIGTERM" if failure.code == 15 else f"SystemExit({failure.code})"
        return (f"stopping on {why}: {in_flight} still running are abandoned (no DONE.json marker); "
                "re-running the command re-runs them")
    if isinstance(failure, KeyboardInterrupt):
        return (f"interrupted: waiting for {in_flight} to finish before stopping (their outputs are kept; "
                "interrupt again to abandon them, they are then re-run on resume)")
    return f"waiting for {in_flight} to finish before stopping (their outputs are kept)"


SUMMARY_KEYS = ("steps", "final_loss", "samples_per_s", "train_records", "test_records", "bad_records", "tensors",
                "frozen_checked", "predictions", "resumed_from_step", "skipped_records")


def _summary(result: dict[str, Any]) -> str:
    """The few numbers of a stage result worth a terminal line (all of it is in DONE.json/MLflow)."""
    parts = [f"{k}={round(v, 3) if isinstance(v, float) else v}" for k in SUMMARY_KEYS
             if isinstance(v := result.get(k), (int, float)) and not (k in ("resumed_from_step", "skipped_records",
                                                                           "bad_records") and not v)]
    scores = result.get("scores")
    if isinstance(scores, dict) and scores:
        parts.append("acc " + " ".join(f"{t}={v:.1f}" for t, v in scores.items()))
    return " ".join(parts)
