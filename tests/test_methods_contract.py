"""Contract tests run over EVERY registered continual method on a tiny random-init LMM and guide.

What each method must satisfy (shared/docs/style.md, principle 9):
  * only the method's own parameters receive gradients (base LMM and guide grads stay None);
  * the state of earlier tasks is bit-identical after a later task is trained;
  * state_tensors -> safetensors file -> a freshly built LMM/guide/method gives identical outputs;
  * a two-task toy run lowers the training loss;
  * unknown options are rejected by name.
Methods with schedule "none" are checked for having nothing to train instead.
"""

from __future__ import annotations

import functools
import zlib
from typing import Any

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

from pipeline.methods.base import (
    ContinualMethod,
    GradAccess,
    adjust_gradients,
    build_method,
    finish_task,
    registered_methods,
)

METHODS = registered_methods()
MAX_NEW = 3
STEPS = 30  # optimizer steps per task in the toy run

# ---------------------------------------------------------------------------------------------
# Tiny random-init base models and toy data, shared with tests/test_modalprompt.py
# ---------------------------------------------------------------------------------------------

# Two toy "tasks": different questions, images and (constant) answers, so that a method that
# learns one can be seen to learn the other.
TOY_TASKS: dict[str, tuple[str, str]] = {
    "task_a": ("what colour is the picture ?", "red"),
    "task_b": ("how many stripes are there ?", "three"),
    "task_c": ("is there a cat in the image ?", "yes"),
}
IMAGE_SIZE = 16


def tiny_config():
    """A few-thousand-parameter LLaVA + CLIP; everything read downstream comes from the model."""
    from pipeline.models import ModelConfig, TinySpec

    spec = TinySpec(
        vision_layers=1, vision_hidden=32, vision_heads=2, vision_intermediate=64, patch_size=8,
        lm_layers=2, lm_hidden=32, lm_heads=2, lm_intermediate=64, max_position_embeddings=128,
        guide_embed_dim=32, guide_vision_width=48, guide_vision_layers=1, guide_vision_head_width=16,
        guide_patch_size=8, guide_text_width=32, guide_text_layers=1, guide_text_heads=2,
        guide_context_length=16,
    )
    return ModelConfig(kind="tiny", image_size=IMAGE_SIZE, max_length=64, max_new_tokens=4, tiny=spec)


def tiny_models(seed: int = 0, fresh_guide: bool = False) -> tuple[Any, Any]:
    """(LMM, Guide) with random weights; the same seed gives bit-identical weights.

    The LMM is always built anew (LoRA injects into it). The guide is frozen and no method
    writes to it, so it is shared per seed unless ``fresh_guide`` (it costs a build per test).
    """
    from pipeline.models import build_lmm
    from pipeline.models.tokenizer import build_tokenizer

    torch.manual_seed(seed)
    texts = [f"{q} {a}" for q, a in TOY_TASKS.values()]
    lmm = build_lmm(tiny_config(), tokenizer=build_tokenizer(texts))
    with torch.no_grad():
        # Random init (std 0.02) caps the logit gaps a frozen head can produce at ~0.6, so no
        # method could fit anything; a larger head lets the toy run show learning.
        lmm.model.get_output_embeddings().weight.mul_(10.0)
    guide = _build_guide(seed) if fresh_guide else _shared_guide(seed)
    return lmm, guide


def _build_guide(seed: int) -> Any:
    from pipeline.models import build_guide

    torch.manual_seed(seed + 1)
    return build_guide(tiny_config())


@functools.lru_cache(maxsize=None)
def _shared_guide(seed: int) -> Any:
    return _build_guide(seed)


def toy_rows(task: str, n: int = 4, split: str = "train") -> list[dict[str, Any]]:
    """``n`` schema rows of a toy task (fixed per task name: same images on every call)."""
    question, answer = TOY_TASKS[task]
    rng = np.random.default_rng(zlib.crc32(task.encode()))
    return [
        {
            "task": task, "split": split, "id": f"{task}-{i}", "index": i, "image_path": "",
            "image": rng.integers(0, 256, (IMAGE_SIZE, IMAGE_SIZE, 3), dtype=np.uint8),
            "human_turns": [question], "gpt_turns": [answer] if split == "train" else [],
            "instruction": question, "answer": answer if split == "test" else "",
            "answers": [], "answer_bbox": "", "size": [],
        }
        for i in range(n)
    ]


def batch_for(lmm: Any, task: str, train: bool = True, n: int = 4) -> dict[str, Any]:
    """Collated batch of one toy task, or of the union of task_a and task_b (``"union"``)."""
    from pipeline.models.lmm import rows_to_batch

    split = "train" if train else "test"
    names = ["task_a", "task_b"] if task == "union" else [task]
    rows = [row for name in names for row in toy_rows(name, n, split)]
    return lmm.collate(rows_to_batch(rows), train=train)


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """Tiny models on a shared 2-core box run far faster on one intra-op thread."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


# ---------------------------------------------------------------------------------------------


def _build(name: str, seed: int = 0) -> tuple[ContinualMethod, object, object]:
    lmm, guide = tiny_models(seed)
    torch.manual_seed(1234)  # method-owned init (prompts, LoRA A) is reproducible too
    return build_method(name, {}, lmm, guide), lmm, guide


# The toy loop's rate, per method where 1e-2 does not suit it. EWC's penalty at its default
# lambda (1e5) is stiff: at 1e-2 Adam overshoots on task 1 and the loss oscillates (measured
# 1.94 -> 84.9 -> ... -> 2.08 after 30 steps on one CPU, lower on another); at 2e-3, the rate the
# default config trains LoRA and EWC with (train.lr), it descends steadily (3.30 -> 0.52).
TOY_LR = {"ewc": 2e-3}


def _train(method: ContinualMethod, batch: dict, steps: int, lr: float | None = None) -> list[float]:
    """Plain AdamW loop on one fixed batch, with the optional gradient hook as the train stage
    calls it; returns the losses seen."""
    lr = TOY_LR.get(method.name, 1e-2) if lr is None else lr
    opt = torch.optim.AdamW(method.trainable_parameters(), lr=lr, weight_decay=0.0)
    losses = []
    for _ in range(steps):
        loss = method(batch)
        opt.zero_grad()
        loss.backward()
        adjust_gradients(method, GradAccess())
        opt.step()
        losses.append(loss.item())
    return losses


def _end(method: ContinualMethod, t: int, batch: dict) -> None:
    """End task t as the train stage does: the optional consolidate pass over the task's data
    (here its one toy batch), then end_task."""
    finish_task(method, t, lambda: [batch])


def _schedule_tasks(method: ContinualMethod) -> list[str]:
    """Task names a toy run trains on: the union once for "joint", two tasks for "sequential"."""
    return ["union"] if method.schedule == "joint" else ["task_a", "task_b"]


@pytest.mark.parametrize("name", METHODS)
def test_protocol_and_unknown_options(name: str) -> None:
    method, lmm, guide = _build(name)
    assert isinstance(method, ContinualMethod)
    assert isinstance(method, torch.nn.Module)
    assert method.schedule in {"sequential", "joint", "none"}
    assert method.task_id_at_test is False
    with pytest.raises(ValueError, match="no_such_option"):
        build_method(name, {"no_such_option": 1}, *tiny_models(0))


@pytest.mark.parametrize("name", METHODS)
def test_only_own_parameters_get_gradients(name: str) -> None:
    method, lmm, guide = _build(name)
    method.begin_task(0, "task_a")
    own = {id(p) for p in method.trainable_parameters()}
    base = list(lmm.model.parameters()) + [p for m in _guide_modules(guide) for p in m.parameters()]
    if method.schedule == "none":
        assert not own
        assert not any(p.requires_grad for p in method.parameters())
        assert method(batch_for(lmm, "task_a")).grad_fn is None
        return
    assert own, "a trainable method must expose parameters"
    method(batch_for(lmm, "task_a")).backward()
    leaked = [p.shape for p in base if id(p) not in own and p.grad is not None]
    assert not leaked, f"base LMM / guide parameters got gradients: {leaked[:3]}"
    assert all(p.grad is not None for p in method.trainable_parameters())
    # Nothing outside trainable_parameters() may require grad either.
    assert all(id(p) in own for p in base + list(method.parameters()) if p.requires_grad)


def _after_first_task(name: str) -> tuple[ContinualMethod, object]:
    """``name`` built, trained three steps on task_a and ended (task 0 learned); skips methods
    that have no sequence of tasks (zero-shot trains nothing, multi-task trains one joint task)."""
    method, lmm, _ = _build(name)
    if method.schedule != "sequential":
        pytest.skip("only sequential methods learn task after task")
    method.begin_task(0, "task_a")
    _train(method, batch_for(lmm, "task_a"), 3)
    _end(method, 0, batch_for(lmm, "task_a"))
    return method, lmm


@pytest.mark.parametrize("name", METHODS)
def test_old_task_state_bit_identical(name: str) -> None:
    method, lmm = _after_first_task(name)
    before = method.state_tensors()
    keys0 = method.task_keys(0)
    assert set(keys0) <= set(before)
    method.begin_task(1, "task_b")
    _train(method, batch_for(lmm, "task_b"), 3)
    _end(method, 1, batch_for(lmm, "task_b"))
    after = method.state_tensors()
    assert all(torch.equal(before[k], after[k]) for k in keys0)
    assert not set(keys0) & set(method.task_keys(1))


@pytest.mark.parametrize("name", METHODS)
def test_state_roundtrip_through_safetensors(name: str, tmp_path) -> None:
    method, lmm, _ = _build(name)
    tasks = [] if method.schedule == "none" else _schedule_tasks(method)
    for t, task in enumerate(tasks):
        method.begin_task(t, task)
        _train(method, batch_for(lmm, task), 3)
        _end(method, t, batch_for(lmm, task))
    path = tmp_path / "state.safetensors"
    save_file(method.state_tensors(), str(path))

    # Fresh-process semantics: everything is built again, then only the file is loaded.
    fresh_lmm, fresh_guide = tiny_models(0, fresh_guide=True)
    torch.manual_seed(999)  # different method init: the loaded state must override all of it
    fresh = build_method(name, {}, fresh_lmm, fresh_guide)
    fresh.load_state_tensors(load_file(str(path)))
    ref, got = method.state_tensors(), fresh.state_tensors()
    assert ref.keys() == got.keys() and all(torch.equal(ref[k], got[k]) for k in ref)

    test_batch = batch_for(lmm, "task_a", train=False)
    out_a = method.generate(test_batch, MAX_NEW)
    out_b = fresh.generate(batch_for(fresh_lmm, "task_a", train=False), MAX_NEW)
    assert out_a.texts == out_b.texts and out_a.selected == out_b.selected
    if out_a.scores is not None:
        assert torch.equal(out_a.scores, out_b.scores)

    last = max(len(tasks) - 1, 0)
    for m in (method, fresh):
        m.begin_task(last, "resume")  # resuming the latest task is allowed
    with torch.no_grad():
        assert method(batch_for(lmm, "task_b")).item() == fresh(batch_for(fresh_lmm, "task_b")).item()


@pytest.mark.parametrize("name", METHODS)
def test_two_task_toy_run_lowers_loss(name: str) -> None:
    method, lmm, _ = _build(name)
    if method.schedule == "none":
        assert method.trainable_parameters() == []
        assert method.state_tensors() == {}
        return
    for t, task in enumerate(_schedule_tasks(method)):
        method.begin_task(t, task)
        losses = _train(method, batch_for(lmm, task), STEPS)
        _end(method, t, batch_for(lmm, task))
        assert losses[-1] < 0.9 * losses[0], f"{name} task {t}: {losses[0]:.3f} -> {losses[-1]:.3f}"
        assert method.trainable_parameters() == []  # end_task froze it


def _guide_modules(guide: object) -> list[torch.nn.Module]:
    """Every nn.Module the guide holds (whatever its attribute names)."""
    if isinstance(guide, torch.nn.Module):
        return [guide]
    return [v for v in vars(guide).values() if isinstance(v, torch.nn.Module)]


@pytest.mark.parametrize("name", METHODS)
def test_restoring_a_partly_trained_task_then_begin_task_resumes_it(name: str) -> None:
    """What a train worker does after a crash: restore the earlier tasks' state, then the job's
    mid-task checkpoint (current task included, not ended), then ``begin_task`` on it; the
    restored task must be trainable again, with its checkpointed values."""
    method, lmm = _after_first_task(name)
    earlier = method.state_tensors()
    method.begin_task(1, "task_b")
    _train(method, batch_for(lmm, "task_b"), 3)
    checkpoint = method.state_tensors()  # mid-task: end_task(1) not called

    fresh_lmm, fresh_guide = tiny_models(0, fresh_guide=True)
    torch.manual_seed(999)
    fresh = build_method(name, {}, fresh_lmm, fresh_guide)
    fresh.load_state_tensors(earlier)
    fresh.load_state_tensors(checkpoint)
    fresh.begin_task(1, "task_b")
    params = fresh.trainable_parameters()
    assert params, f"{name}: nothing to train after resuming task 1"
    names = {id(p): n for n, p in fresh.named_parameters()}
    got = fresh.state_tensors()
    assert all(torch.equal(got[k], checkpoint[k]) for k in checkpoint)
    assert not set(fresh.task_keys(0)) & {names[id(p)] for p in params}  # task 0 stays frozen
    _train(fresh, batch_for(fresh_lmm, "task_b"), 2)  # and training goes on
