"""Process environment shared by the entry point, the tests and ``make setup``: nothing reaches a
model hub, and DeepSpeed's JIT-built CPU op has one build folder and one ninja per virtualenv."""

from __future__ import annotations

import logging
import os
import sys
from pathlib import Path


def setup_process_env() -> None:
    """Set (or keep the user's) HF offline switches and TORCH_EXTENSIONS_DIR, and put this
    interpreter's bin/ first on PATH. Ray workers of an in-process Ray inherit all of it.

    PATH: torch builds extensions with the first ``ninja`` on PATH. The virtualenv's pip ``ninja``
    (1.13) and a system ninja (e.g. 1.11) hash build commands differently, so each takes the
    other's build for a changed command and rebuilds DeepSpeed's shared-memory op (about 50 s on 2
    cores) whenever the process that loads it found the other one first (measured: an activated
    virtualenv rebuilt what ``make setup`` had built)."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    os.environ.setdefault("TORCH_EXTENSIONS_DIR", str(Path(sys.prefix) / "torch_extensions"))
    bin_dir = str(Path(sys.executable).parent)
    path = os.environ.get("PATH", "").split(os.pathsep)
    if path[:1] != [bin_dir]:
        os.environ["PATH"] = os.pathsep.join([bin_dir, *[p for p in path if p != bin_dir]])


# Ray Train v2 starts a detached PlacementGroupCleaner beside every fit. It asks the State API once a
# second whether the Train controller still lives, and the State API needs the dashboard, which the
# in-process Ray of a local run does not start (``include_dashboard=False``): each query failed with
# a warning, 234 lines in one default run (2026-11-23). The in-process Ray ends with the driver and
# takes every placement group with it, so the cleaner has nothing to clean there.
TRAIN_PG_CLEANER_LOGGER = "ray.train.v2._internal.execution.controller.placement_group_cleaner"


PG_CLEANER_THREAD = "PlacementGroupCleanerMonitor"


def quiet_local_ray_worker() -> None:
    """``worker_process_setup_hook`` of the in-process Ray only: the PlacementGroupCleaner's
    "State API may be temporarily unavailable" warnings are dropped (errors still show), and when
    its monitor thread dies because the State API cannot reach the cluster without a dashboard
    (a 30-line traceback once per fit, 2026-11-23), one line says so instead. Every other
    thread's exceptions print as before. On a cluster (``RAY_ADDRESS``) nothing is changed."""
    import threading

    logging.getLogger(TRAIN_PG_CLEANER_LOGGER).setLevel(logging.ERROR)
    previous = threading.excepthook

    def hook(args: threading.ExceptHookArgs) -> None:
        if args.thread is not None and args.thread.name == PG_CLEANER_THREAD:
            print(f"PlacementGroupCleaner: monitor stopped ({args.exc_type.__name__}: {args.exc_value}); "
                  "expected in the in-process Ray, which has no dashboard and ends with the driver",
                  file=sys.stderr, flush=True)
            return
        previous(args)

    threading.excepthook = hook
