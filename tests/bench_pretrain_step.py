"""Benchmark: one pre-training step of the tiny base, with the loss of ``LMM.lm_loss`` (logits at
label positions only) against transformers' own ``labels=`` loss (logits at every position).

Not a test (pytest does not collect it): it prints seconds per step, the two paths interleaved
round by round so that a noisy machine slows both alike, and their ratio. Needs the generated
CoIN-synth benchmark in the cache (any default run writes it):

    python tests/bench_pretrain_step.py [--rounds 4] [--steps 25] [override ...]

e.g. ``cache_dir=/tmp/cache``. Uses the pre-training batch size, thread count and batch order.
"""

from __future__ import annotations

import argparse
import itertools
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def main(argv: list[str] | None = None) -> int:
    import numpy as np
    import torch

    from pipeline.config import load_config
    from pipeline.data.synth import benchmark_texts
    from pipeline.models.build import build_lmm
    from pipeline.models.lmm import _positions, rows_to_batch
    from pipeline.models.pretrain import _batches, _template_texts
    from pipeline.models.tokenizer import build_tokenizer
    from stages.common import synth_root
    from stages.base import pretrain_rows

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=4)
    ap.add_argument("--steps", type=int, default=25, help="steps per path per round")
    ap.add_argument("overrides", nargs="*")
    args = ap.parse_args(argv)
    cfg = load_config(None, args.overrides)
    spec = cfg.model.pretrain
    root = synth_root(cfg)
    if not Path(root, "pretrain").exists():
        print(f"no generated benchmark at {root}: run `python pipeline/main.py` once (or pass cache_dir=...)")
        return 2
    torch.set_num_threads(spec.num_threads)
    rows = list(pretrain_rows(root, cfg.model.image_size))
    tok = build_tokenizer(itertools.chain(_template_texts(cfg.model), benchmark_texts(Path(root))),
                          vocab_max=cfg.model.tiny.vocab_max)
    torch.manual_seed(spec.seed)
    lmm = build_lmm(cfg.model, tokenizer=tok)
    seqs, labels = lmm.encode(rows_to_batch(rows), train=True)
    pixels = lmm.pixels([r["image"] for r in rows])
    model = lmm.model.train().requires_grad_(True)
    params = list(model.parameters())
    opt = torch.optim.AdamW(params, lr=spec.lr, fused=True)
    n = 5 + 2 * args.rounds * args.steps
    batches = list(itertools.islice(_batches([len(s) for s in seqs], spec.batch_size, n, spec.seed, pool=1), n))

    def loss_ours(batch, px):
        return lmm.lm_loss(lmm.embed(batch["input_ids"], px), batch["attention_mask"], batch["labels"])

    def loss_transformers(batch, px):
        mask = batch["attention_mask"]
        return model(inputs_embeds=lmm.embed(batch["input_ids"], px), attention_mask=mask,
                     position_ids=_positions(mask), labels=batch["labels"]).loss

    def step(loss_of, idx) -> None:
        batch = lmm.pad([seqs[i] for i in idx], [labels[i] for i in idx], left=False)
        loss = loss_of(batch, pixels[torch.from_numpy(idx)])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()

    for idx in batches[:5]:  # warm-up
        step(loss_ours, idx)
    times: dict[str, list[float]] = {"transformers labels=": [], "lm_loss (label positions)": []}
    rest = iter(batches[5:])
    for r in range(args.rounds):
        for (name, fn) in zip(times, (loss_transformers, loss_ours)):
            chunk = list(itertools.islice(rest, args.steps))
            start = time.perf_counter()
            for idx in chunk:
                step(fn, idx)
            times[name].append((time.perf_counter() - start) / len(chunk))
    labelled = sum(int((np.asarray(lab[1:]) != -100).sum()) for lab in labels) / sum(len(s) for s in seqs)
    print(f"{len(rows)} corpus rows, {labelled:.1%} of positions carry a label, vocabulary {len(tok)}, "
          f"batch {spec.batch_size}, {spec.num_threads} threads")
    for name, ts in times.items():
        print(f"{name:28s} s/step per round: {' '.join(f'{t:.4f}' for t in ts)}  median {statistics.median(ts):.4f}")
    a, b = (statistics.median(ts) for ts in times.values())
    print(f"ratio lm_loss / transformers: {b / a:.3f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
