"""Steady-state training step of each method: the train stage's step (``pipeline.training``'s
loop body through a DeepSpeed engine configured as the train worker configures it) against a
bare PyTorch loop (``loss = method(batch); loss.backward(); AdamW.step()``) on the same model,
batch and sequence length, interleaved in one process. Target: ratio <= 1.10.

    python benchmarks/train_step.py [--methods modalprompt,lora,...] [--rounds 8] [key=value ...]
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _common  # noqa: E402

DEFAULT_METHODS = "modalprompt,lora,moelora,proglora,drape,l2p,dualprompt,coda_prompt,ewc,lwf"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--methods", default=DEFAULT_METHODS)
    ap.add_argument("--config", default=None)
    ap.add_argument("--rounds", type=int, default=8, help="interleaved rounds (each: steps of both loops)")
    ap.add_argument("--steps", type=int, default=3, help="steps of each loop per round")
    ap.add_argument("overrides", nargs="*")
    args = ap.parse_args()
    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    os.environ.setdefault("MASTER_PORT", str(_free_port()))
    for k, v in (("RANK", "0"), ("LOCAL_RANK", "0"), ("WORLD_SIZE", "1")):
        os.environ.setdefault(k, v)

    import torch

    if not torch.cuda.is_available():
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
    import importlib

    import deepspeed

    importlib.import_module("deepspeed.comm.torch").build_shm_op = lambda: None  # no C++ build on CPU
    deepspeed.init_distributed(dist_backend="nccl" if torch.cuda.is_available() else "gloo")

    cfg = _common.load(args.config, args.overrides)
    _common.ensure_data(cfg)  # (the data do not depend on the method)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    if cfg.train.torch_threads:
        torch.set_num_threads(cfg.train.torch_threads)
    task = cfg.tasks[0]
    st = cfg.stage_train(task)
    rows = _common.rows(cfg, task, "train", st.batch_size)
    print(f"# train step: {_common.machine()}")
    print(f"# task {task}, batch {st.batch_size}, {args.rounds} rounds x {args.steps} steps of each loop; "
          f"torch threads {torch.get_num_threads()}")
    body = []
    for name in args.methods.split(","):
        pipe, bare = measure(_common.load(args.config, args.overrides, method=name), rows, device, args.rounds,
                             args.steps)
        body.append([name, pipe * 1e3, bare * 1e3, pipe / bare])
        print(f"  {name}: {pipe * 1e3:.1f} ms vs {bare * 1e3:.1f} ms", flush=True)
    print(_common.table(["method", "stage step (ms)", "bare loop (ms)", "ratio"], body))
    worst = max(r[3] for r in body)
    print(f"worst ratio {worst:.3f} (target <= 1.10): {'met' if worst <= 1.10 else 'NOT met'}")


def measure(cfg, rows, device: str, rounds: int, steps: int) -> tuple[float, float]:
    """Median seconds per step: (train stage's step, bare PyTorch step)."""
    import deepspeed
    import torch

    from pipeline.methods.protocol import GradAccess, adjust_gradients, prepare_task
    from pipeline.models.lmm import rows_to_batch
    from stages.common import build_method_for, fill_deepspeed_config
    from stages.train_worker import EngineGrads, register_for_zero3

    st = cfg.stage_train(cfg.tasks[0])
    loops = {}
    for kind in ("stage", "bare"):
        lmm, guide = _common.models(cfg, device)
        torch.manual_seed(0)
        method = build_method_for(cfg, lmm, guide)
        method.begin_task(0, cfg.tasks[0])
        batch = lmm.collate(rows_to_batch(rows), train=True)
        prepare_task(method, 0, lambda batch=batch: [batch])
        method.train()
        params = [p for p in method.trainable_parameters() if p.requires_grad]
        if kind == "stage":
            import json

            template = json.loads(Path(cfg.resolve_path(cfg.train.deepspeed)).read_text())
            ds_cfg = fill_deepspeed_config(template, micro_batch=st.batch_size, grad_accum=1, world_size=1,
                                           lr=st.lr, weight_decay=st.weight_decay,
                                           use_bf16=device == "cuda" and cfg.model.dtype == "bfloat16")
            register_for_zero3(method, ds_cfg)
            engine, *_ = deepspeed.initialize(model=method, model_parameters=params, config=ds_cfg)
            grads = EngineGrads()

            def step(engine=engine, method=method, batch=batch, grads=grads):
                b = {k: (v.to(device) if torch.is_tensor(v) else v) for k, v in batch.items()}
                loss = engine(b)
                engine.backward(loss)
                if engine.is_gradient_accumulation_boundary():
                    adjust_gradients(method, grads)
                engine.step()
                float(loss.detach())
        else:
            opt = torch.optim.AdamW(params, lr=st.lr, weight_decay=st.weight_decay)
            plain = GradAccess()

            def step(method=method, batch=batch, opt=opt, plain=plain):
                b = {k: (v.to(device) if torch.is_tensor(v) else v) for k, v in batch.items()}
                loss = method(b)
                loss.backward()
                adjust_gradients(method, plain)  # the method's own gradient rule is part of its step
                opt.step()
                opt.zero_grad(set_to_none=True)
                float(loss.detach())
        step()  # warm-up
        step()
        loops[kind] = step
    times = _common.interleaved(loops, rounds, steps)
    return _common.median(times["stage"]), _common.median(times["bare"])


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


if __name__ == "__main__":
    main()
