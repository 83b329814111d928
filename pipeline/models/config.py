"""Typed model configuration: which LMM and guidance CLIP to build, and how to pre-train the tiny one.

``ModelConfig`` is the ``model:`` section of an experiment config. Two kinds share one code path
(transformers ``LlavaForConditionalGeneration`` + an open_clip ``CLIP``):

* ``kind="tiny"``: the embedded default, built from ``TinySpec`` and pre-trained on the CoIN-synth
  corpus by ``pipeline.models.pretrain.ensure_base`` (nothing is downloaded).
* ``kind="llava_hf"``: a LLaVA checkpoint in the Hugging Face ``llava-hf`` folder layout
  (``path``: local folder or ``s3://`` URL), or, for dry runs, an architecture preset (``arch``)
  built on the meta device without weights.

Dimensions live here only as *construction* arguments of the tiny model; everything downstream
reads them back from the built model (``LMM.hidden_size``, ``Guide.dim``, ...).
"""

from __future__ import annotations

import dataclasses
import importlib.util
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

KINDS = ("tiny", "llava_hf")
DTYPES = ("float32", "bfloat16")
TEMPLATES = ("tiny", "llava_v1")
OVERFLOW = ("raise", "count")
GUIDE_TEXT_FEATURES = ("pooled", "projected")
IMAGE_ASPECTS = ("auto", "pad", "stretch")
GUIDE_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth")
LOCAL_DIR = "local-dir:"  # open_clip's schema for a folder with open_clip_config.json + weights
REPO_ROOT = Path(__file__).resolve().parents[2]


def repo_path(path: str) -> str:
    """A model path from a config: relative paths are relative to the repository root (as every
    path in a config is), absolute paths, URLs and unexpanded ``${VAR}`` pass through."""
    if "://" in path or "${" in path or Path(path).expanduser().is_absolute():
        return path
    return str(REPO_ROOT / path)


@dataclass
class TinySpec:
    """Architecture of the embedded default (a few M parameters; trains on 2 CPU cores).

    Vision tower: transformers ``CLIPVisionConfig``; with ``patch_size=8`` on 32x32 images it gives
    16 patch tokens (+ CLS, dropped by the "default" feature-select strategy).
    Language model: transformers ``LlamaConfig``; vocabulary size comes from the word-level tokenizer.
    Guidance CLIP: open_clip ``CLIP`` built from a config dict (BPE tokenizer with 49408 entries).
    """

    vision_layers: int = 2
    vision_hidden: int = 64
    vision_heads: int = 4
    vision_intermediate: int = 256
    patch_size: int = 8
    # Last layer: with only 2 vision layers LLaVA's "-2" would leave the last one untrained.
    vision_feature_layer: int = -1
    # 2 x 128 (MLP 2x): a third layer / 3x MLP cost 30% more CPU per step for the same loss
    # after 600 steps on the CoIN-synth corpus (0.81 vs 0.79, measured).
    lm_layers: int = 2
    lm_hidden: int = 128
    lm_heads: int = 4
    lm_intermediate: int = 256
    max_position_embeddings: int = 512
    guide_embed_dim: int = 64
    guide_vision_width: int = 64
    guide_vision_layers: int = 2
    guide_vision_head_width: int = 16
    guide_patch_size: int = 8
    guide_text_width: int = 64
    guide_text_layers: int = 2
    guide_text_heads: int = 4
    guide_context_length: int = 32
    vocab_max: int = 8000  # word-level vocabulary cap (special tokens included)

    def validate(self, where: str = "tiny") -> None:
        for f in dataclasses.fields(self):
            if getattr(self, f.name) <= 0 and f.name != "vision_feature_layer":
                raise ValueError(f"{where}.{f.name}: must be > 0, got {getattr(self, f.name)}")
        for width, heads, name in (
            (self.vision_hidden, self.vision_heads, "vision_heads"),
            (self.lm_hidden, self.lm_heads, "lm_heads"),
            (self.guide_vision_width, self.guide_vision_head_width, "guide_vision_head_width"),
            (self.guide_text_width, self.guide_text_heads, "guide_text_heads"),
        ):
            if width % heads:
                raise ValueError(f"{where}.{name}: {heads} does not divide the width {width}")
        if not -self.vision_layers - 1 <= self.vision_feature_layer < 0:
            raise ValueError(f"{where}.vision_feature_layer: must be in [-{self.vision_layers + 1}, -1]")


@dataclass
class PretrainSpec:
    """Pre-training of the tiny default (LMM by language modelling, CLIP contrastively)."""

    lmm_steps: int = 1200  # the corpus carries seven skills (synth_pretrain.py): 600 steps left them unlearned
    guide_steps: int = 500
    batch_size: int = 32
    lr: float = 1e-3
    guide_lr: float = 1e-3
    weight_decay: float = 0.01
    warmup_steps: int = 50
    seed: int = 0
    log_every: int = 50
    # torch intra-op threads during pre-training. The base stage runs alone (nothing overlaps it), and
    # there 2 threads make a language-model step 1.6x faster than 1 on 2 idle cores (60 steps: 8.6 s
    # vs 13.8 s; the guide's steps gain nothing). With the cores shared by other work, OpenMP's
    # spinning threads made steps 4-5x slower instead (measured): set 1 there.
    num_threads: int = 2
    # Text paired with each image for the contrastive loss: "conversation" (all turns joined: content
    # words plus instruction style) or "instruction" (first human turn only, what the guide sees later).
    guide_text: str = "conversation"
    # Stop each phase after this many steps (0: run them all) without changing the learning-rate
    # schedule, so the first steps of a shortened run are the full recipe's (the staleness check).
    stop_after: int = 0

    def validate(self, where: str = "pretrain") -> None:
        for name in ("batch_size", "log_every", "num_threads"):
            if getattr(self, name) < 1:
                raise ValueError(f"{where}.{name}: must be >= 1")
        for name in ("lmm_steps", "guide_steps", "warmup_steps", "stop_after"):
            if getattr(self, name) < 0:
                raise ValueError(f"{where}.{name}: must be >= 0")
        for name in ("lr", "guide_lr"):
            if not getattr(self, name) > 0:
                raise ValueError(f"{where}.{name}: must be > 0")
        if self.guide_text not in ("conversation", "instruction"):
            raise ValueError(f"{where}.guide_text: {self.guide_text!r} is not 'conversation' or 'instruction'")


@dataclass
class ModelConfig:
    """The ``model:`` section: base LMM, guidance CLIP, chat template and sequence limits."""

    kind: str = "tiny"
    arch: str | None = None  # llava_hf preset for meta builds, e.g. "llava-1.5-7b"
    path: str | None = None  # llava-hf folder (local or s3://)
    # "tiny", an open_clip model name (e.g. "ViT-L-14-336") or "local-dir:FOLDER", an open_clip
    # folder (open_clip_config.json + open_clip_model.safetensors, as on the Hugging Face hub;
    # relative to the repository root unless absolute): the shipped guide is one.
    guide_arch: str = "tiny"
    guide_path: str | None = None  # open_clip checkpoint file (local or s3://); local-dir: its own file
    # The guide's text feature: "pooled" = the text tower's end-of-text state after its final layer
    # norm, without the text projection (what ModalPrompt's reference code takes: CLIPTextModel's
    # pooler_output); "projected" = open_clip's encode_text, projected into the image-text space.
    guide_text_feature: str = "pooled"
    # QuickGELU activations in the guide (OpenAI's CLIP weights were trained with them; open_clip's
    # plain architecture configs use GELU). None: True for an architecture OpenAI released weights
    # of (open_clip's "openai" pretrained tag), False for the tiny guide and everything else.
    guide_quick_gelu: bool | None = None
    # How an image becomes a square before it is resized to image_size, for the LMM and the guide
    # alike: "pad" = centred on a square of the image processor's mean colour (LLaVA-1.5's
    # expand2square, --image_aspect_ratio pad; llava-hf's do_pad), "stretch" = resized as it is.
    # "auto": pad for llava_hf checkpoints, stretch for the tiny base (trained on stretched images).
    image_aspect: str = "auto"
    image_size: int = 32
    dtype: str = "float32"
    template: str = "tiny"
    max_length: int = 128
    max_new_tokens: int = 32
    # Training rows longer than max_length are cut at the end; a row left without any answer token
    # either raises ("raise") or is kept, with zero loss weight, and counted in LMM.stats ("count").
    on_overflow: str = "raise"
    tiny: TinySpec = field(default_factory=TinySpec)
    pretrain: PretrainSpec = field(default_factory=PretrainSpec)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "ModelConfig":
        """Build and validate from a plain dict; errors name the offending field."""
        cfg = _build(cls, data, "")
        cfg.validate()
        return cfg

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @property
    def guide_dir(self) -> str | None:
        """The folder of a ``local-dir:`` guide (resolved against the repository root), else None."""
        if not self.guide_arch.startswith(LOCAL_DIR):
            return None
        return repo_path(self.guide_arch[len(LOCAL_DIR):])

    @property
    def pads_images(self) -> bool:
        """Whether images are padded to a square (``image_aspect`` with "auto" resolved)."""
        if self.image_aspect == "auto":
            return self.kind == "llava_hf"
        return self.image_aspect == "pad"

    @property
    def quick_gelu(self) -> bool:
        """``guide_quick_gelu`` with None resolved (see the field)."""
        if self.guide_quick_gelu is not None:
            return self.guide_quick_gelu
        return self.guide_arch != "tiny" and self.guide_arch in openai_clip_archs()

    def validate(self) -> None:
        def bad(name: str, msg: str) -> ValueError:
            return ValueError(f"{name}: {msg}")

        if self.kind not in KINDS:
            raise bad("kind", f"{self.kind!r} is not one of {KINDS}")
        if self.dtype not in DTYPES:
            raise bad("dtype", f"{self.dtype!r} is not one of {DTYPES}")
        if self.template not in TEMPLATES:
            raise bad("template", f"{self.template!r} is not one of {TEMPLATES}")
        if self.guide_text_feature not in GUIDE_TEXT_FEATURES:
            raise bad("guide_text_feature", f"{self.guide_text_feature!r} is not one of {GUIDE_TEXT_FEATURES}")
        if self.image_aspect not in IMAGE_ASPECTS:
            raise bad("image_aspect", f"{self.image_aspect!r} is not one of {IMAGE_ASPECTS}")
        if self.on_overflow not in OVERFLOW:
            raise bad("on_overflow", f"{self.on_overflow!r} is not one of {OVERFLOW}")
        if self.image_size <= 0:
            raise bad("image_size", "must be > 0")
        if self.max_new_tokens < 1:
            raise bad("max_new_tokens", "must be >= 1")
        if self.kind == "tiny":
            if self.arch is not None or self.path is not None:
                raise bad("arch" if self.arch is not None else "path", "only used with kind 'llava_hf'")
            if self.image_size % self.tiny.patch_size:
                raise bad("image_size", f"{self.image_size} is not a multiple of tiny.patch_size={self.tiny.patch_size}")
            n_image = (self.image_size // self.tiny.patch_size) ** 2
            if self.max_length <= n_image + 8:
                raise bad("max_length", f"{self.max_length} leaves no room for text after {n_image} image tokens")
        else:
            from pipeline.models.presets import LLAVA_PRESETS

            if self.arch is None and self.path is None:
                raise bad("path", "kind 'llava_hf' needs a checkpoint folder (path) or a preset (arch)")
            if self.arch is not None and self.arch not in LLAVA_PRESETS:
                raise bad("arch", f"unknown preset {self.arch!r}; known: {sorted(LLAVA_PRESETS)}")
        if self.guide_dir is not None:
            if not self.guide_dir.strip():
                raise bad("guide_arch", f"{self.guide_arch!r} names no folder")
        elif self.guide_arch != "tiny" and self.guide_arch not in open_clip_model_names():
            raise bad("guide_arch", f"{self.guide_arch!r} is neither 'tiny', an open_clip model name nor "
                                    f"'{LOCAL_DIR}FOLDER'")
        if self.guide_path is not None and not self.guide_path.endswith(GUIDE_SUFFIXES):
            raise bad("guide_path", f"{self.guide_path!r} must end with one of {GUIDE_SUFFIXES}")
        self.tiny.validate("tiny")
        self.pretrain.validate("pretrain")


def openai_clip_archs() -> set[str]:
    """open_clip architectures with an "openai" pretrained tag (weights trained with QuickGELU),
    read from open_clip's pretrained table without importing the package's models."""
    try:
        from open_clip.pretrained import list_pretrained
    except ImportError:
        return set()
    return {arch for arch, tag in list_pretrained() if tag == "openai" and not arch.endswith("-quickgelu")}


def open_clip_model_names() -> set[str]:
    """Built-in open_clip architecture names, read from its config files without importing it
    (importing open_clip pulls in torchvision: seconds we don't want in config validation)."""
    spec = importlib.util.find_spec("open_clip")
    if spec is None or not spec.submodule_search_locations:
        return set()
    folder = Path(list(spec.submodule_search_locations)[0]) / "model_configs"
    return {p.stem for p in folder.glob("*.json")}


def _build(cls: type, data: Any, where: str) -> Any:
    """Dataclass ``cls`` from a dict: unknown keys and ill-typed values raise ValueError(field: ...)."""
    if isinstance(data, cls):
        return data
    if not isinstance(data, dict):
        raise ValueError(f"{where or 'model'}: expected a mapping, got {type(data).__name__}")
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    kwargs: dict[str, Any] = {}
    for key, value in data.items():
        name = f"{where}{key}"
        if key not in names:
            raise ValueError(f"{name}: unknown key (known: {names})")
        tp = hints[key]
        if dataclasses.is_dataclass(tp):
            kwargs[key] = _build(tp, value, f"{name}.")
        else:
            kwargs[key] = _check(tp, value, name)
    return cls(**kwargs)


def _check(tp: Any, value: Any, name: str) -> Any:
    args = typing.get_args(tp)
    if value is None and type(None) in args:
        return None
    base = next((a for a in args if a is not type(None)), tp)
    if base is float and isinstance(value, (int, float)) and not isinstance(value, bool):
        return float(value)
    if base in (int, str, bool) and type(value) is base:
        return value
    raise ValueError(f"{name}: expected {base.__name__}, got {value!r}")
