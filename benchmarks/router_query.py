"""How far apart the tasks are in the input of ProgLoRA's dynamic router (Eq. 5).

The router sees, per sample, the max over the instruction's tokens of the frozen LLM's token
embeddings (``ProgLoRA.query_features``). For each task this prints the nearest-centroid task
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
    import torch
    import torch.nn.functional as F

    from pipeline.methods.helpers import instruction_tokens
    from pipeline.models.lmm import rows_to_batch

    lmm, _ = _common.models(cfg)
    print(_common.machine())

    def pooled(rows: list[dict], how: str) -> torch.Tensor:
        batch = lmm.collate(rows_to_batch(rows), train=False)
        tok, keep = instruction_tokens(lmm, batch, torch.device("cpu"))
        if how == "max":  # what the router sees
            return tok.masked_fill(~keep.unsqueeze(-1), float("-inf")).max(dim=1).values
        k = keep.unsqueeze(-1).float()
        return (tok * k).sum(1) / k.sum(1)

    columns = {}
    for how in ("max", "mean"):
        cents, tests = [], []
        for task in cfg.tasks:
            cents.append(pooled(_common.rows(cfg, task, "train", args.train), how).mean(0))
            tests.append(pooled(_common.rows(cfg, task, "test", args.test), how))
        c = F.normalize(torch.stack(cents), dim=1)
        cos = c @ c.T
        cos.fill_diagonal_(-1.0)
        acc = [((F.normalize(x, dim=1) @ c.T).argmax(1) == i).float().mean().item() for i, x in enumerate(tests)]
        columns[how] = (acc, cos.max(1).values.tolist())
    body = [[task, f"{100 * columns['max'][0][i]:.0f}", f"{columns['max'][1][i]:.4f}",
             f"{100 * columns['mean'][0][i]:.0f}", f"{columns['mean'][1][i]:.4f}"] for i, task in enumerate(cfg.tasks)]
    print(_common.table(["task", "max-pool: nearest-centroid %", "max-pool: cos to nearest task",
                         "mean-pool: nearest-centroid %", "mean-pool: cos to nearest task"], body))


if __name__ == "__main__":
    main()
