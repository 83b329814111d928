"""ModalPrompt-specific behaviour (the paper, Sec. 3), on the tiny random-init
LMM/guide of the contract tests. Prototypes are set by hand where a test needs a known ranking:
with Proj_p's last layer zeroed, the prototype is exactly that layer's bias."""

from __future__ import annotations

from typing import Any

import pytest
import torch
import torch.nn.functional as F

from pipeline.methods.registry import build_method
from pipeline.methods.modalprompt import ModalPrompt, select_sets
from tests.helpers import batch_for, tiny_models, toy_rows

pytestmark = pytest.mark.usefixtures("one_thread")

M = 4  # short prompts keep the tiny runs fast; the default is 10


@pytest.fixture(scope="module")
def models() -> tuple[Any, Any]:
    # ModalPrompt never modifies the base models, so one pair serves every test here.
    return tiny_models(0)


def _method(models, n_tasks: int, **options: Any) -> ModalPrompt:
    lmm, guide = models
    torch.manual_seed(7)
    method = build_method("modalprompt", {"M": M, **options}, lmm, guide)
    for t in range(n_tasks):  # untrained, randomly initialised task parameters are enough here
        method.begin_task(t, f"t{t}")
        method.end_task(t)
    return method


def _spy(obj: Any, name: str, monkeypatch) -> list[tuple]:
    """Record the positional arguments of every call to ``obj.name``."""
    calls: list[tuple] = []
    original = getattr(obj, name)

    def wrapper(*args):
        calls.append(args)
        return original(*args)

    monkeypatch.setattr(obj, name, wrapper)
    return calls


def _mixed_batch(lmm: Any, train: bool) -> dict[str, Any]:
    """Two samples: one of task_a, one of task_b (different questions and images)."""
    from pipeline.models.lmm import rows_to_batch

    split = "train" if train else "test"
    rows = toy_rows("task_a", 1, split) + toy_rows("task_b", 1, split)
    return lmm.collate(rows_to_batch(rows), train=train)


def _guidance_dirs(guide: Any, batch: dict[str, Any], lam: float = 0.5) -> torch.Tensor:
    """(B, d_guide) unit vectors q_b with score_t(b) proportional to cos(q_b, proto_t)."""
    x_v = F.normalize(guide.encode_image(batch["guide_pixels"]), dim=-1)
    x_i = F.normalize(guide.encode_text(batch["guide_text"]), dim=-1)
    return F.normalize(lam * x_v + (1 - lam) * x_i, dim=-1)


def _set_prototype(method: ModalPrompt, t: int, proto: torch.Tensor) -> None:
    with torch.no_grad():
        method.tasks[t].proj[2].weight.zero_()
        method.tasks[t].proj[2].bias.copy_(proto)


def _set_opposed_prototypes(method: ModalPrompt, guide: Any, batch: dict[str, Any]) -> torch.Tensor:
    """Task 0 resembles sample 0, task 1 sample 1, tasks 2/3 both; returns the (B, T) scores."""
    q = _guidance_dirs(guide, batch)
    _set_prototype(method, 0, q[0] - q[1])  # cos > 0 with sample 0, < 0 with sample 1
    _set_prototype(method, 1, q[1] - q[0])
    _set_prototype(method, 2, q[0] + q[1])
    _set_prototype(method, 3, q[0] + q[1] + 0.1 * (q[0] - q[1]))
    protos = F.normalize(method.prototypes(), dim=-1)
    x_v = F.normalize(guide.encode_image(batch["guide_pixels"]), dim=-1)
    x_i = F.normalize(guide.encode_text(batch["guide_text"]), dim=-1)
    return 0.5 * x_v @ protos.T + 0.5 * x_i @ protos.T


def test_prefix_length_is_m_times_min_k_t(models, monkeypatch) -> None:
    lmm, _ = models
    batch = batch_for(lmm, "task_a", train=False)
    length = batch["input_ids"].shape[1]
    calls = _spy(lmm, "generate", monkeypatch)
    for n_tasks in (1, 2, 3, 6):
        out = _method(models, n_tasks).generate(batch, 2)
        n_sel = min(3, n_tasks)
        assert calls[-1][0].shape[1] == length + M * n_sel  # embeds handed to lmm.generate
        assert [len(s) for s in out.selected] == [n_sel] * len(out.texts)
        assert out.scores.shape == (len(out.texts), n_tasks)
    # 3 and 6 learned tasks cost the same: the generate input does not grow with T.
    assert calls[-2][0].shape == calls[-1][0].shape


def test_select_sets_weights() -> None:
    scores = torch.tensor([[0.9, 0.1, 0.5, 0.7]])
    idx, values, w = select_sets(scores, 2, 0.0)
    assert idx.tolist() == [[0, 3]] and values[0].tolist() == pytest.approx([0.9, 0.7])
    assert torch.equal(w, torch.ones(1, 2))
    _, _, w = select_sets(scores, 2, 0.1)  # midpoint between 0.7 and 0.5 is 0.6
    assert w[0].tolist() == pytest.approx(torch.sigmoid(torch.tensor([3.0, 1.0])).tolist())
    _, _, w = select_sets(scores, 2, 1e-6)
    assert torch.equal(w, torch.ones(1, 2))  # exactly the hard top-k
    _, _, w = select_sets(scores, 4, 0.1)  # T <= k: nothing competes, all weights 1
    assert torch.equal(w, torch.ones(1, 4))


def test_soft_fusion_at_tiny_temperature_is_hard_topk(models, monkeypatch) -> None:
    lmm, _ = models
    state = _method(models, 5).state_tensors()
    batch = batch_for(lmm, "union", train=False, n=2)
    calls = _spy(lmm, "generate", monkeypatch)
    outs = {}
    for temperature in (0.0, 1e-6, 1.0):
        method = build_method("modalprompt", {"M": M, "temperature": temperature}, *models)
        method.load_state_tensors(state)
        outs[temperature] = (method.generate(batch, 3), calls[-1][0])
    hard, tiny, warm = outs[0.0], outs[1e-6], outs[1.0]
    assert torch.equal(hard[1], tiny[1])  # bit-identical prefix and inputs
    assert hard[0].texts == tiny[0].texts and hard[0].selected == tiny[0].selected
    assert warm[1].shape == hard[1].shape and not torch.equal(warm[1], hard[1])  # soft path is live


def test_guidance_text_is_the_instruction_only(models, monkeypatch) -> None:
    lmm, guide = models
    batch = batch_for(lmm, "union", train=True, n=2)
    instructions = [r["instruction"] for name in ("task_a", "task_b") for r in toy_rows(name, 2)]
    assert torch.equal(batch["guide_text"], guide.tokenize(instructions))
    seen = _spy(guide, "encode_text", monkeypatch)
    method = _method(models, 1)
    method.begin_task(1, "t1")
    method.training_loss(batch)
    method.generate(batch_for(lmm, "union", train=False, n=2), 1)
    for (text_ids,) in seen:  # exactly the tokenised instructions, never the chat/answer text
        assert torch.equal(text_ids, guide.tokenize(instructions))


def test_per_sample_selection_and_order_at_inference(models, monkeypatch) -> None:
    lmm, guide = models
    batch = _mixed_batch(lmm, train=False)
    method = _method(models, 4)
    scores = _set_opposed_prototypes(method, guide, batch)
    prefixes = _spy(lmm, "insert_prefix", monkeypatch)
    out = method.generate(batch, 1)
    expected = scores.topk(3, dim=1).indices.tolist()
    assert out.selected == expected  # most similar first
    assert 0 in out.selected[0] and 1 not in out.selected[0]
    assert 1 in out.selected[1] and 0 not in out.selected[1]
    prefix = prefixes[-1][3]  # (B, 3M, d): least similar first, most similar nearest the text
    for b, sel in enumerate(out.selected):
        sets = prefix[b].view(3, M, -1)
        for pos, task in enumerate(reversed(sel)):
            assert torch.equal(sets[pos], method.tasks[task].prompts.detach())


def test_training_fusion_keeps_current_task_nearest_the_text(models, monkeypatch) -> None:
    lmm, guide = models
    batch = _mixed_batch(lmm, train=True)
    method = _method(models, 4)
    scores = _set_opposed_prototypes(method, guide, batch)
    method.begin_task(4, "t4")
    q = _guidance_dirs(guide, batch)
    _set_prototype(method, 4, -(q[0] + q[1]))  # the current task is the LEAST similar one
    prefixes = _spy(lmm, "insert_prefix", monkeypatch)
    method.training_loss(batch)
    prefix = prefixes[-1][3]
    assert prefix.shape[1] == 3 * M
    for b in range(2):
        sets = prefix[b].view(3, M, -1)
        assert torch.equal(sets[2], method.tasks[4].prompts.detach())  # always in, nearest the text
        top_prev = scores[b, :4].topk(2).indices.tolist()  # k - 1 = 2 previous tasks by score
        assert torch.equal(sets[1], method.tasks[top_prev[0]].prompts.detach())
        assert torch.equal(sets[0], method.tasks[top_prev[1]].prompts.detach())
    assert not torch.equal(prefix[0], prefix[1])  # selection is per sample
    # Only the current task trains.
    own = {id(p) for p in method.tasks[4].parameters()}
    assert {id(p) for p in method.trainable_parameters()} == own


def test_early_tasks_fuse_all_previous_in_task_order(models, monkeypatch) -> None:
    lmm, _ = models
    batch = _mixed_batch(lmm, train=True)
    prefixes = _spy(lmm, "insert_prefix", monkeypatch)
    method = _method(models, 1)
    method.begin_task(1, "t1")  # task 2 (1-based) <= fuse_all_until = k - 1 = 2
    method.training_loss(batch)
    sets = prefixes[-1][3].view(2, 2, M, -1)
    for b in range(2):
        assert torch.equal(sets[b, 0], method.tasks[0].prompts.detach())
        assert torch.equal(sets[b, 1], method.tasks[1].prompts.detach())


def test_never_reads_task_labels(models) -> None:
    lmm, _ = models
    method = _method(models, 2)
    batch = batch_for(lmm, "union", train=False, n=1)
    del batch["tasks"]
    out = method.generate(batch, 2)
    assert len(out.texts) == 2 and out.scores.shape == (2, 2)
    assert method.prototypes().shape == (2, models[1].dim)


def test_options_are_validated(models) -> None:
    with pytest.raises(ValueError, match="temprature"):
        build_method("modalprompt", {"temprature": 0.1}, *models)
    with pytest.raises(ValueError, match="lam"):
        build_method("modalprompt", {"lam": 1.5}, *models)
    method = build_method("modalprompt", {}, *models)
    assert (method.opts.k, method.opts.M, method.opts.lam, method.opts.temperature) == (3, 10, 0.5, 0.0)
    assert method.opts.fuse_all_until == 2


def test_trained_prototypes_route_each_task_to_its_own_prompts(models) -> None:
    """After a short sequential run, test samples select their own task's prompts first (the
    diagonal of the paper's selection-frequency matrix), without any task id."""
    lmm, _ = models
    tasks = ["task_a", "task_b", "task_c"]
    method = _method(models, 0)
    for t, task in enumerate(tasks):
        method.begin_task(t, task)
        opt = torch.optim.AdamW(method.trainable_parameters(), lr=1e-2, weight_decay=0.0)
        batch = batch_for(lmm, task)
        for _ in range(20):
            loss, logs = method.training_loss(batch)
            opt.zero_grad()
            loss.backward()
            opt.step()
        assert logs["proto_loss"] < 1.0  # prototypes aligned with the task's guidance features
        method.end_task(t)
    for t, task in enumerate(tasks):
        batch = batch_for(lmm, task, train=False)
        del batch["tasks"]
        assert [sel[0] for sel in method.generate(batch, 1).selected] == [t] * 4


def test_restoring_state_draws_no_random_numbers(models) -> None:
    """A restored (resumed) run must draw the same random numbers afterwards as one that was never
    interrupted: load_state_tensors leaves the global RNG alone and restores exact values."""
    state = _method(models, 3).state_tensors()
    fresh = build_method("modalprompt", {"M": M}, *models)
    torch.manual_seed(11)
    rng = torch.get_rng_state()
    fresh.load_state_tensors(state)
    assert torch.equal(torch.get_rng_state(), rng)
    got = fresh.state_tensors()
    assert got.keys() == state.keys() and all(torch.equal(got[k], state[k]) for k in state)


def test_prompts_start_as_copies_of_random_vocabulary_rows_by_default(models):
    """The reference's add_prompt_tokens: each prompt token copies embed_tokens.weight[j] for a
    j drawn uniformly from the vocabulary; every task draws its own rows."""
    lmm, _ = models
    table = lmm.model.get_input_embeddings().weight
    method = _method(models, 2)
    for t in range(2):
        prompts = method.tasks[t].prompts.detach()
        same = (prompts[:, None, :] == table.detach()[None]).all(dim=-1)  # (M, V)
        assert bool(same.any(dim=1).all()), t  # every token is exactly one of the vocabulary rows
    assert not torch.equal(method.tasks[0].prompts, method.tasks[1].prompts)
    # the same draw as the reference's rule, from the same RNG state
    torch.manual_seed(7)
    ids = torch.randint(table.shape[0], (M,))
    torch.testing.assert_close(method.tasks[0].prompts.detach(), table[ids].detach())


def test_mean_prompt_init_starts_near_the_mean_token(models):
    lmm, _ = models
    table = lmm.model.get_input_embeddings().weight.detach()
    method = _method(models, 1, prompt_init="mean")
    prompts = method.tasks[0].prompts.detach()
    assert (prompts - table.mean(dim=0)).abs().max() < 0.1 * table.std() * 6
    with pytest.raises(ValueError, match="prompt_init must be one of"):
        _method(models, 1, prompt_init="zeros")
