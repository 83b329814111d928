"""The Ray Data adapter of the CoIN data layer: one split as a Ray Dataset whose images are
decoded lazily (streaming) in ``map_batches``; decode failures under on_bad="skip" are collected
by a small actor. Parsing and validation are ``pipeline.data.coin`` (no Ray)."""

from __future__ import annotations

from typing import Any

import numpy as np
import ray

from pipeline.data import storage
from pipeline.data.coin import BadRecord, CoinSource, DataError, LoadResult, PadColor, _decode_one, load_records
from pipeline.data.schema import ROW_COLUMNS



class _BadLog:
    """Ray actor body collecting decode failures, keyed by record index (retries add nothing)."""

    def __init__(self) -> None:
        self._bad: dict[int, BadRecord] = {}

    def add(self, bad: list[BadRecord]) -> None:
        for b in bad:
            self._bad[b.index] = b

    def get(self) -> list[BadRecord]:
        return [self._bad[k] for k in sorted(self._bad)]


class _ActorLog:
    """``LoadResult.decode_log``: the failures the actor collected (keeps the actor alive)."""

    def __init__(self, actor: Any) -> None:
        self.actor = actor

    def __call__(self) -> list[BadRecord]:
        return ray.get(self.actor.get.remote())


def _row_schema():
    """Arrow types of the schema columns, fixed so that all-empty list columns keep their type."""
    import pyarrow as pa

    strings = pa.list_(pa.string())
    types = {"index": pa.int64(), "human_turns": strings, "gpt_turns": strings, "answers": strings,
             "size": pa.list_(pa.int64())}
    return pa.schema([(name, types.get(name, pa.string())) for name in ROW_COLUMNS])


def _decode_batch(batch, *, fs: Any, root: str, size: int, file: str, log: Any, pad_color: PadColor = None):
    """map_batches body on a pyarrow batch: add ``image`` (n, size, size, 3) uint8. A row whose
    image fails to decode is dropped and logged when ``log`` is an actor handle (skip mode);
    otherwise the DataError naming file, record, id and field is raised."""
    from ray.data.extensions import ArrowTensorArray

    batch = batch.select(list(ROW_COLUMNS)).cast(_row_schema())
    paths, indices, ids = (batch.column(c).to_pylist() for c in ("image_path", "index", "id"))
    images = np.zeros((len(paths), size, size, 3), dtype=np.uint8)
    keep = np.ones(len(paths), dtype=bool)
    failed: list[BadRecord] = []
    for k, path in enumerate(paths):
        try:
            images[k] = _decode_one(fs, root, path, size, BadRecord(file, indices[k], ids[k], None, ""), pad_color)
        except DataError as e:
            if log is None:
                raise
            keep[k] = False
            failed.append(e.bad)
    if failed:
        ray.get(log.add.remote(failed))
    return batch.filter(keep).append_column("image", ArrowTensorArray.from_numpy(images[keep]))


def read_dataset(source: CoinSource, task: str, split: str, *, image_size: int, on_bad: str = "error",
                 ray_parallelism: int | None = None, decode_batch_size: int = 32,
                 decode_num_cpus: float | None = None, pad_color: PadColor = None) -> tuple[ray.data.Dataset, LoadResult]:
    """A Ray Dataset of one split, images decoded lazily (streaming) in ``map_batches``.

    Returns ``(dataset, LoadResult)``; the dataset has every schema column including
    ``image`` (uint8, shape (image_size, image_size, 3)). Row order is the file order
    (this switches on preserve_order in the current DataContext). ``ray_parallelism`` sets the
    number of input blocks; ``decode_num_cpus`` the CPUs each decode task reserves (a fraction
    leaves room for Train workers). Under on_bad="skip" see ``LoadResult.decode_failures()``
    for rows dropped while decoding; the dataset keeps the log actor alive. ``pad_color``: see
    ``decode_image``.
    """
    if image_size <= 0:
        raise ValueError(f"image_size must be positive, got {image_size}")
    result = load_records(source, task, split, on_bad=on_bad)
    ray.data.DataContext.get_current().execution_options.preserve_order = True
    if on_bad == "skip":
        result.decode_log = _ActorLog(ray.remote(num_cpus=0)(_BadLog).remote())
    fs, root = storage.resolve(source.image_root_for(task))
    ds = ray.data.from_items(result.rows, override_num_blocks=ray_parallelism)
    ds = ds.map_batches(
        _decode_batch,
        batch_size=decode_batch_size,
        batch_format="pyarrow",
        **({"num_cpus": decode_num_cpus} if decode_num_cpus is not None else {}),
        fn_kwargs={"fs": fs, "root": root, "size": image_size, "file": result.file, "log": result.decode_log.actor if result.decode_log else None,
                   "pad_color": pad_color},
    )
    return ds, result
