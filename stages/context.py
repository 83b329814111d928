"""What the stages of one run share: the config, the run directory, the tracker, the schedule,
the stage list, the data source and the base models (set by the base stage)."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from pipeline.config import ExperimentConfig
from pipeline.data.coin import CoinSource
from stages.artifacts import STATE_FILE
from stages.common import BaseModels
from stages.rundir import RunDir
from stages.schedules import Schedule, Stage
from stages.tracking import Tracker


@dataclass
class RunContext:
    cfg: ExperimentConfig
    rundir: RunDir
    tracker: Tracker
    schedule: Schedule
    stages: list[Stage]
    source: CoinSource
    log: Callable[[str], None]
    base: BaseModels | None = None
    # a resident Ray Train worker group trains every train stage (stages/resident.py)
    resident_ok: bool = False
    resident: Any = None
    resident_data: dict[str, Any] = field(default_factory=dict)
    # train stage id -> its training data being decoded ahead (a Future of the materialized
    # Dataset), for the resident worker group (stages/train.py)
    train_ahead: dict[str, Any] = field(default_factory=dict)
    _ahead: Any = None  # the thread that decodes them (``ahead_executor``)
    # the evaluate stages' inference actors stay for the whole run (stages/inference.py)
    inference_resident: bool = False
    inference: Any = None
    test_rows: dict[str, list[dict[str, Any]]] = field(default_factory=dict)
    test_sets: dict[str, Any] = field(default_factory=dict)  # task -> its test Dataset, read once per run
    decoded_bytes: int = 0  # decoded images kept in Ray's object store (keep_decoded)
    on_evaluated: Callable[[int, dict[str, float]], None] | None = None
    results: Any = None  # stages.results.RunResults

    def stage_dir(self, stage: Stage) -> Path:
        return self.rundir.stage_dir(stage.id)

    def state_of(self, stage: Stage | None) -> Path | None:
        """The frozen method state a freeze stage wrote (None for None)."""
        return self.stage_dir(stage) / STATE_FILE if stage is not None else None

    def pad_color(self) -> tuple[int, int, int] | None:
        """How images become square for this run's base (after the base stage: its folder)."""
        from pipeline.models.build import image_pad_color

        return image_pad_color(self.cfg.model, self.base.lmm_dir if self.base else None)

    def inference_pool(self) -> Any:
        """The run's resident inference actors (started on first use), or None where each
        evaluate stage starts and closes its own."""
        if not self.inference_resident:
            return None
        if self.inference is None:
            from stages.inference import InferencePool

            self.inference = InferencePool(self.cfg, self.base, resident=True, log=self.log)
        return self.inference

    def ahead_executor(self) -> Any:
        """One thread that decodes the next train stage's data while a stage trains."""
        if self._ahead is None:
            from concurrent.futures import ThreadPoolExecutor

            self._ahead = ThreadPoolExecutor(1, thread_name_prefix="train-data-ahead")
        return self._ahead

    def reserve_decoded(self, rows: int) -> bool:
        """Whether ``rows`` more decoded images fit ``resources.materialize_mb`` (counted if so)."""
        size = self.cfg.model.image_size
        need = rows * size * size * 3
        if self.decoded_bytes + need > (self.cfg.resources.materialize_mb << 20):
            return False
        self.decoded_bytes += need
        return True

    def keep_decoded(self, ds: Any, rows: int) -> Any:
        """``ds`` decoded once and kept in Ray's object store (``materialize``) while the run's
        decoded data stay within ``resources.materialize_mb``; otherwise ``ds`` as it is (each
        use streams and decodes it again)."""
        return ds.materialize() if self.reserve_decoded(rows) else ds

    def close_inference(self) -> None:
        if self.inference is not None:
            self.inference.close()
            self.inference = None

    def log_numbers(self, run_id: str, result: dict[str, Any]) -> None:
        self.tracker.log_metrics(run_id, {k: v for k, v in result.items()
                                          if isinstance(v, (int, float)) and not isinstance(v, bool)})
