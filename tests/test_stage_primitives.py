"""Run directory markers, the freeze invariant and MLflow tracking, on their real code paths."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from stages.freeze import FreezeInvariantError, run_freeze_stage, tensor_sha256
from stages.rundir import RunDir, RunDirError
from stages.tracking import Tracker, flatten

ROOT = Path(__file__).resolve().parents[1]


def _open(tmp_path, fp="abc"):
    return RunDir.open(tmp_path / "run", name="x", fingerprint=fp, config={"a": 1}, repo=tmp_path)


def test_rundir_marker_verifies_checksums(tmp_path):
    rd = _open(tmp_path)
    d = rd.begin("00-data")
    (d / "out.txt").write_text("hello")
    rd.complete("00-data", wall_s=1.0, result={"n": 1})
    assert rd.completed("00-data")["result"] == {"n": 1}
    (d / "out.txt").write_text("tampered")
    with pytest.raises(RunDirError, match="does not match the sha256"):
        rd.completed("00-data")


def test_rundir_keeps_partial_outputs_aside(tmp_path):
    rd = _open(tmp_path)
    d = rd.begin("02-train-A")
    (d / "partial.bin").write_bytes(b"x")
    assert rd.completed("02-train-A") is None
    d2 = rd.begin("02-train-A")  # redo: the partial output is moved, not deleted
    assert not any(d2.iterdir())
    assert (d2.with_name("02-train-A.incomplete-1") / "partial.bin").read_bytes() == b"x"


def test_rundir_refuses_another_runs_directory(tmp_path):
    rd = _open(tmp_path, fp="one")
    with pytest.raises(RunDirError, match="in progress in another process"):  # two drivers, one run
        RunDir.open(tmp_path / "run", name="x", fingerprint="one", config={"a": 1}, repo=tmp_path, lock_wait_s=0.5)
    rd.begin("00-data")
    rd.complete("00-data", wall_s=1.0)
    del rd  # (releases its run.lock: the refusal must not depend on it)
    with pytest.raises(RunDirError, match="different configuration .* with finished stages \\(00-data\\)"):
        _open(tmp_path, fp="two")
    assert _open(tmp_path, fp="one").completed("00-data")  # same config, no other driver: resume
    assert json.loads((tmp_path / "run" / "run.json").read_text())["fingerprint"] == "one"
    assert not list((tmp_path / "run").glob("replaced-*"))
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "file").write_text("user data")
    with pytest.raises(RunDirError, match="not a pipeline run directory"):
        RunDir.open(tmp_path / "other", name="x", fingerprint="f", config={}, repo=tmp_path)


def test_rundir_of_a_run_that_finished_no_stage_is_taken_over(tmp_path):
    """A run that stopped before finishing any stage (e.g. on a config error after run.json and the
    MLflow store were written) does not lock its directory to its config; its files are kept."""
    rd = _open(tmp_path, fp="one")
    # the earlier run's driver was another process (MLflow caches its store per process)
    code = ("import sys; from stages.tracking import Tracker; "
            "print(Tracker(sys.argv[1], uri=None, experiment='exp').start_parent('p', {'train.lr': '0.1'}, {}))")
    old_parent = subprocess.run([sys.executable, "-c", code, str(rd.root)], check=True, capture_output=True,
                                text=True, cwd=Path(__file__).resolve().parents[1]).stdout.split()[-1]
    (rd.begin("00-data") / "partial.txt").write_text("x")  # started, never finished
    del rd
    logs = []
    rd2 = RunDir.open(tmp_path / "run", name="x", fingerprint="two", config={"a": 2}, repo=tmp_path,
                      log=logs.append)
    assert len(logs) == 1 and "taking over" in logs[0] and "replaced-1" in logs[0]
    root = tmp_path / "run"
    assert json.loads((root / "run.json").read_text())["fingerprint"] == "two"
    old = root / "replaced-1"
    assert json.loads((old / "run.json").read_text())["fingerprint"] == "one"
    assert (old / "mlflow.db").exists() and (old / "mlflow.json").exists()
    assert (old / "stages" / "00-data" / "partial.txt").read_text() == "x"
    assert sorted(p.name for p in root.iterdir()) == ["config.yaml", "replaced-1", "run.json", "run.lock"]
    # the new run gets its own MLflow parent run (the old one's params would clash)
    new_parent = Tracker(rd2.root, uri=None, experiment="exp").start_parent("p", {"train.lr": "0.2"}, {})
    assert new_parent != old_parent
    root2 = rd2.root
    del rd2
    assert _open(tmp_path, fp="two").root == root2  # and resumes as its own


def test_resume_waits_a_moment_for_a_driver_that_is_exiting(tmp_path):
    import threading

    exiting = _open(tmp_path, fp="one")
    threading.Timer(0.5, exiting._lock_file.close).start()  # its process ends: the lock goes
    resumed = RunDir.open(tmp_path / "run", name="x", fingerprint="one", config={"a": 1}, repo=tmp_path,
                          lock_wait_s=10.0)
    assert resumed._lock_file is not None


def test_rundir_in_use_is_not_taken_over(tmp_path):
    rd = _open(tmp_path, fp="one")  # holds run.lock, as a live run's driver does
    with pytest.raises(RunDirError, match="another process"):
        _open(tmp_path, fp="two")
    assert json.loads((rd.root / "run.json").read_text())["fingerprint"] == "one"


def _state(tmp_path, name, tensors):
    path = tmp_path / f"{name}.safetensors"
    save_file(tensors, str(path))
    return path


def test_freeze_invariant_passes_and_catches_changes(tmp_path):
    p0 = torch.randn(3, 4)
    s0 = _state(tmp_path, "s0", {"task0.prompt": p0})
    f0 = tmp_path / "f0"
    f0.mkdir()
    run_freeze_stage(f0, trained_state=s0, train_meta={"task_keys": {"0": ["task0.prompt"]}},
                     task_index=0, task_name="A", earlier_manifests={})
    manifest = json.loads((f0 / "manifest.json").read_text())
    assert manifest["tensors"]["task0.prompt"] == tensor_sha256(p0)

    ok = _state(tmp_path, "s1", {"task0.prompt": p0.clone(), "task1.prompt": torch.randn(3, 4)})
    f1 = tmp_path / "f1"
    f1.mkdir()
    out = run_freeze_stage(f1, trained_state=ok, train_meta={"task_keys": {"1": ["task1.prompt"]}},
                           task_index=1, task_name="B", earlier_manifests={0: f0 / "manifest.json"})
    assert out["frozen_checked"] == 1

    changed = p0.clone()
    changed[0, 0] = torch.nextafter(changed[0, 0], torch.tensor(10.0))  # one ulp: still caught
    bad = _state(tmp_path, "s2", {"task0.prompt": changed, "task1.prompt": torch.randn(3, 4)})
    f2 = tmp_path / "f2"
    f2.mkdir()
    with pytest.raises(FreezeInvariantError, match="task 0 tensor 'task0.prompt'"):
        run_freeze_stage(f2, trained_state=bad, train_meta={"task_keys": {"1": ["task1.prompt"]}},
                         task_index=1, task_name="B", earlier_manifests={0: f0 / "manifest.json"})


def test_tracker_parent_and_nested_runs(tmp_path):
    tr = Tracker(tmp_path, uri=None, experiment="exp")
    parent = tr.start_parent("p", {"train.lr": "0.1"}, {"method": "m"})
    child = tr.start_stage("02-train-A")
    tr.log_metric_series(child, [{"step": 1, "loss": 2.0}, {"step": 2, "loss": 1.0}])
    (tmp_path / "a.json").write_text("{}")
    tr.log_artifact(child, tmp_path / "a.json")
    tr.end(child)
    run = tr.client.get_run(child)
    assert run.data.tags["mlflow.parentRunId"] == parent
    hist = tr.client.get_metric_history(child, "loss")
    assert [(m.step, m.value) for m in hist] == [(1, 2.0), (2, 1.0)]
    assert [a.path for a in tr.client.list_artifacts(child)] == ["a.json"]
    # resuming re-attaches to the same parent run
    assert Tracker(tmp_path, uri=None, experiment="exp").start_parent("p", {}, {}) == parent


def test_resume_marks_stage_runs_of_a_killed_driver_killed_and_logs_metrics_once(tmp_path):
    tr = Tracker(tmp_path, uri=None, experiment="exp")
    parent = tr.start_parent("p", {}, {})
    done = tr.start_stage("02-train-A")
    tr.end(done)
    abandoned = tr.start_stage("05-train-B")  # the driver dies here: never ended
    tr.log_metrics(parent, {"acc/A": 50.0}, step=1)
    other = Tracker(tmp_path, uri=None, experiment="exp")
    unrelated = other.client.create_run(other.experiment_id, run_name="not-ours").info.run_id  # no parent tag
    # a nested run that is not a stage (a sweep's trial run): Tune resumes it, it is left alone
    trial = other.client.create_run(other.experiment_id, run_name="trial",
                                    tags={"mlflow.parentRunId": parent}).info.run_id
    assert other.start_parent("p", {}, {}) == parent
    status = lambda r: other.client.get_run(r).info.status  # noqa: E731
    assert (status(done), status(abandoned), status(unrelated), status(trial)) == (
        "FINISHED", "KILLED", "RUNNING", "RUNNING")
    assert "re-run on resume" in other.client.get_run(abandoned).data.tags["stopped"]
    assert other.has_metric_at(parent, "acc/A", 1) and not other.has_metric_at(parent, "acc/A", 2)
    assert not other.has_metric_at(parent, "acc/never", 1)


def test_run_dir_records_every_invocation(tmp_path):
    rd = RunDir.open(tmp_path / "r", name="x", fingerprint="f", config={}, repo=tmp_path)
    assert rd.invocations() == []
    rd.record_invocation(started=1.0, wall_s=10.004, outcome="stopped")
    rd.record_invocation(started=20.0, wall_s=5.0, outcome="finished")
    assert rd.invocations() == [{"started": 1.0, "wall_s": 10.0, "outcome": "stopped"},
                                {"started": 20.0, "wall_s": 5.0, "outcome": "finished"}]
    with open(rd.root / "invocations.jsonl", "a") as fh:  # a driver killed mid-write
        fh.write('{"started": 30.0, "wall')
    rd.record_invocation(started=40.0, wall_s=1.0, outcome="failed")
    assert [i["started"] for i in rd.invocations()] == [1.0, 20.0, 40.0]  # the torn line is left out


def test_flatten_drops_secret_looking_keys():
    flat = flatten({"data": {"root": "s3://b/p", "aws_secret_access_key": "x"}, "token": "y", "a": [1, 2]})
    assert flat == {"data.root": "s3://b/p", "a": "[1, 2]"}


def test_sigterm_notice_is_printed_before_rays_handler_stops_the_driver():
    """``ray job stop`` sends SIGTERM; Ray's driver handler exits and Ray aborts the process about
    3 s later, so the resume hint must be printed in the handler itself, not after clean-up.
    Run in a child process: the test must not replace pytest's own signal handlers."""
    code = (
        "import os, signal, sys\n"
        "from stages.runner import _say_on_sigterm\n"
        "signal.signal(signal.SIGTERM, lambda s, f: sys.exit(s))  # what ray.init installs\n"
        "_say_on_sigterm('first notice')\n"
        "_say_on_sigterm('how to resume')  # a second init_ray: one handler, the latest notice\n"
        "try:\n"
        "    os.kill(os.getpid(), signal.SIGTERM)\n"
        "    signal.pause()\n"
        "except SystemExit as exc:\n"
        "    print('exit', exc.code)\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    assert proc.stderr.strip().splitlines() == ["how to resume"]
    assert proc.stdout.strip() == "exit 15"
