"""The stage executor (stages/dag.py::execute) with a real run directory and a real MLflow store:
evaluate stages in the background overlap the next training stage, reports stay in DAG order,
failures stop the run without losing finished work, and a re-run resumes."""

from __future__ import annotations

import threading
import time

import pytest

from pipeline.config import ConfigError, load_config
from stages import dag
from stages.rundir import RunDir
from stages.runner import isolation_plan, overlap_plan, resident_plan
from stages.tracking import Tracker


def _setup(tmp_path):
    cfg = load_config(None, ["tasks=[ScienceQA, TextVQA, ImageNet]"])
    stages = dag.build_dag(cfg, "sequential")
    rd = RunDir.open(tmp_path / "run", name="x", fingerprint="f", config={}, repo=tmp_path)
    tracker = Tracker(rd.root, uri=None, experiment="exp")
    tracker.start_parent("p", {}, {})
    return stages, rd, tracker


class Recorder:
    """A run_one that records start/end per stage; evaluate(t) waits until train(t+1) has started
    (when there is one), which only an executor that overlaps them lets happen."""

    def __init__(self, stages, fail: str | None = None, wait: bool = True):
        self.events: list[tuple[str, str]] = []
        self.reported: list[str] = []
        self.lock = threading.Lock()
        self.started = {s.id: threading.Event() for s in stages}
        self.next_train = {}
        trains = [s for s in stages if s.kind == "train"]
        for s in stages:
            if wait and s.kind == "evaluate" and s.task_index + 1 < len(trains):
                self.next_train[s.id] = trains[s.task_index + 1].id
        self.fail = fail

    def run_one(self, stage, stage_dir, run_id):
        with self.lock:
            self.events.append(("start", stage.id))
        self.started[stage.id].set()  # after the event is recorded: a waiting stage then ends after it
        (stage_dir / "out.txt").write_text(stage.id)
        if stage.id in self.next_train:
            assert self.started[self.next_train[stage.id]].wait(timeout=20), "evaluate did not overlap training"
        if stage.kind == "train":
            time.sleep(0.3)
        if stage.id == self.fail:
            raise RuntimeError(f"boom in {stage.id}")
        with self.lock:
            self.events.append(("end", stage.id))
        return {"stage": stage.id}

    def on_done(self, stage, marker, skipped):
        assert threading.current_thread() is threading.main_thread()
        self.reported.append(stage.id)


def _execute(stages, rec, rd, tracker):
    """The executor as the runner calls it when it overlaps: evaluate stages in the background."""
    return dag.execute(stages, rec.run_one, rundir=rd, tracker=tracker, on_done=rec.on_done,
                       log=lambda m: None, background={"evaluate"})


def test_background_evaluate_overlaps_next_train_and_reports_in_order(tmp_path):
    stages, rd, tracker = _setup(tmp_path)
    rec = Recorder(stages)
    markers = _execute(stages, rec, rd, tracker)
    ids = [s.id for s in stages]
    assert list(markers) != [] and set(markers) == set(ids)
    assert rec.reported == ids  # on_done in DAG order, on the calling thread
    ev = rec.events
    # evaluate(ScienceQA) was still running when train(TextVQA) started
    assert ev.index(("start", "05-train-TextVQA")) < ev.index(("end", "04-eval-ScienceQA"))
    for s in stages:  # every stage started after all its dependencies ended
        for d in s.deps:
            assert ev.index(("end", d)) < ev.index(("start", s.id))
    # evaluate stages ran one at a time
    evals = [e for e in ev if "-eval-" in e[1]]
    assert [k for k, _ in evals] == ["start", "end"] * 3
    runs = tracker.client.search_runs([tracker.experiment_id])
    assert sum(r.info.status == "FINISHED" for r in runs) == len(ids)  # + the parent, still running


def test_sequential_without_background(tmp_path):
    stages, rd, tracker = _setup(tmp_path)
    order = []
    dag.execute(stages, lambda s, d, r: order.append(s.id) or {}, rundir=rd, tracker=tracker,
                on_done=lambda *a: None, log=lambda m: None)
    assert order == [s.id for s in stages]


def test_failure_in_background_keeps_finished_work_and_resumes(tmp_path):
    stages, rd, tracker = _setup(tmp_path)
    rec = Recorder(stages, fail="04-eval-ScienceQA")
    with pytest.raises(RuntimeError, match="boom in 04-eval-ScienceQA"):
        _execute(stages, rec, rd, tracker)
    # the training stage running beside the failed evaluation finished and kept its marker;
    # nothing after it started
    assert rd.completed("05-train-TextVQA") is not None
    assert rd.completed("04-eval-ScienceQA") is None
    started = [sid for kind, sid in rec.events if kind == "start"]
    assert started[-1] in ("04-eval-ScienceQA", "05-train-TextVQA")
    assert "06-freeze-TextVQA" not in started
    assert rec.reported == ["00-data", "01-base", "02-train-ScienceQA", "03-freeze-ScienceQA"]
    assert "boom" in (rd.stage_dir("04-eval-ScienceQA") / "ERROR.txt").read_text()

    # re-run: the finished stages are skipped, the failed one and the rest run
    rec2 = Recorder(stages, wait=False)
    _execute(stages, rec2, rd, tracker)
    rerun = [sid for kind, sid in rec2.events if kind == "start"]
    kept = {"00-data", "01-base", "02-train-ScienceQA", "03-freeze-ScienceQA", "05-train-TextVQA"}
    assert sorted(rerun) == sorted(s.id for s in stages if s.id not in kept)  # each once, in any thread order
    assert rec2.reported == [s.id for s in stages]


def test_failure_in_background_stops_queued_background_stages(tmp_path):
    """evaluate(1) fails while evaluate(2) is already queued behind it: evaluate(2) never starts,
    and the run stops instead of waiting for it."""
    stages, rd, tracker = _setup(tmp_path)
    gate = threading.Event()

    def run_one(stage, stage_dir, run_id):
        if stage.id == "04-eval-ScienceQA":
            assert gate.wait(timeout=20)  # until evaluate(TextVQA) is queued
            raise RuntimeError("boom")
        if stage.id == "07-eval-TextVQA":
            raise AssertionError("a stage queued behind a failed one must not start")
        return {}

    def log(msg):
        if "07-eval-TextVQA: running" in msg:
            raise AssertionError(msg)

    def on_done(stage, marker, skipped):
        pass

    class Gate:  # opens when freeze(TextVQA) ends, i.e. right before evaluate(TextVQA) is queued
        def completed(self, sid):
            return rd.completed(sid)

        def __getattr__(self, name):
            return getattr(rd, name)

        def complete(self, sid, **kw):
            m = rd.complete(sid, **kw)
            if sid == "06-freeze-TextVQA":
                threading.Timer(0.2, gate.set).start()
            return m

    with pytest.raises(RuntimeError, match="boom"):
        dag.execute(stages, run_one, rundir=Gate(), tracker=tracker, on_done=on_done, log=log,
                    background={"evaluate"})
    assert rd.completed("06-freeze-TextVQA") is not None and rd.completed("07-eval-TextVQA") is None


def test_failure_inline_waits_for_background_stage(tmp_path):
    stages, rd, tracker = _setup(tmp_path)
    rec = Recorder(stages, fail="05-train-TextVQA")
    with pytest.raises(RuntimeError, match="boom in 05-train-TextVQA"):
        _execute(stages, rec, rd, tracker)
    assert rd.completed("04-eval-ScienceQA") is not None  # finished beside the failing stage, kept
    assert rec.reported[-1] == "04-eval-ScienceQA"


def test_overlap_plan_needs_room_for_both_stages_and_a_decode_task():
    cfg = load_config(None)
    assert overlap_plan(cfg, {"CPU": 2.0})[0]  # 1 (train) + 0.5 (eval actor) + 0.5 (decode)
    ok, why = overlap_plan(cfg, {"CPU": 1.5})
    assert not ok and "need 2 CPU" in why
    cfg = load_config(None, ["eval.cpus_per_actor=1"])
    assert not overlap_plan(cfg, {"CPU": 2.0})[0]
    cfg = load_config(None, ["resources.overlap_evaluate=false"])
    assert overlap_plan(cfg, {"CPU": 64.0}) == (False, "resources.overlap_evaluate is off")
    cfg = load_config(None, ["train.gpus_per_worker=1", "eval.gpus_per_actor=1"])
    assert not overlap_plan(cfg, {"CPU": 16.0, "GPU": 1.0})[0]
    assert overlap_plan(cfg, {"CPU": 16.0, "GPU": 2.0})[0]


def test_resident_plan_needs_the_same_room_and_a_sequential_run_outside_sweeps():
    cfg = load_config(None)
    ok, why = resident_plan(cfg, {"CPU": 2.0}, "sequential", trial=False)
    assert ok and "one Ray Train worker group" in why
    ok, why = resident_plan(cfg, {"CPU": 1.5}, "sequential", trial=False)
    assert not ok and "need 2 CPU" in why  # workers idle beside an evaluation would starve it
    assert not resident_plan(cfg, {"CPU": 64.0}, "sequential", trial=True)[0]
    assert not resident_plan(cfg, {"CPU": 64.0}, "joint", trial=False)[0]
    assert not resident_plan(load_config(None, ["tasks=[ScienceQA]"]), {"CPU": 64.0}, "sequential", trial=False)[0]
    cfg = load_config(None, ["resources.resident_train=false"])
    assert resident_plan(cfg, {"CPU": 64.0}, "sequential", trial=False) == (False, "resources.resident_train is off")


def test_isolation_plan_puts_side_by_side_what_the_cluster_holds():
    cfg = load_config(None)  # each one-task run holds 1 (train) + 0.5 (eval actor) + 0.5 (decode) CPU
    assert isolation_plan(cfg, {"CPU": 2.0})[0] == 1
    assert isolation_plan(cfg, {"CPU": 7.9})[0] == 3
    k, why = isolation_plan(cfg, {"CPU": 64.0})
    assert k == 8 and "each holds 2 CPU / 0 GPU" in why  # never more than the tasks
    k, why = isolation_plan(load_config(None, ["resources.isolation_parallel=2"]), {"CPU": 64.0})
    assert k == 2 and "resources.isolation_parallel=2" in why
    cfg = load_config(None, ["train.gpus_per_worker=1", "eval.gpus_per_actor=1"])
    assert isolation_plan(cfg, {"CPU": 64.0, "GPU": 8.0})[0] == 4  # 2 GPUs each
    assert isolation_plan(cfg, {"CPU": 64.0, "GPU": 1.0})[0] == 1  # one at a time even if none fits
    with pytest.raises(ConfigError, match="isolation_parallel"):
        load_config(None, ["resources.isolation_parallel=-1"])


def _stop_during_next_train(tmp_path, stop: BaseException):
    """train(TextVQA) is stopped by ``stop`` while evaluate(ScienceQA) runs in the background,
    held until the caller opens the returned gate."""
    stages, rd, tracker = _setup(tmp_path)
    gate, logs = threading.Event(), []

    def run_one(stage, stage_dir, run_id):
        (stage_dir / "out.txt").write_text(stage.id)
        if stage.id == "04-eval-ScienceQA":
            assert gate.wait(timeout=20)
        if stage.id == "05-train-TextVQA":
            raise stop
        return {}

    def go():
        dag.execute(stages, run_one, rundir=rd, tracker=tracker, on_done=lambda *a: None,
                    log=logs.append, background={"evaluate"})

    return rd, gate, logs, go


def _join_background():
    for t in threading.enumerate():
        if t.name == "stages-background":
            t.join(timeout=20)


def test_sigterm_abandons_background_stage_and_says_so(tmp_path):
    """Ray's driver turns SIGTERM into SystemExit(15) and aborts the process ~3 s later, so the
    executor must not claim to wait for (and keep) the stage running in the background."""
    rd, gate, logs, go = _stop_during_next_train(tmp_path, SystemExit(15))
    t0 = time.time()
    with pytest.raises(SystemExit):
        go()
    assert time.time() - t0 < 10  # did not wait for the held evaluation
    assert rd.completed("04-eval-ScienceQA") is None
    stop = [m for m in logs if m.startswith("stopping")]
    assert stop == ["stopping on SIGTERM: ['04-eval-ScienceQA'] still running are abandoned (no DONE.json "
                    "marker); re-running the command re-runs them"]
    gate.set()
    _join_background()


def test_ctrl_c_waits_for_background_stage_and_keeps_it(tmp_path):
    rd, gate, logs, go = _stop_during_next_train(tmp_path, KeyboardInterrupt())
    threading.Timer(0.5, gate.set).start()
    with pytest.raises(KeyboardInterrupt):
        go()
    assert rd.completed("04-eval-ScienceQA") is not None
    assert any(m.startswith("interrupted: waiting for ['04-eval-ScienceQA']") for m in logs)
