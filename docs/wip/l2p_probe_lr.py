import sys, torch
sys.path.insert(0, "/work/main")
from pipeline.methods.registry import load_plugins, build_method
load_plugins(["/tmp/l2p/l2p.py"])
from tests.helpers import tiny_models, batch_for, train_toy
torch.set_num_threads(1)
for lr in (1e-2, 3e-2, 5e-2):
    for kw in ({}, {"key_loss_weight": 0.0}):
        lmm, guide = tiny_models(0); torch.manual_seed(1234)
        m = build_method("l2p", kw, lmm, guide)
        out = []
        for t, task in enumerate(["task_a", "task_b"]):
            m.begin_task(t, task)
            l = train_toy(m, batch_for(lmm, task), 30, lr, end_task=t)
            out.append(f"{l[0]:.2f}->{l[-1]:.2f}")
        print(lr, kw, out)
