"""The evaluate stages' inference actors (``stages/inference.py``) and the frozen-feature cache
(``pipeline/models/frozen.py``). That cached features change no answer of any method is a contract
test (``tests/test_methods_contract.py``); that a resident actor reloading a later state answers
as a fresh one is too. The run-level behaviour is in ``tests/test_pipeline_e2e.py``."""

from __future__ import annotations

import torch

from pipeline.models.frozen import FeatureCache, FrozenFeatures
from stages.inference import task_batches


def _rows(spec: list[tuple[str, int]]) -> list[dict]:
    return [{"task": task, "id": f"{task}-{i}"} for task, n in spec for i in range(n)]


def test_a_task_gets_the_same_batches_whatever_else_the_stream_holds() -> None:
    alone = [[r["id"] for r in b] for b in task_batches(_rows([("B", 7)]), 3)]
    assert alone == [["B-0", "B-1", "B-2"], ["B-3", "B-4", "B-5"], ["B-6"]]
    mixed = [[r["id"] for r in b] for b in task_batches(_rows([("A", 4), ("B", 7), ("C", 2)]), 3)]
    assert mixed == [["A-0", "A-1", "A-2"], ["A-3"], *alone, ["C-0", "C-1"]]
    assert list(task_batches([], 3)) == []


def test_the_cache_serves_a_batch_only_whole_and_stops_storing_when_full() -> None:
    row = torch.arange(4, dtype=torch.float32)  # 16 bytes a row
    cache = FeatureCache(max_bytes=3 * 16)
    cache.put("vision", ["a", "b"], torch.stack([row, row + 1]))
    assert torch.equal(torch.stack(cache.take("vision", ["b", "a"])), torch.stack([row + 1, row]))
    assert cache.take("vision", ["a", "c"]) is None  # one row missing: the caller computes the batch
    assert cache.take("guide_image", ["a"]) is None  # kinds are kept apart
    cache.put("vision", ["c", "d"], torch.stack([row, row]))
    assert cache.stats() == {"rows_served": 2, "rows_computed": 4, "rows_not_stored": 1, "cache_bytes": 48}
    assert cache.take("vision", ["c"]) is not None and cache.take("vision", ["d"]) is None


def test_only_the_bound_tensor_itself_is_looked_up() -> None:
    frozen, cache = FrozenFeatures(), FeatureCache(1 << 20)
    pixels = torch.zeros(2, 3)
    calls = []

    def compute(x: torch.Tensor):
        return lambda: calls.append(1) or x.sum(dim=1, keepdim=True) + len(calls)

    with frozen.bind(cache, {"vision": pixels}, ["t/0", "t/1"]):
        first = frozen.get(pixels, compute(pixels))
        again = frozen.get(pixels, compute(pixels))  # served: no second call
        other = torch.zeros(2, 3)  # equal values, another tensor: computed
        third = frozen.get(other, compute(other))
    assert len(calls) == 2 and torch.equal(first, again) and not torch.equal(first, third)
    assert frozen.get(pixels, compute(pixels)) is not None and len(calls) == 3  # unbound after the block
    with frozen.bind(None, {"vision": pixels}, ["t/0", "t/1"]):  # no cache: always computed
        frozen.get(pixels, compute(pixels))
    assert len(calls) == 4
