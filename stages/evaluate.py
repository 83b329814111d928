"""evaluate(t): Ray Data batch inference over the test sets of tasks 1..t, answer files in the
LLaVA format, scores into row t of the accuracy matrix.

One ``map_batches`` over the union of the test sets with a model-holding callable class
(``Predictor``; batch size, actor count and resources from the config). The number of
predictions must equal the number of test records per task, or the stage fails.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import numpy as np
import ray

from pipeline.config import config_from_dict
from pipeline.failpoints import failpoint
from pipeline.scoring.scorers import score_task
from stages.artifacts import PREDICTIONS_DIR, SCORES_FILE
from stages.common import BaseModels, build_method_for, load_models, load_state
from stages.datasets import read_dataset


class Predictor:
    """Ray Data callable class: holds the frozen LMM, guide and method state on one actor."""

    def __init__(self, cfg: dict[str, Any], base: dict[str, Any], state: str | None, threads: int = 0):
        import torch

        self.cfg = config_from_dict(cfg)
        if threads:
            torch.set_num_threads(threads)
        self.device = "cuda" if torch.cuda.is_available() and self.cfg.eval.gpus_per_actor > 0 else "cpu"
        self.lmm, guide = load_models(self.cfg, BaseModels(**base), device=self.device)
        self.method = build_method_for(self.cfg, self.lmm, guide)
        if state:
            self.method.load_state_tensors(load_state(state))
        self.method.eval()
        self.max_new = self.cfg.eval.max_new_tokens or self.cfg.model.max_new_tokens

    def __call__(self, rows: dict[str, np.ndarray]) -> dict[str, Any]:
        import torch

        t0 = time.time()
        batch = self.lmm.collate(rows, train=False)
        if not getattr(self.method, "task_id_at_test", False):  # only oracle variants see it
            batch.pop("tasks", None)  # no task identity at test time
        batch = {k: (v.to(self.device) if torch.is_tensor(v) else v) for k, v in batch.items()}
        with torch.no_grad():
            gen = self.method.generate(batch, self.max_new)
        n = len(gen.texts)
        per_row_s = (time.time() - t0) / max(1, n)
        selected = gen.selected if gen.selected is not None else [[] for _ in range(n)]
        scores = gen.scores.detach().cpu().float().numpy() if gen.scores is not None else None
        return {
            "task": np.asarray(rows["task"]),
            "id": np.asarray(rows["id"]),
            "prediction": np.asarray(gen.texts, dtype=object),
            "selected": np.asarray([json.dumps([int(s) for s in sel]) for sel in selected], dtype=object),
            "scores": np.asarray([json.dumps([round(float(x), 6) for x in r]) for r in scores], dtype=object)
            if scores is not None
            else np.asarray(["[]"] * n, dtype=object),
            "infer_s": np.full(n, per_row_s, dtype=np.float64),
        }


def run_evaluate_stage(
    cfg,
    *,
    stage_dir: Path,
    tasks: list[str],
    datasets: dict[str, "ray.data.Dataset"],
    test_rows: dict[str, list[dict[str, Any]]],
    base: BaseModels,
    state: Path | None,
) -> dict[str, Any]:
    """Predict and score every task in ``tasks``; write ``predictions/<task>.jsonl`` and
    ``scores.json`` into ``stage_dir``; return {"scores": {task: percent}, ...}."""
    union = datasets[tasks[0]]
    if len(tasks) > 1:
        union = union.union(*[datasets[t] for t in tasks[1:]])
    resources: dict[str, Any] = {"num_cpus": cfg.eval.cpus_per_actor}
    if cfg.eval.gpus_per_actor:
        resources["num_gpus"] = cfg.eval.gpus_per_actor
    t0 = time.time()
    predicted = union.map_batches(
        Predictor,
        fn_constructor_kwargs={
            "cfg": cfg.to_dict(), "base": base.to_dict(), "state": str(state) if state else None,
            # as many torch threads as reserved CPUs: the actor may run beside a Train worker
            "threads": max(1, int(cfg.eval.cpus_per_actor)),
        },
        batch_size=cfg.eval.batch_size,
        compute=ray.data.ActorPoolStrategy(size=cfg.eval.concurrency),  # `concurrency=` is deprecated
        **resources,
    )
    rows = predicted.take_all()
    infer_s = time.time() - t0

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
                fh.write(json.dumps({
                    "question_id": r["id"], "text": r["prediction"],
                    "selected": json.loads(r["selected"]), "scores": json.loads(r["scores"]),
                }) + "\n")
        failpoint("eval-predictions")
        result = score_task(task, test_rows[task], {str(r["id"]): r["prediction"] for r in got},
                            scorer=cfg.scorer_of(task))
        scores[task] = result.score
        details[task] = {"score": result.score, "count": result.count, "unparseable": result.unparseable}
    out = {"scores": scores, "details": details, "inference_s": infer_s, "predictions": len(rows),
           "infer_loop_s": float(sum(r["infer_s"] for r in rows))}
    (stage_dir / SCORES_FILE).write_text(json.dumps(out, indent=2, sort_keys=True))
    return out


def test_data(ctx, task: str):
    """One task's test split as a Ray Dataset (its rows kept in ``ctx.test_rows`` for scoring)."""
    cfg = ctx.cfg
    ds, res = read_dataset(ctx.source, task, "test", image_size=cfg.model.image_size,
                           decode_num_cpus=cfg.resources.decode_cpus, pad_color=ctx.pad_color())
    rows = res.rows
    if cfg.data.max_test_per_task:
        ds, rows = ds.limit(cfg.data.max_test_per_task), rows[: cfg.data.max_test_per_task]
    ctx.test_rows[task] = rows
    return ds


def run(ctx, stage, stage_dir: Path, run_id: str) -> dict[str, Any]:
    from pipeline.methods.registry import method_class

    datasets = {task: test_data(ctx, task) for task in stage.tasks}
    state = ctx.state_of(ctx.schedule.eval_state(stage, ctx.stages))
    out = run_evaluate_stage(ctx.cfg, stage_dir=stage_dir, tasks=stage.tasks, datasets=datasets,
                             test_rows=ctx.test_rows, base=ctx.base, state=state)
    ctx.tracker.log_artifact(run_id, stage_dir / PREDICTIONS_DIR, "predictions")
    ctx.tracker.log_artifact(run_id, stage_dir / SCORES_FILE)
    ctx.tracker.log_metrics(run_id, {f"acc/{t}": s for t, s in out["scores"].items()})
    result = {"scores": out["scores"], "inference_s": out["inference_s"], "predictions": out["predictions"],
              "infer_loop_s": out.get("infer_loop_s")}
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
    return result


def done(ctx, stage, marker: dict[str, Any], skipped: bool) -> None:
    ctx.results.evaluated(stage, marker["result"], skipped)
