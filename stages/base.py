"""base: the base models. The embedded default pre-trains its tiny base once on the CoIN-synth
corpus (cached by config hash); real models record the configured weights (local or s3://)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Iterator

import ray

from pipeline.config import ExperimentConfig
from pipeline.data import storage
from pipeline.data.coin import decode_image, parse_records
from stages.artifacts import BASE_FILE
from stages.common import BaseModels, JsonlTail, synth_root


def run(ctx, stage, stage_dir: Path, run_id: str) -> dict[str, Any]:
    ctx.base, info = run_base_stage(ctx.cfg, stage_dir, ctx.log)
    ctx.tracker.log_metrics(run_id, info)
    return info


def done(ctx, stage, marker: dict[str, Any], skipped: bool) -> None:
    """A base stage finished by an earlier invocation: where its models are."""
    if ctx.base is None:
        info = json.loads((ctx.rundir.stage_dir(stage.id) / BASE_FILE).read_text())
        ctx.base = BaseModels(lmm_dir=info["lmm_dir"], guide_file=info["guide_file"])


def pretrain_rows(root: str, image_size: int) -> Iterator[dict[str, Any]]:
    """The CoIN-synth pre-training corpus as schema rows with decoded images."""
    path = Path(root) / "pretrain" / "train.json"
    res = parse_records(json.loads(path.read_text()), "pretrain", "train", str(path))
    if res.bad:
        raise RuntimeError(f"pre-training corpus: {res.bad[0].message()}")
    fs, img_root = storage.resolve(str(Path(root) / "images"))
    for row in res.rows:
        yield {**row, "image": decode_image(fs, storage.join(img_root, row["image_path"]), image_size)}


def _pretrain_task(cfg_dict: dict[str, Any], threads: int, progress_file: str | None = None) -> dict[str, Any]:
    """Ray task body: pre-train (or reuse) the tiny base models of the embedded default."""
    import torch

    from pipeline.config import config_from_dict
    from pipeline.data.synth import benchmark_texts
    from pipeline.models.pretrain import ensure_base

    cfg = config_from_dict(cfg_dict)
    if threads:
        torch.set_num_threads(threads)
    root = synth_root(cfg)

    def progress(row: dict[str, Any]) -> None:
        print(pretrain_line(row), flush=True)
        if progress_file:
            with open(progress_file, "a") as fh:
                fh.write(json.dumps(row) + "\n")

    art = ensure_base(
        cfg.model,
        corpus_rows=lambda: pretrain_rows(root, cfg.model.image_size),
        texts=lambda: benchmark_texts(Path(root)),
        cache_dir=Path(cfg.resolve_path(cfg.cache_dir)) / "base",
        data_seed=Path(root).name,  # identifies the generated corpus (seed and sizes)
        log=progress,
    )
    return {"lmm_dir": str(art.lmm_dir), "guide_file": str(art.guide_file), "info": art.info}


def pretrain_line(row: dict[str, Any]) -> str:
    return "[pretrain] " + " ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in row.items())


def run_base_stage(cfg: ExperimentConfig, stage_dir: Path, log=None) -> tuple[BaseModels, dict[str, Any]]:
    """Tiny default: pre-train on the CoIN-synth corpus in a Ray task (cached by config hash).
    Real models: record the configured weights (local or s3://; workers fetch them)."""
    if cfg.model.kind == "tiny":
        if cfg.data.source != "synth":
            raise RuntimeError("model.kind 'tiny' is pre-trained on CoIN-synth: set data.source: synth "
                               "or give real model weights (model.kind: llava_hf)")
        import time


        cpus = max(1.0, float(ray.available_resources().get("CPU", 1.0)))
        progress_file = stage_dir / "pretrain_progress.jsonl"
        last = [0.0]

        def show(rows: list[dict[str, Any]]) -> None:  # the terminal: a line every 20 s at most
            if log is not None and rows and time.time() - last[0] >= 20.0:
                last[0] = time.time()
                log("  " + pretrain_line(rows[-1]))

        tail = JsonlTail(progress_file, show)
        try:
            out = ray.get(
                # DEFAULT strategy: not captured by an enclosing placement group (e.g. a Tune trial's)
                ray.remote(num_cpus=cpus, scheduling_strategy="DEFAULT")(_pretrain_task).remote(
                    cfg.to_dict(), cfg.train.torch_threads or int(cpus), str(progress_file))
            )
        finally:
            tail.close()
        base = BaseModels(lmm_dir=out["lmm_dir"], guide_file=out["guide_file"])
        info = out["info"]
    else:
        base = BaseModels(lmm_dir=cfg.model.path, guide_file=cfg.model.guide_path)
        info = {"source": "configured weights"}
    (stage_dir / BASE_FILE).write_text(json.dumps({**base.to_dict(), "info": info}, indent=2, sort_keys=True))
    flat = {k: v for k, v in info.items() if isinstance(v, (int, float))}
    return base, flat
