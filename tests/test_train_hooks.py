"""The optional method hooks through a real DeepSpeed engine, as the train stage calls them
(stages/train.py): ``adjust_gradients`` reads and replaces full gradients between backward and
step under ZeRO-2 and ZeRO-3, and a ``consolidate`` pass that takes gradients with
``torch.autograd.grad`` leaves the engine's next step exactly as it would have been."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

from tests.helpers import free_port

ROOT = Path(__file__).resolve().parents[1]

_SCRIPT = textwrap.dedent(
    """
    import copy, json, sys
    import torch, deepspeed, importlib
    importlib.import_module("deepspeed.comm.torch").build_shm_op = lambda: None
    deepspeed.init_distributed(dist_backend="gloo")
    from deepspeed.utils import safe_get_full_fp32_param
    from pipeline.methods.protocol import adjust_gradients, finish_task
    from stages.common import fill_deepspeed_config
    from stages.train_worker import EngineGrads, mean_over_workers

    F = torch.nn.functional

    class Toy(torch.nn.Module):
        def __init__(self, project):
            super().__init__()
            self.a, self.b = torch.nn.Linear(4, 16), torch.nn.Linear(16, 1)
            self.project, self.seen, self.fisher, self.ended = project, None, None, None

        def forward(self, x):
            return F.mse_loss(self.b(F.relu(self.a(x))), x.sum(dim=1, keepdim=True))

        def adjust_gradients(self, grads):  # a stand-in for a projection: drop a's weight gradient
            if self.project:
                self.seen = grads.get(self.a.weight).clone()
                grads.set(self.a.weight, torch.zeros_like(self.seen))

        def consolidate(self, t, batches, mean):
            params = [self.a.weight, self.b.weight]
            sq = [torch.zeros_like(p) for p in params]
            for x in batches:
                for s, g in zip(sq, torch.autograd.grad(self(x), params)):
                    s += g ** 2
            self.fisher = [mean(s).tolist() for s in sq]

        def end_task(self, t):
            self.ended = t

    def run(config, project, consolidate):
        torch.manual_seed(0)
        model = Toy(project)
        ref = copy.deepcopy(model)
        cfg = fill_deepspeed_config(json.load(open(config)), micro_batch=8, grad_accum=1, world_size=1,
                                    lr=1e-2, weight_decay=0.0, use_bf16=False)
        engine, *_ = deepspeed.initialize(model=model, model_parameters=model.parameters(), config=cfg)
        xs = [torch.randn(8, 4, generator=torch.Generator().manual_seed(i)) for i in range(3)]
        before = {n: safe_get_full_fp32_param(p).clone() for n, p in model.named_parameters()}
        loss = engine(xs[0])
        engine.backward(loss)
        ref(xs[0]).backward()
        hooked = adjust_gradients(model, EngineGrads())
        engine.step()
        out = {"hooked": hooked,
               "grad_read_ok": model.seen is None or torch.allclose(model.seen, ref.a.weight.grad, atol=1e-6),
               "unchanged": sorted(n for n, p in model.named_parameters()
                                   if torch.equal(before[n], safe_get_full_fp32_param(p)))}
        if consolidate:
            out["consolidated"] = finish_task(model, 0, lambda: iter(xs[1:]), mean_over_workers)
            out["ended"] = model.ended
            want = [torch.zeros_like(p) for p in (ref.a.weight, ref.b.weight)]
            snap = copy.deepcopy(model)  # the model after the step, outside the engine
            for x in xs[1:]:
                for w, g in zip(want, torch.autograd.grad(snap(x), [snap.a.weight, snap.b.weight])):
                    w += g ** 2
            out["fisher_ok"] = all(torch.allclose(torch.tensor(f), w, atol=1e-6) for f, w in zip(model.fisher, want))
        loss = engine(xs[1])  # one more step: identical with or without the consolidate pass
        engine.backward(loss)
        engine.step()
        out["final"] = {n: safe_get_full_fp32_param(p).tolist() for n, p in model.named_parameters()}
        engine.destroy()
        return out

    results = {}
    for config in sys.argv[1:]:
        name = config.rsplit("/", 1)[-1]
        results[name] = {"project": run(config, True, False), "plain": run(config, False, False)}
        if name == "zero2.json":
            results[name]["consolidate"] = run(config, False, True)
    print("RESULT " + json.dumps(results))
    """
)


def test_hooks_through_a_deepspeed_engine():
    configs = [str(ROOT / "cluster" / "deepspeed" / n) for n in ("zero2.json", "zero3.json")]
    env = dict(os.environ, DS_ACCELERATOR="cpu", CUDA_VISIBLE_DEVICES="", MASTER_ADDR="127.0.0.1",
               MASTER_PORT=str(free_port()), RANK="0", LOCAL_RANK="0", WORLD_SIZE="1",
               PYTHONPATH=str(ROOT))
    proc = subprocess.run([sys.executable, "-c", _SCRIPT, *configs], env=env, cwd=ROOT,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-4000:]
    line = next(x for x in proc.stdout.splitlines() if x.startswith("RESULT "))
    results = json.loads(line[len("RESULT "):])
    for name in ("zero2.json", "zero3.json"):
        project, plain = results[name]["project"], results[name]["plain"]
        assert project["hooked"] and plain["hooked"]
        assert project["grad_read_ok"]  # the full gradient, as a plain backward computes it
        assert project["unchanged"] == ["a.weight"], name  # the replaced (zero) gradient was applied
        assert plain["unchanged"] == [], name  # without the projection every parameter moves
    cons, plain = results["zero2.json"]["consolidate"], results["zero2.json"]["plain"]
    assert cons["consolidated"] and cons["ended"] == 0 and cons["fisher_ok"]
    assert cons["final"] == plain["final"]  # the pass left no gradient behind in the engine
