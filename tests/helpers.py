"""What several test modules share, in one place: tiny random-init models and toy tasks, a small
CoIN layout written to disk, the published ModalPrompt matrix, the toy training loop (the same
``pipeline.training.fit`` the Ray Train workers run), a free port."""

from __future__ import annotations

import functools
import json
import socket
import zlib
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

from pipeline.data.coin import CoinSource

# ---- tiny models and toy tasks ---------------------------------------------------------------

# Two toy "tasks": different questions, images and (constant) answers, so that a method that
# learns one can be seen to learn the other.
TOY_TASKS: dict[str, tuple[str, str]] = {
    "task_a": ("what colour is the picture ?", "red"),
    "task_b": ("how many stripes are there ?", "three"),
    "task_c": ("is there a cat in the image ?", "yes"),
}
IMAGE_SIZE = 16


def tiny_config():
    """A few-thousand-parameter LLaVA + CLIP; everything read downstream comes from the model."""
    from pipeline.models import ModelConfig, TinySpec

    spec = TinySpec(
        vision_layers=1, vision_hidden=32, vision_heads=2, vision_intermediate=64, patch_size=8,
        lm_layers=2, lm_hidden=32, lm_heads=2, lm_intermediate=64, max_position_embeddings=128,
        guide_embed_dim=32, guide_vision_width=48, guide_vision_layers=1, guide_vision_head_width=16,
        guide_patch_size=8, guide_text_width=32, guide_text_layers=1, guide_text_heads=2,
        guide_context_length=16,
    )
    return ModelConfig(kind="tiny", image_size=IMAGE_SIZE, max_length=64, max_new_tokens=4, tiny=spec)


def tiny_models(seed: int = 0, fresh_guide: bool = False) -> tuple[Any, Any]:
    """(LMM, Guide) with random weights; the same seed gives bit-identical weights.

    The LMM is always built anew (LoRA injects into it). The guide is frozen and no method
    writes to it, so it is shared per seed unless ``fresh_guide`` (it costs a build per test).
    """
    from pipeline.models import build_lmm
    from pipeline.models.tokenizer import build_tokenizer

    torch.manual_seed(seed)
    texts = [f"{q} {a}" for q, a in TOY_TASKS.values()]
    lmm = build_lmm(tiny_config(), tokenizer=build_tokenizer(texts))
    with torch.no_grad():
        # Random init (std 0.02) caps the logit gaps a frozen head can produce at ~0.6, so no
        # method could fit anything; a larger head lets the toy run show learning.
        lmm.model.get_output_embeddings().weight.mul_(10.0)
    guide = _build_guide(seed) if fresh_guide else _shared_guide(seed)
    return lmm, guide


def _build_guide(seed: int) -> Any:
    from pipeline.models import build_guide

    torch.manual_seed(seed + 1)
    return build_guide(tiny_config())


@functools.lru_cache(maxsize=None)
def _shared_guide(seed: int) -> Any:
    return _build_guide(seed)


def toy_rows(task: str, n: int = 4, split: str = "train") -> list[dict[str, Any]]:
    """``n`` schema rows of a toy task (fixed per task name: same images on every call)."""
    question, answer = TOY_TASKS[task]
    rng = np.random.default_rng(zlib.crc32(task.encode()))
    return [
        {
            "task": task, "split": split, "id": f"{task}-{i}", "index": i, "image_path": "",
            "image": rng.integers(0, 256, (IMAGE_SIZE, IMAGE_SIZE, 3), dtype=np.uint8),
            "human_turns": [question], "gpt_turns": [answer] if split == "train" else [],
            "instruction": question, "answer": answer if split == "test" else "",
            "answers": [], "answer_bbox": "", "size": [],
        }
        for i in range(n)
    ]


def batch_for(lmm: Any, task: str, train: bool = True, n: int = 4) -> dict[str, Any]:
    """Collated batch of one toy task, or of the union of task_a and task_b (``"union"``)."""
    from pipeline.models.lmm import rows_to_batch

    split = "train" if train else "test"
    names = ["task_a", "task_b"] if task == "union" else [task]
    rows = [row for name in names for row in toy_rows(name, n, split)]
    return lmm.collate(rows_to_batch(rows), train=train)



# The toy loop's rate, per method where 1e-2 does not suit it. EWC's penalty at its default
# lambda (1e5) is stiff: at 1e-2 Adam overshoots on task 1 and the loss oscillates (measured
# 1.94 -> 84.9 -> ... -> 2.08 after 30 steps on one CPU, lower on another); at 2e-3, the rate the
# default config trains LoRA and EWC with (train.lr), it descends steadily (3.30 -> 0.52).
TOY_LR = {"ewc": 2e-3}


def train_toy(method: Any, batch: dict, steps: int, lr: float | None = None, *, end_task: int | None = None,
              replay: Any = None, task: int | None = None) -> list[float]:
    """``steps`` AdamW steps on one fixed batch through ``pipeline.training.fit`` (the train stage's
    loop: gradient hook, logging); returns the losses. ``end_task``: also end that task (the
    consolidate pass over the same batch, then end_task), as the train stage does after its
    last step; None leaves the task open (a mid-task checkpoint). ``task``: the open task's
    index (the method's optional ``prepare`` pass gets it; default ``end_task``)."""
    from pipeline.training import FitJob, TorchEngine, fit, run_steps

    lr = TOY_LR.get(method.name, 1e-2) if lr is None else lr
    engine = TorchEngine.adamw(method, lr)
    index = end_task if end_task is not None else task
    job = FitJob(-1 if index is None else index, "toy", steps)
    if end_task is None:
        return run_steps(method, engine, lambda epoch: [batch] * steps, job, replay=replay).losses
    return fit(method, engine, lambda epoch: [batch] * steps, job, task_batches=lambda: [batch], replay=replay).losses


# ---- a small CoIN layout on disk -------------------------------------------------------------
COLORS = {"sqa/1.png": (255, 0, 0), "sqa/2.png": (0, 255, 0), "sqa/3.png": (0, 0, 255),
          "text/a.png": (10, 20, 30), "text/b.png": (200, 100, 50), "ref/g.png": (7, 77, 177)}

TEN = ["nike"] * 7 + ["nike shoes"] * 3

FILES: dict[str, Any] = {
    "ScienceQA/train.json": [
        {"id": "sqa-1", "image": "sqa/1.png", "conversations": [
            {"from": "human", "value": "<image>\nWhich color?\nA. red\nB. blue\nAnswer with the option's letter from the given choices directly."},
            {"from": "gpt", "value": "A"}]},
        {"id": "sqa-2", "image": "sqa/2.png", "conversations": [
            {"from": "human", "value": "What is shown?\n<image>"},
            {"from": "gpt", "value": "A leaf."},
            {"from": "human", "value": "And its color?"},
            {"from": "gpt", "value": "Green."}]},
    ],
    "ScienceQA/test.json": [
        {"question_id": "q1", "image": "sqa/3.png", "text": "<image>\nWhich is blue?\nA. sky\nB. grass", "answer": "A"},
        {"question_id": 2, "image": "sqa/1.png", "text": "Which is red?\nA. sky\nB. apple", "answer": "B"},
    ],
    "TextVQA/train.json": [
        {"id": "t-1", "image": "text/a.png", "conversations": [
            {"from": "human", "value": "<image>\nWhat brand?\nAnswer the question using a single word or phrase."},
            {"from": "gpt", "value": "nike"}]},
    ],
    "TextVQA/val.json": [
        {"question_id": 101, "image": "text/b.png", "text": "What brand?", "answer": "nike", "answers": TEN},
        {"question_id": 102, "image": "text/a.png", "text": "What number?", "answer": "7"},
    ],
    "Grounding/train.json": [
        {"id": "g-1", "image": "ref/g.png", "conversations": [
            {"from": "human", "value": "<image>\nPlease provide the bounding box coordinate of the region this sentence describes: left dog."},
            {"from": "gpt", "value": "[0.1, 0.2, 0.5, 0.9]"}]},
    ],
    "Grounding/test.json": [
        {"question_id": "r1", "image": "ref/g.png", "text": "<image>\nPlease provide the bounding box coordinate of the region this sentence describes: cat.",
         "answer_bbox": "[0.123, 0.2, 0.5, 0.987]", "size": [16, 12]},
    ],
}


def write_coin_layout(root: Path, files: dict[str, Any] | None = None) -> CoinSource:
    """Write instruction files and solid-colour 16x12 PNGs under ``root``; return the source."""
    instructions, images = root / "Instructions_Original", root / "images"
    for rel, color in COLORS.items():
        (images / rel).parent.mkdir(parents=True, exist_ok=True)
        Image.new("RGB", (16, 12), color).save(images / rel)
    for rel, records in (FILES if files is None else files).items():
        (instructions / rel).parent.mkdir(parents=True, exist_ok=True)
        (instructions / rel).write_text(json.dumps(records) if not isinstance(records, str) else records)
    return CoinSource(str(instructions), str(images))


GOOD = {"id": "ok", "image": "sqa/1.png", "conversations": [{"from": "human", "value": "<image>\nQ"}, {"from": "gpt", "value": "A"}]}


# ---- the published matrices (ModalPrompt paper, Tables 10 and 11) -----------------------------
def tri(text: str) -> list[list[float]]:
    """Parse a whitespace-separated lower-triangular matrix, one row per line."""
    return [[float(x) for x in line.split()] for line in text.strip().splitlines()]


# ModalPrompt paper, Table 10 / Table 11. Columns: ScienceQA TextVQA ImageNet GQA VizWiz REC VQAv2 OCRVQA.
MODALPROMPT_T10 = {
    "Finetune": tri("""
        82.45
        38.15 50.14
        0.96 0.58 96.03
        13.91 15.78 5.67 55.65
        8.46 25.17 4.60 38.12 51.42
        0.00 0.00 0.00 0.27 0.00 34.00
        9.10 27.58 6.62 43.92 19.10 0.03 59.17
        26.00 25.38 28.51 33.07 26.52 0.10 40.00 52.92
    """),
    "MoELoRA": tri("""
        75.78
        34.47 51.80
        22.61 0.04 79.60
        32.37 34.04 42.48 57.95
        45.32 38.13 2.63 43.80 58.70
        58.76 9.08 5.64 31.87 11.45 36.77
        33.01 48.42 10.61 49.78 32.23 1.75 64.58
        47.34 32.91 38.73 37.15 42.48 0.97 42.77 57.50
    """),
    "ModalPrompt": tri("""
        77.05
        70.50 58.50
        68.57 58.18 42.26
        68.82 56.08 43.43 62.17
        67.48 55.05 37.60 61.81 48.81
        66.58 55.68 35.92 61.95 48.74 36.88
        68.12 56.43 40.22 60.92 51.19 36.63 64.99
        68.42 56.40 41.13 61.11 50.13 36.69 66.90 59.68
    """),
    "L2P": tri("""
        72.83
        68.07 57.16
        32.05 26.73 39.43
        47.53 46.02 18.03 60.47
        65.94 37.68 1.72 56.29 47.90
        5.74 42.96 33.92 39.44 39.64 1.87
        32.57 48.65 7.41 47.32 34.52 8.17 59.40
        54.42 46.04 30.36 57.09 42.19 9.38 50.45 54.03
    """),
    "DualPrompt": tri("""
        67.16
        52.20 53.12
        28.49 24.77 46.40
        49.70 47.94 12.06 55.10
        57.88 51.17 21.34 48.03 51.62
        18.27 39.64 29.77 44.06 35.97 30.82
        36.77 49.85 22.48 27.96 41.08 13.51 61.27
        56.40 47.12 34.96 42.03 44.14 12.01 54.43 53.36
    """),
    "CODA-Prompt": tri("""
        70.26
        58.72 57.05
        36.96 34.95 30.26
        50.78 53.52 10.12 59.35
        55.37 47.21 6.78 56.43 48.01
        33.56 47.67 32.07 44.62 43.39 34.42
        48.34 49.54 20.72 47.72 35.73 13.03 60.87
        58.15 50.16 24.04 54.33 48.94 17.83 55.86 54.42
    """),
}


# ---- running the pipeline as a user does ------------------------------------------------------
ROOT = Path(__file__).resolve().parents[1]

# A reduced embedded default: small CoIN-synth, a briefly pre-trained base, one epoch.
SMALL = [  # the embedded default (the shipped base), on a small benchmark
    "data.synth.train_per_task=32",
    "data.synth.test_per_task=16",
    "train.epochs=1",
    "resources.num_cpus=2",
]
# A tiny base pre-trained inside the run (model.kind tiny, the base stage's pre-training path)
# instead of the shipped one; add to SMALL.
TINY_BASE = [
    "model.kind=tiny", "model.path=null", "model.guide_arch=tiny", "model.image_size=32", "model.max_length=128",
    "data.synth.pretrain_records=200", "data.synth.pretrain_skill_per_task=20",
    "model.pretrain.lmm_steps=20", "model.pretrain.guide_steps=10",
]


def pipeline_env() -> dict[str, str]:
    import os

    env = dict(os.environ, PYTHONUNBUFFERED="1", HF_HUB_OFFLINE="1")
    env.pop("MLFLOW_TRACKING_URI", None)
    env.pop("RAY_ADDRESS", None)
    return env


def run_pipeline(out: Path, cache: Path, *extra: str, timeout: int = 900, small: bool = True):
    """``python pipeline/main.py --output OUT cache_dir=CACHE [SMALL] EXTRA...`` in a subprocess."""
    import subprocess
    import sys

    cmd = [sys.executable, "pipeline/main.py", "--output", str(out), f"cache_dir={cache}",
           *(SMALL if small else []), *extra]
    return subprocess.run(cmd, cwd=ROOT, env=pipeline_env(), capture_output=True, text=True, timeout=timeout)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


