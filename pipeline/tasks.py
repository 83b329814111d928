"""Tasks are data: a benchmark names its tasks, each task's files and its scorer.

CoIN and CoIN-synth (generated in CoIN's layout) are two benchmarks with the same eight tasks. A
user's own task is a LLaVA-format folder plus a scorer name, declared in the experiment config
(``data.custom_tasks``, see ``CustomTaskConfig`` in pipeline/config.py); ``task_table`` merges
the two. The stages look a task up here and nowhere else.
"""

from __future__ import annotations

from dataclasses import dataclass

from pipeline.data.schema import COIN_TASKS, TASK_FILES
from pipeline.scoring.scorers import COIN_SCORERS, scorer_info


@dataclass(frozen=True)
class TaskSpec:
    name: str
    train: str  # the train split's JSON file: relative to the instructions root, or absolute / URL
    test: str  # the test split's JSON file (CoIN's val files are the test split)
    scorer: str  # a name in pipeline.scoring.scorers.SCORERS
    image_root: str | None = None  # None: the benchmark's image root

    def file(self, split: str) -> str:
        return {"train": self.train, "test": self.test}[split]

    @property
    def box_answers(self) -> bool:
        """Test records answer with a box (``answer_bbox`` + ``size``), not a text answer."""
        return scorer_info(self.scorer).answers == "box"

    @property
    def external(self) -> bool:
        return self.image_root is not None or is_absolute(self.train)


@dataclass(frozen=True)
class Benchmark:
    name: str
    tasks: tuple[TaskSpec, ...]

    @property
    def names(self) -> list[str]:
        return [t.name for t in self.tasks]


COIN = Benchmark("coin", tuple(TaskSpec(n, TASK_FILES[n]["train"], TASK_FILES[n]["test"], COIN_SCORERS[n])
                               for n in COIN_TASKS))
COIN_SYNTH = Benchmark("coin-synth", COIN.tasks)  # generated in CoIN's layout (pipeline/data/synth.py)
BENCHMARKS = {b.name: b for b in (COIN, COIN_SYNTH)}


def is_absolute(path: str) -> bool:
    return "://" in path or path.startswith("/")


def task_table(custom: tuple[TaskSpec, ...] | list[TaskSpec] = (), benchmark: Benchmark = COIN) -> dict[str, TaskSpec]:
    """The benchmark's tasks plus the user's own (a user task may not reuse a benchmark task's name)."""
    table = {t.name: t for t in benchmark.tasks}
    for t in custom:
        if t.name in table:
            raise ValueError(f"custom task {t.name!r}: the name of a {benchmark.name} task; choose another name")
        table[t.name] = t
    return table
