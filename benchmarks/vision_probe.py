"""What the base's frozen vision tower carries: a linear probe per skill.

For each question whose answer is a function of the image alone (read the sign, classify the
object, read the book's title, read the label), a linear classifier is trained on the frozen
vision features (the tower's output before the projector, as ``LMM.vision_features`` gives it)
of the task's training images and scored on its test images. Two readouts: every patch token
concatenated (keeps positions) and the tokens' mean (position-invariant). A probe near chance
means the tower does not encode the skill in a form the projector and a small LM can use, and no
continual method on this base can be expected to learn that task; that is a property of the base,
not of the methods.

    python benchmarks/vision_probe.py [--train 1024] [--steps 300] [key=value ...]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _common  # noqa: E402

# (label, task, which questions): the rows whose answer the image alone decides
PROBES = (
    ("read a sign", "TextVQA", lambda q: True),
    ("classify an object", "ImageNet", lambda q: True),
    ("read a book title", "OCRVQA", lambda q: "title of this" in q or "name of this book" in q),
    ("read a product label", "VizWiz", lambda q: "say" in q or "read" in q or "written" in q),
)


def answer(row: dict) -> str:
    return row["answer"] or row["gpt_turns"][0]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--train", type=int, default=1024, help="training images per task read (before the question filter)")
    ap.add_argument("--test", type=int, default=200)
    ap.add_argument("--steps", type=int, default=300, help="full-batch AdamW steps of the probe")
    ap.add_argument("--config", default=None)
    ap.add_argument("overrides", nargs="*")
    args = ap.parse_args()
    overrides = [f"data.synth.train_per_task={args.train}", *args.overrides]
    cfg = _common.load(args.config, overrides)
    _common.ensure_data(cfg)
    import torch

    torch.manual_seed(0)
    lmm, _ = _common.models(cfg)
    print(_common.machine())
    print(f"base: {cfg.model.path}")

    def features(rows: list[dict]) -> torch.Tensor:
        from pipeline.models.lmm import rows_to_batch

        out = []
        for i in range(0, len(rows), 64):
            batch = lmm.collate(rows_to_batch(rows[i:i + 64]), train=False)
            with torch.no_grad():
                out.append(lmm.vision_features(batch["pixel_values"]).float())
        return torch.cat(out)  # (N, tokens, width)

    def fit(xtr, ytr, xte, yte, classes: int) -> float:
        """Test accuracy of a linear classifier trained on standardised features."""
        mu, sd = xtr.mean(0), xtr.std(0) + 1e-5
        xtr, xte = (xtr - mu) / sd, (xte - mu) / sd
        lin = torch.nn.Linear(xtr.shape[1], classes)
        opt = torch.optim.AdamW(lin.parameters(), lr=1e-3, weight_decay=0.1)
        for _ in range(args.steps):
            opt.zero_grad()
            torch.nn.functional.cross_entropy(lin(xtr), ytr).backward()
            opt.step()
        with torch.no_grad():
            return (lin(xte).argmax(1) == yte).float().mean().item()

    body = []
    for label, task, asks in PROBES:
        if task not in cfg.tasks:
            continue
        tr = [r for r in _common.rows(cfg, task, "train", args.train) if asks(r["human_turns"][0])]
        te = [r for r in _common.rows(cfg, task, "test", args.test) if asks(r["human_turns"][0])]
        names = sorted({answer(r) for r in tr + te})
        index = {a: i for i, a in enumerate(names)}
        ytr = torch.tensor([index[answer(r)] for r in tr])
        yte = torch.tensor([index[answer(r)] for r in te])
        ftr, fte = features(tr), features(te)
        majority = max((yte == c).float().mean().item() for c in range(len(names)))
        tokens = fit(ftr.flatten(1), ytr, fte.flatten(1), yte, len(names))
        pooled = fit(ftr.mean(1), ytr, fte.mean(1), yte, len(names))
        body.append([label, task, f"{len(tr)}/{len(te)}", len(names), f"{100 / len(names):.1f}",
                     f"{100 * majority:.1f}", f"{100 * tokens:.1f}", f"{100 * pooled:.1f}"])
    print(_common.table(["skill", "task", "train/test", "classes", "chance %", "majority %",
                         "probe: all tokens %", "probe: mean token %"], body))


if __name__ == "__main__":
    main()
