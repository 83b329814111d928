"""The frozen guidance CLIP (open_clip) used by prompt-selecting methods (ModalPrompt, L2P, ...).

``GuideInputs`` describes what the guide expects (image size, normalisation, tokenizer) and is
known from the config alone, so ``LMM.collate`` can prepare ``guide_pixels`` / ``guide_text``
without the guide model being built in the same process.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Sequence

import numpy as np
import torch
import torch.nn.functional as F

from pipeline.models.config import ModelConfig
from pipeline.models.frozen import FrozenFeatures

# OpenAI CLIP normalisation (open_clip's default PreprocessCfg and the llava-hf image processor's).
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


def tiny_clip_config(cfg: ModelConfig) -> dict[str, Any]:
    """open_clip ``CLIP(**config)`` arguments of the tiny guidance CLIP."""
    t = cfg.tiny
    return {
        "embed_dim": t.guide_embed_dim,
        "vision_cfg": {
            "image_size": cfg.image_size,
            "layers": t.guide_vision_layers,
            "width": t.guide_vision_width,
            "head_width": t.guide_vision_head_width,
            "patch_size": t.guide_patch_size,
        },
        "text_cfg": {
            "context_length": t.guide_context_length,
            "vocab_size": 49408,  # open_clip's packaged BPE vocabulary (SimpleTokenizer)
            "width": t.guide_text_width,
            "heads": t.guide_text_heads,
            "layers": t.guide_text_layers,
        },
    }


OPEN_CLIP_CONFIG = "open_clip_config.json"  # open_clip's folder layout (Hugging Face hub, local-dir:)
OPEN_CLIP_WEIGHTS = "open_clip_model.safetensors"


def clip_model_config(cfg: ModelConfig) -> dict[str, Any]:
    """The open_clip architecture dict for ``cfg.guide_arch`` ("tiny", a built-in name or a
    ``local-dir:`` folder, whose ``preprocess_cfg`` comes along)."""
    if cfg.guide_arch == "tiny":
        return tiny_clip_config(cfg)
    if cfg.guide_dir is not None:
        return folder_clip_config(cfg.guide_dir)
    import open_clip

    model_cfg = open_clip.get_model_config(cfg.guide_arch)
    if model_cfg is None:
        raise ValueError(f"guide_arch: {cfg.guide_arch!r} is not a built-in open_clip model")
    return model_cfg


def folder_clip_config(folder: str) -> dict[str, Any]:
    """``model_cfg`` (with ``preprocess_cfg``) of an open_clip folder's open_clip_config.json."""
    import json
    from pathlib import Path

    file = Path(folder) / OPEN_CLIP_CONFIG
    try:
        doc = json.loads(file.read_text())
    except FileNotFoundError:
        raise FileNotFoundError(f"guide_arch: {file} does not exist (an open_clip folder holds "
                                f"{OPEN_CLIP_CONFIG} and {OPEN_CLIP_WEIGHTS})") from None
    except ValueError as e:
        raise ValueError(f"guide_arch: {file} is not valid JSON ({e})") from None
    if not isinstance(doc, dict) or not isinstance(doc.get("model_cfg"), dict):
        raise ValueError(f"guide_arch: {file} has no 'model_cfg' mapping")
    return {**doc["model_cfg"], "preprocess_cfg": dict(doc.get("preprocess_cfg") or {})}


@dataclass
class GuideInputs:
    """How raw images and instruction texts become guide inputs."""

    image_size: int
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    context_length: int
    tokenizer: Any  # open_clip tokenizer: list[str] -> LongTensor (B, context_length)

    @classmethod
    def from_config(cls, cfg: ModelConfig) -> "GuideInputs":
        model_cfg = clip_model_config(cfg)
        vision, text = model_cfg["vision_cfg"], model_cfg["text_cfg"]
        pre = model_cfg.get("preprocess_cfg", {})
        size = vision["image_size"]
        size = size if isinstance(size, int) else int(size[0])
        ctx = int(text.get("context_length", 77))
        if cfg.guide_arch == "tiny" or (cfg.guide_dir is not None and "hf_tokenizer_name" not in text):
            from open_clip.tokenizer import SimpleTokenizer

            tokenizer = SimpleTokenizer(context_length=ctx)  # BPE vocab ships inside open_clip
        else:
            import open_clip

            tokenizer = open_clip.get_tokenizer(cfg.guide_arch, context_length=ctx)
        return cls(size, tuple(pre.get("mean", CLIP_MEAN)), tuple(pre.get("std", CLIP_STD)), ctx, tokenizer)

    def pixels(self, images: Any) -> torch.Tensor:
        """uint8 images -> (B, 3, image_size, image_size) float32, normalised."""
        return normalize_images(images, self.image_size, self.mean, self.std)

    def tokenize(self, texts: Sequence[str]) -> torch.Tensor:
        """(B, context_length) token ids; open_clip truncates and keeps the end-of-text token."""
        return self.tokenizer([str(t) for t in texts]).long()


def normalize_images(images: Any, size: int, mean: Sequence[float], std: Sequence[float]) -> torch.Tensor:
    """Stack uint8 RGB images ``(B, S, S, 3)`` (array, tensor or list of arrays) into normalised
    ``(B, 3, size, size)`` float32, resizing (bicubic, antialiased) when ``S != size``."""
    if isinstance(images, torch.Tensor):
        x = images
    else:
        x = torch.from_numpy(np.stack([np.asarray(im) for im in images]))
    if x.ndim != 4 or x.shape[-1] != 3:
        raise ValueError(f"images must be (B, S, S, 3) RGB, got shape {tuple(x.shape)}")
    x = x.permute(0, 3, 1, 2).float().div_(255.0)
    if x.shape[-2:] != (size, size):
        x = F.interpolate(x, size=(size, size), mode="bicubic", antialias=True, align_corners=False).clamp_(0, 1)
    m = torch.tensor(mean, dtype=x.dtype).view(1, 3, 1, 1)
    s = torch.tensor(std, dtype=x.dtype).view(1, 3, 1, 1)
    return (x - m) / s


class Guide:
    """Frozen open_clip CLIP exposing image embeddings and text features (``GuideLike``).

    Attributes: ``model`` (the CLIP, eval, requires_grad False), ``dim`` (d_guide, read from the
    model), ``image_size``, ``mean``, ``std``, ``context_length``.
    """

    def __init__(self, model: torch.nn.Module, inputs: GuideInputs, text_feature: str = "pooled") -> None:
        self.model = model.eval().requires_grad_(False)
        self.inputs = inputs
        self.dim = int(model.visual.output_dim)
        self.text_feature = text_feature
        if text_feature == "pooled":
            self._check_pooled()
        self.image_size = inputs.image_size
        self.mean = inputs.mean
        self.std = inputs.std
        self.context_length = inputs.context_length
        self.frozen = FrozenFeatures()  # the inference actor's per-sample feature cache hooks in here

    def _check_pooled(self) -> None:
        """The pooled text feature must live in a space of the image embedding's size, or one
        prototype cannot be compared with both (ViT-L/14: 768 and 768; RN50: 512 vs 1024)."""
        model = self.model
        if not all(hasattr(model, a) for a in ("token_embedding", "transformer", "ln_final")):
            raise ValueError("guide_text_feature 'pooled' needs an open_clip CLIP with a built-in text tower "
                             f"({type(model).__name__} has none); use 'projected'")
        width = int(model.ln_final.normalized_shape[0])
        if width != self.dim:
            raise ValueError(f"guide_text_feature 'pooled': the text tower's width {width} differs from the "
                             f"image embedding's {self.dim}, so one prototype cannot be compared with both; "
                             "use guide_text_feature 'projected'")

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        return next(self.model.parameters()).dtype

    def tokenize(self, texts: Sequence[str]) -> torch.Tensor:
        """(B, context_length) LongTensor of CLIP BPE ids."""
        return self.inputs.tokenize(texts)

    def pixels(self, images: Any) -> torch.Tensor:
        """uint8 (B, S, S, 3) -> (B, 3, image_size, image_size) normalised for this CLIP."""
        return self.inputs.pixels(images)

    @torch.no_grad()
    def encode_image(self, guide_pixels: torch.Tensor) -> torch.Tensor:
        """(B, 3, Sg, Sg) -> (B, d_guide) float32 projected image embeddings (not L2-normalised)."""
        return self.frozen.get(guide_pixels, lambda: self.model.encode_image(
            guide_pixels.to(self.device, self.dtype)).float())

    @torch.no_grad()
    def encode_text(self, guide_text: torch.Tensor) -> torch.Tensor:
        """(B, Lc) token ids -> (B, d_guide) float32 text features (EOT-pooled): the pooled state
        without the text projection ("pooled") or open_clip's projected embedding ("projected")."""
        return self.frozen.get(guide_text, lambda: self._encode_text(guide_text.to(self.device)))

    def _encode_text(self, text: torch.Tensor) -> torch.Tensor:
        if self.text_feature == "projected":
            return self.model.encode_text(text).float()
        return pooled_text_features(self.model, text).float()


def pooled_text_features(model: torch.nn.Module, text: torch.Tensor) -> torch.Tensor:
    """open_clip ``CLIP.encode_text`` up to its pooling, without the text projection: the final
    layer-normed state at the end-of-text token, as transformers' ``CLIPTextModel.pooler_output``
    (what ModalPrompt's reference code guides with)."""
    from open_clip.transformer import text_global_pool

    cast = model.transformer.get_cast_dtype()
    x = model.token_embedding(text).to(cast) + model.positional_embedding.to(cast)
    x = model.ln_final(model.transformer(x, attn_mask=model.attn_mask))
    return text_global_pool(x, text, model.text_pool_type, eos_token_id=getattr(model, "text_eos_id", None))


def build_clip(cfg: ModelConfig, *, meta: bool = False) -> torch.nn.Module:
    """An open_clip CLIP for ``cfg.guide_arch`` with random weights (or on the meta device).

    Built directly from the architecture dict rather than ``open_clip.create_model`` so that a
    meta build never allocates memory or moves tensors, and nothing is looked up online.
    """
    from open_clip.model import CLIP, CustomTextCLIP

    model_cfg = dict(clip_model_config(cfg))
    model_cfg.pop("preprocess_cfg", None)
    custom = model_cfg.pop("custom_text", False) or "hf_model_name" in model_cfg.get("text_cfg", {})
    if "timm_model_name" in model_cfg.get("vision_cfg", {}) or "hf_model_name" in model_cfg.get("text_cfg", {}):
        # timm / HF towers fetch their configs or weights from a hub: not available offline.
        raise ValueError(f"guide_arch: {cfg.guide_arch!r} needs timm/HF hub towers; use a plain ViT CLIP")
    cls = CustomTextCLIP if custom else CLIP
    model_cfg["quick_gelu"] = cfg.quick_gelu
    if meta:
        with torch.device("meta"):
            return cls(**model_cfg)
    return cls(**model_cfg)


def load_clip_weights(model: torch.nn.Module, file: str) -> None:
    """Load an open_clip checkpoint into ``model`` (strict). ``.safetensors`` preferred; pickled
    ``.bin/.pt/.pth`` files go through ``torch.load(weights_only=True)`` only."""
    if file.endswith(".safetensors"):
        from safetensors.torch import load_file

        state = load_file(file)
    else:
        state = torch.load(file, map_location="cpu", weights_only=True)
        if isinstance(state, dict) and "state_dict" in state:
            state = state["state_dict"]
    if not isinstance(state, dict):
        raise ValueError(f"guide checkpoint {file}: expected a state dict, got {type(state).__name__}")
    # Checkpoints saved from DDP/DeepSpeed wrappers carry a "module." prefix.
    state = {k.removeprefix("module."): v for k, v in state.items()}
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as e:  # missing / unexpected keys or shape mismatches
        raise ValueError(f"guide checkpoint {file} does not match the architecture: {e}") from None
