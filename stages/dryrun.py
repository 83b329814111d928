"""``--dry-run``: print the stage DAG and the parameter counts of every method on the configured
architecture, built on the meta device (no weights are read, nothing is downloaded)."""

from __future__ import annotations

from typing import Any

from pipeline.config import ExperimentConfig
from stages.dag import describe_dag
from stages.schedules import schedule_for


def count_method(cfg: ExperimentConfig, name: str, options: dict[str, Any]) -> dict[str, Any]:
    """Totals for one method after ``begin_task(0)`` (one task's parameters, as the papers count)."""
    from pipeline.methods.registry import build_method
    from pipeline.models import build_guide, build_lmm, count_parameters

    lmm = build_lmm(cfg.model, meta=True)
    guide = build_guide(cfg.model, meta=True)
    method = build_method(name, dict(options), lmm, guide)
    if schedule_for(method.schedule).trains:
        method.begin_task(0, cfg.tasks[0])
    # counted after the method attached itself: LoRA blocks live inside the LMM's modules
    c = count_parameters(lmm, guide, method.trainable_parameters())
    return {
        "method": name, "guide_params": c.guide, "total_params": c.total, "trainable_params": c.trainable,
        "trainable_share_pct": 100.0 * c.trainable_share,
        "trainable_share_with_guide_pct": 100.0 * c.trainable / max(1, c.total + c.guide),
    }


def train_settings_lines(cfg: ExperimentConfig, schedule: str) -> list[str]:
    """The training settings of every train stage (per task for a sequential run)."""
    world = cfg.train.num_workers
    if not schedule_for(schedule).trains:
        return ["Training: none (this method trains nothing)"]
    if not schedule_for(schedule).is_continual():
        return [f"Training ({schedule}, one stage over all tasks): {cfg.stage_train(None).describe(world)}"]
    width = max(len(t) for t in cfg.tasks)
    return ["Training per task:"] + [f"  {t:<{width}}  {cfg.stage_train(t).describe(world)}" for t in cfg.tasks]


def input_line(cfg: ExperimentConfig) -> str:
    """How images and guide features are prepared (the preprocessing a checkpoint expects)."""
    from pipeline.models.build import image_pad_color

    m = cfg.model
    color = image_pad_color(m)
    images = f"padded to a square of RGB {color}" if color else "stretched to a square"
    return (f"Inputs: images {images}, then resized to {m.image_size}; guide {m.guide_arch} "
            f"(QuickGELU {'on' if m.quick_gelu else 'off'}), text feature {m.guide_text_feature}")


def dry_run_report(cfg: ExperimentConfig, run) -> str:
    from pipeline.methods.registry import registered_methods

    lines = [
        f"experiment {cfg.name!r}: method {cfg.method.name} (schedule: {run.schedule}), "
        f"{len(cfg.tasks)} tasks, model kind {cfg.model.kind}",
        f"run directory: {run.output}",
        "",
        "Stage DAG (execution order; '<-' lists dependencies):",
        describe_dag(run.stages),
        "",
        *train_settings_lines(cfg, run.schedule),
        input_line(cfg),
        "",
        "Parameters per method (one task's parameters, built on the meta device, no weights read):",
    ]
    names = registered_methods()
    w = max([14] + [len(n) + 2 for n in names])
    lines.append(f"{'method':<{w}}{'total':>16}{'trainable':>16}{'share %':>10}{'share % (+guide)':>18}")
    for name in names:
        opts = cfg.method.options if name == cfg.method.name else {}
        try:
            c = count_method(cfg, name, opts)
        except Exception as exc:  # report per method; one broken method must not hide the others
            lines.append(f"{name:<{w}} could not be built: {type(exc).__name__}: {exc}")
            continue
        mark = " *" if name == cfg.method.name else ""
        lines.append(
            f"{name:<{w}}{c['total_params']:>16,}{c['trainable_params']:>16,}"
            f"{c['trainable_share_pct']:>10.3f}{c['trainable_share_with_guide_pct']:>18.3f}{mark}"
        )
    lines.append("(* = the configured method with its configured options; others use their defaults)")
    return "\n".join(lines)
