"""The sweep driver: ``python pipeline/main.py tune`` (``run_tune``), the Tuner with its search
and scheduler, the sweep directory's state and resume, and the leak check after the sweep.

Concurrency is bounded by ``tune.max_concurrent`` (default 1, one MLflow writer at a time for the
SQLite store). After the sweep the driver checks that no placement group created during it is
still alive (``sweep.json: leaks``).

Resume: ``tune --resume --output DIR`` restores the Tune experiment in ``DIR/tune`` with
``Tuner.restore`` (unfinished and errored trials are resumed, finished ones are kept as they
are); a restarted trial re-opens its own run directory and skips its completed stages. A sweep
that stopped before Tune started (e.g. in ``ray.init``: ``DIR`` holds ``sweep_config.yaml`` but no
Tune experiment state and no trial results) is started from its stored config by ``--resume``,
or by the plain command when its config is the same. The directory is checked before Ray starts
(``sweep_state``), and nothing a sweep computed is ever deleted or overwritten.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import yaml

from pipeline.config import REPO_ROOT, ConfigError, ExperimentConfig, config_from_dict
from stages.tune.objective import OBJECTIVE_KEY, TIME_ATTR
from stages.tune.report import collect_rows, finish_sweep
from stages.tune.sweep import Sweep, describe, trial_bundle
from stages.tune.trial import TRIALS_DIR, run_trial, trial_dirname

EXPERIMENT_DIR = "tune"  # Ray Tune's experiment folder inside the sweep directory
SWEEP_CONFIG = "sweep_config.yaml"  # the sweep's own config, written before anything else runs


def default_sweep_dir(cfg: ExperimentConfig) -> Path:
    return REPO_ROOT / "runs" / f"tune-{cfg.name}-{cfg.fingerprint()}"


def make_scheduler(sweep: Sweep) -> Any:
    from ray.tune.schedulers import ASHAScheduler, FIFOScheduler

    tc = sweep.cfg.tune
    if tc.scheduler == "asha":
        return ASHAScheduler(time_attr=TIME_ATTR, max_t=sweep.n_tasks, grace_period=min(tc.grace_period, sweep.n_tasks),
                             reduction_factor=tc.reduction_factor, brackets=1)
    return FIFOScheduler()


def make_search(sweep: Sweep) -> Any:
    """Random/grid: Tune's BasicVariantGenerator (which enforces ``max_concurrent`` itself);
    optuna: OptunaSearch behind a ConcurrencyLimiter."""
    tc = sweep.cfg.tune
    seed = tc.seed if tc.seed is not None else sweep.cfg.seed
    if tc.search == "optuna":
        from ray.tune.search import ConcurrencyLimiter
        from ray.tune.search.optuna import OptunaSearch

        return ConcurrencyLimiter(OptunaSearch(seed=seed), max_concurrent=tc.max_concurrent)
    from ray.tune.search import BasicVariantGenerator

    return BasicVariantGenerator(random_state=seed, max_concurrent=tc.max_concurrent)


def _trainable(sweep: Sweep, payload: dict[str, Any], pipeline: Any) -> Any:
    """``run_trial`` with the sweep's payload and the pipeline class (put in the object store by
    ``with_parameters``; the class travels by reference, its module imported by the worker)."""
    from ray import tune

    return tune.with_resources(tune.with_parameters(run_trial, sweep=payload, pipeline=pipeline),
                               tune.PlacementGroupFactory([trial_bundle(sweep.cfg)]))


def _tuner(sweep: Sweep, payload: dict[str, Any], restore: bool, pipeline: Any) -> Any:
    from ray import tune

    path = sweep.directory / EXPERIMENT_DIR
    if restore:
        return tune.Tuner.restore(str(path), trainable=_trainable(sweep, payload, pipeline),
                                  resume_unfinished=True, resume_errored=True)
    tc = sweep.cfg.tune
    return tune.Tuner(
        _trainable(sweep, payload, pipeline),
        param_space=sweep.param_space(),
        tune_config=tune.TuneConfig(
            metric=OBJECTIVE_KEY, mode=sweep.objective.mode, num_samples=tc.num_samples,
            search_alg=make_search(sweep), scheduler=make_scheduler(sweep), trial_dirname_creator=trial_dirname,
        ),
        run_config=tune.RunConfig(name=EXPERIMENT_DIR, storage_path=str(sweep.directory),
                                  failure_config=tune.FailureConfig(max_failures=0), verbose=1),
    )


def sweep_state(directory: Path) -> str:
    """What a sweep directory holds, checked on the file system only (no Ray is started):

    ``empty`` (missing or empty), ``foreign`` (files but no ``sweep_config.yaml``), ``restorable``
    (Tune experiment state in ``tune/``: resume it), ``trials_only`` (trial run directories under
    ``trials/`` but no Tune state to resume them from) or ``not_started`` (the sweep's config, and at
    most the sweep's MLflow run, but neither Tune state nor trial results: the sweep stopped before
    Tune started, e.g. in ``ray.init``)."""
    if not directory.exists() or not any(directory.iterdir()):
        return "empty"
    if not (directory / SWEEP_CONFIG).is_file():
        return "foreign"
    experiment = directory / EXPERIMENT_DIR
    if experiment.exists():
        from ray import tune  # importing Tune starts no Ray

        if tune.Tuner.can_restore(str(experiment)):
            return "restorable"
    trials = directory / TRIALS_DIR
    if trials.exists() and any(trials.iterdir()):
        return "trials_only"
    return "not_started"


def _open_directory(cfg: ExperimentConfig, directory: Path, resume: bool) -> tuple[ExperimentConfig, bool]:
    """Create the sweep directory (new sweep) or load the sweep's own config (resume; or a sweep
    that never started). Returns (config to run, restore the Tune experiment?). Checks the
    directory only, before Ray starts; never deletes or overwrites what a sweep computed."""
    saved = directory / SWEEP_CONFIG
    state = sweep_state(directory)
    flag = "--resume" if resume else "--output"
    if state == "trials_only":
        raise ConfigError(f"{flag}: {directory} holds trial results ({TRIALS_DIR}/) but no Tune experiment state "
                          f"to resume them from (no {EXPERIMENT_DIR}/tuner.pkl); it cannot be resumed and is left as it "
                          "is: start the sweep in another directory")
    if resume:
        if state == "empty":
            what = "does not exist" if not directory.exists() else "is empty"
            raise ConfigError(f"--resume: {directory} {what}: it holds no sweep to resume; start a sweep "
                              "without --resume")
        if state == "foreign":
            raise ConfigError(f"--resume: {directory} holds no sweep to resume (no {SWEEP_CONFIG}); "
                              "choose the directory of a sweep, or start a new one without --resume")
        stored = config_from_dict(yaml.safe_load(saved.read_text()))
        if stored.to_dict() != cfg.to_dict():
            print(f"using the sweep's own config {saved} (the command line's config differs)")
        if state == "not_started":
            print(f"{directory} holds a sweep that never started ({SWEEP_CONFIG}, no Tune experiment state "
                  "yet): starting it from its stored config", flush=True)
        return stored, state == "restorable"
    if state == "not_started":
        stored = config_from_dict(yaml.safe_load(saved.read_text()))
        if stored.to_dict() != cfg.to_dict():
            raise ConfigError(f"--output: {directory} holds a sweep that never started, with a different config "
                              f"({saved}); start that sweep with --resume --output {directory}, or choose "
                              "another directory for this config")
        print(f"{directory} holds this sweep, which never started (no Tune experiment state yet): starting it",
              flush=True)
        return stored, False
    if state == "restorable":
        raise ConfigError(f"--output: {directory} holds a sweep with Tune experiment state ({EXPERIMENT_DIR}/); "
                          f"resume it with --resume --output {directory}, or choose another directory")
    if state == "foreign":
        raise ConfigError(f"--output: {directory} exists and is not empty but holds no sweep (no {SWEEP_CONFIG}); "
                          "choose another directory")
    directory.mkdir(parents=True, exist_ok=True)
    tmp = saved.with_name(saved.name + ".tmp")  # never leave a half-written config behind
    tmp.write_text(yaml.safe_dump(cfg.to_dict(), sort_keys=False))
    tmp.replace(saved)
    return cfg, False


def run_tune(cfg: ExperimentConfig, output: Path | None = None, resume: bool = False, dry_run: bool = False,
             pipeline: Any = None) -> int:
    """``python pipeline/main.py tune``: run (or resume, or describe) a sweep. Returns the exit
    code: 0 when every trial finished or was stopped by the scheduler, 1 if any trial failed.

    ``pipeline`` is what each trial runs: a class (or callable) with ``stages.runner.PipelineRun``'s
    interface, ``pipeline(cfg, output, log=..., on_evaluated=..., mlflow_parent=...).run()``;
    None means ``PipelineRun``. It reaches the Ray workers pickled, by reference for a class, so
    its module must be importable there."""
    directory = Path(output).resolve() if output else default_sweep_dir(cfg)
    if dry_run:
        print(describe(Sweep.from_config(cfg, directory)))
        return 0
    if resume and output is None:
        raise ConfigError("--resume needs --output DIR (the sweep directory)")
    if pipeline is None:
        from stages.runner import PipelineRun as pipeline
    elif isinstance(pipeline, str) or not callable(pipeline):
        raise TypeError(f"run_tune: pipeline must be a class or callable like stages.runner.PipelineRun, "
                        f"got {pipeline!r}")
    if not resume:
        Sweep.from_config(cfg, directory)  # validate everything before touching the directory
    cfg, restore = _open_directory(cfg, directory, resume)
    sweep = Sweep.from_config(cfg, directory)
    print(describe(sweep), flush=True)

    from stages.runner import init_ray
    from stages.tracking import Tracker, flatten

    tracker = Tracker(directory, uri=cfg.tracking.uri, experiment=cfg.tracking.experiment or cfg.name)
    parent = tracker.start_parent(
        run_name=f"sweep-{directory.name}",
        params={**flatten({"tune": cfg.to_dict()["tune"]}), "tune.space_resolved": json.dumps([p.to_dict() for p in sweep.params]),
                "objective_metric": sweep.objective.metric, "objective_mode": sweep.objective.mode},
        tags={"kind": "sweep", "run_dir": str(directory), "method": cfg.method.name},
    )
    print(f"MLflow: {tracker.uri} (experiment {tracker.experiment!r}, sweep run {parent})", flush=True)
    init_ray(cfg, stop_notice=f"stopped by SIGTERM: resume the sweep with `tune --resume --output {directory}` "
                              "(finished trials are kept)")
    _warn_oversubscription(cfg)
    payload = sweep.payload(tracking_uri=tracker.uri, experiment=tracker.experiment, parent_run_id=parent)
    t0 = time.time()
    ok = False
    try:
        pgs_before = _alive_placement_groups()
        grid = _tuner(sweep, payload, restore, pipeline).fit()
        rows = collect_rows(sweep, grid)
        leaks = check_leaks(pgs_before)
        ok = not any(r["status"] == "error" for r in rows)
        finish_sweep(sweep, rows, tracker, parent, wall_s=time.time() - t0, leaks=leaks)
    finally:
        tracker.end(parent, ok=ok)
    return 0 if ok else 1


def _warn_oversubscription(cfg: ExperimentConfig) -> None:
    """Tune does not see the CPUs a trial's stages take (its function asks for none): warn when
    ``max_concurrent`` pipelines would take every CPU and leave none for Ray Data's tasks, the
    hang seen on 2-CPU machines (docs/troubleshooting.md)."""
    import ray

    cpus = ray.cluster_resources().get("CPU", 0.0)
    # a trial's pipeline runs its stages one by one (it never overlaps evaluate with training)
    stage = max(cfg.train.num_workers * cfg.train.cpus_per_worker, cfg.eval.concurrency * cfg.eval.cpus_per_actor)
    need = cfg.tune.max_concurrent * stage + cfg.tune.max_concurrent * cfg.tune.cpus_per_trial
    if need >= cpus:
        print(f"WARNING: {cfg.tune.max_concurrent} concurrent trial(s) x {stage:g} CPU per stage = {need:g} of {cpus:g} "
              "CPUs; Ray Data needs CPUs beside them. Lower tune.max_concurrent or the stages' CPUs.", flush=True)


def _alive_placement_groups() -> set[str]:
    import ray

    return {pg_id for pg_id, info in ray.util.placement_group_table().items() if info.get("state") != "REMOVED"}


def check_leaks(before: set[str], wait_s: float = 30.0) -> dict[str, Any]:
    """After the sweep: placement groups created during it that are still alive (a stopped
    trial's Train worker group would show here) and free vs total CPUs. Waits up to ``wait_s``
    for Tune's own trial placement groups to be removed."""
    import ray

    deadline = time.time() + wait_s
    while True:
        leaked = sorted(_alive_placement_groups() - before)
        if not leaked or time.time() > deadline:
            break
        time.sleep(1.0)
    total = ray.cluster_resources().get("CPU", 0.0)
    free = ray.available_resources().get("CPU", 0.0)
    report = {"placement_groups_left": leaked, "cpus_total": total, "cpus_free": free}
    if leaked:
        print(f"WARNING: {len(leaked)} placement group(s) created by the sweep are still alive: {leaked}")
    return report
