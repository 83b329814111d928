"""train(t): Ray Train ``TorchTrainer`` workers train each task, the method's trainable parameters
under DeepSpeed, data from Ray Data shards (the worker side is ``stages/train_worker.py``).

Two ways to run the workers, same seeds and data order (results agree to float round-off):

* ``run_train_stage``: one ``TorchTrainer.fit`` per task (per-stage worker group).
* ``stages.resident.ResidentTrainer``: one ``fit`` whose worker group stays up across the tasks
  of a run (``resources.resident_train``).

A worker that crashes mid-job resumes from the job's last checkpoint (``FailureConfig``).
Progress rows (step, loss, samples/s, lr) are appended by rank 0 to ``progress.jsonl`` in the
stage directory; the driver tails that file into MLflow and the terminal while the fit runs.
"""

from __future__ import annotations

import json
import math
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import ray
from ray.train import CheckpointConfig, DataConfig, FailureConfig, RunConfig, ScalingConfig
from ray.train.torch import TorchTrainer

from pipeline.config import ExperimentConfig, StageTrain
from pipeline.methods.protocol import SEQUENTIAL
from stages.artifacts import META_FILE, PROGRESS_FILE, RAY_TRAIN_DIR, REPLAY_STORE_FILE, SKIPPED_FILE, STATE_FILE
from pipeline.failpoints import failpoint
from stages.common import BaseModels, JsonlTail, load_state, save_state
from stages.datasets import read_dataset
from stages.train_worker import WorkerJob, train_loop_per_worker

@dataclass
class TrainJob:
    """What one train stage asks of the workers (driver side)."""

    stage_dir: Path
    stage_index: int
    task_index: int
    task_name: str
    schedule: str
    num_rows: int
    prev_state: Path | None
    replay_rows: dict[str, list[dict[str, Any]]] = field(default_factory=dict)

    @property
    def id(self) -> str:
        return self.stage_dir.name


def stage_settings(cfg: ExperimentConfig, task_name: str, schedule: str) -> StageTrain:
    """A sequential stage trains one task with that task's settings; a joint stage the global ones."""
    return cfg.stage_train(task_name if schedule == SEQUENTIAL else None)


def total_micro_steps(settings: StageTrain, num_rows: int, world: int) -> int:
    """Micro-batch steps of a stage: ``epochs`` passes over ``num_rows`` rows (or ``max_steps``)."""
    steps_per_epoch = max(1, math.ceil(num_rows / (settings.batch_size * world)))
    return settings.max_steps or max(1, int(round(settings.epochs * steps_per_epoch)))


def lr_schedule(settings: StageTrain, total_steps: int, start_step: int = 0) -> Callable | None:
    """DeepSpeed's ``lr_scheduler`` argument: a callable that builds transformers' schedule
    (``get_scheduler``: linear warm-up, then constant / cosine / linear decay), or DeepSpeed's
    ``WarmupLR`` for a log-rate warm-up, on DeepSpeed's optimizer, stepped by the engine at every
    optimizer step. None for a constant rate without
    warm-up (DeepSpeed then keeps the optimizer's rate, as before schedules existed).

    ``total_steps`` and ``start_step`` count micro-batches; the schedule runs over
    ceil(total_steps / grad_accum) optimizer steps and, for a stage resumed at ``start_step``,
    starts where the interrupted one was."""
    optimizer_steps = max(1, math.ceil(total_steps / settings.grad_accum))
    warmup = settings.warmup_for(optimizer_steps)
    if settings.lr_schedule == "constant" and warmup == 0:
        return None
    name = "constant_with_warmup" if settings.lr_schedule == "constant" else settings.lr_schedule
    done = start_step // settings.grad_accum

    def build(optimizer):
        if settings.warmup_type == "log":  # DeepSpeed's WarmupLR: log-rate warm-up, then constant
            from deepspeed.runtime.lr_schedules import WarmupLR

            scheduler = WarmupLR(optimizer, warmup_min_lr=0.0, warmup_max_lr=settings.lr, warmup_num_steps=warmup,
                                 warmup_type="log")
        else:
            from transformers import get_scheduler

            scheduler = get_scheduler(name, optimizer, num_warmup_steps=warmup, num_training_steps=optimizer_steps)
        with warnings.catch_warnings():  # fast-forwarding before any optimizer.step is intended here
            warnings.filterwarnings("ignore", message=r"Detected call of `lr_scheduler.step\(\)`")
            for _ in range(done):
                scheduler.step()
        return scheduler

    return build


def worker_job(cfg: ExperimentConfig, job: TrainJob, base: BaseModels) -> WorkerJob:
    settings = stage_settings(cfg, job.task_name, job.schedule)
    total = total_micro_steps(settings, job.num_rows, cfg.train.num_workers)
    with open(cfg.resolve_path(cfg.train.deepspeed)) as fh:
        ds_template = json.load(fh)
    return WorkerJob(
        id=job.id, cfg=cfg.to_dict(), base=base.to_dict(), prev_state=str(job.prev_state) if job.prev_state else None,
        task_index=job.task_index, task_name=job.task_name, schedule=job.schedule, stage_index=job.stage_index,
        total_steps=total, deepspeed=ds_template, train=settings.to_dict(),
        progress_file=str(job.stage_dir / PROGRESS_FILE), shuffle_buffer=min(job.num_rows, 1024),
        tasks_done=list(range(job.task_index + 1)) if job.schedule == SEQUENTIAL else [job.task_index],
        replay_rows=job.replay_rows,
    )


def scaling_config(cfg: ExperimentConfig) -> ScalingConfig:
    resources = {"CPU": cfg.train.cpus_per_worker}
    if cfg.train.gpus_per_worker:
        resources["GPU"] = cfg.train.gpus_per_worker
    return ScalingConfig(num_workers=cfg.train.num_workers, use_gpu=cfg.train.gpus_per_worker > 0,
                         resources_per_worker=resources)


def collect_final(checkpoint_dir: Path, job: TrainJob, fit_s: float) -> dict[str, Any]:
    """Copy the job's final checkpoint into its stage directory; the stage result."""
    meta = json.loads((checkpoint_dir / META_FILE).read_text())
    if not meta.get("final") or meta.get("job", job.id) != job.id:
        raise RuntimeError(f"train stage {job.id}: checkpoint {checkpoint_dir} is not this stage's final one "
                           f"(job {meta.get('job')!r}, final {meta.get('final')})")
    tensors = load_state(checkpoint_dir / STATE_FILE)
    save_state(tensors, job.stage_dir / STATE_FILE)
    (job.stage_dir / META_FILE).write_text(json.dumps(meta, indent=2))
    progress = meta["progress"]
    setup = {k: round(v, 2) for k, v in progress.get("setup", {}).items()}
    return {
        **{f"setup/{k}": v for k, v in setup.items()},
        "steps": progress["step"], "final_loss": progress["loss"], "train_loop_s": progress.get("train_loop_s"),
        "samples_per_s": progress.get("samples_per_s"), "fit_s": fit_s, "train_records": job.num_rows,
        "resumed_from_step": progress.get("resumed_from_step", 0),
        **({"peak_mem_gb": progress["peak_mem_gb"]} if "peak_mem_gb" in progress else {}),
    }


def run_train_stage(cfg: ExperimentConfig, *, job: TrainJob, dataset: "ray.data.Dataset", base: BaseModels,
                    on_progress: Callable[[list[dict]], None] | None = None) -> dict[str, Any]:
    """Run one training stage in its own ``fit``; write ``method_state.safetensors`` +
    ``train_meta.json`` into the job's stage directory and return the stage result (steps, final
    loss, loop time, fit time). Re-running a killed stage resumes from its last checkpoint (Ray
    Train restores the fit from ``<stage dir>/ray_train``)."""
    stage_dir = job.stage_dir
    wjob = worker_job(cfg, job, base)
    trainer = TorchTrainer(
        train_loop_per_worker,
        train_loop_config={"job": wjob},
        scaling_config=scaling_config(cfg),
        datasets={"train": dataset},
        dataset_config=DataConfig(datasets_to_split=["train"]),
        run_config=RunConfig(
            name="fit",
            storage_path=str(stage_dir / RAY_TRAIN_DIR),
            failure_config=FailureConfig(max_failures=cfg.train.max_failures),
            checkpoint_config=CheckpointConfig(num_to_keep=2),
        ),
    )
    wjob.fit_started = time.time()
    tail = JsonlTail(stage_dir / PROGRESS_FILE, on_progress)
    t0 = time.time()
    try:
        result = trainer.fit()
    finally:
        tail.close()
    fit_s = time.time() - t0
    if result.checkpoint is None:
        raise RuntimeError(f"train stage for {job.task_name}: Ray Train finished without a checkpoint")
    with result.checkpoint.as_directory() as d:
        return collect_final(Path(d), job, fit_s)


# ----------------------------------------------------------------------------------------------
# The stage
# ----------------------------------------------------------------------------------------------
def train_data(ctx, stage) -> tuple[Any, int, list]:
    """The stage's training data: (Ray Dataset, rows, the LoadResults for skipped-record reports)."""
    cfg = ctx.cfg
    datasets, n, loads = [], 0, []
    for task in stage.tasks:
        ds, res = read_dataset(ctx.source, task, "train", image_size=cfg.model.image_size, on_bad=cfg.data.on_bad,
                               decode_num_cpus=cfg.resources.decode_cpus, pad_color=ctx.pad_color())
        if cfg.data.max_train_per_task:
            ds = ds.limit(cfg.data.max_train_per_task)
        datasets.append(ds)
        loads.append(res)
        n += min(len(res.rows), cfg.data.max_train_per_task or len(res.rows))
    ds = datasets[0] if len(datasets) == 1 else datasets[0].union(*datasets[1:])
    if ctx.schedule.shuffle_union:
        # interleave tasks for the joint bound; its tasks reserve what a decode task does: with the
        # default 1 CPU they never start beside a Train worker and a warm inference actor on 2 CPUs
        ds = ds.random_shuffle(seed=cfg.seed, num_cpus=cfg.resources.decode_cpus)
    return ds, n, loads


def replay_rows(ctx, stage) -> dict[str, list[dict[str, Any]]]:
    """The stored samples a method asks for (``stored_samples``): the first N training records of
    each earlier task (and of the current one for a method with ``replay_current``), images
    decoded. Deterministic in the data, so a resumed stage gets the same store."""
    from pipeline.methods.registry import method_class

    cls = method_class(ctx.cfg.method.name)
    counter = getattr(cls, "stored_samples", None)
    n = int(counter(ctx.cfg.method.options) if counter else getattr(cls, "replay_per_task", 0) or 0)
    upto = stage.task_index + (1 if getattr(cls, "replay_current", False) else 0)
    if not n or not ctx.schedule.is_continual() or not upto:
        return {}
    out = {}
    for task in ctx.cfg.tasks[:upto]:
        ds, _ = read_dataset(ctx.source, task, "train", image_size=ctx.cfg.model.image_size, on_bad=ctx.cfg.data.on_bad,
                             decode_num_cpus=ctx.cfg.resources.decode_cpus, pad_color=ctx.pad_color())
        out[task] = ds.limit(n).take_all()
    return out


PRINT_EVERY_S = 10.0  # a progress line on the terminal at most this often per stage (and at the end)


def _progress_printer(ctx, stage, total: int) -> Callable[[list[dict]], None]:
    last = [time.time()]

    def show(rows: list[dict]) -> None:
        for row in rows:
            if row["step"] == total or time.time() - last[0] >= PRINT_EVERY_S:
                last[0] = time.time()
                ctx.log(f"  [train {stage.task_name}] step {row['step']}/{total} loss {row['loss']:.4f} "
                        f"{row['samples_per_s']:.1f} samples/s lr {row['lr']:.3g}")

    return show


def _start_resident(ctx, first) -> None:
    """One worker group for this train stage and every later one (all pending on a resume)."""
    from stages.resident import ResidentTrainer

    ctx.resident_data, ctx.train_ahead = {}, {}
    streamed = {}
    for s in ctx.stages:
        if s.kind == "train" and s.task_index >= first.task_index:
            try:
                ctx.resident_data[s.id] = train_data(ctx, s)
            except Exception as e:  # noqa: BLE001 - raised by that stage, when the run gets there
                ctx.log(f"{s.id}: its training data cannot be read ({e}); that stage will fail")
                ctx.resident_data[s.id] = e
                continue
            ds, n, _ = ctx.resident_data[s.id]
            if ctx.reserve_decoded(n):
                ctx.train_ahead[s.id] = None  # decoded ahead of its stage (``_decoded_ahead``)
            else:
                streamed[s.id] = ds  # Ray Train streams it to the workers (a split per worker)
    ctx.resident = ResidentTrainer(ctx.cfg, datasets=streamed, storage=ctx.rundir.root / RAY_TRAIN_DIR, log=ctx.log)
    ctx.log(f"resident Ray Train worker group {ctx.resident.name}: {len(ctx.resident_data)} train stage(s), "
            f"{len(ctx.train_ahead)} decoded ahead of their stage")
    _decode_ahead(ctx, first)


def _decode_ahead(ctx, stage) -> None:
    """Start decoding ``stage``'s training data into Ray's object store (on the run's one
    decode-ahead thread), if it is decoded ahead."""
    if stage is None or stage.id not in ctx.train_ahead or ctx.train_ahead[stage.id] is not None:
        return
    ds = ctx.resident_data[stage.id][0]
    ctx.train_ahead[stage.id] = ctx.ahead_executor().submit(ds.materialize)


def _shards(ctx, stage) -> list | None:
    """The stage's decoded training data split per worker (None: Ray Train streams it), and
    the next train stage's decoding started."""
    if stage.id not in ctx.train_ahead:
        return None
    _decode_ahead(ctx, stage)
    data = ctx.train_ahead[stage.id].result()
    later = [s for s in ctx.stages if s.kind == "train" and s.task_index > stage.task_index]
    _decode_ahead(ctx, later[0] if later else None)
    workers = ctx.cfg.train.num_workers
    return [data] if workers == 1 else data.split(workers, equal=True)


def run(ctx, stage, stage_dir: Path, run_id: str) -> dict[str, Any]:
    cfg = ctx.cfg
    prev = ctx.state_of(ctx.schedule.start_state(stage, ctx.stages))
    settings = stage_settings(cfg, stage.task_name, ctx.schedule.name)
    if cfg.train.per_task or settings.lr_schedule != "constant" or settings.warmup_steps or settings.warmup_ratio:
        ctx.log(f"{stage.id}: {settings.describe(cfg.train.num_workers)}")
    ctx.tracker.log_params(run_id, {f"stage_train.{k}": str(v) for k, v in settings.to_dict().items()})
    index = ctx.stages.index(stage)
    if ctx.inference_resident:
        # the inference actors load the base models while this stage trains, not when the
        # first evaluation needs them
        ctx.inference_pool().warm()
    if ctx.resident_ok:
        if ctx.resident is None:
            _start_resident(ctx, stage)
        if isinstance(ctx.resident_data[stage.id], Exception):
            raise ctx.resident_data[stage.id]
        _, n, loads = ctx.resident_data[stage.id]
    else:
        ds, n, loads = train_data(ctx, stage)
    total = total_micro_steps(settings, n, cfg.train.num_workers)
    show = _progress_printer(ctx, stage, total)

    def on_progress(rows: list[dict]) -> None:
        ctx.tracker.log_metric_series(run_id, rows)
        show(rows)
        failpoint("train-progress")

    stored = replay_rows(ctx, stage)
    if stored:  # which samples are kept, and of which task: recorded beside the stage and in MLflow
        (stage_dir / REPLAY_STORE_FILE).write_text(json.dumps({t: [str(r["id"]) for r in rows] for t, rows in stored.items()},
                                                              indent=1))
        ctx.tracker.log_artifact(run_id, stage_dir / REPLAY_STORE_FILE)
    job = TrainJob(stage_dir, index, stage.task_index, stage.task_name, ctx.schedule.name, n, prev,
                   replay_rows=stored)
    if ctx.resident_ok:
        try:
            result = ctx.resident.run(job, ctx.base, on_progress, shards=_shards(ctx, stage))
        finally:
            last = max(s.task_index for s in ctx.stages if s.kind == "train")
            if stage.task_index == last:  # free the workers' CPUs for the last evaluation
                ctx.resident.close()
                ctx.resident = None
    else:
        result = run_train_stage(cfg, job=job, dataset=ds, base=ctx.base, on_progress=on_progress)
    # validation skips plus images that failed to decode while the shards were consumed
    bad = [b.to_dict() for res in loads for b in res.all_bad()]
    if bad:
        (stage_dir / SKIPPED_FILE).write_text(json.dumps(bad, indent=2))
        ctx.tracker.log_artifact(run_id, stage_dir / SKIPPED_FILE)
    result["skipped_records"] = len(bad)
    ctx.log_numbers(run_id, result)
    return result
