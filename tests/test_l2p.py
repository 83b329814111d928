"""L2P's own mechanism on the tiny random-init models: per-sample selection of the nearest keys,
no task id, and the surrogate loss pulling the selected keys towards their queries."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from pipeline.methods.registry import build_method
from tests.helpers import batch_for, tiny_models, train_toy

pytestmark = pytest.mark.usefixtures("one_thread")


def _l2p(**options):
    lmm, guide = tiny_models(0)
    torch.manual_seed(7)
    return build_method("l2p", options, lmm, guide), lmm


def test_each_sample_gets_the_prompts_of_its_own_nearest_keys() -> None:
    method, lmm = _l2p(pool_size=4, top_n=2, length=2)
    batch = batch_for(lmm, "union", train=False, n=2)  # two samples of task_a, two of task_b
    q = method.query(batch)
    assert not torch.allclose(q[0], q[2])
    with torch.no_grad():  # keys 0, 1 = sample 0's query, keys 2, 3 = sample 2's
        method.keys.copy_(torch.stack([q[0], q[0] + 1e-3, q[2], q[2] + 1e-3]))
    out = method.generate(batch, 2)
    assert sorted(out.selected[0]) == [0, 1] and sorted(out.selected[2]) == [2, 3]
    # the prefix holds exactly the selected prompts, the most similar one last (next to the input)
    sim = method.similarity(q)
    idx = sim.topk(2, dim=1).indices
    prefix = method._prefix(idx, torch.float32)
    assert torch.equal(prefix[0, -2:], method.prompts[idx[0, 0]].float())
    assert torch.equal(prefix[2, :2], method.prompts[idx[2, 1]].float())


def test_training_pulls_the_selected_keys_towards_their_queries() -> None:
    method, lmm = _l2p(pool_size=6, top_n=2, length=2, key_loss_weight=1.0)
    batch = batch_for(lmm, "task_a")
    q = method.query(batch)

    def selected_similarity() -> float:
        sim = method.similarity(q)
        return float(sim.topk(2, dim=1).values.mean())

    before = selected_similarity()
    method.begin_task(0, "task_a")
    train_toy(method, batch, 20, lr=5e-2, end_task=0)
    assert selected_similarity() > before + 0.1


def test_options_are_checked() -> None:
    lmm, guide = tiny_models(0)
    with pytest.raises(ValueError, match="top_n must be in"):
        build_method("l2p", {"pool_size": 2, "top_n": 3}, lmm, guide)
    with pytest.raises(ValueError, match="query must be one of"):
        build_method("l2p", {"query": "text"}, lmm, guide)


def test_image_text_query_uses_the_instruction_too() -> None:
    method, lmm = _l2p(query="image_text")
    batch = batch_for(lmm, "task_a")
    image_only = F.normalize(method.guide.encode_image(batch["guide_pixels"]).float(), dim=-1)
    assert not torch.allclose(method.query(batch), image_only)
