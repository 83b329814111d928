"""Credentials planted in the environment and in the tracking URI never show up in what a run or a
sweep leaves: the terminal output, every file of the run directory, the MLflow server's store and
artifacts, and the MLflow params and tags (issue: secrets stay secret).

The run reads its data from a real S3 API server on loopback (moto) with the planted keys, and
tracks to a real ``mlflow server`` through a URI that carries a user and a token. The server is
stopped while the run trains and started again 10 s later (a fault drill): the run goes on, and
every stage run, metric and artifact is in MLflow exactly once."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

from pipeline.redaction import redact, secret_env_name, strip_tracking_credentials
from tests.helpers import ROOT, SMALL, free_port, pipeline_env
from tests.s3_server import FAKE_KEY_ID, FAKE_SECRET, s3_env, s3_server, upload_tree  # noqa: F401 (fixtures)

TOKEN = "tok-7f3a9c1e5b2d4e6f8a0b"  # inside the tracking URI
SESSION = "sess-c0ffee0ddba11deadbeefcafe"  # AWS_SESSION_TOKEN
OTHER = {"HF_TOKEN": "hf_plantedTokenNeverToBeSeen42", "WANDB_API_KEY": "wandb-planted-0123456789abcdef",
         "MLFLOW_TRACKING_PASSWORD": "mlflow-pass-planted-9876"}
SECRETS = [FAKE_SECRET, TOKEN, SESSION, *OTHER.values()]


def test_redact_masks_url_credentials_query_secrets_and_env_values() -> None:
    env = {"MY_API_KEY": "abcdef123456", "PATH": "/usr/bin", "TOKENIZERS_PARALLELISM": "falsefalse"}
    text = ("http://alice:s3cr3t@host:5000/x https://tok123@h/y s3://b/k?X-Amz-Signature=deadbeef&part=2 "
            "key abcdef123456 /usr/bin falsefalse")
    assert redact(text, env) == ("http://alice:***@host:5000/x https://***@h/y s3://b/k?X-Amz-Signature=***&part=2 "
                                 "key *** /usr/bin falsefalse")
    assert [n for n in ("AWS_SECRET_ACCESS_KEY", "AWS_ACCESS_KEY_ID", "MLFLOW_TRACKING_PASSWORD", "HF_TOKEN",
                        "WANDB_API_KEY", "AWS_SESSION_TOKEN", "TOKENIZERS_PARALLELISM", "KEYBOARD", "HOME")
            if secret_env_name(n)] == ["AWS_SECRET_ACCESS_KEY", "AWS_ACCESS_KEY_ID", "MLFLOW_TRACKING_PASSWORD",
                                       "HF_TOKEN", "WANDB_API_KEY", "AWS_SESSION_TOKEN"]


def test_tracking_credentials_move_to_mlflows_variables(monkeypatch) -> None:
    for name in ("MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD", "MLFLOW_TRACKING_TOKEN"):
        monkeypatch.delenv(name, raising=False)
    assert strip_tracking_credentials("https://alice:p%40ss@mlflow.example.com:8443/base") == \
        "https://mlflow.example.com:8443/base"
    assert (os.environ["MLFLOW_TRACKING_USERNAME"], os.environ["MLFLOW_TRACKING_PASSWORD"]) == ("alice", "p@ss")
    assert strip_tracking_credentials("http://tok@127.0.0.1:5000") == "http://127.0.0.1:5000"
    assert os.environ["MLFLOW_TRACKING_TOKEN"] == "tok"
    for plain in ("sqlite:////tmp/a@b/mlflow.db", "http://127.0.0.1:5000", None):
        assert strip_tracking_credentials(plain) == plain

    from pipeline.config import load_config

    cfg = load_config(None, [f"tracking.uri=http://bob:{TOKEN}@127.0.0.1:5000"])
    assert cfg.tracking.uri == "http://127.0.0.1:5000" and TOKEN not in str(cfg.to_dict())


class MlflowServer:
    """A real tracking server on loopback, as teams run one (SQLite store, served artifacts), that
    a test can stop and start again on the same port and store."""

    def __init__(self, root: Path) -> None:
        self.port, self.store = free_port(), root / "mlflow-server"
        self.store.mkdir()
        self.url = f"http://127.0.0.1:{self.port}"
        self.proc: subprocess.Popen | None = None

    def start(self) -> None:
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "mlflow", "server", "--host", "127.0.0.1", "--port", str(self.port),
             "--backend-store-uri", f"sqlite:///{self.store / 'store.db'}",
             "--artifacts-destination", str(self.store / "artifacts"), "--workers", "1"],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, cwd=self.store, start_new_session=True)
        deadline = time.time() + 120
        while True:
            try:
                urllib.request.urlopen(self.url + "/health", timeout=2).close()
                return
            except OSError:
                assert self.proc.poll() is None, "mlflow server exited"
                assert time.time() < deadline, "mlflow server did not start"
                time.sleep(0.5)

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)  # the server and its workers
            try:
                self.proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait()


@pytest.fixture
def mlflow_server(tmp_path: Path):
    server = MlflowServer(tmp_path)
    server.start()
    yield server
    server.stop()


def _files_with_secrets(root: Path) -> list[str]:
    found = []
    for path in root.rglob("*"):
        if path.is_file():
            data = path.read_bytes()
            found += [f"{path}: {s[:6]}..." for s in SECRETS if s.encode() in data]
    return found


@pytest.mark.slow
def test_a_run_and_a_sweep_leave_no_credential_anywhere(tmp_path, s3_env, s3_server, mlflow_server) -> None:
    from mlflow.tracking import MlflowClient

    from pipeline.data.synth import SynthSpec, generate_benchmark

    url, store = mlflow_server.url, mlflow_server.store
    tasks = ("ScienceQA", "ImageNet")
    generate_benchmark(tmp_path / "synth", SynthSpec(image_size=64, train_per_task=16, test_per_task=8,
                                                     pretrain_records=0, pretrain_skill_per_task=0, tasks=tasks))
    upload_tree(tmp_path / "synth", s3_env, "coin", s3_server)
    env = dict(pipeline_env(), AWS_SESSION_TOKEN=SESSION, **OTHER)
    env.pop("MLFLOW_TRACKING_USERNAME", None)
    host = url.split("://", 1)[1]
    common = [f"cache_dir={tmp_path / 'cache'}", *SMALL, f"tasks=[{','.join(tasks)}]", "data.source=coin",
              f"data.root=s3://{s3_env}/coin", f"data.image_root=s3://{s3_env}/coin/images",
              f"tracking.uri=http://planted-user:{TOKEN}@{host}"]
    proc = subprocess.Popen([sys.executable, "pipeline/main.py", "--output", str(tmp_path / "run"), *common],
                            cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    # the tracking server goes away while the first task trains, and comes back 10 s later
    deadline = time.time() + 600
    while not (tmp_path / "run" / "stages" / "02-train-ScienceQA").exists() and proc.poll() is None:
        assert time.time() < deadline
        time.sleep(0.2)
    mlflow_server.stop()
    time.sleep(10)
    mlflow_server.start()
    stdout, stderr = proc.communicate(timeout=900)
    run = subprocess.CompletedProcess(proc.args, proc.returncode, stdout, stderr)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    assert "Accuracy matrix" in run.stdout and f"MLflow: {url}" in run.stdout
    sweep = subprocess.run([sys.executable, "pipeline/main.py", "tune", "--output", str(tmp_path / "sweep"), *common,
                            "tune.space={k: {grid: [1]}, M: 5}", "tune.num_samples=1"],
                           cwd=ROOT, env=dict(env, TUNE_GLOBAL_CHECKPOINT_S="2"), capture_output=True, text=True,
                           timeout=900)
    assert sweep.returncode == 0, sweep.stdout[-3000:] + sweep.stderr[-3000:]

    for name, proc in (("run", run), ("sweep", sweep)):
        for secret in SECRETS:
            assert secret not in proc.stdout and secret not in proc.stderr, f"{name} printed {secret[:6]}..."
    assert _files_with_secrets(tmp_path / "run") == []
    assert _files_with_secrets(tmp_path / "sweep") == []
    assert _files_with_secrets(store) == []  # the server's store and its artifacts

    client = MlflowClient(tracking_uri=url)
    runs = [r for e in client.search_experiments() for r in client.search_runs([e.experiment_id], max_results=1000)]
    assert len(runs) >= 2 * 8  # a parent and 7 stage runs each, at least
    for r in runs:
        text = repr(r.data.params) + repr(r.data.tags)
        assert not [s for s in SECRETS if s in text], r.info.run_id
    recorded = {r.data.params["tracking.uri"] for r in runs if "tracking.uri" in r.data.params}
    assert recorded <= {url}  # where the URI is recorded, it is the clean one

    # the server's outage lost nothing and doubled nothing: each stage run FINISHED once with its
    # marker, each metric of the run once per step
    result = json.loads((tmp_path / "run" / "results.json").read_text())
    parent = client.get_run(result["mlflow"]["run_id"])
    stages = [r for r in runs if r.data.tags.get("mlflow.parentRunId") == parent.info.run_id]
    assert sorted(r.info.run_name for r in stages if r.info.status == "FINISHED") == sorted(result["stage_wall_s"])
    for r in stages:
        assert "DONE.json" in {a.path for a in client.list_artifacts(r.info.run_id)}, r.info.run_name
        for key in r.data.metrics:
            steps = [m.step for m in client.get_metric_history(r.info.run_id, key)]
            assert len(steps) == len(set(steps)), (r.info.run_name, key, steps)
    for key in parent.data.metrics:
        steps = [m.step for m in client.get_metric_history(parent.info.run_id, key)]
        assert len(steps) == len(set(steps)), (key, steps)
    assert [m.step for m in client.get_metric_history(parent.info.run_id, "acc/ScienceQA")] == [1, 2]
    assert {"results.json", "accuracy_matrix.png"} <= {a.path for a in client.list_artifacts(parent.info.run_id)}
