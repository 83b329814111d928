"""The resident Ray Train worker group: one ``TorchTrainer.fit`` whose workers stay up across the
train stages of a run and take one job per stage from a small job-board actor.

Each fit starts a controller, a worker group and their helper actors, each a fresh Python process
that imports torch/transformers/DeepSpeed; on a small machine that start-up, not the training, is
most of a stage's time. Same seeds and data order as a fit per stage (results agree to float
round-off).
"""

from __future__ import annotations

import asyncio
import gc
import json
import threading
import time
from pathlib import Path
from typing import Any, Callable

import ray
import ray.train
import torch
from ray.train import CheckpointConfig, DataConfig, FailureConfig, RunConfig
from ray.train.torch import TorchTrainer

from pipeline.config import ExperimentConfig
from stages.artifacts import META_FILE, PROGRESS_FILE
from stages.common import BaseModels, JsonlTail
from stages.train import TrainJob, collect_final, scaling_config, worker_job
from stages.train_worker import WorkerJob, run_job


class _JobBoard:
    """Where the driver posts train jobs and the resident workers take them (an async Ray actor:
    callers wait inside the actor for a change instead of polling it)."""

    def __init__(self) -> None:
        self.job: WorkerJob | None = None
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

    async def post(self, job: WorkerJob) -> None:
        self.job = job
        self._notify()

    async def next_job(self, finished: list[str], timeout: float) -> WorkerJob | str | None:
        """A posted job not in ``finished`` and not done, "stop" once closed, or None after
        ``timeout`` seconds without either."""
        def current():
            if self.closed:
                return "stop"
            if self.job is None or self.job.id in self.done or self.job.id in finished:
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
        if not _already_final(job.id):  # a restart after the final report: nothing to redo
            run_job(job, t_enter=t_enter, dataset_name=job.id, final_dir=_final_dir(job.id))
        # free this job's models and DeepSpeed engine (reference cycles) before the next one loads
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
        finished.add(job.id)
        if rank == 0:
            ray.get(board.finish.remote(job.id))


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
            scaling_config=scaling_config(cfg),
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

    def run(self, job: TrainJob, base: BaseModels, on_progress: Callable[[list[dict]], None] | None = None,
            shards: list | None = None) -> dict[str, Any]:
        """``shards``: the job's decoded training data, one Dataset per worker (None: the
        dataset named after the job, which Ray Train streams to the workers)."""
        config = worker_job(self.cfg, job, base)
        config.shards = shards
        config.fit_started = time.time()
        tail = JsonlTail(job.stage_dir / PROGRESS_FILE, on_progress)
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
        return collect_final(self.storage / self.name / _final_dir(job.id), job, time.time() - t0)

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
