"""Ray Tune sweep over continual-method options: ``python pipeline/main.py tune --config FILE``.

Each trial runs the WHOLE stage DAG (``PipelineRun(...).run()``, which launches its own Ray Train
fits and Ray Data jobs) with the trial's values applied to the experiment config, in its own run
directory ``DIR/trials/<trial id>/``. The pipeline reports to Tune after every evaluate(t) stage
with ``tasks_learned = t`` as the time attribute, so ASHA can stop bad trials after a few tasks.

Search space (``tune.space``), one entry per parameter::

    k: {choice: [1, 2, 3, 4]}            # sampled (random search) / enumerated (search: grid)
    M: {grid: [5, 10, 20]}               # always enumerated (a Tune grid_search)
    temperature: {loguniform: [0.01, 1.0]}
    lam: {uniform: [0.3, 0.7]}
    fuse_all_until: {randint: [1, 3]}    # integers, both ends included
    train.lr: 0.003                      # a plain value: the same for every trial

Keys without a dot are method options (``k`` means ``method.options.k``); keys with a dot are
paths from the config root. Every key and value is checked before anything runs (errors name
``tune.space.<key>``); method options are checked against the method's ``*Options`` dataclass.

Objective (``tune.objective``): the ModalPrompt paper's Avg by default; Last, B, M (ModalPrompt)
and ACC, MAA, BWT (ProgLoRA) selectable. The mode follows the metric: B is forgetting (min),
every other one is maximised (BWT too: negative means forgetting). Avg, B, M and BWT need two
evaluated tasks; after the first task the trial reports, as ``objective``, Last for Avg and M
(their one-task limit: the accuracy on the tasks seen so far) and 0 for B and BWT (nothing
learned before can have been forgotten), with ``objective_defined = 0``. Every trial uses the same
rule at the same rung, so ASHA's comparisons at ``tasks_learned = 1`` stay fair; for B/BWT, whose
first-task value is the same for every trial, use ``grace_period >= 2``. ``train_loss`` (min; mean
over the tasks learned so far of each train stage's final loss) ranks trials whose accuracies are
all equal, as with the tiny CPU model at test sizes, whose accuracies are all 0.

Resources: a trial's function does no work itself; it starts its pipeline in a 0-CPU actor on the
same node and relays the evaluations to Tune. Tune places each trial's function in a placement
group that *captures* child tasks, so a pipeline started inside that function would have its
untyped tasks (e.g. the base stage's pre-training task) squeezed into the trial's bundle;
running it in an actor with its own scheduling strategy escapes that. The trial therefore
requests no CPU (``tune.cpus_per_trial: 0``; Tune refuses an empty bundle, so the request is a
token 1 MiB of the ``memory`` resource) and the stages request what they use (Train workers:
``train.cpus_per_worker``; Ray Data decode/eval: ``eval.cpus_per_actor`` ...). Reserving a CPU for
the idle trial function instead starves Ray Data on a 2-CPU machine (see
shared/docs/environment.md). Concurrency is bounded by ``tune.max_concurrent`` (default 1, one
MLflow writer at a time for the SQLite store).

Stopping: after each evaluation but the last the pipeline blocks until Tune has taken the report
(Tune's function API is synchronous; a trial's pipeline therefore never overlaps evaluate(t) with
train(t+1), see ``PipelineRun.run``); the last evaluation is reported once the pipeline has
written its results. When ASHA stops a trial, nothing is running in its pipeline (no Train worker
group, no Ray Data actor pool): the trial function kills its pipeline actor and the sweep driver
marks the MLflow runs it left open KILLED. Killing a trial in the middle of a Ray Train fit is
what leaked CPUs before (shared/docs/environment.md): Train v2 removes a dead controller's worker
placement group through a detached cleaner that polls the State API, which is unavailable without
the dashboard ("Failed to query Ray Train Controller actor state"), so the group stayed reserved.
After the sweep the driver checks that no placement group created during it is still alive
(``sweep.json: leaks``).

MLflow: one sweep run in the experiment; every trial's pipeline run is nested under it
(``mlflow_parent``) in the sweep's store (default ``sqlite:///DIR/mlflow.db``). The sweep run
gets ``results.csv``/``results.json`` (trial, parameters, status, objective, metrics),
``objective_vs_params.png`` and ``best_config.yaml``, a ready-to-run experiment config.

Resume: ``tune --resume --output DIR`` restores the Tune experiment in ``DIR/tune`` with
``Tuner.restore`` (unfinished and errored trials are resumed, finished ones are kept as they
are); a restarted trial re-opens its own run directory and skips its completed stages. A sweep
that stopped before Tune started (e.g. in ``ray.init``: ``DIR`` holds ``sweep_config.yaml`` but no
Tune experiment state and no trial results) is started from its stored config by ``--resume``,
or by the plain command when its config is the same. The directory is checked before Ray starts
(``sweep_state``), and nothing a sweep computed is ever deleted or overwritten.
"""

from __future__ import annotations

import csv
import dataclasses
import io
import json
import math
import threading
import time
import types
import typing
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from pipeline.config import REPO_ROOT, ConfigError, ExperimentConfig, config_from_dict

# Used when ``tune.space`` is empty: the ModalPrompt knobs of methods.md, temperature 0 = hard top-k.
DEFAULT_SPACE: dict[str, Any] = {
    "k": {"choice": [1, 2, 3, 4]},
    "M": {"choice": [5, 10, 20]},
    "temperature": {"choice": [0.0, 0.1, 1.0]},
}
TIME_ATTR = "tasks_learned"
OBJECTIVE_KEY = "objective"
TRIAL_MEMORY_BYTES = 1 << 20  # token request of a 0-CPU trial (Tune needs a non-empty bundle)
EXPERIMENT_DIR = "tune"  # Ray Tune's experiment folder inside the sweep directory
TRIALS_DIR = "trials"
DEFAULT_PIPELINE = "stages.runner:PipelineRun"  # "module:Class" a trial runs (tests substitute a scripted one)
SPACE_FORMS = ("choice", "grid", "uniform", "loguniform", "randint")
SEARCHES = ("random", "grid", "optuna")
SCHEDULERS = ("fifo", "asha")


# ----------------------------------------------------------------------------------------------
# Objective
# ----------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Objective:
    """The metric a sweep optimises, its mode, and what stands in for it while undefined."""

    name: str  # as written in the config
    metric: str  # key in the pipeline's metrics (lower-case except B and M)
    mode: str  # "max" | "min"
    fallback: str | float | None  # metric key or constant used while ``metric`` is undefined

    def value(self, metrics: dict[str, Any]) -> tuple[float, bool]:
        """(objective value, defined?) for one evaluation's metrics."""
        v = metrics.get(self.metric)
        if isinstance(v, (int, float)) and not isinstance(v, bool):
            return float(v), True
        if isinstance(self.fallback, str) and isinstance(metrics.get(self.fallback), (int, float)):
            return float(metrics[self.fallback]), False
        if isinstance(self.fallback, (int, float)):
            return float(self.fallback), False
        raise KeyError(f"objective {self.name!r}: metric {self.metric!r} missing from {sorted(metrics)}")

    def better(self, a: float, b: float) -> bool:
        return a < b if self.mode == "min" else a > b


# name (lower-case) -> (metric key, mode, value while undefined after the first task)
_OBJECTIVES: dict[str, tuple[str, str, str | float | None]] = {
    "avg": ("avg", "max", "last"),
    "last": ("last", "max", None),
    "b": ("B", "min", 0.0),
    "m": ("M", "max", "last"),
    "acc": ("acc", "max", None),
    "maa": ("maa", "max", None),
    "la": ("la", "max", None),
    "bwt": ("bwt", "max", 0.0),
    "train_loss": ("train_loss", "min", None),
}


def resolve_objective(name: str) -> Objective:
    """``"Avg"`` -> Objective(metric="avg", mode="max", ...); case-insensitive."""
    key = str(name).strip().lower()
    if key not in _OBJECTIVES:
        raise ConfigError(f"tune.objective: {name!r} is not one of Avg, Last, B, M, ACC, MAA, BWT, LA, train_loss")
    metric, mode, fallback = _OBJECTIVES[key]
    return Objective(name=str(name), metric=metric, mode=mode, fallback=fallback)


def report_metrics(t: int, metrics: dict[str, Any], objective: Objective, n_tasks: int) -> dict[str, Any]:
    """What a trial reports to Tune after evaluate(t): the pipeline's numeric metrics plus
    ``objective``, ``objective_defined`` and the time attribute ``tasks_learned``."""
    value, defined = objective.value(metrics)
    out = {k: float(v) for k, v in metrics.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}
    out.update({OBJECTIVE_KEY: value, "objective_defined": int(defined), TIME_ATTR: int(t), "n_tasks": n_tasks})
    return out


# ----------------------------------------------------------------------------------------------
# Search space
# ----------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Param:
    """One swept parameter: its key in ``tune.space``, config path, domain form and values."""

    key: str
    path: str  # dotted path from the config root
    kind: str  # choice | grid | uniform | loguniform | randint | value
    values: tuple[Any, ...]

    @property
    def where(self) -> str:
        return f"tune.space.{self.key}"

    def is_grid(self, search: str) -> bool:
        return self.kind == "grid" or (self.kind == "choice" and search == "grid")

    def domain(self, search: str) -> Any:
        """The Ray Tune domain for this parameter (``tune`` imported lazily)."""
        from ray import tune

        if self.is_grid(search):
            return tune.grid_search(list(self.values))
        if self.kind == "choice":
            return tune.choice(list(self.values))
        if self.kind == "uniform":
            return tune.uniform(*self.values)
        if self.kind == "loguniform":
            return tune.loguniform(*self.values)
        if self.kind == "randint":
            return tune.randint(self.values[0], self.values[1] + 1)  # Tune's upper bound is exclusive
        return self.values[0]

    def samples(self) -> list[Any]:
        """Values that stand for the domain when checking it: every listed value, range ends
        (as the sampled type: floats for uniform/loguniform)."""
        if self.kind in ("uniform", "loguniform"):
            return [float(v) for v in self.values]
        return list(self.values)

    def describe(self, search: str) -> str:
        form = "grid" if self.is_grid(search) else self.kind
        vals = ", ".join(repr(v) for v in self.values)
        shown = {"value": vals, "randint": f"[{vals}] (inclusive)"}.get(self.kind, f"[{vals}]")
        return f"{self.key:<14} -> {self.path:<28} {form} {shown}"

    def to_dict(self) -> dict[str, Any]:
        return {"key": self.key, "path": self.path, "kind": self.kind, "values": list(self.values)}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "Param":
        return cls(key=d["key"], path=d["path"], kind=d["kind"], values=tuple(d["values"]))


def param_path(key: str) -> str:
    """``k`` -> ``method.options.k``; a dotted key is already a path from the config root."""
    return key if "." in key else f"method.options.{key}"


def _number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def parse_param(key: Any, spec: Any) -> Param:
    """One ``tune.space`` entry -> Param; ConfigError naming ``tune.space.<key>`` if malformed."""
    where = f"tune.space.{key}"
    if not isinstance(key, str) or not key or any(not part for part in key.split(".")):
        raise ConfigError(f"{where}: parameter names are non-empty (dotted) strings")
    path = param_path(key)
    if isinstance(spec, list):
        raise ConfigError(f"{where}: a bare list is ambiguous; write {{choice: [...]}} or {{grid: [...]}}")
    if not isinstance(spec, dict):
        return Param(key, path, "value", (spec,))
    if len(spec) != 1 or next(iter(spec)) not in SPACE_FORMS:
        raise ConfigError(f"{where}: expected one of {{{': ..., '.join(SPACE_FORMS)}: ...}} or a plain value, got {spec!r}")
    kind, args = next(iter(spec.items()))
    if not isinstance(args, list) or not args:
        raise ConfigError(f"{where}: {kind} needs a non-empty list, got {args!r}")
    if kind in ("choice", "grid"):
        if any(isinstance(v, (dict, list)) for v in args):
            raise ConfigError(f"{where}: {kind} values must be scalars, got {args!r}")
        return Param(key, path, kind, tuple(args))
    if len(args) != 2 or not all(_number(v) for v in args):
        raise ConfigError(f"{where}: {kind} needs [low, high] (two numbers), got {args!r}")
    lo, hi = args
    if kind == "randint":
        if not all(isinstance(v, int) for v in args) or lo > hi:
            raise ConfigError(f"{where}: randint needs integers low <= high, got {args!r}")
    elif lo >= hi:
        raise ConfigError(f"{where}: {kind} needs low < high, got {args!r}")
    if kind == "loguniform" and lo <= 0:
        raise ConfigError(f"{where}: loguniform needs 0 < low < high, got {args!r}")
    return Param(key, path, kind, (lo, hi))


def parse_space(space: dict[str, Any] | None, search: str = "random") -> list[Param]:
    """``tune.space`` (empty: DEFAULT_SPACE) -> parameters; checks forms and duplicate paths."""
    space = dict(space or DEFAULT_SPACE)
    params = [parse_param(k, v) for k, v in space.items()]
    seen: dict[str, str] = {}
    for p in params:
        if p.path in seen:
            raise ConfigError(f"{p.where}: same parameter as tune.space.{seen[p.path]} ({p.path})")
        seen[p.path] = p.key
        if search == "grid" and p.kind in ("uniform", "loguniform", "randint"):
            raise ConfigError(f"{p.where}: search 'grid' enumerates values; a {p.kind} range has none "
                              "(use choice/grid, or search: random)")
        if search == "optuna" and p.kind == "grid":
            raise ConfigError(f"{p.where}: grid is not supported by search 'optuna' (use choice)")
    if not any(p.kind != "value" for p in params):
        raise ConfigError("tune.space: nothing to sweep (every entry is a plain value)")
    return params


def set_path(tree: dict[str, Any], path: str, value: Any) -> None:
    """Set a dotted path in a nested config dict (creating sections; a non-section is an error)."""
    node = tree
    keys = path.split(".")
    for i, key in enumerate(keys[:-1]):
        child = node.setdefault(key, {})
        if not isinstance(child, dict):
            raise ConfigError(f"{path}: {'.'.join(keys[: i + 1])} is not a config section")
        node = child
    node[keys[-1]] = value


def apply_values(base: dict[str, Any], values: dict[str, Any]) -> dict[str, Any]:
    """A copy of config dict ``base`` with ``values`` ({dotted path: value}) set."""
    tree = json.loads(json.dumps(base, default=str))
    for path, value in values.items():
        set_path(tree, path, value)
    return tree


def _options_class(method: str) -> type | None:
    """The method's options dataclass (its ``options_class``; None: no options)."""
    from pipeline.methods.base import _REGISTRY, _import_builtin_methods

    _import_builtin_methods()
    return getattr(_REGISTRY.get(method), "options_class", None)


def _check_option(cfg: dict[str, Any], p: Param, value: Any) -> None:
    """Check a method-option value with the method's options dataclass (names, types, ranges)."""
    method = cfg["method"]["name"]
    cls = _options_class(method)
    if cls is None:
        return
    name = p.path.split(".", 2)[2]
    fields = {f.name: f for f in dataclasses.fields(cls)}
    if name not in fields:
        raise ConfigError(f"{p.where}: method {method!r} has no option {name!r} (options: {sorted(fields)})")
    hint = typing.get_type_hints(cls).get(name)
    args = typing.get_args(hint) if typing.get_origin(hint) in (typing.Union, types.UnionType) else (hint,)
    ints = int in args and float not in args
    if ints and p.kind in ("uniform", "loguniform"):
        raise ConfigError(f"{p.where}: {method} option {name!r} is an integer; {p.kind} gives floats "
                          "(use randint or choice)")
    options = dict(cfg["method"].get("options") or {})
    try:
        cls(**options)
    except (TypeError, ValueError) as exc:
        raise ConfigError(f"{p.where}: value {value!r} is invalid: {exc}") from None


def validate_space(params: list[Param], base: dict[str, Any]) -> None:
    """Apply every listed value / range end of every parameter to the experiment config and
    validate the result; ConfigError names ``tune.space.<key>``."""
    for p in params:
        for value in p.samples():
            tree = apply_values(base, {p.path: value})
            if p.path.startswith("method.options."):  # first: its messages say more about options
                _check_option(tree, p, value)
            try:
                config_from_dict(tree)
            except ConfigError as exc:
                raise ConfigError(f"{p.where}: value {value!r} -> {exc}") from None


def grid_size(params: list[Param], search: str) -> int:
    """Number of grid points (1 without grids)."""
    return math.prod(len(p.values) for p in params if p.is_grid(search))


def trial_count(params: list[Param], search: str, num_samples: int) -> int:
    """Trials the search will run: num_samples x every grid (Tune's BasicVariantGenerator)."""
    return num_samples * (grid_size(params, search) if search != "optuna" else 1)


# ----------------------------------------------------------------------------------------------
# The sweep's settings
# ----------------------------------------------------------------------------------------------
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
        _check_settings(cfg)
        params = parse_space(tc.space, tc.search)
        base = cfg.to_dict()
        overrides = {}
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

    def trial_config(self, values: dict[str, Any], *, tracking: dict[str, Any] | None = None) -> dict[str, Any]:
        """The experiment config dict of one trial: base + the trial's values (by space key)."""
        tree = apply_values(self.base, {p.path: values[p.key] for p in self.params if p.key in values})
        if tracking:
            tree["tracking"] = {**tree.get("tracking", {}), **tracking}
        return config_from_dict(tree).to_dict()

    def param_space(self) -> dict[str, Any]:
        return {p.key: p.domain(self.cfg.tune.search) for p in self.params}

    def payload(self, *, tracking_uri: str, experiment: str, parent_run_id: str,
                pipeline: str = DEFAULT_PIPELINE) -> dict[str, Any]:
        return {"base": self.base, "params": [p.to_dict() for p in self.params],
                "objective": self.objective.name, "directory": str(self.directory),
                "tracking": {"uri": tracking_uri, "experiment": experiment}, "parent_run_id": parent_run_id,
                "pipeline": pipeline}


def _flatten_into(out: dict[str, Any], key: str, value: Any) -> None:
    """``{"train": {"epochs": 1}}`` and ``{"train.epochs": 1}`` both -> ``{"train.epochs": 1}``
    (method options and other free-form dicts are set key by key)."""
    if isinstance(value, dict) and value:
        for k, v in value.items():
            _flatten_into(out, f"{key}.{k}", v)
    else:
        out[key] = value


def _check_settings(cfg: ExperimentConfig) -> None:
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
    """The resource bundle of a trial's own function (see the module docstring: 0 CPU)."""
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


def describe(sweep: Sweep) -> str:
    """The dry-run report: space, objective/mode, search, scheduler, trial count, resources."""
    tc, obj = sweep.cfg.tune, sweep.objective
    n = trial_count(sweep.params, tc.search, tc.num_samples)
    lines = [f"Sweep of {sweep.cfg.name!r} ({sweep.cfg.method.name}, {sweep.n_tasks} tasks: {', '.join(sweep.base['tasks'])})",
             f"  directory: {sweep.directory}", "Search space (key -> config path, domain):"]
    lines += [f"  {p.describe(tc.search)}" for p in sweep.params]
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


# ----------------------------------------------------------------------------------------------
# Trial side
# ----------------------------------------------------------------------------------------------
class PipelineHost:
    """Runs one trial's ``PipelineRun`` in its own actor. After every evaluation the pipeline
    waits until the trial function has handed that report to Tune (``ack``), so a trial that
    Tune stops is stopped between stages, with no Train or Ray Data workers alive."""

    def __init__(self, cfg: dict[str, Any], output: str, parent_run_id: str | None, pipeline: str) -> None:
        self._cfg, self._output, self._parent, self._pipeline = cfg, output, parent_run_id, pipeline
        self._run: Any = None
        self._events: list[tuple[int, dict[str, Any]]] = []
        self._acked = 0
        self._cond = threading.Condition()

    def run(self) -> dict[str, Any]:
        """Run (or resume) the pipeline; returns its results dict."""
        import importlib

        import ray

        ctx = ray.data.DataContext.get_current()  # as stages.runner.init_ray does for its driver
        ctx.execution_options.preserve_order = True
        ctx.enable_progress_bars = False
        module, _, name = self._pipeline.partition(":")
        pipeline_cls = getattr(importlib.import_module(module), name)
        cfg = config_from_dict(self._cfg)
        self._run = pipeline_cls(cfg, Path(self._output), log=lambda m: print(m, flush=True),
                                 on_evaluated=self._on_evaluated, mlflow_parent=self._parent)
        return self._run.run()

    def _on_evaluated(self, t: int, metrics: dict[str, Any]) -> None:
        """Publish evaluation t; unless it is the last one, wait until it was reported."""
        metrics = dict(metrics) | train_losses(self._run, t)
        with self._cond:
            self._events.append((t, metrics))
            n = len(self._events)
            self._cond.notify_all()
            if t < len(self._cfg["tasks"]):
                self._cond.wait_for(lambda: self._acked >= n)

    def next_event(self, index: int, timeout: float) -> tuple[int, dict[str, Any]] | None:
        """Evaluation number ``index`` (0-based) once it happened, or None after ``timeout`` s."""
        with self._cond:
            self._cond.wait_for(lambda: len(self._events) > index, timeout=timeout)
            return self._events[index] if len(self._events) > index else None

    def ack(self, index: int) -> None:
        """Evaluation ``index`` was reported: let the pipeline go on."""
        with self._cond:
            self._acked = max(self._acked, index + 1)
            self._cond.notify_all()


def train_losses(run: Any, t: int) -> dict[str, float]:
    """``train_loss`` (mean over the tasks learned so far of each train stage's final loss) and
    ``train_loss_last`` (the latest one), read from the completed train stages' markers."""
    stages = [s for s in getattr(run, "stages", []) if s.kind == "train" and s.task_index < t]
    losses = []
    for stage in sorted(stages, key=lambda s: s.task_index):
        marker = run.rundir.marker(stage.id)
        loss = json.loads(marker.read_text()).get("result", {}).get("final_loss") if marker.exists() else None
        if isinstance(loss, (int, float)) and math.isfinite(loss):
            losses.append(float(loss))
    return {"train_loss": sum(losses) / len(losses), "train_loss_last": losses[-1]} if losses else {}


def _start_host(cfg: dict[str, Any], output: Path, parent_run_id: str | None, pipeline: str) -> Any:
    """The trial's pipeline actor: 0 CPU, pinned to this node, NOT in the trial's placement group
    (an explicit scheduling strategy escapes Tune's child-task capture)."""
    import ray
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    node = ray.get_runtime_context().get_node_id()
    actor_cls = ray.remote(PipelineHost).options(
        num_cpus=0, max_concurrency=4, max_restarts=0,
        scheduling_strategy=NodeAffinitySchedulingStrategy(node_id=node, soft=False),
    )
    return actor_cls.remote(cfg, str(output), parent_run_id, pipeline)


def trial_dir(sweep_dir: Path | str, trial_id: str) -> Path:
    return Path(sweep_dir) / TRIALS_DIR / trial_id


def run_trial(config: dict[str, Any], sweep: dict[str, Any]) -> None:
    """Tune's function trainable: one whole pipeline run, reporting after every evaluation.

    Every report but the last is made while the pipeline waits between stages (a stop there
    leaves nothing running); the last one only once the pipeline has finished (results written),
    so a scheduler's decision at the final report cannot cut the run short."""
    import ray
    from ray import tune

    params = [Param.from_dict(d) for d in sweep["params"]]
    objective = resolve_objective(sweep["objective"])
    tree = apply_values(sweep["base"], {p.path: config[p.key] for p in params if p.key in config})
    tree["tracking"] = {**tree.get("tracking", {}), **sweep["tracking"]}
    n_tasks = len(tree["tasks"])
    output = trial_dir(sweep["directory"], tune.get_context().get_trial_id())
    host = _start_host(tree, output, sweep["parent_run_id"], sweep["pipeline"])
    done_ref = host.run.remote()
    try:
        index = 0
        while True:
            event = ray.get(host.next_event.remote(index, 2.0))
            if event is None:
                if ray.wait([done_ref], timeout=0)[0]:
                    break
                continue
            t, metrics = event
            if t >= n_tasks:
                ray.get(done_ref)  # the last evaluation: let the pipeline finish first
            tune.report(report_metrics(t, metrics, objective, n_tasks))  # blocks until Tune continues
            host.ack.remote(index)
            index += 1
            if t >= n_tasks:
                break
        ray.get(done_ref)  # a pipeline error fails the trial
    finally:
        ray.kill(host, no_restart=True)


def trial_dirname(trial: Any) -> str:
    """Tune's folder of a trial is named by its id (the same id names DIR/trials/<id>)."""
    return trial.trial_id


# ----------------------------------------------------------------------------------------------
# Driver
# ----------------------------------------------------------------------------------------------
def default_sweep_dir(cfg: ExperimentConfig) -> Path:
    return REPO_ROOT / "runs" / f"tune-{cfg.name}-{cfg.fingerprint()}"


def _trainable(sweep: Sweep, payload: dict[str, Any]) -> Any:
    from ray import tune

    return tune.with_resources(tune.with_parameters(run_trial, sweep=payload),
                               tune.PlacementGroupFactory([trial_bundle(sweep.cfg)]))


def _tuner(sweep: Sweep, payload: dict[str, Any], restore: bool) -> Any:
    from ray import tune

    path = sweep.directory / EXPERIMENT_DIR
    if restore:
        return tune.Tuner.restore(str(path), trainable=_trainable(sweep, payload),
                                  resume_unfinished=True, resume_errored=True)
    tc = sweep.cfg.tune
    return tune.Tuner(
        _trainable(sweep, payload),
        param_space=sweep.param_space(),
        tune_config=tune.TuneConfig(
            metric=OBJECTIVE_KEY, mode=sweep.objective.mode, num_samples=tc.num_samples,
            search_alg=make_search(sweep), scheduler=make_scheduler(sweep), trial_dirname_creator=trial_dirname,
        ),
        run_config=tune.RunConfig(name=EXPERIMENT_DIR, storage_path=str(sweep.directory),
                                  failure_config=tune.FailureConfig(max_failures=0), verbose=1),
    )


SWEEP_CONFIG = "sweep_config.yaml"  # the sweep's own config, written before anything else runs


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
             *, pipeline: str = DEFAULT_PIPELINE) -> int:
    """``python pipeline/main.py tune``: run (or resume, or describe) a sweep. Returns the exit
    code: 0 when every trial finished or was stopped by the scheduler, 1 if any trial failed.
    ``pipeline`` ("module:Class") is what each trial runs (tests substitute a scripted one)."""
    directory = Path(output).resolve() if output else default_sweep_dir(cfg)
    if dry_run:
        print(describe(Sweep.from_config(cfg, directory)))
        return 0
    if resume and output is None:
        raise ConfigError("--resume needs --output DIR (the sweep directory)")
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
    payload = sweep.payload(tracking_uri=tracker.uri, experiment=tracker.experiment, parent_run_id=parent,
                            pipeline=pipeline)
    t0 = time.time()
    ok = False
    try:
        pgs_before = _alive_placement_groups()
        grid = _tuner(sweep, payload, restore).fit()
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
    hang seen on 2-CPU machines (shared/docs/environment.md)."""
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


# ----------------------------------------------------------------------------------------------
# Results
# ----------------------------------------------------------------------------------------------
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
        categorical = p.kind in ("choice", "grid") and not all(_number(v) for v in p.values)
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


# Re-exported for tests and callers that build trial configs without running a sweep.
__all__ = [
    "DEFAULT_SPACE", "Objective", "Param", "Sweep", "apply_values", "best_config_yaml", "best_row", "describe",
    "parse_param", "parse_space", "report_metrics", "resolve_objective", "run_tune", "trial_bundle", "trial_count",
    "validate_space",
]
