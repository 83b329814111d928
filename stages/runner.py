"""One pipeline run, the thin orchestrator: the run directory, the MLflow parent run, Ray start-up,
the stage DAG (``stages.dag``) executed with the stage kinds' modules (``stages.kinds``), and the
results (``stages.results``)."""

from __future__ import annotations

import os
import signal
import sys
import threading
import time
from pathlib import Path
from typing import Any, Callable

import ray

from pipeline.config import REPO_ROOT, ConfigError, ExperimentConfig, config_from_dict
from stages import dag as dagmod
from stages.common import data_source
from stages.context import RunContext
from stages.kinds import STAGE_KINDS
from stages.results import RunResults, format_results  # noqa: F401 - format_results: the CLI's import
from stages.rundir import RunDir, git_commit
from pipeline.methods.protocol import SEQUENTIAL
from stages.schedules import schedule_for
from stages.tracking import Tracker, flatten


def print_line(msg: str) -> None:
    """A pipeline line: one write per line (``print`` writes the text and the newline separately,
    so Ray's log monitor thread could put a worker's line in between), also into the run's log."""
    from stages.logs import emit

    emit(msg)


def default_output(cfg: ExperimentConfig) -> Path:
    """Same config => same directory, so re-running the same command resumes the run."""
    return REPO_ROOT / "runs" / f"{cfg.name}-{cfg.fingerprint()}"


def method_schedule(cfg: ExperimentConfig) -> str:
    from pipeline.methods.registry import UnknownMethod, method_class

    try:
        return method_class(cfg.method.name).schedule
    except UnknownMethod as exc:
        raise ConfigError(f"method.name: {exc}") from None


RUN_STOP_NOTICE = "stopped by SIGTERM: re-run the same command to resume (completed stages are kept)"


def _say_on_sigterm(notice: str) -> None:
    """Print ``notice`` on stderr the moment SIGTERM (e.g. ``ray job stop``) arrives, then let
    Ray's driver handler (``ray.init`` installs one: ``sys.exit(15)``) stop the run. Printing any
    later is too late: Ray aborts the driver about 3 s after the signal (stages.dag), before the
    run has closed its Train workers and MLflow runs and before an ``except SystemExit`` in the
    CLI is reached. Main thread only (``signal`` allows no other); installed once per process."""
    if threading.current_thread() is not threading.main_thread():
        return
    previous = signal.getsignal(signal.SIGTERM)
    if getattr(previous, "stop_notice", None) is not None:
        previous.stop_notice = notice
        return

    def handler(signum, frame):
        print(handler.stop_notice, file=sys.stderr, flush=True)
        if callable(previous):
            previous(signum, frame)
        else:
            raise SystemExit(signum)

    handler.stop_notice = notice
    signal.signal(signal.SIGTERM, handler)


def init_ray(cfg: ExperimentConfig, stop_notice: str = RUN_STOP_NOTICE, verbose: bool = False) -> None:
    """Connect to a running cluster (``ray job submit`` / RAY_ADDRESS) or start Ray in-process.
    On the driver's main thread, SIGTERM then prints ``stop_notice`` (how to resume) at once.
    ``verbose``: the workers' output is forwarded to the terminal (else it stays in Ray's logs)."""
    # Ray Train v2's controller polls its workers every 2 s by default; each of the 8+ fits of a
    # run pays that latency at start and end, so poll faster (the workers are local or few).
    os.environ.setdefault("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "0.5")
    # Its print patch tees a worker's print to both stdout and the Train logger, and both reach the
    # driver: every progress line appeared twice.
    os.environ.setdefault("RAY_TRAIN_ENABLE_PRINT_PATCH", "0")
    if not ray.is_initialized():
        if os.environ.get("RAY_ADDRESS"):
            ray.init(log_to_driver=verbose)
        else:  # always a fresh local instance: never attach to another Ray running on the machine
            ray.init(
                address="local",
                num_cpus=cfg.resources.num_cpus or os.cpu_count(),
                object_store_memory=cfg.resources.object_store_mb * 1024 * 1024,
                include_dashboard=False,
                log_to_driver=verbose,
                runtime_env={"env_vars": {"PYTHONPATH": str(REPO_ROOT)},
                             "worker_process_setup_hook": "pipeline.process_env.quiet_local_ray_worker"},
                # Ray kills an idle task worker after 1 s once the node has more worker processes
                # than this limit (default: the CPU count), and actors count too. A run keeps more
                # actors than 2 CPUs alive, so every image-decode task started a fresh Python
                # process; keep idle task workers instead (they are few: decode tasks are small).
                _system_config={"num_workers_soft_limit": 64},
            )
        _say_on_sigterm(stop_notice)
    # Also inside Ray actors/tasks (e.g. a Tune trial), where Ray is already initialised.
    ctx = ray.data.DataContext.get_current()
    ctx.execution_options.preserve_order = True
    ctx.enable_progress_bars = False


def _run_demand(cfg: ExperimentConfig) -> tuple[float, float]:
    """(CPUs, GPUs) a run holds at its busiest: the Train worker group, the inference actors and
    one decode task at once."""
    tr, ev = cfg.train, cfg.eval
    cpus = tr.num_workers * tr.cpus_per_worker + ev.concurrency * ev.cpus_per_actor + cfg.resources.decode_cpus
    gpus = tr.num_workers * tr.gpus_per_worker + ev.concurrency * ev.gpus_per_actor
    return cpus, gpus


def _fits_beside(cfg: ExperimentConfig, cluster: dict[str, float]) -> tuple[bool, str]:
    """Whether the Train worker group, the inference actors and one decode task fit at once."""
    tr, ev = cfg.train, cfg.eval
    cpus, gpus = _run_demand(cfg)
    have_cpu, have_gpu = cluster.get("CPU", 0.0), cluster.get("GPU", 0.0)
    if cpus > have_cpu + 1e-9 or gpus > have_gpu + 1e-9:
        return False, (f"training ({tr.num_workers} x {tr.cpus_per_worker:g} CPU, {tr.gpus_per_worker:g} GPU) + "
                       f"evaluation ({ev.concurrency} x {ev.cpus_per_actor:g} CPU, {ev.gpus_per_actor:g} GPU) + a decode "
                       f"task ({cfg.resources.decode_cpus:g} CPU) need {cpus:g} CPU / {gpus:g} GPU; the cluster has "
                       f"{have_cpu:g} / {have_gpu:g}")
    return True, f"{cpus:g} of {have_cpu:g} CPUs, {gpus:g} of {have_gpu:g} GPUs"


def overlap_plan(cfg: ExperimentConfig, cluster: dict[str, float]) -> tuple[bool, str]:
    """Whether evaluate(t) may run beside train(t+1) on a cluster with ``cluster`` resources
    (``ray.cluster_resources()``), and why. Both stages' long-lived holders (Train workers,
    inference actors) plus one decode task must fit, or the two Ray Data pipelines could wait on
    each other for CPUs forever."""
    if not cfg.resources.overlap_evaluate:
        return False, "resources.overlap_evaluate is off"
    ok, why = _fits_beside(cfg, cluster)
    return ok, (f"evaluate(t) runs beside train(t+1) ({why})" if ok else why)


def resident_plan(cfg: ExperimentConfig, cluster: dict[str, float], schedule: str, *, trial: bool
                  ) -> tuple[bool, str]:
    """Whether one resident Ray Train worker group trains all the tasks (``ResidentTrainer``),
    and why. Its workers keep their resources while freeze and evaluate stages run, so the same
    room as for the overlap is needed; a Ray Tune trial keeps one fit per stage (its resources
    are sized per stage)."""
    if not cfg.resources.resident_train:
        return False, "resources.resident_train is off"
    if schedule != SEQUENTIAL or len(cfg.tasks) < 2:
        return False, f"a {schedule} run with {len(cfg.tasks)} task(s) has at most one train stage"
    if trial:
        return False, "a sweep trial runs one fit per train stage"
    ok, why = _fits_beside(cfg, cluster)
    return ok, (f"one Ray Train worker group trains every task ({why})" if ok else why)


def inference_plan(cfg: ExperimentConfig, cluster: dict[str, float], *, trial: bool) -> tuple[bool, str]:
    """Whether the evaluate stages' inference actors stay for the whole run, and why. They keep
    their resources while train stages run, so the same room as for the overlap is needed; a Ray
    Tune trial starts them per stage (trials share the cluster)."""
    if not cfg.resources.resident_eval:
        return False, "resources.resident_eval is off"
    if trial:
        return False, "a sweep trial starts them per evaluate stage"
    ok, why = _fits_beside(cfg, cluster)
    return ok, (f"the base models load once per run ({why})" if ok else why)


def isolation_plan(cfg: ExperimentConfig, cluster: dict[str, float]) -> tuple[int, str]:
    """How many of the isolation row's one-task runs go side by side, and why: as many as the
    cluster holds at once (each holds what a run holds at its busiest, ``_run_demand``), capped by
    ``resources.isolation_parallel`` (0: no cap) and the number of tasks."""
    n, cap = len(cfg.tasks), cfg.resources.isolation_parallel
    cpus, gpus = _run_demand(cfg)
    have_cpu, have_gpu = cluster.get("CPU", 0.0), cluster.get("GPU", 0.0)
    fit = int((have_cpu + 1e-9) // cpus) if cpus > 0 else n
    if gpus > 0:
        fit = min(fit, int((have_gpu + 1e-9) // gpus))
    k = max(1, min(n, fit, cap or n))
    why = f"each holds {cpus:g} CPU / {gpus:g} GPU, the cluster has {have_cpu:g} / {have_gpu:g}"
    if cap and cap < min(n, fit):
        why += f"; resources.isolation_parallel={cap}"
    return k, why


def run_alone(raw: dict[str, Any], output: str | Path, parent: str | None, verbose: bool,
              log: Callable[[str], None]) -> float:
    """One task of the isolation row: its one-task run (resumable in ``output``), its score."""
    sub = PipelineRun(config_from_dict(raw), Path(output), log=log, mlflow_parent=parent, verbose=verbose)
    return float(sub.run()["matrix"][0][0])


class AloneRun:
    """``run_alone`` in its own Ray actor (0 CPU: its stages request what they use), so that
    several go side by side. Returns the score and the run's progress lines."""

    def run(self, raw: dict[str, Any], output: str, parent: str | None, verbose: bool) -> tuple[float, list[str]]:
        lines: list[str] = []
        return run_alone(raw, output, parent, verbose, lines.append), lines


class PipelineRun:
    def __init__(
        self,
        cfg: ExperimentConfig,
        output: Path | None = None,
        log: Callable[[str], None] | None = None,
        *,
        on_evaluated: Callable[[int, dict[str, float]], None] | None = None,
        mlflow_parent: str | None = None,
        verbose: bool = False,
    ):
        """``on_evaluated(t, metrics)`` is called after every evaluate stage (t = tasks learned,
        1-based; metrics = acc/<task> plus the metrics "so far"), e.g. to report to Ray Tune.
        ``mlflow_parent`` nests this run's MLflow parent run under another run (a sweep).
        ``verbose``: Ray's own logs on the terminal too (else only in the run's log file)."""
        self.cfg = cfg
        self.on_evaluated = on_evaluated
        self.mlflow_parent = mlflow_parent
        self.verbose = verbose
        self.output = Path(output) if output else default_output(cfg)
        self.log = log or print_line
        self.schedule = method_schedule(cfg)
        self.stages = dagmod.build_dag(cfg, self.schedule)

    def run(self) -> dict[str, Any]:
        t_start = time.time()
        cfg = self.cfg
        rundir = RunDir.open(self.output, name=cfg.name, fingerprint=cfg.fingerprint(), config=cfg.to_dict(),
                             repo=REPO_ROOT, log=self.log, extends=cfg.extension_view)
        from stages.logs import capture_logs

        self._logs = capture_logs(rundir.root, verbose=self.verbose)
        tracker = Tracker(rundir.root, uri=cfg.tracking.uri, experiment=cfg.tracking.experiment or cfg.name)
        commit = git_commit(REPO_ROOT)
        parent = tracker.start_parent(
            run_name=rundir.root.name,
            params={**flatten(cfg.to_dict()), "git_commit": commit, "schedule": self.schedule},
            tags={"method": cfg.method.name, "run_dir": str(rundir.root), "git_commit": commit,
                  **({"mlflow.parentRunId": self.mlflow_parent} if self.mlflow_parent else {})},
            completed=rundir.completed,
        )
        self.log(f"run directory: {rundir.root}")
        self.log(f"MLflow: {tracker.uri} (experiment {tracker.experiment!r}, run {parent})")
        init_ray(cfg, verbose=self.verbose)
        self._logs.quiet_more()
        self._logs.quiet_ray_notices()
        ctx = RunContext(cfg=cfg, rundir=rundir, tracker=tracker, schedule=schedule_for(self.schedule),
                         stages=self.stages, source=data_source(cfg), log=self.log, on_evaluated=self.on_evaluated)
        ctx.results = RunResults(ctx)
        self.ctx, self.rundir, self.tracker = ctx, rundir, tracker
        overlap, why = overlap_plan(cfg, ray.cluster_resources())
        if overlap and self.on_evaluated is not None:  # e.g. a Ray Tune trial
            # each evaluation is reported before the next task trains, so that a scheduler
            # (ASHA) stopping the trial there saves that training
            overlap, why = False, "this run reports every evaluation before the next task trains (a sweep trial)"
        self.log(("overlap: " if overlap else "no overlap: ") + why)
        ctx.resident_ok, why = resident_plan(cfg, ray.cluster_resources(), self.schedule,
                                             trial=self.on_evaluated is not None)
        self.log(("resident train workers: " if ctx.resident_ok else "a fit per train stage: ") + why)
        ctx.inference_resident, why = inference_plan(cfg, ray.cluster_resources(), trial=self.on_evaluated is not None)
        self.log(("resident inference actors: " if ctx.inference_resident else "inference actors per evaluate stage: ")
                 + why)
        ok, outcome = False, "failed"
        try:
            markers = dagmod.DagExecutor(self.stages, self._run_stage, rundir=rundir, tracker=tracker,
                                         on_done=self._on_done, log=self.log,
                                         background={"evaluate"} if overlap else ()).run()
            ctx.close_inference()  # before the isolation sub-runs, which start their own
            isolation = self._isolation_row(tracker, parent) if cfg.eval.isolation else None
            results = ctx.results.finish(markers, t_start, isolation)
            ok, outcome = True, "finished"
            return results
        except (KeyboardInterrupt, SystemExit):
            outcome = "stopped"
            raise
        finally:
            # first: after SIGTERM, Ray aborts the driver ~3 s later, and closing the resident
            # workers can take longer
            try:
                rundir.record_invocation(started=t_start, wall_s=time.time() - t_start, outcome=outcome)
            except OSError as exc:  # e.g. a full disk: the run's own outcome matters more
                self.log(f"could not record this command's wall time in {rundir.root}: {exc}")
            try:
                ctx.close_inference()
                if ctx.resident is not None:  # a failed run does not wait long for a job in progress
                    ctx.resident.close(timeout=120.0 if ok else 10.0)
                    ctx.resident = None
            finally:
                tracker.end(parent, ok=ok)
                self._logs.close()

    def _isolation_row(self, tracker: Tracker, parent: str) -> list[float] | None:
        """A0 of FWT: each task trained alone from the base by the same method and evaluated on
        its own test set, a one-task run per task in ``<run dir>/isolation/<task>/`` (resumable,
        tracked under this run in MLflow). The tasks are independent: as many go side by side,
        each in its own actor, as the cluster holds at once (``isolation_plan``); one at a time
        they run in this process."""
        cfg = self.cfg
        if not schedule_for(self.schedule).is_continual():
            self.log(f"eval.isolation: {cfg.method.name} does not learn task after task; no isolation row")
            return None
        subs = []
        for task in cfg.tasks:
            raw = cfg.to_dict()
            raw["tasks"], raw["eval"]["isolation"], raw["tracking"]["uri"] = [task], False, tracker.uri
            subs.append((task, raw, self.rundir.root / "isolation" / task))
        k, why = isolation_plan(cfg, ray.cluster_resources())
        self.log(f"isolation row: {len(subs)} one-task run(s) from the base, {k} at a time ({why})")
        if k == 1:
            row = []
            for i, (task, raw, out) in enumerate(subs):
                self.log(f"isolation row {i + 1}/{len(subs)}: {task} trained alone from the base")
                row.append(run_alone(raw, out, parent, self.verbose,
                                     lambda line, task=task: self.log(f"  [alone {task}] {line}")))
            return row
        return self._isolation_side_by_side(subs, k, parent)

    def _isolation_side_by_side(self, subs: list[tuple[str, dict[str, Any], Path]], k: int, parent: str) -> list[float]:
        """Up to ``k`` one-task runs at once, each in an ``AloneRun`` actor; a run's progress lines
        are printed, prefixed with its task, when it ends. After a failure no new one starts, the
        running ones finish (each is resumable on its own), then the first error is raised."""
        host = ray.remote(num_cpus=0)(AloneRun)
        queue, pending = list(enumerate(subs)), {}
        row: list[float | None] = [None] * len(subs)
        errors: list[tuple[str, BaseException]] = []
        while pending or (queue and not errors):
            while queue and not errors and len(pending) < k:
                i, (task, raw, out) = queue.pop(0)
                actor = host.remote()
                pending[actor.run.remote(raw, str(out), parent, self.verbose)] = (i, task, actor)
                self.log(f"isolation row {i + 1}/{len(subs)}: {task} trained alone from the base (started)")
            (ref,), _ = ray.wait(list(pending), num_returns=1)
            i, task, actor = pending.pop(ref)
            try:
                row[i], lines = ray.get(ref)
                for line in lines:
                    self.log(f"  [alone {task}] {line}")
            except Exception as exc:  # noqa: BLE001 - re-raised below, after the others finished
                errors.append((task, exc))
                self.log(f"  [alone {task}] failed: {str(exc).splitlines()[0] if str(exc) else type(exc).__name__}")
            finally:
                ray.kill(actor)
        if errors:
            task, exc = errors[0]
            raise RuntimeError(f"isolation row: the one-task run of {task} failed (rerun the command to resume it)") from exc
        return [float(v) for v in row]

    def _run_stage(self, stage: dagmod.Stage, stage_dir: Path, run_id: str) -> dict[str, Any]:
        return STAGE_KINDS[stage.kind].run(self.ctx, stage, stage_dir, run_id)

    def _on_done(self, stage: dagmod.Stage, marker: dict[str, Any], skipped: bool) -> None:
        done = getattr(STAGE_KINDS[stage.kind], "done", None)
        if done is not None:
            done(self.ctx, stage, marker, skipped)
