"""The continual-method protocol and the method registry.

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

A method class also names its options dataclass as ``options_class`` (None: no options), so that
a config's options are checked when it is loaded (``validate_method_options``).

Two optional hooks, for methods that need them (the train stage calls them when a method defines
them; ``adjust_gradients`` / ``finish_task`` below are the one place that decides how):

    adjust_gradients(grads)    -> after the backward pass that completes an optimiser step, before
                                  the step: read and replace full gradients through ``grads``
                                  (a ``GradAccess``), e.g. DRAPE's null-space projection. Never
                                  ``p.grad`` directly: under ZeRO the engine keeps gradients in its
                                  own partitioned buffers (the stage passes DeepSpeed's
                                  safe_get_full_grad / safe_set_full_grad).
    consolidate(t, batches, mean_over_workers)
                               -> after task t's last training step, before end_task(t): one pass
                                  over task t's training data (this worker's shard, training
                                  batches) for end-of-task statistics: EWC's Fisher, DRAPE's
                                  feature covariance, ProgLoRA's task embeddings. Whatever it keeps
                                  must be in state_tensors() (the freeze stage stores that), reduced
                                  across data-parallel workers with ``mean_over_workers(tensor)``
                                  (rank 0 writes the state). Gradients here must come from
                                  ``torch.autograd.grad``, which leaves ``.grad`` and the
                                  optimiser engine's gradient hooks alone.

Loss terms (EWC's penalty, LwF's distillation) need no hook: they are part of ``training_loss``.

Design notes (see shared/docs/style.md): one method = one module + one ``@register`` line; the
method is chosen by name in the experiment config; method code never imports ray.
"""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, Callable, ClassVar, Iterable, Iterator, Protocol, runtime_checkable

import torch
from torch import nn


@dataclass
class Generation:
    """Output of ``ContinualMethod.generate`` for one batch.

    texts:    one decoded answer per sample (may be "").
    selected: per sample, the 0-based task indices whose parameters were used, most similar
              first (prompt-selection methods); None for methods that do not select.
    scores:   optional (B, n_tasks) similarity scores used for selection, for diagnostics.
    """

    texts: list[str]
    selected: list[list[int]] | None = None
    scores: torch.Tensor | None = None


@runtime_checkable
class ContinualMethod(Protocol):
    name: ClassVar[str]
    # True only for oracle variants that are given the task id at evaluation time.
    task_id_at_test: ClassVar[bool]
    # How the stage DAG schedules training: "sequential" (train(t) -> freeze(t) -> evaluate(t) for
    # every task), "joint" (one training stage on the union of all tasks: the multi-task bound) or
    # "none" (nothing to train: zero-shot; only evaluation stages run).
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

    This default reads and writes ``p.grad`` (a plain torch optimiser). The train stage passes a
    subclass that goes through the DeepSpeed engine, whose ZeRO stages keep gradients elsewhere.
    """

    def get(self, param: nn.Parameter) -> torch.Tensor | None:
        return param.grad

    def set(self, param: nn.Parameter, grad: torch.Tensor) -> None:
        if param.grad is None:
            param.grad = grad.detach().clone()
        else:
            param.grad.copy_(grad)


def adjust_gradients(method: Any, grads: GradAccess) -> bool:
    """Run the method's optional ``adjust_gradients`` hook; True if it has one."""
    hook = getattr(method, "adjust_gradients", None)
    if hook is None:
        return False
    hook(grads)
    return True


def _identity(tensor: torch.Tensor) -> torch.Tensor:
    return tensor


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


# name -> factory(method_cfg: dict, lmm, guide) -> ContinualMethod
_REGISTRY: dict[str, Callable[..., ContinualMethod]] = {}


def register(name: str) -> Callable[[Callable[..., ContinualMethod]], Callable[..., ContinualMethod]]:
    """Class decorator: ``@register("modalprompt")`` makes the method selectable by name."""

    def deco(factory: Callable[..., ContinualMethod]) -> Callable[..., ContinualMethod]:
        if name in _REGISTRY and _REGISTRY[name] is not factory:
            raise ValueError(f"continual method {name!r} is registered twice")
        _REGISTRY[name] = factory
        return factory

    return deco


def registered_methods() -> list[str]:
    _import_builtin_methods()
    return sorted(_REGISTRY)


def validate_method_options(name: str, options: dict[str, Any] | None) -> None:
    """Check a config's method name and options without building anything (no models needed),
    so that a misspelt option fails when the config is loaded, not on a training worker.

    A method class declares its options dataclass as ``options_class`` (None: takes no options)."""
    _import_builtin_methods()
    if name not in _REGISTRY:
        raise KeyError(f"unknown continual method {name!r}; registered: {sorted(_REGISTRY)}")
    cls = getattr(_REGISTRY[name], "options_class", None)
    if cls is None:
        if options:
            raise ValueError(f"method {name!r}: takes no options (got {sorted(options)})")
        return
    parse_options(name, options, cls)


def build_method(name: str, options: dict[str, Any], lmm: Any, guide: Any) -> ContinualMethod:
    """Build the method called ``name`` with its config ``options`` on a built LMM and guide."""
    _import_builtin_methods()
    if name not in _REGISTRY:
        raise KeyError(f"unknown continual method {name!r}; registered: {sorted(_REGISTRY)}")
    return _REGISTRY[name](options, lmm, guide)


def _import_builtin_methods() -> None:
    # Importing the modules runs their @register lines; kept lazy so importing this module has
    # no side effects.
    from pipeline.methods import builtin  # noqa: F401


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


# ---------------------------------------------------------------------------------------------
# Helpers shared by method modules (no protocol change: methods may use or ignore them).
# ---------------------------------------------------------------------------------------------


def parse_options(method_name: str, options: dict[str, Any] | None, cls: type) -> Any:
    """Build the options dataclass ``cls`` from a method's config section.

    Unknown keys are an error (a typo such as ``temprature`` must not silently fall back to the
    default); values are taken as given, validation of ranges belongs to ``cls.__post_init__``.
    """
    import dataclasses

    options = dict(options or {})
    allowed = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(options) - allowed)
    if unknown:
        raise ValueError(
            f"method {method_name!r}: unknown option(s) {unknown}; allowed options: {sorted(allowed)}"
        )
    return cls(**options)


def hold_frozen(module: nn.Module, **refs: Any) -> None:
    """Attach the frozen base LMM / guide to ``module`` WITHOUT registering them as submodules.

    Registering them would put the whole base model into ``module.parameters()`` and
    ``module.state_dict()`` (so DeepSpeed checkpoints and ``state_tensors`` would carry the 7B
    base weights); a plain attribute keeps the method's module tree = the method's own state.
    """
    for name, ref in refs.items():
        object.__setattr__(module, name, ref)


def base_embeds(lmm: Any, batch: dict[str, Any]) -> torch.Tensor:
    """(B, L, d_llm) input embeddings of the unmodified base model.

    Computed without autograd: nothing upstream of the embeddings (vision tower, projector,
    token embeddings) is trainable in any method here, so keeping their activations is waste.
    """
    with torch.no_grad():
        return lmm.embed(batch["input_ids"], batch["pixel_values"])


def base_lm_loss(lmm: Any, batch: dict[str, Any]) -> tuple[torch.Tensor, dict[str, float]]:
    """Plain LM cross-entropy of the (possibly adapter-injected) LMM on the unprefixed input."""
    loss = lmm.lm_loss(base_embeds(lmm, batch), batch["attention_mask"], batch["labels"])
    return loss, {"loss": loss.item(), "lm_loss": loss.item()}


def base_generate(
    lmm: Any,
    batch: dict[str, Any],
    max_new_tokens: int,
) -> list[str]:
    """Greedy answers of the LMM as it is (with whatever adapters are injected into it)."""
    with torch.no_grad():
        embeds = lmm.embed(batch["input_ids"], batch["pixel_values"])
        return lmm.generate(embeds, batch["attention_mask"], max_new_tokens)


@contextmanager
def gathered(params: Iterable[nn.Parameter], modifier_rank: int | None = None) -> Iterator[None]:
    """Make ZeRO-3-partitioned parameters whole inside the block (a no-op otherwise).

    ``state_tensors`` / ``load_state_tensors`` run inside it so that a method wrapped by a ZeRO-3
    engine saves full tensors, not empty partitions. Collective while something is still
    partitioned (every rank must call); inside a caller's own all-rank gather it does nothing, so
    rank 0 alone may then call ``state_tensors``. ``modifier_rank`` = the rank whose in-place
    writes are broadcast (None: read only).
    """
    params = [p for p in params if hasattr(p, "ds_id")]
    if not params:
        yield
        return
    # Only reached when DeepSpeed already partitioned these parameters.
    import deepspeed
    from deepspeed.runtime.zero.partition_parameters import ZeroParamStatus

    # Parameters an outer context (e.g. the training stage's own gather) already made whole are
    # left alone: DeepSpeed refuses nested gathers of the same parameter.
    partitioned = [p for p in params if p.ds_status == ZeroParamStatus.NOT_AVAILABLE]
    if not partitioned:
        yield
        return
    with deepspeed.zero.GatheredParameters(partitioned, modifier_rank=modifier_rank):
        yield
