"""DRAPE: dynamic cross-modal prompt generation (instance-specific soft prompts), null-space
projection of the shared visual projector, CLIP prototype routing.

Specification: the DRAPE summary (no public code). What it states, and how it is built here:

* **A prompt generator per task.** Prompt queries derived from the instruction text cross-attend
  to the frozen vision tower's patch features and produce M soft prompts, prepended to the frozen
  LLM's input (inserted after BOS, as every prompt method here). Earlier tasks' generators are
  frozen and bit-identical.
* **A shared visual projector** (LLaVA's two-layer MLP, the part every task trains) updated with
  **null-space gradient projection**: after each task the uncentred covariance of that task's
  inputs to the projector is accumulated; later tasks' projector gradients are projected onto the
  approximate null space of the accumulated covariance, so earlier tasks' projected features
  barely move.
* **CLIP prototype routing**: one prototype per task from the frozen guide's image and text
  features of its training data; at evaluation each sample goes to the generator of its nearest
  prototype, per sample inside a batch, with no task id.

Choices the summary leaves open (each with its option):

* Generator (``generator: instance``). For each task: M learned query seeds (M, h); the
  instruction's tokens, layer-normed and projected to width h, are attended by the seeds (text
  cross-attention, ``heads`` heads), which makes the queries a function of the instruction
  ("prompt queries derived from the textual instruction"); the queries, layer-normed, then
  cross-attend to the frozen vision tower's layer-normed patch features (the features the
  projector takes, width d_vision), with residual connections (pre-norm, so that neither
  modality's scale drowns the other); a LayerNorm and a linear map to d_llm give the instance
  part, added to M per-task
  base prompt tokens (initialised as vocabulary rows, as ModalPrompt's reference does). The
  instance part's output layer starts at 0.1x the vocabulary's RMS, so the prompts start near the
  base tokens and are instance-specific from the first step. ``hidden`` (h) defaults to
  min(d_llm, 1024): on LLaVA-1.5-7B a generator is about 17M parameters per task (the dry run
  prints it); at h = d_llm it would be about 143M.
  ``generator: task_prompt`` is the ablation "a task-level prompt instead of the generator": only
  the M base tokens, the same for every sample of the task (the generator's weights are not
  created).
* Text of the queries (``query_source``): ``llm_tokens`` (default): the frozen LLM's token
  embeddings of the instruction (the prompt tokens sit beside them in the LLM's input, and every
  base has them: no second text encoder is needed at inference); ``guide_text``: the guide's text
  feature of the instruction (one vector: the seeds attend to a single key).
  The instruction tokens are the attended positions that are neither image placeholders nor
  answer targets (the chat template's words and BOS included, padding excluded).
* Null-space projection under Adam. Projecting the gradient G -> G P (P = the null-space
  projector, acting on a linear layer's input dimension) keeps an SGD step in the null space, but
  AdamW rescales every coordinate by its own second moment, so the update leaves the null space
  (this is why Adam-NSCL projects the update, not the gradient). The train stage's optimiser is
  AdamW and the protocol's hook is ``adjust_gradients``, so by default (``nullspace_basis:
  eigen``) each projector layer is trained in the eigenbasis U of its accumulated covariance:
  its weight is stored as W' = W~ U (W~ = [W | b], the bias as the weight of a constant-1 input)
  and applied as ([x, 1] U) W'^T, which equals W~ [x, 1]. In these coordinates P is a diagonal
  0/1 mask over W''s columns, the projection zeroes the protected columns of the gradient, and
  AdamW's per-coordinate update leaves them exactly unchanged (weight decay 0, the default of
  every DeepSpeed file here; with weight decay the protected columns would shrink). A fresh
  optimiser per task (a train stage builds its own engine) carries no moment into them.
  ``nullspace_basis: standard`` keeps W~ in the standard basis and multiplies the gradient by P,
  the textbook form; tests/test_drape.py measures how far each lets old features drift.
  Every linear layer of the projector is protected with the covariance of its own input (the
  vision features for ``linear_1``, the activated hidden features for ``linear_2``), as the
  null-space methods (Adam-NSCL) do layer by layer; the summary's "inputs to the projector" is
  the first of them. Null space: the eigenvectors whose eigenvalue is below ``null_threshold``
  times the largest. The accumulated covariance is the sum over tasks of each task's mean
  covariance (each task weighs the same, whatever its size). A layer whose null space is empty
  does not move at all during that task; the state's ``projector.<layer>.mask`` records the free
  directions of the task being trained.
  ``projection: false`` is the ablation without projection (the projector trains freely);
  ``train_projector: false`` keeps it frozen.
* Routing (``route``): ``image_text`` (default) scores task t by lam*cos(x_v, pi_v^t) +
  (1-lam)*cos(x_i, pi_i^t), x_v / x_i the guide's image and instruction embeddings and pi^t the
  normalised means of the task's training data (computed in ``prepare`` before the task's first
  step: the guide is frozen, so they do not depend on training); ``image`` / ``text`` use one
  modality. A sample goes to the argmax; samples of one batch may go to different generators.
  During training the current task's own generator is used (its id is known while it trains).

State: ``tasks.<t>.*`` (the generator and the prototypes of task t: bit-identical after the task),
``projector.<layer>.{weight, basis, rotated, mask, cov}``. ``effective_projector()`` gives the
projector in LLaVA's layout (linear_1 / linear_2 weight and bias).
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, ClassVar, Iterable

import torch
import torch.nn.functional as F
from torch import nn

from pipeline.methods.base import MethodBase
from pipeline.methods.helpers import gathered, initial_prompts, instruction_tokens
from pipeline.methods.protocol import Diagnostics, GradAccess, Generation
from pipeline.methods.registry import register

GENERATORS = ("instance", "task_prompt")
QUERY_SOURCES = ("llm_tokens", "guide_text")
ROUTES = ("image_text", "image", "text")
BASES = ("eigen", "standard")
LAYERS = ("linear_1", "linear_2")


@dataclass
class DRAPEOptions:
    """Config section of ``method: drape``."""

    M: int = 10  # soft prompt tokens per sample
    hidden: int | None = None  # generator width h; None = min(d_llm, 1024)
    heads: int = 4  # attention heads of both cross-attentions (must divide h)
    generator: str = "instance"  # | "task_prompt" (ablation: one learned prompt per task)
    query_source: str = "llm_tokens"  # | "guide_text"
    route: str = "image_text"  # | "image" | "text" (routing ablations)
    lam: float = 0.5  # weight of the image term in image_text routing
    train_projector: bool = True  # False: the shared projector stays frozen
    projection: bool = True  # False: ablation, the projector trains without null-space projection
    null_threshold: float = 1e-3  # null space: eigenvalues below this times the largest
    nullspace_basis: str = "eigen"  # | "standard" (see the module docstring)

    def __post_init__(self) -> None:
        if self.M < 1:
            raise ValueError(f"drape: M must be >= 1 (got {self.M})")
        if self.hidden is not None and self.hidden < 1:
            raise ValueError(f"drape: hidden must be >= 1 or null (got {self.hidden})")
        if self.heads < 1:
            raise ValueError(f"drape: heads must be >= 1 (got {self.heads})")
        for key, value, allowed in (("generator", self.generator, GENERATORS),
                                    ("query_source", self.query_source, QUERY_SOURCES),
                                    ("route", self.route, ROUTES), ("nullspace_basis", self.nullspace_basis, BASES)):
            if value not in allowed:
                raise ValueError(f"drape: {key} must be one of {allowed} (got {value!r})")
        if not 0.0 <= self.lam <= 1.0:
            raise ValueError(f"drape: lam must be in [0, 1] (got {self.lam})")
        if not 0.0 < self.null_threshold < 1.0:
            raise ValueError(f"drape: null_threshold must be in (0, 1) (got {self.null_threshold})")


class Generator(nn.Module):
    """One task's prompt generator: (instruction tokens, patch features) -> (B, M, d_llm) prompts.

    ``base`` (M, d_llm) are the task-level prompt tokens; with ``instance`` the cross-attention
    part adds a per-sample term. ``proto_image`` / ``proto_text`` are the task's routing prototypes
    (buffers, set by ``DRAPE.prepare``)."""

    def __init__(self, init: torch.Tensor, d_src: int, d_vision: int, d_guide: int, hidden: int, heads: int,
                 instance: bool, out_scale: float) -> None:
        super().__init__()
        m, d_llm = init.shape
        device = init.device
        self.base = nn.Parameter(init)
        self.instance = instance
        if instance:
            self.seeds = nn.Parameter(0.02 * torch.randn(m, hidden, device=device))
            self.text_norm = nn.LayerNorm(d_src, device=device)
            self.text_in = nn.Linear(d_src, hidden, device=device)
            self.text_attn = nn.MultiheadAttention(hidden, heads, batch_first=True, device=device)
            self.query_norm = nn.LayerNorm(hidden, device=device)
            self.patch_norm = nn.LayerNorm(d_vision, device=device)
            self.image_attn = nn.MultiheadAttention(hidden, heads, kdim=d_vision, vdim=d_vision,
                                                    batch_first=True, device=device)
            self.norm = nn.LayerNorm(hidden, device=device)
            self.out = nn.Linear(hidden, d_llm, device=device)
            if device.type != "meta":
                with torch.no_grad():
                    self.out.weight.normal_(0.0, out_scale / math.sqrt(hidden))
                    self.out.bias.zero_()
        self.register_buffer("proto_image", torch.zeros(d_guide, device=device))
        self.register_buffer("proto_text", torch.zeros(d_guide, device=device))
        self.register_buffer("has_proto", torch.zeros((), dtype=torch.bool, device=device))

    def forward(self, text: torch.Tensor, text_keep: torch.Tensor, patches: torch.Tensor) -> torch.Tensor:
        """text (B, L, d_src), text_keep (B, L) bool, patches (B, N, d_vision) -> (B, M, d_llm)."""
        b, dt = patches.shape[0], self.base.dtype
        base = self.base[None].expand(b, -1, -1)
        if not self.instance:
            return base * 1
        patches = patches.to(dt)
        q = self.seeds[None].expand(b, -1, -1)
        keys = self.text_in(self.text_norm(text.to(dt)))
        q = q + self.text_attn(q, keys, keys, key_padding_mask=~text_keep, need_weights=False)[0]
        kv = self.patch_norm(patches)
        q = q + self.image_attn(self.query_norm(q), kv, kv, need_weights=False)[0]
        return base + self.out(self.norm(q)).to(base.dtype)


class ProjectedLinear(nn.Module):
    """A linear layer y = W~ [x, 1] kept as ``weight`` = W~ U in the basis ``basis`` = U (identity
    until a task rebases it), applied as ([x, 1] U) weight^T. ``mask`` (in + 1,) marks the columns
    (basis directions) free to move; ``cov`` is the accumulated input covariance ((in+1)^2).

    ``basis``, ``rotated``, ``mask`` and ``cov`` are float32 tensors outside the module's state
    dict (``extra_state`` gives them to the method's ``state_tensors``): a bf16 DeepSpeed engine
    converts every floating buffer, and a covariance rounded to bf16 cannot resolve eigenvalues a
    thousandth of the largest."""

    EXTRA = ("basis", "rotated", "mask", "cov")

    def __init__(self, linear: nn.Linear) -> None:
        super().__init__()
        w = linear.weight.detach()
        n_in = w.shape[1] + 1
        bias = linear.bias.detach() if linear.bias is not None else torch.zeros(w.shape[0], device=w.device)
        self.weight = nn.Parameter(torch.cat([w, bias[:, None]], dim=1).float().clone())
        self.basis = torch.eye(n_in, device=w.device)
        self.rotated = torch.zeros((), dtype=torch.bool, device=w.device)
        self.mask = torch.ones(n_in, device=w.device)
        self.cov = torch.zeros(n_in, n_in, device=w.device)
        self._pmat: torch.Tensor | None = None  # standard basis: the null-space projector P

    def extra_state(self) -> dict[str, torch.Tensor]:
        return {k: getattr(self, k).detach().cpu().contiguous().clone() for k in self.EXTRA}

    def load_extra_state(self, tensors: dict[str, torch.Tensor]) -> None:
        for k in self.EXTRA:
            current = getattr(self, k)
            if tensors[k].shape != current.shape:
                raise ValueError(f"drape: projector {k} of shape {tuple(tensors[k].shape)}, expected {tuple(current.shape)}")
            setattr(self, k, tensors[k].to(current.device, current.dtype).clone())
        self._pmat = None

    @staticmethod
    def augment(x: torch.Tensor) -> torch.Tensor:
        return torch.cat([x, x.new_ones(*x.shape[:-1], 1)], dim=-1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dt = self.weight.dtype
        z = self.augment(x.to(dt))
        if bool(self.rotated):
            z = z @ self.basis.to(z.device, dt)
        return z @ self.weight.T

    def effective(self) -> torch.Tensor:
        """W~ = [W | b] in the standard basis (out, in + 1), float32."""
        w = self.weight.detach().float()
        return w @ self.basis.to(w.device).T if bool(self.rotated) else w.clone()

    def rebase(self, threshold: float, mode: str) -> int:
        """Protect the accumulated covariance's principal directions for the next task; returns
        the number of free (null-space) directions."""
        if not bool(self.cov.abs().sum() > 0):
            return int(self.mask.numel())
        evals, evecs = torch.linalg.eigh(self.cov.double())
        free = evals < threshold * evals.max()
        with torch.no_grad():
            w_eff = self.effective()
            eigen = mode == "eigen"
            self.basis = evecs.float() if eigen else torch.eye(self.basis.shape[0], device=self.basis.device)
            self.weight.copy_((w_eff @ self.basis.to(w_eff.device)).to(self.weight.dtype))
            self.rotated = torch.tensor(eigen, device=self.rotated.device)
            self.mask = free.float().to(self.mask.device)
        self._pmat = None
        return int(free.sum())

    def projector(self) -> torch.Tensor:
        """Standard basis: P = V0 V0^T over the free eigenvectors of ``cov`` (recomputed from the
        state, so a resumed task gets the same P)."""
        if self._pmat is None:
            evals, evecs = torch.linalg.eigh(self.cov.double())
            free = evecs[:, self.mask.to(evecs.device) > 0.5]
            self._pmat = (free @ free.T).float()
        return self._pmat

    def project_gradient(self, grad: torch.Tensor) -> torch.Tensor:
        """The gradient of ``weight`` projected onto the null space of the protected directions."""
        if bool(self.mask.min() > 0.5):
            return grad
        if bool(self.rotated):
            return grad * self.mask.to(grad)[None, :]
        return grad @ self.projector().to(grad)


class SharedProjector(nn.Module):
    """LLaVA's projector (linear_1, activation, linear_2) as two ``ProjectedLinear`` layers."""

    def __init__(self, llava_projector: nn.Module) -> None:
        super().__init__()
        self.linear_1 = ProjectedLinear(llava_projector.linear_1)
        self.linear_2 = ProjectedLinear(llava_projector.linear_2)
        object.__setattr__(self, "act", llava_projector.act)  # stateless activation of the base

    def hidden(self, features: torch.Tensor) -> torch.Tensor:
        return self.act(self.linear_1(features))

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return self.linear_2(self.hidden(features))


@register("drape")
class DRAPE(MethodBase):
    """Instance-specific prompts from per-task generators, a null-space-projected shared projector,
    CLIP prototype routing; see the module docstring."""

    options_class: ClassVar[type] = DRAPEOptions
    sweep_space: ClassVar[dict[str, Any]] = {
        "M": {"choice": [5, 10, 20]}, "null_threshold": {"choice": [1e-4, 1e-3, 1e-2]},
        "route": {"choice": ["image_text", "image", "text"]},
    }

    def __init__(self, options: dict[str, Any] | None, lmm: Any, guide: Any) -> None:
        super().__init__(options, lmm, guide)
        self.opts: DRAPEOptions
        table = lmm.model.get_input_embeddings().weight
        self._device = table.device
        self.d_llm = int(table.shape[1])
        self.d_guide = int(guide.dim)
        vision = lmm.model.config.vision_config
        layers = lmm.model.config.vision_feature_layer
        self.d_vision = int(vision.hidden_size) * (1 if isinstance(layers, int) else len(layers))
        self.hidden = int(self.opts.hidden or min(self.d_llm, 1024))
        if self.hidden % self.opts.heads:
            raise ValueError(f"drape: heads ({self.opts.heads}) must divide the generator width ({self.hidden})")
        self.d_src = self.d_llm if self.opts.query_source == "llm_tokens" else self.d_guide
        rms = table.detach().float().pow(2).mean().sqrt() if self._device.type != "meta" else torch.tensor(1.0)
        self._out_scale = 0.1 * float(rms)
        self.projector = SharedProjector(lmm.model.model.multi_modal_projector)
        self.projector.requires_grad_(False)
        self.tasks = nn.ModuleList()
        self.current: int | None = None
        self.free_directions: dict[str, int] = {}  # layer -> free directions at the last rebase

    # ------------------------------------------------------------------ tasks
    @property
    def num_tasks(self) -> int:
        return len(self.tasks)

    def _new_generator(self, restoring: bool = False) -> None:
        table = self.lmm.model.get_input_embeddings().weight.detach()
        o = self.opts

        def make(init: torch.Tensor) -> Generator:
            return Generator(init, self.d_src, self.d_vision, self.d_guide, self.hidden, o.heads,
                             o.generator == "instance", self._out_scale)

        if restoring:  # values come from a stored state: draw nothing from the global RNG
            with torch.random.fork_rng(devices=[]):
                self.tasks.append(make(torch.zeros(o.M, self.d_llm, device=self._device)).requires_grad_(False))
            return
        init = initial_prompts(table, o.M, "vocab").contiguous()
        self.tasks.append(make(init).requires_grad_(False))

    def begin_task(self, task_index: int, task_name: str = "") -> None:
        """A new task (``task_index == num_tasks``) gets its generator and rebases the projector on
        the covariance accumulated so far; ``num_tasks - 1`` resumes the latest task as stored."""
        if task_index == self.num_tasks:
            self._new_generator()
            if self.opts.projection and self.opts.train_projector and self._device.type != "meta":
                with gathered(self.projector.parameters(), modifier_rank=0):
                    self.free_directions = {name: getattr(self.projector, name).rebase(
                        self.opts.null_threshold, self.opts.nullspace_basis) for name in LAYERS}
        elif task_index != self.num_tasks - 1:
            raise ValueError(f"drape: begin_task({task_index}) with {self.num_tasks} task(s) learned; "
                             "tasks must be learned in order")
        for t, gen in enumerate(self.tasks):
            gen.requires_grad_(t == task_index)
        self.projector.requires_grad_(self.opts.train_projector)
        self.current = task_index

    def end_task(self, task_index: int) -> None:
        super().end_task(task_index)
        self.current = None

    # ------------------------------------------------------------------ state
    def state_tensors(self) -> dict[str, torch.Tensor]:
        out = super().state_tensors()
        for layer in LAYERS:
            for k, v in getattr(self.projector, layer).extra_state().items():
                out[f"projector.{layer}.{k}"] = v
        return out

    def load_state_tensors(self, tensors: dict[str, torch.Tensor]) -> None:
        tensors = dict(tensors)
        extra = {layer: {k: tensors.pop(f"projector.{layer}.{k}") for k in ProjectedLinear.EXTRA} for layer in LAYERS}
        ids = {int(m.group(1)) for k in tensors if (m := re.match(r"tasks\.(\d+)\.", k))}
        while self.num_tasks < (max(ids) + 1 if ids else 0):
            self._new_generator(restoring=True)
        with gathered(self.parameters(), modifier_rank=0):
            self.load_state_dict(tensors, strict=True)
        for layer in LAYERS:
            getattr(self.projector, layer).load_extra_state(extra[layer])
        for p in self.parameters():
            p.requires_grad_(False)
        self.current = None

    def task_keys(self, task_index: int) -> list[str]:
        return sorted(k for k in self.state_dict() if k.startswith(f"tasks.{task_index}."))

    def effective_projector(self) -> dict[str, torch.Tensor]:
        """The shared projector in LLaVA's layout (``linear_1.weight``, ``linear_1.bias``, ...)."""
        out = {}
        with gathered(self.projector.parameters()):
            for name in LAYERS:
                w = getattr(self.projector, name).effective()
                out[f"{name}.weight"], out[f"{name}.bias"] = w[:, :-1].contiguous(), w[:, -1].contiguous()
        return out

    # ------------------------------------------------------------------ inputs
    def _text(self, batch: dict[str, Any]) -> tuple[torch.Tensor, torch.Tensor]:
        """The generator's text keys: (B, L, d_src) and (B, L) bool of positions to attend."""
        if self.opts.query_source == "guide_text":
            with torch.no_grad():
                x = self.guide.encode_text(batch["guide_text"]).float().to(self._device)
            return x[:, None, :], torch.ones(x.shape[0], 1, dtype=torch.bool, device=self._device)
        tok, keep = instruction_tokens(self.lmm, batch, self._device)
        keep[:, 0] |= ~keep.any(dim=1)  # never an empty key set
        return tok, keep

    def _inputs(self, batch: dict[str, Any], grad: bool) -> tuple[torch.Tensor, torch.Tensor]:
        """(B, N, d_vision) frozen patch features and the (B, L, d_llm) input embeddings with the
        shared projector's image features (differentiable w.r.t. the projector while it trains)."""
        with torch.no_grad():
            patches = self.lmm.vision_features(batch["pixel_values"]).float()
        with torch.set_grad_enabled(grad and self.current is not None and self.opts.train_projector):
            image = self.projector(patches)
        return patches, self.lmm.embed_image_features(batch["input_ids"], image)

    def _guide_features(self, batch: dict[str, Any]) -> tuple[torch.Tensor, torch.Tensor]:
        with torch.no_grad():
            x_v = F.normalize(self.guide.encode_image(batch["guide_pixels"]).float(), dim=-1)
            x_i = F.normalize(self.guide.encode_text(batch["guide_text"]).float(), dim=-1)
        return x_v.to(self._device), x_i.to(self._device)

    # ------------------------------------------------------------------ hooks
    def prepare(self, task_index: int, batches: Iterable[dict[str, Any]],
                mean_over_workers: Callable[[torch.Tensor], torch.Tensor]) -> None:
        """Task ``task_index``'s routing prototypes: the normalised means of the guide's image and
        instruction embeddings over its training data (this worker's shard, averaged over
        workers)."""
        sums = torch.zeros(2, self.d_guide, dtype=torch.float64, device=self._device)
        count = torch.zeros((), dtype=torch.float64, device=self._device)
        for batch in batches:
            x_v, x_i = self._guide_features(batch)
            sums[0] += x_v.double().sum(0)
            sums[1] += x_i.double().sum(0)
            count += x_v.shape[0]
        if not bool(count > 0):
            raise ValueError(f"drape: no training batch to compute task {task_index}'s prototypes from")
        means = mean_over_workers(sums / count).float()
        gen = self.tasks[task_index]
        gen.proto_image.copy_(F.normalize(means[0], dim=-1))
        gen.proto_text.copy_(F.normalize(means[1], dim=-1))
        gen.has_proto.fill_(True)

    def consolidate(self, task_index: int, batches: Iterable[dict[str, Any]],
                    mean_over_workers: Callable[[torch.Tensor], torch.Tensor]) -> None:
        """Add task ``task_index``'s mean uncentred input covariance of each projector layer (its
        inputs as the projector stands at the end of the task) to the accumulated one."""
        if not (self.opts.projection and self.opts.train_projector):
            return
        covs = {name: torch.zeros_like(getattr(self.projector, name).cov, dtype=torch.float64) for name in LAYERS}
        n = 0
        with torch.no_grad(), gathered(self.projector.parameters()):
            for batch in batches:
                patches = self.lmm.vision_features(batch["pixel_values"]).float().flatten(0, 1)
                hidden = self.projector.hidden(patches).float()
                for name, x in (("linear_1", patches), ("linear_2", hidden)):
                    z = ProjectedLinear.augment(x).double()
                    covs[name] += z.T @ z
                n += patches.shape[0]
        if n == 0:
            raise ValueError(f"drape: no training batch to accumulate task {task_index}'s covariance from")
        for name in LAYERS:
            layer = getattr(self.projector, name)
            layer.cov = layer.cov + mean_over_workers(covs[name] / n).float().to(layer.cov.device)

    def adjust_gradients(self, grads: GradAccess) -> None:
        """Project the shared projector's gradients onto the null space of the earlier tasks'
        accumulated input covariance (nothing before the first task's covariance exists)."""
        if not (self.opts.projection and self.opts.train_projector):
            return
        for name in LAYERS:
            layer = getattr(self.projector, name)
            g = grads.get(layer.weight)
            if g is not None and bool(layer.mask.min() < 0.5):
                grads.set(layer.weight, layer.project_gradient(g))

    # ------------------------------------------------------------------ training
    def _prompts(self, gen: Generator, batch: dict[str, Any], patches: torch.Tensor,
                 rows: torch.Tensor | None = None) -> torch.Tensor:
        text, keep = self._text(batch)
        if rows is not None:
            text, keep = text[rows], keep[rows]
        return gen(text, keep, patches)

    def training_loss(self, batch: dict[str, Any]) -> tuple[torch.Tensor, dict[str, float]]:
        if self.current is None:
            raise RuntimeError("drape: training_loss outside begin_task/end_task")
        patches, embeds = self._inputs(batch, grad=True)
        prompts = self._prompts(self.tasks[self.current], batch, patches).to(embeds.dtype)
        embeds, mask, labels = self.lmm.insert_prefix(embeds, batch["attention_mask"], batch["labels"], prompts)
        loss = self.lmm.lm_loss(embeds, mask, labels)
        return loss, {"loss": loss.item(), "lm_loss": loss.item()}

    # ------------------------------------------------------------------ inference
    def route_scores(self, batch: dict[str, Any]) -> torch.Tensor:
        """(B, T) similarity of each sample to each learned task's prototypes (``route``); tasks
        without prototypes get -inf."""
        if self.num_tasks == 0:
            raise RuntimeError("drape: no task learned yet, nothing to route to")
        x_v, x_i = self._guide_features(batch)
        p_v = torch.stack([g.proto_image for g in self.tasks]).float()
        p_i = torch.stack([g.proto_text for g in self.tasks]).float()
        s_v, s_i = x_v @ p_v.T, x_i @ p_i.T
        lam = {"image_text": self.opts.lam, "image": 1.0, "text": 0.0}[self.opts.route]
        scores = lam * s_v + (1 - lam) * s_i
        ready = torch.stack([g.has_proto for g in self.tasks])
        if not bool(ready.any()):
            raise RuntimeError("drape: no learned task has routing prototypes yet")
        return scores.masked_fill(~ready[None, :], float("-inf"))

    @torch.no_grad()
    def generate(self, batch: dict[str, Any], max_new_tokens: int) -> Generation:
        """Each sample routed to its nearest prototype's generator (no task id), then greedy
        decoding with that generator's M prompts after BOS."""
        scores = self.route_scores(batch)
        routes = scores.argmax(dim=1)
        patches, embeds = self._inputs(batch, grad=False)
        prompts = embeds.new_zeros(embeds.shape[0], self.opts.M, self.d_llm)
        for t in routes.unique().tolist():
            rows = (routes == t).nonzero(as_tuple=True)[0]
            prompts[rows] = self._prompts(self.tasks[t], batch, patches[rows], rows).to(prompts.dtype)
        embeds, mask, _ = self.lmm.insert_prefix(embeds, batch["attention_mask"], None, prompts)
        texts = self.lmm.generate(embeds, mask, max_new_tokens)
        finite = scores.masked_fill(~torch.isfinite(scores), -1.0)
        return Generation(texts=texts, selected=[[int(r)] for r in routes.tolist()], scores=finite.cpu())

    # ------------------------------------------------------------------ diagnostics
    @classmethod
    def diagnostics(cls, predictions: dict[str, list[dict[str, Any]]], learned: list[str], out_dir: Path
                    ) -> Diagnostics | None:
        """Routing frequency (test task x generator) as ``routing.json`` and a heatmap, and the
        routing accuracy per test task: the share of its samples routed to its own generator (a
        task not learned yet counts as a miss)."""
        from pipeline.figures import heatmap

        tasks = [t for t in predictions if predictions[t] and predictions[t][0].get("selected")]
        if not tasks:
            return None
        width = len(predictions[tasks[0]][0]["scores"])
        cols = learned[:width]
        freq, accuracy = [], {}
        for task in tasks:
            counts = [0] * width
            for record in predictions[task]:
                counts[record["selected"][0]] += 1
            n = len(predictions[task])
            freq.append([c / n for c in counts])
            accuracy[task] = counts[cols.index(task)] / n if task in cols else 0.0
        mean = sum(accuracy.values()) / len(accuracy)
        data = {"tasks": tasks, "generators": cols, "routing_frequency": freq, "routing_accuracy": accuracy,
                "routing_accuracy_mean": mean}
        (out_dir / "routing.json").write_text(json.dumps(data, indent=2))
        fig = heatmap(freq, rows=tasks, cols=cols, fmt="{:.2f}", path=out_dir / "routing_frequency.png",
                      title="DRAPE routing frequency (rows: test task, cols: generator)",
                      xlabel="generator (task)", ylabel="test task")
        per_task = ", ".join(f"{t} {100 * a:.0f}%" for t, a in accuracy.items())
        return Diagnostics(summary={"routing_accuracy_mean": mean, **{f"routing_accuracy/{t}": a for t, a in accuracy.items()}},
                           files=[out_dir / "routing.json", fig],
                           lines=[f"DRAPE routing to the sample's own task's generator: {100 * mean:.1f}% ({per_task})"])
