"""A run's results: the accuracy matrix as evaluations complete (with the metrics so far logged
to MLflow at each step), then results.json, the matrix as JSON/CSV/figure, and the summary the
terminal shows."""

from __future__ import annotations

import json
import time
from typing import Any

from pipeline.failpoints import failpoint
from pipeline.figures import heatmap
from pipeline.methods.protocol import SEQUENTIAL
from pipeline.scoring.metrics import all_metrics
from stages.artifacts import MATRIX_CSV, MATRIX_JSON, MATRIX_PNG, RESULTS_FILE
from stages.rundir import write_json_atomic


class RunResults:
    def __init__(self, ctx) -> None:
        self.ctx = ctx
        self.matrix: dict[int, list[float]] = {}
        self.diagnostics: dict[str, Any] | None = None

    def evaluated(self, stage, result: dict[str, Any], skipped: bool) -> None:
        """An evaluate stage is complete: its row of the matrix, the metrics so far (MLflow, at
        step = tasks learned), and the run's ``on_evaluated`` callback (a sweep's report)."""
        ctx = self.ctx
        scores = result["scores"]
        t = ctx.schedule.row(stage, len(ctx.cfg.tasks))
        self.matrix[t] = [scores[task] for task in stage.tasks]
        self.diagnostics = result.get("diagnostics")
        step = t + 1
        metrics = {f"acc/{task}": s for task, s in scores.items()}
        rows = self.rows()
        if rows:
            metrics |= {k: v for k, v in all_metrics(rows).items() if isinstance(v, (int, float)) and k != "T"}
        # a stage finished by an earlier invocation has had its metrics logged by it (unless that
        # driver died between the stage's marker and this call): log them once only
        if not (skipped and ctx.tracker.has_metric_at(ctx.tracker.parent_id, next(iter(metrics)), step)):
            ctx.tracker.log_metrics(ctx.tracker.parent_id, metrics, step=step)
        if ctx.on_evaluated is not None:
            ctx.on_evaluated(step, metrics)

    def rows(self) -> list[list[float]]:
        """The rows of a continual run's matrix so far (row t: after learning task t)."""
        if not self.ctx.schedule.is_continual():
            return []
        out = []
        for t in range(len(self.ctx.cfg.tasks)):
            if t not in self.matrix:
                break
            out.append(self.matrix[t])
        return out

    def finish(self, markers: dict[str, dict[str, Any]], t_start: float,
               isolation: list[float] | None = None) -> dict[str, Any]:
        """``isolation``: each task's score when trained alone from the base (A0), for FWT."""
        ctx, cfg = self.ctx, self.ctx.cfg
        root, tracker, parent = ctx.rundir.root, ctx.tracker, ctx.tracker.parent_id
        earlier = ctx.rundir.invocations()  # this one is recorded when the run returns
        this_wall = time.time() - t_start
        wall = sum(inv["wall_s"] for inv in earlier) + this_wall
        tasks = list(cfg.tasks)
        if ctx.schedule.is_continual():
            matrix = self.rows()
            metrics = all_metrics(matrix, isolation)
        else:  # a single evaluation after joint training / of the base model
            final = self.matrix[len(tasks) - 1]
            matrix = [final]
            metrics = {"last": sum(final) / len(final), "acc": sum(final) / len(final), "last_per_task": final}
        overhead = {}
        for sid, m in markers.items():
            loop = m["result"].get("train_loop_s") or m["result"].get("infer_loop_s")
            if loop is not None:
                overhead[sid] = round(m["wall_s"] - loop, 2)
        diag = self.diagnostics or {}
        summary = diag.get("summary", {})
        results = {
            "method": cfg.method.name, "method_options": cfg.method.options, "schedule": ctx.schedule.name,
            "tasks": tasks, "matrix": matrix, "metrics": metrics,
            **({"isolation": isolation} if isolation is not None else {}),
            "mlflow": {"tracking_uri": tracker.uri, "experiment": tracker.experiment, "run_id": parent},
            "stage_wall_s": {sid: round(m["wall_s"], 2) for sid, m in markers.items()},
            "stage_overhead_s": overhead, "run_wall_s": round(wall, 2),
            "invocation_wall_s": round(this_wall, 2), "invocations": len(earlier) + 1, "run_dir": str(root),
            # the method's own summary of the last evaluation (``diagnostics``), e.g. ModalPrompt's
            # top-1 own-task selection rate
            "diagnostics": summary, "diagnostics_lines": diag.get("lines", []),
        }
        write_json_atomic(root / RESULTS_FILE, results)
        failpoint("results-written")
        (root / MATRIX_JSON).write_text(json.dumps({"tasks": tasks, "matrix": matrix,
                                                    **({"isolation": isolation} if isolation else {})}, indent=2))
        if "fwt" in metrics:
            tracker.log_metrics(parent, {"fwt": metrics["fwt"], **{f"isolation/{t}": v for t, v in zip(tasks, isolation)}})
        labels = tasks[: len(matrix)] if ctx.schedule.is_continual() else [ctx.schedule.name]
        csv_rows = ["after," + ",".join(tasks)] + [
            f"{label}," + ",".join(f"{v:.2f}" for v in row) for label, row in zip(labels, matrix)]
        (root / MATRIX_CSV).write_text("\n".join(csv_rows) + "\n")
        heatmap(matrix, rows=labels, cols=tasks, title=f"Accuracy matrix ({cfg.method.name})",
                path=root / MATRIX_PNG, xlabel="evaluated task", ylabel="after training")
        for name in (RESULTS_FILE, MATRIX_JSON, MATRIX_CSV, MATRIX_PNG):
            tracker.log_artifact(parent, root / name)
        last_eval = [s for s in ctx.stages if s.kind == "evaluate"][-1]
        for name in diag.get("files", []):
            tracker.log_artifact(parent, ctx.rundir.stage_dir(last_eval.id) / name, "figures")
        tracker.log_metrics(parent, {"run_wall_s": wall}, step=len(earlier) + 1)  # one per command
        return results


def format_results(results: dict[str, Any]) -> str:
    """Human-readable summary: accuracy matrix, metrics, where the MLflow run is."""
    tasks = results["tasks"]
    width = max(len(t) for t in tasks) + 2
    lines = [f"Accuracy matrix ({results['method']}, percent; row = after training task, col = evaluated task)"]
    lines.append(" " * width + "".join(f"{t[:9]:>10}" for t in tasks))
    labels = tasks if results["schedule"] == SEQUENTIAL else [results["schedule"]]
    for label, row in zip(labels, results["matrix"]):
        lines.append(f"{label:<{width}}" + "".join(f"{v:>10.2f}" for v in row))
    m = results["metrics"]
    keys = [k for k in ("last", "avg", "B", "M", "acc", "maa", "bwt", "la", "fwt") if k in m]
    if results.get("isolation"):
        lines.append(f"{'alone':<{width}}" + "".join(f"{v:>10.2f}" for v in results["isolation"])
                     + "   (each task trained alone from the base: the isolation row behind FWT)")
    lines.append("Metrics: " + ", ".join(f"{k}={m[k]:.2f}" for k in keys))
    lines += results.get("diagnostics_lines") or []
    ml = results["mlflow"]
    lines.append(f"MLflow run {ml['run_id']} in {ml['tracking_uri']}")
    if ml["tracking_uri"].startswith("sqlite:///"):
        lines.append(f"  view it: mlflow ui --backend-store-uri {ml['tracking_uri']}")
    lines.append(f"results: {results['run_dir']}/{RESULTS_FILE}")
    return "\n".join(lines)
