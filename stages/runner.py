"""One pipeline run: resolve the run directory and MLflow runs, build the stage DAG, execute it,
and write ``results.json`` (matrix, metrics, MLflow ids, wall time per stage)."""

from __future__ import annotations

import json
import os
import signal
import sys
import threading
import time
from collections import defaultdict
from pathlib import Path
from typing import Any, Callable

import ray

from pipeline.config import REPO_ROOT, ConfigError, ExperimentConfig
from pipeline.data.coin import load_records, read_dataset
from pipeline.data.metrics import all_metrics
from stages import dag as dagmod
from stages.common import BaseModels, data_source
from stages.figures import heatmap
from stages.rundir import RunDir, git_commit, write_json_atomic
from stages.tracking import Tracker, flatten


def print_line(msg: str) -> None:
    """One write per line: ``print`` writes the text and the newline separately, so Ray's log
    monitor thread could put a worker's line in between (two stage lines ran together)."""
    print(msg + "\n", end="", flush=True)


def default_output(cfg: ExperimentConfig) -> Path:
    """Same config => same directory, so re-running the same command resumes the run."""
    return REPO_ROOT / "runs" / f"{cfg.name}-{cfg.fingerprint()}"


def method_schedule(cfg: ExperimentConfig) -> str:
    from pipeline.methods.base import _REGISTRY, _import_builtin_methods

    _import_builtin_methods()
    if cfg.method.name not in _REGISTRY:
        raise ConfigError(f"method.name: unknown continual method {cfg.method.name!r}; registered: {sorted(_REGISTRY)}")
    return getattr(_REGISTRY[cfg.method.name], "schedule")


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


def init_ray(cfg: ExperimentConfig, stop_notice: str = RUN_STOP_NOTICE) -> None:
    """Connect to a running cluster (``ray job submit`` / RAY_ADDRESS) or start Ray in-process.
    On the driver's main thread, SIGTERM then prints ``stop_notice`` (how to resume) at once."""
    # Ray Train v2's controller polls its workers every 2 s by default; each of the 8+ fits of a
    # run pays that latency at start and end, so poll faster (the workers are local or few).
    os.environ.setdefault("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "0.5")
    # Its print patch tees a worker's print to both stdout and the Train logger, and both reach the
    # driver: every progress line appeared twice.
    os.environ.setdefault("RAY_TRAIN_ENABLE_PRINT_PATCH", "0")
    if not ray.is_initialized():
        if os.environ.get("RAY_ADDRESS"):
            ray.init(log_to_driver=True)
        else:  # always a fresh local instance: never attach to another Ray running on the machine
            ray.init(
                address="local",
                num_cpus=cfg.resources.num_cpus or os.cpu_count(),
                object_store_memory=cfg.resources.object_store_mb * 1024 * 1024,
                include_dashboard=False,
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


def _fits_beside(cfg: ExperimentConfig, cluster: dict[str, float]) -> tuple[bool, str]:
    """Whether the Train worker group, the inference actors and one decode task fit at once."""
    tr, ev = cfg.train, cfg.eval
    cpus = tr.num_workers * tr.cpus_per_worker + ev.concurrency * ev.cpus_per_actor + cfg.resources.decode_cpus
    gpus = tr.num_workers * tr.gpus_per_worker + ev.concurrency * ev.gpus_per_actor
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
    if schedule != "sequential" or len(cfg.tasks) < 2:
        return False, f"a {schedule} run with {len(cfg.tasks)} task(s) has at most one train stage"
    if trial:
        return False, "a sweep trial runs one fit per train stage"
    ok, why = _fits_beside(cfg, cluster)
    return ok, (f"one Ray Train worker group trains every task ({why})" if ok else why)


class PipelineRun:
    def __init__(
        self,
        cfg: ExperimentConfig,
        output: Path | None = None,
        log: Callable[[str], None] | None = None,
        *,
        on_evaluated: Callable[[int, dict[str, float]], None] | None = None,
        mlflow_parent: str | None = None,
    ):
        """``on_evaluated(t, metrics)`` is called after every evaluate stage (t = tasks learned,
        1-based; metrics = acc/<task> plus the metrics "so far"), e.g. to report to Ray Tune.
        ``mlflow_parent`` nests this run's MLflow parent run under another run (a sweep)."""
        self.cfg = cfg
        self.on_evaluated = on_evaluated
        self.mlflow_parent = mlflow_parent
        self.output = Path(output) if output else default_output(cfg)
        self.log = log or print_line
        self.schedule = method_schedule(cfg)
        self.stages = dagmod.build_dag(cfg, self.schedule)
        self.matrix: dict[int, list[float]] = {}
        self.base: BaseModels | None = None
        self._test_rows: dict[str, list[dict[str, Any]]] = {}

    # --- driver ---------------------------------------------------------------------------------
    def run(self) -> dict[str, Any]:
        t_start = time.time()
        cfg = self.cfg
        self.rundir = RunDir.open(self.output, name=cfg.name, fingerprint=cfg.fingerprint(),
                                  config=cfg.to_dict(), repo=REPO_ROOT)
        self.tracker = Tracker(self.rundir.root, uri=cfg.tracking.uri, experiment=cfg.tracking.experiment or cfg.name)
        commit = git_commit(REPO_ROOT)
        self.parent = self.tracker.start_parent(
            run_name=self.rundir.root.name,
            params={**flatten(cfg.to_dict()), "git_commit": commit, "schedule": self.schedule},
            tags={"method": cfg.method.name, "run_dir": str(self.rundir.root), "git_commit": commit,
                  **({"mlflow.parentRunId": self.mlflow_parent} if self.mlflow_parent else {})},
        )
        self.log(f"run directory: {self.rundir.root}")
        self.log(f"MLflow: {self.tracker.uri} (experiment {self.tracker.experiment!r}, run {self.parent})")
        init_ray(cfg)
        self.source = data_source(cfg)
        overlap, why = overlap_plan(cfg, ray.cluster_resources())
        if overlap and self.on_evaluated is not None:  # e.g. a Ray Tune trial
            # each evaluation is reported before the next task trains, so that a scheduler
            # (ASHA) stopping the trial there saves that training
            overlap, why = False, "this run reports every evaluation before the next task trains (a sweep trial)"
        self.log(("overlap: " if overlap else "no overlap: ") + why)
        self._resident_ok, why = resident_plan(cfg, ray.cluster_resources(), self.schedule,
                                               trial=self.on_evaluated is not None)
        self.log(("resident train workers: " if self._resident_ok else "a fit per train stage: ") + why)
        self._resident = None
        ok, outcome = False, "failed"
        try:
            markers = dagmod.execute(self.stages, self._run_stage, rundir=self.rundir, tracker=self.tracker,
                                     on_done=self._on_done, log=self.log,
                                     background={"evaluate"} if overlap else ())
            results = self._finish(markers, t_start)
            ok, outcome = True, "finished"
            return results
        except (KeyboardInterrupt, SystemExit):
            outcome = "stopped"
            raise
        finally:
            # first: after SIGTERM, Ray aborts the driver ~3 s later, and closing the resident
            # workers can take longer
            try:
                self.rundir.record_invocation(started=t_start, wall_s=time.time() - t_start, outcome=outcome)
            except OSError as exc:  # e.g. a full disk: the run's own outcome matters more
                self.log(f"could not record this command's wall time in {self.rundir.root}: {exc}")
            try:
                if self._resident is not None:  # a failed run does not wait long for a job in progress
                    self._resident.close(timeout=120.0 if ok else 10.0)
                    self._resident = None
            finally:
                self.tracker.end(self.parent, ok=ok)

    # --- stages ---------------------------------------------------------------------------------
    def _run_stage(self, stage: dagmod.Stage, stage_dir: Path, run_id: str) -> dict[str, Any]:
        from stages import prepare

        if stage.kind == "data":
            result = prepare.run_data_stage(self.cfg, stage_dir, self.log)
            self.tracker.log_artifact(run_id, stage_dir / "data_report.json")
            return result
        if stage.kind == "base":
            self.base, info = prepare.run_base_stage(self.cfg, stage_dir)
            self.tracker.log_metrics(run_id, info)
            return info
        if stage.kind == "train":
            return self._train(stage, stage_dir, run_id)
        if stage.kind == "freeze":
            return self._freeze(stage, stage_dir, run_id)
        if stage.kind == "evaluate":
            return self._evaluate(stage, stage_dir, run_id)
        raise ValueError(f"unknown stage kind {stage.kind}")

    def _stage(self, kind: str, task_index: int) -> dagmod.Stage:
        return next(s for s in self.stages if s.kind == kind and s.task_index == task_index)

    def _pad_color(self) -> tuple[int, int, int] | None:
        """How images become square for this run's base (after the base stage: its folder)."""
        from pipeline.models.build import image_pad_color

        return image_pad_color(self.cfg.model, self.base.lmm_dir if self.base else None)

    def _train_data(self, stage: dagmod.Stage) -> tuple[Any, int, list]:
        cfg = self.cfg
        datasets, n, loads = [], 0, []
        for task in stage.tasks:
            ds, res = read_dataset(self.source, task, "train", image_size=cfg.model.image_size, on_bad=cfg.data.on_bad,
                                   decode_num_cpus=cfg.resources.decode_cpus, pad_color=self._pad_color())
            if cfg.data.max_train_per_task:
                ds = ds.limit(cfg.data.max_train_per_task)
            datasets.append(ds)
            loads.append(res)
            n += min(len(res.rows), cfg.data.max_train_per_task or len(res.rows))
        ds = datasets[0] if len(datasets) == 1 else datasets[0].union(*datasets[1:])
        if self.schedule == "joint":
            ds = ds.random_shuffle(seed=cfg.seed)  # interleave tasks for the joint bound
        return ds, n, loads

    def _start_resident(self, first: dagmod.Stage) -> None:
        """One worker group for this train stage and every later one (all pending on a resume)."""
        from stages.train import ResidentTrainer

        self._resident_data: dict[str, Any] = {}
        for s in self.stages:
            if s.kind == "train" and s.task_index >= first.task_index:
                try:
                    self._resident_data[s.id] = self._train_data(s)
                except Exception as e:  # noqa: BLE001 - raised by that stage, when the run gets there
                    self.log(f"{s.id}: its training data cannot be read ({e}); that stage will fail")
                    self._resident_data[s.id] = e
        datasets = {k: v[0] for k, v in self._resident_data.items() if not isinstance(v, Exception)}
        self._resident = ResidentTrainer(self.cfg, datasets=datasets, storage=self.rundir.root / "ray_train",
                                         log=self.log)
        self.log(f"resident Ray Train worker group {self._resident.name}: {len(self._resident_data)} train stage(s)")

    def _train(self, stage: dagmod.Stage, stage_dir: Path, run_id: str) -> dict[str, Any]:
        from stages.train import TrainJob, run_train_stage, stage_settings

        cfg = self.cfg
        prev = None
        if self.schedule == "sequential" and stage.task_index > 0:
            prev = self.rundir.stage_dir(self._stage("freeze", stage.task_index - 1).id) / "method_state.safetensors"
        task_name = stage.tasks[0] if len(stage.tasks) == 1 else "joint"
        settings = stage_settings(cfg, task_name, self.schedule)
        if cfg.train.per_task or settings.lr_schedule != "constant" or settings.warmup_steps or settings.warmup_ratio:
            self.log(f"{stage.id}: {settings.describe(cfg.train.num_workers)}")
        self.tracker.log_params(run_id, {f"stage_train.{k}": str(v) for k, v in settings.to_dict().items()})
        on_progress = lambda rows: self.tracker.log_metric_series(run_id, rows)  # noqa: E731
        if self._resident_ok:
            if self._resident is None:
                self._start_resident(stage)
            if isinstance(self._resident_data[stage.id], Exception):
                raise self._resident_data[stage.id]
            _, n, loads = self._resident_data[stage.id]
            job = TrainJob(stage_dir, self.stages.index(stage), stage.task_index, task_name, self.schedule, n, prev)
            try:
                result = self._resident.run(job, self.base, on_progress)
            finally:
                last = max(s.task_index for s in self.stages if s.kind == "train")
                if stage.task_index == last:  # free the workers' CPUs for the last evaluation
                    self._resident.close()
                    self._resident = None
        else:
            ds, n, loads = self._train_data(stage)
            result = run_train_stage(
                cfg, stage_dir=stage_dir, stage_index=self.stages.index(stage), task_index=stage.task_index,
                task_name=task_name, schedule=self.schedule, dataset=ds, num_rows=n, base=self.base, prev_state=prev,
                on_progress=on_progress,
            )
        # validation skips plus images that failed to decode while the shards were consumed
        bad = [b.to_dict() for res in loads for b in res.all_bad()]
        if bad:
            (stage_dir / "skipped_records.json").write_text(json.dumps(bad, indent=2))
            self.tracker.log_artifact(run_id, stage_dir / "skipped_records.json")
        result["skipped_records"] = len(bad)
        self.tracker.log_metrics(run_id, {k: v for k, v in result.items() if isinstance(v, (int, float))})
        return result

    def _freeze(self, stage: dagmod.Stage, stage_dir: Path, run_id: str) -> dict[str, Any]:
        from stages.freeze import run_freeze_stage

        train_dir = self.rundir.stage_dir(self._stage("train", stage.task_index).id)
        earlier = {
            s.task_index: self.rundir.stage_dir(s.id) / "manifest.json"
            for s in self.stages if s.kind == "freeze" and s.task_index < stage.task_index
        }
        result = run_freeze_stage(
            stage_dir, trained_state=train_dir / "method_state.safetensors",
            train_meta=json.loads((train_dir / "train_meta.json").read_text()),
            task_index=stage.task_index, task_name=stage.tasks[0] if len(stage.tasks) == 1 else "joint",
            earlier_manifests=earlier,
        )
        self.tracker.log_artifact(run_id, stage_dir / "method_state.safetensors", "state")
        self.tracker.log_artifact(run_id, stage_dir / "manifest.json", "state")
        self.tracker.log_metrics(run_id, {k: v for k, v in result.items() if isinstance(v, (int, float))})
        return result

    def _test_data(self, task: str):
        ds, res = read_dataset(self.source, task, "test", image_size=self.cfg.model.image_size,
                               decode_num_cpus=self.cfg.resources.decode_cpus, pad_color=self._pad_color())
        rows = res.rows
        if self.cfg.data.max_test_per_task:
            ds, rows = ds.limit(self.cfg.data.max_test_per_task), rows[: self.cfg.data.max_test_per_task]
        self._test_rows[task] = rows
        return ds

    def _evaluate(self, stage: dagmod.Stage, stage_dir: Path, run_id: str) -> dict[str, Any]:
        from stages.evaluate import run_evaluate_stage

        datasets = {task: self._test_data(task) for task in stage.tasks}
        state = None
        if self.schedule != "none":
            freeze_index = stage.task_index if self.schedule == "sequential" else 0
            state = self.rundir.stage_dir(self._stage("freeze", freeze_index).id) / "method_state.safetensors"
        out = run_evaluate_stage(self.cfg, stage_dir=stage_dir, tasks=stage.tasks, datasets=datasets,
                                 test_rows=self._test_rows, base=self.base, state=state)
        figs = self._selection_figures(stage, stage_dir)
        self.tracker.log_artifact(run_id, stage_dir / "predictions", "predictions")
        self.tracker.log_artifact(run_id, stage_dir / "scores.json")
        for f in figs:
            self.tracker.log_artifact(run_id, f, "figures")
        self.tracker.log_metrics(run_id, {f"acc/{t}": s for t, s in out["scores"].items()})
        return {"scores": out["scores"], "inference_s": out["inference_s"], "predictions": out["predictions"],
                "infer_loop_s": out.get("infer_loop_s")}

    def _selection_figures(self, stage: dagmod.Stage, stage_dir: Path) -> list[Path]:
        """Selection-frequency and prototype-vs-task similarity matrices (ModalPrompt Fig. 4)."""
        freq, sim, top1 = {}, {}, {}
        n_learned = 0
        for task in stage.tasks:
            lines = [json.loads(x) for x in (stage_dir / "predictions" / f"{task}.jsonl").read_text().splitlines()]
            if not lines or not lines[0]["scores"]:
                return []
            n_learned = len(lines[0]["scores"])
            counts = [0.0] * n_learned
            sums = [0.0] * n_learned
            own = self.cfg.tasks.index(task)
            hits = 0
            for ln in lines:
                for j in ln["selected"]:
                    counts[j] += 1
                sums = [a + b for a, b in zip(sums, ln["scores"])]
                hits += int(bool(ln["selected"]) and ln["selected"][0] == own)
            freq[task] = [c / len(lines) for c in counts]
            sim[task] = [s / len(lines) for s in sums]
            top1[task] = hits / len(lines)
        learned = self.cfg.tasks[:n_learned]
        sel = {"tasks": stage.tasks, "learned": learned, "selection_frequency": [freq[t] for t in stage.tasks],
               "prototype_similarity": [sim[t] for t in stage.tasks], "top1_own_task": top1,
               "top1_own_task_mean": sum(top1.values()) / len(top1)}
        (stage_dir / "selection.json").write_text(json.dumps(sel, indent=2))
        return [
            stage_dir / "selection.json",
            heatmap(sel["selection_frequency"], rows=stage.tasks, cols=learned, fmt="{:.2f}",
                    title="Selection frequency (rows: test task, cols: selected prompts)",
                    path=stage_dir / "selection_frequency.png", xlabel="selected task", ylabel="test task"),
            heatmap(sel["prototype_similarity"], rows=stage.tasks, cols=learned, fmt="{:.2f}",
                    title="Prototype vs task similarity (mean guidance score)",
                    path=stage_dir / "prototype_similarity.png", xlabel="prototype", ylabel="test task"),
        ]

    def _on_done(self, stage: dagmod.Stage, marker: dict[str, Any], skipped: bool) -> None:
        if stage.kind == "base" and self.base is None:
            info = json.loads((self.rundir.stage_dir(stage.id) / "base.json").read_text())
            self.base = BaseModels(lmm_dir=info["lmm_dir"], guide_file=info["guide_file"])
        if stage.kind != "evaluate":
            return
        scores = marker["result"]["scores"]
        t = stage.task_index if self.schedule == "sequential" else len(self.cfg.tasks) - 1
        self.matrix[t] = [scores[task] for task in stage.tasks]
        step = t + 1
        rows = self._matrix_rows()
        metrics = {f"acc/{task}": s for task, s in scores.items()}
        if rows:
            metrics |= {k: v for k, v in all_metrics(rows).items() if isinstance(v, (int, float)) and k != "T"}
        # a stage finished by an earlier invocation has had its metrics logged by it (unless that
        # driver died between the stage's marker and this call): log them once only
        if not (skipped and self.tracker.has_metric_at(self.parent, next(iter(metrics)), step)):
            self.tracker.log_metrics(self.parent, metrics, step=step)
        if self.on_evaluated is not None:
            self.on_evaluated(step, metrics)

    def _matrix_rows(self) -> list[list[float]]:
        if self.schedule != "sequential":
            return []
        rows = []
        for t in range(len(self.cfg.tasks)):
            if t not in self.matrix:
                break
            rows.append(self.matrix[t])
        return rows

    # --- results ---------------------------------------------------------------------------------
    def _finish(self, markers: dict[str, dict[str, Any]], t_start: float) -> dict[str, Any]:
        cfg = self.cfg
        earlier = self.rundir.invocations()  # this one is recorded when run() returns
        this_wall = time.time() - t_start
        wall = sum(inv["wall_s"] for inv in earlier) + this_wall
        tasks = list(cfg.tasks)
        if self.schedule == "sequential":
            matrix = self._matrix_rows()
            metrics = all_metrics(matrix)
        else:  # a single evaluation after joint training / of the base model
            final = self.matrix[len(tasks) - 1]
            matrix = [final]
            metrics = {"last": sum(final) / len(final), "acc": sum(final) / len(final), "last_per_task": final}
        stage_wall = {sid: round(m["wall_s"], 2) for sid, m in markers.items()}
        overhead = {}
        for sid, m in markers.items():
            loop = m["result"].get("train_loop_s") or m["result"].get("infer_loop_s")
            if loop is not None:
                overhead[sid] = round(m["wall_s"] - loop, 2)
        selection = None
        last_eval = [s for s in self.stages if s.kind == "evaluate"][-1]
        sel_file = self.rundir.stage_dir(last_eval.id) / "selection.json"
        if sel_file.exists():
            selection = json.loads(sel_file.read_text())
        results = {
            "method": cfg.method.name, "method_options": cfg.method.options, "schedule": self.schedule,
            "tasks": tasks, "matrix": matrix, "metrics": metrics,
            "mlflow": {"tracking_uri": self.tracker.uri, "experiment": self.tracker.experiment,
                       "run_id": self.parent},
            "stage_wall_s": stage_wall, "stage_overhead_s": overhead, "run_wall_s": round(wall, 2),
            "invocation_wall_s": round(this_wall, 2), "invocations": len(earlier) + 1,
            "run_dir": str(self.rundir.root),
            "top1_own_task": selection["top1_own_task"] if selection else None,
            "top1_own_task_mean": selection["top1_own_task_mean"] if selection else None,
        }
        write_json_atomic(self.rundir.root / "results.json", results)
        (self.rundir.root / "accuracy_matrix.json").write_text(json.dumps({"tasks": tasks, "matrix": matrix}, indent=2))
        csv_rows = ["after," + ",".join(tasks)] + [
            f"{(tasks[i] if self.schedule == 'sequential' else self.schedule)}," + ",".join(f"{v:.2f}" for v in row)
            for i, row in enumerate(matrix)
        ]
        (self.rundir.root / "accuracy_matrix.csv").write_text("\n".join(csv_rows) + "\n")
        row_labels = tasks[: len(matrix)] if self.schedule == "sequential" else [self.schedule]
        heatmap(matrix, rows=row_labels, cols=tasks, title=f"Accuracy matrix ({cfg.method.name})",
                path=self.rundir.root / "accuracy_matrix.png", xlabel="evaluated task", ylabel="after training")
        for name in ("results.json", "accuracy_matrix.json", "accuracy_matrix.csv", "accuracy_matrix.png"):
            self.tracker.log_artifact(self.parent, self.rundir.root / name)
        if sel_file.exists():
            for f in ("selection.json", "selection_frequency.png", "prototype_similarity.png"):
                self.tracker.log_artifact(self.parent, self.rundir.root / "stages" / last_eval.id / f, "figures")
        self.tracker.log_metrics(self.parent, {"run_wall_s": wall}, step=len(earlier) + 1)  # one per command
        return results


def format_results(results: dict[str, Any]) -> str:
    """Human-readable summary: accuracy matrix, metrics, where the MLflow run is."""
    tasks = results["tasks"]
    width = max(len(t) for t in tasks) + 2
    lines = [f"Accuracy matrix ({results['method']}, percent; row = after training task, col = evaluated task)"]
    lines.append(" " * width + "".join(f"{t[:9]:>10}" for t in tasks))
    labels = tasks if results["schedule"] == "sequential" else [results["schedule"]]
    for label, row in zip(labels, results["matrix"]):
        lines.append(f"{label:<{width}}" + "".join(f"{v:>10.2f}" for v in row))
    m = results["metrics"]
    keys = [k for k in ("last", "avg", "B", "M", "acc", "maa", "bwt", "la", "fwt") if k in m]
    lines.append("Metrics: " + ", ".join(f"{k}={m[k]:.2f}" for k in keys))
    if results.get("top1_own_task_mean") is not None:
        lines.append(f"Top-1 selected prompt set is the sample's own task: {100 * results['top1_own_task_mean']:.1f}%")
    ml = results["mlflow"]
    lines.append(f"MLflow run {ml['run_id']} in {ml['tracking_uri']}")
    if ml["tracking_uri"].startswith("sqlite:///"):
        lines.append(f"  view it: mlflow ui --backend-store-uri {ml['tracking_uri']}")
    lines.append(f"results: {results['run_dir']}/results.json")
    return "\n".join(lines)
