"""The results of a sweep: one row per trial, the best trial, the table, the plot, the best config.

MLflow: one sweep run in the experiment; every trial's pipeline run is nested under it
(``mlflow_parent``) in the sweep's store (default ``sqlite:///DIR/mlflow.db``). The sweep run
gets ``results.csv``/``results.json`` (trial, parameters, status, objective, metrics),
``objective_vs_params.png``, ``sweep.json`` and ``best_config.yaml``, a ready-to-run experiment
config.
"""

from __future__ import annotations

import csv
import io
import json
from pathlib import Path
from typing import TYPE_CHECKING, Any

import yaml

from pipeline.config import config_from_dict
from stages.tune.objective import OBJECTIVE_KEY, TIME_ATTR, Objective
from stages.tune.space import is_number
from stages.tune.trial import trial_dir

if TYPE_CHECKING:
    from stages.tune.sweep import Sweep

METRIC_COLUMNS = ("last", "avg", "B", "M", "acc", "maa", "bwt", "la", "train_loss")


def _trial_status(metrics: dict[str, Any], error: Any, n_tasks: int, run_dir: Path) -> str:
    if error is not None:
        return "error"
    if metrics.get(TIME_ATTR) == n_tasks and (run_dir / "results.json").exists():
        return "completed"
    return "stopped" if metrics else "not started"


def collect_rows(sweep: Sweep, grid: Any) -> list[dict[str, Any]]:
    """One row per trial: id, status, parameter values (by space key), tasks learned, objective,
    the last reported metrics (``metric/<name>``, ``acc/<task>``), MLflow run id, run directory."""
    rows = []
    for result in grid:
        trial_id = Path(result.path).name
        run_dir = trial_dir(sweep.directory, trial_id)
        metrics = dict(result.metrics or {})
        row: dict[str, Any] = {"trial": trial_id,
                               "status": _trial_status(metrics, result.error, sweep.n_tasks, run_dir)}
        row |= {p.key: (result.config or {}).get(p.key) for p in sweep.params}
        row |= {TIME_ATTR: metrics.get(TIME_ATTR), OBJECTIVE_KEY: metrics.get(OBJECTIVE_KEY),
                "objective_defined": metrics.get("objective_defined")}
        row |= {f"metric/{k}": metrics.get(k) for k in METRIC_COLUMNS}  # "metric/M" vs the option "M"
        row |= {k: v for k, v in sorted(metrics.items()) if k.startswith("acc/")}
        state = run_dir / "mlflow.json"
        row["mlflow_run_id"] = json.loads(state.read_text())["parent_run_id"] if state.exists() else None
        row["run_dir"] = str(run_dir)
        row["error"] = f"{type(result.error).__name__}: {result.error}"[:500] if result.error is not None else None
        rows.append(row)
    return sorted(rows, key=lambda r: r["trial"])


def best_row(rows: list[dict[str, Any]], objective: Objective) -> dict[str, Any] | None:
    """The best trial among those that learned the most tasks (a trial stopped early is compared
    at its last report only against trials that got no further)."""
    scored = [r for r in rows if r["status"] != "error" and isinstance(r.get(OBJECTIVE_KEY), (int, float))]
    if not scored:
        return None
    most = max(r[TIME_ATTR] or 0 for r in scored)
    pool = [r for r in scored if (r[TIME_ATTR] or 0) == most]
    sign = -1.0 if objective.mode == "min" else 1.0
    return max(pool, key=lambda r: sign * r[OBJECTIVE_KEY])


def best_config_yaml(sweep: Sweep, row: dict[str, Any]) -> str:
    """A ready-to-run experiment config: the sweep's base config with the best trial's values
    (tracking as in the sweep's own config, not the sweep's store)."""
    tree = sweep.trial_config({p.key: row[p.key] for p in sweep.params})
    tree["tracking"] = sweep.cfg.to_dict()["tracking"]
    config_from_dict(tree)
    values = ", ".join(f"{p.key}={row[p.key]!r}" for p in sweep.params)
    header = (f"# Best configuration of the sweep in {sweep.directory}\n"
              f"# trial {row['trial']}: {values}; {sweep.objective.name} ({sweep.objective.mode}) = {row[OBJECTIVE_KEY]}\n"
              f"# Run it: python pipeline/main.py --config {sweep.directory / 'best_config.yaml'}\n")
    return header + yaml.safe_dump(tree, sort_keys=False)


def write_table(rows: list[dict[str, Any]], csv_path: Path, json_path: Path) -> None:
    columns: list[str] = []
    for r in rows:
        columns += [k for k in r if k not in columns]
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=columns)
    writer.writeheader()
    for r in rows:
        writer.writerow({k: r.get(k) for k in columns})
    csv_path.write_text(buf.getvalue())
    json_path.write_text(json.dumps(rows, indent=2, default=str))


def plot_objective(sweep: Sweep, rows: list[dict[str, Any]], path: Path) -> Path:
    """One panel per parameter: objective of every trial against the parameter's value
    (filled: trial learned every task; hollow: stopped early, at its last report)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    swept = [p for p in sweep.params if p.kind != "value"]
    fig, axes = plt.subplots(1, len(swept), figsize=(3.6 * len(swept), 3.2), squeeze=False)
    for ax, p in zip(axes[0], swept):
        categorical = p.kind in ("choice", "grid") and not all(is_number(v) for v in p.values)
        for status, style in (("completed", {}), ("stopped", {"facecolors": "none"})):
            pts = [(r[p.key], r[OBJECTIVE_KEY]) for r in rows
                   if r["status"] == status and isinstance(r.get(OBJECTIVE_KEY), (int, float))]
            if not pts:
                continue
            xs = [str(x) for x, _ in pts] if categorical else [float(x) for x, _ in pts]
            ax.scatter(xs, [y for _, y in pts], label=status, edgecolors="C0", **style)
        if p.kind == "loguniform":
            ax.set_xscale("log")
        ax.set_xlabel(p.key)
        ax.set_ylabel(f"{sweep.objective.name} ({sweep.objective.mode})")
        ax.grid(alpha=0.3)
    axes[0][0].legend(fontsize=8)
    fig.suptitle(f"Sweep objective vs parameters ({len(rows)} trials)")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def _close_trial_runs(tracker: Any, row: dict[str, Any]) -> None:
    """Tag a trial's MLflow run with its Tune id/status; runs the trial left RUNNING (a stopped
    trial's own run and the stage run it was in; stage runs of an attempt killed before a
    resume) are marked KILLED."""
    run_id = row.get("mlflow_run_id")
    if not run_id:
        return
    client = tracker.client
    client.set_tag(run_id, "tune.trial_id", row["trial"])
    client.set_tag(run_id, "tune.status", row["status"])
    children = client.search_runs([tracker.experiment_id], filter_string=f"tags.mlflow.parentRunId = '{run_id}'")
    for run in [client.get_run(run_id), *children]:
        if run.info.status == "RUNNING":
            client.set_terminated(run.info.run_id, status="KILLED")


def finish_sweep(sweep: Sweep, rows: list[dict[str, Any]], tracker: Any, parent: str, *, wall_s: float,
                 leaks: dict[str, Any] | None = None) -> dict[str, Any] | None:
    """Write and log the results table, the plot, the best config and ``sweep.json`` (counts,
    best trial, leak check); print the table and the best trial."""
    d = sweep.directory
    for row in rows:
        _close_trial_runs(tracker, row)
    write_table(rows, d / "results.csv", d / "results.json")
    files = [d / "results.csv", d / "results.json", d / "sweep.json"]
    if any(isinstance(r.get(OBJECTIVE_KEY), (int, float)) for r in rows):
        files.append(plot_objective(sweep, rows, d / "objective_vs_params.png"))
    best = best_row(rows, sweep.objective)
    counts = {s: sum(r["status"] == s for r in rows) for s in ("completed", "stopped", "error")}
    metrics = {f"trials_{k}": float(v) for k, v in counts.items()} | {"sweep_wall_s": wall_s}
    print(f"\nSweep finished in {wall_s:.0f}s: {len(rows)} trial(s), " + ", ".join(f"{v} {k}" for k, v in counts.items()))
    print(format_table(sweep, rows))
    if best is not None:
        (d / "best_config.yaml").write_text(best_config_yaml(sweep, best))
        files.append(d / "best_config.yaml")
        metrics[f"best_{sweep.objective.metric}"] = float(best[OBJECTIVE_KEY])
        tracker.set_tag(parent, "best_trial", best["trial"])
        tracker.log_params(parent, {f"best.{p.key}": str(best[p.key]) for p in sweep.params})
        values = ", ".join(f"{p.key}={best[p.key]!r}" for p in sweep.params)
        print(f"Best trial {best['trial']}: {values}  {sweep.objective.name}={best[OBJECTIVE_KEY]:.2f} "
              f"(after {best[TIME_ATTR]} task(s))")
        print(f"Best config: {d / 'best_config.yaml'}  (python pipeline/main.py --config {d / 'best_config.yaml'})")
    summary = {"objective": sweep.objective.name, "metric": sweep.objective.metric, "mode": sweep.objective.mode,
               "trials": len(rows), **counts, "wall_s": round(wall_s, 1), "best": best, "leaks": leaks or {},
               "mlflow": {"tracking_uri": tracker.uri, "experiment": tracker.experiment, "run_id": parent}}
    (d / "sweep.json").write_text(json.dumps(summary, indent=2, default=str))
    tracker.log_metrics(parent, metrics)
    for f in files:
        tracker.log_artifact(parent, f)
    return best


def format_table(sweep: Sweep, rows: list[dict[str, Any]]) -> str:
    keys = [p.key for p in sweep.params]
    head = f"{'trial':<14}{'status':<11}" + "".join(f"{k[:12]:>13}" for k in keys) + f"{'tasks':>7}{sweep.objective.name[:10]:>11}"
    lines = [head]
    for r in rows:
        obj = r.get(OBJECTIVE_KEY)
        lines.append(f"{r['trial']:<14}{r['status']:<11}" + "".join(f"{str(r[k])[:12]:>13}" for k in keys)
                     + f"{str(r.get(TIME_ATTR) or '-'):>7}" + (f"{obj:>11.2f}" if isinstance(obj, (int, float)) else f"{'-':>11}"))
    return "\n".join(lines)
