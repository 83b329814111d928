"""Ray Tune sweeps (the stages/tune/ package): search-space syntax, the method's default space,
objective/mode, best-config round trip, the dry run, the ``tune --help`` epilog, and real sweeps.

Default tier: pure functions, the CLI dry run, and one real Tune sweep on the real Ray runtime
whose trials run ``ScriptedPipeline`` (a stand-in for PipelineRun, passed to ``run_tune`` as a
class, that holds a CPU per "stage" and reports accuracies set by the trial's k) -- ASHA stops
trials at two different rungs, MLflow nesting, results table, plot, best config, no placement
group left behind.

Slow tier (``-m slow``): the real stage DAG in every trial, through ``python pipeline/main.py
tune``: a small sweep, an ASHA sweep that stops a real trial between stages (and starts the next
trial's Ray Train workers afterwards), and a sweep whose driver is SIGKILLed and then resumed.
"""

from __future__ import annotations

import importlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Callable

import pytest
import yaml

from pipeline.config import ConfigError, config_from_dict, load_config
from pipeline.methods.registry import method_class, registered_methods
from stages.tune import (
    Param,
    Sweep,
    apply_values,
    best_config_yaml,
    best_row,
    parse_param,
    parse_space,
    report_metrics,
    resolve_objective,
    run_tune,
    trial_bundle,
    trial_count,
    tune_help_epilog,
)
from tests.helpers import SMALL

ROOT = Path(__file__).resolve().parents[1]
PY = sys.executable
TINY = [*SMALL, "resources.object_store_mb=200"]  # the reduced embedded default


# ----------------------------------------------------------------------------------------------
# Search space, objective, resources
# ----------------------------------------------------------------------------------------------
def test_every_space_form_parses_to_a_tune_domain():
    from ray.tune.search.sample import Categorical, Float, Integer

    params = {p.key: p for p in parse_space({
        "k": {"choice": [1, 2, 3, 4]}, "M": {"grid": [5, 10, 20]}, "temperature": {"loguniform": [0.01, 1.0]},
        "lam": {"uniform": [0.3, 0.7]}, "fuse_all_until": {"randint": [1, 3]}, "train.lr": 0.003,
    })}
    assert params["k"].path == "method.options.k" and params["train.lr"].path == "train.lr"
    assert isinstance(params["k"].domain("random"), Categorical)
    assert params["k"].domain("grid") == {"grid_search": [1, 2, 3, 4]}  # search: grid enumerates choices
    assert params["M"].domain("random") == {"grid_search": [5, 10, 20]}
    temp = params["temperature"].domain("random")
    assert isinstance(temp, Float) and (temp.lower, temp.upper) == (0.01, 1.0)
    assert isinstance(params["lam"].domain("random"), Float)
    ints = params["fuse_all_until"].domain("random")
    assert isinstance(ints, Integer) and (ints.lower, ints.upper) == (1, 4)  # inclusive [1, 3]
    assert params["train.lr"].domain("random") == 0.003
    assert {(p.kind) for p in params.values()} == {"choice", "grid", "loguniform", "uniform", "randint", "value"}
    assert trial_count(list(params.values()), "random", 2) == 2 * 3
    assert trial_count(list(params.values())[:2], "grid", 1) == 4 * 3


def test_empty_space_is_the_default_modalprompt_space_with_hard_top_k(tmp_path):
    params = parse_space({}, method="modalprompt")
    assert [p.key for p in params] == list(method_class("modalprompt").sweep_space) == ["k", "M", "temperature"]
    assert 0.0 in params[2].values  # temperature 0 = the paper's hard top-k
    sweep = Sweep.from_config(load_config(), tmp_path)  # the embedded default config has no tune.space
    assert [(p.key, p.path, p.kind) for p in sweep.params] == [
        ("k", "method.options.k", "choice"), ("M", "method.options.M", "choice"),
        ("temperature", "method.options.temperature", "choice")]
    assert [p.values for p in sweep.params] == [(1, 2, 3, 4), (5, 10, 20), (0.0, 0.1, 1.0)]


def test_the_default_space_is_the_method_classes_own(monkeypatch, tmp_path):
    import stages.tune

    assert not hasattr(stages.tune, "DEFAULT_SPACE") and not hasattr(stages.tune, "DEFAULT_PIPELINE")
    cls = method_class("modalprompt")
    monkeypatch.setattr(cls, "sweep_space", {"M": {"grid": [7, 9]}, "train.lr": 0.01})
    sweep = Sweep.from_config(load_config(), tmp_path)
    assert [(p.key, p.kind, p.values) for p in sweep.params] == [("M", "grid", (7, 9)), ("train.lr", "value", (0.01,))]
    # a space given in the config (or as an override) replaces the method's default entirely
    given = Sweep.from_config(load_config(None, ["tune.space={k: {grid: [1, 2]}}"]), tmp_path)
    assert [p.key for p in given.params] == ["k"]
    lora = Sweep.from_config(load_config(None, method="lora"), tmp_path)  # LoRA's own: rank, train.lr
    assert [(p.key, p.path, p.kind) for p in lora.params] == [
        ("rank", "method.options.rank", "choice"), ("train.lr", "train.lr", "loguniform")]


def test_every_registered_default_space_is_valid_or_the_sweep_needs_a_space(tmp_path):
    names = registered_methods()
    assert {"modalprompt", "lora", "ewc", "zeroshot", "multitask"} <= set(names)
    for name in names:
        cfg = load_config(None, method=name)
        declared = dict(getattr(method_class(name), "sweep_space", None) or {})
        if declared:
            assert [p.key for p in Sweep.from_config(cfg, tmp_path).params] == list(declared), name
            continue
        with pytest.raises(ConfigError, match=f"tune.space: method {name!r} declares no default sweep space") as err:
            Sweep.from_config(cfg, tmp_path)
        assert "tune.space={" in str(err.value) and "--help" in str(err.value)  # says how to give one
        assert len(Sweep.from_config(load_config(None, ["tune.space={train.lr: {choice: [0.1, 0.2]}}"], method=name),
                                     tmp_path).params) == 1  # with a space, the method sweeps
    with pytest.raises(ConfigError, match="tune.space: empty"):
        parse_space({})  # no method, no default


def test_a_sweep_without_a_space_of_a_method_without_one_is_refused_before_anything_runs(tmp_path, capsys):
    for dry_run in (True, False):
        with pytest.raises(ConfigError, match="method 'zeroshot' declares no default sweep space"):
            run_tune(load_config(None, method="zeroshot"), tmp_path / "sweep", dry_run=dry_run)
    assert not (tmp_path / "sweep").exists()
    assert run_tune(load_config(), tmp_path / "sweep", dry_run=True) == 0
    out = capsys.readouterr().out
    assert "Search space (key -> config path, domain; modalprompt's default, tune.space is empty):" in out
    assert "k              -> method.options.k" in out and "choice [0.0, 0.1, 1.0]" in out
    with pytest.raises(TypeError, match="pipeline must be a class"):
        run_tune(load_config(), tmp_path / "sweep", pipeline="stages.runner:PipelineRun")  # no module strings
    assert not (tmp_path / "sweep").exists()


def test_the_help_epilog_explains_the_space_syntax_and_shows_the_default_spaces():
    text = tune_help_epilog()  # the method of pipeline/configs/default.yaml: modalprompt
    assert load_config(None).method.name == "modalprompt"
    for entry in ("{choice: [1, 2, 3, 4]}", "{grid: [5, 10, 20]}", "{uniform: [0.3, 0.7]}",
                  "{loguniform: [0.01, 1.0]}", "{randint: [1, 3]}", "train.lr: 0.003"):
        assert entry in text, entry  # one example of every form
    assert "both included" in text and "the same in every trial" in text
    assert "Keys without a dot are method options" in text and "dotted keys are config paths" in text
    assert "replaces the" in text and "method's default space" in text and "override" in text
    for name in ("Avg (max)", "Last", "B (min)", "BWT", "train_loss (min)"):
        assert name in text
    assert "random" in text and "optuna" in text and "fifo" in text and "asha" in text
    own = text.split("default space of modalprompt")[1].split("\n\n")[0]
    assert "k: {choice: [1, 2, 3, 4]}" in own and "M: {choice: [5, 10, 20]}" in own
    assert "temperature: {choice: [0.0, 0.1, 1.0]}" in own
    listed = text.split("default spaces of the registered methods")[1]
    lines = {ln.split()[0]: ln for ln in listed.splitlines()[1:] if ln.startswith("  ") and ln.split()}
    assert {"modalprompt", "lora", "ewc", "zeroshot", "multitask"} <= set(lines)
    assert "rank: {choice: [4, 8, 16]}" in lines["lora"] and "loguniform" in lines["lora"]
    assert "none" in lines["zeroshot"] and "none" in lines["multitask"]
    assert "k: {choice" in lines["modalprompt"] and "temperature" in lines["modalprompt"]
    lora = tune_help_epilog("lora").split("default space of lora")[1].split("\n\n")[0]
    assert "rank: {choice: [4, 8, 16]}" in lora and "train.lr: {loguniform" in lora
    assert "declares no default space" in tune_help_epilog("zeroshot")


@pytest.mark.parametrize("key, spec, message", [
    ("k", [1, 2], "tune.space.k: a bare list is ambiguous"),
    ("k", {"pick": [1, 2]}, "tune.space.k: expected one of"),
    ("k", {"choice": []}, "tune.space.k: choice needs a non-empty list"),
    ("k", {"choice": [[1], 2]}, "tune.space.k: choice values must be scalars"),
    ("temperature", {"loguniform": [0.0, 1.0]}, "tune.space.temperature: loguniform needs 0 < low"),
    ("temperature", {"uniform": [1.0, 0.5]}, "tune.space.temperature: uniform needs low < high"),
    ("temperature", {"uniform": [0.1]}, r"tune.space.temperature: uniform needs \[low, high\]"),
    ("k", {"randint": [1.5, 3]}, "tune.space.k: randint needs integers"),
    ("", {"choice": [1]}, "tune.space.: parameter names"),
])
def test_malformed_space_entries_name_the_key(key, spec, message):
    with pytest.raises(ConfigError, match=message):
        parse_param(key, spec)


@pytest.mark.parametrize("space, search, message", [
    ({"k": {"choice": [1]}, "method.options.k": {"choice": [2]}}, "random", "tune.space.method.options.k: same parameter"),
    ({"temperature": {"uniform": [0.0, 1.0]}}, "grid", "tune.space.temperature: search 'grid' enumerates"),
    ({"k": {"grid": [1, 2]}}, "optuna", "tune.space.k: grid is not supported by search 'optuna'"),
    ({"k": 2}, "random", "tune.space: nothing to sweep"),
])
def test_space_level_errors_name_the_key(space, search, message):
    with pytest.raises(ConfigError, match=message):
        parse_space(space, search)


@pytest.mark.parametrize("override, message", [
    ("tune.space={k: {choice: [0, 1]}}", r"tune.space.k: value 0 is invalid: modalprompt: k and M must be >= 1"),
    ("tune.space={temprature: {choice: [0.1]}}", "tune.space.temprature: method 'modalprompt' has no option 'temprature'"),
    ("tune.space={k: {uniform: [1, 3]}}", "tune.space.k: modalprompt option 'k' is an integer"),
    ("tune.space={temperature: {choice: [-1.0]}}", "tune.space.temperature: value -1.0 is invalid"),
    ("tune.space={train.lrr: {choice: [0.1]}}", "tune.space.train.lrr: value 0.1 -> train.lrr: unknown key"),
    ("tune.space={train.batch_size: {loguniform: [8, 32]}}", "tune.space.train.batch_size: value 8.0 -> train.batch_size: expected int"),
    ("tune.objective=accuracy", "tune.objective: 'accuracy' is not one of"),
    ("tune.search=bayes", "tune.search: 'bayes'"),
    ("tune.scheduler=hyperband", "tune.scheduler: 'hyperband'"),
    ("tune.overrides={train.lrr: 1}", "tune.overrides: train.lrr: unknown key"),
])
def test_space_values_are_checked_against_the_config_and_the_method(override, message, tmp_path):
    cfg = load_config(None, [override])
    with pytest.raises(ConfigError, match=message):
        Sweep.from_config(cfg, tmp_path)


def test_optuna_is_optional():
    cfg = load_config(None, ["tune.search=optuna"])
    try:
        import optuna  # noqa: F401
    except ImportError:
        with pytest.raises(ConfigError, match="tune.search: 'optuna' needs the optuna package"):
            Sweep.from_config(cfg, Path("/tmp/x"))
    else:
        Sweep.from_config(cfg, Path("/tmp/x"))


@pytest.mark.parametrize("name, metric, mode", [
    ("Avg", "avg", "max"), ("avg", "avg", "max"), ("Last", "last", "max"), ("B", "B", "min"), ("b", "B", "min"),
    ("M", "M", "max"), ("ACC", "acc", "max"), ("MAA", "maa", "max"), ("BWT", "bwt", "max"),
    ("LA", "la", "max"), ("train_loss", "train_loss", "min"),
])
def test_objective_mode_follows_the_metric(name, metric, mode):
    obj = resolve_objective(name)
    assert (obj.metric, obj.mode) == (metric, mode)


def test_first_task_report_uses_the_documented_stand_ins():
    from pipeline.scoring.metrics import all_metrics

    one = {k: v for k, v in all_metrics([[40.0]]).items() if isinstance(v, float)}
    assert "avg" not in one and "B" not in one  # undefined after one task
    got = {n: report_metrics(1, one, resolve_objective(n), 3) for n in ("avg", "B", "M", "bwt", "last", "maa")}
    assert got["avg"]["objective"] == 40.0 and got["avg"]["objective_defined"] == 0  # Avg -> Last
    assert got["M"]["objective"] == 40.0 and got["M"]["objective_defined"] == 0
    assert got["B"]["objective"] == 0.0 and got["bwt"]["objective"] == 0.0  # nothing forgotten yet
    assert got["last"]["objective_defined"] == 1 and got["maa"]["objective"] == 40.0
    assert got["avg"]["tasks_learned"] == 1 and got["avg"]["n_tasks"] == 3
    two = {k: v for k, v in all_metrics([[40.0], [30.0, 50.0]]).items() if isinstance(v, float)}
    rep = report_metrics(2, two, resolve_objective("avg"), 3)
    assert rep["objective"] == 30.0 and rep["objective_defined"] == 1
    assert report_metrics(2, two, resolve_objective("B"), 3)["objective"] == 10.0


def test_the_trial_function_requests_no_cpu_by_default():
    assert trial_bundle(load_config()) == {"memory": float(1 << 20)}
    assert trial_bundle(load_config(None, ["tune.cpus_per_trial=0.5", "tune.gpus_per_trial=1"])) == {"CPU": 0.5, "GPU": 1.0}


# ----------------------------------------------------------------------------------------------
# Trial configs and the best config
# ----------------------------------------------------------------------------------------------
def test_trial_config_applies_overrides_then_the_trial_values(tmp_path):
    cfg = load_config(None, ["tune.space={k: {choice: [1, 2]}, train.lr: 0.01}",
                             "tune.overrides={train: {epochs: 1}, method.options.M: 5}"])
    sweep = Sweep.from_config(cfg, tmp_path)
    tree = sweep.trial_config({"k": 2, "train.lr": 0.01}, tracking={"uri": "sqlite:////x.db"})
    assert tree["method"]["options"] == {"k": 2, "M": 5, "temperature": 0.0}
    assert tree["train"]["epochs"] == 1.0 and tree["train"]["lr"] == 0.01
    assert tree["tracking"]["uri"] == "sqlite:////x.db"
    assert apply_values({"a": {"b": 1}}, {"a.c": 2}) == {"a": {"b": 1, "c": 2}}


def test_best_config_yaml_round_trips_through_load_config(tmp_path):
    cfg = load_config(None, ["tasks=[ScienceQA,TextVQA]", "tune.space={k: {choice: [1, 2]}, M: {grid: [5, 10]}, "
                             "temperature: {loguniform: [0.01, 1.0]}}", "tune.overrides={train.epochs: 1}"])
    sweep = Sweep.from_config(cfg, tmp_path)
    rows = [
        {"trial": "a_00000", "status": "completed", "k": 1, "M": 5, "temperature": 0.02, "tasks_learned": 2, "objective": 30.0},
        {"trial": "a_00001", "status": "completed", "k": 2, "M": 10, "temperature": 0.5, "tasks_learned": 2, "objective": 35.0},
        {"trial": "a_00002", "status": "stopped", "k": 2, "M": 5, "temperature": 0.1, "tasks_learned": 1, "objective": 90.0},
        {"trial": "a_00003", "status": "error", "k": 2, "M": 5, "temperature": 0.1, "tasks_learned": None, "objective": None},
    ]
    best = best_row(rows, sweep.objective)
    assert best["trial"] == "a_00001"  # a stopped trial's early value does not beat finished trials
    assert best_row(rows[:2], resolve_objective("B"))["trial"] == "a_00000"
    path = tmp_path / "best_config.yaml"
    path.write_text(best_config_yaml(sweep, best))
    assert path.read_text().startswith("# Best configuration")
    loaded = load_config(path)
    assert loaded.method.options == {"k": 2, "M": 10, "temperature": 0.5}
    assert loaded.train.epochs == 1.0 and loaded.tasks == ["ScienceQA", "TextVQA"]
    assert loaded.tracking == cfg.tracking  # not the sweep's store
    assert loaded.to_dict() == config_from_dict(yaml.safe_load(path.read_text())).to_dict()


def test_dry_run_prints_space_objective_scheduler_and_trial_count(tmp_path):
    proc = subprocess.run(
        [PY, "pipeline/main.py", "tune", "--dry-run", "--output", str(tmp_path / "sweep"), "tune.scheduler=asha",
         "tune.grace_period=1", "tune.objective=B", "tune.space={k: {grid: [1, 2]}, temperature: {loguniform: [0.01, 1.0]}}"],
        cwd=ROOT, capture_output=True, text=True, timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = proc.stdout
    assert "k              -> method.options.k" in out and "grid [1, 2]" in out and "loguniform [0.01, 1.0]" in out
    assert "Objective: B (metric 'B', mode min)" in out and "0 is reported" in out
    assert "num_samples 4 x grid 2 = 8 trial(s)" in out
    assert "ASHA (time_attr tasks_learned, max_t 8, grace_period 1" in out and "[1, 2, 4]" in out
    assert not (tmp_path / "sweep").exists()  # a dry run creates nothing
    bad = subprocess.run([PY, "pipeline/main.py", "tune", "--dry-run", "tune.space={k: {choice: [0]}}"],
                         cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert bad.returncode == 2 and "tune.space.k" in bad.stderr


# ----------------------------------------------------------------------------------------------
# A real Tune sweep with a scripted pipeline (fast)
# ----------------------------------------------------------------------------------------------
class ScriptedPipeline:
    """Stand-in for ``stages.runner.PipelineRun`` (same constructor and ``run()``): one MLflow run
    nested under the sweep, per task one 1-CPU Ray task (as a stage's workers would hold) and one
    ``on_evaluated`` call whose accuracies are 10 x the trial's k."""

    def __init__(self, cfg, output: Path, log: Callable[[str], None] = print, *,
                 on_evaluated: Callable[[int, dict[str, float]], None] | None = None,
                 mlflow_parent: str | None = None) -> None:
        self.cfg, self.output, self.on_evaluated, self.mlflow_parent = cfg, Path(output), on_evaluated, mlflow_parent

    def run(self) -> dict[str, Any]:
        import ray

        from pipeline.scoring.metrics import all_metrics
        from stages.tracking import Tracker

        self.output.mkdir(parents=True, exist_ok=True)
        tracker = Tracker(self.output, uri=self.cfg.tracking.uri, experiment=self.cfg.tracking.experiment)
        parent = tracker.start_parent(self.output.name, {"method.options.k": str(self.cfg.method.options["k"])},
                                      {"mlflow.parentRunId": self.mlflow_parent or ""})
        acc = 10.0 * self.cfg.method.options["k"]
        rows: list[list[float]] = []
        for t, task in enumerate(self.cfg.tasks, 1):
            assert ray.get(ray.remote(num_cpus=1)(lambda: 1).remote()) == 1
            rows.append([acc] * t)
            metrics = {f"acc/{x}": acc for x in self.cfg.tasks[:t]}
            metrics |= {k: v for k, v in all_metrics(rows).items() if isinstance(v, float)}
            tracker.log_metrics(parent, metrics, step=t)
            (self.output / f"evaluated-{t}").write_text(json.dumps(metrics))
            self.on_evaluated(t, metrics)
        (self.output / "results.json").write_text(json.dumps({"metrics": metrics}))
        tracker.end(parent)
        return {"metrics": metrics}


def _importable(cls: type) -> type:
    """``cls`` as Ray's workers can import it (the class is pickled by reference): pytest imports
    this file as the top-level ``test_tune`` (tests/ put on the driver's sys.path only), while
    ``tests.test_tune`` is importable from the repository root, the workers' PYTHONPATH."""
    return getattr(importlib.import_module("tests.test_tune"), cls.__qualname__)


def _mlflow_runs(uri: str) -> tuple[Any, list[Any]]:
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=uri)
    exps = client.search_experiments()
    return client, client.search_runs([e.experiment_id for e in exps], max_results=1000)


def test_scripted_sweep_asha_stops_trials_at_two_rungs_and_leaves_nothing_behind(ray_session, tmp_path):
    cfg = load_config(None, [
        "tasks=[ScienceQA,TextVQA,ImageNet]", "tune.space={k: {grid: [3, 1, 2]}}", "tune.num_samples=1",
        "tune.scheduler=asha", "tune.grace_period=1", "tune.reduction_factor=2", "tune.objective=avg",
    ])
    out = tmp_path / "sweep"
    t0 = time.time()
    code = run_tune(cfg, out, pipeline=_importable(ScriptedPipeline))
    wall = time.time() - t0
    assert code == 0
    rows = {r["k"]: r for r in json.loads((out / "results.json").read_text())}
    # k=3 (avg 30) runs all 3 tasks; k=1 (10) is below the rung-1 median; k=2 (20) passes rung 1
    # (median of 30, 10, 20) and is stopped at rung 2 (below the median of 30 and 20)
    assert {k: (r["status"], r["tasks_learned"]) for k, r in rows.items()} == {
        3: ("completed", 3), 1: ("stopped", 1), 2: ("stopped", 2)}
    assert not (Path(rows[1]["run_dir"]) / "evaluated-2").exists()  # stopped between "stages"
    assert rows[3]["objective"] == 30.0 and rows[1]["objective"] == 10.0  # t=1: Last stands in for Avg
    summary = json.loads((out / "sweep.json").read_text())
    assert summary["best"]["k"] == 3 and summary["completed"] == 1 and summary["stopped"] == 2
    assert summary["leaks"]["placement_groups_left"] == []
    import ray

    assert ray.available_resources().get("CPU") == 2.0  # every CPU is free again
    assert load_config(out / "best_config.yaml").method.options["k"] == 3
    assert {"results.csv", "results.json", "objective_vs_params.png", "best_config.yaml", "sweep_config.yaml",
            "mlflow.db", "tune", "trials"} <= {p.name for p in out.iterdir()}

    client, runs = _mlflow_runs(f"sqlite:///{out / 'mlflow.db'}")
    sweep_run = next(r for r in runs if r.data.tags.get("kind") == "sweep")
    assert sweep_run.info.status == "FINISHED" and sweep_run.data.tags["best_trial"] == summary["best"]["trial"]
    trials = [r for r in runs if r.data.tags.get("mlflow.parentRunId") == sweep_run.info.run_id]
    assert len(trials) == 3
    status = {r.data.params["method.options.k"]: (r.info.status, r.data.tags["tune.status"]) for r in trials}
    assert status == {"3": ("FINISHED", "completed"), "1": ("KILLED", "stopped"), "2": ("KILLED", "stopped")}
    full = next(r for r in trials if r.data.params["method.options.k"] == "3")
    assert len(client.get_metric_history(full.info.run_id, "acc/ScienceQA")) == 3
    arts = {a.path for a in client.list_artifacts(sweep_run.info.run_id)}
    assert {"results.csv", "results.json", "objective_vs_params.png", "best_config.yaml", "sweep.json"} <= arts
    print(f"scripted ASHA sweep: {wall:.1f}s")


def test_a_non_empty_directory_is_refused_and_resume_needs_a_sweep(tmp_path):
    (tmp_path / "x").mkdir()
    (tmp_path / "x" / "file").write_text("")
    with pytest.raises(ConfigError, match="exists and is not empty but holds no sweep"):
        run_tune(load_config(), tmp_path / "x")
    with pytest.raises(ConfigError, match="holds no sweep to resume"):
        run_tune(load_config(), tmp_path / "x", resume=True)
    with pytest.raises(ConfigError, match="--resume needs --output"):
        run_tune(load_config(), None, resume=True)


class _RayInitTimeout(RuntimeError):
    """Stands in for ``ray.init`` dying (node startup timeout) after the directory was set up."""


class _TunerReached(Exception):
    def __init__(self, restore: bool, pipeline: Any = None) -> None:
        super().__init__(restore)
        self.restore, self.pipeline = restore, pipeline


def _stub_ray(monkeypatch, crash_in_init: bool) -> None:
    """No Ray at all: ``init_ray`` either crashes (the reviewer's repro) or does nothing, and the
    Tuner is replaced by a probe that records whether the sweep would be restored or started."""
    import stages.runner
    import stages.tune.driver

    def init_ray(cfg, stop_notice=None):
        if crash_in_init:
            raise _RayInitTimeout("The current node timed out during startup")

    def tuner(sweep, payload, restore, pipeline):
        raise _TunerReached(restore, pipeline)

    monkeypatch.setattr(stages.runner, "init_ray", init_ray)
    monkeypatch.setattr(stages.tune.driver, "_warn_oversubscription", lambda cfg: None)
    monkeypatch.setattr(stages.tune.driver, "_alive_placement_groups", lambda: set())
    monkeypatch.setattr(stages.tune.driver, "_tuner", tuner)


def _snapshot(d: Path) -> dict[str, bytes]:
    return {str(p.relative_to(d)): p.read_bytes() for p in sorted(d.rglob("*")) if p.is_file()}


def test_a_sweep_that_crashed_in_ray_init_can_be_started_again_and_resumed(monkeypatch, tmp_path, capsys):
    from stages.tune import sweep_state

    cfg = load_config(None, ["tune.space={k: {grid: [1, 2]}}", "tune.num_samples=1"])
    out = tmp_path / "tune1"
    _stub_ray(monkeypatch, crash_in_init=True)
    with pytest.raises(_RayInitTimeout):  # the reviewer's repro: the directory is set up, then Ray dies
        run_tune(cfg, out)
    assert (out / "sweep_config.yaml").exists() and not (out / "tune").exists()
    assert sweep_state(out) == "not_started"

    _stub_ray(monkeypatch, crash_in_init=False)
    other = load_config(None, ["tune.space={k: {grid: [1, 2, 3]}}", "tune.num_samples=1"])
    with pytest.raises(ConfigError, match="holds a sweep that never started, with a different config") as err:
        run_tune(other, out)  # a different sweep must not take the stored one's place
    assert "--resume --output" in str(err.value)
    assert load_config(out / "sweep_config.yaml").tune.space == {"k": {"grid": [1, 2]}}

    with pytest.raises(_TunerReached) as reached:  # the same command again starts the sweep
        run_tune(cfg, out)
    assert reached.value.restore is False
    from stages.runner import PipelineRun

    assert reached.value.pipeline is PipelineRun  # pipeline=None: the real stage DAG
    assert "never started" in capsys.readouterr().out

    with pytest.raises(_TunerReached) as reached:  # --resume starts it from the stored config
        run_tune(load_config(), out, resume=True)
    assert reached.value.restore is False
    printed = capsys.readouterr().out
    assert "never started" in printed and "starting it from its stored config" in printed
    assert "k              -> method.options.k" in printed and "grid [1, 2]" in printed  # the stored space

    client, runs = _mlflow_runs(f"sqlite:///{out / 'mlflow.db'}")
    assert len([r for r in runs if r.data.tags.get("kind") == "sweep"]) == 1  # every attempt re-attached


def test_a_directory_with_tune_state_or_trial_results_is_never_restarted(monkeypatch, tmp_path):
    from stages.tune import sweep_state

    _stub_ray(monkeypatch, crash_in_init=False)
    cfg = load_config(None, ["tune.space={k: {grid: [1, 2]}}", "tune.num_samples=1"])
    text = yaml.safe_dump(cfg.to_dict(), sort_keys=False)

    restorable = tmp_path / "restorable"  # Tune's experiment state is there: resume only
    (restorable / "tune").mkdir(parents=True)
    (restorable / "sweep_config.yaml").write_text(text)
    (restorable / "tune" / "tuner.pkl").write_bytes(b"state")
    assert sweep_state(restorable) == "restorable"
    before = _snapshot(restorable)
    with pytest.raises(ConfigError, match="holds a sweep with Tune experiment state.*resume it with --resume"):
        run_tune(cfg, restorable)
    assert _snapshot(restorable) == before
    with pytest.raises(_TunerReached) as reached:
        run_tune(load_config(), restorable, resume=True)
    assert reached.value.restore is True

    orphans = tmp_path / "orphans"  # trial results but nothing to restore them from: left alone
    (orphans / "trials" / "abc_00000").mkdir(parents=True)
    (orphans / "trials" / "abc_00000" / "results.json").write_text("{}")
    (orphans / "sweep_config.yaml").write_text(text)
    assert sweep_state(orphans) == "trials_only"
    before = _snapshot(orphans)
    for resume in (False, True):
        with pytest.raises(ConfigError, match="holds trial results .* no Tune experiment state .* another directory"):
            run_tune(cfg, orphans, resume=resume)
    assert _snapshot(orphans) == before

    with pytest.raises(ConfigError, match="does not exist: it holds no sweep to resume"):
        run_tune(cfg, tmp_path / "missing", resume=True)
    assert not (tmp_path / "missing").exists()


# ----------------------------------------------------------------------------------------------
# Slow tier: the real stage DAG in every trial, through the CLI
# ----------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory) -> Path:
    """One CoIN-synth benchmark + pre-trained tiny base shared by the module's sweeps."""
    return tmp_path_factory.mktemp("tune-cache")


def _env() -> dict[str, str]:
    env = dict(os.environ, PYTHONUNBUFFERED="1", HF_HUB_OFFLINE="1", TUNE_GLOBAL_CHECKPOINT_S="2")
    env.pop("MLFLOW_TRACKING_URI", None)
    env.pop("RAY_ADDRESS", None)
    return env


def _tune_cmd(out: Path, cache: Path, *extra: str, resume: bool = False) -> list[str]:
    return [PY, "pipeline/main.py", "tune", "--output", str(out), *(["--resume"] if resume else []),
            f"cache_dir={cache}", *TINY, *extra]


def _tune(out: Path, cache: Path, *extra: str, resume: bool = False, timeout: int = 1800) -> subprocess.CompletedProcess:
    return subprocess.run(_tune_cmd(out, cache, *extra, resume=resume), cwd=ROOT, env=_env(),
                          capture_output=True, text=True, timeout=timeout)


def _stage_markers(run_dir: Path) -> dict[str, float]:
    return {str(p.relative_to(run_dir)): p.stat().st_mtime for p in (run_dir / "stages").rglob("DONE.json")}


@pytest.mark.slow
def test_small_real_sweep_nests_every_trial_under_the_sweep_run(tmp_path, cache_dir):
    out = tmp_path / "sweep"
    t0 = time.time()
    proc = _tune(out, cache_dir, "tasks=[ScienceQA,TextVQA]", "tune.space={k: {grid: [1, 2]}, M: 5, temperature: 0.1}",
                 "tune.num_samples=1")
    wall = time.time() - t0
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    print(f"small real sweep (2 trials x 2 tasks): {wall:.0f}s")
    assert "Best trial" in proc.stdout and "best_config.yaml" in proc.stdout
    rows = json.loads((out / "results.json").read_text())
    assert sorted(r["k"] for r in rows) == [1, 2] and all(r["status"] == "completed" for r in rows)
    for r in rows:
        res = json.loads((Path(r["run_dir"]) / "results.json").read_text())
        assert res["method_options"] == {"k": r["k"], "M": 5, "temperature": 0.1}
        assert r["objective"] == pytest.approx(res["metrics"]["avg"]) and r["tasks_learned"] == 2
    assert json.loads((out / "sweep.json").read_text())["leaks"]["placement_groups_left"] == []

    client, runs = _mlflow_runs(f"sqlite:///{out / 'mlflow.db'}")
    sweep_run = next(r for r in runs if r.data.tags.get("kind") == "sweep")
    trials = [r for r in runs if r.data.tags.get("mlflow.parentRunId") == sweep_run.info.run_id]
    assert len(trials) == 2 and all(t.info.status == "FINISHED" for t in trials)
    for t in trials:
        assert {"avg", "last", "B", "M", "acc/ScienceQA", "acc/TextVQA"} <= set(t.data.metrics)
        stages = [r for r in runs if r.data.tags.get("mlflow.parentRunId") == t.info.run_id]
        assert len(stages) == 8  # data, base, (train, freeze, eval) x 2
    arts = {a.path for a in client.list_artifacts(sweep_run.info.run_id)}
    assert {"results.csv", "objective_vs_params.png", "best_config.yaml"} <= arts

    best = load_config(out / "best_config.yaml")  # ready to run: the CLI accepts it
    assert best.method.options["M"] == 5 and best.tasks == ["ScienceQA", "TextVQA"]
    dry = subprocess.run([PY, "pipeline/main.py", "--config", str(out / "best_config.yaml"), "--dry-run"],
                         cwd=ROOT, env=_env(), capture_output=True, text=True, timeout=600)
    assert dry.returncode == 0, dry.stderr[-3000:]


@pytest.mark.slow
def test_asha_stops_a_real_trial_between_stages_and_the_next_trial_gets_its_cpus(tmp_path, cache_dir):
    # Accuracies of the tiny CPU model at these sizes are all 0 (it emits nothing), so the
    # trials are ranked on the training loss: method.lr 1e-9 barely trains, 0.05 does.
    out = tmp_path / "sweep"
    proc = _tune(out, cache_dir, "tasks=[ScienceQA,TextVQA]", "train.epochs=3", "tune.objective=train_loss",
                 "tune.space={method.lr: {grid: [0.05, 1.0e-9, 0.05]}}", "tune.num_samples=1",
                 "tune.scheduler=asha", "tune.grace_period=1", "tune.reduction_factor=2")
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    rows = json.loads((out / "results.json").read_text())
    by_lr = sorted(rows, key=lambda r: r["trial"])
    assert [r["method.lr"] for r in by_lr] == [0.05, 1e-9, 0.05]
    assert [(r["status"], r["tasks_learned"]) for r in by_lr] == [("completed", 2), ("stopped", 1), ("completed", 2)]
    stopped = Path(by_lr[1]["run_dir"])
    assert sorted(p.name for p in (stopped / "stages").iterdir()) == [
        "00-data", "01-base", "02-train-ScienceQA", "03-freeze-ScienceQA", "04-eval-ScienceQA"]
    assert json.loads((out / "sweep.json").read_text())["leaks"]["placement_groups_left"] == []
    _, runs = _mlflow_runs(f"sqlite:///{out / 'mlflow.db'}")
    stopped_run = next(r for r in runs if r.info.run_id == by_lr[1]["mlflow_run_id"])
    assert stopped_run.info.status == "KILLED" and stopped_run.data.tags["tune.status"] == "stopped"
    assert not [r for r in runs if r.info.status == "RUNNING"]


def _tune_state(out: Path) -> dict[str, str]:
    """{trial id: status} from the newest Tune experiment snapshot in DIR/tune."""
    snaps = sorted((out / "tune").glob("experiment_state-*.json"))
    if not snaps:
        return {}
    try:
        state = json.loads(snaps[-1].read_text())
    except json.JSONDecodeError:
        return {}
    trials = {}
    for entry in state.get("trial_data", []):
        info = json.loads(entry[0]) if isinstance(entry[0], str) else entry[0]
        trials[info["trial_id"]] = info["status"]
    return trials


def _wait(cond: Callable[[], bool], proc: subprocess.Popen, timeout: float, what: str) -> None:
    deadline = time.time() + timeout
    while not cond():
        assert proc.poll() is None, f"sweep ended before {what}: {proc.returncode}"
        assert time.time() < deadline, f"timed out waiting for {what}"
        time.sleep(2)


@pytest.mark.slow
def test_killed_sweep_resumes_without_rerunning_finished_trials(tmp_path, cache_dir):
    out = tmp_path / "sweep"
    extra = ["tasks=[ScienceQA,TextVQA]", "tune.space={k: {grid: [1, 2]}, M: 5}", "tune.num_samples=1"]
    log = open(tmp_path / "first.log", "w")
    proc = subprocess.Popen(_tune_cmd(out, cache_dir, *extra), cwd=ROOT, env=_env(), stdout=log,
                            stderr=subprocess.STDOUT, start_new_session=True)
    try:
        first: list[str] = []

        def first_trial_finished() -> bool:
            done = [t for t, s in _tune_state(out).items() if s == "TERMINATED"]
            first[:] = done
            return bool(done) and (out / "trials" / done[0] / "results.json").exists()

        _wait(first_trial_finished, proc, 1500, "the first trial to finish")
        second = lambda: [d for d in (out / "trials").iterdir() if d.name != first[0]]  # noqa: E731
        _wait(lambda: bool(second()) and (second()[0] / "stages" / "01-base" / "DONE.json").exists(), proc, 600,
              "the second trial's first stages")
    finally:
        os.killpg(proc.pid, signal.SIGKILL)  # the driver and the Ray runtime it started
        proc.wait()
        log.close()
    done_dir, other_dir = out / "trials" / first[0], second()[0]
    before = _stage_markers(done_dir) | {"results.json": (done_dir / "results.json").stat().st_mtime}
    other_before = _stage_markers(other_dir)
    assert not (out / "results.json").exists()

    res = _tune(out, cache_dir, *extra, resume=True)
    assert res.returncode == 0, res.stdout[-4000:] + res.stderr[-4000:]
    rows = {r["trial"]: r for r in json.loads((out / "results.json").read_text())}
    assert set(rows) == {first[0], other_dir.name} and all(r["status"] == "completed" for r in rows.values())
    # the finished trial was not re-run: none of its files were rewritten
    assert _stage_markers(done_dir) | {"results.json": (done_dir / "results.json").stat().st_mtime} == before
    # the interrupted trial skipped the stages it had completed
    after = _stage_markers(other_dir)
    assert all(after[k] == v for k, v in other_before.items()) and len(after) == 8
    _, runs = _mlflow_runs(f"sqlite:///{out / 'mlflow.db'}")
    sweeps = [r for r in runs if r.data.tags.get("kind") == "sweep"]
    assert len(sweeps) == 1 and sweeps[0].info.status == "FINISHED"  # the resumed sweep re-attached
    trials = [r for r in runs if r.data.tags.get("mlflow.parentRunId") == sweeps[0].info.run_id]
    assert len(trials) == 2
