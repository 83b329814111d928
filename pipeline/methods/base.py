"""``MethodBase``: the defaults every continual method would otherwise repeat.

Subclass it, set ``options_class`` (and, if the method has one, ``sweep_space``), implement what
the method does, and register it: ``@register("name")`` from ``pipeline.methods.registry``.
See ``pipeline.methods.protocol`` for the protocol and its optional hooks.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, ClassVar

import torch
from torch import nn

from pipeline.methods.helpers import gathered, hold_frozen
from pipeline.methods.protocol import SEQUENTIAL, Diagnostics, Generation
from pipeline.methods.registry import parse_options


class MethodBase(nn.Module):
    """Options parsed and checked (``self.opts``), the frozen LMM/guide held outside the module
    tree (``self.lmm``, ``self.guide``), ``forward`` = the training loss, and the state of every
    registered parameter and buffer as ``state_tensors``. Override what differs."""

    name: ClassVar[str] = ""
    task_id_at_test: ClassVar[bool] = False
    frozen_encoders: ClassVar[bool] = True  # see protocol: the vision tower and guide stay as loaded
    schedule: ClassVar[str] = SEQUENTIAL
    options_class: ClassVar[type | None] = None
    sweep_space: ClassVar[dict[str, Any]] = {}
    replay_per_task: ClassVar[int] = 0
    replay_current: ClassVar[bool] = False  # the replay channel also holds the current task's store

    @classmethod
    def stored_samples(cls, options: dict[str, Any] | None) -> int:
        """Stored training samples per task the method asks for, given its config options."""
        return int(cls.replay_per_task or 0)

    def __init__(self, options: dict[str, Any] | None, lmm: Any, guide: Any) -> None:
        super().__init__()
        self.opts = parse_options(self.name, options, self.options_class)
        hold_frozen(self, lmm=lmm, guide=guide)

    def begin_task(self, task_index: int, task_name: str = "") -> None:
        pass

    def end_task(self, task_index: int) -> None:
        for p in self.trainable_parameters():
            p.requires_grad_(False)

    def trainable_parameters(self) -> list[nn.Parameter]:
        return [p for p in self.parameters() if p.requires_grad]

    def own_parameters(self) -> list[nn.Parameter]:
        """Every parameter that is the method's own state, trainable now or not (the base model's
        weights excluded): what DeepSpeed ZeRO-3 must gather for the method's forward."""
        return list(self.parameters())

    def training_loss(self, batch: dict[str, Any]) -> tuple[torch.Tensor, dict[str, float]]:
        raise NotImplementedError(f"method {self.name!r}: training_loss")

    def forward(self, batch: dict[str, Any]) -> torch.Tensor:
        return self.training_loss(batch)[0]

    def generate(self, batch: dict[str, Any], max_new_tokens: int) -> Generation:
        raise NotImplementedError(f"method {self.name!r}: generate")

    def state_tensors(self) -> dict[str, torch.Tensor]:
        """Every registered tensor, whole (gathered under ZeRO-3), cloned to CPU: a snapshot the
        caller may keep while training goes on."""
        with gathered(self.parameters()):
            return {k: v.detach().cpu().contiguous().clone() for k, v in self.state_dict().items()}

    def load_state_tensors(self, tensors: dict[str, torch.Tensor]) -> None:
        with gathered(self.parameters(), modifier_rank=0):
            self.load_state_dict(tensors, strict=True)

    def task_keys(self, task_index: int) -> list[str]:
        return []

    @classmethod
    def diagnostics(cls, predictions: dict[str, list[dict[str, Any]]], learned: list[str], out_dir: Path
                    ) -> Diagnostics | None:
        """After an evaluate stage: ``predictions`` = task -> the stage's prediction records (with
        ``selected`` / ``scores`` where the method fills them), ``learned`` = the tasks learned so
        far in order. None: nothing to report."""
        return None
