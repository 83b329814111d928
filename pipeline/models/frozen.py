"""Outputs of the frozen encoders (the LMM's vision tower, the guide's image and text towers),
computed once per test sample and reused for as long as the base stays loaded.

Evaluate-all-previous re-runs every earlier task's test set after each task, but a sample's
vision features and guide embeddings are the same at every stage: the towers are frozen in every
method that declares ``frozen_encoders`` (all the shipped ones). The inference actor binds each
batch's input tensors to the batch's sample keys (``FrozenFeatures.bind``); the encoders look
their input up (``FrozenFeatures.get``) and take the rows from ``FeatureCache`` when all of them
are there, else compute the whole batch and store it.

Results are bit-identical to computing every time: a batch is either served whole from the
cache or computed whole, and the evaluate stage forms a task's batches the same way at every
stage, so a cached row is exactly what the tower gives for that row in that batch. Methods that
train the projector (ProgLoRA, DRAPE) are served the features before it.

A tensor that is not bound (training batches, ProgLoRA's answer texts, any other call) is
computed as usual: the binding is by object identity, for the duration of one ``generate``.
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import Callable, Iterator, Sequence

import torch


class FeatureCache:
    """Rows of frozen-encoder outputs by (kind, sample key), on the CPU, up to ``max_bytes``
    (rows that do not fit are not stored: later stages compute them again)."""

    def __init__(self, max_bytes: int) -> None:
        self.max_bytes = int(max_bytes)
        self.bytes = 0
        self.rows: dict[tuple[str, str], torch.Tensor] = {}
        self.served = 0  # rows taken from the cache
        self.computed = 0  # rows computed by an encoder while bound
        self.full = 0  # computed rows not stored for lack of room

    def take(self, kind: str, keys: Sequence[str]) -> list[torch.Tensor] | None:
        found = [self.rows.get((kind, k)) for k in keys]
        if any(r is None for r in found):
            return None
        self.served += len(keys)
        return found  # type: ignore[return-value]

    def put(self, kind: str, keys: Sequence[str], value: torch.Tensor) -> None:
        self.computed += len(keys)
        if len(keys) != value.shape[0]:
            return
        rows = value.detach().to("cpu")
        for key, row in zip(keys, rows):
            if (kind, key) in self.rows:
                continue
            size = row.numel() * row.element_size()
            if self.bytes + size > self.max_bytes:
                self.full += 1
                continue
            self.rows[(kind, key)] = row.clone()
            self.bytes += size

    def stats(self) -> dict[str, int]:
        return {"rows_served": self.served, "rows_computed": self.computed, "rows_not_stored": self.full,
                "cache_bytes": self.bytes}


class FrozenFeatures:
    """Where an encoder asks whether its input tensor is a bound batch's (see the module doc).
    One per model object; unbound (the default) it only calls ``compute``."""

    def __init__(self) -> None:
        self._bound: dict[int, tuple[torch.Tensor, str, Sequence[str]]] = {}
        self.cache: FeatureCache | None = None

    @contextmanager
    def bind(self, cache: FeatureCache | None, inputs: dict[str, torch.Tensor], keys: Sequence[str]
             ) -> Iterator[None]:
        """While the block runs, ``inputs`` (kind -> the batch's tensor) are the rows of ``keys``."""
        if cache is None:
            yield
            return
        self.cache = cache
        self._bound = {id(t): (t, kind, list(keys)) for kind, t in inputs.items() if torch.is_tensor(t)}
        try:
            yield
        finally:
            self._bound, self.cache = {}, None

    def get(self, tensor: torch.Tensor, compute: Callable[[], torch.Tensor]) -> torch.Tensor:
        entry = self._bound.get(id(tensor))
        if entry is None or entry[0] is not tensor or self.cache is None:
            return compute()
        _, kind, keys = entry
        rows = self.cache.take(kind, keys)
        if rows is not None:
            return torch.stack(rows).to(tensor.device)
        value = compute()
        self.cache.put(kind, keys, value)
        return value
