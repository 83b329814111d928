"""The inference actors of the evaluate stages: Ray actors that load the frozen base models once
and keep them, load only the new method state at each stage, and serve the frozen encoders'
outputs of every test sample seen before from a per-sample cache (``pipeline.models.frozen``).

``InferencePool`` (driver side) starts ``eval.concurrency`` actors on first use. Where the
cluster has room for them beside the Train workers and a decode task (``stages.runner``), they
stay for the whole run (``resources.resident_eval``); otherwise the evaluate stage closes them
when it ends, as a fresh pool per stage used to. The test sets stream to the actors through Ray
Data (one dataset per stage, handed to the actor, or ``streaming_split`` over several actors); an
actor groups the rows by task into batches of ``eval.batch_size`` (a task's batches are the same
at every stage, so the cache changes no bit of any answer) and returns one record per row.

An actor that dies mid-stage is restarted by Ray (it loads the models again); the stage then
predicts its tasks again from the start (``resources.eval_max_failures`` times at most), so every
test record is predicted exactly once in the stage's output.
"""

from __future__ import annotations

import json
import time
from typing import Any, Callable, Iterable

import ray

from pipeline.config import ExperimentConfig, config_from_dict
from stages.common import BaseModels, build_method_for, load_models, load_state, peak_memory_gb


class InferenceActor:
    """Holds the frozen LMM and guide, one built method and the frozen-feature cache."""

    def __init__(self, cfg: dict[str, Any], base: dict[str, Any], threads: int = 0, cache_mb: int = 0):
        import torch

        from pipeline.models.frozen import FeatureCache

        t0 = time.time()
        self.cfg = config_from_dict(cfg)
        if threads:
            torch.set_num_threads(threads)
        self.device = "cuda" if torch.cuda.is_available() and self.cfg.eval.gpus_per_actor > 0 else "cpu"
        self.lmm, self.guide = load_models(self.cfg, BaseModels(**base), device=self.device)
        self.method = build_method_for(self.cfg, self.lmm, self.guide)
        self.method.eval()
        self.state: str | None = None
        self.cache = FeatureCache(cache_mb << 20) if cache_mb > 0 and getattr(self.method, "frozen_encoders", False) \
            else None
        self.max_new = self.cfg.eval.max_new_tokens or self.cfg.model.max_new_tokens
        self.batch_size = self.cfg.eval.batch_size
        self.load_s = time.time() - t0
        self.stages = 0

    def info(self) -> dict[str, Any]:
        return {"load_s": self.load_s, "device": self.device, "cache": self.cache is not None}

    def _load(self, state: str | None) -> float:
        if state == self.state:
            return 0.0
        t0 = time.time()
        if state is None:  # only a method that trains nothing evaluates without a state
            raise RuntimeError(f"inference actor: asked for the method without its state after loading {self.state}")
        self.method.load_state_tensors(load_state(state))
        self.method.eval()
        self.state = state
        return time.time() - t0

    def predict(self, data: Any, state: str | None) -> dict[str, Any]:
        """``data``: a Ray Dataset or a ``DataIterator`` (a ``streaming_split`` shard) of test rows
        in task order. Returns {"rows": [record per row], "timing": {...}}."""
        t0 = time.time()
        load_s = self._load(state)
        before = self.cache.stats() if self.cache is not None else None
        rows_out: list[dict[str, Any]] = []
        infer_s, batches = 0.0, 0
        for batch in task_batches(data.iter_rows(), self.batch_size):
            t1 = time.time()
            rows_out.extend(self._predict_batch(batch))
            infer_s += time.time() - t1
            batches += 1
        self.stages += 1
        timing = {"state_load_s": load_s, "infer_s": infer_s, "batches": batches, "wall_s": time.time() - t0,
                  "stages_served": self.stages, "peak_mem_gb": peak_memory_gb(self.device)}
        if self.cache is not None:
            after = self.cache.stats()
            timing["features"] = {k: after[k] - before[k] if k != "cache_bytes" else after[k] for k in after}
        return {"rows": rows_out, "timing": timing}

    def _predict_batch(self, rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
        import torch

        from pipeline.models.lmm import rows_to_batch

        t0 = time.time()
        keys = [f"{r['task']}/{r['id']}" for r in rows]
        batch = self.lmm.collate(rows_to_batch(rows), train=False)
        if not getattr(self.method, "task_id_at_test", False):  # only oracle variants see it
            batch.pop("tasks", None)  # no task identity at test time
        batch = {k: (v.to(self.device) if torch.is_tensor(v) else v) for k, v in batch.items()}
        guide_inputs = {k: batch[k] for k in ("guide_pixels", "guide_text") if k in batch}
        with torch.no_grad(), self.lmm.frozen.bind(self.cache, {"vision": batch["pixel_values"]}, keys), \
                self.guide.frozen.bind(self.cache, guide_inputs, keys):
            gen = self.method.generate(batch, self.max_new)
        n = len(gen.texts)
        per_row_s = (time.time() - t0) / max(1, n)
        selected = gen.selected if gen.selected is not None else [[] for _ in range(n)]
        scores = gen.scores.detach().cpu().float().numpy() if gen.scores is not None else None
        return [{
            "task": str(r["task"]), "id": str(r["id"]), "prediction": gen.texts[i],
            "selected": [int(s) for s in selected[i]],
            "scores": [round(float(x), 6) for x in scores[i]] if scores is not None else [],
            "infer_s": per_row_s,
        } for i, r in enumerate(rows)]


def task_batches(rows: Iterable[dict[str, Any]], size: int) -> Iterable[list[dict[str, Any]]]:
    """Consecutive rows of one task in lists of ``size`` (a task's last list may be shorter): a
    task's batches do not depend on which other tasks the stream holds."""
    current: list[dict[str, Any]] = []
    for row in rows:
        if current and (len(current) == size or row["task"] != current[0]["task"]):
            yield current
            current = []
        current.append(row)
    if current:
        yield current


class InferencePool:
    """The evaluate stages' inference actors (driver side): started on first use, reused while
    ``resident``, closed by ``close`` (or by the stage itself when not resident)."""

    def __init__(self, cfg: ExperimentConfig, base: BaseModels, *, resident: bool,
                 log: Callable[[str], None] = print):
        self.cfg, self.base, self.resident, self.log = cfg, base, resident, log
        self.actors: list[Any] = []
        self.ready = False

    def warm(self) -> None:
        """Start the actors without waiting for them (they load the models meanwhile)."""
        if self.actors:
            return
        cfg = self.cfg
        options: dict[str, Any] = {"num_cpus": cfg.eval.cpus_per_actor,
                                   "max_restarts": max(0, cfg.resources.eval_max_failures), "max_task_retries": 0}
        if cfg.eval.gpus_per_actor:
            options["num_gpus"] = cfg.eval.gpus_per_actor
        actor_cls = ray.remote(InferenceActor).options(**options)
        self.actors = [actor_cls.remote(cfg.to_dict(), self.base.to_dict(),
                                        # as many torch threads as reserved CPUs: it may run beside a Train worker
                                        max(1, int(cfg.eval.cpus_per_actor)), cfg.resources.feature_cache_mb)
                       for _ in range(cfg.eval.concurrency)]
        self.ready = False

    def _start(self, timeout: float = 600.0) -> float:
        """Seconds this call waited for the actors to be up (0 once they are). An actor Ray is
        restarting answers ``ActorUnavailableError`` until it is back: asked again each second;
        one whose restarts are spent raises."""
        from ray.exceptions import ActorUnavailableError

        if self.actors and self.ready:
            return 0.0
        t0 = time.time()
        self.warm()
        while True:
            try:
                ray.get([a.info.remote() for a in self.actors])
                break
            except ActorUnavailableError:
                if time.time() - t0 > timeout:
                    raise
                time.sleep(1.0)
        self.ready = True
        return time.time() - t0

    def predict(self, dataset: "ray.data.Dataset", state: str | None) -> dict[str, Any]:
        """Every row of ``dataset`` predicted once; returns {"rows", "timing"} (timing per actor)."""
        from ray.exceptions import RayActorError

        failures = 0
        while True:
            try:
                start_s = self._start()
                if len(self.actors) == 1:
                    outs = [ray.get(self.actors[0].predict.remote(dataset, state))]
                else:
                    shards = dataset.streaming_split(len(self.actors), equal=False)
                    outs = ray.get([a.predict.remote(s, state) for a, s in zip(self.actors, shards)])
                break
            except RayActorError as exc:
                failures += 1
                if failures > self.cfg.resources.eval_max_failures:
                    raise RuntimeError(f"evaluate: an inference actor died {failures} time(s) "
                                       f"(resources.eval_max_failures={self.cfg.resources.eval_max_failures})"
                                       ) from exc
                self.log(f"an inference actor died ({type(exc).__name__}); Ray restarts it and the stage "
                         f"predicts its tasks again ({failures}/{self.cfg.resources.eval_max_failures})")
                self.ready = False
        rows = [r for out in outs for r in out["rows"]]
        timing = {"actor_start_s": start_s, "actors": [out["timing"] for out in outs]}
        return {"rows": rows, "timing": timing}

    def close(self) -> None:
        for a in self.actors:
            try:
                ray.kill(a)
            except Exception:  # noqa: BLE001 - Ray already gone: nothing left to stop
                pass
        self.actors, self.ready = [], False


def as_prediction_record(r: dict[str, Any]) -> str:
    """One line of ``predictions/<task>.jsonl`` (LLaVA's answer-file keys plus the method's view)."""
    return json.dumps({"question_id": r["id"], "text": r["prediction"], "selected": r["selected"],
                       "scores": r["scores"]})
