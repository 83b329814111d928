"""The first two stages: data (generate CoIN-synth or validate the CoIN files) and base (the
pre-trained base models: trained once for the embedded default, given paths for real models)."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any, Callable, Iterator

import ray

from pipeline.config import ExperimentConfig
from pipeline.data import storage
from pipeline.data.coin import BadRecordsError, decode_image, list_images, parse_records, scan_split
from stages.common import BaseModels, data_source, synth_root


def run_data_stage(cfg: ExperimentConfig, stage_dir: Path, log: Callable[[str], None]) -> dict[str, Any]:
    """Generate CoIN-synth if configured, then validate every (task, split) of the experiment.

    Writes ``data_report.json`` (counts and every bad record). Test splits must be clean; train
    splits follow ``data.on_bad``: "error" fails the stage, "skip" records what is skipped.
    """
    summary: dict[str, Any] = {}
    if cfg.data.source == "synth":
        from pipeline.data.synth import SynthSpec, generate_benchmark

        # data.synth's fields are SynthSpec's (less image_size, which the model config decides)
        spec = SynthSpec(image_size=cfg.model.image_size, **dataclasses.asdict(cfg.data.synth))
        gen = generate_benchmark(Path(synth_root(cfg)), spec)
        how = "reused" if gen["reused"] else f"generated in {gen['seconds']}s"
        log(f"  CoIN-synth at {gen['root']} ({how})")
        summary["synth"] = {k: gen[k] for k in ("root", "seconds", "reused", "chance", "answer_vocab")}
    source = data_source(cfg)
    images = list_images(source)
    counts, bad_all, problems = {}, [], []
    for task in cfg.tasks:
        counts[task] = {}
        for split in ("train", "test"):
            res = scan_split(source, task, split, image_files=images)
            counts[task][split] = {"records": res.total, "valid": len(res.rows), "bad": len(res.bad)}
            bad_all += [b.to_dict() for b in res.bad]
            if res.bad and (split == "test" or cfg.data.on_bad == "error"):
                problems.append(res.bad[0])
    report = {"source": {"instructions_root": source.instructions_root, "image_root": source.image_root},
              "counts": counts, "bad": bad_all, "images_found": len(images), **summary}
    (stage_dir / "data_report.json").write_text(json.dumps(report, indent=2, sort_keys=True))
    if problems:
        hint = f" (no image file at all under {source.image_root}: is data.image_root right?)" if not images else ""
        raise BadRecordsError(problems[0], len(bad_all), str(stage_dir / "data_report.json"), hint)
    return {"bad_records": len(bad_all), "train_records": sum(c["train"]["valid"] for c in counts.values()),
            "test_records": sum(c["test"]["valid"] for c in counts.values())}


def pretrain_rows(root: str, image_size: int) -> Iterator[dict[str, Any]]:
    """The CoIN-synth pre-training corpus as schema rows with decoded images."""
    path = Path(root) / "pretrain" / "train.json"
    res = parse_records(json.loads(path.read_text()), "pretrain", "train", str(path))
    if res.bad:
        raise RuntimeError(f"pre-training corpus: {res.bad[0].message()}")
    fs, img_root = storage.resolve(str(Path(root) / "images"))
    for row in res.rows:
        yield {**row, "image": decode_image(fs, storage.join(img_root, row["image_path"]), image_size)}


def _pretrain_task(cfg_dict: dict[str, Any], threads: int) -> dict[str, Any]:
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
        print("[pretrain] " + " ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}"
                                       for k, v in row.items()), flush=True)

    art = ensure_base(
        cfg.model,
        corpus_rows=lambda: pretrain_rows(root, cfg.model.image_size),
        texts=lambda: benchmark_texts(Path(root)),
        cache_dir=Path(cfg.resolve_path(cfg.cache_dir)) / "base",
        data_seed=Path(root).name,  # identifies the generated corpus (seed and sizes)
        log=progress,
    )
    return {"lmm_dir": str(art.lmm_dir), "guide_file": str(art.guide_file), "info": art.info}


def run_base_stage(cfg: ExperimentConfig, stage_dir: Path) -> tuple[BaseModels, dict[str, Any]]:
    """Tiny default: pre-train on the CoIN-synth corpus in a Ray task (cached by config hash).
    Real models: record the configured weights (local or s3://; workers fetch them)."""
    if cfg.model.kind == "tiny":
        if cfg.data.source != "synth":
            raise RuntimeError("model.kind 'tiny' is pre-trained on CoIN-synth: set data.source: synth "
                               "or give real model weights (model.kind: llava_hf)")
        cpus = max(1.0, float(ray.available_resources().get("CPU", 1.0)))
        out = ray.get(
            # DEFAULT strategy: not captured by an enclosing placement group (e.g. a Tune trial's)
            ray.remote(num_cpus=cpus, scheduling_strategy="DEFAULT")(_pretrain_task).remote(cfg.to_dict(), cfg.train.torch_threads or int(cpus))
        )
        base = BaseModels(lmm_dir=out["lmm_dir"], guide_file=out["guide_file"])
        info = out["info"]
    else:
        base = BaseModels(lmm_dir=cfg.model.path, guide_file=cfg.model.guide_path)
        info = {"source": "configured weights"}
    (stage_dir / "base.json").write_text(json.dumps({**base.to_dict(), "info": info}, indent=2, sort_keys=True))
    flat = {k: v for k, v in info.items() if isinstance(v, (int, float))}
    return base, flat
