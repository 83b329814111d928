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
    assert _open(tmp_path, fp="one").root.exists()  # same config: resume
    rd.begin("00-data")
    rd.complete("00-data", wall_s=1.0)
    del rd  # (releases its run.lock: the refusal must not depend on it)
    with pytest.raises(RunDirError, match="different configuration .* with finished stages \\(00-data\\)"):
        _open(tmp_path, fp="two")
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
    assert _open(tmp_path, fp="two").root == rd2.root  # and resumes as its own


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


def test_flatten_drops_secret_looking_keys():
    flat = flatten({"data": {"root": "s3://b/p", "aws_secret_access_key": "x"}, "token": "y", "a": [1, 2]})
    assert flat == {"data.root": "s3://b/p", "a": "[1, 2]"}
