"""Contract tests run over EVERY registered continual method on a tiny random-init LMM and guide.

What each method must satisfy:
  * only the method's own parameters receive gradients (base LMM and guide grads stay None);
  * the state of earlier tasks is bit-identical after a later task is trained;
  * state_tensors -> safetensors file -> a freshly built LMM/guide/method gives identical outputs;
  * a two-task toy run lowers each task's training loss, to well below the untrained loss;
  * unknown options are rejected by name.
Methods with schedule "none" are checked for having nothing to train instead.
"""

from __future__ import annotations

import os

import pytest
import torch
from safetensors.torch import load_file, save_file

from pipeline.methods.protocol import ContinualMethod, finish_task, prepare_task
from pipeline.methods.registry import build_method, load_plugins, registered_methods
from tests.helpers import batch_for, tiny_models, train_toy

# A method outside the repository joins every contract test by its file alone:
# COIN_TEST_METHOD_PLUGINS=path/to/method.py (os.pathsep-separated), as ``method.plugins`` does.
load_plugins([p for p in os.environ.get("COIN_TEST_METHOD_PLUGINS", "").split(os.pathsep) if p])
METHODS = registered_methods()
# methods that declare they see each test sample's task (explicit oracle variants); none other may
ORACLES = {"proglora_static"}
MAX_NEW = 3
STEPS = 30  # optimizer steps per task in the toy run

pytestmark = pytest.mark.usefixtures("one_thread")


def _build(name: str, seed: int = 0) -> tuple[ContinualMethod, object, object]:
    lmm, guide = tiny_models(seed)
    torch.manual_seed(1234)  # method-owned init (prompts, LoRA A) is reproducible too
    return build_method(name, {}, lmm, guide), lmm, guide


def _train(method: ContinualMethod, batch: dict, steps: int, task: int, lr: float | None = None) -> list[float]:
    """The train stage's loop (``pipeline.training.run_steps``, AdamW) on one fixed batch of open
    task ``task``, with the optional hooks where the train stage calls them (``prepare`` before
    the first step, ``adjust_gradients`` at each); returns the losses seen."""
    return train_toy(method, batch, steps, lr, task=task)


def _begin(method: ContinualMethod, t: int, task: str, lmm: object) -> None:
    """Begin task t as the train stage does before calling the method: begin_task, then the
    optional prepare pass over the task's data (here its one toy batch)."""
    method.begin_task(t, task)
    prepare_task(method, t, lambda: [batch_for(lmm, task)])


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
    assert method.task_id_at_test is (name in ORACLES)  # only the declared oracle variants see task ids
    with pytest.raises(ValueError, match="no_such_option"):
        build_method(name, {"no_such_option": 1}, *tiny_models(0))


@pytest.mark.parametrize("name", METHODS)
def test_answers_do_not_depend_on_the_task_names_unless_the_method_is_an_oracle(name: str) -> None:
    """Evaluation batches carry each sample's task name (``tasks``); a method that does not
    declare ``task_id_at_test`` must answer the same without them."""
    method, lmm, _ = _build(name)
    if method.schedule != "none":
        for t, task in enumerate(_schedule_tasks(method)):
            method.begin_task(t, task)
            _train(method, batch_for(lmm, task), 3, t)
            _end(method, t, batch_for(lmm, task))
    batch = batch_for(lmm, "union" if method.schedule == "joint" else "task_a", train=False)
    named = method.generate(batch, MAX_NEW)
    if method.task_id_at_test:
        with pytest.raises(ValueError, match="not learned"):
            method.generate({**batch, "tasks": [""] * len(batch["ids"])}, MAX_NEW)
        return
    blank = method.generate({**batch, "tasks": [""] * len(batch["ids"])}, MAX_NEW)
    other = method.generate({**batch, "tasks": ["task_b"] * len(batch["ids"])}, MAX_NEW)
    assert named.texts == blank.texts == other.texts and named.selected == blank.selected == other.selected


@pytest.mark.parametrize("name", METHODS)
def test_only_own_parameters_get_gradients(name: str) -> None:
    method, lmm, guide = _build(name)
    _begin(method, 0, "task_a", lmm)
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
    _train(method, batch_for(lmm, "task_a"), 3, 0)
    _end(method, 0, batch_for(lmm, "task_a"))
    return method, lmm


@pytest.mark.parametrize("name", METHODS)
def test_old_task_state_bit_identical(name: str) -> None:
    method, lmm = _after_first_task(name)
    before = method.state_tensors()
    keys0 = method.task_keys(0)
    assert set(keys0) <= set(before)
    method.begin_task(1, "task_b")
    _train(method, batch_for(lmm, "task_b"), 3, 1)
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
        _train(method, batch_for(lmm, task), 3, t)
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
    tasks = _schedule_tasks(method)
    _begin(method, 0, tasks[0], lmm)
    with torch.no_grad():  # each task's loss before anything was trained
        untrained = {task: method(batch_for(lmm, task)).item() for task in tasks}
    for t, task in enumerate(tasks):
        if t:
            method.begin_task(t, task)
        losses = _train(method, batch_for(lmm, task), STEPS, t)
        _end(method, t, batch_for(lmm, task))
        # Training on the task lowers its loss, and the task ends well below the untrained
        # model's loss on it. The second bound is measured from the untrained start, not from the
        # task's first step: a method that shares its state across tasks (L2P's pool) starts task
        # 2 where task 1 already brought it, near the floor a toy batch allows.
        what = f"{name} task {t}: untrained {untrained[task]:.3f}, {losses[0]:.3f} -> {losses[-1]:.3f}"
        assert losses[-1] < losses[0], what
        assert losses[-1] < 0.9 * untrained[task], what
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
    _train(method, batch_for(lmm, "task_b"), 3, 1)
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
    _train(fresh, batch_for(fresh_lmm, "task_b"), 2, 1)  # and training goes on


@pytest.mark.parametrize("name", METHODS)
def test_a_later_state_loaded_over_an_earlier_one_answers_as_a_fresh_method(name: str) -> None:
    """What the run's resident inference actor does (``stages.inference``): one method, built once,
    loads the state of task 1, answers, then loads the state of task 2; its answers must be those
    of a method built fresh with only the state of task 2."""
    method, lmm = _after_first_task(name)
    first = method.state_tensors()
    method.begin_task(1, "task_b")
    _train(method, batch_for(lmm, "task_b"), 3, 1)
    _end(method, 1, batch_for(lmm, "task_b"))
    second = method.state_tensors()

    resident_lmm, resident_guide = tiny_models(0, fresh_guide=True)
    torch.manual_seed(999)
    resident = build_method(name, {}, resident_lmm, resident_guide).eval()
    resident.load_state_tensors(first)
    with torch.no_grad():
        resident.generate(batch_for(resident_lmm, "task_a", train=False), MAX_NEW)
    resident.load_state_tensors(second)

    fresh_lmm, fresh_guide = tiny_models(0, fresh_guide=True)
    torch.manual_seed(998)
    fresh = build_method(name, {}, fresh_lmm, fresh_guide).eval()
    fresh.load_state_tensors(second)
    for task in ("task_a", "task_b"):
        with torch.no_grad():
            got = resident.generate(batch_for(resident_lmm, task, train=False), MAX_NEW)
            want = fresh.generate(batch_for(fresh_lmm, task, train=False), MAX_NEW)
        assert got.texts == want.texts and got.selected == want.selected, (name, task)
        if want.scores is not None:
            assert torch.equal(got.scores, want.scores), (name, task)


@pytest.mark.parametrize("name", METHODS)
def test_cached_frozen_encoder_outputs_change_no_answer(name: str) -> None:
    """The inference actor's per-sample cache of the vision tower's and the guide's outputs
    (``pipeline.models.frozen``): the first pass computes and stores them, the second is served
    from the cache, and both answer exactly as without a cache."""
    from pipeline.models.frozen import FeatureCache

    method, lmm, guide = _build(name)
    assert method.frozen_encoders  # every shipped method keeps the towers as loaded
    if method.schedule != "none":
        for t, task in enumerate(_schedule_tasks(method)):
            method.begin_task(t, task)
            _train(method, batch_for(lmm, task), 3, t)
            _end(method, t, batch_for(lmm, task))
    method.eval()
    batch = batch_for(lmm, "task_a", train=False)
    keys = [f"task_a/{i}" for i in batch["ids"]]
    with torch.no_grad():
        want = method.generate(batch, MAX_NEW)
    cache = FeatureCache(1 << 30)
    outs = []
    for _ in range(2):
        with torch.no_grad(), lmm.frozen.bind(cache, {"vision": batch["pixel_values"]}, keys), \
                guide.frozen.bind(cache, {k: batch[k] for k in ("guide_pixels", "guide_text")}, keys):
            outs.append(method.generate(batch, MAX_NEW))
        if len(outs) == 1:
            stored = cache.stats()
            assert stored["rows_computed"] >= len(keys) and stored["rows_served"] == 0, stored
    assert cache.stats()["rows_served"] == stored["rows_computed"], cache.stats()  # all served the 2nd time
    for got in outs:
        assert got.texts == want.texts and got.selected == want.selected, name
        if want.scores is not None:
            assert torch.equal(got.scores, want.scores), name
