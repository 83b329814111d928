"""data: generate CoIN-synth if configured, then validate every (task, split) of the experiment."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any, Callable

from pipeline.config import ExperimentConfig
from pipeline.data.coin import BadRecordsError, list_images, scan_split
from pipeline.failpoints import failpoint
from stages.artifacts import DATA_REPORT
from stages.common import data_source, synth_root


def run(ctx, stage, stage_dir: Path, run_id: str) -> dict[str, Any]:
    result = run_data_stage(ctx.cfg, stage_dir, ctx.log)
    ctx.tracker.log_artifact(run_id, stage_dir / DATA_REPORT)
    return result


def generate_synth(cfg: ExperimentConfig) -> dict[str, Any]:
    """Generate the configured CoIN-synth (reused where it exists); ``generate_benchmark``'s summary."""
    from pipeline.data.synth import SynthSpec, generate_benchmark

    # data.synth's fields are SynthSpec's (less image_size, which the model config decides)
    spec = SynthSpec(image_size=cfg.model.image_size, **dataclasses.asdict(cfg.data.synth))
    return generate_benchmark(Path(synth_root(cfg)), spec)


def run_data_stage(cfg: ExperimentConfig, stage_dir: Path, log: Callable[[str], None]) -> dict[str, Any]:
    """Generate CoIN-synth if configured, then validate every (task, split) of the experiment.

    Writes ``data_report.json`` (counts, every bad record and every warning). Test splits must
    be clean; train splits follow ``data.on_bad``: "error" fails the stage, "skip" records what
    is skipped. Warnings (records kept with a doubtful answer) are listed and logged.
    """
    summary: dict[str, Any] = {}
    if cfg.data.source == "synth":
        gen = generate_synth(cfg)
        how = "reused" if gen["reused"] else f"generated in {gen['seconds']}s"
        log(f"  CoIN-synth at {gen['root']} ({how})")
        summary["synth"] = {k: gen[k] for k in ("root", "seconds", "reused", "chance", "answer_vocab")}
    source = data_source(cfg)
    images = list_images(source)
    counts, bad_all, warnings, problems = {}, [], [], []
    for task in cfg.tasks:
        counts[task] = {}
        for split in ("train", "test"):
            res = scan_split(source, task, split, image_files=images)
            counts[task][split] = {"records": res.total, "valid": len(res.rows), "bad": len(res.bad)}
            bad_all += [b.to_dict() for b in res.bad]
            warnings += [w.to_dict() for w in res.warnings]
            if res.bad and (split == "test" or cfg.data.on_bad == "error"):
                problems.append(res.bad[0])
        failpoint("data-task")
    report = {"source": {"instructions_root": source.instructions_root, "image_root": source.image_root},
              "counts": counts, "bad": bad_all, "warnings": warnings, "images_found": len(images), **summary}
    (stage_dir / DATA_REPORT).write_text(json.dumps(report, indent=2, sort_keys=True))
    if warnings:
        log(f"  {len(warnings)} record(s) with a doubtful answer kept (warnings listed in {DATA_REPORT})")
    if problems:
        hint = f" (no image file at all under {source.image_root}: is data.image_root right?)" if not images else ""
        raise BadRecordsError(problems[0], len(bad_all), str(stage_dir / DATA_REPORT), hint)
    return {"bad_records": len(bad_all), "data_warnings": len(warnings),
            "train_records": sum(c["train"]["valid"] for c in counts.values()),
            "test_records": sum(c["test"]["valid"] for c in counts.values())}
