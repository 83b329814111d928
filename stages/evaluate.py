"""evaluate(t): batch inference over the test sets of tasks 1..t, answer files in the LLaVA
format, scores into row t of the accuracy matrix.

The union of the test sets streams through Ray Data into the run's inference actors
(``stages.inference``: base models loaded once per run where they fit, the method state loaded
per stage, the frozen encoders' outputs cached per sample). The number of predictions must equal
the number of test records per task, or the stage fails.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import ray

from pipeline.failpoints import failpoint
from pipeline.scoring.scorers import score_task
from stages.artifacts import PREDICTIONS_DIR, SCORES_FILE
from stages.common import BaseModels
from stages.datasets import read_dataset
from stages.inference import InferencePool, as_prediction_record


def run_evaluate_stage(
    cfg,
    *,
    stage_dir: Path,
    tasks: list[str],
    datasets: dict[str, "ray.data.Dataset"],
    test_rows: dict[str, list[dict[str, Any]]],
    base: BaseModels,
    state: Path | None,
    pool: InferencePool | None = None,
) -> dict[str, Any]:
    """Predict and score every task in ``tasks``; write ``predictions/<task>.jsonl`` and
    ``scores.json`` into ``stage_dir``; return {"scores": {task: percent}, ...}. ``pool``: the
    run's inference actors (None: a pool for this stage only, closed at its end)."""
    union = datasets[tasks[0]]
    if len(tasks) > 1:
        union = union.union(*[datasets[t] for t in tasks[1:]])
    own = pool is None
    if own:
        pool = InferencePool(cfg, base, resident=False)
    t0 = time.time()
    try:
        out = pool.predict(union, str(state) if state else None)
    finally:
        if own:
            pool.close()
    rows, timing = out["rows"], out["timing"]
    infer_s = time.time() - t0
    t_score = time.time()

    by_task: dict[str, list[dict[str, Any]]] = {t: [] for t in tasks}
    for r in rows:
        by_task[r["task"]].append(r)
    pred_dir = stage_dir / PREDICTIONS_DIR
    pred_dir.mkdir(parents=True, exist_ok=True)
    scores, details = {}, {}
    for task in tasks:
        expected = len(test_rows[task])
        got = by_task[task]
        if len(got) != expected:
            raise RuntimeError(
                f"evaluate: task {task}: {len(got)} predictions for {expected} test records "
                "(evaluation never drops records)"
            )
        got.sort(key=lambda r: str(r["id"]))
        with open(pred_dir / f"{task}.jsonl", "w") as fh:
            for r in got:
                fh.write(as_prediction_record(r) + "\n")
        failpoint("eval-predictions")
        result = score_task(task, test_rows[task], {str(r["id"]): r["prediction"] for r in got},
                            scorer=cfg.scorer_of(task))
        scores[task] = result.score
        details[task] = {"score": result.score, "count": result.count, "unparseable": result.unparseable}
    actors = timing["actors"]
    out = {"scores": scores, "details": details, "inference_s": infer_s, "predictions": len(rows),
           "infer_loop_s": float(sum(r["infer_s"] for r in rows)),
           "actor_start_s": timing["actor_start_s"],
           "state_load_s": max(a["state_load_s"] for a in actors),
           "features": _features(actors),
           # the actors' time waiting for rows (the Ray Data stream) rather than predicting
           "actor_wait_s": max(a["wall_s"] - a["infer_s"] - a["state_load_s"] for a in actors),
           "scoring_s": time.time() - t_score,
           "peak_mem_gb": max(a["peak_mem_gb"] for a in actors)}
    (stage_dir / SCORES_FILE).write_text(json.dumps(out, indent=2, sort_keys=True))
    return out


def _features(actors: list[dict[str, Any]]) -> dict[str, int] | None:
    """The frozen-feature cache's counts over the stage's actors (None: no cache)."""
    seen = [a["features"] for a in actors if "features" in a]
    if not seen:
        return None
    return {k: sum(f[k] for f in seen) for k in seen[0]}


def test_data(ctx, task: str):
    """One task's test split as a Ray Dataset (its rows kept in ``ctx.test_rows`` for scoring),
    read once per run; decoded once too where it fits ``resources.materialize_mb``."""
    if task in ctx.test_sets:
        return ctx.test_sets[task]
    cfg = ctx.cfg
    ds, res = read_dataset(ctx.source, task, "test", image_size=cfg.model.image_size,
                           decode_num_cpus=cfg.resources.decode_cpus, pad_color=ctx.pad_color())
    rows = res.rows
    if cfg.data.max_test_per_task:
        ds, rows = ds.limit(cfg.data.max_test_per_task), rows[: cfg.data.max_test_per_task]
    ctx.test_rows[task] = rows
    ctx.test_sets[task] = ctx.keep_decoded(ds, len(rows))
    return ctx.test_sets[task]


def run(ctx, stage, stage_dir: Path, run_id: str) -> dict[str, Any]:
    from pipeline.methods.registry import method_class

    t0 = time.time()
    datasets = {task: test_data(ctx, task) for task in stage.tasks}
    state = ctx.state_of(ctx.schedule.eval_state(stage, ctx.stages))
    t_read = time.time()
    out = run_evaluate_stage(ctx.cfg, stage_dir=stage_dir, tasks=stage.tasks, datasets=datasets,
                             test_rows=ctx.test_rows, base=ctx.base, state=state, pool=ctx.inference_pool())
    ctx.tracker.log_artifact(run_id, stage_dir / PREDICTIONS_DIR, "predictions")
    ctx.tracker.log_artifact(run_id, stage_dir / SCORES_FILE)
    ctx.tracker.log_metrics(run_id, {f"acc/{t}": s for t, s in out["scores"].items()})
    t_predict = time.time()
    result = {k: out[k] for k in ("scores", "inference_s", "predictions", "infer_loop_s", "actor_start_s",
                                  "state_load_s", "features", "actor_wait_s", "scoring_s", "peak_mem_gb")}
    if out["features"]:
        ctx.log_numbers(run_id, {f"features/{k}": v for k, v in out["features"].items()})
    # the method's own view of this evaluation (ModalPrompt: which prompt sets were selected)
    records = {t: [json.loads(x) for x in (stage_dir / PREDICTIONS_DIR / f"{t}.jsonl").read_text().splitlines()]
               for t in stage.tasks}
    learned = list(ctx.cfg.tasks[: stage.task_index + 1]) if ctx.schedule.is_continual() else list(ctx.cfg.tasks)
    diag = method_class(ctx.cfg.method.name).diagnostics(records, learned, stage_dir)
    if diag is not None:
        for f in diag.files:
            ctx.tracker.log_artifact(run_id, f, "figures")
        ctx.log_numbers(run_id, diag.summary)
        result["diagnostics"] = {"summary": diag.summary, "files": [str(Path(f).name) for f in diag.files],
                                 "lines": diag.lines}
    # where the stage's time went besides the inference loop (docs/performance.md)
    result["read_s"], result["tracking_s"] = t_read - t0, time.time() - t_predict
    return result


def done(ctx, stage, marker: dict[str, Any], skipped: bool) -> None:
    ctx.results.evaluated(stage, marker["result"], skipped)
