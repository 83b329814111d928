"""How a train worker rebuilds its method before training a job (``stages.train_worker.prepare_method``):
earlier tasks' frozen state, then the job's own mid-stage checkpoint, then ``begin_task``. Real
methods on the tiny random-init models of the contract tests; no Ray needed."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from pipeline.methods.registry import build_method
from stages.common import save_state
from stages.artifacts import META_FILE, STATE_FILE
from stages.train_worker import prepare_method
from tests.helpers import batch_for, tiny_models

pytestmark = pytest.mark.usefixtures("one_thread")


def _fresh(name: str):
    lmm, guide = tiny_models(0, fresh_guide=True)
    torch.manual_seed(999)
    return build_method(name, {}, lmm, guide), lmm


def _step(method, lmm, task: str) -> None:
    opt = torch.optim.AdamW(method.trainable_parameters(), lr=1e-2)
    loss = method(batch_for(lmm, task))
    opt.zero_grad()
    loss.backward()
    opt.step()


def _after_first_task(name: str, tmp_path: Path):
    """A method that learned task 0 (one step) and the frozen state file of it."""
    method, lmm = _fresh(name)
    method.begin_task(0, "task_a")
    _step(method, lmm, "task_a")
    method.end_task(0)
    prev = tmp_path / "prev.safetensors"
    save_state(method.state_tensors(), prev)
    return method, lmm, prev


def _checkpoint(folder: Path, tensors: dict, *, job: str, step: int, final: bool) -> Path:
    folder.mkdir(parents=True)
    save_state(tensors, folder / STATE_FILE)
    (folder / META_FILE).write_text(json.dumps({"job": job, "progress": {"step": step}, "final": final}))
    return folder


@pytest.mark.parametrize("name", ["modalprompt", "lora"])
def test_a_mid_stage_checkpoint_of_the_job_is_resumed_and_trainable(name: str, tmp_path) -> None:
    method, lmm, prev = _after_first_task(name, tmp_path)
    method.begin_task(1, "task_b")
    _step(method, lmm, "task_b")
    ckpt = _checkpoint(tmp_path / "ckpt", method.state_tensors(), job="05-train-b", step=4, final=False)

    worker, _ = _fresh(name)
    start = prepare_method(worker, prev_state=prev, checkpoint_dir=ckpt, job="05-train-b", task_index=1,
                           task_name="task_b")
    assert start == 4
    assert worker.trainable_parameters(), "the resumed task must be trainable (DeepSpeed needs parameters)"
    want = method.state_tensors()
    assert all(torch.equal(v, want[k]) for k, v in worker.state_tensors().items())


@pytest.mark.parametrize("name", ["modalprompt", "lora"])
def test_another_jobs_or_a_final_checkpoint_starts_the_task_afresh(name: str, tmp_path) -> None:
    method, lmm, prev = _after_first_task(name, tmp_path)
    earlier_final = _checkpoint(tmp_path / "a", method.state_tensors(), job="02-train-a", step=36, final=True)

    plain, _ = _fresh(name)
    prepare_method(plain, prev_state=prev, checkpoint_dir=None, job="05-train-b", task_index=1, task_name="task_b")
    worker, _ = _fresh(name)
    start = prepare_method(worker, prev_state=prev, checkpoint_dir=earlier_final, job="05-train-b", task_index=1,
                           task_name="task_b")
    assert start == 0 and worker.trainable_parameters()
    want = plain.state_tensors()
    assert all(torch.equal(v, want[k]) for k, v in worker.state_tensors().items())
