"""The base the project ships: a llava-hf folder and an open_clip folder, made by ``pretrain``.

Layout of ``pipeline/assets/coin-synth-base/`` (``SHIPPED_BASE``)::

    llava/   config.json, model.safetensors, tokenizer files, preprocessor_config.json
             (transformers' ``LlavaForConditionalGeneration`` / ``AutoTokenizer`` /
             ``AutoImageProcessor`` load it, as they load llava-hf/llava-1.5-7b-hf)
    guide/   open_clip_config.json, open_clip_model.safetensors
             (``open_clip.create_model("local-dir:...")`` loads it)
    BASE.json  how they were made: command, recipe version, model and recipe spec, corpus spec and
             its sha256, the corpus probe, seed, losses, wall time, zero-shot scores, and the
             sha256 of every file above

The default config loads them through ``model.kind: llava_hf`` (``model.path``, ``model.guide_arch:
local-dir:...``), the code path that loads LLaVA-1.5-7B. ``python pipeline/main.py pretrain``
rebuilds them (``stages.pretrain.build_shipped_base``): the recipe is
``pipeline/configs/base_recipe.yaml`` merged over the default config.

Staleness: ``BASE.json`` records the recipe version and the generator version, the corpus's sha256
(over its record file and images) and a *probe*, the sha256 of the first ``PROBE_RECORDS`` records
of every corpus stream, which a test regenerates in a second (``probe_digest``); it also records
the first language-model losses, which the slow test replays with a shortened recipe. A change of
the generator or the recipe makes them disagree, so no one tests against a stale base unknowingly.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import shutil
import uuid
from pathlib import Path
from typing import Any, Callable

from pipeline.models.config import REPO_ROOT
from pipeline.models.pretrain import _sha256 as sha256_file  # noqa: F401 (also used by stages.pretrain)

SHIPPED_BASE = REPO_ROOT / "pipeline" / "assets" / "coin-synth-base"
RECIPE_CONFIG = REPO_ROOT / "pipeline" / "configs" / "base_recipe.yaml"
LLAVA_DIR, GUIDE_DIR, METADATA = "llava", "guide", "BASE.json"
PROBE_RECORDS = 8
SIZE_LIMIT_MB = 40.0

LogFn = Callable[[str], None]


def corpus_spec(cfg: Any) -> Any:
    """The ``SynthSpec`` of the recipe's benchmark and corpus (``data.synth`` at the model's size)."""
    from pipeline.data.synth import SynthSpec

    return SynthSpec(image_size=cfg.model.image_size, **dataclasses.asdict(cfg.data.synth))


def corpus_digest(root: str | Path) -> str:
    """sha256 over the corpus files of a generated CoIN-synth folder (its record file and images),
    from the per-file digests its SPEC.json records."""
    files = json.loads((Path(root) / "SPEC.json").read_text())["files"]
    part = sorted((k, v) for k, v in files.items() if k == "pretrain/train.json" or k.startswith("images/pretrain/"))
    return hashlib.sha256(json.dumps(part).encode()).hexdigest()


def probe_digest(spec: Any, workdir: str | Path) -> str:
    """sha256 of the first ``PROBE_RECORDS`` records of every corpus stream (generic, and each
    skill task's), generated afresh under ``workdir``: each stream has its own random generator,
    so these records are the first ones of the full corpus, and a change of the generator changes
    them."""
    from pipeline.data.synth import generate_benchmark

    small = dataclasses.replace(spec, train_per_task=0, test_per_task=0, pretrain_records=PROBE_RECORDS,
                                pretrain_skill_per_task=PROBE_RECORDS)
    root = Path(workdir) / f"probe-{uuid.uuid4().hex[:8]}"
    try:
        generate_benchmark(root, small)
        return corpus_digest(root)
    finally:
        shutil.rmtree(root, ignore_errors=True)


def read_metadata(folder: str | Path = SHIPPED_BASE) -> dict[str, Any]:
    file = Path(folder) / METADATA
    if not file.exists():
        raise FileNotFoundError(f"{file} does not exist: build the base with `python pipeline/main.py pretrain`")
    return json.loads(file.read_text())


def verify_files(folder: str | Path = SHIPPED_BASE) -> list[str]:
    """Problems with the shipped files against ``BASE.json``'s sha256 list (empty: all good)."""
    folder = Path(folder)
    listed = read_metadata(folder)["files"]
    present = {p.relative_to(folder).as_posix() for p in folder.rglob("*") if p.is_file()} - {METADATA}
    problems = [f"missing: {f}" for f in sorted(set(listed) - present)]
    problems += [f"not in {METADATA}: {f}" for f in sorted(present - set(listed))]
    problems += [f"sha256 differs: {f}" for f in sorted(set(listed) & present) if sha256_file(folder / f) != listed[f]]
    return problems


def export(cfg: Any, work: Path, out: Path) -> None:
    """``pretrain_into``'s output (``work``: lmm/ with model + tokenizer, guide.safetensors) ->
    ``out/llava`` (+ preprocessor_config.json) and ``out/guide`` (open_clip folder)."""
    from transformers import CLIPImageProcessor

    from pipeline.models.guide import CLIP_MEAN, CLIP_STD, OPEN_CLIP_CONFIG, OPEN_CLIP_WEIGHTS, tiny_clip_config
    from pipeline.models.pretrain import GUIDE_FILE, LMM_DIR

    size = cfg.model.image_size
    os.rename(work / LMM_DIR, out / LLAVA_DIR)
    # the llava-hf image processor: CLIP normalisation, images already square at the model's size
    CLIPImageProcessor(size={"shortest_edge": size}, crop_size={"height": size, "width": size},
                       image_mean=list(CLIP_MEAN), image_std=list(CLIP_STD)).save_pretrained(str(out / LLAVA_DIR))
    guide = out / GUIDE_DIR
    guide.mkdir()
    model_cfg = tiny_clip_config(cfg.model)
    model_cfg["quick_gelu"] = bool(cfg.model.quick_gelu)
    doc = {"model_cfg": model_cfg,
           "preprocess_cfg": {"mean": list(CLIP_MEAN), "std": list(CLIP_STD), "interpolation": "bicubic",
                              "resize_mode": "shortest"}}
    (guide / OPEN_CLIP_CONFIG).write_text(json.dumps(doc, indent=2, sort_keys=True) + "\n")
    os.rename(work / GUIDE_FILE, guide / OPEN_CLIP_WEIGHTS)


def shipped_model_overrides(folder: str | Path) -> dict[str, Any]:
    """``model:`` settings that load a base folder written by ``build_shipped_base``."""
    meta = read_metadata(folder)
    m = meta["model"]
    return {"kind": "llava_hf", "path": str(Path(folder) / LLAVA_DIR), "guide_arch": f"local-dir:{Path(folder) / GUIDE_DIR}",
            "guide_path": None, "image_size": m["image_size"], "template": m["template"], "max_length": m["max_length"]}
