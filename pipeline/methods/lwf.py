"""LwF, Learning without Forgetting, on the sequential LoRA adapter: while task t trains, the
model is also distilled towards the model as it was when task t-1 ended, on task t's own data.

Paper: Z. Li and D. Hoiem, "Learning without Forgetting" (ECCV 2016, TPAMI 2018); a baseline of
CoIN (arXiv:2403.08350) and of ProgLoRA's Table 1. As in CoIN's LLaVA port, the distillation is
over the language model's next-token distributions at the answer positions:

    L = CE(student) + distill_weight * T^2 * KL(softmax(z_teacher / T) || softmax(z_student / T))

with temperature T (``temperature``, 2.0 by default, as LwF's paper) and weight
``distill_weight`` (1.0). The student is the LoRA adapter being trained (``lora``'s options
apply). The teacher is the same adapter's weights when the previous task ended. They are kept in
the method's state (``lwf.teacher.*``), so a resumed task distils towards the same teacher. The
teacher's logits come from ``torch.func.functional_call`` with the teacher's adapter tensors in
place of the student's: nothing is swapped in place. DeepSpeed ZeRO-3's partitioned parameters do
not allow that substitution, so LwF trains under ZeRO-2 (the default, ``cluster/deepspeed/zero2.json``)
and stops with a clear error under ZeRO-3. The first task has no teacher and trains on the
cross-entropy alone.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

import torch
import torch.nn.functional as F

from pipeline.methods.helpers import base_embeds, gathered
from pipeline.methods.lora import LoRAOptions, SequentialLoRA
from pipeline.methods.registry import register

IGNORE = -100
TEACHER = "lwf.teacher."


@dataclass
class LwFOptions(LoRAOptions):
    """Config section of ``method: lwf``: LoRA's options plus the distillation's."""

    temperature: float = 2.0
    distill_weight: float = 1.0

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.temperature <= 0:
            raise ValueError(f"lwf: temperature must be > 0 (got {self.temperature})")
        if self.distill_weight < 0:
            raise ValueError(f"lwf: distill_weight must be >= 0 (got {self.distill_weight})")


def _positions(mask: torch.Tensor) -> torch.Tensor:
    return (mask.long().cumsum(-1) - 1).clamp_(min=0)


@register("lwf")
class LwF(SequentialLoRA):
    """Sequential LoRA plus distillation towards the previous task's model; see the module docstring."""

    options_class: ClassVar[type] = LwFOptions
    sweep_space: ClassVar[dict[str, Any]] = {
        "temperature": {"choice": [1.0, 2.0, 4.0]}, "distill_weight": {"choice": [0.5, 1.0, 2.0]},
        "train.lr": {"loguniform": [1e-4, 1e-2]},
    }

    def __init__(self, options: dict[str, Any] | None, lmm: Any, guide: Any) -> None:
        super().__init__(options, lmm, guide)
        self.opts: LwFOptions
        # the adapter's parameter names inside the LLaVA model (``model.language_model....lora_A.default.weight``)
        ids = {id(p) for p in self._adapter}
        self._adapter_names = [n for n, p in self.model.named_parameters() if id(p) in ids]
        self.teacher: dict[str, torch.Tensor] = {}

    def end_task(self, task_index: int) -> None:
        """The adapter as this task leaves it is the next task's teacher."""
        super().end_task(task_index)
        with gathered(self._adapter):
            params = dict(self.model.named_parameters())
            self.teacher = {n: params[n].detach().clone() for n in self._adapter_names}

    def state_tensors(self) -> dict[str, torch.Tensor]:
        out = super().state_tensors()
        out.update({TEACHER + n: t.detach().cpu().contiguous().clone() for n, t in self.teacher.items()})
        return out

    def load_state_tensors(self, tensors: dict[str, torch.Tensor]) -> None:
        teacher = {k[len(TEACHER):]: v for k, v in tensors.items() if k.startswith(TEACHER)}
        super().load_state_tensors({k: v for k, v in tensors.items() if not k.startswith(TEACHER)})
        if teacher and set(teacher) != set(self._adapter_names):
            raise ValueError("lwf: the stored teacher does not match this model's adapter")
        device = self._adapter[0].device
        self.teacher = {n: t.to(device) for n, t in teacher.items()}

    # ------------------------------------------------------------------ the loss
    def answer_logits(self, embeds: torch.Tensor, mask: torch.Tensor, keep: torch.Tensor,
                      params: dict[str, torch.Tensor] | None = None) -> torch.Tensor:
        """(n_answer_tokens, V) next-token logits at the label positions; ``params``: adapter
        tensors that stand in for the student's (the teacher)."""
        kwargs = {"inputs_embeds": embeds, "attention_mask": mask, "position_ids": _positions(mask), "use_cache": False}
        inner = self.model.model  # LlavaModel: its parameter names are the adapter's minus "model."
        if params is None:
            hidden = inner(**kwargs).last_hidden_state
        else:
            if any(hasattr(p, "ds_id") for p in self._adapter):
                raise RuntimeError("lwf: the teacher's forward substitutes the adapter's tensors, which DeepSpeed "
                                   "ZeRO-3's partitioned parameters do not allow; train LwF with ZeRO-2 "
                                   "(train.deepspeed=cluster/deepspeed/zero2.json, the default)")
            stand_in = {n[len("model."):]: t for n, t in params.items()}
            hidden = torch.func.functional_call(inner, stand_in, (), kwargs, strict=False).last_hidden_state
        return self.model.get_output_embeddings()(hidden[:, :-1][keep]).float()

    def training_loss(self, batch: dict[str, Any]) -> tuple[torch.Tensor, dict[str, float]]:
        mask = batch["attention_mask"].to(self.lmm.device)
        labels = batch["labels"].to(self.lmm.device)
        target = labels[:, 1:]
        keep = target != IGNORE
        embeds = base_embeds(self.lmm, batch)
        if not bool(keep.any()):
            zero = embeds.sum() * 0.0
            return zero, {"loss": 0.0, "lm_loss": 0.0}
        student = self.answer_logits(embeds, mask, keep)
        ce = F.cross_entropy(student, target[keep])
        if not self.teacher or self.opts.distill_weight == 0:
            return ce, {"loss": ce.item(), "lm_loss": ce.item()}
        with torch.no_grad():
            teacher = self.answer_logits(embeds, mask, keep, params=self.teacher)
        t = self.opts.temperature
        kd = F.kl_div(F.log_softmax(student / t, dim=-1), F.log_softmax(teacher / t, dim=-1), log_target=True,
                      reduction="batchmean") * t * t
        loss = ce + self.opts.distill_weight * kd
        return loss, {"loss": loss.item(), "lm_loss": ce.item(), "distill_loss": kd.item()}
