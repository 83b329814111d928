"""L2P, Learning to Prompt: a pool of prompts shared by all tasks, each with a key; every input
picks its N nearest keys by a frozen query feature and is prefixed with their prompts.

Paper: Z. Wang et al., "Learning to Prompt for Continual Learning" (CVPR 2022, arXiv:2112.08654),
Sec. 4; reference code github.com/google-research/l2p (JAX) and its PyTorch port
github.com/JH-LEE-KR/l2p-pytorch. ModalPrompt (arXiv:2410.05849, Appendix D) runs it on LLaVA
with pool size 10, prompt length 10 and N = 3 prompts per input; those are the defaults.

    prompts  (pool, L, d_llm)   soft tokens, prepended after BOS (``lmm.insert_prefix``)
    keys     (pool, d_guide)    one key per prompt
    query    q(x)               the frozen guide's feature of the input (no gradient)
    select   top-N of cos(q(x), keys), per sample, no task id (training and test alike)
    loss     LM loss + key_loss_weight * mean_j (1 - cos(q(x), key_j)) over the selected keys
             (the paper's surrogate loss: it pulls the selected keys towards their queries)

Choices the LLaVA adaptation forces (options in ``L2POptions``):

* The query: L2P queries with the frozen backbone's [CLS] feature of the image. In LLaVA the
  frozen image encoder whose feature is a single vector per image is the guide CLIP, so the
  default query is its image embedding (``query: image``); ``image_text`` averages the normalised
  image and instruction embeddings (ModalPrompt's two modalities, for comparison).
* Where prompts go: L2P prepends the selected prompts to the input tokens of the frozen
  transformer (prompt tuning); here they are input-embedding tokens of the LLM, after BOS, in
  order of similarity (most similar last, next to the image and text).
* Initialisation: prompts copy random vocabulary rows (as ModalPrompt's and TRACE's LLM ports of
  L2P do: uniform noise is far off the embedding scale of an LLM); keys are uniform in [-1, 1]
  as in L2P.
* The key-loss weight: 0.1, l2p-pytorch's ``pull_constraint_coeff``.
* No per-task state: the pool keeps training on every task (L2P's design: sharing is what the
  pool is for), so ``task_keys`` is empty and no tensor is frozen per task. Batch-wise prompt
  selection and the frequency penalty of L2P's Sec. 4.3 are left out (L2P's own code disables
  them for the task-incremental setting of this benchmark's order).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from pipeline.methods.base import MethodBase
from pipeline.methods.helpers import base_embeds, guide_query, initial_prompts, usage_diagnostics
from pipeline.methods.protocol import Diagnostics, Generation
from pipeline.methods.registry import register

QUERIES = ("image", "image_text")


@dataclass
class L2POptions:
    """Config section of ``method: l2p``."""

    pool_size: int = 10
    length: int = 10  # soft tokens per prompt
    top_n: int = 3  # prompts selected per input (L2P's N)
    key_loss_weight: float = 0.1  # L2P's surrogate-loss weight (lambda)
    query: str = "image"  # "image" | "image_text"

    def __post_init__(self) -> None:
        if self.pool_size < 1 or self.length < 1:
            raise ValueError(f"l2p: pool_size and length must be >= 1 (got {self.pool_size}, {self.length})")
        if not 1 <= self.top_n <= self.pool_size:
            raise ValueError(f"l2p: top_n must be in [1, pool_size={self.pool_size}] (got {self.top_n})")
        if self.key_loss_weight < 0:
            raise ValueError(f"l2p: key_loss_weight must be >= 0 (got {self.key_loss_weight})")
        if self.query not in QUERIES:
            raise ValueError(f"l2p: query must be one of {QUERIES} (got {self.query!r})")


@register("l2p")
class L2P(MethodBase):
    """A shared prompt pool with keys; see the module docstring. State: ``prompts`` (pool, L,
    d_llm) and ``keys`` (pool, d_guide)."""

    options_class: ClassVar[type] = L2POptions
    sweep_space: ClassVar[dict[str, Any]] = {
        "top_n": {"choice": [1, 3, 5]}, "length": {"choice": [5, 10]},
        "key_loss_weight": {"choice": [0.1, 0.5, 1.0]},
        "method.lr": {"loguniform": [1e-3, 3e-2]},  # the prompts' rate
    }

    def __init__(self, options: dict[str, Any] | None, lmm: Any, guide: Any) -> None:
        super().__init__(options, lmm, guide)
        self.opts: L2POptions
        o = self.opts
        table = lmm.model.get_input_embeddings().weight.detach()
        init = initial_prompts(table, o.pool_size * o.length, "vocab").reshape(o.pool_size, o.length, -1)
        self.prompts = nn.Parameter(init.contiguous(), requires_grad=False)
        self.keys = nn.Parameter(torch.empty(o.pool_size, int(guide.dim), device=table.device).uniform_(-1, 1),
                                 requires_grad=False)

    # the pool is shared: a task only switches training on and off
    def begin_task(self, task_index: int, task_name: str = "") -> None:
        self.prompts.requires_grad_(True)
        self.keys.requires_grad_(True)

    def end_task(self, task_index: int) -> None:
        self.prompts.requires_grad_(False)
        self.keys.requires_grad_(False)


    # ------------------------------------------------------------------ selection
    def query(self, batch: dict[str, Any]) -> torch.Tensor:
        """(B, d_guide) normalised query feature, no autograd (the guide is frozen)."""
        return guide_query(self.guide, batch, self.opts.query)

    def similarity(self, q: torch.Tensor) -> torch.Tensor:
        """(B, pool) cosine similarity of each query to each key (differentiable w.r.t. the keys)."""
        return q @ F.normalize(self.keys.float(), dim=-1).to(q.device).T

    def _prefix(self, idx: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        """(B, N*L, d_llm): the selected prompts, least similar first (the most similar last)."""
        return self.prompts[idx.flip(1).to(self.prompts.device)].flatten(1, 2).to(dtype)

    def training_loss(self, batch: dict[str, Any]) -> tuple[torch.Tensor, dict[str, float]]:
        q = self.query(batch)
        sim = self.similarity(q)
        idx = sim.detach().topk(self.opts.top_n, dim=1).indices  # (B, N), most similar first
        embeds = base_embeds(self.lmm, batch)
        embeds, mask, labels = self.lmm.insert_prefix(embeds, batch["attention_mask"], batch["labels"],
                                                      self._prefix(idx, embeds.dtype))
        lm = self.lmm.lm_loss(embeds, mask, labels)
        key_loss = (1 - sim.gather(1, idx)).mean()
        loss = lm + self.opts.key_loss_weight * key_loss.to(lm.dtype)
        return loss, {"loss": loss.item(), "lm_loss": lm.item(), "key_loss": key_loss.item()}

    @torch.no_grad()
    def generate(self, batch: dict[str, Any], max_new_tokens: int) -> Generation:
        sim = self.similarity(self.query(batch))
        idx = sim.topk(self.opts.top_n, dim=1).indices
        embeds = base_embeds(self.lmm, batch)
        embeds, mask, _ = self.lmm.insert_prefix(embeds, batch["attention_mask"], None, self._prefix(idx, embeds.dtype))
        # ``selected`` here are pool entries, not tasks (see ``diagnostics``)
        return Generation(texts=self.lmm.generate(embeds, mask, max_new_tokens), selected=idx.tolist(),
                          scores=sim.cpu())

    # ------------------------------------------------------------------ diagnostics
    @classmethod
    def diagnostics(cls, predictions: dict[str, list[dict[str, Any]]], learned: list[str], out_dir: Path
                    ) -> Diagnostics | None:
        """How often each test task's samples pick each pool prompt (``pool_usage.json`` and a
        heatmap): tasks that share prompts, and prompts nobody uses."""
        return usage_diagnostics(predictions, out_dir, stem="pool_usage", unit="pool prompt", label="L2P",
                                 title="Prompt pool usage (share of a task's samples selecting each prompt)")
