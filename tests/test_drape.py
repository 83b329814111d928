"""DRAPE's mechanisms on the tiny random-init LMM (the contract, ZeRO-2/3 and resume tests run it
with every other method): what null-space projection promises for the shared projector, the
instance-specific generator, per-sample prototype routing and its diagnostics."""

from __future__ import annotations

import json

import pytest
import torch

from pipeline.methods.protocol import GradAccess
from pipeline.methods.registry import build_method
from tests.helpers import batch_for, tiny_models, train_toy

pytestmark = pytest.mark.usefixtures("one_thread")
STEPS = 30


def _drape(**options):
    lmm, guide = tiny_models(0)
    torch.manual_seed(0)
    return build_method("drape", options, lmm, guide), lmm


def _patches(lmm, batch) -> torch.Tensor:
    with torch.no_grad():
        return lmm.vision_features(batch["pixel_values"]).float()


def test_split_embedding_equals_the_llava_path() -> None:
    """DRAPE embeds through ``vision_features`` + its projector + ``embed_image_features``; with
    LLaVA's own projector that is exactly ``LMM.embed`` (LlavaModel.get_image_features)."""
    lmm, _ = tiny_models(0)
    batch = batch_for(lmm, "task_a")
    projector = lmm.model.model.multi_modal_projector
    with torch.no_grad():
        split = lmm.embed_image_features(batch["input_ids"], projector(_patches(lmm, batch)))
        assert torch.equal(split, lmm.embed(batch["input_ids"], batch["pixel_values"]))
    method, _ = _drape()
    with torch.no_grad():  # the method's copy of the projector starts as LLaVA's
        assert torch.allclose(method.projector(_patches(lmm, batch)), projector(_patches(lmm, batch)), atol=1e-6)
    eff = method.effective_projector()
    assert torch.equal(eff["linear_1.weight"], projector.linear_1.weight)
    assert torch.equal(eff["linear_2.bias"], projector.linear_2.bias)


def _drift(**options) -> tuple[float, object, object]:
    """Train task_a, end it, train task_b; returns the relative change of the projector's outputs
    on task_a's inputs across task_b, and the method and LMM."""
    method, lmm = _drape(**options)
    batch_a, batch_b = batch_for(lmm, "task_a"), batch_for(lmm, "task_b")
    method.begin_task(0, "task_a")
    train_toy(method, batch_a, STEPS, end_task=0)
    with torch.no_grad():
        before = method.projector(_patches(lmm, batch_a))
    method.begin_task(1, "task_b")
    losses = train_toy(method, batch_b, STEPS, end_task=1)
    assert losses[-1] < losses[0]  # task_b was learned all the same
    with torch.no_grad():
        after = method.projector(_patches(lmm, batch_a))
    return float((after - before).norm() / before.norm()), method, lmm


def test_null_space_projection_keeps_the_first_tasks_projected_features() -> None:
    """After a second task, the projector's outputs on the first task's inputs move far less with
    the projection than without it. Measured on this toy (relative change, 30 AdamW steps at
    1e-2): 1.61 without projection, 0.44 projecting the gradient in the standard basis (AdamW's
    per-coordinate rescaling takes the update out of the null space), 0.024 in the eigenbasis
    (the default): 68x less than without."""
    free, _, _ = _drift(projection=False)
    standard, _, _ = _drift(nullspace_basis="standard")
    eigen, method, _ = _drift()
    assert free > 0.5, f"without projection the projector should move on task_b (moved {free:.3f})"
    assert eigen < 0.05 * free, f"eigen {eigen:.4f} vs no projection {free:.4f}"
    assert eigen < 0.25 * standard, f"eigen {eigen:.4f} vs standard basis {standard:.4f}"
    assert standard < free
    # the second task's covariance was accumulated too: fewer free directions for a third task
    for name in ("linear_1", "linear_2"):
        layer = getattr(method.projector, name)
        assert 0 < int(layer.mask.sum()) < layer.mask.numel()


@pytest.mark.parametrize("basis", ["eigen", "standard"])
def test_projected_gradient_has_no_component_in_the_protected_subspace(basis: str) -> None:
    method, lmm = _drape(nullspace_basis=basis)
    method.begin_task(0, "task_a")
    train_toy(method, batch_for(lmm, "task_a"), 5, end_task=0)
    method.begin_task(1, "task_b")
    method(batch_for(lmm, "task_b")).backward()
    raw = {n: getattr(method.projector, n).weight.grad.clone() for n in ("linear_1", "linear_2")}
    method.adjust_gradients(GradAccess())
    for name, g_raw in raw.items():
        layer = getattr(method.projector, name)
        evals, evecs = torch.linalg.eigh(layer.cov.double())
        protected = evecs[:, evals >= method.opts.null_threshold * evals.max()].float()
        assert protected.shape[1] > 0
        g = layer.weight.grad
        # the gradient in the standard basis (W~ = W' U^T, so dL/dW~ = dL/dW' U^T)
        g_std = g @ layer.basis.T
        raw_std = g_raw @ layer.basis.T
        assert (raw_std @ protected).norm() > 1e-3 * raw_std.norm()  # there was something to remove
        assert (g_std @ protected).norm() <= 1e-5 * raw_std.norm(), name
        if basis == "eigen":
            assert torch.all(g[:, layer.mask < 0.5] == 0)  # exact zeros: AdamW leaves them still


def test_first_task_trains_the_projector_freely_and_ablations_freeze_it() -> None:
    method, lmm = _drape()
    method.begin_task(0, "task_a")
    assert all(int(getattr(method.projector, n).mask.sum()) == getattr(method.projector, n).mask.numel()
               for n in ("linear_1", "linear_2"))
    assert any(p is method.projector.linear_1.weight for p in method.trainable_parameters())
    frozen, _ = _drape(train_projector=False)
    frozen.begin_task(0, "task_a")
    assert not any(p is frozen.projector.linear_1.weight for p in frozen.trainable_parameters())


def _two_samples_one_task(lmm):
    """Two rows of task_a whose images differ, and the same rows with another instruction."""
    from tests.helpers import toy_rows
    from pipeline.models.lmm import rows_to_batch

    rows = toy_rows("task_a", 2, "test")
    swapped = [dict(r, instruction="how many stripes are there ?", human_turns=["how many stripes are there ?"])
               for r in rows]
    same_image = [dict(rows[0]), dict(rows[0])]
    return [lmm.collate(rows_to_batch(x), train=False) for x in (rows, swapped, same_image)]


def test_prompts_are_instance_specific_functions_of_image_and_instruction() -> None:
    method, lmm = _drape()
    method.begin_task(0, "task_a")
    train_toy(method, batch_for(lmm, "task_a"), 3, end_task=0)
    gen = method.tasks[0]
    rows, swapped, same_image = _two_samples_one_task(lmm)

    def prompts(batch):
        with torch.no_grad():
            return method._prompts(gen, batch, _patches(lmm, batch))

    p, q, s = prompts(rows), prompts(swapped), prompts(same_image)
    assert p.shape == (2, method.opts.M, method.d_llm)
    assert not torch.allclose(p[0], p[1])  # two samples of one task: different prompts
    assert torch.allclose(s[0], s[1])  # the same image and instruction: the same prompts
    assert not torch.allclose(p[0], q[0])  # same image, other instruction: different prompts
    # measured: the instance part's norm per token 1.45; another image moves it by 0.16, another
    # instruction by 0.066 (3 training steps). Both must be more than rounding:
    size = (p - gen.base).norm(dim=-1).mean()
    assert (p[0] - p[1]).norm(dim=-1).mean() > 0.01 * size
    assert (p[0] - q[0]).norm(dim=-1).mean() > 0.01 * size

    task_level, lmm2 = _drape(generator="task_prompt")
    task_level.begin_task(0, "task_a")
    rows2, swapped2, _ = _two_samples_one_task(lmm2)
    with torch.no_grad():
        t1 = task_level._prompts(task_level.tasks[0], rows2, _patches(lmm2, rows2))
        t2 = task_level._prompts(task_level.tasks[0], swapped2, _patches(lmm2, swapped2))
    assert torch.equal(t1[0], t1[1]) and torch.equal(t1, t2)  # the ablation: one prompt per task


def test_routing_is_per_sample_and_recorded() -> None:
    """A batch mixing two tasks' test samples: each sample goes to its own task's generator."""
    method, lmm = _drape()
    for t, task in enumerate(("task_a", "task_b")):
        method.begin_task(t, task)
        train_toy(method, batch_for(lmm, task), 3, end_task=t)
    mixed = batch_for(lmm, "union", train=False)
    out = method.generate(mixed, 3)
    assert out.selected == [[0]] * 4 + [[1]] * 4
    assert out.scores.shape == (8, 2)
    # routing by image only ignores the instruction; by text only ignores the image
    image_only, lmm_i = _drape(route="image")
    text_only, _ = _drape(route="text")
    for m in (image_only, text_only):
        for t, task in enumerate(("task_a", "task_b")):
            m.begin_task(t, task)
            m.prepare(t, [batch_for(lmm_i, task)], lambda x: x)
            m.end_task(t)
    batch = batch_for(lmm_i, "task_a", train=False)
    other_text = dict(batch, guide_text=batch_for(lmm_i, "task_b", train=False)["guide_text"])
    other_image = dict(batch, guide_pixels=batch_for(lmm_i, "task_b", train=False)["guide_pixels"])
    assert torch.equal(image_only.route_scores(batch), image_only.route_scores(other_text))
    assert not torch.equal(image_only.route_scores(batch), image_only.route_scores(other_image))
    assert torch.equal(text_only.route_scores(batch), text_only.route_scores(other_image))


def test_routing_diagnostics(tmp_path) -> None:
    cls = type(_drape()[0])
    rec = lambda sel: {"selected": [sel], "scores": [0.0, 0.0, 0.0]}  # noqa: E731
    predictions = {"A": [rec(0)] * 3 + [rec(1)], "B": [rec(1)] * 2, "C": [rec(2)] * 1 + [rec(0)] * 3}
    diag = cls.diagnostics(predictions, ["A", "B", "C"], tmp_path)
    data = json.loads((tmp_path / "routing.json").read_text())
    assert data["routing_accuracy"] == {"A": 0.75, "B": 1.0, "C": 0.25}
    assert data["routing_frequency"][0] == [0.75, 0.25, 0.0]
    assert diag.summary["routing_accuracy_mean"] == pytest.approx((0.75 + 1.0 + 0.25) / 3)
    assert (tmp_path / "routing_frequency.png").stat().st_size > 0
    # a test task not learned yet counts as a miss
    early = cls.diagnostics({"A": [rec(0)], "B": [rec(0)]}, ["A"], tmp_path)
    assert early.summary["routing_accuracy/B"] == 0.0


def test_options_are_checked() -> None:
    for bad in ({"route": "both"}, {"nullspace_basis": "svd"}, {"null_threshold": 0}, {"generator": "big"},
                {"heads": 5}):
        with pytest.raises(ValueError, match="drape"):
            _drape(**bad)


_ENGINE_SCRIPT = """
import json, sys, importlib
import torch, deepspeed
importlib.import_module("deepspeed.comm.torch").build_shm_op = lambda: None
deepspeed.init_distributed(dist_backend="gloo")
from pipeline.methods.protocol import finish_task
from pipeline.methods.registry import build_method
from pipeline.training import FitJob, run_steps
from stages.common import fill_deepspeed_config
from stages.train_worker import EngineGrads, mean_over_workers, register_for_zero3
from tests.helpers import batch_for, tiny_models

torch.set_num_threads(1)
out = {}
for kind in ("zero2", "zero3"):
    template = json.load(open(f"{sys.argv[1]}/{kind}.json"))
    if kind == "zero3":
        template["zero_optimization"]["stage3_param_persistence_threshold"] = 0
    state = None
    for t, task in enumerate(["task_a", "task_b"]):
        lmm, guide = tiny_models(0, fresh_guide=True)  # a fresh method per task, as a train worker
        torch.manual_seed(7 + t)
        method = build_method("drape", {}, lmm, guide)
        if state is not None:
            method.load_state_tensors(state)
        method.begin_task(t, task)
        start = method.state_tensors()
        batch = batch_for(lmm, task)
        cfg = fill_deepspeed_config(template, micro_batch=4, grad_accum=1, world_size=1, lr=1e-2,
                                    weight_decay=0.0, use_bf16=False)
        register_for_zero3(method, cfg)
        engine, *_ = deepspeed.initialize(model=method, model_parameters=method.trainable_parameters(), config=cfg)
        run_steps(method, engine, lambda e: [batch] * 4, FitJob(t, task, 4), grads=EngineGrads(),
                  task_batches=lambda: [batch], mean_over_workers=mean_over_workers)
        finish_task(method, t, lambda: [batch], mean_over_workers)
        state = method.state_tensors()
        engine.destroy()
    moved = {}
    for layer in ("linear_1", "linear_2"):
        key, mask = f"projector.{layer}.weight", start[f"projector.{layer}.mask"] < 0.5
        delta = (state[key] - start[key]).abs()
        moved[layer] = [float(delta[:, mask].max()), float(delta[:, ~mask].max()), int(mask.sum())]
    out[kind] = moved
print("RESULT " + json.dumps(out))
"""


def test_projection_holds_through_deepspeed_zero2_and_zero3() -> None:
    """The train worker's path (a DeepSpeed engine, ``EngineGrads``, a fresh method per task): on
    the second task the protected columns of each projector layer stay exactly where they were,
    the free ones move, under ZeRO-2 and fully partitioned ZeRO-3."""
    import os
    import subprocess
    import sys

    from tests.helpers import ROOT, free_port

    env = dict(os.environ, DS_ACCELERATOR="cpu", CUDA_VISIBLE_DEVICES="", MASTER_ADDR="127.0.0.1",
               MASTER_PORT=str(free_port()), RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", PYTHONPATH=str(ROOT))
    proc = subprocess.run([sys.executable, "-W", "ignore::FutureWarning", "-c", _ENGINE_SCRIPT,
                           str(ROOT / "cluster" / "deepspeed")], env=env, cwd=ROOT, capture_output=True, text=True,
                          timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    result = json.loads(next(x for x in proc.stdout.splitlines() if x.startswith("RESULT "))[len("RESULT "):])
    for kind, layers in result.items():
        for layer, (protected, free, n_protected) in layers.items():
            assert n_protected > 0, (kind, layer)
            assert protected == 0.0, (kind, layer, protected)
            assert free > 1e-4, (kind, layer, free)


def test_bf16_as_a_gpu_engine_converts_it() -> None:
    """On a GPU the LMM and the method run in bf16 (a bf16 DeepSpeed engine converts every
    floating parameter and buffer of the method). DRAPE still trains, consolidates, rebases and
    routes, and keeps the covariance and the basis in float32 (a bf16 covariance could not resolve
    the null-space threshold)."""
    lmm, guide = tiny_models(0)
    lmm.model.to(torch.bfloat16)
    torch.manual_seed(0)
    method = build_method("drape", {}, lmm, guide)
    for t, task in enumerate(("task_a", "task_b")):
        method.begin_task(t, task)
        method.bfloat16()
        batch = batch_for(lmm, task)
        method.prepare(t, [batch], lambda x: x)
        loss = method(batch)
        loss.backward()
        method.adjust_gradients(GradAccess())
        assert torch.isfinite(loss) and method.projector.linear_1.weight.grad.dtype == torch.bfloat16
        method.consolidate(t, [batch], lambda x: x)
        method.end_task(t)
    layer = method.projector.linear_1
    assert layer.weight.dtype == torch.bfloat16
    assert layer.cov.dtype == layer.basis.dtype == torch.float32 and 0 < int(layer.mask.sum()) < layer.mask.numel()
    assert method.generate(batch_for(lmm, "task_b", train=False), 3).selected == [[1]] * 4
