"""Builders behind ``pipeline.models.build_lmm`` / ``build_guide`` and the parameter counter."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable

import torch
from torch import nn

from pipeline.models.config import ModelConfig, repo_path
from pipeline.models.guide import (CLIP_MEAN, CLIP_STD, OPEN_CLIP_WEIGHTS, Guide, GuideInputs, build_clip,
                                   load_clip_weights)
from pipeline.models.lmm import LMM

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}


def tiny_llava_config(cfg: ModelConfig, tokenizer: Any) -> Any:
    """``LlavaConfig`` of the tiny model; vocabulary and special ids come from ``tokenizer``."""
    from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig

    t = cfg.tiny
    vision = CLIPVisionConfig(
        hidden_size=t.vision_hidden,
        intermediate_size=t.vision_intermediate,
        num_hidden_layers=t.vision_layers,
        num_attention_heads=t.vision_heads,
        image_size=cfg.image_size,
        patch_size=t.patch_size,
        projection_dim=t.vision_hidden,
    )
    text = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=t.lm_hidden,
        intermediate_size=t.lm_intermediate,
        num_hidden_layers=t.lm_layers,
        num_attention_heads=t.lm_heads,
        num_key_value_heads=t.lm_heads,
        max_position_embeddings=t.max_position_embeddings,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    return LlavaConfig(
        vision_config=vision,
        text_config=text,
        image_token_id=tokenizer.convert_tokens_to_ids("<image>"),
        vision_feature_layer=t.vision_feature_layer,
        vision_feature_select_strategy="default",
        projector_hidden_act="gelu",
        image_seq_length=(cfg.image_size // t.patch_size) ** 2,
        tie_word_embeddings=False,
    )


def build_lmm(cfg: ModelConfig, *, device: str | torch.device = "cpu", meta: bool = False,
              weights: str | None = None, tokenizer: Any = None) -> LMM:
    """Build the frozen base LMM described by ``cfg``.

    tiny: ``weights`` = a folder written by ``ensure_base`` (model + tokenizer); without it, random
    init with ``tokenizer`` (default: one built from the template words only).
    llava_hf: ``weights`` (or ``cfg.path``) = a llava-hf folder, local or s3://.
    meta=True: architecture only, on the meta device (tiny config or ``cfg.arch`` preset); nothing
    is read, nothing is allocated, and the LMM has no tokenizer unless one is given.
    """
    from transformers import LlavaForConditionalGeneration

    cfg.validate()
    dtype = DTYPES[cfg.dtype]
    if meta:
        if cfg.kind == "tiny":
            tokenizer = tokenizer if tokenizer is not None else _default_tokenizer(cfg)
            config = tiny_llava_config(cfg, tokenizer)
        elif cfg.arch is not None:
            from pipeline.models.presets import llava_preset

            config = llava_preset(cfg.arch)
        else:
            from transformers import AutoConfig

            config = AutoConfig.from_pretrained(_local(cfg.path))
        with torch.device("meta"):
            model = LlavaForConditionalGeneration(config).to(dtype)
        return LMM(model, tokenizer, _with_size(cfg, config), None)

    source = weights or (cfg.path if cfg.kind == "llava_hf" else None)
    mean, std = CLIP_MEAN, CLIP_STD
    if source is None:
        if cfg.kind != "tiny":
            raise ValueError("path: kind 'llava_hf' needs a checkpoint folder (no downloads)")
        tokenizer = tokenizer if tokenizer is not None else _default_tokenizer(cfg)
        model = LlavaForConditionalGeneration(tiny_llava_config(cfg, tokenizer)).to(dtype)
    else:
        from transformers import AutoTokenizer

        folder = _local(source)
        model = LlavaForConditionalGeneration.from_pretrained(str(folder), dtype=dtype)
        tokenizer = AutoTokenizer.from_pretrained(str(folder))
        mean, std = _image_stats(folder)
    size = int(model.config.vision_config.image_size)
    if size != cfg.image_size:
        raise ValueError(f"image_size: config says {cfg.image_size} but the checkpoint's vision tower takes {size}")
    model.to(device)
    return LMM(model, tokenizer, cfg, GuideInputs.from_config(cfg), mean, std)


def build_guide(cfg: ModelConfig, *, device: str | torch.device = "cpu", meta: bool = False,
                weights: str | None = None) -> Guide:
    """Build the frozen guidance CLIP: ``weights`` (or ``cfg.guide_path``) is an open_clip state
    dict file (local or s3://). The tiny guide without a file is randomly initialised; a named
    architecture without a file is an error unless ``meta=True`` (no downloads)."""
    cfg.validate()
    model = build_clip(cfg, meta=meta)
    inputs = GuideInputs.from_config(cfg)
    if meta:
        return Guide(model, inputs, cfg.guide_text_feature)
    source = guide_weights(cfg, weights)
    if source is not None:
        load_clip_weights(model, str(_local(source)))
    elif cfg.guide_arch != "tiny":
        raise ValueError(f"guide_path: guide_arch {cfg.guide_arch!r} needs a checkpoint file (no downloads)")
    return Guide(model.to(device=device, dtype=DTYPES[cfg.dtype]), inputs, cfg.guide_text_feature)


def guide_weights(cfg: ModelConfig, weights: str | None = None) -> str | None:
    """The guide's weights file: ``weights``, else ``guide_path``, else a ``local-dir:`` folder's own
    open_clip_model.safetensors; None for a tiny guide without a file."""
    if weights or cfg.guide_path:
        return weights or cfg.guide_path
    if cfg.guide_dir is not None:
        return str(Path(cfg.guide_dir) / OPEN_CLIP_WEIGHTS)
    return None


@dataclass
class ParamCount:
    """Parameter totals for the dry run (unique tensors, tied weights counted once).

    base: the LMM; guide: the guidance CLIP; added: trainable parameters that belong to neither
    (a method's prompts, LoRA blocks, projections); trainable: every parameter in the trainable set.
    ``total`` = base + added (the generating model; the guide is reported apart).
    """

    base: int
    guide: int
    added: int
    trainable: int

    @property
    def total(self) -> int:
        return self.base + self.added

    @property
    def trainable_share(self) -> float:
        return self.trainable / max(1, self.total)

    def to_dict(self) -> dict[str, Any]:
        return {"base": self.base, "guide": self.guide, "added": self.added, "trainable": self.trainable,
                "total": self.total, "trainable_share": self.trainable_share}


def count_parameters(lmm: Any = None, guide: Any = None, trainable: Iterable[nn.Parameter] = ()) -> ParamCount:
    """Count parameters of an LMM / guide (real or meta) and of a trainable set."""

    def unique(params: Iterable[nn.Parameter]) -> dict[int, int]:
        return {id(p): p.numel() for p in params}

    base = unique(_module(lmm).parameters()) if lmm is not None else {}
    gd = unique(_module(guide).parameters()) if guide is not None else {}
    train = unique(trainable)
    added = sum(n for k, n in train.items() if k not in base and k not in gd)
    return ParamCount(sum(base.values()), sum(gd.values()), added, sum(train.values()))


def _module(obj: Any) -> nn.Module:
    return obj if isinstance(obj, nn.Module) else obj.model


def _local(source: str) -> Path:
    from pipeline.models.fetch import fetch

    return fetch(repo_path(source))


def _default_tokenizer(cfg: ModelConfig) -> Any:
    from pipeline.models.tokenizer import build_tokenizer

    return build_tokenizer((), vocab_max=cfg.tiny.vocab_max)


def _with_size(cfg: ModelConfig, config: Any) -> ModelConfig:
    """A copy of ``cfg`` whose image_size matches a preset (meta builds only count parameters)."""
    import dataclasses

    return dataclasses.replace(cfg, image_size=int(config.vision_config.image_size))


def image_pad_color(cfg: ModelConfig, lmm_dir: str | None = None) -> tuple[int, int, int] | None:
    """The RGB colour images are padded to a square with (``model.image_aspect``), None to stretch.

    As LLaVA-1.5 and transformers' ``LlavaImageProcessor(do_pad=True)``: the processor's
    ``image_mean`` times 255, truncated to integers. The mean comes from the checkpoint folder's
    ``preprocessor_config.json`` (``lmm_dir``, else ``model.path``; local or s3://, only that
    file is read), CLIP's where there is none."""
    if not cfg.pads_images:
        return None
    folder = lmm_dir or cfg.path
    mean, _ = _image_stats(folder) if folder and "${" not in folder else (CLIP_MEAN, CLIP_STD)
    return tuple(int(float(x) * 255) for x in mean)


def _image_stats(folder: str | Path) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """Vision normalisation from a llava-hf folder's preprocessor_config.json (local or s3://;
    only that file is read), CLIP's where there is none."""
    from pipeline.data import storage

    fs, root = storage.resolve(repo_path(str(folder)))
    file = storage.join(root, "preprocessor_config.json")
    if not storage.exists(fs, file):
        return CLIP_MEAN, CLIP_STD
    pre = storage.read_json(fs, file)
    return tuple(pre.get("image_mean", CLIP_MEAN)), tuple(pre.get("image_std", CLIP_STD))
