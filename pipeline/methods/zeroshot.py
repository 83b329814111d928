"""Zero-shot bound: the frozen base LMM evaluated on every task, nothing trained.

Reported as "Zero-shot" in CoIN (arXiv:2403.08350) and ModalPrompt (arXiv:2410.05849, Tab. 2).
``schedule = "none"``: the stage DAG runs evaluation stages only.
"""

from __future__ import annotations

from typing import Any, ClassVar

import torch
from torch import nn

from pipeline.methods.base import Generation, base_generate, base_lm_loss, hold_frozen, register


@register("zeroshot")
class ZeroShot(nn.Module):
    """The base model as it is; no parameters, empty state."""

    name: ClassVar[str] = "zeroshot"
    task_id_at_test: ClassVar[bool] = False
    schedule: ClassVar[str] = "none"
    options_class: ClassVar[None] = None  # takes no options

    def __init__(self, options: dict[str, Any] | None, lmm: Any, guide: Any) -> None:
        super().__init__()
        if options:
            raise ValueError(f"method 'zeroshot': takes no options (got {sorted(options)})")
        hold_frozen(self, lmm=lmm, guide=guide)

    def begin_task(self, task_index: int, task_name: str = "") -> None:
        pass

    def end_task(self, task_index: int) -> None:
        pass

    def trainable_parameters(self) -> list[nn.Parameter]:
        return []

    @torch.no_grad()
    def training_loss(self, batch: dict[str, Any]) -> tuple[torch.Tensor, dict[str, float]]:
        """The base model's LM loss (no gradient): lets evaluation report a loss for this bound."""
        return base_lm_loss(self.lmm, batch)

    def forward(self, batch: dict[str, Any]) -> torch.Tensor:
        return self.training_loss(batch)[0]

    def generate(self, batch: dict[str, Any], max_new_tokens: int) -> Generation:
        return Generation(texts=base_generate(self.lmm, batch, max_new_tokens))

    def state_tensors(self) -> dict[str, torch.Tensor]:
        return {}

    def load_state_tensors(self, tensors: dict[str, torch.Tensor]) -> None:
        if tensors:
            raise ValueError(f"zeroshot has no state; got {sorted(tensors)[:3]}...")

    def task_keys(self, task_index: int) -> list[str]:
        return []
