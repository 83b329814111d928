"""Inference throughput of the methods that select or route by task, as the number of learned
tasks T grows (T = 2, 8, 32), and ModalPrompt against concatenating all T prompt sets (its own
path with k = T) at T = 8. Tasks beyond the benchmark's eight reuse their data (task t takes
task t mod 8's rows for the methods' prepare / consolidate passes); prompt values are as
initialised (throughput does not depend on them: every answer is generated to the same length).
Targets: ModalPrompt at T = 32 >= 0.95x its throughput at T = 2; >= 1.4x concatenation at T = 8.

L2P and DualPrompt select from a pool of fixed size (independent of T by construction); MoELoRA
routes over a fixed number of experts; CODA-Prompt sizes its pool for a fixed number of tasks.

    python benchmarks/select_scaling.py [--methods modalprompt,drape,proglora] [--samples 64] [key=value ...]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _common  # noqa: E402

TS = (2, 8, 32)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", default=None)
    ap.add_argument("--methods", default="modalprompt,drape,proglora")
    ap.add_argument("--samples", type=int, default=64, help="test samples (8 tasks' first rows)")
    ap.add_argument("--new-tokens", type=int, default=8, help="tokens generated per answer (fixed)")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("overrides", nargs="*")
    args = ap.parse_args()
    _common.quiet()
    import torch

    cfg = _common.load(args.config, args.overrides)
    _common.ensure_data(cfg)
    per_task = max(1, args.samples // len(cfg.tasks))
    test = [r for task in cfg.tasks for r in _common.rows(cfg, task, "test", per_task)]
    train = {task: _common.rows(cfg, task, "train", cfg.stage_train(task).batch_size) for task in cfg.tasks}
    print(f"# select scaling: {_common.machine()}")
    print(f"# {len(test)} test samples, {args.new_tokens} tokens per answer, eval.batch_size {cfg.eval.batch_size}, "
          f"torch threads {torch.get_num_threads()}, {args.rounds} interleaved rounds (medians)")
    body, verdicts = [], []
    for name in args.methods.split(","):
        variants = {f"T={t}": (t, {}) for t in TS}
        if name == "modalprompt":
            variants["T=8, all 8 sets concatenated (k=8)"] = (8, {"k": 8})
        runners = {label: runner(args, name, t, opts, test, train) for label, (t, opts) in variants.items()}
        times = _common.interleaved(runners, args.rounds)
        sps = {label: len(test) / _common.median(ts) for label, ts in times.items()}
        for label in variants:
            body.append([name, label, sps[label], sps[label] / sps["T=2"]])
        print(f"  {name}: " + ", ".join(f"{k} {v:.1f}/s" for k, v in sps.items()), flush=True)
        if name == "modalprompt":
            a = sps["T=32"] / sps["T=2"]
            b = sps["T=8"] / sps["T=8, all 8 sets concatenated (k=8)"]
            verdicts.append(f"ModalPrompt T=32 / T=2: {a:.2f} (target >= 0.95): {'met' if a >= 0.95 else 'NOT met'}")
            verdicts.append(f"ModalPrompt T=8 (k={cfg.method.options.get('k', 3)}) / concatenation: {b:.2f} "
                            f"(target >= 1.4): {'met' if b >= 1.4 else 'NOT met'}")
    print(_common.table(["method", "learned tasks", "samples/s", "vs T=2"], body))
    for v in verdicts:
        print(v)


def runner(args, name: str, n_tasks: int, options: dict, test: list, train: dict):
    """A callable that evaluates ``test`` as the inference actor does, with ``n_tasks`` learned."""
    import torch

    from pipeline.methods.protocol import finish_task, prepare_task
    from pipeline.models.lmm import rows_to_batch
    from stages.inference import InferenceActor, task_batches

    cfg = _common.load(args.config, args.overrides, method=name)
    raw = cfg.to_dict()
    raw["method"]["options"] = {**raw["method"]["options"], **options}
    actor = InferenceActor(raw, _common.base_models(cfg).to_dict(), torch.get_num_threads(),
                           cfg.resources.feature_cache_mb)
    method, lmm = actor.method, actor.lmm
    torch.manual_seed(0)
    names = list(train)
    for t in range(n_tasks):
        batch = lmm.collate(rows_to_batch(train[names[t % len(names)]]), train=True)
        method.begin_task(t, f"task{t}")
        prepare_task(method, t, lambda batch=batch: [batch])
        finish_task(method, t, lambda batch=batch: [batch])
    method.eval()
    lmm.min_new_tokens = args.new_tokens
    actor.max_new = args.new_tokens

    def run():
        for batch in task_batches(test, actor.batch_size):
            actor._predict_batch(batch)
    run()  # the first evaluation fills the frozen-feature cache, as at a task's first stage
    return run


if __name__ == "__main__":
    main()
