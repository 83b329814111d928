"""The benchmarks (``benchmarks/``) run end to end and print what they promise; the GPU check runs
its whole path on a CPU with small widths (``--smoke``), so it keeps working between the times a
CUDA machine is at hand. Their numbers are not asserted (they are measurements), their invariants
are: the two evaluation paths give the same answers, every run of the GPU check passes."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

from tests import helpers

ROOT = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.slow


def _bench(*args: str, timeout: int = 900) -> str:
    proc = subprocess.run([sys.executable, *args], cwd=ROOT, env=helpers.pipeline_env(), capture_output=True,
                          text=True, timeout=timeout)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc.stdout


def test_train_step_eval_throughput_and_select_scaling_print_their_ratios(tmp_path):
    cache = f"cache_dir={tmp_path / 'cache'}"
    out = _bench("benchmarks/train_step.py", "--methods", "modalprompt,lora", "--rounds", "1", "--steps", "1", cache)
    assert re.search(r"^modalprompt\s+[\d.]+\s+[\d.]+\s+[\d.]+$", out, re.M), out
    assert "worst ratio" in out
    out = _bench("benchmarks/eval_throughput.py", "--per-task", "4", "--rounds", "1", cache)
    assert "ratio (stage, cache warm / batch-1)" in out
    agree = float(re.search(r"answers equal between the two paths: ([\d.]+)%", out).group(1))
    assert agree >= 90.0, out  # batched left-padded greedy decoding answers as one at a time does
    out = _bench("benchmarks/select_scaling.py", "--methods", "modalprompt", "--samples", "16", "--rounds", "1", cache)
    assert "ModalPrompt T=32 / T=2" in out and "T=8, all 8 sets concatenated (k=8)" in out


def test_gpu_check_runs_its_whole_path_on_a_cpu(tmp_path):
    out = _bench("benchmarks/gpu_check.py", "--smoke", "--out", str(tmp_path / "check"),
                 "--runs", "modalprompt:zero2,lora:zero3")
    assert "gpu check: passed" in out, out
    assert re.search(r"^lora zero3\s+[\d.]+\s+[\d.]+", out, re.M), out


def test_vision_probe_reads_the_shipped_bases_classes_from_its_frozen_features(tmp_path):
    """The probe's labels and features line up: on the shipped base, whose tower classifies
    ImageNet's objects (the base's zero-shot ImageNet score is far above chance), the all-tokens
    probe is far above the 8.3% chance too. Reading signs is what it measures as missing."""
    out = _bench("benchmarks/vision_probe.py", "--train", "256", "--test", "100", "--steps", "150",
                 f"cache_dir={tmp_path / 'cache'}", "data.synth.test_per_task=100")
    row = re.search(r"^classify an object\s+ImageNet\s+(\d+)/(\d+)\s+12\s+8\.3\s+[\d.]+\s+([\d.]+)\s+([\d.]+)$", out, re.M)
    assert row, out
    assert (int(row.group(1)), int(row.group(2))) == (256, 100)
    assert float(row.group(3)) >= 50.0, out
    assert "read a sign" in out and "read a book title" in out


def test_router_query_reports_every_task(tmp_path):
    """Each task's row: the router's input tells the tasks apart by nearest centroid (the
    instructions differ), while its centroids are near parallel (cosine above 0.9)."""
    out = _bench("benchmarks/router_query.py", "--train", "16", "--test", "32", f"cache_dir={tmp_path / 'cache'}",
                 "data.synth.test_per_task=32")
    rows = re.findall(r"^(\w+)\s+(\d+)\s+([\d.]+)\s+(\d+)\s+([\d.]+)\s+(\d+)\s+([\d.]+)$", out, re.M)
    assert [r[0] for r in rows] == ["ScienceQA", "TextVQA", "ImageNet", "GQA", "VizWiz", "Grounding", "VQAv2", "OCRVQA"]
    assert sum(int(r[1]) for r in rows) / 8 >= 50, out
    assert all(0.9 < float(r[2]) <= 1.0 for r in rows), out
