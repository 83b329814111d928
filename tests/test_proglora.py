"""ProgLoRA's own mechanisms on the tiny random-init models: the fused block, the static weights
(Eq. 3) and their replay counts, the KL task recall of the dynamic router, and the stored
samples as part of the frozen state."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from pipeline.methods.proglora import PoolLinear
from pipeline.methods.protocol import ReplayChannel, prepare_task
from pipeline.methods.registry import build_method
from tests.helpers import batch_for, tiny_models, toy_rows, train_toy

pytestmark = pytest.mark.usefixtures("one_thread")


def _build(name: str = "proglora", **options):
    lmm, guide = tiny_models(0)
    torch.manual_seed(11)
    return build_method(name, options, lmm, guide), lmm


class RecordingChannel(ReplayChannel):
    """The pipeline's replay channel, recording the ids of every row the method collates."""

    def __init__(self, rows, lmm):
        from pipeline.models.lmm import rows_to_batch

        super().__init__(rows, lambda r: lmm.collate(rows_to_batch(r), train=True))
        self.used: list[str] = []

    def collate(self, rows):
        self.used += [str(r["id"]) for r in rows]
        return super().collate(rows)


def test_the_fused_block_is_the_weighted_sum_of_the_blocks_updates() -> None:
    method, lmm = _build(rank=2)
    for t, task in enumerate(["task_a", "task_b"]):
        method.begin_task(t, task)
        method.end_task(t)
    wrapped = [m for m in lmm.model.modules() if isinstance(m, PoolLinear)]
    assert len(wrapped) == 7 * 2  # q, k, v, o, gate, up, down in each of the 2 LLM layers
    layer = wrapped[0]
    for blk in method.blocks:  # B is zero at init: give both blocks a real update
        torch.nn.init.normal_(blk[layer.target].B.weight)
    x = torch.randn(3, 5, layer.base.in_features)
    w = torch.tensor([[0.2, 0.8], [1.0, 0.0], [0.5, 0.5]])
    method._weights = w
    with torch.no_grad():
        got = layer(x)
    method._weights = None
    want = layer.base(x)
    for n, blk in enumerate(method.blocks):
        A, B = blk[layer.target].A.weight, blk[layer.target].B.weight
        want = want + method.scale * w[:, n, None, None] * (x @ A.T @ B.T)
    assert torch.allclose(got, want, atol=1e-5)
    with torch.no_grad():
        assert torch.equal(layer(x), layer.base(x))  # outside a method call: the base layer alone


def test_static_weights_follow_eq3_and_set_the_replay_counts() -> None:
    method, lmm = _build("proglora_static", replay=10)
    e = {0: torch.tensor([[1.0, 0.0], [1.0, 0.0], [1.0, 0.0]]),
         1: torch.tensor([[1.0, 1.0], [0.0, 1.0], [1.0, 0.0]]),
         2: torch.tensor([[1.0, 0.0], [1.0, 1.0], [-1.0, 0.0]])}
    method.embeddings = e
    cos = lambda a, b: float(F.cosine_similarity(a, b, dim=0))  # noqa: E731
    w10 = cos(e[0][0], e[1][0]) * cos(e[0][1], e[1][1]) * cos(e[0][2], e[1][2])  # (1/sqrt2) * 0 * 1 = 0
    w21 = cos(e[1][0], e[2][0]) * cos(e[1][1], e[2][1]) * cos(e[1][2], e[2][2])  # (1/sqrt2)(1/sqrt2)(-1) < 0
    w20 = cos(e[0][0], e[2][0]) * cos(e[0][1], e[2][1]) * cos(e[0][2], e[2][2])  # 1 * (1/sqrt2) * (-1) < 0
    assert torch.allclose(method.static_weights(1), torch.tensor([max(w10, 0.0), 1.0]))
    assert torch.allclose(method.static_weights(2), torch.tensor([0.0, 0.0, 1.0]))  # negatives clipped
    assert w21 < 0 and w20 < 0
    e[2] = torch.tensor([[1.0, 0.2], [0.3, 1.0], [1.0, 0.1]])
    w = method.static_weights(2)
    for p in range(2):
        want = cos(e[p][0], e[2][0]) * cos(e[p][1], e[2][1]) * cos(e[p][2], e[2][2])
        assert float(w[p]) == pytest.approx(min(max(want, 0.0), 1.0), abs=1e-6)
    assert method.replay_counts(2) == {p: round((1 - float(w[p])) * 10) for p in range(2)}


def test_static_replays_exactly_1_minus_w_times_phi_distinct_samples_of_each_earlier_task() -> None:
    phi = 6
    method, lmm = _build("proglora_static", replay=phi, recall_batch=2)
    store = {t: toy_rows(t, phi) for t in ("task_a", "task_b")}
    for t, task in enumerate(["task_a", "task_b"]):
        channel = RecordingChannel({k: v for k, v in store.items() if k in ("task_a", "task_b")[: t + 1]}, lmm)
        method.begin_task(t, task)
        method.attach_replay(channel)
        prepare_task(method, t, lambda task=task: [batch_for(lmm, task)])
        if t == 1:
            # the prepared embeddings of two random toy tasks, replaced by ones whose Eq. 3 weight
            # is exactly 0.5 (image and instruction alike, answers 60 degrees apart)
            assert set(method.embeddings) == {0, 1} and method.embeddings[1].shape == (3, method.guide.dim)
            method.embeddings = {0: torch.tensor([[1.0, 0.0], [1.0, 0.0], [1.0, 0.0]]),
                                 1: torch.tensor([[1.0, 0.0], [1.0, 0.0], [0.5, 3 ** 0.5 / 2]])}
            counts = method.replay_counts(1)
            assert counts == {0: 3}  # (1 - 0.5) * 6
            train_toy(method, batch_for(lmm, task), 12, end_task=t)
            used = {i for i in channel.used if i.startswith("task_a")}
            assert used == {f"task_a-{i}" for i in range(counts[0])}  # the first (1 - w) phi, all of them
            assert not any(i.startswith("task_b") for i in channel.used)  # never the current task
        else:
            train_toy(method, batch_for(lmm, task), 3, end_task=t)
            assert channel.used == []  # nothing earlier to replay
    assert method.store_ids == {0: [f"task_a-{i}" for i in range(phi)], 1: [f"task_b-{i}" for i in range(phi)]}


def _kl_to_recorded(method, lmm, rows) -> float:
    from pipeline.models.lmm import rows_to_batch

    batch = lmm.collate(rows_to_batch(rows), train=True)
    with torch.no_grad():
        log_w_hat = torch.log_softmax(method.allocation_logits(batch, 1), dim=-1)
    target = F.pad(method.recalled[0], (0, 1))
    return float(F.kl_div(log_w_hat, target, reduction="batchmean"))


def test_kl_recall_pulls_a_drifted_router_back_on_the_stored_samples() -> None:
    from pipeline.models.lmm import rows_to_batch

    method, lmm = _build(replay=4, recall_batch=4)
    store = {"task_a": toy_rows("task_a", 4), "task_b": toy_rows("task_b", 4)}
    method.begin_task(0, "task_a")
    method.attach_replay(RecordingChannel({"task_a": store["task_a"]}, lmm))
    train_toy(method, batch_for(lmm, "task_a"), 3, end_task=0)
    # recorded when task 0 ended: its stored samples' weights over the one block then learned
    assert method.recalled[0].shape == (4, 1) and torch.allclose(method.recalled[0], torch.ones(4, 1))
    method.begin_task(1, "task_b")
    method.attach_replay(RecordingChannel(store, lmm))
    with torch.no_grad():  # the router drifts: task 1's key is made to win task 0's samples
        q = method.router(method.query_features(lmm.collate(rows_to_batch(store["task_a"]), train=True)))
        method.keys[1].copy_(q.mean(0) * 3)
    before = _kl_to_recorded(method, lmm, store["task_a"])
    assert before > 1.0
    # the recall term alone: it reaches the router and task 1's key, nothing of the LM's blocks
    recall = method._recall_loss(1)
    assert recall.item() == pytest.approx(before, rel=1e-4)
    grads = torch.autograd.grad(recall, [*method.router.parameters(), method.keys[1], method.blocks[1]["model__language_model__layers__0__self_attn__q_proj"].A.weight],
                                allow_unused=True)
    assert all(g is not None and g.abs().sum() > 0 for g in grads[:-1]) and grads[-1] is None
    opt = torch.optim.SGD([*method.router.parameters(), method.keys[1]], lr=0.5)
    for _ in range(20):
        opt.zero_grad()
        method._recall_loss(1).backward()
        opt.step()
    assert _kl_to_recorded(method, lmm, store["task_a"]) < 0.2 * before  # pulled back to block 0


def test_the_store_is_frozen_state_and_a_changed_store_is_refused(tmp_path) -> None:
    from safetensors.torch import load_file, save_file

    method, lmm = _build(replay=3)
    method.begin_task(0, "task_a")
    method.attach_replay(RecordingChannel({"task_a": toy_rows("task_a", 3)}, lmm))
    train_toy(method, batch_for(lmm, "task_a"), 2, end_task=0)
    save_file(method.state_tensors(), str(tmp_path / "s.safetensors"))
    assert "store.0.ids" in method.task_keys(0) and "recall.0.weights" in method.task_keys(0)
    fresh_lmm, guide = tiny_models(0, fresh_guide=True)
    fresh = build_method("proglora", {"replay": 3}, fresh_lmm, guide)
    fresh.load_state_tensors(load_file(str(tmp_path / "s.safetensors")))
    assert fresh.store_ids == {0: ["task_a-0", "task_a-1", "task_a-2"]} and fresh.names == ["task_a"]
    assert torch.equal(fresh.recalled[0], method.recalled[0])
    fresh.begin_task(1, "task_b")
    fresh.attach_replay(RecordingChannel({"task_a": toy_rows("task_a", 3), "task_b": toy_rows("task_b", 3)}, fresh_lmm))
    changed = toy_rows("task_a", 3)
    changed[1] = {**changed[1], "id": "task_a-99"}
    with pytest.raises(RuntimeError, match="stored samples of task 'task_a' are not the ones it was learned with"):
        fresh.attach_replay(RecordingChannel({"task_a": changed, "task_b": toy_rows("task_b", 3)}, fresh_lmm))


def test_the_projector_trains_and_its_state_travels_with_the_method() -> None:
    method, lmm = _build()
    before = {k: v.clone() for k, v in lmm.model.model.multi_modal_projector.state_dict().items()}
    method.begin_task(0, "task_a")
    train_toy(method, batch_for(lmm, "task_a"), 3, end_task=0)
    after = lmm.model.model.multi_modal_projector.state_dict()
    assert any(not torch.equal(before[k], after[k]) for k in before)
    state = method.state_tensors()
    assert all(torch.equal(state[f"projector.{k}"], after[k]) for k in after)
    frozen, _ = _build(train_projector=False)
    frozen.begin_task(0, "task_a")
    assert not any(p.requires_grad for p in frozen.projector.parameters())


def test_prepare_embeds_the_tasks_images_instructions_and_answers() -> None:
    from tests.helpers import TOY_TASKS

    method, lmm = _build("proglora_static")
    method.begin_task(0, "task_a")
    batch = batch_for(lmm, "task_a")
    prepare_task(method, 0, lambda: [batch, batch])
    e = method.embeddings[0]
    guide = method.guide
    with torch.no_grad():
        image = F.normalize(guide.encode_image(batch["guide_pixels"]).float(), dim=-1).mean(0)
        question = F.normalize(guide.encode_text(batch["guide_text"]).float(), dim=-1).mean(0)
        answer = F.normalize(guide.encode_text(lmm.guide_inputs.tokenize([TOY_TASKS["task_a"][1]])).float(), dim=-1)[0]
    assert torch.allclose(e[0], image, atol=1e-5) and torch.allclose(e[1], question, atol=1e-5)
    assert torch.allclose(e[2], answer, atol=1e-5)  # the answer text, decoded from the labels


def test_query_pool_mean_averages_the_instruction_tokens_and_max_takes_their_max() -> None:
    from pipeline.methods.helpers import instruction_tokens
    from pipeline.models.lmm import rows_to_batch

    for pool in ("max", "mean"):
        method, lmm = _build(query_pool=pool)
        batch = lmm.collate(rows_to_batch(toy_rows("task_a", 3)), train=True)
        tok, keep = instruction_tokens(lmm, batch, torch.device("cpu"))
        got = method.query_features(batch)
        for i in range(3):
            rows = tok[i][keep[i]]  # this sample's instruction tokens only
            want = rows.mean(0) if pool == "mean" else rows.max(0).values
            assert torch.allclose(got[i], want, atol=1e-6), pool
    with pytest.raises(ValueError, match="query_pool"):
        _build(query_pool="sum")
