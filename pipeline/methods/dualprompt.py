"""DualPrompt: a general prompt (G-Prompt) shared by every task at the first LLM layers and one
expert prompt (E-Prompt) per task, with a key, at the layers after them.

Paper: Z. Wang et al., "DualPrompt: Complementary Prompting for Rehearsal-free Continual
Learning" (ECCV 2022, arXiv:2204.04799), Sec. 4; reference code github.com/google-research/l2p
(``dualprompt`` configs) and its PyTorch port github.com/JH-LEE-KR/dualprompt-pytorch.
ModalPrompt (arXiv:2410.05849, Appendix D) runs it on LLaVA with general prompts of length 3 and
expert prompts of length 10; those are the defaults.

    g        (n_g, Lg, d_llm)   the G-Prompt: one Lg-token prompt per G layer, every task trains it
    e_t      (n_e, Le, d_llm)   task t's E-Prompt, one Le-token prompt per E layer, frozen after t
    k_t      (d_guide,)         task t's key
    query    q(x)               the frozen guide's feature of the input (no gradient)
    train    task t's own E-Prompt (the task is known while it trains), loss
             LM loss + key_loss_weight * (1 - cos(q(x), k_t))   (pulls k_t towards its queries)
    test     per sample the E-Prompt of argmax_t cos(q(x), k_t), no task id

Choices the LLaVA adaptation forces (options in ``DualPromptOptions``):

* Which LLM layers: DualPrompt puts the G-Prompt at layers 1-2 and the E-Prompt at layers 3-5
  of a 12-layer ViT. The default (``g_layers``/``e_layers`` empty) keeps those depth fractions
  on the LLM: G at layers [0, round(2N/12)), E at [that, round(5N/12)) of N layers, each at
  least one layer (N = 12: G 0-1, E 2-4; LLaVA-1.5-7B's N = 32: G 0-4, E 5-12; a 2-layer base:
  G 0, E 1). ``g_layers`` / ``e_layers`` set them explicitly.
* How a prompt reaches its layer: DualPrompt's paper compares prompt tuning (prompt tokens
  prepended to the layer's input) with prefix tuning (prefixes of the layer's keys and values).
  Prefix key/values through transformers' cache need one prefix length at every layer (one
  attention mask serves all layers), which layer-specific prompts do not have; so the prompts are
  inserted as prompt tuning: Lg + Le positions are reserved after BOS, and a forward pre-hook on
  each prompted decoder layer (a supported ``nn.Module`` interface; the base model's code is
  untouched) writes that layer's prompt into its positions of the hidden states entering it.
  Before its first layer a position carries zeros. In decoding steps (one new token) the hooks
  do nothing: the prompt positions are in the cache already.
* The query: the guide CLIP's image embedding (``query: image``, DualPrompt's frozen [CLS]
  feature); ``image_text`` adds the instruction embedding.
* The key-loss weight: 1.0, dualprompt-pytorch's ``pull_constraint_coeff``.
* Initialisation: prompts copy random vocabulary rows (the embedding scale of the LLM), keys are
  uniform in [-1, 1] as in the reference.
"""

from __future__ import annotations

import re
import weakref
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from pipeline.methods.base import MethodBase
from pipeline.methods.helpers import base_embeds, gathered, guide_query, initial_prompts, usage_diagnostics
from pipeline.methods.l2p import QUERIES
from pipeline.methods.protocol import Diagnostics, Generation
from pipeline.methods.registry import register


@dataclass
class DualPromptOptions:
    """Config section of ``method: dualprompt``."""

    g_length: int = 3  # Lg: tokens of the general prompt at each G layer
    e_length: int = 10  # Le: tokens of an expert prompt at each E layer
    g_layers: list[int] = field(default_factory=list)  # empty: DualPrompt's placement, scaled
    e_layers: list[int] = field(default_factory=list)
    key_loss_weight: float = 1.0
    query: str = "image"  # "image" | "image_text"

    def __post_init__(self) -> None:
        if self.g_length < 1 or self.e_length < 1:
            raise ValueError(f"dualprompt: g_length and e_length must be >= 1 (got {self.g_length}, {self.e_length})")
        for name in ("g_layers", "e_layers"):
            layers = getattr(self, name)
            if not isinstance(layers, list) or not all(isinstance(x, int) and x >= 0 for x in layers):
                raise ValueError(f"dualprompt: {name} must be a list of layer indices >= 0 (got {layers!r})")
            if len(set(layers)) != len(layers):
                raise ValueError(f"dualprompt: {name} lists a layer twice ({layers})")
        if bool(self.g_layers) != bool(self.e_layers):
            raise ValueError("dualprompt: set both g_layers and e_layers, or neither (DualPrompt's placement)")
        if self.key_loss_weight < 0:
            raise ValueError(f"dualprompt: key_loss_weight must be >= 0 (got {self.key_loss_weight})")
        if self.query not in QUERIES:
            raise ValueError(f"dualprompt: query must be one of {QUERIES} (got {self.query!r})")


def dualprompt_layers(depth: int) -> tuple[list[int], list[int]]:
    """DualPrompt's G layers 0-1 and E layers 2-4 of 12, as fractions of ``depth`` layers."""
    if depth < 2:
        raise ValueError(f"dualprompt: the LLM has {depth} layer(s); G and E prompts need two")
    g_end = max(1, round(2 * depth / 12))
    e_end = min(depth, max(g_end + 1, round(5 * depth / 12)))
    return list(range(g_end)), list(range(g_end, e_end))


class Prompts(nn.Module):
    """One prompt tensor (n_layers, length, d_llm), plus a key where it is a task's expert prompt
    (a module so that ZeRO-3 gathers it around its forward)."""

    def __init__(self, prompts: torch.Tensor, key: torch.Tensor | None = None) -> None:
        super().__init__()
        self.prompts = nn.Parameter(prompts)
        self.key = None if key is None else nn.Parameter(key)

    def forward(self) -> tuple[torch.Tensor, torch.Tensor | None]:
        return self.prompts, self.key


def _pre_hook(ref: "weakref.ref[DualPrompt]", layer: int):
    def hook(module: nn.Module, args: tuple, kwargs: dict) -> Any:
        method = ref()
        active = None if method is None else method._active
        if active is None:
            return None
        hidden = args[0] if args else kwargs["hidden_states"]
        if hidden.shape[1] != active["length"] or layer not in active["writes"]:
            return None  # a decoding step, or not a prompted layer
        positions, values = active["writes"][layer]
        hidden = hidden.scatter(1, positions.unsqueeze(-1).expand(-1, -1, hidden.shape[-1]),
                                values.to(hidden.dtype))
        if args:
            return (hidden, *args[1:]), kwargs
        return args, {**kwargs, "hidden_states": hidden}
    return hook


@register("dualprompt")
class DualPrompt(MethodBase):
    """A shared G-Prompt and per-task keyed E-Prompts at chosen LLM layers; see the module
    docstring. State: ``general.prompts`` (n_g, Lg, d_llm), ``experts.<t>.prompts`` (n_e, Le,
    d_llm) and ``experts.<t>.key`` (d_guide)."""

    options_class: ClassVar[type] = DualPromptOptions
    sweep_space: ClassVar[dict[str, Any]] = {
        "e_length": {"choice": [5, 10, 20]}, "g_length": {"choice": [3, 5]},
        "key_loss_weight": {"choice": [0.1, 1.0]},
        "method.lr": {"loguniform": [1e-3, 3e-2]},  # the prompts' rate
    }

    def __init__(self, options: dict[str, Any] | None, lmm: Any, guide: Any) -> None:
        super().__init__(options, lmm, guide)
        self.opts: DualPromptOptions
        o = self.opts
        layers = self._decoder_layers()
        depth = len(layers)
        if o.g_layers:
            bad = [x for x in o.g_layers + o.e_layers if x >= depth]
            if bad:
                raise ValueError(f"dualprompt: layer(s) {bad} do not exist: the LLM has {depth} layers (0-{depth - 1})")
            self.g_layers, self.e_layers = list(o.g_layers), list(o.e_layers)
        else:
            self.g_layers, self.e_layers = dualprompt_layers(depth)
        self._table = lmm.model.get_input_embeddings().weight.detach()
        self.d_guide = int(guide.dim)
        init = initial_prompts(self._table, len(self.g_layers) * o.g_length, "vocab")
        self.general = Prompts(init.reshape(len(self.g_layers), o.g_length, -1).contiguous())
        self.experts = nn.ModuleList()
        self.current: int | None = None
        self._active: dict[str, Any] | None = None
        ref = weakref.ref(self)
        handles = [layers[i].register_forward_pre_hook(_pre_hook(ref, i), with_kwargs=True)
                   for i in sorted(set(self.g_layers + self.e_layers))]
        weakref.finalize(self, lambda hs=handles: [h.remove() for h in hs])
        self.general.requires_grad_(False)

    def _decoder_layers(self) -> nn.ModuleList:
        language_model = self.lmm.model.model.language_model
        return language_model.layers[: language_model.config.num_hidden_layers]

    @property
    def num_tasks(self) -> int:
        return len(self.experts)

    def _new_expert(self) -> Prompts:
        o = self.opts
        init = initial_prompts(self._table, len(self.e_layers) * o.e_length, "vocab")
        key = torch.empty(self.d_guide, device=self._table.device).uniform_(-1, 1)
        return Prompts(init.reshape(len(self.e_layers), o.e_length, -1).contiguous(), key)

    def begin_task(self, task_index: int, task_name: str = "") -> None:
        """Add task ``task_index``'s expert prompt and key (``num_tasks - 1`` resumes the latest
        task); it and the shared general prompt train, earlier experts stay frozen."""
        if task_index == self.num_tasks:
            self.experts.append(self._new_expert())
        elif task_index != self.num_tasks - 1:
            raise ValueError(f"dualprompt: begin_task({task_index}) with {self.num_tasks} tasks learned")
        for t, expert in enumerate(self.experts):
            expert.requires_grad_(t == task_index)
        self.general.requires_grad_(True)
        self.current = task_index

    def end_task(self, task_index: int) -> None:
        self.experts.requires_grad_(False)
        self.general.requires_grad_(False)
        self.current = None

    # ------------------------------------------------------------------ state
    def state_tensors(self) -> dict[str, torch.Tensor]:
        with gathered(self.parameters()):
            return {k: v.detach().cpu().contiguous().clone() for k, v in self.state_dict().items()}

    def load_state_tensors(self, tensors: dict[str, torch.Tensor]) -> None:
        """Restore every learned task from the names alone (a fresh method has no tasks)."""
        ids = {int(m.group(1)) for k in tensors if (m := re.match(r"experts\.(\d+)\.", k))}
        while self.num_tasks < (max(ids) + 1 if ids else 0):
            self.experts.append(self._new_expert())
        with gathered(self.parameters(), modifier_rank=0):
            self.load_state_dict(tensors, strict=True)
        self.experts.requires_grad_(False)
        self.general.requires_grad_(False)

    def task_keys(self, task_index: int) -> list[str]:
        return sorted(k for k in self.state_dict() if k.startswith(f"experts.{task_index}."))

    # ------------------------------------------------------------------ selection and prompting
    def query(self, batch: dict[str, Any]) -> torch.Tensor:
        return guide_query(self.guide, batch, self.opts.query)

    def similarity(self, q: torch.Tensor, keys: torch.Tensor) -> torch.Tensor:
        """(B, T) cosine similarity of each query to each task's key."""
        return q @ F.normalize(keys.float(), dim=-1).to(q.device).T

    def _prompted(self, embeds: torch.Tensor, mask: torch.Tensor, labels: torch.Tensor | None,
                  experts: torch.Tensor, prompts: torch.Tensor) -> tuple[Any, ...]:
        """Reserve the prompt positions after BOS and arm the hooks with what each layer gets:
        ``prompts`` (T, n_e, Le, d) of every expert, ``experts`` (B,) the one each sample uses."""
        o = self.opts
        b = embeds.shape[0]
        width = o.g_length + o.e_length
        bos = mask.to(embeds.device).argmax(dim=1, keepdim=True)
        g_pos = bos + 1 + torch.arange(o.g_length, device=embeds.device)
        e_pos = bos + 1 + o.g_length + torch.arange(o.e_length, device=embeds.device)
        embeds, mask, labels = self.lmm.insert_prefix(embeds, mask, labels, embeds.new_zeros(b, width, embeds.shape[-1]))
        general, _ = self.general()
        writes: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
        for j, layer in enumerate(self.g_layers):
            writes[layer] = (g_pos, general[j].unsqueeze(0).expand(b, -1, -1))
        per_sample = prompts[experts.to(prompts.device)]  # (B, n_e, Le, d)
        for j, layer in enumerate(self.e_layers):
            pos, val = e_pos, per_sample[:, j]
            if layer in writes:  # a layer carrying both prompts
                pos, val = torch.cat([writes[layer][0], pos], 1), torch.cat([writes[layer][1], val], 1)
            writes[layer] = (pos, val)
        self._active = {"length": embeds.shape[1], "writes": writes}
        return embeds, mask, labels

    def training_loss(self, batch: dict[str, Any]) -> tuple[torch.Tensor, dict[str, float]]:
        if self.current is None:
            raise RuntimeError("dualprompt: begin_task before training")
        outs = [expert() for expert in self.experts]
        prompts = torch.stack([p for p, _ in outs])
        q = self.query(batch)
        own = torch.full((q.shape[0],), self.current, dtype=torch.long)
        embeds = base_embeds(self.lmm, batch)
        try:
            embeds, mask, labels = self._prompted(embeds, batch["attention_mask"], batch["labels"], own, prompts)
            lm = self.lmm.lm_loss(embeds, mask, labels)
        finally:
            self._active = None
        key_loss = (1 - self.similarity(q, outs[self.current][1].unsqueeze(0))).mean()
        loss = lm + self.opts.key_loss_weight * key_loss.to(lm.dtype)
        return loss, {"loss": loss.item(), "lm_loss": lm.item(), "key_loss": key_loss.item()}

    @torch.no_grad()
    def generate(self, batch: dict[str, Any], max_new_tokens: int) -> Generation:
        if not self.experts:
            raise RuntimeError("dualprompt: no task learned yet")
        outs = [expert() for expert in self.experts]
        prompts, keys = torch.stack([p for p, _ in outs]), torch.stack([k for _, k in outs])
        sim = self.similarity(self.query(batch), keys)
        chosen = sim.argmax(dim=1)
        embeds = base_embeds(self.lmm, batch)
        try:
            embeds, mask, _ = self._prompted(embeds, batch["attention_mask"], None, chosen, prompts)
            texts = self.lmm.generate(embeds, mask, max_new_tokens)
        finally:
            self._active = None
        return Generation(texts=texts, selected=chosen.unsqueeze(1).tolist(), scores=sim.cpu())

    @classmethod
    def diagnostics(cls, predictions: dict[str, list[dict[str, Any]]], learned: list[str], out_dir: Path
                    ) -> Diagnostics | None:
        """Which task's expert prompt each test task's samples select (``expert_usage.json``, a
        heatmap, and the share that select their own task's)."""
        out = usage_diagnostics(predictions, out_dir, stem="expert_usage", unit="expert prompt", label="DualPrompt",
                                title="DualPrompt: share of a task's samples selecting each task's expert prompt")
        if out is None:
            return None
        own = [r["selected"][0] == learned.index(t) for t in predictions if t in learned for r in predictions[t]
               if r.get("selected")]
        if own:
            share = sum(own) / len(own)
            out.summary["expert_own_task_share"] = share
            out.lines.append(f"DualPrompt: {100 * share:.1f}% of test samples select their own task's expert prompt")
        return out
