"""Zero-shot bound: the frozen base LMM evaluated on every task, nothing trained.

Reported as "Zero-shot" in CoIN (arXiv:2403.08350) and ModalPrompt (arXiv:2410.05849, Tab. 2).
``schedule = "none"``: the stage DAG runs evaluation stages only.
"""

from __future__ import annotations

from typing import Any, ClassVar

import torch
from torch import nn

from pipeline.methods.base import MethodBase
from pipeline.methods.helpers import base_generate, base_lm_loss
from pipeline.methods.protocol import NONE, Generation
from pipeline.methods.registry import register


@register("zeroshot")
class ZeroShot(MethodBase):
    """The base model as it is; no parameters, empty state."""

    schedule: ClassVar[str] = NONE

    def trainable_parameters(self) -> list[nn.Parameter]:
        return []

    @torch.no_grad()
    def training_loss(self, batch: dict[str, Any]) -> tuple[torch.Tensor, dict[str, float]]:
        """The base model's LM loss (no gradient): lets evaluation report a loss for this bound."""
        return base_lm_loss(self.lmm, batch)

    def generate(self, batch: dict[str, Any], max_new_tokens: int) -> Generation:
        return Generation(texts=base_generate(self.lmm, batch, max_new_tokens))

    def state_tensors(self) -> dict[str, torch.Tensor]:
        return {}

    def load_state_tensors(self, tensors: dict[str, torch.Tensor]) -> None:
        if tensors:
            raise ValueError(f"zeroshot has no state; got {sorted(tensors)[:3]}...")
