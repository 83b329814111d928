"""Fault injection for the reliability drills (``tests/test_pipeline_e2e.py``, the driver killed
at five points).

``COIN_FAILPOINT=name:n`` in the driver's environment kills the driver with SIGKILL the n-th time
(default 1) it reaches ``failpoint("name")``: as an OOM kill, a lost node or ``kill -9`` would,
with nothing flushed or cleaned up, at places a test cannot reliably hit from outside (between a
stage's completion marker and its MLflow record, halfway through writing predictions, ...).
Without the variable (always, outside the drills) a failpoint does nothing. The points are in
driver code only; ``POINTS`` lists them.
"""

from __future__ import annotations

import os
import signal
import threading

POINTS = {
    "data-task": "the data stage, after one task's train and test splits are checked",
    "train-progress": "the driver, on receiving a training progress report (mid-training)",
    "marked-train": "a train stage's completion marker written, its MLflow run not yet ended (before freeze)",
    "eval-predictions": "an evaluate stage, after one task's predictions file is written",
    "results-written": "results.json written, the run's MLflow artifacts not yet logged",
}
_hits: dict[str, int] = {}
_lock = threading.Lock()


def failpoint(name: str) -> None:
    spec = os.environ.get("COIN_FAILPOINT")
    if not spec:
        return
    want, _, count = spec.partition(":")
    if want != name:
        return
    with _lock:
        _hits[name] = _hits.get(name, 0) + 1
        if _hits[name] >= int(count or 1):
            os.kill(os.getpid(), signal.SIGKILL)
