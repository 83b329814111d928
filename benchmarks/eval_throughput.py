"""Evaluation throughput: the evaluate stage's inference (the inference actor's batches, the same
code in-process: per-task batches of ``eval.batch_size``, batched greedy generation with a KV
cache, frozen-encoder outputs from the per-sample cache after a task's first evaluation)
against a batch-1 transformers ``generate`` loop over the same model and samples (how the
reference repositories evaluate: LLaVA's ``model_vqa_loader``). Samples/s and generated
tokens/s, interleaved rounds; answers of the two paths compared. Target: >= 10x.

    python benchmarks/eval_throughput.py [--per-task 32] [--rounds 2] [--method zeroshot] [key=value ...]
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _common  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", default=None)
    ap.add_argument("--method", default="zeroshot", help="a method that needs no trained state (zeroshot)")
    ap.add_argument("--per-task", type=int, default=32)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("overrides", nargs="*")
    args = ap.parse_args()
    _common.quiet()
    import torch

    from pipeline.models.lmm import rows_to_batch
    from stages.inference import InferenceActor, task_batches

    cfg = _common.load(args.config, args.overrides, method=args.method)
    _common.ensure_data(cfg)
    rows = [r for task in cfg.tasks for r in _common.rows(cfg, task, "test", args.per_task)]
    threads = torch.get_num_threads()
    actor = InferenceActor(cfg.to_dict(), _common.base_models(cfg).to_dict(), threads, cfg.resources.feature_cache_mb)
    lmm, tok = actor.lmm, actor.lmm.tokenizer
    max_new = actor.max_new

    def stage_pass() -> list[str]:
        out = []
        for batch in task_batches(rows, actor.batch_size):
            out += [r["prediction"] for r in actor._predict_batch(batch)]
        return out

    @torch.no_grad()
    def batch1_pass() -> list[str]:
        out = []
        for row in rows:
            b = lmm.collate(rows_to_batch([row]), train=False)
            gen = lmm.model.generate(input_ids=b["input_ids"].to(lmm.device), attention_mask=b["attention_mask"].to(lmm.device),
                                     pixel_values=b["pixel_values"].to(lmm.device, lmm.dtype), max_new_tokens=max_new,
                                     do_sample=False, num_beams=1, eos_token_id=tok.eos_token_id, pad_token_id=lmm.pad_id)
            new = gen[0, b["input_ids"].shape[1]:].tolist()
            if tok.eos_token_id in new:
                new = new[: new.index(tok.eos_token_id)]
            out.append(tok.decode(new, skip_special_tokens=True).strip())
        return out

    def tokens(texts: list[str]) -> int:  # generated tokens, the end-of-sequence token included
        return sum(len(tok(t, add_special_tokens=False)["input_ids"]) + 1 for t in texts)

    t0 = time.perf_counter()
    cold = stage_pass()  # the first evaluation of these tasks: the cache fills
    cold_s = time.perf_counter() - t0
    answers = {}
    times = {"stage": [], "batch1": []}
    for _ in range(args.rounds):
        for name, fn in (("stage", stage_pass), ("batch1", batch1_pass)):
            t0 = time.perf_counter()
            answers[name] = fn()
            times[name].append(time.perf_counter() - t0)
    n = len(rows)
    st, b1 = _common.median(times["stage"]), _common.median(times["batch1"])
    agree = sum(a == b for a, b in zip(answers["stage"], answers["batch1"])) / n
    print(f"# eval throughput: {_common.machine()}")
    print(f"# {n} test samples ({args.per_task} per task x {len(cfg.tasks)} tasks), method {args.method}, "
          f"eval.batch_size {actor.batch_size}, max_new_tokens {max_new}, torch threads {threads}, "
          f"{args.rounds} interleaved rounds (medians)")
    body = [
        ["evaluate stage, cache warm", n / st, tokens(answers["stage"]) / st, st],
        ["evaluate stage, first evaluation", n / cold_s, tokens(cold) / cold_s, cold_s],
        ["batch-1 transformers generate", n / b1, tokens(answers["batch1"]) / b1, b1],
    ]
    print(_common.table(["path", "samples/s", "tokens/s", "seconds"], body))
    print(f"ratio (stage, cache warm / batch-1): {b1 / st:.1f}x; first evaluation / batch-1: {b1 / cold_s:.1f}x "
          f"(target >= 10x): {'met' if b1 / st >= 10 else 'NOT met'}")
    print(f"answers equal between the two paths: {100 * agree:.1f}% (batched left-padded generation vs one at a time)")


if __name__ == "__main__":
    main()
