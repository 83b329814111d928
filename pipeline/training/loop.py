"""``fit``: one task's training loop, with named hook points (no Ray, no DeepSpeed import).

The Ray Train worker (``stages/train_worker.py``) runs it with a DeepSpeed engine and Ray Data
shards; the contract tests run it with ``TorchEngine`` on toy batches. The order of the hook
points is fixed, as in a continual-learning loop (avalanche's ``before_training_exp`` ...):

    attach_replay(channel)      once, before the first step, if the method asks for replay
    prepare(t, batches, mean)   once, before the first step, if the method has the hook
    per micro-batch:            engine(batch) -> engine.backward(loss) ->
                                [optimizer boundary] adjust_gradients(grads) -> engine.step()
    on_log(row)                 every ``log_every`` steps and at the last one
    on_checkpoint(step, loss)   every ``checkpoint_every`` steps (not at the last one)
    consolidate + end_task      after the last step (``finish_task``)

A job resumed at ``start_step`` replays the deterministic data order and skips the steps done.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Protocol

import torch

from pipeline.methods.protocol import GradAccess, ReplayChannel, adjust_gradients, finish_task, prepare_task

Batch = dict[str, Any]


class Engine(Protocol):
    """What ``fit`` needs of an optimiser engine (DeepSpeed's engine has exactly these)."""

    def __call__(self, batch: Batch) -> torch.Tensor: ...

    def backward(self, loss: torch.Tensor) -> None: ...

    def is_gradient_accumulation_boundary(self) -> bool: ...

    def step(self) -> None: ...

    def get_lr(self) -> list[float]: ...


class TorchEngine:
    """A plain torch optimiser behind the ``Engine`` interface (one micro-batch per step unless
    ``grad_accum`` > 1; loss scaled by 1/grad_accum as DeepSpeed does)."""

    def __init__(self, module: torch.nn.Module, optimizer: torch.optim.Optimizer, grad_accum: int = 1,
                 scheduler: Any = None) -> None:
        self.module, self.optimizer, self.grad_accum, self.scheduler = module, optimizer, grad_accum, scheduler
        self._micro = 0

    @classmethod
    def adamw(cls, method: torch.nn.Module, lr: float, weight_decay: float = 0.0, grad_accum: int = 1) -> "TorchEngine":
        params = [p for p in method.trainable_parameters() if p.requires_grad]
        return cls(method, torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay), grad_accum)

    def __call__(self, batch: Batch) -> torch.Tensor:
        return self.module(batch)

    def backward(self, loss: torch.Tensor) -> None:
        (loss / self.grad_accum if self.grad_accum > 1 else loss).backward()

    def is_gradient_accumulation_boundary(self) -> bool:
        return (self._micro + 1) % self.grad_accum == 0

    def step(self) -> None:
        if self.is_gradient_accumulation_boundary():
            self.optimizer.step()
            self.optimizer.zero_grad(set_to_none=True)
            if self.scheduler is not None:
                self.scheduler.step()
        self._micro += 1

    def get_lr(self) -> list[float]:
        return [g["lr"] for g in self.optimizer.param_groups]


@dataclass
class FitJob:
    """One task's training, as a trainer asks for it."""

    task_index: int
    task_name: str
    total_steps: int  # micro-batch steps
    start_step: int = 0  # steps already done (a resumed job)
    log_every: int = 10
    checkpoint_every: int = 0  # 0: no mid-task checkpoints
    world_size: int = 1


@dataclass
class FitResult:
    steps: int
    loss: float
    loop_s: float
    samples: int
    consolidate_s: float
    losses: list[float] = field(default_factory=list)
    first_batch_s: float | None = None

    @property
    def samples_per_s(self) -> float:
        return self.samples / max(1e-9, self.loop_s)


def run_steps(
    method: Any,
    engine: Engine,
    epoch_batches: Callable[[int], Iterable[Batch]],
    job: FitJob,
    *,
    grads: GradAccess | None = None,
    replay: ReplayChannel | None = None,
    on_log: Callable[[dict[str, Any]], None] | None = None,
    on_checkpoint: Callable[[int, float], None] | None = None,
    to_device: Callable[[Batch], Batch] = lambda b: b,
    task_batches: Callable[[], Iterable[Batch]] | None = None,
    mean_over_workers: Callable[[torch.Tensor], torch.Tensor] | None = None,
) -> FitResult:
    """The steps of ``fit`` (the task stays open): ``job.total_steps`` micro-batches drawn from
    ``epoch_batches(epoch)``, epoch after epoch. ``task_batches``: the task's data in order, for
    the method's optional ``prepare`` pass (default: epoch 0 of ``epoch_batches``)."""
    grads = grads or GradAccess()
    if replay is not None and hasattr(method, "attach_replay"):
        method.attach_replay(replay)
    batches = task_batches or (lambda: epoch_batches(0))
    prepare_task(method, job.task_index, lambda: (to_device(b) for b in batches()),
                 *(() if mean_over_workers is None else (mean_over_workers,)))
    step, epoch, seen, last_loss, loop_s = 0, 0, 0, float("nan"), 0.0
    losses: list[float] = []
    t_start, first_batch_s = time.time(), None
    while step < job.total_steps:
        progressed = False
        for batch in epoch_batches(epoch):
            if first_batch_s is None:
                first_batch_s = time.time() - t_start
            if step >= job.total_steps:
                break
            progressed = True
            if step < job.start_step:  # fast-forward the deterministic data order of a resumed job
                step += 1
                continue
            t0 = time.time()
            batch = to_device(batch)
            loss = engine(batch)
            engine.backward(loss)
            if engine.is_gradient_accumulation_boundary():
                adjust_gradients(method, grads)
            engine.step()
            loop_s += time.time() - t0
            step += 1
            seen += len(batch["ids"]) * job.world_size if "ids" in batch else job.world_size
            last_loss = float(loss.detach())
            losses.append(last_loss)
            if on_log is not None and (step % job.log_every == 0 or step == job.total_steps):
                on_log({"step": step, "loss": last_loss, "samples_per_s": seen / max(1e-9, time.time() - t_start),
                        "epoch": epoch, "lr": engine.get_lr()[0]})
            if on_checkpoint is not None and job.checkpoint_every and step % job.checkpoint_every == 0 \
                    and step < job.total_steps:
                on_checkpoint(step, last_loss)
        if not progressed:
            raise RuntimeError(f"train {job.task_name}: epoch {epoch} yielded no batch (empty training data)")
        epoch += 1
    return FitResult(step, last_loss, loop_s, seen, 0.0, losses, first_batch_s)


def fit(
    method: Any,
    engine: Engine,
    epoch_batches: Callable[[int], Iterable[Batch]],
    job: FitJob,
    *,
    grads: GradAccess | None = None,
    task_batches: Callable[[], Iterable[Batch]] | None = None,
    mean_over_workers: Callable[[torch.Tensor], torch.Tensor] | None = None,
    replay: ReplayChannel | None = None,
    on_log: Callable[[dict[str, Any]], None] | None = None,
    on_checkpoint: Callable[[int, float], None] | None = None,
    to_device: Callable[[Batch], Batch] = lambda b: b,
) -> FitResult:
    """Train ``method`` (after ``begin_task``) for ``job.total_steps`` micro-batches drawn from
    ``epoch_batches(epoch)`` (``run_steps``), then end the task (``finish_task``: the optional
    consolidate pass over ``task_batches()``, default: one epoch in order, then ``end_task``)."""
    result = run_steps(method, engine, epoch_batches, job, grads=grads, replay=replay, on_log=on_log,
                       on_checkpoint=on_checkpoint, to_device=to_device, task_batches=task_batches,
                       mean_over_workers=mean_over_workers)
    t0 = time.time()
    batches = task_batches or (lambda: epoch_batches(0))
    consolidated = finish_task(method, job.task_index, lambda: (to_device(b) for b in batches()),
                               *(() if mean_over_workers is None else (mean_over_workers,)))
    result.consolidate_s = time.time() - t0 if consolidated else 0.0
    return result
