"""The Ray Train worker side of a train stage: rebuild the frozen base models and the method,
restore the earlier tasks' state (and the job's own checkpoint after a crash), ``begin_task``,
``deepspeed.initialize``, then ``pipeline.training.fit`` on this worker's Ray Data shard, with
checkpoints reported through ``ray.train.report`` (method state as safetensors).

``WorkerJob`` is everything a worker needs for one train stage; the per-stage fit
(``train_loop_per_worker``) and the resident worker group (``stages/resident.py``) both run
``run_job``.
"""

from __future__ import annotations

import contextlib
import json
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import ray
import ray.train
import torch
from ray.data.collate_fn import NumpyBatchCollateFn
from ray.train import Checkpoint

from pipeline.config import StageTrain, config_from_dict
from pipeline.methods.protocol import GradAccess, ReplayChannel
from pipeline.training import FitJob, fit
from stages.artifacts import META_FILE, STATE_FILE
from stages.common import (BaseModels, build_method_for, fill_deepspeed_config, load_models, load_state,
                           peak_memory_gb, save_state)


@dataclass
class WorkerJob:
    """One train stage as the workers run it (built on the driver by ``stages.train``)."""

    id: str  # the train stage's directory name
    cfg: dict[str, Any]  # the experiment config (``ExperimentConfig.to_dict``)
    base: dict[str, Any]  # ``BaseModels.to_dict``
    prev_state: str | None  # the earlier tasks' frozen state file
    task_index: int
    task_name: str
    schedule: str
    stage_index: int
    total_steps: int
    deepspeed: dict[str, Any]  # the DeepSpeed config template
    train: dict[str, Any]  # ``StageTrain.to_dict``
    progress_file: str
    shuffle_buffer: int
    tasks_done: list[int]  # task indices whose keys the final checkpoint lists
    replay_rows: dict[str, list[dict[str, Any]]] = field(default_factory=dict)
    fit_started: float = 0.0
    # the decoded training data, one Dataset per worker (rank order); None: the Ray Train dataset
    # shard named after the job
    shards: list[Any] | None = None


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


def register_for_zero3(method, ds_cfg: dict[str, Any]) -> int:
    """Under ZeRO-3 a parameter is whole only inside its own module's forward. Methods read
    theirs elsewhere too (EWC's penalty on the LoRA weights, keys in a ParameterList, a router
    between calls), so every parameter the method owns (``own_parameters``) is registered as an
    external parameter of the method itself: gathered for the whole of its forward. The base
    model's own weights are not. Returns how many were registered (0 below ZeRO-3)."""
    if int((ds_cfg.get("zero_optimization") or {}).get("stage", 0)) != 3:
        return 0
    from deepspeed.runtime.zero.partition_parameters import register_external_parameter

    own = method.own_parameters() if hasattr(method, "own_parameters") else list(method.parameters())
    for p in own:
        register_external_parameter(method, p)
    return len(own)


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
    run_job(config["job"], t_enter=time.time(), dataset_name="train")


def run_job(job: WorkerJob, *, t_enter: float, dataset_name: str, final_dir: str | None = None) -> None:
    from stages.train import lr_schedule

    cfg = config_from_dict(job.cfg)
    if cfg.train.torch_threads:
        torch.set_num_threads(cfg.train.torch_threads)
    torch.manual_seed(cfg.seed + 1000 * job.stage_index)
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    device = "cuda" if torch.cuda.is_available() and cfg.train.gpus_per_worker > 0 else "cpu"
    if device == "cuda":
        torch.cuda.set_device(ray.train.torch.get_device())

    setup = {"worker_start_s": t_enter - job.fit_started}  # fit (or job) posted -> worker starts it
    t0 = time.time()
    lmm, guide = load_models(cfg, BaseModels(**job.base), device=device)
    setup["load_models_s"] = time.time() - t0
    method = build_method_for(cfg, lmm, guide)
    resumed = ray.train.get_checkpoint()
    # after a worker crash, the job continues from its last checkpoint (if that is the job's own)
    with resumed.as_directory() if resumed is not None else contextlib.nullcontext() as d:
        start_step = prepare_method(method, prev_state=job.prev_state, checkpoint_dir=Path(d) if d else None,
                                    job=job.id, task_index=job.task_index, task_name=job.task_name)

    t0 = time.time()
    import deepspeed

    settings = StageTrain(**job.train)
    ds_cfg = fill_deepspeed_config(
        job.deepspeed, micro_batch=settings.batch_size, grad_accum=settings.grad_accum,
        world_size=world, lr=settings.lr, weight_decay=settings.weight_decay,
        use_bf16=(device == "cuda" and cfg.model.dtype == "bfloat16"),
    )
    params = [p for p in method.trainable_parameters() if p.requires_grad]
    register_for_zero3(method, ds_cfg)
    engine, _, _, _ = deepspeed.initialize(model=method, model_parameters=params, config=ds_cfg,
                                           lr_scheduler=lr_schedule(settings, job.total_steps, start_step))
    method.train()
    setup["deepspeed_init_s"] = time.time() - t0

    shard = job.shards[rank] if job.shards else ray.train.get_dataset_shard(dataset_name)
    collate = _TrainCollate(lmm)
    progress_file = Path(job.progress_file) if rank == 0 else None

    def epoch_batches(epoch: int):
        return shard.iter_torch_batches(
            batch_size=settings.batch_size, collate_fn=collate, device="cpu",
            local_shuffle_buffer_size=job.shuffle_buffer, local_shuffle_seed=cfg.seed + epoch,
        )

    def task_batches():  # for an optional end-of-task pass (consolidate): one epoch, in order
        return shard.iter_torch_batches(batch_size=settings.batch_size, collate_fn=collate, device="cpu")

    def on_log(row: dict[str, Any]) -> None:
        if progress_file is not None:
            with open(progress_file, "a") as fh:
                fh.write(json.dumps(row) + "\n")

    def on_checkpoint(step: int, loss: float) -> None:
        _save_checkpoint(method, {"step": step, "loss": loss}, [], final=False, job=job.id)

    replay = None
    if job.replay_rows:
        from pipeline.models.lmm import rows_to_batch

        replay = ReplayChannel(job.replay_rows, lambda rows: lmm.collate(rows_to_batch(rows), train=True))
    result = fit(
        method, engine, epoch_batches,
        FitJob(job.task_index, job.task_name, job.total_steps, start_step=start_step,
               log_every=cfg.train.log_every, checkpoint_every=cfg.train.checkpoint_every, world_size=world),
        grads=EngineGrads(), task_batches=task_batches, mean_over_workers=mean_over_workers, replay=replay,
        on_log=on_log, on_checkpoint=on_checkpoint,
        to_device=lambda b: {k: (v.to(device) if torch.is_tensor(v) else v) for k, v in b.items()},
    )
    if result.first_batch_s is not None:
        setup["first_batch_s"] = result.first_batch_s
    _save_checkpoint(
        method,
        {"step": result.steps, "loss": result.loss, "train_loop_s": result.loop_s, "samples": result.samples,
         "samples_per_s": result.samples_per_s, "setup": setup, "resumed_from_step": start_step,
         "consolidate_s": result.consolidate_s, "peak_mem_gb": peak_memory_gb(device)},
        job.tasks_done, final=True, job=job.id, dir_name=final_dir,
    )
    engine.destroy()  # a resident worker initialises DeepSpeed again for its next job
