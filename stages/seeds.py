"""``--seeds 0,1,2``: one configuration over several seeds as one experiment.

Each seed is a full pipeline run in ``DIR/seed-<s>/``, its config the experiment's with
``seed=<s>`` (the training seed: initialisation, data order; the benchmark and the base are the
config's own and the same for every seed). All seed runs are tracked in one MLflow store, nested
under one parent run of the experiment, which carries every metric's mean, standard deviation,
minimum and maximum over the seeds, ``seeds_summary.json`` and a figure of the per-task spread.
Re-running the same command resumes: finished seeds are verified and skipped, an interrupted one
continues from its last finished stage.
"""

from __future__ import annotations

import json
import math
import statistics
from pathlib import Path
from typing import Any, Callable, Sequence

from pipeline.config import ConfigError, ExperimentConfig, config_from_dict

SEEDS_FILE = "seeds.json"
SUMMARY_FILE = "seeds_summary.json"
FIGURE_FILE = "seeds_per_task.png"
# the scalar metrics a summary carries (those a run reports; fwt only where the run has it)
SCALARS = ("last", "avg", "B", "M", "acc", "maa", "bwt", "la", "fwt")


def parse_seeds(text: str) -> list[int]:
    """``"0,1,2"`` -> [0, 1, 2]; duplicates and non-integers are refused by name."""
    try:
        seeds = [int(s) for s in text.split(",") if s.strip() != ""]
    except ValueError:
        raise ConfigError(f"--seeds: expected comma-separated integers like 0,1,2 (got {text!r})") from None
    if not seeds:
        raise ConfigError("--seeds: no seed given")
    if len(set(seeds)) != len(seeds):
        raise ConfigError(f"--seeds: a seed is listed twice ({text})")
    return seeds


def seed_config(cfg: ExperimentConfig, seed: int, tracking_uri: str | None) -> ExperimentConfig:
    """The experiment's config with ``seed`` (and the experiment's MLflow store, if given)."""
    raw = cfg.to_dict()
    raw["seed"] = seed
    if tracking_uri is not None:
        raw.setdefault("tracking", {})["uri"] = tracking_uri
    return config_from_dict(raw)


def default_seeds_dir(cfg: ExperimentConfig, seeds: Sequence[int]) -> Path:
    from stages.runner import REPO_ROOT

    return REPO_ROOT / "runs" / f"{cfg.name}-seeds-{'-'.join(map(str, seeds))}-{cfg.fingerprint()}"


def spread(values: Sequence[float]) -> dict[str, float]:
    """mean, std (sample, n-1; 0 for one value), min, max of ``values``."""
    vals = [float(v) for v in values]
    return {"mean": statistics.fmean(vals), "std": statistics.stdev(vals) if len(vals) > 1 else 0.0,
            "min": min(vals), "max": max(vals)}


def summarise(per_seed: dict[int, dict[str, Any]]) -> dict[str, Any]:
    """Every scalar metric's and every task's final score's spread over the seeds' results.json."""
    seeds = sorted(per_seed)
    first = per_seed[seeds[0]]
    tasks = list(first["tasks"])
    for s in seeds:
        if list(per_seed[s]["tasks"]) != tasks:
            raise ValueError(f"seed {s} ran tasks {per_seed[s]['tasks']}, seed {seeds[0]} ran {tasks}")
    metrics = {}
    for key in SCALARS:
        vals = [per_seed[s]["metrics"].get(key) for s in seeds]
        if all(isinstance(v, (int, float)) and math.isfinite(v) for v in vals):
            metrics[key] = {**spread(vals), "per_seed": dict(zip(map(str, seeds), vals))}
    final = {}
    for i, task in enumerate(tasks):
        vals = [per_seed[s]["matrix"][-1][i] for s in seeds]
        final[task] = {**spread(vals), "per_seed": dict(zip(map(str, seeds), vals))}
    return {"seeds": seeds, "method": first["method"], "tasks": tasks, "metrics": metrics, "final_per_task": final,
            "run_dirs": {str(s): per_seed[s]["run_dir"] for s in seeds}}


def format_summary(summary: dict[str, Any]) -> str:
    seeds = summary["seeds"]
    lines = [f"Over seeds {', '.join(map(str, seeds))} ({summary['method']}): mean, sd, range; then each seed"]
    for key, m in summary["metrics"].items():
        each = "  ".join(f"{m['per_seed'][str(s)]:7.2f}" for s in seeds)
        lines.append(f"  {key:<5} {m['mean']:7.2f} ± {m['std']:5.2f}   [{m['min']:6.2f}, {m['max']:6.2f}]   {each}")
    lines.append("Final score per task: mean [min, max]")
    lines += [f"  {t:<12} {v['mean']:6.2f} [{v['min']:6.2f}, {v['max']:6.2f}]" for t, v in summary["final_per_task"].items()]
    return "\n".join(lines)


def per_task_figure(summary: dict[str, Any], path: Path) -> Path:
    """Each task's final score: the seeds' mean as a bar, their range as a whisker, each seed a dot."""
    from pipeline.figures import plt

    tasks = summary["tasks"]
    final = summary["final_per_task"]
    fig, ax = plt.subplots(figsize=(1.2 + 0.9 * len(tasks), 3.6))
    means = [final[t]["mean"] for t in tasks]
    lo = [final[t]["mean"] - final[t]["min"] for t in tasks]
    hi = [final[t]["max"] - final[t]["mean"] for t in tasks]
    ax.bar(range(len(tasks)), means, yerr=[lo, hi], capsize=4, color="#6a8caf")
    for i, t in enumerate(tasks):
        vals = list(final[t]["per_seed"].values())
        ax.plot([i] * len(vals), vals, "k.", markersize=4)
    ax.set_xticks(range(len(tasks)), labels=tasks, rotation=45, ha="right")
    ax.set_ylabel("final score (%)")
    last = summary["metrics"].get("last")
    title = f"{summary['method']}: final scores over seeds {', '.join(map(str, summary['seeds']))}"
    if last:
        title += f" (Last {last['mean']:.2f}, range {last['min']:.2f}-{last['max']:.2f})"
    ax.set_title(title, fontsize=9)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def _open_directory(directory: Path, cfg: ExperimentConfig, seeds: list[int]) -> None:
    """A new directory gets ``seeds.json``; an existing one must hold this experiment."""
    record = {"name": cfg.name, "fingerprint": cfg.fingerprint(), "seeds": seeds}
    path = directory / SEEDS_FILE
    if path.exists():
        stored = json.loads(path.read_text())
        if stored != record:
            raise ConfigError(f"--output: {directory} holds another seeds experiment ({stored['name']}, seeds "
                              f"{stored['seeds']}, config {stored['fingerprint']}); this one is {cfg.name}, seeds "
                              f"{seeds}, config {record['fingerprint']}: choose another directory")
        return
    if directory.exists() and any(directory.iterdir()):
        raise ConfigError(f"--output: {directory} exists, is not empty and holds no seeds experiment ({SEEDS_FILE})")
    directory.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(record, indent=2))
    tmp.replace(path)


def run_seeds(cfg: ExperimentConfig, seeds: list[int], output: Path | None = None, *, verbose: bool = False,
              log: Callable[[str], None] = print) -> dict[str, Any]:
    """Run ``cfg`` once per seed (in order, resuming finished ones) and summarise; returns the
    summary (also ``DIR/seeds_summary.json``)."""
    from stages.runner import PipelineRun, format_results
    from stages.tracking import Tracker, flatten

    directory = Path(output).resolve() if output else default_seeds_dir(cfg, seeds)
    _open_directory(directory, cfg, seeds)
    tracker = Tracker(directory, uri=cfg.tracking.uri, experiment=cfg.tracking.experiment or cfg.name)
    parent = tracker.start_parent(
        run_name=f"seeds-{directory.name}",
        params={**flatten(cfg.to_dict()), "seeds": ",".join(map(str, seeds))},
        tags={"kind": "seeds", "method": cfg.method.name, "run_dir": str(directory)},
    )
    log(f"seeds experiment: {directory} (seeds {', '.join(map(str, seeds))})")
    log(f"MLflow: {tracker.uri} (experiment {tracker.experiment!r}, run {parent})")
    ok = False
    try:
        per_seed = {}
        for i, seed in enumerate(seeds):
            log(f"=== seed {seed} ({i + 1} of {len(seeds)}) ===")
            run = PipelineRun(seed_config(cfg, seed, tracker.uri), directory / f"seed-{seed}", log=log,
                              mlflow_parent=parent, verbose=verbose)
            per_seed[seed] = run.run()
            log(format_results(per_seed[seed]))
        summary = summarise(per_seed)
        summary["mlflow"] = {"tracking_uri": tracker.uri, "run_id": parent}
        (directory / SUMMARY_FILE).write_text(json.dumps(summary, indent=2))
        figure = per_task_figure(summary, directory / FIGURE_FILE)
        for key, m in summary["metrics"].items():
            tracker.log_metrics(parent, {f"{key}_{stat}": m[stat] for stat in ("mean", "std", "min", "max")})
        for task, v in summary["final_per_task"].items():
            tracker.log_metrics(parent, {f"final/{task}_mean": v["mean"], f"final/{task}_min": v["min"],
                                         f"final/{task}_max": v["max"]})
        tracker.log_artifact(parent, directory / SUMMARY_FILE)
        tracker.log_artifact(parent, figure, "figures")
        ok = True
        return summary
    finally:
        tracker.end(parent, ok=ok)
