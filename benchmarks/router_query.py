"""How far apart the tasks are in the input of ProgLoRA's dynamic router (Eq. 5).

The router sees, per sample, the max over the instruction's tokens of the frozen LLM's token
embeddings (``ProgLoRA.query_features``, which this calls). For each task this prints the nearest-centroid task
accuracy of that input (centroids from training samples, scored on test samples) and the cosine
of its centroid to the nearest other task's centroid, beside the same for the mean over tokens.
When the centroids are nearly parallel, the router has to amplify small differences before its
keys can separate the tasks, which is what its temperature and its few steps per task work against.

    python benchmarks/router_query.py [--train 64] [--test 100] [key=value ...]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _common  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--train", type=int, default=64)
    ap.add_argument("--test", type=int, default=100)
    ap.add_argument("--config", default=None)
    ap.add_argument("overrides", nargs="*")
    args = ap.parse_args()
    cfg = _common.load(args.config, args.overrides)
    _common.ensure_data(cfg)
    import dataclasses

    import torch
    import torch.nn.functional as F

    from pipeline.methods.registry import build_method
    from pipeline.models.lmm import rows_to_batch

    lmm, guide = _common.models(cfg)
    router = build_method("proglora", {}, lmm, guide)  # its query_features is the router's input
    print(_common.machine())

    def pooled(rows: list[dict], how: str) -> torch.Tensor:
        batch = lmm.collate(rows_to_batch(rows), train=False)
        if how == "input":  # every attended input embedding: image tokens (projected) and text
            with torch.no_grad():
                emb = lmm.embed(batch["input_ids"], batch["pixel_values"]).float()
            keep = batch["attention_mask"].bool()
            return emb.masked_fill(~keep.unsqueeze(-1), float("-inf")).max(dim=1).values
        router.opts = dataclasses.replace(router.opts, query_pool=how)  # max (the paper's) or mean
        return router.query_features(batch)

    columns = {}
    for how in ("max", "mean", "input"):
        cents, tests = [], []
        for task in cfg.tasks:
            cents.append(pooled(_common.rows(cfg, task, "train", args.train), how).mean(0))
            tests.append(pooled(_common.rows(cfg, task, "test", args.test), how))
        c = F.normalize(torch.stack(cents), dim=1)
        cos = c @ c.T
        cos.fill_diagonal_(-1.0)
        acc = [((F.normalize(x, dim=1) @ c.T).argmax(1) == i).float().mean().item() for i, x in enumerate(tests)]
        columns[how] = (acc, cos.max(1).values.tolist())
    body = [[task] + [x for how in ("max", "mean", "input")
                      for x in (f"{100 * columns[how][0][i]:.0f}", f"{columns[how][1][i]:.4f}")]
            for i, task in enumerate(cfg.tasks)]
    print("instruction max: the max over the instruction's token embeddings (the router's input); instruction mean:\n"
          "their mean; input max: the max over every attended input embedding, image tokens included.\n"
          "%: nearest-centroid task accuracy on test samples; cos: cosine of the task's centroid to the nearest other one")
    print(_common.table(["task", "instruction max %", "cos", "instruction mean %", "cos", "input max %", "cos"], body))


if __name__ == "__main__":
    main()
