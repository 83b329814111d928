"""A sweep's fixed settings (``Sweep``): the base config every trial starts from, the parameters,
the objective, the directory; the checks of ``tune.*``, the trial's resource bundle, and the
dry-run report (``describe``)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pipeline.config import ConfigError, ExperimentConfig, config_from_dict
from stages.tune.objective import TIME_ATTR, Objective, resolve_objective
from stages.tune.space import Param, apply_values, grid_size, parse_space, trial_count, validate_space

SEARCHES = ("random", "grid", "optuna")
SCHEDULERS = ("fifo", "asha")
TRIAL_MEMORY_BYTES = 1 << 20  # token request of a 0-CPU trial (Tune needs a non-empty bundle)


@dataclass
class Sweep:
    """Everything fixed for a sweep: the base config (with ``tune.overrides``), parameters,
    objective, where it lives. ``payload()`` is what each trial receives."""

    cfg: ExperimentConfig
    base: dict[str, Any]  # experiment config dict every trial starts from
    params: list[Param]
    objective: Objective
    directory: Path

    @classmethod
    def from_config(cls, cfg: ExperimentConfig, directory: Path) -> "Sweep":
        tc = cfg.tune
        check_settings(cfg)
        params = parse_space(tc.space, tc.search, method=cfg.method.name)
        base = cfg.to_dict()
        overrides: dict[str, Any] = {}
        for key, value in (tc.overrides or {}).items():
            _flatten_into(overrides, str(key), value)
        try:
            base = config_from_dict(apply_values(base, overrides)).to_dict()
        except ConfigError as exc:
            raise ConfigError(f"tune.overrides: {exc}") from None
        validate_space(params, base)
        return cls(cfg=cfg, base=base, params=params, objective=resolve_objective(tc.objective),
                   directory=Path(directory).resolve())

    @property
    def n_tasks(self) -> int:
        return len(self.base["tasks"])

    @property
    def default_space(self) -> bool:
        """True when ``tune.space`` is empty, i.e. the method's own default space is swept."""
        return not self.cfg.tune.space

    def trial_config(self, values: dict[str, Any], *, tracking: dict[str, Any] | None = None) -> dict[str, Any]:
        """The experiment config dict of one trial: base + the trial's values (by space key)."""
        tree = apply_values(self.base, {p.path: values[p.key] for p in self.params if p.key in values})
        if tracking:
            tree["tracking"] = {**tree.get("tracking", {}), **tracking}
        return config_from_dict(tree).to_dict()

    def param_space(self) -> dict[str, Any]:
        return {p.key: p.domain(self.cfg.tune.search) for p in self.params}

    def payload(self, *, tracking_uri: str, experiment: str, parent_run_id: str) -> dict[str, Any]:
        return {"base": self.base, "params": [p.to_dict() for p in self.params],
                "objective": self.objective.name, "directory": str(self.directory),
                "tracking": {"uri": tracking_uri, "experiment": experiment}, "parent_run_id": parent_run_id}


def _flatten_into(out: dict[str, Any], key: str, value: Any) -> None:
    """``{"train": {"epochs": 1}}`` and ``{"train.epochs": 1}`` both -> ``{"train.epochs": 1}``
    (method options and other free-form dicts are set key by key)."""
    if isinstance(value, dict) and value:
        for k, v in value.items():
            _flatten_into(out, f"{key}.{k}", v)
    else:
        out[key] = value


def check_settings(cfg: ExperimentConfig) -> None:
    """The ``tune.*`` settings other than the space (search, scheduler, counts, resources)."""
    tc = cfg.tune
    if tc.search not in SEARCHES:
        raise ConfigError(f"tune.search: {tc.search!r} is not one of {SEARCHES}")
    if tc.search == "optuna":
        try:
            import optuna  # noqa: F401
        except ImportError:
            raise ConfigError("tune.search: 'optuna' needs the optuna package (pip install optuna)") from None
    if tc.scheduler not in SCHEDULERS:
        raise ConfigError(f"tune.scheduler: {tc.scheduler!r} is not one of {SCHEDULERS}")
    if tc.num_samples < 1:
        raise ConfigError("tune.num_samples: must be >= 1")
    if tc.max_concurrent < 1:
        raise ConfigError("tune.max_concurrent: must be >= 1")
    if tc.grace_period < 1:
        raise ConfigError("tune.grace_period: must be >= 1 (tasks)")
    if tc.reduction_factor <= 1:
        raise ConfigError("tune.reduction_factor: must be > 1")
    if tc.cpus_per_trial < 0 or tc.gpus_per_trial < 0:
        raise ConfigError("tune.cpus_per_trial / tune.gpus_per_trial: must be >= 0")


def trial_bundle(cfg: ExperimentConfig) -> dict[str, float]:
    """The resource bundle of a trial's own function (see stages/tune/trial.py: 0 CPU)."""
    bundle: dict[str, float] = {}
    if cfg.tune.cpus_per_trial:
        bundle["CPU"] = cfg.tune.cpus_per_trial
    if cfg.tune.gpus_per_trial:
        bundle["GPU"] = cfg.tune.gpus_per_trial
    return bundle or {"memory": float(TRIAL_MEMORY_BYTES)}


def asha_rungs(grace: int, rf: float, max_t: int) -> list[int]:
    """The ASHA milestones (tasks learned) at which trials may be stopped."""
    rungs, r = [], float(grace)
    while r < max_t:
        rungs.append(int(r))
        r *= rf
    return rungs


def describe(sweep: Sweep) -> str:
    """The dry-run report: space, objective/mode, search, scheduler, trial count, resources."""
    tc, obj = sweep.cfg.tune, sweep.objective
    n = trial_count(sweep.params, tc.search, tc.num_samples)
    origin = f"; {sweep.cfg.method.name}'s default, tune.space is empty" if sweep.default_space else ""
    lines = [f"Sweep of {sweep.cfg.name!r} ({sweep.cfg.method.name}, {sweep.n_tasks} tasks: {', '.join(sweep.base['tasks'])})",
             f"  directory: {sweep.directory}", f"Search space (key -> config path, domain{origin}):"]
    kw = max([14] + [len(p.key) for p in sweep.params])
    pw = max([28] + [len(p.path) for p in sweep.params])
    lines += [f"  {p.describe(tc.search, kw, pw)}" for p in sweep.params]
    first = {"last": "Last", 0.0: "0"}.get(obj.fallback, obj.fallback) if obj.fallback is not None else None
    lines.append(f"Objective: {obj.name} (metric {obj.metric!r}, mode {obj.mode})"
                 + (f"; after the first task it is undefined and {first} is reported" if first else ""))
    lines.append(f"Search: {tc.search} (seed {tc.seed if tc.seed is not None else sweep.cfg.seed}); "
                 f"num_samples {tc.num_samples} x grid {grid_size(sweep.params, tc.search)} = {n} trial(s)")
    if tc.scheduler == "asha":
        rungs = asha_rungs(min(tc.grace_period, sweep.n_tasks), tc.reduction_factor, sweep.n_tasks)
        lines.append(f"Scheduler: ASHA (time_attr {TIME_ATTR}, max_t {sweep.n_tasks}, grace_period {tc.grace_period}, "
                     f"reduction_factor {tc.reduction_factor}; stop decisions after {rungs or 'no'} task(s))")
    else:
        lines.append("Scheduler: FIFO (every trial runs all tasks)")
    lines.append(f"Concurrency: {tc.max_concurrent} trial(s) at a time; trial function resources {trial_bundle(sweep.cfg)} "
                 f"(stages request their own: {sweep.cfg.train.num_workers} Train worker(s) x "
                 f"{sweep.cfg.train.cpus_per_worker} CPU, {sweep.cfg.eval.concurrency} eval actor(s) x "
                 f"{sweep.cfg.eval.cpus_per_actor} CPU)")
    return "\n".join(lines)
