"""Helpers shared by method modules (methods may use or ignore them; no protocol change)."""

from __future__ import annotations

from contextlib import contextmanager
from typing import Any, Iterable, Iterator

import torch
from torch import nn


def hold_frozen(module: nn.Module, **refs: Any) -> None:
    """Attach the frozen base LMM / guide to ``module`` WITHOUT registering them as submodules.

    Registering them would put the whole base model into ``module.parameters()`` and
    ``module.state_dict()`` (so DeepSpeed checkpoints and ``state_tensors`` would carry the 7B
    base weights); a plain attribute keeps the method's module tree = the method's own state.
    """
    for name, ref in refs.items():
        object.__setattr__(module, name, ref)


def base_embeds(lmm: Any, batch: dict[str, Any]) -> torch.Tensor:
    """(B, L, d_llm) input embeddings of the unmodified base model.

    Computed without autograd: nothing upstream of the embeddings (vision tower, projector,
    token embeddings) is trainable in any method here, so keeping their activations is waste.
    """
    with torch.no_grad():
        return lmm.embed(batch["input_ids"], batch["pixel_values"])


def instruction_tokens(lmm: Any, batch: dict[str, Any], device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """(B, L, d_llm) float32 token embeddings of the frozen LLM (no autograd) and the (B, L) bool
    mask of the instruction's positions: attended, not image placeholders, not answer targets."""
    ids = batch["input_ids"].to(device)
    with torch.no_grad():
        tok = lmm.model.get_input_embeddings()(ids).float()
    keep = batch["attention_mask"].to(device).bool() & (ids != lmm.image_token_id)
    if "labels" in batch:
        keep &= batch["labels"].to(device) == -100  # -100: not a target (the LMM's IGNORE)
    return tok, keep


def base_lm_loss(lmm: Any, batch: dict[str, Any]) -> tuple[torch.Tensor, dict[str, float]]:
    """Plain LM cross-entropy of the (possibly adapter-injected) LMM on the unprefixed input."""
    loss = lmm.lm_loss(base_embeds(lmm, batch), batch["attention_mask"], batch["labels"])
    return loss, {"loss": loss.item(), "lm_loss": loss.item()}


def base_generate(
    lmm: Any,
    batch: dict[str, Any],
    max_new_tokens: int,
) -> list[str]:
    """Greedy answers of the LMM as it is (with whatever adapters are injected into it)."""
    with torch.no_grad():
        embeds = lmm.embed(batch["input_ids"], batch["pixel_values"])
        return lmm.generate(embeds, batch["attention_mask"], max_new_tokens)


@contextmanager
def gathered(params: Iterable[nn.Parameter], modifier_rank: int | None = None) -> Iterator[None]:
    """Make ZeRO-3-partitioned parameters whole inside the block (a no-op otherwise).

    ``state_tensors`` / ``load_state_tensors`` run inside it so that a method wrapped by a ZeRO-3
    engine saves full tensors, not empty partitions. Collective while something is still
    partitioned (every rank must call); inside a caller's own all-rank gather it does nothing, so
    rank 0 alone may then call ``state_tensors``. ``modifier_rank`` = the rank whose in-place
    writes are broadcast (None: read only).
    """
    params = [p for p in params if hasattr(p, "ds_id")]
    if not params:
        yield
        return
    # Only reached when DeepSpeed already partitioned these parameters.
    import deepspeed
    from deepspeed.runtime.zero.partition_parameters import ZeroParamStatus

    # Parameters an outer context (e.g. the training stage's own gather) already made whole are
    # left alone: DeepSpeed refuses nested gathers of the same parameter.
    partitioned = [p for p in params if p.ds_status == ZeroParamStatus.NOT_AVAILABLE]
    if not partitioned:
        yield
        return
    with deepspeed.zero.GatheredParameters(partitioned, modifier_rank=modifier_rank):
        yield


def initial_prompts(table: torch.Tensor, m: int, how: str) -> torch.Tensor:
    """(m, d) float32 initial prompt tokens from the LLM's (V, d) token-embedding table (global RNG).

    "vocab": rows ``table[j]`` for m ids j drawn uniformly from [0, V), with replacement, as the
    reference copies ``embed_tokens.weight[np.random.randint(vocab_size)]`` into each new prompt
    token. "mean": the table's mean row plus N(0, (0.1 * std)^2) noise, std over the whole table."""
    table = table.detach()
    with torch.no_grad():
        if how == "vocab":
            ids = torch.randint(table.shape[0], (m,), device=table.device)
            return table[ids].float()
        mean, std = table.float().mean(dim=0), table.float().std()
        return mean.expand(m, -1) + 0.1 * std * torch.randn(m, table.shape[1], device=table.device)


def guide_query(guide: Any, batch: dict[str, Any], kind: str) -> torch.Tensor:
    """(B, d_guide) normalised frozen query feature of each input, no autograd.

    ``image``: the guide's image embedding (the frozen encoder's single vector per image, what
    L2P / DualPrompt / CODA-Prompt query with); ``image_text``: the normalised sum of the image
    and instruction embeddings (ModalPrompt's two modalities).
    """
    import torch.nn.functional as F

    with torch.no_grad():
        q = F.normalize(guide.encode_image(batch["guide_pixels"]).float(), dim=-1)
        if kind == "image_text":
            q = F.normalize(q + F.normalize(guide.encode_text(batch["guide_text"]).float(), dim=-1), dim=-1)
    return q


def usage_diagnostics(predictions: dict[str, list[dict[str, Any]]], out_dir: Any, *, stem: str, unit: str,
                      title: str, label: str) -> Any:
    """Share of each test task's samples whose ``selected`` holds each unit (pool prompt, component,
    expert prompt): ``<stem>.json`` and a heatmap. None when no record carries ``scores``."""
    import json

    from pipeline.figures import heatmap
    from pipeline.methods.protocol import Diagnostics

    tasks = [t for t in predictions if predictions[t] and predictions[t][0].get("scores")]
    if not tasks:
        return None
    width = len(predictions[tasks[0]][0]["scores"])
    usage = []
    for t in tasks:
        counts = [0.0] * width
        for record in predictions[t]:
            for j in record["selected"]:
                counts[j] += 1
        usage.append([c / len(predictions[t]) for c in counts])
    used = sum(any(row[j] > 0 for row in usage) for j in range(width))
    (out_dir / f"{stem}.json").write_text(json.dumps({"tasks": tasks, "usage": usage}, indent=2))
    fig = heatmap(usage, rows=tasks, cols=[str(j) for j in range(width)], fmt="{:.2f}", title=title,
                  path=out_dir / f"{stem}.png", xlabel=unit, ylabel="test task")
    return Diagnostics(summary={f"{stem}_used": float(used)}, files=[out_dir / f"{stem}.json", fig],
                       lines=[f"{label}: {used} of {width} {unit}s selected by some test sample"])


class WrappedLinear(nn.Module):
    """Base of the adapter methods' wrappers around one frozen LLM linear (``wrap_linears``):
    holds the linear as ``base``, its ``target`` name, and the owning method WITHOUT registering
    it (the method's tensors stay in the method's tree; the base model's state is unchanged)."""

    def __init__(self, base: nn.Linear, target: str, method: nn.Module) -> None:
        super().__init__()
        self.base = base
        self.target = target
        object.__setattr__(self, "_method", method)


def wrap_linears(model: nn.Module, pattern: str, make: Any, owner: str) -> dict[str, tuple[int, int]]:
    """Replace every ``nn.Linear`` of ``model`` whose module name fully matches ``pattern`` by
    ``make(linear, target)`` (a wrapper module that keeps the linear as its ``base``); ``target``
    is the module name with dots replaced (usable as a ModuleDict key). Returns target ->
    (in_features, out_features). A model that already carries adapters is refused: build a fresh
    LMM per method. The base model's code is untouched; only its module tree gains wrappers."""
    import re

    if getattr(model, "peft_config", None) or any(isinstance(m, WrappedLinear) for m in model.modules()):
        raise RuntimeError(f"{owner}: this LMM already carries adapters; build a fresh LMM per method")
    rx = re.compile(pattern)
    found = [(n, m) for n, m in model.named_modules() if isinstance(m, nn.Linear) and rx.fullmatch(n)]
    if not found:
        raise RuntimeError(f"{owner}: no module of the LMM matched {pattern!r}")
    targets = {}
    for name, mod in found:
        parent_name, _, child = name.rpartition(".")
        target = name.replace(".", "__")
        setattr(model.get_submodule(parent_name), child, make(mod, target))
        targets[target] = (mod.in_features, mod.out_features)
    return targets
