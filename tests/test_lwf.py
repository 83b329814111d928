"""LwF's own mechanism on the tiny random-init models: the teacher is the adapter as the previous
task left it, its logits come from those weights, and distilling towards it keeps task 1's
outputs closer to it than plain sequential LoRA does."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from pipeline.methods.helpers import base_embeds
from pipeline.methods.registry import build_method
from tests.helpers import batch_for, tiny_models, train_toy

pytestmark = pytest.mark.usefixtures("one_thread")


def _lwf(**options):
    lmm, guide = tiny_models(0)
    torch.manual_seed(21)
    return build_method("lwf", options, lmm, guide), lmm


def _keep(batch, method):
    return batch["labels"][:, 1:].to(method.lmm.device) != -100


def test_the_first_task_is_plain_cross_entropy_and_the_teacher_is_where_it_ended() -> None:
    method, lmm = _lwf()
    method.begin_task(0, "task_a")
    batch = batch_for(lmm, "task_a")
    loss, logs = method.training_loss(batch)
    assert "distill_loss" not in logs and loss.item() == pytest.approx(lmm.lm_loss(
        base_embeds(lmm, batch), batch["attention_mask"], batch["labels"]).item(), rel=1e-5)
    train_toy(method, batch, 5, end_task=0)
    params = dict(method.model.named_parameters())
    assert method.teacher and all(torch.equal(t, params[n]) for n, t in method.teacher.items())
    method.begin_task(1, "task_b")
    _, logs = method.training_loss(batch_for(lmm, "task_b"))
    assert logs["distill_loss"] == pytest.approx(0.0, abs=1e-6)  # student == teacher at the start


def test_the_teachers_logits_are_those_of_the_previous_tasks_weights() -> None:
    method, lmm = _lwf()
    method.begin_task(0, "task_a")
    train_toy(method, batch_for(lmm, "task_a"), 5, end_task=0)
    method.begin_task(1, "task_b")
    train_toy(method, batch_for(lmm, "task_b"), 5, end_task=None, task=1)  # the student moved on
    batch = batch_for(lmm, "task_a")
    embeds, mask, keep = base_embeds(lmm, batch), batch["attention_mask"], _keep(batch, method)
    with torch.no_grad():
        via_teacher = method.answer_logits(embeds, mask, keep, params=method.teacher)
        student = method.answer_logits(embeds, mask, keep)
        params = dict(method.model.named_parameters())
        saved = {n: params[n].detach().clone() for n in method.teacher}
        for n, t in method.teacher.items():
            params[n].copy_(t)
        direct = method.answer_logits(embeds, mask, keep)
        for n, t in saved.items():
            params[n].copy_(t)
    assert torch.allclose(via_teacher, direct, atol=1e-5)
    assert not torch.allclose(student, direct, atol=1e-3)
    assert all(torch.equal(params[n], saved[n]) for n in saved)  # the student's weights were left alone


def _drift_from_teacher(distill_weight: float) -> dict[str, float]:
    method, lmm = _lwf(distill_weight=distill_weight)
    method.begin_task(0, "task_a")
    train_toy(method, batch_for(lmm, "task_a"), 10, end_task=0)
    method.begin_task(1, "task_b")
    train_toy(method, batch_for(lmm, "task_b"), 15, end_task=1)
    out = {}
    for task in ("task_a", "task_b"):
        batch = batch_for(lmm, task)
        embeds, mask, keep = base_embeds(lmm, batch), batch["attention_mask"], _keep(batch, method)
        with torch.no_grad():
            teacher = method.answer_logits(embeds, mask, keep, params=method._teacher_of_task_1)
            student = method.answer_logits(embeds, mask, keep)
        out[task] = float(F.kl_div(F.log_softmax(student, -1), F.log_softmax(teacher, -1), log_target=True,
                                   reduction="batchmean"))
    return out


def test_distillation_keeps_the_old_tasks_outputs_closer_to_the_teacher(monkeypatch) -> None:
    from pipeline.methods.lwf import LwF

    original = LwF.end_task

    def end_task(self, task_index):  # keep task 1's teacher (the end of task 0) for the measurement
        if task_index == 0:
            original(self, task_index)
            self._teacher_of_task_1 = dict(self.teacher)
        else:
            original(self, task_index)

    monkeypatch.setattr(LwF, "end_task", end_task)
    with_lwf, plain = _drift_from_teacher(4.0), _drift_from_teacher(0.0)
    # on the data it distils on (task 1's), the student stays near the teacher ...
    assert with_lwf["task_b"] < 0.5 * plain["task_b"], (with_lwf, plain)
    # ... and task 0's own inputs drift less too (by less: LwF never sees them)
    assert with_lwf["task_a"] < plain["task_a"], (with_lwf, plain)
