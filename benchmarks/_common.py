"""What the benchmarks share: the embedded default (or a given config) with overrides, its
generated data, the base models and decoded rows, all without Ray; and the table printing.

Every benchmark measures the pipeline's path and its reference side by side in one process,
interleaved, and prints ratios (absolute times only as context: these machines are noisy).
"""

from __future__ import annotations

import os
import statistics
import sys
import time
from pathlib import Path
from typing import Any, Callable, Iterable

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")


def quiet() -> None:
    """The libraries' progress bars and notices off: the benchmark's lines are what matter."""
    import warnings

    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    warnings.filterwarnings("ignore")


def load(config: str | None, overrides: Iterable[str], method: str | None = None):
    """The experiment config (the embedded default when ``config`` is None) with overrides."""
    from pipeline.config import load_config

    os.chdir(ROOT)  # configs name the shipped base relative to the repository root
    return load_config(config, list(overrides), method=method)


def ensure_data(cfg) -> None:
    """Generate CoIN-synth where the config reads it (reused when it exists)."""
    if cfg.data.source == "synth":
        from stages.data import generate_synth

        generate_synth(cfg)


def base_models(cfg):
    """The configured base (the shipped one by default) as the base stage resolves it."""
    from stages.common import BaseModels

    if cfg.model.kind == "tiny":
        raise SystemExit("the benchmarks take a base from files (model.path); model.kind tiny pre-trains one")
    return BaseModels(lmm_dir=cfg.model.path, guide_file=cfg.model.guide_path)


def rows(cfg, task: str, split: str, n: int) -> list[dict[str, Any]]:
    """The first ``n`` decoded rows of a task's split (``task`` in the stream's order)."""
    from itertools import islice

    from pipeline.data.coin import iter_decoded
    from pipeline.models.build import image_pad_color
    from stages.common import data_source

    pad = image_pad_color(cfg.model, cfg.model.path)
    return list(islice(iter_decoded(data_source(cfg), task, split, cfg.model.image_size, pad_color=pad), n))


def models(cfg, device: str = "cpu"):
    from stages.common import load_models

    quiet()
    return load_models(cfg, base_models(cfg), device=device)


def interleaved(fns: dict[str, Callable[[], Any]], rounds: int, per_round: int = 1) -> dict[str, list[float]]:
    """Each function timed ``per_round`` times in every round, the functions taking turns in
    each round (so that a slow spell of the machine hits all of them alike). Seconds per call."""
    times: dict[str, list[float]] = {k: [] for k in fns}
    for _ in range(rounds):
        for name, fn in fns.items():
            for _ in range(per_round):
                t0 = time.perf_counter()
                fn()
                times[name].append(time.perf_counter() - t0)
    return times


def median(xs: list[float]) -> float:
    return statistics.median(xs) if xs else float("nan")


def table(header: list[str], body: list[list[Any]]) -> str:
    cells = [[str(c) for c in header]] + [[f"{c:.3f}" if isinstance(c, float) else str(c) for c in r] for r in body]
    widths = [max(len(r[i]) for r in cells) for i in range(len(header))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in cells]
    return "\n".join([lines[0], "  ".join("-" * w for w in widths), *lines[1:]])


def machine() -> str:
    import platform

    import torch

    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "no GPU"
    return f"{platform.node()}: {os.cpu_count()} CPUs, {gpu}, torch {torch.__version__}, {time.strftime('%Y-%m-%d %H:%M')}"
