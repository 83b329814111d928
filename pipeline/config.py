"""Typed experiment configuration: YAML files validated on load, dotted command-line overrides.

An experiment config names every part of a run (task order, data source, model, continual
method, training/evaluation resources, tracking). ``load_config(path, overrides)`` returns a
validated ``ExperimentConfig``; unknown keys and ill-typed values are errors that name the key.

The embedded default (``pipeline/configs/default.yaml``) runs ModalPrompt on the generated
CoIN-synth benchmark with the tiny LLaVA model; nothing in it downloads anything.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import os
import re
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from pipeline.data.schema import COIN_TASKS
from pipeline.models.config import ModelConfig

CONFIG_DIR = Path(__file__).resolve().parent / "configs"
DEFAULT_CONFIG = CONFIG_DIR / "default.yaml"
REPO_ROOT = Path(__file__).resolve().parents[1]


class ConfigError(ValueError):
    """A config file or override is invalid; the message names the key."""


@dataclass
class SynthConfig:
    """Size of the generated CoIN-synth benchmark (used when data.source == "synth")."""

    seed: int = 0
    train_per_task: int = 256
    test_per_task: int = 200
    pretrain_records: int = 1000  # generic pre-training records (captions, generic QA)
    pretrain_skill_per_task: int = 400  # pre-training skill records per task (see pipeline/data/synth_pretrain.py)
    # Generic pre-training records also use LLaVA-1.5's two generic instructions ("Answer the
    # question using a single word or phrase.", the option-letter one); README, "A base that knows
    # LLaVA-1.5's generic instructions".
    generic_instructions: bool = False


@dataclass
class CustomTaskConfig:
    """``data.custom_tasks.<Name>``: a user's own task, a LLaVA-format folder. ``train`` / ``test``
    are JSON lists of records (train: ``id``, ``image``, ``conversations``; test: ``question_id``,
    ``image``, ``text`` and the answer fields the scorer reads); paths are local, relative to the
    repository root, or s3:// URLs."""

    train: str = ""
    test: str = ""
    image_root: str = ""  # the folder the records' "image" paths are relative to
    scorer: str = "exact"  # a name in pipeline.scoring.scorers.SCORERS (python pipeline/main.py score --help)


@dataclass
class DataConfig:
    source: str = "synth"  # "synth" (generated CoIN-synth) | "coin" (real CoIN files)
    # Folder or s3:// URL holding the instruction folders (coin) or where CoIN-synth is generated
    # (synth; default: <cache_dir>/coin-synth-<hash>).
    root: str | None = None
    instructions: str = "Instructions_Original"
    image_root: str | None = None  # default: <root> (coin) / <root>/images (synth)
    on_bad: str = "error"  # training policy for bad records: "error" | "skip" (skips are reported)
    max_train_per_task: int | None = None  # optional cap (first N records), for quick runs
    max_test_per_task: int | None = None
    synth: SynthConfig = field(default_factory=SynthConfig)
    # The user's own tasks, by name: any of them may appear in ``tasks`` beside the benchmark's.
    custom_tasks: dict[str, CustomTaskConfig] = field(default_factory=dict)


@dataclass
class MethodConfig:
    name: str = "modalprompt"
    options: dict[str, Any] = field(default_factory=dict)
    # Learning rate of this method's parameters; None = train.lr. (Prompt tuning wants a larger
    # rate than LoRA, so the ModalPrompt configs set it here and `--method lora` falls back.)
    lr: float | None = None
    # Methods outside the repository: .py files or module names, imported before ``name`` is
    # looked up (their @register lines run), in the driver and in every Ray worker.
    plugins: list[str] = field(default_factory=list)


LR_SCHEDULES = ("constant", "cosine", "linear")  # transformers.get_scheduler names (warm-up added)
WARMUP_TYPES = ("linear", "log")


@dataclass
class TaskTrainConfig:
    """``train.per_task.<Task>``: one task's own training settings; a key left out (None) takes the
    global ``train.*`` value (``lr``: the method's ``method.lr``, then ``train.lr``)."""

    epochs: float | None = None
    batch_size: int | None = None
    grad_accum: int | None = None
    lr: float | None = None
    lr_schedule: str | None = None
    warmup_ratio: float | None = None
    warmup_steps: int | None = None
    warmup_type: str | None = None
    weight_decay: float | None = None
    max_steps: int | None = None


@dataclass(frozen=True)
class StageTrain:
    """The training settings one train stage runs with (``ExperimentConfig.stage_train``)."""

    epochs: float
    batch_size: int  # per worker micro-batch
    grad_accum: int
    lr: float  # peak learning rate of the method's parameters
    lr_schedule: str
    warmup_ratio: float
    warmup_steps: int  # > 0 wins over warmup_ratio (as in transformers' TrainingArguments)
    warmup_type: str  # "linear" | "log"
    weight_decay: float
    max_steps: int | None

    def warmup_for(self, optimizer_steps: int) -> int:
        """Warm-up optimizer steps out of ``optimizer_steps`` (ceil of the ratio, as transformers)."""
        if self.warmup_steps > 0:
            return min(self.warmup_steps, optimizer_steps)
        return min(optimizer_steps, math.ceil(self.warmup_ratio * optimizer_steps))

    def describe(self, world: int) -> str:
        """One line for the dry run and the train stage's log."""
        warm = f"{self.warmup_steps} steps" if self.warmup_steps > 0 else f"ratio {self.warmup_ratio:g}"
        if self.warmup_type != "linear":
            warm += f" ({self.warmup_type})"
        steps = f", max_steps {self.max_steps}" if self.max_steps else ""
        return (f"epochs {self.epochs:g}, batch {self.batch_size} x accum {self.grad_accum} x {world} worker(s) "
                f"= {self.batch_size * self.grad_accum * world} global, lr {self.lr:g} {self.lr_schedule}, "
                f"warm-up {warm}, weight decay {self.weight_decay:g}{steps}")

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


@dataclass
class TrainConfig:
    epochs: float = 1.0
    batch_size: int = 16  # per worker micro-batch
    grad_accum: int = 1
    lr: float = 3e-3
    # Learning-rate schedule over each train stage's optimizer steps, after a linear warm-up of
    # warmup_steps (if > 0) or ceil(warmup_ratio * steps): "constant", "cosine" (to 0) or "linear"
    # (to 0), as transformers.get_scheduler builds them (the schedules LLaVA's trainer uses).
    lr_schedule: str = "constant"
    warmup_ratio: float = 0.0
    warmup_steps: int = 0
    # Shape of the warm-up: "linear" (transformers') or "log" (DeepSpeed's WarmupLR default,
    # lr * log(step + 1) / log(warm-up steps); only with lr_schedule "constant"): what the
    # ModalPrompt and CoIN reference scripts ran, their DeepSpeed JSON's scheduler overriding
    # --lr_scheduler_type (docs/reproduce-llava7b.md).
    warmup_type: str = "linear"
    weight_decay: float = 0.0
    max_steps: int | None = None
    # Per-task settings: {TaskName: {epochs, batch_size, grad_accum, lr, lr_schedule, warmup_ratio,
    # warmup_steps, warmup_type, weight_decay, max_steps}}; keys left out take the values above. A joint
    # (multi-task) stage trains on all tasks at once and uses the values above only.
    per_task: dict[str, TaskTrainConfig] = field(default_factory=dict)
    num_workers: int = 1
    cpus_per_worker: float = 1.0
    gpus_per_worker: float = 0.0
    deepspeed: str = "cluster/deepspeed/zero2.json"
    checkpoint_every: int = 0  # steps between mid-stage checkpoints (0: only at the end)
    max_failures: int = 1  # Ray Train FailureConfig: worker crashes tolerated per stage
    log_every: int = 10
    torch_threads: int = 0  # 0: leave torch's default


@dataclass
class EvalConfig:
    batch_size: int = 32
    concurrency: int = 1  # model-holding actors in the Ray Data inference stage
    cpus_per_actor: float = 1.0
    gpus_per_actor: float = 0.0
    max_new_tokens: int | None = None  # default: model.max_new_tokens
    # also train each task alone from the base and evaluate it on its own test set (the isolation
    # row A0 behind FWT; a sub-run per task under <run dir>/isolation/); not part of the run's
    # fingerprint, so a finished run adds its row when re-run with eval.isolation=true
    isolation: bool = False


@dataclass
class TrackingConfig:
    # MLflow tracking URI; default: a local SQLite store inside the run directory.
    # MLFLOW_TRACKING_URI in the environment takes precedence over this.
    uri: str | None = None
    experiment: str | None = None  # default: the experiment config's name


@dataclass
class ResourcesConfig:
    """How the run uses Ray's resources; nothing here changes a run's results (so these keys are
    not part of the run's fingerprint)."""

    # The local, in-process Ray started when no cluster is running:
    num_cpus: int | None = None
    object_store_mb: int = 400
    # Run evaluate(t) in the background, beside train(t+1) (it depends on freeze(t) only). Used only
    # where the cluster has room for both stages plus a decode task; otherwise stages run one by one.
    overlap_evaluate: bool = True
    # CPUs each Ray Data image-decode task reserves (a fraction leaves room beside the Train workers
    # and the inference actors on small machines).
    decode_cpus: float = 0.5
    # One Ray Train worker group for all the train stages of a sequential run (one fit, a job per
    # stage) instead of a fit per stage: same results, without starting a controller, workers and
    # their helper actors (fresh processes importing torch/transformers/DeepSpeed) for every task.
    # Used only where the workers can hold their resources beside an evaluation (as for
    # overlap_evaluate) and never in a Ray Tune trial; otherwise one fit per stage.
    resident_train: bool = True
    # The evaluate stages' inference actors load the base models once and stay for the whole run
    # (each stage loads only the new method state); used where they fit beside the Train workers
    # (as for overlap_evaluate), otherwise they are started and closed by every evaluate stage.
    resident_eval: bool = True
    # Per-sample cache of the frozen encoders' outputs (vision tower features before the
    # projector, guide image and text embeddings) in each inference actor, in MB (0: off). Bit-
    # identical answers; an earlier task's test set costs only the language model at later stages.
    feature_cache_mb: int = 1024
    # Inference actor deaths an evaluate stage survives (Ray restarts the actor; the stage
    # predicts again).
    eval_max_failures: int = 2
    # Decoded datasets (test sets; 64 x 64 x 3 bytes an image on the default) are decoded once per
    # run and kept in Ray's object store while they total at most this many MB; beyond it every
    # use streams and decodes them again (CoIN at 336 x 336: about 0.34 MB an image).
    materialize_mb: int = 128
    # The isolation row's one-task runs (eval.isolation) side by side: as many as the cluster holds
    # at once (each holds a run's Train workers, inference actors and a decode task), at most this
    # many (0: no cap; 1: one after another, in the driver).
    isolation_parallel: int = 0


@dataclass
class TuneConfig:
    """Ray Tune sweep over method options (``python pipeline/main.py tune``; see stages/tune/).

    ``space`` maps a parameter to a domain: ``{choice: [...]}``, ``{grid: [...]}``,
    ``{uniform: [lo, hi]}``, ``{loguniform: [lo, hi]}``, ``{randint: [lo, hi]}`` (inclusive) or a
    plain value. Keys without a dot are method options (``k`` = ``method.options.k``); dotted
    keys are paths from the config root (``train.lr``). Empty: the method's own default space (its class's ``sweep_space``).
    """

    space: dict[str, Any] = field(default_factory=dict)
    objective: str = "Avg"  # avg, last, B, M, acc, maa, bwt, la, train_loss (B, train_loss: min; others: max)
    num_samples: int = 4  # trials (times the size of every grid)
    search: str = "random"  # "random" | "grid" | "optuna"
    scheduler: str = "fifo"  # "fifo" | "asha"
    grace_period: int = 2  # ASHA: tasks a trial runs before it may be stopped
    reduction_factor: float = 2.0  # ASHA: keep the best 1/reduction_factor at each rung
    max_concurrent: int = 1  # trials at a time (1: safe on a 2-CPU box, one MLflow writer)
    # Resources of the trial's own driver function only: 0 = none (it just waits on its pipeline;
    # the stages request their Train workers / Ray Data CPUs themselves, see stages/tune/).
    cpus_per_trial: float = 0.0
    gpus_per_trial: float = 0.0
    overrides: dict[str, Any] = field(default_factory=dict)  # config overrides for every trial
    seed: int | None = None  # random search seed; None = the experiment's seed


@dataclass
class ExperimentConfig:
    name: str = "coin-synth-modalprompt"
    seed: int = 0
    tasks: list[str] = field(default_factory=lambda: list(COIN_TASKS))
    # Where models, the generated benchmark and pre-trained bases are cached (relative paths are
    # relative to the repository root).
    cache_dir: str = ".cache"
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    method: MethodConfig = field(default_factory=MethodConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    tracking: TrackingConfig = field(default_factory=TrackingConfig)
    resources: ResourcesConfig = field(default_factory=ResourcesConfig)
    tune: TuneConfig = field(default_factory=TuneConfig)

    def validate(self) -> None:
        if not self.tasks:
            raise ConfigError("tasks: the task list is empty")
        for name, ct in self.data.custom_tasks.items():
            where = f"data.custom_tasks.{name}"
            if name in COIN_TASKS:
                raise ConfigError(f"{where}: {name!r} is a CoIN task; give your task another name")
            for key in ("train", "test", "image_root"):
                if not getattr(ct, key):
                    raise ConfigError(f"{where}.{key}: not set")
            from pipeline.scoring.scorers import SCORERS

            if ct.scorer not in SCORERS:
                raise ConfigError(f"{where}.scorer: unknown scorer {ct.scorer!r}; known: {sorted(SCORERS)}")
        known = [*COIN_TASKS, *self.data.custom_tasks]
        unknown = [t for t in self.tasks if t not in known]
        if unknown:
            raise ConfigError(f"tasks: unknown task(s) {unknown}; known: {known} "
                              "(a task of your own: data.custom_tasks.<Name>)")
        if len(set(self.tasks)) != len(self.tasks):
            raise ConfigError(f"tasks: duplicate task names in {self.tasks}")
        if self.data.source not in ("synth", "coin"):
            raise ConfigError(f"data.source: {self.data.source!r} is not 'synth' or 'coin'")
        if self.data.on_bad not in ("error", "skip"):
            raise ConfigError(f"data.on_bad: {self.data.on_bad!r} is not 'error' or 'skip'")
        if self.train.num_workers < 1:
            raise ConfigError("train.num_workers: must be >= 1")
        _check_train_settings(self.train, "train")
        for task, over in self.train.per_task.items():
            if task not in self.tasks:
                raise ConfigError(f"train.per_task.{task}: {task!r} is not one of the run's tasks {self.tasks}")
            _check_train_settings(over, f"train.per_task.{task}")
        for task in [None, *self.tasks]:
            st = self.stage_train(task)
            if st.warmup_type == "log" and st.lr_schedule != "constant":
                where = "train" if task is None else f"train.per_task.{task}"
                raise ConfigError(f"{where}.warmup_type: 'log' (DeepSpeed's WarmupLR) goes with lr_schedule "
                                  f"'constant', not {st.lr_schedule!r}")
        if self.eval.batch_size < 1 or self.eval.concurrency < 1:
            raise ConfigError("eval.batch_size and eval.concurrency must be >= 1")
        if not self.resources.decode_cpus > 0:
            raise ConfigError("resources.decode_cpus: must be > 0")
        if self.resources.isolation_parallel < 0:
            raise ConfigError("resources.isolation_parallel: must be >= 0 (0: as many as the cluster holds)")
        from pipeline.methods.registry import load_plugins, validate_method_options

        try:
            load_plugins([self.resolve_path(p) if p.endswith(".py") else p for p in self.method.plugins])
        except (ImportError, FileNotFoundError, SyntaxError) as exc:
            raise ConfigError(f"method.plugins: {type(exc).__name__}: {exc}") from None
        try:  # a misspelt option fails here, not minutes later on a training worker
            validate_method_options(self.method.name, self.method.options)
        except KeyError as exc:
            raise ConfigError(f"method.name: {exc.args[0] if exc.args else exc}") from None
        except (ValueError, TypeError) as exc:
            raise ConfigError(f"method.options: {exc}") from None

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def stage_train(self, task: str | None) -> StageTrain:
        """The settings a train stage for ``task`` runs with: ``train.per_task[task]`` over the
        global ``train.*`` values (``lr``: per-task, else ``method.lr``, else ``train.lr``).
        ``task=None`` (a joint stage over all tasks) takes the global values."""
        t = self.train
        over = t.per_task.get(task) if task is not None else None
        over = over or TaskTrainConfig()

        def pick(name: str) -> Any:
            value = getattr(over, name)
            return getattr(t, name) if value is None else value

        lr = over.lr if over.lr is not None else (self.method.lr or t.lr)
        return StageTrain(
            epochs=pick("epochs"), batch_size=pick("batch_size"), grad_accum=pick("grad_accum"), lr=lr,
            lr_schedule=pick("lr_schedule"), warmup_ratio=pick("warmup_ratio"), warmup_steps=pick("warmup_steps"),
            warmup_type=pick("warmup_type"), weight_decay=pick("weight_decay"), max_steps=pick("max_steps"),
        )

    def fingerprint(self) -> str:
        """Hash of the resolved config: identifies a run (same config => same run directory).

        Sections that cannot change a run's outputs (where it is tracked, how many CPUs the local
        Ray gets, the sweep settings) are left out, so changing them does not orphan a run."""
        return _hash(_run_view(self.to_dict()))

    def extension_view(self, tasks: list[str]) -> str:
        """The fingerprint this config would have with only ``tasks`` (a prefix of its own): a run
        directory of that config may be extended by this one (``RunDir.open``)."""
        return _hash(_run_view(_cut_to(self.to_dict(), tasks)))

    def task_specs(self) -> tuple:
        """The user's own tasks as ``pipeline.tasks.TaskSpec`` (paths resolved)."""
        from pipeline.tasks import TaskSpec

        return tuple(TaskSpec(name, self.resolve_path(ct.train), self.resolve_path(ct.test), ct.scorer,
                              self.resolve_path(ct.image_root))
                     for name, ct in self.data.custom_tasks.items())

    def scorer_of(self, task: str) -> str:
        from pipeline.tasks import task_table

        return task_table(self.task_specs())[task].scorer

    def resolve_path(self, path: str) -> str:
        """Paths in configs are relative to the repository root unless absolute or URLs."""
        if "://" in path or Path(path).is_absolute():
            return path
        return str(REPO_ROOT / path)


def _run_view(raw: dict[str, Any]) -> dict[str, Any]:
    """What identifies a run: sections that cannot change its outputs (where it is tracked, how
    many CPUs the local Ray gets, the sweep settings) left out, and empty new-style sections
    (plugins, custom tasks) too, so a run directory made before they existed still matches."""
    run = {k: v for k, v in raw.items() if k not in ("tracking", "resources", "tune")}
    run = json.loads(json.dumps(run, default=str))
    if not run.get("method", {}).get("plugins"):
        run.get("method", {}).pop("plugins", None)
    if not run.get("data", {}).get("custom_tasks"):
        run.get("data", {}).pop("custom_tasks", None)
    run.get("eval", {}).pop("isolation", None)  # extra stages beside the run, not a different run
    return run


def _hash(run: dict[str, Any]) -> str:
    return hashlib.sha256(json.dumps(run, sort_keys=True, default=str).encode()).hexdigest()[:10]


def _cut_to(raw: dict[str, Any], tasks: list[str]) -> dict[str, Any]:
    """``raw`` (a config dict) as if it listed only ``tasks``: later tasks' own sections dropped."""
    raw = json.loads(json.dumps(raw, default=str))
    raw["tasks"] = list(tasks)
    per_task = raw.get("train", {}).get("per_task") or {}
    raw["train"]["per_task"] = {k: v for k, v in per_task.items() if k in tasks}
    custom = raw.get("data", {}).get("custom_tasks") or {}
    raw["data"]["custom_tasks"] = {k: v for k, v in custom.items() if k in tasks}
    return raw


def _check_train_settings(t: TrainConfig | TaskTrainConfig, where: str) -> None:
    """Range checks shared by ``train`` and each ``train.per_task.<Task>`` (None = not set)."""
    for key in ("batch_size", "grad_accum"):
        value = getattr(t, key)
        if value is not None and value < 1:
            raise ConfigError(f"{where}.{key}: must be >= 1 (got {value})")
    if t.epochs is not None and not t.epochs > 0:
        raise ConfigError(f"{where}.epochs: must be > 0 (got {t.epochs})")
    if t.lr is not None and not t.lr > 0:
        raise ConfigError(f"{where}.lr: must be > 0 (got {t.lr})")
    if t.max_steps is not None and t.max_steps < 1:
        raise ConfigError(f"{where}.max_steps: must be >= 1 (got {t.max_steps})")
    if t.lr_schedule is not None and t.lr_schedule not in LR_SCHEDULES:
        raise ConfigError(f"{where}.lr_schedule: {t.lr_schedule!r} is not one of {LR_SCHEDULES}")
    if t.warmup_ratio is not None and not 0.0 <= t.warmup_ratio < 1.0:
        raise ConfigError(f"{where}.warmup_ratio: must be in [0, 1) (got {t.warmup_ratio})")
    if t.warmup_type is not None and t.warmup_type not in WARMUP_TYPES:
        raise ConfigError(f"{where}.warmup_type: {t.warmup_type!r} is not one of {WARMUP_TYPES}")
    if t.warmup_steps is not None and t.warmup_steps < 0:
        raise ConfigError(f"{where}.warmup_steps: must be >= 0 (got {t.warmup_steps})")
    if t.weight_decay is not None and t.weight_decay < 0:
        raise ConfigError(f"{where}.weight_decay: must be >= 0 (got {t.weight_decay})")


def _from_dict(cls: type, data: Any, where: str) -> Any:
    """Build dataclass ``cls`` from a dict, rejecting unknown keys and ill-typed values."""
    if not isinstance(data, dict):
        raise ConfigError(f"{where or 'config'}: expected a mapping, got {type(data).__name__}")
    if hasattr(cls, "from_dict") and cls is not ExperimentConfig:
        try:
            return cls.from_dict(data)
        except ConfigError:
            raise
        except (TypeError, ValueError, KeyError) as exc:
            raise ConfigError(f"{where}: {exc}") from exc
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - names)
    if unknown:
        raise ConfigError(f"{where + '.' if where else ''}{unknown[0]}: unknown key (known: {sorted(names)})")
    kwargs = {k: _coerce(hints[k], v, f"{where + '.' if where else ''}{k}") for k, v in data.items()}
    return cls(**kwargs)


def _coerce(tp: Any, value: Any, where: str) -> Any:
    origin = typing.get_origin(tp)
    if dataclasses.is_dataclass(tp):
        return _from_dict(tp, value, where)
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _coerce(arg, value, where)
            except ConfigError as exc:
                errors.append(str(exc))
        raise ConfigError(errors[0] if errors else f"{where}: bad value {value!r}")
    if origin is list:
        if not isinstance(value, list):
            raise ConfigError(f"{where}: expected a list, got {value!r}")
        (inner,) = typing.get_args(tp) or (Any,)
        return [_coerce(inner, v, f"{where}[{i}]") for i, v in enumerate(value)]
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{where}: expected a mapping, got {value!r}")
        args = typing.get_args(tp)
        if len(args) == 2 and dataclasses.is_dataclass(args[1]):
            return {str(k): _coerce(args[1], v, f"{where}.{k}") for k, v in value.items()}
        return dict(value)
    if tp is Any:
        return value
    if tp is float and isinstance(value, (int, float)) and not isinstance(value, bool):
        return float(value)
    if tp is float and isinstance(value, str):  # YAML 1.1 reads "1e-4" (no dot) as a string
        try:
            return float(value)
        except ValueError:
            pass
    if tp in (int, str, bool) and (type(value) is tp):
        return value
    raise ConfigError(f"{where}: expected {getattr(tp, '__name__', tp)}, got {value!r}")


def _expand_env(value: Any) -> Any:
    """``${VAR}`` in string values is replaced from the environment (set variables only), so real
    configs can name data and weights without hard-coded absolute paths."""
    if isinstance(value, str):
        whole = re.fullmatch(r"\$\{(\w+)\}", value.strip())
        if whole and whole.group(1) not in os.environ:
            return None  # unset: the key is "not given" (a dry run needs no paths)
        return os.path.expandvars(value)
    if isinstance(value, dict):
        return {k: _expand_env(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_expand_env(v) for v in value]
    return value


def unresolved_env(value: str | None, key: str) -> None:
    """Raise if a path still holds an unset ``${VAR}``, naming the config key and the variable."""
    if value and "${" in value:
        var = value[value.index("${") + 2 : value.index("}", value.index("${"))]
        raise ConfigError(f"{key}: environment variable {var} is not set (value {value!r})")


def _set_dotted(tree: dict[str, Any], dotted: str, value: Any) -> None:
    keys = dotted.split(".")
    node = tree
    for key in keys[:-1]:
        node = node.setdefault(key, {})
        if not isinstance(node, dict):
            raise ConfigError(f"{dotted}: {key} is not a section")
    node[keys[-1]] = value


def parse_overrides(items: list[str]) -> dict[str, Any]:
    """``["train.lr=1e-3", "method.options.k=2"]`` -> nested dict (values parsed as YAML)."""
    tree: dict[str, Any] = {}
    for item in items:
        if "=" not in item:
            raise ConfigError(f"override {item!r}: expected key=value")
        key, raw = item.split("=", 1)
        _set_dotted(tree, key.strip(), yaml.safe_load(raw) if raw != "" else "")
    return tree


def merge(base: dict[str, Any], update: dict[str, Any]) -> dict[str, Any]:
    """Recursive dict merge; ``update`` wins. Method options replace only the keys they name."""
    out = dict(base)
    for key, value in update.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = merge(out[key], value)
        else:
            out[key] = value
    return out


def load_config(
    path: str | Path | None = None, overrides: list[str] | dict | None = None, *, method: str | None = None
) -> ExperimentConfig:
    """Load, merge overrides into and validate an experiment config (default: the embedded one).

    ``method`` (the ``--method`` shortcut) switches the method; when it differs from the file's,
    the file's method section (options, lr) is dropped, since it belongs to the other method.
    """
    path = Path(path) if path else DEFAULT_CONFIG
    if not path.exists():
        raise ConfigError(f"config file {path} does not exist")
    with open(path) as fh:
        raw = yaml.safe_load(fh) or {}
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: top level must be a mapping")
    file_method = (raw.get("method") or {}).get("name", MethodConfig.name)
    if method and file_method != method:
        raw["method"] = {"name": method}
    over = (overrides if isinstance(overrides, dict) else parse_overrides(overrides)) if overrides else {}
    if over:
        raw = merge(raw, over)
    if "name" not in over:
        raw = _renamed_for_method(raw, file_method)
    raw = _expand_env(raw)
    try:
        cfg = _from_dict(ExperimentConfig, raw, "")
    except ConfigError as exc:
        raise ConfigError(f"{path}: {exc}") from None
    cfg.validate()
    return _without_credentials(cfg)


def _renamed_for_method(raw: dict[str, Any], file_method: str) -> dict[str, Any]:
    """A run of another method than the file's (``--method``, ``method.name=``) gets a name that
    says so: the file method's token in ``name`` is replaced (coin-synth-modalprompt ->
    coin-synth-lora), or the method is appended. The name picks the run directory and the MLflow
    experiment; a ``name=`` override is kept as given."""
    method = (raw.get("method") or {}).get("name", MethodConfig.name)
    name = raw.get("name")
    if method == file_method or not isinstance(name, str) or not isinstance(method, str):
        return raw
    parts = name.split("-")
    if file_method in parts:
        parts[parts.index(file_method)] = method
        return {**raw, "name": "-".join(parts)}
    return {**raw, "name": f"{name}-{method}"}


def config_from_dict(raw: dict[str, Any]) -> ExperimentConfig:
    cfg = _from_dict(ExperimentConfig, raw, "")
    cfg.validate()
    return _without_credentials(cfg)


def _without_credentials(cfg: ExperimentConfig) -> ExperimentConfig:
    """Credentials in ``tracking.uri`` move to MLflow's environment variables
    (``pipeline.redaction``): the config, hence the run directory and every sub-run, never holds
    them."""
    from pipeline.redaction import strip_tracking_credentials

    cfg.tracking.uri = strip_tracking_credentials(cfg.tracking.uri)
    return cfg
