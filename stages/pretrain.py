"""pretrain: the recipe that builds the shipped base (``python pipeline/main.py pretrain``).

Generates the recipe's CoIN-synth benchmark and corpus, pre-trains the LLaVA model and the guide
(``pipeline.models.pretrain.pretrain_into``), exports them in the shipped layout
(``pipeline.models.shipped``), runs the pipeline's zero-shot evaluation on the exported files and
writes ``BASE.json``. Lives here, not in ``pipeline/``, because the zero-shot run is a pipeline
run (Ray).
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import sys
import time
import uuid
from pathlib import Path
from typing import Any, Callable

from pipeline.models.shipped import (GUIDE_DIR, LLAVA_DIR, METADATA, PROBE_RECORDS, SIZE_LIMIT_MB, corpus_digest,
                                     corpus_spec, export, probe_digest, sha256_file)

LogFn = Callable[[str], None]


def build_shipped_base(cfg: Any, out: str | Path, *, command: str, log: LogFn = print,
                       zero_shot: bool = True) -> dict[str, Any]:
    """Pre-train the base of ``cfg`` (a ``kind: tiny`` config: the recipe) into ``out``.

    Generates the recipe's CoIN-synth benchmark and corpus (under ``cfg.cache_dir``), pre-trains
    the LLaVA model and the guide (``pretrain.pretrain_into``), writes them as a llava-hf folder and an
    open_clip folder, then (``zero_shot``) runs the pipeline's zero-shot evaluation on the shipped
    files, through the ``llava_hf`` loader, and writes ``BASE.json``. Everything goes to a
    temporary folder beside ``out`` that replaces ``out`` only when complete.
    """
    from pipeline.data.synth import GENERATOR_VERSION, benchmark_texts, generate_benchmark
    from pipeline.models.pretrain import PRETRAIN_VERSION, base_key, pretrain_into
    from stages.base import pretrain_line, pretrain_rows
    from stages.common import synth_root

    if cfg.model.kind != "tiny":
        raise ValueError("pretrain: the recipe must be a model.kind 'tiny' config (it builds the model from "
                         f"model.tiny), not {cfg.model.kind!r}")
    out = Path(out)
    spec = corpus_spec(cfg)
    root = Path(synth_root(cfg))
    start = time.perf_counter()
    gen = generate_benchmark(root, spec)
    how = "reused" if gen["reused"] else f"generated in {gen['seconds']}s"
    log(f"CoIN-synth benchmark and corpus at {root} ({how}; {gen['pretrain']['records']} corpus records)")
    tmp = out.parent / f".tmp-{out.name}-{uuid.uuid4().hex[:8]}"
    work = tmp / "work"
    work.mkdir(parents=True)
    try:
        info = pretrain_into(cfg.model, lambda: pretrain_rows(str(root), cfg.model.image_size),
                             lambda: benchmark_texts(root), work, key=base_key(cfg.model, root.name),
                             data_seed=root.name, log=lambda row: log("  " + pretrain_line(row)))
        export(cfg, work, tmp)
        shutil.rmtree(work)
        meta: dict[str, Any] = {
            "command": command,
            "recipe_version": PRETRAIN_VERSION,
            "generator_version": GENERATOR_VERSION,
            "model": {"image_size": cfg.model.image_size, "template": cfg.model.template,
                      "max_length": cfg.model.max_length, "tiny": dataclasses.asdict(cfg.model.tiny)},
            "recipe": dataclasses.asdict(cfg.model.pretrain),
            "corpus": {"spec": json.loads(json.dumps(dataclasses.asdict(spec))), "records": gen["pretrain"]["records"],
                       "sha256": corpus_digest(root), "probe_records": PROBE_RECORDS, "chance": gen["chance"],
                       "probe_sha256": probe_digest(spec, tmp)},
            "seed": cfg.model.pretrain.seed,
            "vocab_size": info["vocab_size"],
            "lmm": info["lmm"],
            "guide": info["guide"],
            "torch_threads": info["torch_threads"],
            "pretrain_wall_s": info["wall_s"],
            "versions": _versions(),
        }
        if zero_shot:
            meta["zero_shot"] = _zero_shot(cfg, tmp, log)
        meta["wall_s"] = round(time.perf_counter() - start, 1)
        meta["files"] = {p.relative_to(tmp).as_posix(): sha256_file(p) for p in sorted(tmp.rglob("*")) if p.is_file()}
        meta["size_mb"] = round(sum((tmp / f).stat().st_size for f in meta["files"]) / 2**20, 2)
        (tmp / METADATA).write_text(json.dumps(meta, indent=2, sort_keys=True) + "\n")
        if meta["size_mb"] > SIZE_LIMIT_MB:
            log(f"warning: the base is {meta['size_mb']} MB, over the {SIZE_LIMIT_MB} MB the repository ships")
        old = out.parent / f".old-{out.name}-{uuid.uuid4().hex[:8]}"
        if out.exists():
            os.rename(out, old)
        os.rename(tmp, out)
        shutil.rmtree(old, ignore_errors=True)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return meta


def _zero_shot(cfg: Any, folder: Path, log: LogFn) -> dict[str, Any]:
    """The pipeline's zero-shot run (``--method zeroshot``) of the recipe's benchmark on the files
    in ``folder``, loaded as the default loads the shipped base."""
    from pipeline.config import config_from_dict, merge
    from stages.runner import PipelineRun

    # the recipe's metadata is written after this: read the model settings from cfg
    model = {"kind": "llava_hf", "path": str(folder / LLAVA_DIR), "guide_arch": f"local-dir:{folder / GUIDE_DIR}",
             "guide_path": None}
    raw = merge(cfg.to_dict(), {"model": model, "name": "coin-synth-base-zeroshot"})
    raw["method"] = {"name": "zeroshot"}
    run_cfg = config_from_dict(raw)
    log("zero-shot evaluation of the new base (the pipeline's zeroshot method)")
    results = PipelineRun(run_cfg, folder.parent / f".zeroshot-{folder.name}").run()
    shutil.rmtree(folder.parent / f".zeroshot-{folder.name}", ignore_errors=True)
    return {"scores": {t: round(float(v), 2) for t, v in zip(results["tasks"], results["matrix"][-1])},
            "last": round(float(results["metrics"]["last"]), 2)}


def _versions() -> dict[str, str]:
    import torch
    import transformers

    return {"python": sys.version.split()[0], "torch": torch.__version__, "transformers": transformers.__version__}
