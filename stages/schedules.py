"""How a method's schedule lays out the stage DAG and which frozen state each stage reads.

One class per schedule (``pipeline.methods.protocol.SCHEDULES``), looked up in ``SCHEDULES``:

    sequential:  train(1) -> freeze(1) -> eval(1) -> train(2) -> ... ; freeze(t) -> train(t+1)
    joint:       train(all) -> freeze(all) -> eval(all)       (the multi-task bound)
    none:        eval(all)                                    (zero-shot: nothing to train)
"""

from __future__ import annotations

from dataclasses import dataclass, field

from pipeline.methods.protocol import JOINT, NONE, SEQUENTIAL


@dataclass
class Stage:
    id: str
    kind: str  # a key of stages.kinds.STAGE_KINDS
    deps: list[str] = field(default_factory=list)
    task_index: int | None = None  # index into the experiment's task list (0-based)
    tasks: list[str] = field(default_factory=list)  # tasks trained (train/freeze) or evaluated

    def describe(self) -> str:
        what = f" [{', '.join(self.tasks)}]" if self.tasks else ""
        deps = f"  <- {', '.join(self.deps)}" if self.deps else ""
        return f"{self.id:<28} {self.kind:<9}{what}{deps}"

    @property
    def task_name(self) -> str:
        """The task a train/freeze stage learns ("joint" for the union of all tasks)."""
        return self.tasks[0] if len(self.tasks) == 1 else "joint"


class Schedule:
    name = ""
    trains = True
    shuffle_union = False  # shuffle the union of the tasks' training data (joint training)

    def stages(self, tasks: list[str], first: int, after: str) -> list[Stage]:
        raise NotImplementedError

    def start_state(self, stage: Stage, stages: list[Stage]) -> Stage | None:
        """The freeze stage whose state a train stage starts from (None: from nothing)."""
        return None

    def eval_state(self, stage: Stage, stages: list[Stage]) -> Stage | None:
        """The freeze stage whose state an evaluate stage reads (None: the bare base model)."""
        return _find(stages, "freeze", stage.task_index) if self.trains else None

    def row(self, stage: Stage, n_tasks: int) -> int:
        """The accuracy-matrix row an evaluate stage fills (tasks learned - 1)."""
        return n_tasks - 1

    def tasks_done(self, task_index: int) -> list[int]:
        return [task_index]

    def is_continual(self) -> bool:
        return False


class Sequential(Schedule):
    name = SEQUENTIAL

    def stages(self, tasks, first, after):
        out, prev, n = [], after, first
        for t, task in enumerate(tasks):
            tr, fr, ev = (f"{n:02d}-train-{task}", f"{n + 1:02d}-freeze-{task}", f"{n + 2:02d}-eval-{task}")
            out += [Stage(tr, "train", deps=[prev], tasks=[task], task_index=t),
                    Stage(fr, "freeze", deps=[tr], tasks=[task], task_index=t),
                    Stage(ev, "evaluate", deps=[fr], tasks=tasks[: t + 1], task_index=t)]
            prev, n = fr, n + 3
        return out

    def start_state(self, stage, stages):
        return _find(stages, "freeze", stage.task_index - 1) if stage.task_index else None

    def row(self, stage, n_tasks):
        return stage.task_index

    def tasks_done(self, task_index):
        return list(range(task_index + 1))

    def is_continual(self) -> bool:
        return True


class Joint(Schedule):
    name = JOINT
    shuffle_union = True

    def stages(self, tasks, first, after):
        n = first
        return [Stage(f"{n:02d}-train-joint", "train", deps=[after], tasks=list(tasks), task_index=0),
                Stage(f"{n + 1:02d}-freeze-joint", "freeze", deps=[f"{n:02d}-train-joint"], tasks=list(tasks),
                      task_index=0),
                Stage(f"{n + 2:02d}-eval-joint", "evaluate", deps=[f"{n + 1:02d}-freeze-joint"], tasks=list(tasks),
                      task_index=len(tasks) - 1)]

    def eval_state(self, stage, stages):
        return _find(stages, "freeze", 0)


class Untrained(Schedule):
    name = NONE
    trains = False

    def stages(self, tasks, first, after):
        return [Stage(f"{first:02d}-eval-all", "evaluate", deps=[after], tasks=list(tasks),
                      task_index=len(tasks) - 1)]


SCHEDULES: dict[str, Schedule] = {s.name: s for s in (Sequential(), Joint(), Untrained())}


def schedule_for(name: str) -> Schedule:
    if name not in SCHEDULES:
        raise ValueError(f"unknown method schedule {name!r}; known: {sorted(SCHEDULES)}")
    return SCHEDULES[name]


def _find(stages: list[Stage], kind: str, task_index: int) -> Stage:
    return next(s for s in stages if s.kind == kind and s.task_index == task_index)
