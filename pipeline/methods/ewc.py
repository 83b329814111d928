"""EWC on the sequential LoRA adapter: the regularisation baseline.

Paper: J. Kirkpatrick et al., "Overcoming catastrophic forgetting in neural networks" (PNAS 2017);
an MCIT baseline in CoIN and ModalPrompt (a quadratic penalty with the diagonal Fisher of the
previous tasks).

The LoRA adapter of ``lora`` (same targets, same options) trains task after task. After task s
(the ``consolidate`` hook, one pass over the task's training data) the method keeps, per adapter
tensor, the diagonal Fisher F_s and the weights theta*_s. Training task t then minimises

    LM loss + (ewc_lambda / 2) * sum_{s < t} sum_i F_s,i (theta_i - theta*_s,i)^2

Fisher estimate: the mean over the task's training batches of the squared gradient of the batch's
mean LM loss (the empirical Fisher on mini-batches, as continual-learning libraries such as
Avalanche compute it); ``fisher_batches`` caps the pass. Per-task F_s and theta*_s are stored
separately (not merged), so task s's entries are bit-identical forever after it ends, like every
method's frozen task state.

Supported under plain torch and DeepSpeed ZeRO-1/2 (the adapter must be whole on every rank: the
penalty reads the parameters directly). The default ``ewc_lambda`` (1e5) was chosen on the
embedded default; the Fisher's scale depends on the model and the data, so choose it again for
another setting (the README gives the grid).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any, Callable, ClassVar, Iterable

import torch

from pipeline.methods.helpers import gathered, base_lm_loss
from pipeline.methods.registry import register
from pipeline.methods.lora import LoRAOptions, SequentialLoRA

_KEY = re.compile(r"ewc\.(\d+)\.(fisher|anchor)\.(.+)")


@dataclass
class EWCOptions(LoRAOptions):
    """Config section of ``method: ewc``: the LoRA options plus the penalty's."""

    ewc_lambda: float = 1e5  # chosen on CoIN-synth by Avg over 1e2, 1e4, 1e5, 1e6 (README)
    fisher_batches: int | None = None  # None = the whole task (this worker's shard)

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.ewc_lambda < 0:
            raise ValueError(f"ewc: ewc_lambda must be >= 0 (got {self.ewc_lambda})")
        if self.fisher_batches is not None and self.fisher_batches < 1:
            raise ValueError(f"ewc: fisher_batches must be >= 1 or null (got {self.fisher_batches})")


@register("ewc")
class EWC(SequentialLoRA):
    """Sequential LoRA + the EWC penalty of every earlier task; see the module docstring.

    ``state_tensors()`` = the adapter (as ``lora``) plus ``ewc.{s}.fisher.{param}`` and
    ``ewc.{s}.anchor.{param}`` (float32) for every consolidated task s, ``param`` being the adapter
    parameter's module path (e.g. ``language_model.layers.0.self_attn.q_proj.lora_A.default.weight``).
    """

    name: ClassVar[str] = "ewc"
    options_class: ClassVar[type] = EWCOptions

    def __init__(self, options: dict[str, Any] | None, lmm: Any, guide: Any) -> None:
        super().__init__(options, lmm, guide)
        names = {id(p): n for n, p in self.model.named_parameters()}
        self._names = [names[id(p)] for p in self._adapter]
        self._fisher: list[list[torch.Tensor]] = []  # [task][adapter tensor]
        self._anchor: list[list[torch.Tensor]] = []

    @property
    def consolidated_tasks(self) -> int:
        return len(self._fisher)

    # ------------------------------------------------------------------ training
    def penalty(self) -> torch.Tensor:
        """sum over consolidated tasks s and adapter entries i of F_s,i (theta_i - theta*_s,i)^2."""
        total = torch.zeros((), device=self._adapter[0].device)
        for fisher, anchor in zip(self._fisher, self._anchor):
            for p, f, a in zip(self._adapter, fisher, anchor):
                total = total + (f * (p.float() - a) ** 2).sum()
        return total

    def training_loss(self, batch: dict[str, Any]) -> tuple[torch.Tensor, dict[str, float]]:
        lm, logs = base_lm_loss(self.lmm, batch)
        if not self._fisher or self.opts.ewc_lambda == 0:
            return lm, {**logs, "ewc_penalty": 0.0}
        penalty = self.penalty()
        loss = lm + 0.5 * self.opts.ewc_lambda * penalty.to(lm.dtype)
        return loss, {"loss": loss.item(), "lm_loss": lm.item(), "ewc_penalty": penalty.item()}

    def consolidate(self, task_index: int, batches: Iterable[dict[str, Any]],
                    mean_over_workers: Callable[[torch.Tensor], torch.Tensor]) -> None:
        """Diagonal Fisher and anchor weights of task ``task_index`` (called before ``end_task``)."""
        if task_index != self.consolidated_tasks:
            raise ValueError(f"ewc: consolidate({task_index}) but {self.consolidated_tasks} task(s) are "
                             "consolidated; tasks are consolidated once, in order")
        params = self._adapter
        if not all(p.requires_grad for p in params):
            raise RuntimeError("ewc: consolidate runs before end_task, while the adapter is trainable")
        # outside the engine's forward: under ZeRO-3 the adapter is whole only inside ``gathered``
        # (the forward passes below gather and release it themselves)
        with gathered(params):
            anchor = [p.detach().float().clone() for p in params]
        fisher = [torch.zeros_like(a) for a in anchor]
        n = 0
        for batch in batches:
            if self.opts.fisher_batches is not None and n >= self.opts.fisher_batches:
                break
            loss, _ = base_lm_loss(self.lmm, batch)
            for f, g in zip(fisher, torch.autograd.grad(loss, params)):
                f += g.detach().float() ** 2
            n += 1
        if n == 0:
            raise ValueError(f"ewc: no training batch to estimate task {task_index}'s Fisher from")
        self._fisher.append([mean_over_workers(f / n) for f in fisher])
        self._anchor.append(anchor)

    # ------------------------------------------------------------------ state
    def state_tensors(self) -> dict[str, torch.Tensor]:
        state = super().state_tensors()
        for s, (fisher, anchor) in enumerate(zip(self._fisher, self._anchor)):
            for name, f, a in zip(self._names, fisher, anchor):
                state[f"ewc.{s}.fisher.{name}"] = f.detach().cpu().contiguous().clone()
                state[f"ewc.{s}.anchor.{name}"] = a.detach().cpu().contiguous().clone()
        return state

    def load_state_tensors(self, tensors: dict[str, torch.Tensor]) -> None:
        adapter = {k: v for k, v in tensors.items() if not k.startswith("ewc.")}
        super().load_state_tensors(adapter)
        found: dict[int, dict[str, dict[str, torch.Tensor]]] = {}
        for key, value in tensors.items():
            if not key.startswith("ewc."):
                continue
            m = _KEY.fullmatch(key)
            if m is None or m.group(3) not in self._names:
                raise ValueError(f"ewc: unexpected state tensor {key!r}")
            found.setdefault(int(m.group(1)), {}).setdefault(m.group(2), {})[m.group(3)] = value
        if sorted(found) != list(range(len(found))):
            raise ValueError(f"ewc: state holds tasks {sorted(found)}; expected 0..{len(found) - 1}")
        device = self._adapter[0].device
        fishers, anchors = [], []
        for s in range(len(found)):
            for kind in ("fisher", "anchor"):
                missing = [n for n in self._names if n not in found[s].get(kind, {})]
                if missing:
                    raise ValueError(f"ewc: task {s} state lacks {kind} of {missing[:3]}")
            fishers.append([found[s]["fisher"][n].to(device, torch.float32) for n in self._names])
            anchors.append([found[s]["anchor"][n].to(device, torch.float32) for n in self._names])
        self._fisher, self._anchor = fishers, anchors

    def task_keys(self, task_index: int) -> list[str]:
        """Task s's Fisher and anchor (the shared adapter itself keeps training, as in ``lora``)."""
        if task_index >= self.consolidated_tasks:
            return []
        return sorted(f"ewc.{task_index}.{kind}.{n}" for kind in ("fisher", "anchor") for n in self._names)
