"""Validate a CoIN download (local or s3://) split by split, images included.

``check_data`` returns a JSON-ready report: per task and split the number of records, valid
records and distinct images found (and decoded), plus every bad record with its file, index,
id, field and reason, and every warning (a kept record with a doubtful answer, same fields).
Nothing is skipped silently: a report with ``ok: false`` lists why; warnings leave it ok.
"""

from __future__ import annotations

import sys
from collections import defaultdict
from collections.abc import Collection, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any, TextIO

from pipeline.data import storage
from pipeline.data.coin import (
    BadRecord,
    CoinSource,
    DataError,
    LoadResult,
    decode_error_reason,
    list_images,
    open_image,
    scan_split,
)
from pipeline.data.schema import COIN_TASKS, SPLITS


def _decode_failures(source: CoinSource, task: str, result: LoadResult, *, label: str, workers: int,
                     progress_every: int, log: TextIO) -> tuple[list[BadRecord], int]:
    """Decode each distinct image of ``result.rows`` once; a failure is reported for every
    record that uses the image. Returns (bad records, images decoded fine)."""
    users: dict[str, list[dict]] = defaultdict(list)
    for row in result.rows:
        if row["image_path"]:
            users[row["image_path"]].append(row)
    fs, root = storage.resolve(source.image_root_for(task))

    def attempt(path: str) -> str | None:
        try:
            open_image(fs, storage.join(root, path))
            return None
        except storage.StorageError:  # the store failed, not the record: the check stops, naming it
            raise
        except Exception as e:  # noqa: BLE001 - PIL raises many exception types
            return decode_error_reason(path, e)

    bad: list[BadRecord] = []
    total, ok = len(users), 0
    with ThreadPoolExecutor(max_workers=max(1, workers)) as pool:
        for done, (path, error) in enumerate(zip(users, pool.map(attempt, users)), start=1):
            if error is None:
                ok += 1
            else:
                bad.extend(BadRecord(result.file, r["index"], r["id"], "image", error) for r in users[path])
            if progress_every and (done % progress_every == 0 or done == total):
                print(f"check-data: {label}: {done}/{total} images decoded, {done - ok} bad", file=log, flush=True)
    return bad, ok


def check_split(source: CoinSource, task: str, split: str, *, image_files: Collection[str],
                decode: bool = True, workers: int = 8, progress_every: int = 1000,
                log: TextIO = sys.stderr) -> dict[str, Any]:
    """Report for one split: counts and every bad record (as dicts)."""
    result = scan_split(source, task, split, image_files=image_files)
    entry: dict[str, Any] = {
        "file": result.file,
        "records": result.total,
        "valid": len(result.rows),
        "images": len({r["image_path"] for r in result.rows if r["image_path"]}),
    }
    bad = list(result.bad)
    if decode and result.rows:
        failed, decoded = _decode_failures(source, task, result, label=f"{task}/{split}", workers=workers,
                                           progress_every=progress_every, log=log)
        bad += failed
        entry["images_decoded"] = decoded
        entry["valid"] -= len(failed)
    bad.sort(key=lambda b: -1 if b.index is None else b.index)
    entry["bad"] = [b.to_dict() for b in bad]
    gone = {b.index for b in bad}
    entry["warnings"] = [w.to_dict() for w in result.warnings if w.index not in gone]
    return entry


def check_data(source: CoinSource, tasks: Sequence[str] | None = None, *, decode: bool = True,
               workers: int = 8, progress_every: int = 1000, log: TextIO = sys.stderr) -> dict[str, Any]:
    """Validate every split of ``tasks`` (default: all CoIN tasks). The image root is listed
    once for all of them."""
    report: dict[str, Any] = {"instructions_root": source.instructions_root, "image_root": source.image_root,
                              "tasks": {}, "errors": []}
    try:
        image_files = list_images(source)
    except storage.StorageError:
        raise
    except Exception as e:  # noqa: BLE001 - any listing failure is reported, not raised
        report["errors"].append(f"cannot list the image root {source.image_root}: {type(e).__name__}: {e}")
        image_files = set()
    report["image_files"] = len(image_files)
    for task in tasks or COIN_TASKS:
        if task not in COIN_TASKS:
            report["errors"].append(f"unknown task {task!r}; expected one of {', '.join(COIN_TASKS)}")
            continue
        report["tasks"][task] = {}
        for split in SPLITS:
            try:
                entry = check_split(source, task, split, image_files=image_files, decode=decode,
                                    workers=workers, progress_every=progress_every, log=log)
            except DataError as e:
                entry = {"file": e.file, "records": 0, "valid": 0, "images": 0, "bad": [e.bad.to_dict()],
                         "warnings": []}
            report["tasks"][task][split] = entry
    splits = [s for t in report["tasks"].values() for s in t.values()]
    report["records"] = sum(s["records"] for s in splits)
    report["valid"] = sum(s["valid"] for s in splits)
    report["bad_count"] = sum(len(s["bad"]) for s in splits)
    report["warning_count"] = sum(len(s["warnings"]) for s in splits)
    report["ok"] = report["bad_count"] == 0 and not report["errors"]
    return report
