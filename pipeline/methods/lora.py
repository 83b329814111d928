"""Sequential fine-tuning with one LoRA adapter: the forgetting lower bound.

Papers: E. J. Hu et al., "LoRA: Low-Rank Adaptation of Large Language Models" (ICLR 2022); used as the
"Finetune"/"LoRA" baseline of CoIN (C. Chen et al., "CoIN: A Benchmark of Continual Instruction tuNing
for Multimodel Large Language Model", arXiv:2403.08350) and of ModalPrompt (arXiv:2410.05849).

One peft LoRA adapter is injected in place (``peft.inject_adapter_in_model``) into the linear layers
q, k, v, o, gate, up, down of the LANGUAGE model only (a regex target keeps the vision tower and the
projector untouched); the base weights stay frozen. The same adapter keeps training task after task
with no protection, so ``task_keys(t)`` is empty: nothing is frozen per task.

The adapted ``nn.Module`` (``lmm.model``) is registered as the submodule ``model`` so that a DeepSpeed
engine wrapping this method sees (and checkpoints / gathers under ZeRO-3) the adapter weights.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from torch import nn

from pipeline.methods.base import MethodBase
from pipeline.methods.helpers import base_generate, base_lm_loss, gathered
from pipeline.methods.protocol import Generation
from pipeline.methods.registry import register

# Full-match regex over module names of LlavaForConditionalGeneration (transformers 5:
# ``model.language_model.layers.N.self_attn.q_proj``); the CLIP tower lives under
# ``model.vision_tower`` and never matches.
LLM_LINEAR_TARGETS = r".*language_model\..*\.(q_proj|k_proj|v_proj|o_proj|gate_proj|up_proj|down_proj)"
ADAPTER = "default"


@dataclass
class LoRAOptions:
    """Config section of ``method: lora`` / ``method: multitask``."""

    rank: int = 8  # tiny default; configs for LLaVA-1.5-7B set 128 (CoIN)
    alpha: float | None = None  # None = 2 * rank
    dropout: float = 0.0

    def __post_init__(self) -> None:
        if self.rank < 1:
            raise ValueError(f"lora: rank must be >= 1 (got {self.rank})")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"lora: dropout must be in [0, 1) (got {self.dropout})")
        if self.alpha is None:
            self.alpha = 2.0 * self.rank


def inject_lora(model: nn.Module, opts: LoRAOptions) -> list[nn.Parameter]:
    """Inject one LoRA adapter into ``model`` in place; returns the adapter parameters."""
    from peft import LoraConfig, inject_adapter_in_model

    if getattr(model, "peft_config", None):
        # A second injection would silently stack adapters on the same base object.
        raise RuntimeError("lora: this LMM already carries a peft adapter; build a fresh LMM per method")
    config = LoraConfig(
        r=opts.rank,
        lora_alpha=opts.alpha,
        lora_dropout=opts.dropout,
        target_modules=LLM_LINEAR_TARGETS,
        bias="none",
    )
    inject_adapter_in_model(config, model, adapter_name=ADAPTER)
    params = [p for n, p in model.named_parameters() if ".lora_" in n]
    if not params:
        raise RuntimeError(f"lora: no module of the LMM matched {LLM_LINEAR_TARGETS!r}")
    return params


@register("lora")
class SequentialLoRA(MethodBase):
    """One LoRA adapter on the LLM, fine-tuned on every task in turn (no forgetting protection).

    ``state_tensors()`` = the adapter weights as ``peft.get_peft_model_state_dict`` names them
    (adapter name removed), e.g. ``model.language_model.layers.0.self_attn.q_proj.lora_A.weight``
    (rank, d_in) and ``...lora_B.weight`` (d_out, rank).
    """

    options_class: ClassVar[type] = LoRAOptions  # subclasses (ewc) extend the options
    sweep_space: ClassVar[dict[str, Any]] = {"rank": {"choice": [4, 8, 16]}, "train.lr": {"loguniform": [1e-4, 1e-2]}}

    def __init__(self, options: dict[str, Any] | None, lmm: Any, guide: Any) -> None:
        super().__init__(options, lmm, guide)
        self.opts: LoRAOptions
        self._adapter = inject_lora(lmm.model, self.opts)
        self.model = lmm.model  # registered: see the module docstring
        self._set_trainable(False)

    def _set_trainable(self, flag: bool) -> None:
        for p in self._adapter:
            p.requires_grad_(flag)

    # The adapter is shared by all tasks: begin/end only switch training on and off.
    def begin_task(self, task_index: int, task_name: str = "") -> None:
        self._set_trainable(True)

    def end_task(self, task_index: int) -> None:
        self._set_trainable(False)

    def trainable_parameters(self) -> list[nn.Parameter]:
        return [p for p in self._adapter if p.requires_grad]

    def own_parameters(self) -> list[nn.Parameter]:
        """The adapter (``self.model`` is the whole LMM, registered for the engine's sake)."""
        return list(self._adapter)

    def training_loss(self, batch: dict[str, Any]) -> tuple[torch.Tensor, dict[str, float]]:
        """Plain LM cross-entropy of the adapted LMM."""
        return base_lm_loss(self.lmm, batch)

    def generate(self, batch: dict[str, Any], max_new_tokens: int) -> Generation:
        return Generation(texts=base_generate(self.lmm, batch, max_new_tokens))

    def state_tensors(self) -> dict[str, torch.Tensor]:
        from peft import get_peft_model_state_dict

        with gathered(self._adapter):
            state = get_peft_model_state_dict(self.model, adapter_name=ADAPTER)
            return {k: v.detach().cpu().contiguous().clone() for k, v in state.items()}

    def load_state_tensors(self, tensors: dict[str, torch.Tensor]) -> None:
        from peft import set_peft_model_state_dict

        with gathered(self._adapter, modifier_rank=0):
            result = set_peft_model_state_dict(self.model, dict(tensors), adapter_name=ADAPTER)
        missing = [k for k in result.missing_keys if ".lora_" in k]
        if missing or result.unexpected_keys:
            raise ValueError(
                f"lora: adapter state does not match this model "
                f"(missing {missing[:3]}..., unexpected {list(result.unexpected_keys)[:3]}...)"
            )

    def task_keys(self, task_index: int) -> list[str]:
        """Empty: one shared adapter keeps training, nothing is frozen per task (by design)."""
        return []
