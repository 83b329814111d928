"""ModalPrompt: dual-modality guided prompt learning for multimodal continual instruction tuning.

Paper: F. Zeng et al., "ModalPrompt: Dual-Modality Guided Prompt for Continual Learning of Large
Multimodal Models" (arXiv:2410.05849), Sec. 3; public reference code: github.com/AuroraZengfh/ModalPrompt.
docs/reproduce-llava7b.md sets its settings side by side with the reference code's.

Per task t (0-based here):
    X_p^t      (M, d_llm)   soft prompt tokens (an ``nn.Parameter``, not vocabulary rows, so
                            nothing in the base model is resized or reset, and ZeRO-3 can
                            partition them like any parameter)
    Proj_p^t   MLP d_llm -> d_llm -> SiLU -> d_guide
    proto^t    (d_guide,)   mean over the M tokens of Proj_p^t(X_p^t)

Guidance of a sample: x_v = guide.encode_image(guide_pixels), x_i = guide.encode_text(guide_text)
(the instruction only), both (B, d_guide).  score_t = lam*cos(x_v, proto^t) + (1-lam)*cos(x_i, proto^t).
x_v is CLIP's projected image embedding (the reference's CLIPVisionModelWithProjection
``image_embeds``, on the same padded image the LMM sees). x_i is, by default, the text tower's
pooled output without the text projection, as the reference's CLIPTextTower takes
CLIPTextModel's ``pooler_output`` (clip_encoder.py); the paper's Eq. 1 projects only the image.
``model.guide_text_feature: projected`` uses open_clip's projected text embedding instead. With
CLIP ViT-L/14 both are 768-dimensional; the guide refuses "pooled" where the widths differ.

Design choices (documented here because the paper leaves them open):

* Prompt init (``prompt_init``): "vocab", the default, copies M vocabulary rows drawn uniformly at
  random, as the reference does; "mean" starts every task's tokens at the mean of the token-
  embedding table plus N(0, (0.1*std)^2) noise (every task starts alike, near a "neutral" token;
  this project's default before it followed the reference).
* Fusion order: the prefix is ordered least similar first ... most similar last, so the most similar
  set sits nearest to the image/text (the reference flips its top-k the same way). During training
  the current task counts as the most similar and is always last. While the current task number
  (1-based) is <= ``fuse_all_until`` (default k-1, as the reference's ``cur_task <= transfer_num-1``)
  all previous tasks are fused in task order instead of by score.
* Soft fusion (``temperature`` > 0, an extension): the top-k sets are still the only ones used and the
  prefix stays M*k tokens, but set j is scaled by w_j = sigmoid((s_j - m) / temperature), m being the
  midpoint between the k-th and (k+1)-th largest score (all w_j = 1 when there is no (k+1)-th set).
  A selected s_j > m unless it ties with the (k+1)-th score, so w_j -> 1 as temperature -> 0:
  exactly the paper's hard top-k (in float32 the sigmoid is exactly 1.0 once (s_j - m)/temperature
  > ~17). At an exact tie of the k-th and (k+1)-th scores (e.g. two identical prototypes) the
  tied set gets 0.5 at every temperature, where hard top-k keeps one of the two in full.
  During training the same rule is applied to the previous tasks competing for the k-1 free
  slots; the current task has weight 1.
  Why a sigmoid gate and not a softmax over the scores, as the issue that asked for the
  temperature put it: a softmax's limit as temperature -> 0 is a one-hot on the single best set
  (top-1), not k sets at full weight, so it cannot reduce to the paper's top-k as required. The
  gate around the k-th/(k+1)-th boundary is the soft top-k whose limit is exactly that.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from pipeline.methods.base import MethodBase
from pipeline.methods.helpers import base_embeds, gathered, initial_prompts  # noqa: F401 - initial_prompts: also this module's name for it
from pipeline.methods.protocol import Diagnostics, Generation
from pipeline.methods.registry import register


@dataclass
class ModalPromptOptions:
    """Config section of ``method: modalprompt``."""

    k: int = 3  # prompt sets fused (training) / selected (inference)
    M: int = 10  # soft tokens per task
    lam: float = 0.5  # weight of the image term in the score (paper: alpha + beta, i.e. 0.5/0.5)
    temperature: float = 0.0  # 0 = hard top-k; > 0 = soft weights over the top-k sets
    proto_loss_weight: float = 1.0
    # Tasks with 1-based number <= this fuse ALL previous tasks in task order; None = k - 1.
    fuse_all_until: int | None = None
    # Initial prompt tokens of each task: "vocab" = copies of M vocabulary rows drawn uniformly at
    # random (the reference code's add_prompt_tokens), "mean" = the embedding table's mean plus
    # N(0, (0.1 std)^2) noise (every task starts alike, near a "neutral" token).
    prompt_init: str = "vocab"

    def __post_init__(self) -> None:
        if self.k < 1 or self.M < 1:
            raise ValueError(f"modalprompt: k and M must be >= 1 (got k={self.k}, M={self.M})")
        if not 0.0 <= self.lam <= 1.0:
            raise ValueError(f"modalprompt: lam must be in [0, 1] (got {self.lam})")
        if self.temperature < 0:
            raise ValueError(f"modalprompt: temperature must be >= 0 (got {self.temperature})")
        if self.prompt_init not in PROMPT_INITS:
            raise ValueError(f"modalprompt: prompt_init must be one of {PROMPT_INITS} (got {self.prompt_init!r})")
        if self.fuse_all_until is None:
            self.fuse_all_until = self.k - 1


PROMPT_INITS = ("vocab", "mean")


def select_sets(
    scores: torch.Tensor, k: int, temperature: float
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Top-min(k, T) sets per sample and their fusion weights.

    scores: (B, T). Returns idx (B, n) and values (B, n), most similar first, n = min(k, T), and
    weights (B, n): ones for hard top-k, sigmoid((s - m) / temperature) for soft fusion.
    """
    n_sets = scores.shape[1]
    n = min(k, n_sets)
    # One extra candidate gives the (k+1)-th score for the soft-fusion midpoint.
    values, idx = scores.topk(min(k + 1, n_sets), dim=1, largest=True, sorted=True)
    weights = torch.ones_like(values[:, :n])
    if temperature > 0 and n_sets > k:
        midpoint = 0.5 * (values[:, k - 1] + values[:, k])
        weights = torch.sigmoid((values[:, :n] - midpoint[:, None]) / temperature)
    return idx[:, :n], values[:, :n], weights


class TaskPrompt(nn.Module):
    """X_p^t (M, d_llm) and Proj_p^t (d_llm -> d_llm -> SiLU -> d_guide) of one task.

    A module with its own ``forward`` (rather than a bare ParameterList) so that DeepSpeed ZeRO-3,
    which gathers a module's partitioned parameters around that module's forward, sees them.
    """

    def __init__(self, init: torch.Tensor, d_guide: int) -> None:
        super().__init__()
        d_llm = init.shape[-1]
        self.prompts = nn.Parameter(init)
        self.proj = nn.Sequential(nn.Linear(d_llm, d_llm), nn.SiLU(), nn.Linear(d_llm, d_guide))
        self.proj.to(init.device)

    def forward(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Returns the prompt tokens (M, d_llm) and the prototype (d_guide,)."""
        # ``* 1`` hands out a new tensor: under ZeRO-3 the parameter's storage is released after
        # this forward, the product keeps its values and still routes gradients to the parameter.
        return self.prompts * 1, self.proj(self.prompts).mean(dim=0)


@register("modalprompt")
class ModalPrompt(MethodBase):
    """Per-task soft prompts + prototype projections; see the module docstring.

    Built by the registry as ``ModalPrompt(options, lmm, guide)``, ``options`` being the config
    section (keys of ``ModalPromptOptions``; unknown keys raise ``ValueError``).

    Owned state (``state_tensors`` names): ``tasks.{t}.prompts`` (M, d_llm) and
    ``tasks.{t}.proj.{0,2}.{weight,bias}`` (Proj_p^t's two linear layers).
    """

    options_class: ClassVar[type] = ModalPromptOptions
    # the default Ray Tune space (0.0 = the paper's hard top-k)
    sweep_space: ClassVar[dict[str, Any]] = {
        "k": {"choice": [1, 2, 3, 4]}, "M": {"choice": [5, 10, 20]}, "temperature": {"choice": [0.0, 0.1, 1.0]},
    }

    def __init__(self, options: dict[str, Any] | None, lmm: Any, guide: Any) -> None:
        super().__init__(options, lmm, guide)
        self.opts: ModalPromptOptions
        self.d_llm = int(lmm.hidden_size)
        self.d_guide = int(guide.dim)
        self.tasks = nn.ModuleList()  # tasks[t]: TaskPrompt of task t
        self.current: int | None = None  # task being trained (None between tasks)
        self._bank_version = 0  # bumped whenever the prompts or projections may change

    # ------------------------------------------------------------------ task lifecycle
    @property
    def num_tasks(self) -> int:
        return len(self.tasks)

    def _new_task_params(self, restoring: bool = False) -> None:
        """Append X_p^t and Proj_p^t for the next task (frozen until ``begin_task``).

        ``restoring``: the values are about to be overwritten by a stored state, so nothing is
        drawn from the global RNG (a restored run then draws the same numbers afterwards as the
        run that was never interrupted)."""
        table = self.lmm.model.get_input_embeddings().weight.detach()
        device = table.device
        if restoring:
            with torch.random.fork_rng(devices=[]):  # Proj_p's init draws too
                self.tasks.append(TaskPrompt(torch.zeros(self.opts.M, self.d_llm, device=device), self.d_guide)
                                  .requires_grad_(False))
            return
        init = initial_prompts(table, self.opts.M, self.opts.prompt_init)
        self.tasks.append(TaskPrompt(init.contiguous(), self.d_guide).requires_grad_(False))

    def begin_task(self, task_index: int, task_name: str = "") -> None:
        """Create task ``task_index``'s prompts/projection and make only them trainable.

        ``task_index == num_tasks`` starts a new task; ``num_tasks - 1`` resumes the latest task
        (e.g. a retried training stage that restored its partial state).
        """
        if task_index == self.num_tasks:
            self._new_task_params()
        elif task_index != self.num_tasks - 1:
            raise ValueError(
                f"modalprompt: begin_task({task_index}) but {self.num_tasks} task(s) exist; "
                "tasks must be learned in order"
            )
        for t in range(self.num_tasks):  # older tasks stay frozen whatever happened before
            self._set_trainable(t, t == task_index)
        self.current = task_index
        self._bank_version += 1

    def end_task(self, task_index: int) -> None:
        self._set_trainable(task_index, False)
        self.current = None
        self._bank_version += 1

    def _set_trainable(self, t: int, flag: bool) -> None:
        self.tasks[t].requires_grad_(flag)

    # ------------------------------------------------------------------ state
    def state_tensors(self) -> dict[str, torch.Tensor]:
        # Cloned to CPU so callers can keep them as a snapshot while training goes on.
        with gathered(self.parameters()):
            return {k: v.detach().cpu().contiguous().clone() for k, v in self.state_dict().items()}

    def load_state_tensors(self, tensors: dict[str, torch.Tensor]) -> None:
        """Restore every learned task from names alone (a fresh method has no tasks yet)."""
        task_ids = {int(m.group(1)) for k in tensors if (m := re.match(r"tasks\.(\d+)\.", k))}
        n = max(task_ids) + 1 if task_ids else 0
        while self.num_tasks < n:
            self._new_task_params(restoring=True)
        with gathered(self.parameters(), modifier_rank=0):
            self.load_state_dict(tensors, strict=True)
        for t in range(self.num_tasks):
            self._set_trainable(t, False)
        self.current = None
        self._bank_version += 1

    def task_keys(self, task_index: int) -> list[str]:
        return sorted(k for k in self.state_dict() if k.startswith(f"tasks.{task_index}."))

    # ------------------------------------------------------------------ guidance
    def _bank(self) -> tuple[torch.Tensor, torch.Tensor]:
        """All tasks' prompts (T, M, d_llm) and prototypes (T, d_guide); differentiable w.r.t.
        the current task's parameters only (older ones do not require grad)."""
        outs = [task() for task in self.tasks]
        return torch.stack([x for x, _ in outs]), torch.stack([p for _, p in outs])

    def prototypes(self) -> torch.Tensor:
        """(T, d_guide) float32 prototypes, detached (for the similarity heatmap)."""
        with torch.no_grad():
            return torch.stack([task()[1] for task in self.tasks]).float().cpu()

    def _guidance(self, batch: dict[str, Any]) -> tuple[torch.Tensor, torch.Tensor]:
        """x_v, x_instruct: (B, d_guide) each, float32, no autograd (the guide is frozen)."""
        with torch.no_grad():
            x_v = self.guide.encode_image(batch["guide_pixels"]).float()
            x_i = self.guide.encode_text(batch["guide_text"]).float()
        return x_v, x_i

    def _scores(self, x_v: torch.Tensor, x_i: torch.Tensor, protos: torch.Tensor) -> torch.Tensor:
        """(B, T) dual-modality scores lam*cos(x_v, proto) + (1-lam)*cos(x_i, proto)."""
        p = F.normalize(protos.float(), dim=-1).to(x_v.device)
        lam = self.opts.lam
        return lam * F.normalize(x_v, dim=-1) @ p.T + (1 - lam) * F.normalize(x_i, dim=-1) @ p.T

    @staticmethod
    def _prefix(bank: torch.Tensor, order: torch.Tensor, weights: torch.Tensor | None) -> torch.Tensor:
        """(B, n*M, d_llm) prefix: sets ``order`` (B, n) of ``bank`` (T, M, d_llm), in prefix order."""
        sets = bank[order.to(bank.device)]  # (B, n, M, d_llm)
        if weights is not None:
            sets = sets * weights[:, :, None, None].to(sets)
        return sets.flatten(1, 2)

    # ------------------------------------------------------------------ training
    def _training_order(self, scores: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Prefix order (B, n) for training task t = self.current, and weights (or None)."""
        t = self.current
        bsz = scores.shape[0]
        device = scores.device
        cur = torch.full((bsz, 1), t, dtype=torch.long, device=device)
        if t == 0:
            return cur, None
        if t + 1 <= self.opts.fuse_all_until:
            prev = torch.arange(t, device=device).expand(bsz, t)  # task order, reference style
            return torch.cat([prev, cur], dim=1), None
        idx, _, w = select_sets(scores[:, :t], self.opts.k - 1, self.opts.temperature)
        if idx.shape[1] == 0:  # k == 1: only the current task's prompts
            return cur, None
        # select_sets returns most similar first; the prefix wants it nearest the text (last).
        order = torch.cat([idx.flip(1), cur], dim=1)
        weights = None
        if self.opts.temperature > 0:
            weights = torch.cat([w.flip(1), torch.ones_like(w[:, :1])], dim=1)
        return order, weights

    def training_loss(self, batch: dict[str, Any]) -> tuple[torch.Tensor, dict[str, float]]:
        """LM cross-entropy with the fused prefix + proto_loss_weight * prototype-alignment loss."""
        if self.current is None:
            raise RuntimeError("modalprompt: training_loss outside begin_task/end_task")
        x_v, x_i = self._guidance(batch)
        bank, protos = self._bank()  # (T, M, d_llm), (T, d_guide)
        with torch.no_grad():  # selection is discrete; no gradient through the ranking
            scores = self._scores(x_v, x_i, protos)
        order, weights = self._training_order(scores)
        embeds = base_embeds(self.lmm, batch)
        prefix = self._prefix(bank, order, weights).to(embeds.dtype)
        embeds, mask, labels = self.lmm.insert_prefix(
            embeds, batch["attention_mask"], batch["labels"], prefix
        )
        lm = self.lmm.lm_loss(embeds, mask, labels)
        proto = protos[self.current].float()[None].to(x_v.device)
        proto_loss = (1 - F.cosine_similarity(proto, x_v, dim=-1).mean()) + (
            1 - F.cosine_similarity(proto, x_i, dim=-1).mean()
        )
        loss = lm + self.opts.proto_loss_weight * proto_loss.to(lm.dtype)
        logs = {"loss": loss.item(), "lm_loss": lm.item(), "proto_loss": proto_loss.item()}
        return loss, logs

    # ------------------------------------------------------------------ inference
    @torch.no_grad()
    def select(self, batch: dict[str, Any]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Task-id-free selection over all learned tasks.

        Returns idx (B, n) most similar first, weights (B, n) and scores (B, T), n = min(k, T).
        """
        return self._select(batch)[1:]

    def _select(self, batch: dict[str, Any]) -> tuple[torch.Tensor, ...]:
        """(bank (T, M, d_llm), idx, weights, scores) for ``select`` / ``generate``."""
        if self.num_tasks == 0:
            raise RuntimeError("modalprompt: no task learned yet, nothing to select")
        x_v, x_i = self._guidance(batch)
        bank, protos = self._frozen_bank()
        scores = self._scores(x_v, x_i, protos)
        idx, _, weights = select_sets(scores, self.opts.k, self.opts.temperature)
        return bank, idx, weights, scores

    def _frozen_bank(self) -> tuple[torch.Tensor, torch.Tensor]:
        """``_bank()`` at inference, computed once per learned state (every Proj_p^t over its
        prompts is the same for every batch; recomputing it made a batch's cost grow with T)."""
        if self.current is not None or self.training:
            return self._bank()
        key = (self.num_tasks, self._bank_version)
        if getattr(self, "_bank_cache", (None,))[0] != key:
            with torch.no_grad():
                object.__setattr__(self, "_bank_cache", (key, self._bank()))
        return self._bank_cache[1]

    @torch.no_grad()
    def generate(self, batch: dict[str, Any], max_new_tokens: int) -> Generation:
        """Greedy answers with the top-min(k, T) prompt sets per sample (M*min(k, T) prefix tokens)."""
        bank, idx, weights, scores = self._select(batch)
        embeds = base_embeds(self.lmm, batch)
        use_w = weights.flip(1) if self.opts.temperature > 0 else None
        prefix = self._prefix(bank, idx.flip(1), use_w).to(embeds.dtype)
        embeds, mask, _ = self.lmm.insert_prefix(embeds, batch["attention_mask"], None, prefix)
        texts = self.lmm.generate(embeds, mask, max_new_tokens)
        return Generation(texts=texts, selected=idx.tolist(), scores=scores.cpu())

    # ------------------------------------------------------------------ diagnostics
    @classmethod
    def diagnostics(cls, predictions: dict[str, list[dict[str, Any]]], learned: list[str], out_dir: Path
                    ) -> Diagnostics | None:
        """Which prompt sets each test task selects, and how similar each task's samples are to
        each prototype (the paper's Fig. 4): ``selection.json`` and two heatmaps, plus
        ``top1_own_task`` (share of samples whose most similar set is their own task's; a task
        not learned yet counts as a miss)."""
        from pipeline.figures import heatmap

        tasks = list(predictions)
        freq, sim, top1 = {}, {}, {}
        for task in tasks:
            lines = predictions[task]
            if not lines or not lines[0].get("scores"):
                return None
            n = len(lines[0]["scores"])
            counts, sums, hits = [0.0] * n, [0.0] * n, 0
            own = learned.index(task) if task in learned else -1
            for ln in lines:
                for j in ln["selected"]:
                    counts[j] += 1
                sums = [a + b for a, b in zip(sums, ln["scores"])]
                hits += int(bool(ln["selected"]) and ln["selected"][0] == own)
            freq[task] = [c / len(lines) for c in counts]
            sim[task] = [v / len(lines) for v in sums]
            top1[task] = hits / len(lines)
        cols = learned[: len(next(iter(freq.values())))]
        mean = sum(top1.values()) / len(top1)
        sel = {"tasks": tasks, "learned": cols, "selection_frequency": [freq[t] for t in tasks],
               "prototype_similarity": [sim[t] for t in tasks], "top1_own_task": top1, "top1_own_task_mean": mean}
        (out_dir / "selection.json").write_text(json.dumps(sel, indent=2))
        files = [
            out_dir / "selection.json",
            heatmap(sel["selection_frequency"], rows=tasks, cols=cols, fmt="{:.2f}",
                    title="Selection frequency (rows: test task, cols: selected prompts)",
                    path=out_dir / "selection_frequency.png", xlabel="selected task", ylabel="test task"),
            heatmap(sel["prototype_similarity"], rows=tasks, cols=cols, fmt="{:.2f}",
                    title="Prototype vs task similarity (mean guidance score)",
                    path=out_dir / "prototype_similarity.png", xlabel="prototype", ylabel="test task"),
        ]
        return Diagnostics(
            summary={"top1_own_task_mean": mean, **{f"top1_own_task/{t}": v for t, v in top1.items()}},
            files=files,
            lines=[f"Top-1 selected prompt set is the sample's own task: {100 * mean:.1f}%"],
        )
