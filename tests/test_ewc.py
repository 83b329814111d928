"""EWC (pipeline/methods/ewc.py): the Fisher it consolidates, the penalty it adds, and that the
penalty really holds the shared adapter near an earlier task's weights."""

from __future__ import annotations

import pytest
import torch

from pipeline.methods.protocol import finish_task
from pipeline.methods.registry import build_method
from tests.helpers import batch_for, tiny_models
from tests.helpers import train_toy as _train


def _ewc(**options):
    lmm, guide = tiny_models(0)
    torch.manual_seed(1234)
    return build_method("ewc", options, lmm, guide), lmm


def test_fisher_is_the_mean_squared_batch_gradient_and_the_penalty_is_zero_at_the_anchor():
    method, lmm = _ewc()
    method.begin_task(0, "task_a")
    _train(method, batch_for(lmm, "task_a"), 3)
    batches = [batch_for(lmm, "task_a"), batch_for(lmm, "union")]
    expected = []
    for batch in batches:
        loss = method.lmm.lm_loss(method.lmm.embed(batch["input_ids"], batch["pixel_values"]),
                                  batch["attention_mask"], batch["labels"])
        expected.append([g ** 2 for g in torch.autograd.grad(loss, method._adapter)])
    assert finish_task(method, 0, lambda: iter(batches))
    state = method.state_tensors()
    for i, name in enumerate(method._names):
        want = (expected[0][i] + expected[1][i]) / 2
        torch.testing.assert_close(state[f"ewc.0.fisher.{name}"], want)
        assert torch.equal(state[f"ewc.0.anchor.{name}"], method._adapter[i].detach())
    assert sum(state[f"ewc.0.fisher.{n}"].sum().item() for n in method._names) > 0
    assert method.penalty().item() == 0.0

    method.begin_task(1, "task_b")
    _, logs = method.training_loss(batch_for(lmm, "task_b"))
    assert logs["ewc_penalty"] == 0.0  # still at the anchor
    _train(method, batch_for(lmm, "task_b"), 3)
    _, logs = method.training_loss(batch_for(lmm, "task_b"))
    assert logs["ewc_penalty"] > 0 and logs["loss"] > logs["lm_loss"]


def test_fisher_batches_caps_the_pass():
    method, lmm = _ewc(fisher_batches=1)
    method.begin_task(0, "task_a")
    seen = []

    def batches():
        for task in ("task_a", "task_b", "task_c"):
            seen.append(task)
            yield batch_for(lmm, task)

    finish_task(method, 0, batches)
    assert seen == ["task_a", "task_b"]  # the second batch was drawn, then the cap stopped the pass


def _after_task_b(ewc_lambda: float) -> tuple[float, float]:
    """Fisher-weighted distance to task a's weights (the penalty) and task a's LM loss, after
    task b was trained with ``ewc_lambda``; the same seeds and data for every lambda."""
    method, lmm = _ewc(ewc_lambda=ewc_lambda)
    method.begin_task(0, "task_a")
    _train(method, batch_for(lmm, "task_a"), 10)
    finish_task(method, 0, lambda: [batch_for(lmm, "task_a")])
    method.begin_task(1, "task_b")
    _train(method, batch_for(lmm, "task_b"), 15)
    with torch.no_grad():
        return method.penalty().item(), method.training_loss(batch_for(lmm, "task_a"))[1]["lm_loss"]


def test_the_penalty_holds_the_adapter_near_the_earlier_task():
    (free_dist, free_loss), (held_dist, held_loss) = _after_task_b(0.0), _after_task_b(1e6)
    assert held_dist < 0.1 * free_dist, (free_dist, held_dist)
    assert held_loss < free_loss, (free_loss, held_loss)  # task a is forgotten less


def test_tasks_are_consolidated_once_in_order_and_bad_state_is_named():
    method, lmm = _ewc()
    method.begin_task(0, "task_a")
    with pytest.raises(ValueError, match=r"consolidate\(1\)"):
        method.consolidate(1, [batch_for(lmm, "task_a")], lambda x: x)
    with pytest.raises(ValueError, match="no training batch"):
        method.consolidate(0, [], lambda x: x)
    finish_task(method, 0, lambda: [batch_for(lmm, "task_a")])
    state = method.state_tensors()

    fresh, _ = _ewc()
    broken = {k: v for k, v in state.items() if not k.startswith("ewc.0.fisher.")}
    with pytest.raises(ValueError, match="task 0 state lacks fisher"):
        fresh.load_state_tensors(broken)
    with pytest.raises(ValueError, match="unexpected state tensor 'ewc.0.moment"):
        fresh.load_state_tensors({**state, "ewc.0.moment.x": torch.zeros(1)})
    with pytest.raises(ValueError, match="ewc_lambda"):
        _ewc(ewc_lambda=-1.0)
