"""Stage overheads and growth of a run, from the pipeline's own stage records.

Overhead: each stage's wall time minus its compute loop (train: the optimiser steps; evaluate:
the inference batches), beside Ray Train's own floor on this machine: a bare ``TorchTrainer.fit``
of a trivial loop with the run's scaling config, measured in this process first. Targets: every
train stage after the first <= 3 s of overhead, the first <= 25 s; every evaluate stage <= 3 s;
the run's wall time <= 1.5x the sum of its compute loops.

Growth (``--growth 8,16,32``): runs over longer streams (the benchmark's eight tasks, then copies
of them under new names through ``data.custom_tasks``), per-task wall time apart from the
evaluation work. Target: flat within 10% from 8 to 32 tasks.

    python benchmarks/stage_overhead.py [--run DIR | --output DIR] [key=value ...]
    python benchmarks/stage_overhead.py --growth 8,16,32 --output DIR [key=value ...]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _common  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--run", help="an existing run directory to analyse (no new run)")
    ap.add_argument("--output", help="where the new run(s) go (default: a temporary folder)")
    ap.add_argument("--growth", help="stream lengths, e.g. 8,16,32")
    ap.add_argument("--method", default=None)
    ap.add_argument("overrides", nargs="*")
    args = ap.parse_args()
    out = Path(args.output) if args.output else Path(f"/tmp/coin-bench-{time.strftime('%Y%m%d-%H%M%S')}")
    print(f"# stage overhead: {_common.machine()}")
    if args.growth:
        growth(args, out)
        return
    floor = ray_train_floor(args)
    run_dir = Path(args.run) if args.run else pipeline_run(out, args.overrides, args.method)
    report(run_dir, floor)


def ray_train_floor(args, repeats: int = 2) -> float:
    """Seconds of a bare ``TorchTrainer.fit`` of a loop that does nothing (median of ``repeats``),
    same scaling config as the run, in a local Ray started as the pipeline starts its own."""
    import tempfile

    import ray
    from ray.train import RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    from stages.runner import init_ray

    cfg = _common.load(None, args.overrides, method=args.method)
    init_ray(cfg)
    tr = cfg.train
    walls = []
    with tempfile.TemporaryDirectory() as storage:
        for i in range(repeats):
            trainer = TorchTrainer(
                lambda: None,
                scaling_config=ScalingConfig(num_workers=tr.num_workers, use_gpu=tr.gpus_per_worker > 0,
                                             resources_per_worker={"CPU": tr.cpus_per_worker}),
                run_config=RunConfig(name=f"floor-{i}", storage_path=storage),
            )
            t0 = time.time()
            trainer.fit()
            walls.append(time.time() - t0)
    ray.shutdown()
    floor = _common.median(walls)
    print(f"Ray Train floor (bare TorchTrainer.fit of an empty loop, {tr.num_workers} worker(s)): "
          + ", ".join(f"{w:.1f} s" for w in walls) + f" -> {floor:.1f} s")
    return floor


def pipeline_run(out: Path, overrides: list[str], method: str | None, tasks: list[str] | None = None,
                 extra: list[str] | None = None) -> Path:
    cmd = [sys.executable, str(_common.ROOT / "pipeline" / "main.py"), "--output", str(out), *overrides,
           *(extra or [])]
    if method:
        cmd += ["--method", method]
    t0 = time.time()
    proc = subprocess.run(cmd, cwd=_common.ROOT, capture_output=True, text=True)
    if proc.returncode != 0:
        sys.exit(f"pipeline run failed ({proc.returncode}):\n{proc.stderr[-3000:]}")
    shown = [c for c in cmd[1:] if not c.startswith("data.custom_tasks.")]
    copies = len(cmd) - 1 - len(shown)
    print(f"pipeline run: {out} ({time.time() - t0:.0f} s, command: {' '.join(shown)}"
          + (f" + {copies // 4} task copies as data.custom_tasks)" if copies else ")"))
    return out


def stage_table(run_dir: Path) -> tuple[list[dict], dict]:
    res = json.loads((run_dir / "results.json").read_text())
    stages = []
    for sid, wall in res["stage_wall_s"].items():
        marker = json.loads((run_dir / "stages" / sid / "DONE.json").read_text())["result"]
        loop = marker.get("train_loop_s") if "-train-" in sid else marker.get("infer_loop_s")
        kind = sid.split("-")[1]
        stages.append({"id": sid, "kind": kind, "wall": wall, "loop": loop, "result": marker})
    return stages, res


def report(run_dir: Path, floor: float) -> None:
    stages, res = stage_table(run_dir)
    body, train_i = [], 0
    verdicts = []
    for s in stages:
        if s["loop"] is None:
            continue
        over = s["wall"] - s["loop"]
        r = s["result"]
        if s["kind"] == "train":
            target = 25.0 if train_i == 0 else 3.0
            train_i += 1
            detail = " ".join(f"{k.split('/')[1][:-2]} {v:.1f}" for k, v in r.items() if k.startswith("setup/"))
        else:
            target = 3.0
            detail = (f"stream wait {r.get('actor_wait_s', float('nan')):.1f} read {r.get('read_s', float('nan')):.1f} "
                      f"score {r.get('scoring_s', float('nan')):.1f} tracking {r.get('tracking_s', float('nan')):.1f} "
                      f"actor start {r.get('actor_start_s', float('nan')):.1f}")
        body.append([s["id"], s["wall"], s["loop"], over, over / floor, "met" if over <= target else f"> {target:g}",
                     detail])
        verdicts.append(over <= target)
    print(_common.table(["stage", "wall s", "loop s", "overhead s", "/ Ray floor", "target", "where (s)"], body))
    loops = sum(s["loop"] for s in stages if s["loop"] is not None)
    ratio = res["run_wall_s"] / loops
    print(f"run wall {res['run_wall_s']:.1f} s, sum of compute loops {loops:.1f} s: {ratio:.2f}x (target <= 1.5): "
          f"{'met' if ratio <= 1.5 else 'NOT met'}")
    print(f"stages within their overhead target: {sum(verdicts)}/{len(verdicts)}")


def growth(args, out: Path) -> None:
    """Runs over 8, 16, 32 ... tasks; per-task wall time apart from the evaluation work."""
    from pipeline.config import COIN_TASKS
    from pipeline.tasks import task_table
    from stages.common import synth_root

    lengths = [int(x) for x in args.growth.split(",")]
    cfg = _common.load(None, args.overrides, method=args.method)
    _common.ensure_data(cfg)
    root = Path(synth_root(cfg))
    names, custom = [], {}
    for i in range(max(lengths)):
        base = COIN_TASKS[i % len(COIN_TASKS)]
        if i < len(COIN_TASKS):
            names.append(base)
            continue
        name = f"{base}{i // len(COIN_TASKS) + 1}"
        names.append(name)
        spec = task_table()[base]  # the benchmark's own files of that task (CoIN: TextVQA's test is val.json)
        custom[name] = [f"data.custom_tasks.{name}.train={root}/{cfg.data.instructions}/{spec.train}",
                        f"data.custom_tasks.{name}.test={root}/{cfg.data.instructions}/{spec.test}",
                        f"data.custom_tasks.{name}.image_root={root}/images",
                        f"data.custom_tasks.{name}.scorer={cfg.scorer_of(base)}"]
    # stages one at a time, so that a stage's wall time is its own (evaluate(t) overlapping
    # train(t+1) would slow training by the growing evaluation work on a small machine)
    serial = ["resources.overlap_evaluate=false"]
    print(f"growth: {lengths} tasks, {' '.join(serial)} (each stage's wall time is its own)")
    body = []
    for n in lengths:
        run_dir = out / f"tasks-{n}"
        extra = [f"tasks=[{','.join(names[:n])}]", *serial, *[x for t in names[:n] for x in custom.get(t, [])]]
        pipeline_run(run_dir, args.overrides, args.method, extra=extra)
        stages, res = stage_table(run_dir)
        evals = sum(s["loop"] for s in stages if s["kind"] == "eval" and s["loop"] is not None)
        trains = [s["wall"] for s in stages if s["kind"] == "train"]
        per_task = (res["run_wall_s"] - evals) / n
        body.append([n, res["run_wall_s"], evals, per_task, _common.median(trains[1:]) if len(trains) > 1 else trains[0]])
    for row in body:
        row.append(row[3] / body[0][3])
    print(_common.table(["tasks", "run wall s", "eval loops s", "per task s (wall - eval loops) / T",
                         "median later train stage s", "vs first"], body))
    lo, hi = min(r[-1] for r in body), max(r[-1] for r in body)
    print(f"per-task wall time against {lengths[0]} tasks: {lo:.2f}-{hi:.2f}x, at {lengths[-1]} tasks {body[-1][-1]:.2f}x "
          f"(target: within 10%): {'met' if 0.9 <= lo and hi <= 1.1 else 'NOT met'}")


if __name__ == "__main__":
    main()
