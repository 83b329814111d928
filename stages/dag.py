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

import json
import queue
import threading
import time
import traceback
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Collection

from pipeline.config import ExperimentConfig


@dataclass
class Stage:
    id: str
    kind: str  # "data" | "base" | "train" | "freeze" | "evaluate"
    deps: list[str] = field(default_factory=list)
    task_index: int | None = None  # index into the experiment's task list (0-based)
    tasks: list[str] = field(default_factory=list)  # tasks trained (train/freeze) or evaluated

    def describe(self) -> str:
        what = f" [{', '.join(self.tasks)}]" if self.tasks else ""
        deps = f"  <- {', '.join(self.deps)}" if self.deps else ""
        return f"{self.id:<28} {self.kind:<9}{what}{deps}"


def build_dag(cfg: ExperimentConfig, schedule: str) -> list[Stage]:
    """The stages of one run in execution order (a topological order of the DAG)."""
    stages = [Stage("00-data", "data", tasks=list(cfg.tasks)), Stage("01-base", "base", deps=["00-data"])]
    tasks = list(cfg.tasks)
    if schedule == "none":
        stages.append(Stage("02-eval-all", "evaluate", deps=["01-base"], tasks=tasks, task_index=len(tasks) - 1))
        return stages
    if schedule == "joint":
        stages += [
            Stage("02-train-joint", "train", deps=["01-base"], tasks=tasks, task_index=0),
            Stage("03-freeze-joint", "freeze", deps=["02-train-joint"], tasks=tasks, task_index=0),
            Stage("04-eval-joint", "evaluate", deps=["03-freeze-joint"], tasks=tasks, task_index=len(tasks) - 1),
        ]
        return stages
    if schedule != "sequential":
        raise ValueError(f"unknown method schedule {schedule!r}")
    prev = "01-base"
    n = 2
    for t, task in enumerate(tasks):
        tr, fr, ev = (f"{n:02d}-train-{task}", f"{n + 1:02d}-freeze-{task}", f"{n + 2:02d}-eval-{task}")
        stages.append(Stage(tr, "train", deps=[prev], tasks=[task], task_index=t))
        stages.append(Stage(fr, "freeze", deps=[tr], tasks=[task], task_index=t))
        stages.append(Stage(ev, "evaluate", deps=[fr], tasks=tasks[: t + 1], task_index=t))
        prev, n = fr, n + 3
    return stages


def describe_dag(stages: list[Stage]) -> str:
    return "\n".join(s.describe() for s in stages)


class StageFailed(RuntimeError):
    pass


def execute(
    stages: list[Stage],
    run_one: Callable[[Stage, Path, str], dict[str, Any]],
    *,
    rundir,
    tracker,
    on_done: Callable[[Stage, dict[str, Any], bool], None],
    log: Callable[[str], None] = print,
    background: Collection[str] = (),
) -> dict[str, dict[str, Any]]:
    """Run the stages in list order. A complete stage (verified marker) is skipped; any other is run
    in a fresh directory inside its own nested MLflow run. Returns {stage id: marker}.

    Stages whose kind is in ``background`` (the evaluate stages, which nothing else depends on but
    their own reports) run one at a time on a background thread, so that evaluate(t) overlaps
    train(t+1); every other stage runs on the calling thread. A stage waits for all its
    dependencies, wherever they run. ``on_done`` is always called on the calling thread and in
    list order (evaluate(t) is reported before anything after it), whichever stage finished first.
    After a failure no new stage starts; the stages already running finish (their outputs and
    markers are kept) and the first error is raised. After SIGTERM (``SystemExit``) they are
    abandoned instead (see ``_stopping_message``).
    """
    markers: dict[str, dict[str, Any]] = {}
    finished: dict[str, bool] = {}  # stage id -> skipped, for stages whose marker is in ``markers``
    order = {s.id: i for i, s in enumerate(stages)}
    reported = 0  # stages[:reported] have had on_done
    results: queue.Queue = queue.Queue()  # (stage, marker or exception) from the background thread
    jobs: queue.Queue = queue.Queue()  # background stages to run, None = stop
    worker: threading.Thread | None = None
    in_flight: set[str] = set()
    failure: BaseException | None = None

    def run_and_mark(stage: Stage) -> dict[str, Any]:
        i = order[stage.id] + 1
        log(f"[{i}/{len(stages)}] {stage.id}: running" + (" (in the background)" if stage.kind in background else ""))
        stage_dir = rundir.begin(stage.id)
        run_id = tracker.start_stage(stage.id, tags={"kind": stage.kind, "tasks": ",".join(stage.tasks)})
        t0 = time.time()
        try:
            result = run_one(stage, stage_dir, run_id) | {"mlflow_run_id": run_id}
        except BaseException as exc:
            (stage_dir / "ERROR.txt").write_text("".join(traceback.format_exception(exc)))
            tracker.set_tag(run_id, "error", f"{type(exc).__name__}: {exc}"[:4000])
            tracker.end(run_id, ok=False)
            raise
        wall = time.time() - t0
        marker = rundir.complete(stage.id, wall_s=wall, result=result)
        tracker.log_metrics(run_id, {"stage_wall_s": wall})
        tracker.log_artifact(run_id, stage_dir / "DONE.json")
        tracker.end(run_id, ok=True)
        log(f"[{i}/{len(stages)}] {stage.id}: done in {wall:.1f}s " + json.dumps(_short(result)))
        return marker

    def background_loop() -> None:
        failed = False
        while (stage := jobs.get()) is not None:
            if failed:  # queued before the calling thread saw the failure: not started
                results.put((stage, None))
                continue
            try:
                results.put((stage, run_and_mark(stage)))
            except BaseException as exc:  # reported to the calling thread, which stops the run
                results.put((stage, exc))
                failed = True

    def collect(block: bool) -> None:
        nonlocal failure
        while in_flight:
            try:  # a timeout keeps the wait interruptible (Ctrl-C)
                stage, out = results.get(timeout=1.0) if block else results.get_nowait()
            except queue.Empty:
                if block:
                    continue
                return
            in_flight.discard(stage.id)
            if isinstance(out, BaseException):
                failure = failure or out
            elif out is not None:
                markers[stage.id], finished[stage.id] = out, False
            block = False  # after one blocking wait, take only what is already there

    def report() -> None:
        nonlocal reported
        while reported < len(stages) and stages[reported].id in finished:
            stage = stages[reported]
            # after the stage's own run ended: a sweep may stop the trial here
            on_done(stage, markers[stage.id], finished[stage.id])
            reported += 1

    try:
        for i, stage in enumerate(stages, 1):
            collect(block=False)
            report()
            while failure is None and any(d in in_flight for d in stage.deps):
                collect(block=True)
                report()
            if failure is not None:
                break
            missing = [d for d in stage.deps if d not in markers]
            if missing:
                raise StageFailed(f"stage {stage.id}: dependencies {missing} did not complete")
            done = rundir.completed(stage.id)
            if done is not None:
                log(f"[{i}/{len(stages)}] {stage.id}: complete (outputs verified), skipped")
                markers[stage.id], finished[stage.id] = done, True
                report()
                continue
            if stage.kind in background:
                if worker is None:
                    worker = threading.Thread(target=background_loop, name="stages-background", daemon=True)
                    worker.start()
                in_flight.add(stage.id)
                jobs.put(stage)
                continue
            try:
                markers[stage.id], finished[stage.id] = run_and_mark(stage), False
            except BaseException as exc:
                failure = exc
                break
            report()
        if failure is not None and in_flight:
            log(_stopping_message(failure, sorted(in_flight)))
        # the stages already running finish, also after a failure, but not after SIGTERM: see
        # _stopping_message
        while in_flight and not isinstance(failure, SystemExit):
            collect(block=True)
        report()
    finally:
        if worker is not None:
            jobs.put(None)
    if failure is not None:
        raise failure
    return markers


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


def _short(result: dict[str, Any]) -> dict[str, Any]:
    return {k: (round(v, 3) if isinstance(v, float) else v) for k, v in result.items()
            if isinstance(v, (int, float, str)) and k != "mlflow_run_id"}
