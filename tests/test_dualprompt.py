"""DualPrompt's own mechanism on the tiny random-init models (2 LLM layers: G at 0, E at 1):
the general prompt is shared and trains on every task, the expert prompt is per task, each
reaches the layer it is meant for, selection is per sample by key, and cached decoding equals
recomputing the whole sequence."""

from __future__ import annotations

import pytest
import torch

from pipeline.methods.dualprompt import dualprompt_layers
from pipeline.methods.helpers import base_embeds
from pipeline.methods.registry import build_method
from tests.helpers import batch_for, tiny_models, train_toy

pytestmark = pytest.mark.usefixtures("one_thread")


def _dual(**options):
    lmm, guide = tiny_models(0)
    torch.manual_seed(5)
    return build_method("dualprompt", options, lmm, guide), lmm


def test_placement_keeps_dualprompts_depth_fractions() -> None:
    assert dualprompt_layers(12) == ([0, 1], [2, 3, 4])  # the paper's ViT-B
    assert dualprompt_layers(32) == ([0, 1, 2, 3, 4], list(range(5, 13)))  # LLaVA-1.5-7B's LLM
    assert dualprompt_layers(2) == ([0], [1])
    with pytest.raises(ValueError, match="has 1 layer"):
        dualprompt_layers(1)
    lmm, guide = tiny_models(0)
    with pytest.raises(ValueError, match=r"layer\(s\) \[5\] do not exist: the LLM has 2 layers"):
        build_method("dualprompt", {"g_layers": [0], "e_layers": [5]}, lmm, guide)
    with pytest.raises(ValueError, match="set both g_layers and e_layers"):
        build_method("dualprompt", {"g_layers": [0]}, lmm, guide)


def test_each_prompt_reaches_its_own_layer() -> None:
    method, lmm = _dual(g_length=2, e_length=3)
    assert (method.g_layers, method.e_layers) == ([0], [1])
    method.begin_task(0, "task_a")
    seen: dict[int, torch.Tensor] = {}
    layers = method._decoder_layers()
    # registered after the method's hooks, so these see what the layers get
    handles = [layers[i].register_forward_pre_hook(
        lambda m, args, kwargs, i=i: seen.__setitem__(i, (args[0] if args else kwargs["hidden_states"]).detach()),
        with_kwargs=True) for i in range(2)]
    try:
        batch = batch_for(lmm, "task_a")
        with torch.no_grad():
            method(batch)
    finally:
        for h in handles:
            h.remove()
    bos = batch["attention_mask"].argmax(dim=1)
    g_prompt = method.general.prompts[0]
    e_prompt = method.experts[0].prompts[0]
    for b in range(len(bos)):
        g = slice(int(bos[b]) + 1, int(bos[b]) + 3)
        e = slice(int(bos[b]) + 3, int(bos[b]) + 6)
        assert torch.equal(seen[0][b, g], g_prompt)  # the general prompt enters layer 0
        assert torch.equal(seen[0][b, e], torch.zeros_like(e_prompt))  # the expert's positions are empty there
        assert torch.equal(seen[1][b, e], e_prompt)  # the expert prompt enters layer 1
        assert not torch.equal(seen[1][b, g], g_prompt)  # layer 1 carries layer 0's output at G positions
    assert method._active is None  # the hooks are disarmed after the call


def test_the_general_prompt_is_shared_and_the_expert_prompt_per_task() -> None:
    method, lmm = _dual()
    g0 = method.general.prompts.detach().clone()
    method.begin_task(0, "task_a")
    train_toy(method, batch_for(lmm, "task_a"), 5, end_task=0)
    g1 = method.general.prompts.detach().clone()
    e0 = method.experts[0].prompts.detach().clone()
    method.begin_task(1, "task_b")
    method(batch_for(lmm, "task_b")).backward()
    assert method.general.prompts.grad is not None and method.experts[1].prompts.grad is not None
    assert all(p.grad is None for p in method.experts[0].parameters())
    method.general.prompts.grad = None
    method.experts[1].zero_grad(set_to_none=True)
    train_toy(method, batch_for(lmm, "task_b"), 5, end_task=1)
    assert not torch.equal(g0, g1) and not torch.equal(g1, method.general.prompts)  # trained on both tasks
    assert torch.equal(e0, method.experts[0].prompts)  # task 0's expert untouched by task 1
    assert len(method.experts) == 2 and not torch.equal(method.experts[0].prompts, method.experts[1].prompts)


def test_training_pulls_the_tasks_key_and_test_selects_per_sample() -> None:
    method, lmm = _dual()
    method.begin_task(0, "task_a")
    batch = batch_for(lmm, "task_a")
    q = method.query(batch)
    before = float(method.similarity(q, method.experts[0].key.detach().unsqueeze(0)).mean())
    train_toy(method, batch, 10, lr=5e-2, end_task=0)
    assert float(method.similarity(q, method.experts[0].key.unsqueeze(0)).mean()) > before + 0.1
    method.begin_task(1, "task_b")
    method.end_task(1)
    union = batch_for(lmm, "union", train=False, n=2)  # samples 0-1 of task_a, 2-3 of task_b
    qu = method.query(union)
    with torch.no_grad():
        method.experts[0].key.copy_(qu[0])
        method.experts[1].key.copy_(qu[2])
    out = method.generate(union, 2)
    assert [s[0] for s in out.selected] == [0, 0, 1, 1]
    assert out.scores.shape == (4, 2)


def test_cached_decoding_equals_recomputing_the_sequence() -> None:
    method, lmm = _dual()
    method.begin_task(0, "task_a")
    train_toy(method, batch_for(lmm, "task_a"), 5, end_task=0)
    batch = batch_for(lmm, "task_a", train=False, n=2)
    out = method.generate(batch, 3)
    # greedy by hand, the whole sequence recomputed at every step (no cache), hooks armed each time
    embeds = base_embeds(lmm, batch)
    prompts = method.experts[0].prompts.unsqueeze(0)
    chosen = torch.zeros(2, dtype=torch.long)
    table = lmm.model.get_input_embeddings()
    tokens: list[list[int]] = [[], []]
    with torch.no_grad():
        e, mask, _ = method._prompted(embeds, batch["attention_mask"], None, chosen, prompts)
        for _ in range(3):
            method._active["length"] = e.shape[1]
            nxt = lmm.lm_logits(e, mask)[:, -1].argmax(dim=-1)
            for b in range(2):
                tokens[b].append(int(nxt[b]))
            e = torch.cat([e, table(nxt).unsqueeze(1)], dim=1)
            mask = torch.cat([mask, mask.new_ones(2, 1)], dim=1)
    method._active = None
    tok = lmm.tokenizer
    want = []
    for row in tokens:
        if tok.eos_token_id in row:
            row = row[: row.index(tok.eos_token_id)]
        want.append(tok.decode(row, skip_special_tokens=True).strip())
    assert out.texts == want
