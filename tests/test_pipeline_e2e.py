"""End to end through ``python pipeline/main.py``: the stage DAG on a real local Ray, real
Ray Train + DeepSpeed, Ray Data inference and a real MLflow store.

The default tier runs one reduced two-task pipeline (resident Train workers), its no-op re-run and
EWC with a fit per train stage; the slow tier compares the two training modes, kills the driver
at five seeded points of one run and resumes it each time, stops one with SIGTERM and resumes it,
kills a Train worker mid-job (Ray Train restarts it from the job's checkpoint), and submits the job
to a real ``ray start --head`` with ``ray job submit``.
"""

from __future__ import annotations

import json
import math
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from tests import helpers

ROOT = Path(__file__).resolve().parents[1]
PY = sys.executable

SMALL = ["tasks=[ScienceQA,TextVQA]", *helpers.SMALL]


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("cache")


_env = helpers.pipeline_env


def _run(out: Path, cache: Path, *extra: str, timeout: int = 900) -> subprocess.CompletedProcess:
    return helpers.run_pipeline(out, cache, "tasks=[ScienceQA,TextVQA]", *extra, timeout=timeout)


def _results(out: Path) -> dict:
    return json.loads((out / "results.json").read_text())


@pytest.fixture(scope="module")
def small_run(tmp_path_factory, cache_dir):
    out = tmp_path_factory.mktemp("small") / "run"
    proc = _run(out, cache_dir)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    return out, proc


def _frozen_tensor_sha256(out: Path, stage: str) -> dict[str, str]:
    """The freeze manifest's sha256 per tensor (dtype, shape, bytes). The state file's own sha256
    is not comparable across runs: its tensor layout follows the process's dict order."""
    return json.loads((out / "stages" / stage / "manifest.json").read_text())["tensors"]


def _frozen_state(out: Path, stage: str) -> dict:
    from safetensors.torch import load_file

    return load_file(out / "stages" / stage / "method_state.safetensors")


def _losses(out: Path) -> dict[str, list]:
    return {d.name: [json.loads(x)["loss"] for x in (d / "progress.jsonl").read_text().splitlines()]
            for d in sorted((out / "stages").glob("*-train-*"))}


def test_small_pipeline_end_to_end(small_run, cache_dir):
    out, proc = small_run
    # 2 CPUs hold the Train worker beside an evaluation: one worker group trains both tasks
    assert "resident train workers: one Ray Train worker group" in proc.stdout
    assert len(list((out / "ray_train").glob("resident-*/02-train-ScienceQA-final"))) == 1
    res = _results(out)
    assert res["tasks"] == ["ScienceQA", "TextVQA"]
    assert [len(r) for r in res["matrix"]] == [1, 2]
    assert {"last", "avg", "B", "M", "acc", "maa", "bwt", "la"} <= set(res["metrics"])
    assert "Accuracy matrix" in proc.stdout and "mlflow ui --backend-store-uri" in proc.stdout
    # the in-process Ray has no dashboard: Train's placement-group cleaner must not warn every second
    assert "State API may be temporarily unavailable" not in proc.stdout + proc.stderr
    assert "Exception in thread PlacementGroupCleanerMonitor" not in proc.stdout + proc.stderr
    # the terminal shows the pipeline's own lines; the libraries' logs are in run.log
    terminal = proc.stdout + proc.stderr
    for noise in ("alembic", "INFO mlflow", "Execution plan", "Starting execution of Dataset", "(raylet)",
                  "PYTHON worker processes have been started", "DeprecationWarning"):
        assert noise not in terminal, noise
    assert len(terminal.splitlines()) <= 60, terminal
    assert "[train TextVQA] step" in proc.stdout  # progress, tailed by the driver
    run_log = (out / "run.log").read_text()
    assert "[1/8] 00-data: running" in run_log and "INFO mlflow" in run_log

    # every stage left a verified marker; predictions reconcile with the test records
    stages = sorted(p.name for p in (out / "stages").iterdir())
    assert stages == ["00-data", "01-base", "02-train-ScienceQA", "03-freeze-ScienceQA", "04-eval-ScienceQA",
                      "05-train-TextVQA", "06-freeze-TextVQA", "07-eval-TextVQA"]
    for task in res["tasks"]:
        lines = (out / "stages" / "07-eval-TextVQA" / "predictions" / f"{task}.jsonl").read_text().splitlines()
        assert len(lines) == 16
        assert all(len(json.loads(x)["selected"]) == 2 for x in lines)  # min(k=3, T=2) sets selected
    manifest = json.loads((out / "stages" / "06-freeze-TextVQA" / "manifest.json").read_text())
    assert manifest["task_keys"]["1"] and manifest["state_sha256"]

    # MLflow: one parent run, one nested run per stage, artifacts and per-step metrics
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=res["mlflow"]["tracking_uri"])
    parent = client.get_run(res["mlflow"]["run_id"])
    assert parent.info.status == "FINISHED"
    # the MLflow UI opens the experiment as model training, not as a GenAI one
    assert client.get_experiment(parent.info.experiment_id).tags["mlflow.experimentKind"] == "custom_model_development"
    assert parent.data.params["method.name"] == "modalprompt" and "git_commit" in parent.data.params
    children = client.search_runs([parent.info.experiment_id],
                                  filter_string=f"tags.mlflow.parentRunId = '{parent.info.run_id}'")
    assert sorted(r.info.run_name for r in children) == stages
    top = {a.path for a in client.list_artifacts(parent.info.run_id)}
    assert {"accuracy_matrix.png", "accuracy_matrix.csv", "accuracy_matrix.json", "results.json", "figures"} <= top
    figs = {a.path for a in client.list_artifacts(parent.info.run_id, "figures")}
    assert {"figures/selection_frequency.png", "figures/prototype_similarity.png"} <= figs
    train = next(r for r in children if r.info.run_name == "05-train-TextVQA")
    assert client.get_metric_history(train.info.run_id, "loss")
    freeze = next(r for r in children if r.info.run_name == "06-freeze-TextVQA")
    assert {a.path for a in client.list_artifacts(freeze.info.run_id, "state")} == {
        "state/method_state.safetensors", "state/manifest.json"}
    assert len(client.get_metric_history(parent.info.run_id, "acc/ScienceQA")) == 2  # after t=1 and t=2

    # re-running the same command skips every (verified) stage and gives the same results
    before = {p: p.stat().st_mtime for p in (out / "stages").rglob("DONE.json")}
    again = _run(out, cache_dir)
    assert again.returncode == 0, again.stderr[-3000:]
    assert again.stdout.count("skipped") == len(stages)
    assert {p: p.stat().st_mtime for p in (out / "stages").rglob("DONE.json")} == before
    again_res = _results(out)
    assert again_res["matrix"] == res["matrix"]
    # ... logs no metric twice, and counts both commands' time
    assert len(client.get_metric_history(parent.info.run_id, "acc/ScienceQA")) == 2
    assert client.get_run(parent.info.run_id).info.status == "FINISHED"
    invocations = [json.loads(x) for x in (out / "invocations.jsonl").read_text().splitlines()]
    assert [i["outcome"] for i in invocations] == ["finished", "finished"]
    assert again_res["invocations"] == 2 and res["invocations"] == 1
    assert again_res["run_wall_s"] == pytest.approx(invocations[0]["wall_s"] + again_res["invocation_wall_s"], abs=0.02)
    assert again_res["run_wall_s"] > res["run_wall_s"] > 0


@pytest.mark.slow
def test_one_fit_per_stage_gives_the_same_results(small_run, tmp_path, cache_dir):
    """The resident worker group is an execution choice: a fit per train stage gives the same
    frozen states, training losses and accuracy matrix. The first task's state is bit-identical;
    later ones agree to float round-off (about 1e-6), as two runs of either mode do: some CPU
    reduction in training a second task is not bit-reproducible (measured on full runs).
    Slow tier (3.5 min); the default tier runs the fit-per-stage path in the EWC test below."""
    resident, _ = small_run
    out = tmp_path / "per-stage"
    proc = _run(out, cache_dir, "resources.resident_train=false")
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    assert "a fit per train stage: resources.resident_train is off" in proc.stdout
    assert (out / "stages" / "05-train-TextVQA" / "ray_train").is_dir() and not (out / "ray_train").exists()
    first, second = "03-freeze-ScienceQA", "06-freeze-TextVQA"
    assert _frozen_tensor_sha256(out, first) == _frozen_tensor_sha256(resident, first)
    a, b = _frozen_state(out, second), _frozen_state(resident, second)
    assert a.keys() == b.keys()
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=1e-4, atol=1e-5, msg=key)
    for stage, losses in _losses(out).items():
        assert losses == pytest.approx(_losses(resident)[stage], rel=1e-4), stage
    assert _results(out)["matrix"] == _results(resident)["matrix"]
    assert _results(out)["metrics"] == _results(resident)["metrics"]


def test_ewc_consolidates_in_the_train_stage_and_each_task_keeps_its_fisher(tmp_path, cache_dir):
    """A method with the optional ``consolidate`` hook through the real stages: the train worker
    runs the end-of-task pass, the freeze stage stores what it computed, the next train stage
    restores it (the penalty needs it) and task 0's entries stay bit-identical. It trains with a
    fit per train stage, so the default tier runs that path too (the resident group is the default)."""
    out = tmp_path / "ewc"
    # the second task with its own settings: batch 8 for 2 epochs (8 steps), cosine after 2 warm-up steps
    per_task = "train.per_task={TextVQA: {batch_size: 8, epochs: 2, lr_schedule: cosine, warmup_steps: 2}}"
    proc = _run(out, cache_dir, "--method", "ewc", "resources.resident_train=false", per_task, "train.log_every=1")
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    rows = {d.name: [json.loads(x) for x in (d / "progress.jsonl").read_text().splitlines()]
            for d in (out / "stages").glob("*-train-*")}
    assert [r["step"] for r in rows["02-train-ScienceQA"]] == [1, 2]  # 32 rows at the global batch 16, 1 epoch
    assert [r["lr"] for r in rows["02-train-ScienceQA"]] == pytest.approx([0.002, 0.002])  # constant train.lr
    # the rate after each optimizer step: linear warm-up over 2 steps, then cosine to 0 at step 8
    assert [r["step"] for r in rows["05-train-TextVQA"]] == list(range(1, 9))
    expected = [0.001, 0.002] + [0.001 * (1 + math.cos(math.pi * (k - 2) / 6)) for k in range(3, 9)]
    assert [r["lr"] for r in rows["05-train-TextVQA"]] == pytest.approx(expected, abs=1e-9)
    assert "05-train-TextVQA: epochs 2, batch 8 x accum 1 x 1 worker(s) = 8 global, lr 0.002 cosine" in proc.stdout
    assert "a fit per train stage: resources.resident_train is off" in proc.stdout
    assert (out / "stages" / "05-train-TextVQA" / "ray_train").is_dir() and not (out / "ray_train").exists()
    first, second = _frozen_state(out, "03-freeze-ScienceQA"), _frozen_state(out, "06-freeze-TextVQA")
    fisher0 = sorted(k for k in first if k.startswith("ewc.0.fisher."))
    assert fisher0 and not any(k.startswith("ewc.1.") for k in first)
    assert sum(first[k].sum().item() for k in fisher0) > 0
    task0 = [k for k in first if k.startswith("ewc.0.")]
    assert all(torch.equal(first[k], second[k]) for k in task0)
    assert sorted(k.replace("ewc.1.", "ewc.0.", 1) for k in second if k.startswith("ewc.1.")) == sorted(task0)
    manifest = json.loads((out / "stages" / "06-freeze-TextVQA" / "manifest.json").read_text())
    assert sorted(manifest["task_keys"]["0"]) == sorted(task0)
    assert [len(r) for r in _results(out)["matrix"]] == [1, 2]


def test_the_joint_bound_shuffles_its_data_beside_a_warm_inference_actor(tmp_path, cache_dir):
    """The multi-task bound's data go through Ray Data's all-to-all shuffle while the inference
    actor warms beside the Train worker. On 2 CPUs the shuffle's tasks must fit what is left: they
    once asked for 1 CPU each, never started, and ``--method multitask`` hung."""
    out = tmp_path / "joint"
    proc = _run(out, cache_dir, "--method", "multitask", timeout=400)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    (train,) = [d for d in (out / "stages").glob("*-train-*")]
    steps = [json.loads(x)["step"] for x in (train / "progress.jsonl").read_text().splitlines()]
    assert steps[-1] == 4  # 2 tasks x 32 rows at the global batch 16, one epoch
    assert [len(r) for r in _results(out)["matrix"]] == [2]


def test_bad_coin_records_stop_the_run_with_one_line_naming_file_record_and_field(tmp_path):
    from tests.helpers import FILES, write_coin_layout

    files = json.loads(json.dumps(FILES))
    files["ScienceQA/train.json"].append({"id": "sqa-bad", "image": "sqa/1.png"})  # no conversations
    source = write_coin_layout(tmp_path / "coin", files)
    cmd = [PY, "pipeline/main.py", "--output", str(tmp_path / "run"), f"cache_dir={tmp_path / 'cache'}",
           "data.source=coin", f"data.root={Path(source.instructions_root).parent}",
           f"data.image_root={source.image_root}", "tasks=[ScienceQA,TextVQA]", "resources.num_cpus=2"]
    proc = subprocess.run(cmd, cwd=ROOT, env=_env(), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2, proc.stdout[-2000:] + proc.stderr[-3000:]
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith("error: data: 1 bad record(s)"), last
    assert "ScienceQA/train.json: record 2 (id=sqa-bad) field 'conversations'" in last
    assert "Traceback" not in proc.stderr


def test_other_config_cannot_reuse_a_run_directory(tmp_path, cache_dir):
    """A directory where another configuration finished a stage is refused (one where it finished
    none is taken over: tests/test_stage_primitives.py)."""
    out = tmp_path / "run"
    (out / "stages" / "00-data").mkdir(parents=True)
    (out / "run.json").write_text(json.dumps({"fingerprint": "0000"}))
    (out / "stages" / "00-data" / "DONE.json").write_text("{}")
    proc = _run(out, cache_dir)
    assert proc.returncode != 0
    assert "different configuration" in proc.stderr and "00-data" in proc.stderr
    assert json.loads((out / "run.json").read_text()) == {"fingerprint": "0000"}  # left as it was


def test_dry_run_of_the_real_7b_config_counts_parameters():
    proc = subprocess.run(
        [PY, "pipeline/main.py", "--config", "pipeline/configs/coin_llava7b_modalprompt.yaml", "--dry-run"],
        cwd=ROOT, env=_env(), capture_output=True, text=True, timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    line = next(x for x in proc.stdout.splitlines() if x.startswith("modalprompt"))
    total, trainable, share = line.split()[1:4]
    assert 7.0e9 < int(total.replace(",", "")) < 7.2e9
    assert 0.25 < float(share) < 0.30  # the paper reports 0.27% for M = 10 + Proj_p per task
    assert "25-eval-OCRVQA" in proc.stdout
    # every task's own schedule (the reference scripts' global batches) and how inputs are prepared
    assert "Training per task:" in proc.stdout
    assert ("GQA        epochs 10, batch 12 x accum 1 x 8 worker(s) = 96 global, lr 0.0002 constant, "
            "warm-up ratio 0.03 (log)") in proc.stdout
    assert "ImageNet   epochs 10, batch 32 x accum 1 x 8 worker(s) = 256 global" in proc.stdout
    assert ("Inputs: images padded to a square of RGB (122, 116, 104), then resized to 336; guide ViT-L-14-336 "
            "(QuickGELU on), text feature pooled") in proc.stdout


def test_a_tiny_base_can_still_be_pretrained_inside_the_run(tmp_path):
    """model.kind tiny: the base stage pre-trains the base in a Ray task (cached) instead of
    loading the shipped one; its progress reaches the run's stage files."""
    out = tmp_path / "run"
    proc = helpers.run_pipeline(out, tmp_path / "cache", "tasks=[ScienceQA]", "--method", "zeroshot",
                                *helpers.TINY_BASE)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    base = json.loads((out / "stages" / "01-base" / "base.json").read_text())
    assert Path(base["lmm_dir"]).parent.name.startswith("tiny-base-") and base["info"]["lmm"]["steps"] == 20
    assert (out / "stages" / "01-base" / "pretrain_progress.jsonl").read_text().strip()
    assert len(_results(out)["matrix"][-1]) == 1


# ---------------------------------------------------------------------------------------------
# slow tier
# ---------------------------------------------------------------------------------------------
def _remaining(out: Path, kind: str) -> list[str]:
    """The stages of ``kind`` without a completion marker yet, in order."""
    ids = ["02-train-ScienceQA", "03-freeze-ScienceQA", "04-eval-ScienceQA", "05-train-TextVQA",
           "06-freeze-TextVQA", "07-eval-TextVQA"]
    return [s for s in ids if f"-{kind}-" in s and not (out / "stages" / s / "DONE.json").exists()]


def _drill_points(out: Path, rng) -> list:
    """Each killed invocation's failpoint, chosen when it starts (seeded, among the occurrences
    still ahead, so each one is reached): data preparation, mid-training, between train and freeze,
    mid-evaluation, while results and MLflow records are written (``pipeline/failpoints.py``)."""
    evals = {"04-eval-ScienceQA": 1, "07-eval-TextVQA": 2}  # prediction files each writes
    return [
        lambda: f"data-task:{rng.randint(1, 2)}",
        lambda: f"train-progress:{rng.randint(1, len(_remaining(out, 'train')))}",
        lambda: f"marked-train:{rng.randint(1, max(1, len(_remaining(out, 'train'))))}",
        lambda: f"eval-predictions:{rng.randint(1, max(1, sum(evals[s] for s in _remaining(out, 'eval'))))}",
        lambda: "results-written:1",
    ]


def _kill_first_inference_worker(proc: subprocess.Popen, timeout: float = 600) -> list[int]:
    """SIGKILL the first inference actor (``stages.inference.InferenceActor``) of ``proc``'s own
    Ray (its raylet's workers descend from the driver) seen predicting while ``proc`` runs."""
    import psutil

    deadline = time.time() + timeout
    while proc.poll() is None and time.time() < deadline:
        try:
            family = psutil.Process(proc.pid).children(recursive=True)
        except psutil.NoSuchProcess:
            break
        for p in family:
            try:
                line = " ".join(p.cmdline())
            except psutil.Error:
                continue
            if "ray::InferenceActor.predict" in line:
                p.kill()
                return [p.pid]
        time.sleep(0.1)
    return []


@pytest.mark.slow
def test_driver_killed_at_five_seeded_points_resumes_to_the_uninterrupted_results(tmp_path, cache_dir):
    """Fault drill: the driver is killed with SIGKILL at five points spread over one run, each
    time followed by the same command, and an inference worker is killed in the middle of an
    evaluate stage; the run ends with the uninterrupted run's matrix and metrics, every prediction
    recorded once, and every MLflow stage run and metric exactly once."""
    import random

    from mlflow.tracking import MlflowClient

    ref = tmp_path / "ref"
    assert _run(ref, cache_dir).returncode == 0
    out = tmp_path / "killed"
    rng = random.Random(21)
    points = []
    workers_killed = []
    for choose in _drill_points(out, rng):
        points.append(choose())
        env = dict(_env(), COIN_FAILPOINT=points[-1])
        proc = subprocess.Popen([PY, "pipeline/main.py", "--output", str(out), f"cache_dir={cache_dir}", *SMALL],
                                cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        if points[-1].startswith("results-written"):
            # this invocation re-runs the evaluation the previous one was killed in: kill its
            # inference actor mid-stage too (Ray restarts it; the stage predicts again)
            workers_killed += _kill_first_inference_worker(proc)
        stdout, stderr = proc.communicate(timeout=900)
        assert proc.returncode == -signal.SIGKILL, (points, proc.returncode, stdout[-2000:], stderr[-2000:])
    assert workers_killed, "no inference worker was seen running"
    resumed = _run(out, cache_dir)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    res, want = _results(out), _results(ref)
    assert res["matrix"] == want["matrix"] and res["metrics"] == want["metrics"], points
    # every prediction once: each evaluate stage's files hold each test record exactly once
    for stage, tasks in (("04-eval-ScienceQA", ["ScienceQA"]), ("07-eval-TextVQA", ["ScienceQA", "TextVQA"])):
        for task in tasks:
            mine = [json.loads(x)["question_id"] for x in (out / "stages" / stage / "predictions" / f"{task}.jsonl")
                    .read_text().splitlines()]
            theirs = [json.loads(x)["question_id"] for x in (ref / "stages" / stage / "predictions" / f"{task}.jsonl")
                      .read_text().splitlines()]
            assert sorted(mine) == sorted(theirs) and len(set(mine)) == len(mine), (stage, task)
    # MLflow: one FINISHED run per stage (each interrupted attempt KILLED beside it, or finished on
    # resume when its stage had completed), nothing left RUNNING, every metric once per step
    client = MlflowClient(tracking_uri=res["mlflow"]["tracking_uri"])
    parent = client.get_run(res["mlflow"]["run_id"])
    runs = client.search_runs([parent.info.experiment_id],
                              filter_string=f"tags.mlflow.parentRunId = '{parent.info.run_id}'", max_results=500)
    assert not [r.info.run_name for r in runs if r.info.status == "RUNNING"]
    finished = sorted(r.info.run_name for r in runs if r.info.status == "FINISHED")
    assert finished == sorted(want["stage_wall_s"]), points
    for r in runs:
        if r.info.status == "FINISHED":
            assert len(client.get_metric_history(r.info.run_id, "stage_wall_s")) == 1, r.info.run_name
            assert "DONE.json" in {a.path for a in client.list_artifacts(r.info.run_id)}, r.info.run_name
    ref_client = MlflowClient(tracking_uri=want["mlflow"]["tracking_uri"])
    ref_metrics = ref_client.get_run(want["mlflow"]["run_id"]).data.metrics
    assert set(parent.data.metrics) == set(ref_metrics)
    for key in sorted(set(ref_metrics) - {"run_wall_s"}):  # each at the steps the uninterrupted run has, once
        steps = [m.step for m in client.get_metric_history(parent.info.run_id, key)]
        assert steps == [m.step for m in ref_client.get_metric_history(want["mlflow"]["run_id"], key)], (key, steps)
    assert [m.step for m in client.get_metric_history(parent.info.run_id, "acc/ScienceQA")] == [1, 2]
    assert {"results.json", "accuracy_matrix.png"} <= {a.path for a in client.list_artifacts(parent.info.run_id)}
    # a driver killed with SIGKILL records nothing: only the finishing command is counted
    invocations = [json.loads(x) for x in (out / "invocations.jsonl").read_text().splitlines()]
    assert [i["outcome"] for i in invocations] == ["finished"] and res["invocations"] == 1


@pytest.mark.slow
def test_sigterm_stops_the_run_with_a_resume_hint_and_its_time_is_counted(tmp_path, cache_dir):
    """``ray job stop`` sends SIGTERM: the driver says how to resume, records its wall time and
    outcome, and the resumed run counts both commands' time."""
    out = tmp_path / "stopped"
    cmd = [PY, "pipeline/main.py", "--output", str(out), f"cache_dir={cache_dir}", *SMALL]
    proc = subprocess.Popen(cmd, cwd=ROOT, env=_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    target = out / "stages" / "02-train-ScienceQA"
    deadline = time.time() + 600
    while not target.exists() and time.time() < deadline and proc.poll() is None:
        time.sleep(0.5)
    time.sleep(3)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode != 0
    assert "stopped by SIGTERM: re-run the same command to resume" in err
    first = [json.loads(x) for x in (out / "invocations.jsonl").read_text().splitlines()]
    assert [i["outcome"] for i in first] == ["stopped"] and first[0]["wall_s"] > 3
    resumed = _run(out, cache_dir)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    res = _results(out)
    assert res["invocations"] == 2
    assert res["run_wall_s"] == pytest.approx(first[0]["wall_s"] + res["invocation_wall_s"], abs=0.02)


@pytest.mark.slow
def test_a_crashed_train_worker_resumes_its_job_from_the_last_checkpoint(tmp_path, cache_dir):
    """SIGKILL the resident Ray Train worker in the middle of the second task: Ray Train
    (FailureConfig) restarts the worker group, which takes the same job again and resumes it from
    the job's last mid-stage checkpoint, and the run finishes."""
    import psutil

    out = tmp_path / "crashed"
    longer = ["train.epochs=16", "train.checkpoint_every=4", "train.log_every=2"]  # 32 steps per task
    cmd = [PY, "pipeline/main.py", "--output", str(out), f"cache_dir={cache_dir}", *SMALL, *longer]
    proc = subprocess.Popen(cmd, cwd=ROOT, env=_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True, start_new_session=True)
    progress = out / "stages" / "05-train-TextVQA" / "progress.jsonl"
    deadline = time.time() + 900
    killed = []
    while not killed and time.time() < deadline and proc.poll() is None:
        steps = [json.loads(x)["step"] for x in progress.read_text().splitlines()] if progress.exists() else []
        if steps and steps[-1] >= 6:  # past the checkpoint at step 4
            for p in psutil.process_iter(["cmdline"]):
                if "ray::RayTrainWorker" in " ".join(p.info["cmdline"] or []):
                    p.kill()
                    killed.append(p.pid)
        time.sleep(0.2)
    stdout, _ = proc.communicate(timeout=900)
    assert killed, "the second task's training was never seen running"
    assert proc.returncode == 0, stdout[-5000:]
    result = json.loads((out / "stages" / "05-train-TextVQA" / "DONE.json").read_text())["result"]
    assert result["steps"] == 32 and result["resumed_from_step"] in (4, 8, 12, 16, 20, 24, 28)
    first = json.loads((out / "stages" / "02-train-ScienceQA" / "DONE.json").read_text())["result"]
    assert first["resumed_from_step"] == 0
    assert [len(r) for r in _results(out)["matrix"]] == [1, 2]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
def test_ray_job_submit_against_a_local_head(tmp_path, cache_dir):
    ray = str(Path(PY).parent / "ray")
    # as in an activated virtualenv: the job's `python` entrypoint is the venv's interpreter
    env = _env() | {"RAY_AUTH_MODE": "disabled", "PATH": f"{Path(PY).parent}:{os.environ['PATH']}"}
    port, dash = _free_port(), _free_port()
    # --block keeps the head in the foreground of its own process group, so the test stops
    # exactly this head (``ray stop`` would stop every Ray on the machine).
    head = subprocess.Popen(
        [ray, "start", "--head", "--block", f"--port={port}", f"--dashboard-port={dash}", "--num-cpus=2",
         "--object-store-memory=300000000", "--disable-usage-stats", "--include-dashboard=true"],
        cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True,
    )
    try:
        out = tmp_path / "job-run"
        runtime_env = json.dumps({"excludes": [".venv", ".git", "runs", ".cache", "*.db", "mlartifacts"]})
        cmd = [ray, "job", "submit", f"--address=http://127.0.0.1:{dash}", "--working-dir", ".",
               "--runtime-env-json", runtime_env, "--",
               "python", "pipeline/main.py", "--output", str(out), f"cache_dir={cache_dir}", *SMALL]
        deadline = time.time() + 120
        while True:  # the dashboard's job API takes a while to come up
            job = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=1500)
            if job.returncode == 0 or time.time() > deadline or "Connection" not in job.stderr + job.stdout:
                break
            time.sleep(5)
        assert job.returncode == 0, job.stdout[-4000:] + job.stderr[-2000:]
        assert "succeeded" in (job.stdout + job.stderr).lower()
        assert [len(r) for r in _results(out)["matrix"]] == [1, 2]
    finally:
        os.killpg(head.pid, signal.SIGTERM)
        try:
            head.wait(timeout=60)
        except subprocess.TimeoutExpired:
            os.killpg(head.pid, signal.SIGKILL)
