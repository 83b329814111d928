"""The continual-method protocol: what the stages may call on a method, and the two optional hooks.

A continual method is an ``nn.Module`` that owns its own parameters (prompts, LoRA blocks,
projections, ...) and holds references to the frozen base LMM and the frozen guidance encoder.
The stages only ever talk to this protocol:

    begin_task(t, name)        -> before training task t (0-based); creates task-t parameters
    trainable_parameters()     -> the parameters the optimiser updates for task t (nothing else
                                  may receive a gradient)
    forward(batch) / training_loss(batch)
                               -> (scalar loss, dict of float logs); ``forward`` returns only the
                                  loss so that a DeepSpeed engine can wrap the module
    generate(batch, max_new_tokens)
                               -> Generation (texts, and for selecting methods the selected task
                                  indices per sample); never receives a task id unless the method
                                  declares ``task_id_at_test = True`` (oracle variants)
    end_task(t)                -> freeze task t's parameters (requires_grad False)
    state_tensors()            -> the whole method state as named tensors (safetensors-safe)
    load_state_tensors(d)      -> restore that state exactly (in a fresh process too)
    task_keys(t)               -> the names in state_tensors() that belong to task t and must be
                                  bit-identical forever after end_task(t)

Class attributes (``pipeline.methods.base.MethodBase`` supplies the defaults):

    schedule       how the stage DAG trains it (``SCHEDULES``)
    options_class  the options dataclass (None: no options), checked when a config loads
    sweep_space    the method's default Ray Tune search space (``python pipeline/main.py tune``)
    replay_per_task  stored training samples per earlier task the method asks for (0: none);
                   they reach it through ``attach_replay(channel)`` (``ReplayChannel``); a
                   method whose count is an option overrides the classmethod ``stored_samples``
    frozen_encoders  True (the default): the method changes neither the LMM's vision tower nor the
                   guide, so the evaluate stage may serve their outputs for a test sample from its
                   per-sample cache (``pipeline.models.frozen``); a method that adapts either sets
                   it False. The projector is not part of it (methods may train it).

Optional hooks, for methods that need them (``adjust_gradients`` / ``finish_task`` below are the
one place that decides how they are called):

    adjust_gradients(grads)    -> after the backward pass that completes an optimiser step, before
                                  the step: read and replace full gradients through ``grads``
                                  (a ``GradAccess``), e.g. DRAPE's null-space projection. Never
                                  ``p.grad`` directly: under ZeRO the engine keeps gradients in its
                                  own partitioned buffers.
    consolidate(t, batches, mean_over_workers)
                               -> after task t's last training step, before end_task(t): one pass
                                  over task t's training data (this worker's shard) for end-of-task
                                  statistics: EWC's Fisher, DRAPE's feature covariance, ProgLoRA's
                                  task embeddings. Whatever it keeps must be in state_tensors(),
                                  reduced across data-parallel workers with
                                  ``mean_over_workers(tensor)``. Gradients here must come from
                                  ``torch.autograd.grad``.
    attach_replay(channel)     -> before training task t, when ``replay_per_task > 0``: a
                                  ``ReplayChannel`` of stored samples of the earlier tasks (and of
                                  task t itself when the class sets ``replay_current = True``).
    prepare(t, batches, mean_over_workers)
                               -> before task t's first training step (again when a stage resumes):
                                  one pass over task t's training data (this worker's shard) for
                                  what the task's training needs up front, e.g. ProgLoRA's static
                                  task embeddings. Reduce across workers as ``consolidate`` does.
    diagnostics(predictions, learned, out_dir)  (classmethod, on the driver, no model)
                               -> after an evaluate stage: a method's own summary numbers and
                                  figures from the stage's prediction records (``Diagnostics``).

Loss terms (EWC's penalty, LwF's distillation) need no hook: they are part of ``training_loss``.
Method code never imports ray.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, ClassVar, Iterable, Protocol, runtime_checkable

import torch
from torch import nn

SEQUENTIAL, JOINT, NONE = "sequential", "joint", "none"
# "sequential": train(t) -> freeze(t) -> evaluate(t) for every task; "joint": one training stage on
# the union of all tasks (the multi-task bound); "none": nothing to train (zero-shot).
SCHEDULES = (SEQUENTIAL, JOINT, NONE)


@dataclass
class Generation:
    """Output of ``ContinualMethod.generate`` for one batch.

    texts:    one decoded answer per sample (may be "").
    selected: per sample, the 0-based indices of the method's own units that were used, most
              similar first (ModalPrompt: tasks' prompt sets; L2P: pool prompts; CODA-Prompt: the
              component of largest weight; DualPrompt: the expert prompt's task); None for methods
              that do not select.
    scores:   optional (B, n_tasks) similarity scores used for selection, for diagnostics.
    """

    texts: list[str]
    selected: list[list[int]] | None = None
    scores: torch.Tensor | None = None


@dataclass
class Diagnostics:
    """A method's own view of one evaluate stage: ``summary`` numbers (logged to MLflow and kept in
    results.json), ``files`` written under the stage directory (logged as figures), and ``lines``
    the run prints with its results."""

    summary: dict[str, Any] = field(default_factory=dict)
    files: list[Path] = field(default_factory=list)
    lines: list[str] = field(default_factory=list)


@runtime_checkable
class ContinualMethod(Protocol):
    name: ClassVar[str]
    task_id_at_test: ClassVar[bool]
    schedule: ClassVar[str]

    def begin_task(self, task_index: int, task_name: str) -> None: ...

    def trainable_parameters(self) -> list[nn.Parameter]: ...

    def training_loss(self, batch: dict[str, Any]) -> tuple[torch.Tensor, dict[str, float]]: ...

    def generate(self, batch: dict[str, Any], max_new_tokens: int) -> Generation: ...

    def end_task(self, task_index: int) -> None: ...

    def state_tensors(self) -> dict[str, torch.Tensor]: ...

    def load_state_tensors(self, tensors: dict[str, torch.Tensor]) -> None: ...

    def task_keys(self, task_index: int) -> list[str]: ...


class GradAccess:
    """Full gradients of trainable parameters, as ``adjust_gradients`` sees them.

    This default reads and writes ``p.grad`` (a plain torch optimiser). The Ray Train worker passes
    a subclass that goes through the DeepSpeed engine, whose ZeRO stages keep gradients elsewhere.
    """

    def get(self, param: nn.Parameter) -> torch.Tensor | None:
        return param.grad

    def set(self, param: nn.Parameter, grad: torch.Tensor) -> None:
        if param.grad is None:
            param.grad = grad.detach().clone()
        else:
            param.grad.copy_(grad)


class ReplayChannel:
    """Stored training samples of earlier tasks, as a method asks for them during task t.

    ``rows`` maps an earlier task's name to its stored schema rows (decoded images); ``collate``
    turns rows into a training batch (the LMM's collate). ``batch(task, n)`` returns ``n`` rows of
    that task cycling through its store in a fixed order; ``tasks`` lists what is stored."""

    def __init__(self, rows: dict[str, list[dict[str, Any]]], collate: Callable[[list[dict[str, Any]]], dict[str, Any]]):
        self.rows = {t: list(r) for t, r in rows.items() if r}
        self._collate = collate
        self._next = {t: 0 for t in self.rows}

    @property
    def tasks(self) -> list[str]:
        return list(self.rows)

    def __len__(self) -> int:
        return sum(len(r) for r in self.rows.values())

    def collate(self, rows: list[dict[str, Any]]) -> dict[str, Any]:
        """A training batch of the given stored rows."""
        return self._collate(rows)

    def batch(self, task: str, n: int) -> dict[str, Any]:
        if task not in self.rows:
            raise KeyError(f"replay: no stored samples of task {task!r}; stored: {self.tasks}")
        store, i = self.rows[task], self._next[task]
        picked = [store[(i + j) % len(store)] for j in range(n)]
        self._next[task] = (i + n) % len(store)
        return self._collate(picked)


def adjust_gradients(method: Any, grads: GradAccess) -> bool:
    """Run the method's optional ``adjust_gradients`` hook; True if it has one."""
    hook = getattr(method, "adjust_gradients", None)
    if hook is None:
        return False
    hook(grads)
    return True


def _identity(tensor: torch.Tensor) -> torch.Tensor:
    return tensor


def prepare_task(
    method: Any,
    task_index: int,
    batches: Callable[[], Iterable[dict[str, Any]]] | None,
    mean_over_workers: Callable[[torch.Tensor], torch.Tensor] = _identity,
) -> bool:
    """Run the method's optional ``prepare`` pass over task ``task_index``'s data (``batches`` is
    called only if the method has the hook); True if it ran."""
    hook = getattr(method, "prepare", None)
    if hook is None:
        return False
    if batches is None:
        raise RuntimeError(f"method {getattr(method, 'name', method)!r} prepares each task from its data, "
                           "but this loop was given no task data")
    hook(task_index, batches(), mean_over_workers)
    return True


def finish_task(
    method: Any,
    task_index: int,
    batches: Callable[[], Iterable[dict[str, Any]]],
    mean_over_workers: Callable[[torch.Tensor], torch.Tensor] = _identity,
) -> bool:
    """End task ``task_index``: the optional ``consolidate`` pass, then ``end_task``.

    ``batches`` is called (once) only if the method consolidates, so methods without the hook
    cost no extra pass over the data. Returns True if ``consolidate`` ran.
    """
    hook = getattr(method, "consolidate", None)
    if hook is not None:
        hook(task_index, batches(), mean_over_workers)
    method.end_task(task_index)
    return hook is not None


@dataclass
class MethodInfo:
    """What the dry run prints per method."""

    name: str
    total_params: int
    trainable_params: int
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def trainable_share(self) -> float:
        return self.trainable_params / max(1, self.total_params)
