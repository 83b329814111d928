"""The objective a sweep optimises (``tune.objective``) and what a trial reports to Tune.

The ModalPrompt paper's Avg by default; Last, B, M (ModalPrompt) and ACC, MAA, BWT, LA (ProgLoRA)
selectable. The mode follows the metric: B is forgetting (min), every other one is maximised (BWT
too: negative means forgetting). Avg, B, M and BWT need two evaluated tasks; after the first task
the trial reports, as ``objective``, Last for Avg and M (their one-task limit: the accuracy on the
tasks seen so far) and 0 for B and BWT (nothing learned before can have been forgotten), with
``objective_defined = 0``. Every trial uses the same rule at the same rung, so ASHA's comparisons
at ``tasks_learned = 1`` stay fair; for B/BWT, whose first-task value is the same for every trial,
use ``grace_period >= 2``. ``train_loss`` (min; mean over the tasks learned so far of each train
stage's final loss) ranks trials whose accuracies are all equal, as with the tiny CPU model at test
sizes, whose accuracies are all 0.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from pipeline.config import ConfigError

TIME_ATTR = "tasks_learned"  # Tune's time attribute: evaluate(t) reports tasks_learned = t
OBJECTIVE_KEY = "objective"


@dataclass(frozen=True)
class Objective:
    """The metric a sweep optimises, its mode, and what stands in for it while undefined."""

    name: str  # as written in the config
    metric: str  # key in the pipeline's metrics (lower-case except B and M)
    mode: str  # "max" | "min"
    fallback: str | float | None  # metric key or constant used while ``metric`` is undefined

    def value(self, metrics: dict[str, Any]) -> tuple[float, bool]:
        """(objective value, defined?) for one evaluation's metrics."""
        v = metrics.get(self.metric)
        if isinstance(v, (int, float)) and not isinstance(v, bool):
            return float(v), True
        if isinstance(self.fallback, str) and isinstance(metrics.get(self.fallback), (int, float)):
            return float(metrics[self.fallback]), False
        if isinstance(self.fallback, (int, float)):
            return float(self.fallback), False
        raise KeyError(f"objective {self.name!r}: metric {self.metric!r} missing from {sorted(metrics)}")

    def better(self, a: float, b: float) -> bool:
        return a < b if self.mode == "min" else a > b


# name (lower-case) -> (metric key, mode, value while undefined after the first task)
_OBJECTIVES: dict[str, tuple[str, str, str | float | None]] = {
    "avg": ("avg", "max", "last"),
    "last": ("last", "max", None),
    "b": ("B", "min", 0.0),
    "m": ("M", "max", "last"),
    "acc": ("acc", "max", None),
    "maa": ("maa", "max", None),
    "la": ("la", "max", None),
    "bwt": ("bwt", "max", 0.0),
    "train_loss": ("train_loss", "min", None),
}
# The names as documented (``tune.objective`` is case-insensitive).
OBJECTIVE_NAMES = ("Avg", "Last", "B", "M", "ACC", "MAA", "BWT", "LA", "train_loss")


def resolve_objective(name: str) -> Objective:
    """``"Avg"`` -> Objective(metric="avg", mode="max", ...); case-insensitive."""
    key = str(name).strip().lower()
    if key not in _OBJECTIVES:
        raise ConfigError(f"tune.objective: {name!r} is not one of {', '.join(OBJECTIVE_NAMES)}")
    metric, mode, fallback = _OBJECTIVES[key]
    return Objective(name=str(name), metric=metric, mode=mode, fallback=fallback)


def report_metrics(t: int, metrics: dict[str, Any], objective: Objective, n_tasks: int) -> dict[str, Any]:
    """What a trial reports to Tune after evaluate(t): the pipeline's numeric metrics plus
    ``objective``, ``objective_defined`` and the time attribute ``tasks_learned``."""
    value, defined = objective.value(metrics)
    out = {k: float(v) for k, v in metrics.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}
    out.update({OBJECTIVE_KEY: value, "objective_defined": int(defined), TIME_ATTR: int(t), "n_tasks": n_tasks})
    return out
