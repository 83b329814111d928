"""Checks for cluster/: every YAML/JSON parses, the launch manifests have the fields their tools
need and only reference repository files that exist, and the DeepSpeed configs, filled by the
rule in cluster/README.md, really train a small model with deepspeed.initialize on CPU."""

from __future__ import annotations

import copy
import json
import os
import re
import subprocess
import sys
import textwrap
import time
import tomllib
from pathlib import Path

import pytest
import yaml
from tests.helpers import free_port

ROOT = Path(__file__).resolve().parents[1]
CLUSTER = ROOT / "cluster"
DS_DIR = CLUSTER / "deepspeed"
DS_STAGES = {"zero2.json": 2, "zero3.json": 3, "zero3_offload.json": 3}
RAY_CLUSTER = CLUSTER / "ray-cluster-gpu.yaml"
RAYJOB = CLUSTER / "kuberay-rayjob.yaml"

# Keys the pipeline fills at run time (the fill rule); the shipped JSON must not carry them.
RUNTIME_KEYS = ("train_batch_size", "train_micro_batch_size_per_gpu", "gradient_accumulation_steps", "bf16", "fp16")


def fill_deepspeed_config(base: dict, *, micro_batch_size: int, grad_accum_steps: int, lr: float, on_gpu: bool) -> dict:
    """The fill rule documented in cluster/README.md (the pipeline applies the same)."""
    cfg = copy.deepcopy(base)
    cfg["train_micro_batch_size_per_gpu"] = micro_batch_size
    cfg["gradient_accumulation_steps"] = grad_accum_steps
    cfg["optimizer"]["params"]["lr"] = lr
    cfg["bf16"] = {"enabled": bool(on_gpu)}
    return cfg


def _cluster_files(*suffixes: str) -> list[Path]:
    return sorted(p for p in CLUSTER.rglob("*") if p.is_file() and p.suffix in suffixes)


def _load(path: Path):
    text = path.read_text()
    return json.loads(text) if path.suffix == ".json" else yaml.safe_load(text)


def _walk(obj):
    yield obj
    if isinstance(obj, dict):
        for v in obj.values():
            yield from _walk(v)
    elif isinstance(obj, list):
        for v in obj:
            yield from _walk(v)


def test_every_cluster_yaml_and_json_parses():
    files = _cluster_files(".json", ".yaml", ".yml")
    names = {p.relative_to(CLUSTER).as_posix() for p in files}
    assert {"ray-cluster-gpu.yaml", "kuberay-rayjob.yaml", *(f"deepspeed/{n}" for n in DS_STAGES)} <= names
    for path in files:
        assert isinstance(_load(path), dict), path


@pytest.mark.parametrize("name,stage", sorted(DS_STAGES.items()))
def test_deepspeed_config_shape(name, stage):
    cfg = _load(DS_DIR / name)
    zero = cfg["zero_optimization"]
    assert zero["stage"] == stage
    assert zero["overlap_comm"] is True and zero["contiguous_gradients"] is True
    assert isinstance(zero["reduce_bucket_size"], int)
    if stage == 3:
        assert zero["stage3_gather_16bit_weights_on_model_save"] is True
    offloaded = {k: zero[k]["device"] for k in ("offload_optimizer", "offload_param") if k in zero}
    assert offloaded == ({"offload_optimizer": "cpu", "offload_param": "cpu"} if "offload" in name else {})
    assert cfg["gradient_clipping"] == 1.0
    assert cfg["optimizer"]["type"] == "AdamW" and cfg["optimizer"]["params"]["torch_adam"] is True
    assert cfg["steps_per_print"] >= 1000 and cfg["wall_clock_breakdown"] is False
    # Left to the pipeline (fill rule); DeepSpeed 0.19 would not resolve "auto" placeholders.
    assert not set(RUNTIME_KEYS) & set(cfg) and "lr" not in cfg["optimizer"]["params"]
    assert "auto" not in [v for v in _walk(cfg) if isinstance(v, str)]


def test_fill_rule_sets_precision_by_device_and_leaves_base_untouched():
    base = _load(DS_DIR / "zero2.json")
    snapshot = copy.deepcopy(base)
    gpu = fill_deepspeed_config(base, micro_batch_size=4, grad_accum_steps=2, lr=2e-5, on_gpu=True)
    cpu = fill_deepspeed_config(base, micro_batch_size=4, grad_accum_steps=2, lr=2e-5, on_gpu=False)
    assert gpu["bf16"] == {"enabled": True} and cpu["bf16"] == {"enabled": False}
    assert gpu["optimizer"]["params"]["lr"] == 2e-5 and "train_batch_size" not in gpu
    assert base == snapshot


# Runs in a child process so its gloo process group and DeepSpeed globals stay out of the test
# session. DeepSpeed's CPU shm all-reduce op (JIT-built with ninja, ~2 min cold) is switched off:
# it only speeds up multi-rank collectives, and this is one rank.
_TRAIN_SCRIPT = textwrap.dedent(
    """
    import json, sys
    import torch, deepspeed, importlib
    importlib.import_module("deepspeed.comm.torch").build_shm_op = lambda: None
    deepspeed.init_distributed(dist_backend="gloo")
    results = {}
    for path in sys.argv[1:]:
        torch.manual_seed(0)
        model = torch.nn.Sequential(torch.nn.Linear(4, 16), torch.nn.ReLU(), torch.nn.Linear(16, 1))
        engine, *_ = deepspeed.initialize(model=model, model_parameters=model.parameters(),
                                          config=json.load(open(path)))
        x = torch.randn(8, 4)
        y = x.sum(dim=1, keepdim=True)
        losses = []
        for _ in range(3):
            loss = torch.nn.functional.mse_loss(engine(x), y)
            engine.backward(loss)
            engine.step()
            losses.append(loss.item())
        with torch.no_grad():
            losses.append(torch.nn.functional.mse_loss(engine(x), y).item())
        results[path] = {"stage": engine.zero_optimization_stage(), "steps": engine.global_steps,
                         "optimizer": type(engine.basic_optimizer).__name__, "losses": losses}
    print("RESULT " + json.dumps(results))
    """
)


def test_deepspeed_configs_train_on_cpu(tmp_path):
    paths = []
    for name in DS_STAGES:
        cfg = fill_deepspeed_config(_load(DS_DIR / name), micro_batch_size=8, grad_accum_steps=1, lr=1e-2, on_gpu=False)
        paths.append(tmp_path / name)
        paths[-1].write_text(json.dumps(cfg))
    env = dict(os.environ, DS_ACCELERATOR="cpu", CUDA_VISIBLE_DEVICES="", MASTER_ADDR="127.0.0.1",
               MASTER_PORT=str(free_port()), RANK="0", LOCAL_RANK="0", WORLD_SIZE="1")
    start = time.monotonic()
    proc = subprocess.run([sys.executable, "-c", _TRAIN_SCRIPT, *map(str, paths)], env=env, cwd=tmp_path,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-4000:]
    line = next(l for l in proc.stdout.splitlines() if l.startswith("RESULT "))
    results = json.loads(line[len("RESULT "):])
    for path in paths:
        r = results[str(path)]
        assert r["stage"] == DS_STAGES[path.name] and r["steps"] == 3 and r["optimizer"] == "AdamW", r
        assert all(a > b for a, b in zip(r["losses"], r["losses"][1:])), r["losses"]
    print(f"3 DeepSpeed configs x 3 steps on CPU in {time.monotonic() - start:.1f}s")


def test_ray_cluster_yaml():
    cfg = _load(RAY_CLUSTER)
    for key in ("cluster_name", "provider", "available_node_types", "head_node_type", "max_workers"):
        assert key in cfg, key
    nodes = cfg["available_node_types"]
    assert cfg["head_node_type"] in nodes
    workers = {k: v for k, v in nodes.items() if k != cfg["head_node_type"]}
    assert workers and all(0 <= v["min_workers"] <= v["max_workers"] <= cfg["max_workers"] for v in workers.values())
    assert cfg["provider"]["type"] == "aws"
    assert cfg["file_mounts"]["~/coin-continual"] == "."
    assert any("~/coin-continual" in c and "pip install -e ." in c for c in cfg["setup_commands"])
    import ray

    assert cfg["docker"]["image"].startswith(f"rayproject/ray:{ray.__version__}-")
    assert any("MLFLOW_TRACKING_URI=" in o for o in cfg["docker"]["run_options"])
    # What `ray up` itself does to the file before launching anything (fill defaults, schema check).
    from ray.autoscaler._private.util import prepare_config, validate_config

    validate_config(prepare_config(copy.deepcopy(cfg)))


def _entrypoint_paths(entrypoint: str) -> list[str]:
    tokens = entrypoint.split()
    assert "pipeline/main.py" in tokens, entrypoint
    assert "--config" in tokens and tokens.index("--config") + 1 < len(tokens), entrypoint
    return ["pipeline/main.py", tokens[tokens.index("--config") + 1]]


def test_rayjob_manifest():
    job = _load(RAYJOB)
    assert job["apiVersion"] == "ray.io/v1" and job["kind"] == "RayJob"
    spec = job["spec"]
    assert _entrypoint_paths(spec["entrypoint"])[1].endswith((".yaml", ".yml"))
    runtime_env = yaml.safe_load(spec["runtimeEnvYAML"])
    assert runtime_env["working_dir"]
    assert spec["shutdownAfterJobFinishes"] is True
    cluster = spec["rayClusterSpec"]
    assert cluster["headGroupSpec"]["template"]["spec"]["containers"]
    gpu_groups = [
        g for g in cluster["workerGroupSpecs"]
        for c in g["template"]["spec"]["containers"]
        if int(c["resources"]["limits"].get("nvidia.com/gpu", 0)) > 0
    ]
    assert gpu_groups
    containers = [c for g in [cluster["headGroupSpec"], *cluster["workerGroupSpecs"]] for c in g["template"]["spec"]["containers"]]
    for c in containers:
        env = {e["name"]: e for e in c.get("env", [])}
        for name in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"):
            assert "value" not in env[name] and env[name]["valueFrom"]["secretKeyRef"]["key"] == name


def test_rayjob_pip_pins_match_pyproject():
    deps = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
    pip = yaml.safe_load(_load(RAYJOB)["spec"]["runtimeEnvYAML"])["pip"]
    assert sorted(pip) == sorted(d for d in deps if not d.startswith("ray"))  # the image provides Ray


def test_no_literal_credentials():
    for path in _cluster_files(".json", ".yaml", ".yml", ".md"):
        text = path.read_text()
        assert not re.search(r"\b(AKIA|ASIA)[0-9A-Z]{16}\b", text), path
        if path.suffix != ".md":
            for node in _walk(_load(path)):
                if isinstance(node, dict) and "name" in node and "value" in node:
                    assert not re.search(r"SECRET|ACCESS_KEY|TOKEN|PASSWORD", str(node["name"])), (path, node)


_REPO_PATH = re.compile(r"(?<![\w/~.-])((?:pipeline|cluster|stages|tests)/[\w./-]*\.(?:py|ya?ml|json))\b")


def test_referenced_repository_paths_exist():
    """Every repository file the manifests and README name must exist (pipeline/main.py and its
    config are written elsewhere; this fails until they are there)."""
    referenced = set(_entrypoint_paths(_load(RAYJOB)["spec"]["entrypoint"]))
    referenced |= {f"cluster/deepspeed/{n}" for n in DS_STAGES}
    for path in _cluster_files(".json", ".yaml", ".yml", ".md"):
        referenced |= set(_REPO_PATH.findall(path.read_text()))
    config = ROOT / _entrypoint_paths(_load(RAYJOB)["spec"]["entrypoint"])[1]
    if config.is_file():  # the DeepSpeed config the experiment points at, if any
        referenced |= {p for p in _REPO_PATH.findall(config.read_text()) if p.startswith("cluster/")}
    missing = sorted(p for p in referenced if not (ROOT / p).is_file())
    assert not missing, f"referenced but not in the repository: {missing}"
