"""train(t): Ray Train ``TorchTrainer`` workers train each task, the method's trainable parameters
under DeepSpeed, data from Ray Data shards.

Two ways to run the workers, same seeds and data order (results agree to float round-off):

* ``run_train_stage``: one ``TorchTrainer.fit`` per task (per-stage worker group).
* ``ResidentTrainer``: one ``fit`` whose worker group stays up across the tasks of a run and takes
  one job per train stage from a small job-board actor. Each fit starts a controller, a worker
  group and their helper actors, each a fresh Python process that imports torch/transformers/
  DeepSpeed; on a small machine that start-up, not the training, is most of a stage's time.

Worker side (``_train_job``, both ways): rebuild the frozen base models and the method, restore
the previous state, ``begin_task``, ``deepspeed.initialize``, train on the job's dataset shard,
report checkpoints (method state as safetensors) through ``ray.train.report``. A worker that
crashes mid-job resumes from the job's last checkpoint (``FailureConfig``).

Progress (step, loss, samples/s) is printed by rank 0 and appended to ``progress.jsonl`` in the
stage directory; the driver tails that file into MLflow while the fit runs.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import json
import math
import os
import tempfile
import threading
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import ray
import ray.train
import torch
from ray.train import Checkpoint, CheckpointConfig, DataConfig, FailureConfig, RunConfig, ScalingConfig
from ray.data.collate_fn import NumpyBatchCollateFn
from ray.train.torch import TorchTrainer

from pipeline.config import ExperimentConfig, StageTrain, config_from_dict
from pipeline.methods.base import GradAccess, adjust_gradients, finish_task
from stages.common import (
    BaseModels,
    build_method_for,
    fill_deepspeed_config,
    load_models,
    load_state,
    save_state,
)

STATE_FILE = "method_state.safetensors"
META_FILE = "train_meta.json"


# ----------------------------------------------------------------------------------------------
# Worker side
# ----------------------------------------------------------------------------------------------
class _TrainCollate(NumpyBatchCollateFn):
    """Ray Data numpy batch -> the LMM's training batch (tokenised, padded, pixels)."""

    def __init__(self, lmm) -> None:
        self.lmm = lmm

    def __call__(self, batch: dict[str, Any]) -> dict[str, Any]:
        return self.lmm.collate(batch, train=True)


class EngineGrads(GradAccess):
    """``GradAccess`` through a DeepSpeed engine: full gradients under every ZeRO stage (collective
    under ZeRO-3, where every rank calls the hook). Valid between ``backward`` and ``step``."""

    def get(self, param):
        from deepspeed.utils import safe_get_full_grad

        return safe_get_full_grad(param)

    def set(self, param, grad) -> None:
        from deepspeed.utils import safe_set_full_grad

        safe_set_full_grad(param, grad)


def mean_over_workers(tensor: torch.Tensor) -> torch.Tensor:
    """Mean of ``tensor`` over the data-parallel workers (in place); itself with one worker."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(tensor)
        tensor /= dist.get_world_size()
    return tensor


def _save_checkpoint(method, progress: dict[str, Any], tasks_done: list[int], final: bool, job: str,
                     dir_name: str | None = None) -> None:
    """Every rank enters: ``state_tensors`` gathers ZeRO-3 partitions, a collective operation.
    Rank 0 writes the checkpoint; every rank reports (Ray Train requires it). ``job`` names the
    train stage the checkpoint belongs to (a resident worker group trains several)."""
    rank = ray.train.get_context().get_world_rank()
    tensors = method.state_tensors()
    metrics = {k: v for k, v in progress.items() if isinstance(v, (int, float))}
    metrics["final"] = int(final)
    if rank != 0:
        ray.train.report(metrics, checkpoint=None, checkpoint_dir_name=dir_name)
        return
    with tempfile.TemporaryDirectory() as tmp:
        save_state(tensors, Path(tmp) / STATE_FILE)
        task_keys = {str(t): method.task_keys(t) for t in tasks_done}
        meta = {"job": job, "progress": progress, "final": final, "task_keys": task_keys}
        (Path(tmp) / META_FILE).write_text(json.dumps(meta, indent=2))
        ray.train.report(metrics, checkpoint=Checkpoint.from_directory(tmp), checkpoint_dir_name=dir_name)


def prepare_method(method, *, prev_state: str | Path | None, checkpoint_dir: Path | None, job: str,
                   task_index: int, task_name: str) -> int:
    """Restore the earlier tasks' frozen state, then the job's own mid-stage checkpoint if
    ``checkpoint_dir`` holds one, then ``begin_task``; returns the step to continue from.

    The order matters: ``load_state_tensors`` restores tasks as learned (frozen), and
    ``begin_task`` on the latest restored task makes it trainable again. A checkpoint of another
    job (a resident group's earlier stage) or a final one is ignored: the task starts afresh."""
    if prev_state:
        method.load_state_tensors(load_state(prev_state))
    start_step = 0
    if checkpoint_dir is not None:
        meta = json.loads((checkpoint_dir / META_FILE).read_text())
        if meta.get("job", job) == job and not meta.get("final"):
            method.load_state_tensors(load_state(checkpoint_dir / STATE_FILE))
            start_step = int(meta["progress"]["step"])
    method.begin_task(task_index, task_name)
    return start_step


def train_loop_per_worker(config: dict[str, Any]) -> None:
    """Per-stage worker group: train the one job in ``config`` on the dataset named "train"."""
    _train_job(config, t_enter=time.time(), dataset_name="train")


def _train_job(config: dict[str, Any], *, t_enter: float, dataset_name: str, final_dir: str | None = None) -> None:
    cfg = config_from_dict(config["cfg"])
    if cfg.train.torch_threads:
        torch.set_num_threads(cfg.train.torch_threads)
    torch.manual_seed(cfg.seed + 1000 * config["stage_index"])
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    device = "cuda" if torch.cuda.is_available() and cfg.train.gpus_per_worker > 0 else "cpu"
    if device == "cuda":
        torch.cuda.set_device(ray.train.torch.get_device())

    setup = {"worker_start_s": t_enter - config["fit_started"]}  # fit (or job) posted -> worker starts it
    t0 = time.time()
    lmm, guide = load_models(cfg, BaseModels(**config["base"]), device=device)
    setup["load_models_s"] = time.time() - t0
    method = build_method_for(cfg, lmm, guide)
    task_index, task_name = config["task_index"], config["task_name"]
    job = config["job"]
    resumed = ray.train.get_checkpoint()
    # after a worker crash, the job continues from its last checkpoint (if that is the job's own)
    with resumed.as_directory() if resumed is not None else contextlib.nullcontext() as d:
        start_step = prepare_method(method, prev_state=config["prev_state"], checkpoint_dir=Path(d) if d else None,
                                    job=job, task_index=task_index, task_name=task_name)

    t0 = time.time()
    import deepspeed

    settings = StageTrain(**config["train"])
    total_steps = config["total_steps"]
    ds_cfg = fill_deepspeed_config(
        config["deepspeed"], micro_batch=settings.batch_size, grad_accum=settings.grad_accum,
        world_size=world, lr=settings.lr, weight_decay=settings.weight_decay,
        use_bf16=(device == "cuda" and cfg.model.dtype == "bfloat16"),
    )
    params = [p for p in method.trainable_parameters() if p.requires_grad]
    schedule = lr_schedule(settings, total_steps, start_step)
    engine, _, _, _ = deepspeed.initialize(model=method, model_parameters=params, config=ds_cfg,
                                           lr_scheduler=schedule)
    method.train()
    setup["deepspeed_init_s"] = time.time() - t0

    shard = ray.train.get_dataset_shard(dataset_name)
    collate = _TrainCollate(lmm)
    progress_file = Path(config["progress_file"]) if rank == 0 else None
    grads = EngineGrads()
    step, epoch, t_start, seen, last_loss = 0, 0, time.time(), 0, float("nan")
    loop_s = 0.0
    while step < total_steps:
        batches = shard.iter_torch_batches(
            batch_size=settings.batch_size, collate_fn=collate, device="cpu",
            local_shuffle_buffer_size=config["shuffle_buffer"], local_shuffle_seed=cfg.seed + epoch,
        )
        for batch in batches:
            if "first_batch_s" not in setup:
                setup["first_batch_s"] = time.time() - t_start
            if step >= total_steps:
                break
            if step < start_step:  # fast-forward the deterministic data order after a crash
                step += 1
                continue
            t0 = time.time()
            batch = {k: (v.to(device) if torch.is_tensor(v) else v) for k, v in batch.items()}
            loss = engine(batch)
            engine.backward(loss)
            if engine.is_gradient_accumulation_boundary():
                adjust_gradients(method, grads)
            engine.step()
            loop_s += time.time() - t0
            step += 1
            seen += len(batch["ids"]) * world
            last_loss = float(loss.detach())
            if rank == 0 and (step % cfg.train.log_every == 0 or step == total_steps):
                row = {"step": step, "loss": last_loss, "samples_per_s": seen / max(1e-9, time.time() - t_start),
                       "epoch": epoch, "lr": engine.get_lr()[0]}
                print(f"[train {task_name}] step {step}/{total_steps} loss {last_loss:.4f} "
                      f"{row['samples_per_s']:.1f} samples/s", flush=True)
                with open(progress_file, "a") as fh:
                    fh.write(json.dumps(row) + "\n")
            if cfg.train.checkpoint_every and step % cfg.train.checkpoint_every == 0 and step < total_steps:
                _save_checkpoint(method, {"step": step, "loss": last_loss}, [], final=False, job=job)
        epoch += 1

    def task_batches():  # for an optional end-of-task pass (consolidate): one epoch, in order
        for batch in shard.iter_torch_batches(batch_size=settings.batch_size, collate_fn=collate, device="cpu"):
            yield {k: (v.to(device) if torch.is_tensor(v) else v) for k, v in batch.items()}

    t0 = time.time()
    consolidated = finish_task(method, task_index, task_batches, mean_over_workers)
    consolidate_s = time.time() - t0 if consolidated else 0.0
    done = list(range(task_index + 1)) if config["schedule"] == "sequential" else [task_index]
    _save_checkpoint(
        method,
        {"step": step, "loss": last_loss, "train_loop_s": loop_s, "samples": seen,
         "samples_per_s": seen / max(1e-9, loop_s), "setup": setup, "resumed_from_step": start_step,
         "consolidate_s": consolidate_s},
        done, final=True, job=job, dir_name=final_dir,
    )
    engine.destroy()  # a resident worker initialises DeepSpeed again for its next job


# ----------------------------------------------------------------------------------------------
# Driver side
# ----------------------------------------------------------------------------------------------
def _tail(path: Path, on_rows: Callable[[list[dict]], None], stop: threading.Event) -> None:
    pos = 0
    while True:
        finished = stop.is_set()
        if path.exists():
            with open(path) as fh:
                fh.seek(pos)
                chunk = fh.read()
                # only consume complete lines
                cut = chunk.rfind("\n") + 1
                pos += cut
                rows = [json.loads(line) for line in chunk[:cut].splitlines() if line.strip()]
            if rows:
                on_rows(rows)
        if finished:
            return
        stop.wait(2.0)


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

    @property
    def id(self) -> str:
        return self.stage_dir.name


def stage_settings(cfg: ExperimentConfig, task_name: str, schedule: str) -> StageTrain:
    """A sequential stage trains one task with that task's settings; a joint stage the global ones."""
    return cfg.stage_train(task_name if schedule == "sequential" else None)


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


def _job_config(cfg: ExperimentConfig, job: TrainJob, base: BaseModels) -> dict[str, Any]:
    settings = stage_settings(cfg, job.task_name, job.schedule)
    total = total_micro_steps(settings, job.num_rows, cfg.train.num_workers)
    with open(cfg.resolve_path(cfg.train.deepspeed)) as fh:
        ds_template = json.load(fh)
    return {
        "job": job.id, "cfg": cfg.to_dict(), "base": base.to_dict(),
        "prev_state": str(job.prev_state) if job.prev_state else None,
        "task_index": job.task_index, "task_name": job.task_name, "schedule": job.schedule,
        "stage_index": job.stage_index, "total_steps": total, "deepspeed": ds_template,
        "train": settings.to_dict(),
        "progress_file": str(job.stage_dir / "progress.jsonl"), "shuffle_buffer": min(job.num_rows, 1024),
    }


def _scaling(cfg: ExperimentConfig) -> ScalingConfig:
    resources = {"CPU": cfg.train.cpus_per_worker}
    if cfg.train.gpus_per_worker:
        resources["GPU"] = cfg.train.gpus_per_worker
    return ScalingConfig(num_workers=cfg.train.num_workers, use_gpu=cfg.train.gpus_per_worker > 0,
                         resources_per_worker=resources)


def _collect(checkpoint_dir: Path, job: TrainJob, fit_s: float) -> dict[str, Any]:
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
    }


class _Tail:
    """Tails a job's progress.jsonl into ``on_progress`` on a thread while the job runs."""

    def __init__(self, path: Path, on_progress: Callable[[list[dict]], None] | None):
        self.stop = threading.Event()
        self.thread = None
        if on_progress is not None:
            self.thread = threading.Thread(target=_tail, args=(path, on_progress, self.stop), daemon=True)
            self.thread.start()

    def close(self) -> None:
        self.stop.set()
        if self.thread is not None:
            self.thread.join(timeout=10)


def run_train_stage(
    cfg: ExperimentConfig,
    *,
    stage_dir: Path,
    stage_index: int,
    task_index: int,
    task_name: str,
    schedule: str,
    dataset: "ray.data.Dataset",
    num_rows: int,
    base: BaseModels,
    prev_state: Path | None,
    on_progress: Callable[[list[dict]], None] | None = None,
) -> dict[str, Any]:
    """Run one training stage in its own ``fit``; write ``method_state.safetensors`` +
    ``train_meta.json`` into ``stage_dir`` and return the stage result (steps, final loss, loop
    time, fit time). Re-running a killed stage resumes from its last checkpoint (Ray Train
    restores the fit from ``stage_dir/ray_train``)."""
    job = TrainJob(stage_dir, stage_index, task_index, task_name, schedule, num_rows, prev_state)
    loop_config = _job_config(cfg, job, base)
    trainer = TorchTrainer(
        train_loop_per_worker,
        train_loop_config=loop_config,
        scaling_config=_scaling(cfg),
        datasets={"train": dataset},
        dataset_config=DataConfig(datasets_to_split=["train"]),
        run_config=RunConfig(
            name="fit",
            storage_path=str(stage_dir / "ray_train"),
            failure_config=FailureConfig(max_failures=cfg.train.max_failures),
            checkpoint_config=CheckpointConfig(num_to_keep=2),
        ),
    )
    loop_config["fit_started"] = time.time()
    tail = _Tail(stage_dir / "progress.jsonl", on_progress)
    t0 = time.time()
    try:
        result = trainer.fit()
    finally:
        tail.close()
    fit_s = time.time() - t0
    if result.checkpoint is None:
        raise RuntimeError(f"train stage for {task_name}: Ray Train finished without a checkpoint")
    with result.checkpoint.as_directory() as d:
        return _collect(Path(d), job, fit_s)


# ----------------------------------------------------------------------------------------------
# Resident worker group: one fit for all the train stages of a run
# ----------------------------------------------------------------------------------------------
class _JobBoard:
    """Where the driver posts train jobs and the resident workers take them (an async Ray actor:
    callers wait inside the actor for a change instead of polling it)."""

    def __init__(self) -> None:
        self.job: dict[str, Any] | None = None
        self.done: set[str] = set()
        self.closed = False
        self._changed = asyncio.Event()

    def _notify(self) -> None:
        self._changed.set()
        self._changed = asyncio.Event()

    async def _wait(self, ready: Callable[[], bool], timeout: float) -> None:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while not ready():
            left = deadline - loop.time()
            if left <= 0:
                return
            try:
                await asyncio.wait_for(self._changed.wait(), left)
            except asyncio.TimeoutError:
                return

    async def post(self, job: dict[str, Any]) -> None:
        self.job = job
        self._notify()

    async def next_job(self, finished: list[str], timeout: float) -> dict[str, Any] | str | None:
        """A posted job not in ``finished`` and not done, "stop" once closed, or None after
        ``timeout`` seconds without either."""
        def current():
            if self.closed:
                return "stop"
            if self.job is None or self.job["job"] in self.done or self.job["job"] in finished:
                return None
            return self.job

        await self._wait(lambda: current() is not None, timeout)
        return current()

    async def finish(self, job_id: str) -> None:
        self.done.add(job_id)
        self._notify()

    async def wait_done(self, job_id: str, timeout: float) -> bool:
        await self._wait(lambda: job_id in self.done, timeout)
        return job_id in self.done

    async def close(self) -> None:
        self.closed = True
        self._notify()


def _final_dir(job_id: str) -> str:
    return f"{job_id}-final"


def resident_loop_per_worker(config: dict[str, Any]) -> None:
    """Take jobs from the board until it closes; each job trains on the dataset named after it."""
    board = config["board"]
    rank = ray.train.get_context().get_world_rank()
    finished: set[str] = set()
    while True:
        job = ray.get(board.next_job.remote(sorted(finished), 10.0))
        if job == "stop":
            return
        if job is None:
            continue
        t_enter = time.time()
        if not _already_final(job["job"]):  # a restart after the final report: nothing to redo
            _train_job(job, t_enter=t_enter, dataset_name=job["job"], final_dir=_final_dir(job["job"]))
        # free this job's models and DeepSpeed engine (reference cycles) before the next one loads
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
        finished.add(job["job"])
        if rank == 0:
            ray.get(board.finish.remote(job["job"]))


def _already_final(job_id: str) -> bool:
    resumed = ray.train.get_checkpoint()
    if resumed is None:
        return False
    with resumed.as_directory() as d:
        meta = json.loads((Path(d) / META_FILE).read_text())
    return meta.get("job") == job_id and bool(meta.get("final"))


class ResidentTrainer:
    """One ``TorchTrainer.fit`` whose worker group trains every pending train stage of a run.

    ``datasets`` maps each job id (the train stage's directory name) to its Ray Dataset; Ray
    Train builds a job's shards when the workers first ask for them. The fit runs on a driver
    thread; ``run`` posts a job, waits for it and copies its final checkpoint into the stage
    directory, as ``run_train_stage`` does. ``close`` ends the fit (call it after the last job:
    the workers hold their CPUs/GPUs until then). Checkpoints live under ``storage`` in a folder
    per fit; a worker crash resumes the job from its last checkpoint within the fit, a killed
    driver re-runs the interrupted stage from its start (same seed, same result).
    """

    def __init__(self, cfg: ExperimentConfig, *, datasets: dict[str, "ray.data.Dataset"], storage: Path,
                 log: Callable[[str], None] = print):
        import uuid

        self.cfg, self.log = cfg, log
        self.name = f"resident-{time.strftime('%Y%m%d-%H%M%S')}-{uuid.uuid4().hex[:6]}"
        self.storage = Path(storage)
        self.board = ray.remote(num_cpus=0)(_JobBoard).remote()
        self.trainer = TorchTrainer(
            resident_loop_per_worker,
            train_loop_config={"board": self.board},
            scaling_config=_scaling(cfg),
            datasets=dict(datasets),
            dataset_config=DataConfig(datasets_to_split="all"),
            run_config=RunConfig(
                name=self.name,
                storage_path=str(self.storage),
                failure_config=FailureConfig(max_failures=cfg.train.max_failures),
                checkpoint_config=CheckpointConfig(num_to_keep=2),
            ),
        )
        self.error: BaseException | None = None
        self.thread = threading.Thread(target=self._fit, name="resident-train-fit", daemon=True)
        self.started = time.time()
        self.thread.start()

    def _fit(self) -> None:
        try:
            self.trainer.fit()
        except BaseException as e:  # noqa: BLE001 - re-raised on the stage's thread
            self.error = e

    def run(self, job: TrainJob, base: BaseModels, on_progress: Callable[[list[dict]], None] | None = None
            ) -> dict[str, Any]:
        config = _job_config(self.cfg, job, base)
        config["fit_started"] = time.time()
        tail = _Tail(job.stage_dir / "progress.jsonl", on_progress)
        t0 = time.time()
        try:
            ray.get(self.board.post.remote(config))
            while not ray.get(self.board.wait_done.remote(job.id, 1.0)):
                if not self.thread.is_alive():
                    raise RuntimeError(
                        f"train stage {job.id}: the resident Ray Train worker group ended before finishing it"
                    ) from self.error
        finally:
            tail.close()
        return _collect(self.storage / self.name / _final_dir(job.id), job, time.time() - t0)

    def close(self, timeout: float = 120.0) -> None:
        """Let the workers return and the fit end (a job in progress finishes first)."""
        try:
            ray.get(self.board.close.remote())
        except Exception:  # noqa: BLE001 - the board is gone with a dead Ray; nothing to stop
            return
        self.thread.join(timeout=timeout)
        if self.thread.is_alive():
            self.log(f"resident train fit {self.name} did not end within {timeout:.0f} s")
        elif self.error is not None:
            self.log(f"resident train fit {self.name} ended with {type(self.error).__name__}: {self.error}")
