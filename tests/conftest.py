"""Shared fixtures: one real local Ray runtime per test session, started with a fixed small
number of CPUs and a small object store (as Ray's own train examples do)."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from pipeline.process_env import setup_process_env  # noqa: E402

# Nothing in the tests may reach a model hub; the same DeepSpeed op build folder and ninja as
# pipeline/main.py and `make setup`.
setup_process_env()


@pytest.fixture(scope="module")
def one_thread():
    """Tiny models on a shared 2-core box run far faster on one intra-op thread."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="session")
def ray_session():
    import ray

    if not ray.is_initialized():
        ray.init(
            address="local",  # never attach to another Ray running on the machine
            num_cpus=2,
            object_store_memory=200 * 1024 * 1024,
            include_dashboard=False,
            log_to_driver=False,
            runtime_env={"env_vars": {"PYTHONPATH": str(ROOT)}},
        )
    yield ray
    ray.shutdown()


# ---- tiers ----------------------------------------------------------------------------------
# unit: no Ray (the default tier's fast part); ray: a real local Ray (a session fixture, a pipeline
# run in a subprocess, a sweep); slow: full end-to-end runs, `make test-slow` (pyproject's addopts
# leaves them out of `make test`). Each test is marked so that `-m unit` / `-m ray` select a tier.
# Modules whose tests start Ray without the ray_session fixture (pipeline runs in subprocesses):
RAY_MODULES = {"test_pipeline_e2e", "test_extending", "test_tune", "test_cluster_configs"}


def pytest_collection_modifyitems(config, items):
    for item in items:
        if item.get_closest_marker("slow"):
            continue
        module = item.module.__name__.rsplit(".", 1)[-1]
        uses_ray = "ray_session" in getattr(item, "fixturenames", ()) or module in RAY_MODULES
        item.add_marker(pytest.mark.ray if uses_ray else pytest.mark.unit)
