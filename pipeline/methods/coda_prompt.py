"""CODA-Prompt: a prompt assembled per input as an attention-weighted sum of prompt components;
each task adds its own components, and earlier tasks' components are frozen.

Paper: J. S. Smith et al., "CODA-Prompt: COntinual Decomposed Attention-based Prompting for
Rehearsal-Free Continual Learning" (CVPR 2023, arXiv:2211.13218), Sec. 4; reference code
github.com/GT-RIPL/CODA-Prompt (``models/zoo.py``). ModalPrompt (arXiv:2410.05849, Appendix D)
runs it on LLaVA with pool size M = 10 and prompt length 10; those are the defaults.

    components  P (M, L, d_llm), keys K (M, d_guide), attention vectors A (M, d_guide)
    query       q(x): the frozen guide's feature of the input (no gradient)
    weights     alpha_m = cos(q * A_m, K_m)       (* is the element-wise product)
    prompt      p(x) = sum_m alpha_m P_m          (L soft tokens, per sample, no task id)
    loss        LM loss (+ ortho_weight * the orthogonality penalty, 0 by default)

Choices the LLaVA adaptation forces (options in ``CodaPromptOptions``):

* Allotting components to tasks: as the reference code, task t owns components
  [t * c, (t + 1) * c) with c = pool_size // n_tasks (``components_per_task`` overrides c).
  CoIN has 8 tasks, so M = 10 gives one component per task and two never used, exactly what the
  reference code does with these settings. While task t trains, the weights are computed over
  the components of tasks 0..t and only task t's receive gradients; at test all learned ones are
  used. A run with more tasks than the pool allots stops at that task's start, by name.
* Orthogonality: each new task's components, keys and attention vectors start orthogonal to all
  earlier ones (Gram-Schmidt, the reference's init). The components are then rescaled so that
  each soft token has the RMS norm of a vocabulary embedding row (the reference's unit vectors
  are far below an LLM's embedding scale). The orthogonality penalty of the paper's Eq. 7 is an
  option, 0 by default as in the reference code's published runs ("now can be 0").
* The query: CODA queries with the frozen ViT's [CLS] feature; in LLaVA the frozen single-vector
  image feature is the guide CLIP's image embedding (``query: image``); ``image_text`` adds the
  instruction embedding for comparison.
* Where the prompt goes: the reference prefix-tunes ViT layers 0-4; here, as for L2P and as
  ModalPrompt prompts LLaVA, the prompt is L input-embedding tokens after BOS.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from pipeline.methods.base import MethodBase
from pipeline.methods.helpers import base_embeds, gathered, guide_query, usage_diagnostics
from pipeline.methods.protocol import Diagnostics, Generation
from pipeline.methods.registry import register
from pipeline.methods.l2p import QUERIES


@dataclass
class CodaPromptOptions:
    """Config section of ``method: coda_prompt``."""

    pool_size: int = 10  # M: prompt components over the whole run
    length: int = 10  # L: soft tokens per prompt
    n_tasks: int = 8  # tasks the pool is split over (CoIN: 8)
    components_per_task: int = 0  # 0: pool_size // n_tasks (the reference's split)
    ortho_weight: float = 0.0  # weight of the orthogonality penalty (Eq. 7)
    query: str = "image"  # "image" | "image_text"

    def __post_init__(self) -> None:
        if self.pool_size < 1 or self.length < 1 or self.n_tasks < 1:
            raise ValueError("coda_prompt: pool_size, length and n_tasks must be >= 1 "
                             f"(got {self.pool_size}, {self.length}, {self.n_tasks})")
        if self.components_per_task < 0:
            raise ValueError(f"coda_prompt: components_per_task must be >= 0 (got {self.components_per_task})")
        if self.per_task < 1:
            raise ValueError(f"coda_prompt: pool_size={self.pool_size} gives no component to each of "
                             f"n_tasks={self.n_tasks} tasks; raise pool_size or set components_per_task")
        if self.ortho_weight < 0:
            raise ValueError(f"coda_prompt: ortho_weight must be >= 0 (got {self.ortho_weight})")
        if self.query not in QUERIES:
            raise ValueError(f"coda_prompt: query must be one of {QUERIES} (got {self.query!r})")

    @property
    def per_task(self) -> int:
        return self.components_per_task or self.pool_size // self.n_tasks

    @property
    def max_tasks(self) -> int:
        return self.pool_size // self.per_task


def orthogonal_rows(n: int, dim: int, against: torch.Tensor | None, device: Any = None) -> torch.Tensor:
    """(n, dim) unit rows orthogonal to each other and to the span of ``against`` (k, dim):
    Gram-Schmidt on Gaussian draws from the current RNG, as the reference initialises. The old
    rows need not be orthogonal any more (they trained): their span is orthonormalised first."""
    k = 0 if against is None else len(against)
    if k + n > dim:
        raise ValueError(f"coda_prompt: {k + n} orthogonal vectors do not fit in {dim} dimensions")
    basis = torch.linalg.qr(against.float().T).Q if k else torch.zeros(dim, 0, device=device)  # (dim, k)
    out: list[torch.Tensor] = []
    for _ in range(n):
        v = torch.randn(dim, device=device)
        for _pass in range(2):  # twice: numerically orthogonal, not just nearly
            v = v - basis @ (basis.T @ v)
            for b in out:
                v = v - (v @ b) * b
        out.append(v / v.norm())
    return torch.stack(out)


class TaskComponents(nn.Module):
    """One task's components, keys and attention vectors (a module so that ZeRO-3 gathers them
    around its forward)."""

    def __init__(self, components: torch.Tensor, keys: torch.Tensor, attention: torch.Tensor) -> None:
        super().__init__()
        self.components = nn.Parameter(components)  # (c, L, d_llm)
        self.keys = nn.Parameter(keys)  # (c, d_guide)
        self.attention = nn.Parameter(attention)  # (c, d_guide)

    def forward(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        return self.components, self.keys, self.attention


@register("coda_prompt")
class CodaPrompt(MethodBase):
    """Attention-weighted prompt components, one slice per task; see the module docstring.
    State: ``tasks.<t>.components`` (c, L, d_llm), ``.keys`` and ``.attention`` (c, d_guide)."""

    options_class: ClassVar[type] = CodaPromptOptions
    sweep_space: ClassVar[dict[str, Any]] = {
        "length": {"choice": [5, 10, 20]}, "ortho_weight": {"choice": [0.0, 1e-4, 1e-2]},
        "method.lr": {"loguniform": [1e-3, 3e-2]},  # the prompts' rate
    }

    def __init__(self, options: dict[str, Any] | None, lmm: Any, guide: Any) -> None:
        super().__init__(options, lmm, guide)
        self.opts: CodaPromptOptions
        self.tasks = nn.ModuleList()
        self.d_guide = int(guide.dim)
        table = lmm.model.get_input_embeddings().weight.detach()
        self.d_llm = int(table.shape[1])
        self._device = table.device
        # the RMS norm of a vocabulary row: the scale each soft token is given
        self._token_norm = float(table.float().norm(dim=1).pow(2).mean().sqrt()) if table.device.type != "meta" else 1.0
        if self.opts.pool_size > self.d_guide:
            raise ValueError(f"coda_prompt: pool_size={self.opts.pool_size} orthogonal keys do not fit in the "
                             f"guide's {self.d_guide} dimensions")

    @property
    def num_tasks(self) -> int:
        return len(self.tasks)

    def _new_task(self) -> None:
        t, o = self.num_tasks, self.opts
        if t >= o.max_tasks:
            raise ValueError(f"coda_prompt: task {t + 1} has no components left: pool_size={o.pool_size} with "
                             f"{o.per_task} per task holds {o.max_tasks} tasks (set method.options pool_size "
                             "or n_tasks / components_per_task)")
        c, dev = o.per_task, self._device
        if dev.type == "meta":
            comp, keys, att = (torch.empty(c, o.length, self.d_llm, device=dev), torch.empty(c, self.d_guide, device=dev),
                               torch.empty(c, self.d_guide, device=dev))
        else:
            old = [task() for task in self.tasks]
            flat_old = torch.cat([p.detach().flatten(1) for p, _, _ in old]) if old else None
            comp = orthogonal_rows(c, o.length * self.d_llm, flat_old, dev)
            comp = (comp * self._token_norm * o.length ** 0.5).reshape(c, o.length, self.d_llm)
            keys = orthogonal_rows(c, self.d_guide, torch.cat([k.detach() for _, k, _ in old]) if old else None, dev)
            att = orthogonal_rows(c, self.d_guide, torch.cat([a.detach() for _, _, a in old]) if old else None, dev)
        self.tasks.append(TaskComponents(comp, keys, att))

    def begin_task(self, task_index: int, task_name: str = "") -> None:
        """Add task ``task_index``'s components (``num_tasks - 1`` resumes the latest task) and
        make only them trainable."""
        if task_index == self.num_tasks:
            self._new_task()
        elif task_index != self.num_tasks - 1:
            raise ValueError(f"coda_prompt: begin_task({task_index}) with {self.num_tasks} tasks learned")
        for t, task in enumerate(self.tasks):
            task.requires_grad_(t == task_index)

    # ------------------------------------------------------------------ state
    def state_tensors(self) -> dict[str, torch.Tensor]:
        with gathered(self.parameters()):
            return {k: v.detach().cpu().contiguous().clone() for k, v in self.state_dict().items()}

    def load_state_tensors(self, tensors: dict[str, torch.Tensor]) -> None:
        """Restore every learned task from the names alone (a fresh method has no tasks)."""
        ids = {int(m.group(1)) for k in tensors if (m := re.match(r"tasks\.(\d+)\.", k))}
        n = max(ids) + 1 if ids else 0
        while self.num_tasks < n:
            c, o = self.opts.per_task, self.opts
            self.tasks.append(TaskComponents(torch.zeros(c, o.length, self.d_llm, device=self._device),
                                             torch.zeros(c, self.d_guide, device=self._device),
                                             torch.zeros(c, self.d_guide, device=self._device)))
        with gathered(self.parameters(), modifier_rank=0):
            self.load_state_dict(tensors, strict=True)
        self.tasks.requires_grad_(False)

    def task_keys(self, task_index: int) -> list[str]:
        return sorted(k for k in self.state_dict() if k.startswith(f"tasks.{task_index}."))

    # ------------------------------------------------------------------ the prompt
    def bank(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Every learned component, key and attention vector, tasks in order: (n, L, d_llm),
        (n, d_guide), (n, d_guide). Frozen tasks' rows carry no gradient."""
        outs = [task() for task in self.tasks]
        return tuple(torch.cat(parts) for parts in zip(*outs))  # type: ignore[return-value]

    def weights(self, q: torch.Tensor, keys: torch.Tensor, attention: torch.Tensor) -> torch.Tensor:
        """(B, n) alpha = cos(q * A_m, K_m) for every sample and component."""
        attended = q.unsqueeze(1) * attention.float().to(q.device).unsqueeze(0)  # (B, n, d_guide)
        return F.cosine_similarity(attended, keys.float().to(q.device).unsqueeze(0), dim=-1)

    def prompt(self, batch: dict[str, Any]) -> tuple[torch.Tensor, torch.Tensor]:
        """(B, L, d_llm) per-sample prompt and (B, n) its weights."""
        components, keys, attention = self.bank()
        alpha = self.weights(guide_query(self.guide, batch, self.opts.query), keys, attention)
        return torch.einsum("bn,nld->bld", alpha.to(components.dtype), components), alpha

    def ortho_penalty(self) -> torch.Tensor:
        """||X X^T - I||^2 summed over components (flattened), keys and attention vectors (Eq. 7)."""
        total = 0.0
        for x in self.bank():
            x = x.flatten(1).float()
            total = total + ((x @ x.T - torch.eye(len(x), device=x.device)) ** 2).mean()
        return total  # type: ignore[return-value]

    def training_loss(self, batch: dict[str, Any]) -> tuple[torch.Tensor, dict[str, float]]:
        if not self.tasks:
            raise RuntimeError("coda_prompt: begin_task before training")
        embeds = base_embeds(self.lmm, batch)
        prompt, _ = self.prompt(batch)
        embeds, mask, labels = self.lmm.insert_prefix(embeds, batch["attention_mask"], batch["labels"],
                                                      prompt.to(embeds.dtype))
        lm = self.lmm.lm_loss(embeds, mask, labels)
        loss, logs = lm, {"lm_loss": lm.item()}
        if self.opts.ortho_weight > 0:
            ortho = self.ortho_penalty()
            loss = lm + self.opts.ortho_weight * ortho.to(lm.dtype)
            logs["ortho_loss"] = float(ortho.detach())
        return loss, {"loss": loss.item(), **logs}

    @torch.no_grad()
    def generate(self, batch: dict[str, Any], max_new_tokens: int) -> Generation:
        embeds = base_embeds(self.lmm, batch)
        prompt, alpha = self.prompt(batch)
        embeds, mask, _ = self.lmm.insert_prefix(embeds, batch["attention_mask"], None, prompt.to(embeds.dtype))
        # ``selected``: the component of largest weight; ``scores``: every component's weight
        return Generation(texts=self.lmm.generate(embeds, mask, max_new_tokens),
                          selected=alpha.argmax(dim=1, keepdim=True).tolist(), scores=alpha.cpu())

    @classmethod
    def diagnostics(cls, predictions: dict[str, list[dict[str, Any]]], learned: list[str], out_dir: Path
                    ) -> Diagnostics | None:
        """Which component carries the largest weight for each test task's samples
        (``component_usage.json`` and a heatmap; component j belongs to task j // c)."""
        return usage_diagnostics(predictions, out_dir, stem="component_usage", unit="component", label="CODA-Prompt",
                                 title="CODA-Prompt: share of a task's samples whose largest weight is each component")
