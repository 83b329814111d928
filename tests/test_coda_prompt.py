"""CODA-Prompt's own mechanism on the tiny random-init models: the per-sample prompt is the
attention-weighted sum of the components, every task's components start orthogonal to the
earlier ones, and the pool's allotment to tasks is enforced."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from pipeline.methods.registry import build_method
from tests.helpers import batch_for, tiny_models, train_toy

pytestmark = pytest.mark.usefixtures("one_thread")


def _coda(**options):
    lmm, guide = tiny_models(0)
    torch.manual_seed(3)
    return build_method("coda_prompt", options, lmm, guide), lmm


def test_the_prompt_is_the_attention_weighted_sum_of_the_components() -> None:
    method, lmm = _coda(pool_size=4, n_tasks=2, length=3)
    method.begin_task(0, "task_a")
    train_toy(method, batch_for(lmm, "task_a"), 3, end_task=0)  # components no longer at their init
    method.begin_task(1, "task_b")
    batch = batch_for(lmm, "union", train=False, n=2)
    prompt, alpha = method.prompt(batch)
    q = F.normalize(method.guide.encode_image(batch["guide_pixels"]).float(), dim=-1)
    rows = [(t.components[j], t.keys[j], t.attention[j]) for t in method.tasks for j in range(len(t.keys))]
    assert alpha.shape == (4, 4) and prompt.shape == (4, 3, lmm.model.get_input_embeddings().weight.shape[1])
    for b in range(4):
        want = torch.zeros_like(prompt[b])
        for m, (p, k, a) in enumerate(rows):
            weight = torch.dot(q[b] * a, k) / ((q[b] * a).norm() * k.norm())
            assert torch.allclose(alpha[b, m], weight, atol=1e-6)
            want = want + weight * p
        assert torch.allclose(prompt[b], want, atol=1e-5)
    # per sample: two inputs of different tasks get different prompts
    assert not torch.allclose(prompt[0], prompt[2])


def test_new_components_keys_and_attention_start_orthogonal_to_the_old_ones() -> None:
    method, lmm = _coda(pool_size=6, n_tasks=3, length=2)
    for t, task in enumerate(["task_a", "task_b", "task_a"]):
        method.begin_task(t, task)
        if t < 2:
            train_toy(method, batch_for(lmm, task), 3, end_task=t)  # the old rows moved off their init
    components, keys, attention = (x.detach() for x in method.bank())
    assert len(keys) == 6
    for x in (components.flatten(1), keys, attention):
        x = F.normalize(x, dim=1)
        cross = x[4:] @ x[:4].T  # the third task's rows against both earlier tasks' trained rows
        assert cross.abs().max() < 1e-5
        assert torch.allclose(x[4:] @ x[4:].T, torch.eye(2), atol=1e-5)
    # each soft token starts at the embedding table's RMS row norm
    table = lmm.model.get_input_embeddings().weight
    rms = table.norm(dim=1).pow(2).mean().sqrt()
    assert torch.allclose(components[4:].norm(dim=-1).pow(2).mean().sqrt(), rms, rtol=1e-4)


def test_only_the_current_tasks_components_train_but_all_weigh_in() -> None:
    method, lmm = _coda(pool_size=4, n_tasks=2, length=2)
    method.begin_task(0, "task_a")
    train_toy(method, batch_for(lmm, "task_a"), 2, end_task=0)
    method.begin_task(1, "task_b")
    method(batch_for(lmm, "task_b")).backward()
    assert all(p.grad is None for p in method.tasks[0].parameters())
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in method.tasks[1].parameters())
    _, alpha = method.prompt(batch_for(lmm, "task_b"))
    assert alpha.shape[1] == 4 and alpha[:, :2].abs().sum() > 0  # task 0's components are used


def test_the_pool_holds_n_tasks_and_refuses_one_more_by_name() -> None:
    method, lmm = _coda(pool_size=10, n_tasks=8)  # the paper's M = 10 over CoIN's 8 tasks: 1 each
    assert method.opts.per_task == 1 and method.opts.max_tasks == 10
    method, lmm = _coda(pool_size=4, n_tasks=2)
    method.begin_task(0)
    method.end_task(0)
    method.begin_task(1)
    method.end_task(1)
    with pytest.raises(ValueError, match="task 3 has no components left: pool_size=4"):
        method.begin_task(2)
    lmm, guide = tiny_models(0)
    with pytest.raises(ValueError, match="gives no component"):
        build_method("coda_prompt", {"pool_size": 4, "n_tasks": 8}, lmm, guide)


def test_the_orthogonality_penalty_is_zero_at_init_and_trains_when_weighted() -> None:
    method, lmm = _coda(pool_size=4, n_tasks=2, length=2, ortho_weight=1.0)
    method.begin_task(0, "task_a")
    # components are orthogonal but not unit-norm (token scale), keys/attention orthonormal
    keys_and_attention = [x.detach() for x in method.bank()[1:]]
    assert all(torch.allclose(x @ x.T, torch.eye(2), atol=1e-5) for x in keys_and_attention)
    loss, logs = method.training_loss(batch_for(lmm, "task_a"))
    assert "ortho_loss" in logs and logs["ortho_loss"] > 0  # the components' norms are off 1
    assert loss.item() == pytest.approx(logs["lm_loss"] + logs["ortho_loss"], rel=1e-5)
