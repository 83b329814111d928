"""Experiment configs: every shipped YAML loads; overrides, errors and the --method shortcut."""

from __future__ import annotations

from pathlib import Path

import pytest

from pipeline.config import CONFIG_DIR, ConfigError, load_config, parse_overrides
from stages.dag import build_dag

SHIPPED = sorted(CONFIG_DIR.glob("*.yaml"))


def test_configs_are_shipped():
    names = {p.name for p in SHIPPED}
    assert {"default.yaml", "coin_llava7b_modalprompt.yaml", "coin_llava7b_lora.yaml"} <= names


@pytest.mark.parametrize("path", SHIPPED, ids=lambda p: p.name)
def test_every_shipped_config_loads_and_builds_a_dag(path: Path, monkeypatch):
    monkeypatch.setenv("COIN_ROOT", "/data/coin")
    cfg = load_config(path)
    assert cfg.tasks
    stages = build_dag(cfg, "sequential")
    assert [s.kind for s in stages[:2]] == ["data", "base"]
    assert len(stages) == 2 + 3 * len(cfg.tasks)


def test_overrides_are_typed_and_nested():
    cfg = load_config(None, ["train.lr=1e-4", "method.options.k=2", "tasks=[ScienceQA, GQA]"])
    assert cfg.train.lr == 1e-4 and cfg.method.options["k"] == 2 and cfg.method.options["M"] == 10
    assert cfg.tasks == ["ScienceQA", "GQA"]
    assert parse_overrides(["a.b=x", "a.c=3"]) == {"a": {"b": "x", "c": 3}}


def test_generic_instructions_option_names_its_own_benchmark_directory():
    from stages.common import synth_root

    default = synth_root(load_config(None))
    gi = load_config(None, ["data.synth.generic_instructions=true"])
    assert gi.data.synth.generic_instructions is True
    assert synth_root(gi) == default + "-gi"  # another corpus, so (via the name) another cached base
    with pytest.raises(ConfigError, match="data.synth.generic_instructions"):
        load_config(None, ["data.synth.generic_instructions=3"])


@pytest.mark.parametrize(
    "override, message",
    [
        (["train.lrr=1"], "train.lrr: unknown key"),
        (["train.batch_size=many"], "train.batch_size: expected int"),
        (["tasks=[ScienceQA, Nope]"], "unknown task"),
        (["data.source=ftp"], "data.source"),
        (["model.kind=huge"], "kind"),
        (["noequals"], "expected key=value"),
        # method options are checked at load time, not on a training worker minutes later
        (["method.options.kk=2"], r"method.options: method 'modalprompt': unknown option\(s\) \['kk'\]"),
        (["method.options.k=0"], "method.options: modalprompt: k and M must be >= 1"),
        (["method.name=foo"], "method.name: unknown continual method 'foo'"),
        (["method.name=zeroshot"], r"method.options: method 'zeroshot': takes no options"),
    ],
)
def test_bad_config_errors_name_the_key(override, message):
    with pytest.raises(ConfigError, match=message):
        load_config(None, override)


def test_method_shortcut_drops_the_other_methods_section():
    cfg = load_config(None, method="lora")
    assert cfg.method.name == "lora" and cfg.method.options == {} and cfg.method.lr is None
    same = load_config(None, method="modalprompt")
    assert same.method.options["k"] == 3
    assert load_config(None, ["method.options.rank=4"], method="lora").method.options == {"rank": 4}


def test_a_run_of_another_method_is_named_for_it():
    # the name picks the run directory and the MLflow experiment: a LoRA run must not say modalprompt
    assert load_config(None).name == "coin-synth-modalprompt"
    assert load_config(None, method="lora").name == "coin-synth-lora"
    assert load_config(None, method="modalprompt").name == "coin-synth-modalprompt"
    assert load_config(None, method="zeroshot").name == "coin-synth-zeroshot"
    assert load_config(None, ["name=mine"], method="lora").name == "mine"  # an explicit name is kept
    real = load_config(CONFIG_DIR / "coin_llava7b_modalprompt.yaml", method="lora")
    assert real.name == "coin-llava7b-lora"
    tune = load_config(CONFIG_DIR / "tune_small.yaml", method="lora")
    assert tune.name == "coin-synth-lora-tune-small"
    assert load_config(None, method="lora").fingerprint() != load_config(None, ["name=coin-synth-modalprompt"],
                                                                          method="lora").fingerprint()


def test_env_vars_expand_and_fingerprint_follows_config(monkeypatch):
    monkeypatch.setenv("COIN_ROOT", "s3://bucket/coin")
    cfg = load_config(CONFIG_DIR / "coin_llava7b_modalprompt.yaml")
    assert cfg.data.root == "s3://bucket/coin"
    assert load_config(None).fingerprint() == load_config(None).fingerprint()
    assert load_config(None).fingerprint() != load_config(None, ["seed=1"]).fingerprint()
    # the isolation row runs beside a run and changes none of its stages: a finished run adds it
    assert load_config(None, ["eval.isolation=true"]).fingerprint() == load_config(None).fingerprint()


def test_overrides_may_follow_options_on_the_command_line():
    from pipeline.main import parse_args

    args = parse_args(["run", "train.lr=1e-3", "--method", "lora", "train.epochs=2", "--output", "x", "seed=3"])
    assert (args.overrides, args.method, args.output) == (["train.lr=1e-3", "train.epochs=2", "seed=3"], "lora", "x")
    assert parse_args(["tune", "--dry-run", "tune.num_samples=2"]).overrides == ["tune.num_samples=2"]
    assert parse_args(["run", "a=1", "--dry-run", "--", "b=2"]).overrides == ["a=1", "b=2"]
    for argv in (["run", "a=1", "--bogus"], ["run", "a=1", "--method", "lora", "noeq"], ["metrics", "m.json", "x=1"]):
        with pytest.raises(SystemExit):
            parse_args(argv)
