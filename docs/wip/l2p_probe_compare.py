import sys, torch
sys.path.insert(0, "/work/main")
from pipeline.methods.registry import load_plugins, build_method
load_plugins(["/tmp/l2p/l2p.py"])
from tests.helpers import tiny_models, batch_for, train_toy
torch.set_num_threads(1)
for name, kw in (("modalprompt", {}), ("l2p", {"top_n": 1}), ("l2p", {"pool_size": 10, "top_n": 3, "length": 10})):
    lmm, guide = tiny_models(0); torch.manual_seed(1234)
    m = build_method(name, kw, lmm, guide)
    out = []
    for t, task in enumerate(["task_a", "task_b"]):
        m.begin_task(t, task)
        p0 = {n: p.detach().clone() for n, p in m.named_parameters()}
        l = train_toy(m, batch_for(lmm, task), 30, None, end_task=t)
        ch = {n: float((p - p0[n]).abs().max()) for n, p in m.named_parameters()}
        out.append(f"{l[0]:.2f}->{l[-1]:.2f} {ch}")
    print(name, kw, out)
