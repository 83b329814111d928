"""MoELoRA's own mechanism on the tiny random-init models: the router gives a distribution over
the experts per sample, the layer adds the gate-weighted experts, and decoding keeps the
prompt's routing."""

from __future__ import annotations

import pytest
import torch

from pipeline.methods.moelora import MoELinear
from pipeline.methods.registry import build_method
from tests.helpers import batch_for, tiny_models, train_toy

pytestmark = pytest.mark.usefixtures("one_thread")


def _moe(**options):
    lmm, guide = tiny_models(0)
    torch.manual_seed(31)
    return build_method("moelora", options, lmm, guide), lmm


def _randomise(method) -> None:
    with torch.no_grad():
        for e in method.experts.values():
            e.B.normal_(std=0.1)
            e.router.normal_(std=1.0)


@pytest.mark.parametrize("router_input", ["first", "mean"])
def test_the_router_gives_a_distribution_over_8_experts_per_sample(router_input: str) -> None:
    method, lmm = _moe(rank=8, experts=8, router_input=router_input)
    _randomise(method)
    batch = batch_for(lmm, "union", train=False, n=2)
    method.generate(batch, 1)
    gates = method.gates()
    assert len(gates) == 14  # seven linears in each of the two LLM layers
    for g in gates.values():
        assert g.shape == (4, 8) and torch.allclose(g.sum(-1), torch.ones(4)) and bool((g >= 0).all())
    first_layer = next(iter(gates.values()))
    if router_input == "first":  # BOS under causal attention: the same routing for every input
        assert torch.allclose(first_layer, first_layer[0].expand_as(first_layer), atol=1e-6)
    else:
        assert not torch.allclose(first_layer[0], first_layer[2], atol=1e-4)


def test_the_layer_adds_the_gate_weighted_experts() -> None:
    method, lmm = _moe(rank=4, experts=2)
    _randomise(method)
    layer = next(m for m in lmm.model.modules() if isinstance(m, MoELinear))
    e = method.experts[layer.target]
    x = torch.randn(3, 5, layer.base.in_features)
    mask = torch.ones(3, 5, dtype=torch.long)
    method._arm(mask, 5)
    with torch.no_grad():
        got = layer(x)
    method._active = None
    gate = torch.softmax(x[:, 0] @ e.router.T, dim=-1)
    want = layer.base(x)
    for k in range(2):
        want = want + method.scale * gate[:, k, None, None] * (x @ e.A[k].T @ e.B[k].T)
    assert torch.allclose(got, want, atol=1e-5)
    with torch.no_grad():
        assert torch.equal(layer(x), layer.base(x))  # outside a method call: the base layer alone


def test_every_expert_and_router_trains_on_every_task() -> None:
    method, lmm = _moe(router_input="mean")
    for t, task in enumerate(["task_a", "task_b"]):
        before = {k: v.clone() for k, v in method.state_tensors().items()}
        method.begin_task(t, task)
        train_toy(method, batch_for(lmm, task), 4, end_task=t)
        after = method.state_tensors()
        for name in ("A", "B", "router"):
            assert any(not torch.equal(before[k], after[k]) for k in after if k.endswith("." + name)), (t, name)
    assert method.task_keys(0) == [] and method.trainable_parameters() == []


def test_options_are_checked() -> None:
    lmm, guide = tiny_models(0)
    with pytest.raises(ValueError, match="rank must be a positive multiple of experts"):
        build_method("moelora", {"rank": 12, "experts": 8}, lmm, guide)
