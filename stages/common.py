"""What every stage shares: the data source of an experiment, model loading inside Ray workers
and actors, safetensors state files, DeepSpeed config filling."""

from __future__ import annotations

import json
import os
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import torch
from safetensors.torch import load_file, save_file

from pipeline.config import ConfigError, ExperimentConfig, config_from_dict, unresolved_env
from pipeline.data.coin import CoinSource


@dataclass
class BaseModels:
    """Where a stage finds the base LMM and guidance CLIP (tiny: the pre-trained cache)."""

    lmm_dir: str | None = None
    guide_file: str | None = None

    def to_dict(self) -> dict[str, Any]:
        return {"lmm_dir": self.lmm_dir, "guide_file": self.guide_file}


def data_source(cfg: ExperimentConfig) -> CoinSource:
    """The CoIN layout an experiment reads (real CoIN, or the generated CoIN-synth)."""
    if cfg.data.source == "synth":
        root = synth_root(cfg)
        return CoinSource(
            instructions_root=str(Path(root) / cfg.data.instructions),
            image_root=cfg.data.image_root or str(Path(root) / "images"),
            custom=cfg.task_specs(),
        )
    if not cfg.data.root:
        raise ConfigError("data.root: not set; data.source 'coin' needs the folder or s3:// URL holding "
                          f"{cfg.data.instructions}/ (the shipped configs read it from $COIN_ROOT)")
    unresolved_env(cfg.data.root, "data.root")
    unresolved_env(cfg.data.image_root, "data.image_root")
    root = cfg.resolve_path(cfg.data.root)
    sep = "" if root.endswith("/") else "/"
    return CoinSource(
        instructions_root=f"{root}{sep}{cfg.data.instructions}",
        image_root=cfg.data.image_root or root,
        custom=cfg.task_specs(),
    )


def synth_root(cfg: ExperimentConfig) -> str:
    if cfg.data.root:
        return cfg.resolve_path(cfg.data.root)
    from pipeline.data.synth import GENERATOR_VERSION

    s = cfg.data.synth
    # the generator version is part of the name, so a generator upgrade writes a fresh directory
    tag = f"v{GENERATOR_VERSION}-s{s.seed}-tr{s.train_per_task}-te{s.test_per_task}-p{s.pretrain_records}-k{s.pretrain_skill_per_task}-i{cfg.model.image_size}"
    if s.generic_instructions:  # another pre-training corpus (and so, through the name, another base)
        tag += "-gi"
    return str(Path(cfg.resolve_path(cfg.cache_dir)) / f"coin-synth-{tag}")


def load_models(cfg: ExperimentConfig, base: BaseModels, device: str = "cpu"):
    """Build the frozen (LMM, Guide) pair in this process (Ray worker, actor or driver)."""
    from pipeline.models import build_guide, build_lmm

    unresolved_env(base.lmm_dir, "model.path")
    unresolved_env(base.guide_file, "model.guide_path")
    lmm = build_lmm(cfg.model, device=device, weights=base.lmm_dir)
    guide = build_guide(cfg.model, device=device, weights=base.guide_file)
    return lmm, guide


def build_method_for(cfg: ExperimentConfig, lmm, guide):
    from pipeline.methods.registry import build_method

    return build_method(cfg.method.name, dict(cfg.method.options), lmm, guide)


def save_state(tensors: dict[str, torch.Tensor], path: Path, metadata: dict[str, str] | None = None) -> None:
    """Atomic safetensors write (contiguous CPU copies; safetensors refuses shared storage)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    save_file({k: v.detach().to("cpu").contiguous().clone() for k, v in tensors.items()}, str(tmp), metadata=metadata)
    os.replace(tmp, path)


def load_state(path: Path | str) -> dict[str, torch.Tensor]:
    return load_file(str(path))


def fill_deepspeed_config(
    template: dict[str, Any], *, micro_batch: int, grad_accum: int, world_size: int, lr: float,
    weight_decay: float, use_bf16: bool,
) -> dict[str, Any]:
    """Fill the run-time keys of a cluster/deepspeed/*.json template (see cluster/README.md)."""
    cfg = json.loads(json.dumps(template))
    for key in [k for k, v in cfg.items() if v == "auto"]:
        cfg.pop(key)
    cfg["train_micro_batch_size_per_gpu"] = micro_batch
    cfg["gradient_accumulation_steps"] = grad_accum
    cfg["train_batch_size"] = micro_batch * grad_accum * world_size
    opt = cfg.setdefault("optimizer", {"type": "AdamW", "params": {}})
    params = opt.setdefault("params", {})
    params["lr"] = lr
    params["weight_decay"] = weight_decay
    params.setdefault("torch_adam", True)
    cfg["bf16"] = {"enabled": bool(use_bf16)}
    cfg.pop("fp16", None)
    return cfg


def peak_memory_gb(device: str) -> float:
    """Peak memory of this process so far: allocated GPU memory on CUDA, else the resident set
    size (Linux reports ``ru_maxrss`` in KB)."""
    if device == "cuda":
        return torch.cuda.max_memory_allocated() / 1e9
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e6


def cfg_from_payload(payload: dict[str, Any]) -> ExperimentConfig:
    return config_from_dict(payload)


def _tail(path: Path, on_rows: Callable[[list[dict]], None], stop: threading.Event) -> None:
    pos = 0
    while True:
        finished = stop.is_set()
        if path.exists():
            with open(path) as fh:
                fh.seek(pos)
                chunk = fh.read()
                # only consume complete lines
                cut = chunk.rfind("\n") + 1
                pos += cut
                rows = [json.loads(line) for line in chunk[:cut].splitlines() if line.strip()]
            if rows:
                on_rows(rows)
        if finished:
            return
        stop.wait(2.0)


class JsonlTail:
    """Tails a JSON-lines file (a train job's or the pre-training's progress) into
    ``on_progress`` on a thread, every 2 s, while the job that writes it runs; ``close`` reads
    what is left and stops."""

    def __init__(self, path: Path, on_progress: Callable[[list[dict]], None] | None):
        self.stop = threading.Event()
        self.thread = None
        if on_progress is not None:
            self.thread = threading.Thread(target=_tail, args=(path, on_progress, self.stop), daemon=True)
            self.thread.start()

    def close(self) -> None:
        self.stop.set()
        if self.thread is not None:
            self.thread.join(timeout=10)
