"""MoELoRA, CoIN's method: a mixture of K LoRA experts on each of the LLM's linear layers, with
a router per layer; every expert and router trains on every task.

Papers: S. Dou et al., "LoRAMoE" (arXiv:2312.09979) and C. Chen et al., "CoIN" (arXiv:2403.08350),
where it is the continual baseline; ProgLoRA's Sec. 3.2 gives the layer:

    h = W x + (alpha / r) sum_k R(x)_k B_k A_k x,      R(x) = softmax(W_R x_[0])

with K experts (``experts``, 8) of rank r / K each (``rank`` is the total r, so the trainable
count equals one LoRA of rank r; CoIN: r = 128, so 8 experts of rank 16), on q, k, v, o, gate,
up and down of every LLM layer, and W_R (K x d_in, no bias) per layer.

Choices (options in ``MoELoRAOptions``):

* The router's input x_[0] is the first token of the layer's input: here the first attended
  position of each row (left-padded evaluation batches would otherwise route on padding). Since
  the sequence starts with BOS and attention is causal, that hidden state is the same for every
  input, so this router is in effect a learned, input-independent mixture per layer; that is
  CoIN's behaviour, kept as the default (``router_input: first``). ``router_input: mean``
  averages the layer's input over the attended positions instead, a router that does depend on
  the input, for comparison.
* The routing of a prompt is computed once, on the whole prompt, and kept for the tokens that
  decoding adds (a decoding step sees only its new token).
* Experts: A kaiming-uniform, B zero (peft's LoRA init); router zero (uniform routing at start).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from torch import nn

from pipeline.methods.base import MethodBase
from pipeline.methods.helpers import WrappedLinear, base_embeds, wrap_linears
from pipeline.methods.lora import LLM_LINEAR_TARGETS
from pipeline.methods.protocol import Generation
from pipeline.methods.registry import register

ROUTER_INPUTS = ("first", "mean")


@dataclass
class MoELoRAOptions:
    """Config section of ``method: moelora``."""

    rank: int = 8  # total r over the experts (tiny default; CoIN on LLaVA-1.5-7B: 128)
    experts: int = 8  # K
    alpha: float | None = None  # None = 2 * rank
    router_input: str = "first"  # "first" | "mean"

    def __post_init__(self) -> None:
        if self.experts < 1 or self.rank < self.experts or self.rank % self.experts:
            raise ValueError(f"moelora: rank must be a positive multiple of experts (got rank {self.rank}, "
                             f"experts {self.experts})")
        if self.router_input not in ROUTER_INPUTS:
            raise ValueError(f"moelora: router_input must be one of {ROUTER_INPUTS} (got {self.router_input!r})")
        if self.alpha is None:
            self.alpha = 2.0 * self.rank


class Experts(nn.Module):
    """K experts of rank r/K and the router of one linear layer."""

    def __init__(self, d_in: int, d_out: int, experts: int, rank: int, device: Any) -> None:
        super().__init__()
        self.A = nn.Parameter(torch.empty(experts, rank, d_in, device=device))
        self.B = nn.Parameter(torch.zeros(experts, d_out, rank, device=device))
        self.router = nn.Parameter(torch.zeros(experts, d_in, device=device))
        if torch.device(device).type != "meta":
            for k in range(experts):
                nn.init.kaiming_uniform_(self.A.data[k], a=math.sqrt(5))

    def forward(self, x: torch.Tensor, gate: torch.Tensor) -> torch.Tensor:
        """(B, L, d_in), (B, K) -> (B, L, d_out): sum_k gate_k B_k A_k x."""
        h = torch.einsum("bld,krd->blkr", x.to(self.A.dtype), self.A) * gate[:, None, :, None].to(self.A.dtype)
        return torch.einsum("blkr,kor->blo", h, self.B)

    def route(self, summary: torch.Tensor) -> torch.Tensor:
        """(B, d_in) router input -> (B, K) expert distribution."""
        return torch.softmax(summary.to(self.router.dtype) @ self.router.T, dim=-1)


class MoELinear(WrappedLinear):
    """A frozen LLM linear plus its experts (owned by the method, not registered here)."""

    def __init__(self, base: nn.Linear, target: str, method: "MoELoRA") -> None:
        super().__init__(base, target, method)
        self.last_gate: torch.Tensor | None = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.base(x)
        m = self._method
        ctx = m._active
        if ctx is None:
            return out
        experts = m.experts[self.target]
        if x.shape[1] == ctx["length"]:  # the whole input: route it (and keep it for decoding)
            mask = ctx["mask"].to(x.device)
            if m.opts.router_input == "first":
                summary = x[torch.arange(x.shape[0], device=x.device), ctx["first"].to(x.device)]
            else:
                summary = (x * mask.unsqueeze(-1)).sum(1) / mask.sum(1, keepdim=True).clamp_min(1)
            self.last_gate = experts.route(summary)
        gate = self.last_gate
        return out + m.scale * experts(x, gate).to(out.dtype)


@register("moelora")
class MoELoRA(MethodBase):
    """A mixture of LoRA experts per LLM linear, all trained on every task; see the module
    docstring. State: ``experts.<target>.{A, B, router}``."""

    options_class: ClassVar[type] = MoELoRAOptions
    sweep_space: ClassVar[dict[str, Any]] = {"rank": {"choice": [8, 16]}, "train.lr": {"loguniform": [1e-4, 1e-2]}}

    def __init__(self, options: dict[str, Any] | None, lmm: Any, guide: Any) -> None:
        super().__init__(options, lmm, guide)
        self.opts: MoELoRAOptions
        o = self.opts
        self.scale = float(o.alpha) / o.rank
        device = lmm.model.get_input_embeddings().weight.device
        self._active: dict[str, Any] | None = None
        targets = wrap_linears(lmm.model, LLM_LINEAR_TARGETS, lambda mod, t: MoELinear(mod, t, self), "moelora")
        self.experts = nn.ModuleDict({t: Experts(i, out, o.experts, o.rank // o.experts, device)
                                      for t, (i, out) in targets.items()})
        self.experts.requires_grad_(False)

    # one shared mixture: a task only switches training on and off (nothing is frozen per task)
    def begin_task(self, task_index: int, task_name: str = "") -> None:
        self.experts.requires_grad_(True)

    def load_state_tensors(self, tensors: dict[str, torch.Tensor]) -> None:
        super().load_state_tensors(tensors)
        self.experts.requires_grad_(False)

    def _arm(self, mask: torch.Tensor, length: int) -> None:
        self._active = {"mask": mask, "first": mask.argmax(dim=1), "length": length}

    def gates(self) -> dict[str, torch.Tensor]:
        """The routing of the last call, per wrapped layer: (B, K) each."""
        return {m.target: m.last_gate for m in self.lmm.model.modules() if isinstance(m, MoELinear)}

    def training_loss(self, batch: dict[str, Any]) -> tuple[torch.Tensor, dict[str, float]]:
        embeds = base_embeds(self.lmm, batch)
        mask = batch["attention_mask"].to(embeds.device)
        self._arm(mask, embeds.shape[1])
        try:
            loss = self.lmm.lm_loss(embeds, mask, batch["labels"])
        finally:
            self._active = None
        return loss, {"loss": loss.item(), "lm_loss": loss.item()}

    @torch.no_grad()
    def generate(self, batch: dict[str, Any], max_new_tokens: int) -> Generation:
        embeds = base_embeds(self.lmm, batch)
        mask = batch["attention_mask"].to(embeds.device)
        self._arm(mask, embeds.shape[1])
        try:
            texts = self.lmm.generate(embeds, mask, max_new_tokens)
        finally:
            self._active = None
        return Generation(texts=texts)
