"""Every trainable method through a real DeepSpeed ZeRO-3 engine (CPU, one rank), as the Ray
Train worker runs it: parameters are partitioned and only gathered around the modules' forward,
so a method that reads its parameters anywhere else trains on empty tensors or fails. Each
method's first steps must give the losses the same engine gives under ZeRO-2 (the default, whose
parameters are always whole), and its state must come back whole."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from pipeline.methods.registry import method_class, registered_methods
from tests.helpers import free_port

ROOT = Path(__file__).resolve().parents[1]
TRAINABLE = [m for m in registered_methods() if method_class(m).schedule == "sequential"]
# methods that refuse ZeRO-3 with a message instead (see each module's docstring)
ZERO2_ONLY = {"lwf": "ZeRO-3's partitioned parameters do not allow"}

_SCRIPT = textwrap.dedent(
    """
    import json, sys
    import torch, deepspeed, importlib
    ZERO2_ONLY = set(json.loads(sys.argv[1]))
    importlib.import_module("deepspeed.comm.torch").build_shm_op = lambda: None
    deepspeed.init_distributed(dist_backend="gloo")
    from pipeline.methods.protocol import finish_task, prepare_task
    from pipeline.methods.registry import build_method
    from pipeline.training import FitJob, run_steps
    from stages.common import fill_deepspeed_config
    from stages.train_worker import EngineGrads, mean_over_workers, register_for_zero3
    from tests.helpers import TOY_LR, batch_for, tiny_models

    torch.set_num_threads(1)
    configs = {k: json.load(open(f"{sys.argv[2]}/{k}.json")) for k in ("zero2", "zero3")}
    # partition every parameter, however small (the cluster file keeps tensors under 1e5 whole)
    configs["zero3"]["zero_optimization"]["stage3_param_persistence_threshold"] = 0
    out = {}
    for name in sys.argv[3:]:
        runs = {}
        refusal = None
        for kind in ("zero2", "zero3"):
            tasks = ["task_a", "task_b"]
            losses, state = [], None
            for t, task in enumerate(tasks):
                # as a train worker: a fresh method per task, the previous task's frozen state loaded
                lmm, guide = tiny_models(0, fresh_guide=True)
                torch.manual_seed(1234 + t)
                method = build_method(name, {}, lmm, guide)
                if state is not None:
                    method.load_state_tensors(state)
                method.begin_task(t, task)
                batch = batch_for(lmm, task)
                cfg = fill_deepspeed_config(configs[kind], micro_batch=4, grad_accum=1, world_size=1,
                                            lr=TOY_LR.get(name, 1e-2), weight_decay=0.0, use_bf16=False)
                params = [p for p in method.trainable_parameters() if p.requires_grad]
                register_for_zero3(method, cfg)  # as the train worker does
                engine, *_ = deepspeed.initialize(model=method, model_parameters=params, config=cfg)
                try:
                    res = run_steps(method, engine, lambda e: [batch] * 3, FitJob(t, task, 3),
                                    grads=EngineGrads(),
                                    task_batches=lambda: [batch], mean_over_workers=mean_over_workers)
                except RuntimeError as exc:
                    if kind != "zero3" or name not in ZERO2_ONLY:
                        raise
                    refusal = str(exc)
                    break
                finish_task(method, t, lambda: [batch], mean_over_workers)
                losses += res.losses
                state = method.state_tensors()
                engine.destroy()
            if refusal is not None:
                runs[kind] = {"refused": refusal}
                continue
            # evaluated as the evaluate stage does: a fresh model, the frozen state loaded
            lmm, guide = tiny_models(0, fresh_guide=True)
            fresh = build_method(name, {}, lmm, guide)
            fresh.load_state_tensors(state)
            runs[kind] = {"losses": losses, "shapes": {k: list(v.shape) for k, v in state.items()},
                          "texts": fresh.generate(batch_for(lmm, "task_a", train=False), 3).texts}
        out[name] = runs
    print("RESULT " + json.dumps(out))
    """
)


def test_every_trainable_method_trains_under_zero3_as_under_zero2():
    env = dict(os.environ, DS_ACCELERATOR="cpu", CUDA_VISIBLE_DEVICES="", MASTER_ADDR="127.0.0.1",
               MASTER_PORT=str(free_port()), RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", PYTHONPATH=str(ROOT))
    proc = subprocess.run([sys.executable, "-W", "ignore::FutureWarning", "-c", _SCRIPT, json.dumps(sorted(ZERO2_ONLY)),
                           str(ROOT / "cluster" / "deepspeed"), *TRAINABLE],
                          env=env, cwd=ROOT, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-6000:]
    results = json.loads(next(x for x in proc.stdout.splitlines() if x.startswith("RESULT "))[len("RESULT "):])
    for name in TRAINABLE:
        plain, z3 = results[name]["zero2"], results[name]["zero3"]
        if name in ZERO2_ONLY:
            assert ZERO2_ONLY[name] in z3["refused"] and "zero2.json" in z3["refused"], name
            continue
        assert z3["shapes"] == plain["shapes"], name  # the state comes back whole
        assert z3["losses"] == pytest.approx(plain["losses"], rel=1e-3, abs=1e-4), name
