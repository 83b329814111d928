import sys, torch
sys.path.insert(0, "/work/main")
from pipeline.methods.registry import load_plugins, build_method
load_plugins(["/tmp/l2p/l2p.py"])
from tests.helpers import tiny_models, batch_for, train_toy
torch.set_num_threads(1)
for steps in (30, 90):
    lmm, guide = tiny_models(0); torch.manual_seed(1234)
    m = build_method("l2p", {}, lmm, guide)
    m.begin_task(0, "task_b")
    l = train_toy(m, batch_for(lmm, "task_b"), steps, None, end_task=0)
    q = m.query(batch_for(lmm, "task_a")); qb = m.query(batch_for(lmm, "task_b"))
    print(steps, f"fresh task_b {l[0]:.2f}->{l[-1]:.2f}", m.similarity(q).topk(3).indices[0].tolist(), m.similarity(qb).topk(3).indices[0].tolist())
