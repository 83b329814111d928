"""Multi-task bound: one LoRA adapter trained jointly on the union of all tasks.

Reported as "Multi-task" in CoIN (arXiv:2403.08350) and ModalPrompt (arXiv:2410.05849, Tab. 2).
``schedule = "joint"``: the stage DAG runs ONE training stage on the union of every task's training
data, then evaluates all tasks. The adapter logic is ``lora.SequentialLoRA``, reused by composition:
this class only changes the schedule. Options are those of ``lora`` (rank, alpha, dropout).
"""

from __future__ import annotations

from typing import Any, ClassVar

import torch
from torch import nn

from pipeline.methods.base import MethodBase
from pipeline.methods.lora import LoRAOptions, SequentialLoRA
from pipeline.methods.protocol import JOINT, Generation
from pipeline.methods.registry import register


@register("multitask")
class MultiTaskLoRA(MethodBase):
    """Joint-training wrapper around one ``SequentialLoRA``; state names are the inner ones."""

    schedule: ClassVar[str] = JOINT
    options_class: ClassVar[type] = LoRAOptions

    def __init__(self, options: dict[str, Any] | None, lmm: Any, guide: Any) -> None:
        super().__init__(options, lmm, guide)  # errors name "multitask", not "lora"
        self.lora = SequentialLoRA(options, lmm, guide)

    def begin_task(self, task_index: int, task_name: str = "") -> None:
        self.lora.begin_task(task_index, task_name)

    def end_task(self, task_index: int) -> None:
        self.lora.end_task(task_index)

    def trainable_parameters(self) -> list[nn.Parameter]:
        return self.lora.trainable_parameters()

    def training_loss(self, batch: dict[str, Any]) -> tuple[torch.Tensor, dict[str, float]]:
        return self.lora.training_loss(batch)

    def generate(self, batch: dict[str, Any], max_new_tokens: int) -> Generation:
        return self.lora.generate(batch, max_new_tokens)

    def state_tensors(self) -> dict[str, torch.Tensor]:
        return self.lora.state_tensors()

    def load_state_tensors(self, tensors: dict[str, torch.Tensor]) -> None:
        self.lora.load_state_tensors(tensors)

    def task_keys(self, task_index: int) -> list[str]:
        """Empty: one jointly trained adapter, no per-task state."""
        return []
