"""Data-layer subcommands for ``python pipeline/main.py``: metrics, score, check-data.

``main.py`` calls ``add_subcommands(subparsers)`` and then ``args.func(args)``; each function
prints one JSON document to stdout and returns the process exit code: 0 fine, 1 the data
checked is bad (check-data), 2 the input files are unusable or the store failed to serve them
after its retries (the JSON then is {"error": ...} naming the file or URL).
"""

from __future__ import annotations

import argparse
import functools
import json
import sys
from collections.abc import Callable
from typing import Any

from pipeline.data import storage
from pipeline.scoring import metrics
from pipeline.data.schema import COIN_TASKS


class InputError(ValueError):
    """A command-line input file is unusable; the message names the file (and line)."""


def _print(doc: dict[str, Any]) -> None:
    print(json.dumps(doc, indent=2))


def _guarded(fn: Callable[[argparse.Namespace], int]) -> Callable[[argparse.Namespace], int]:
    """Turn input problems into {"error": ...} on stdout and exit code 2."""

    @functools.wraps(fn)
    def run(args: argparse.Namespace) -> int:
        try:
            return fn(args)
        except (ValueError, FileNotFoundError, storage.StorageError) as e:  # DataError, ScoringError, InputError
            _print({"error": str(e)})
            return 2

    return run


def _read_text(location: str) -> str:
    fs, path = storage.resolve(location)
    try:
        return storage.read_bytes(fs, path).decode("utf-8")
    except FileNotFoundError:
        raise InputError(f"{location}: file not found") from None


def _read_json(location: str) -> Any:
    try:
        return json.loads(_read_text(location))
    except json.JSONDecodeError as e:
        raise InputError(f"{location}: invalid JSON: {e}") from None


# ---- metrics ---------------------------------------------------------------------------------


def load_matrix_file(location: str) -> tuple[list[str], list[list[float | None]], list[float] | None]:
    """Read and check ``{"tasks": [...], "matrix": [[...], ...], "isolation": [...]?}``."""
    doc = _read_json(location)
    if not isinstance(doc, dict):
        raise InputError(f"{location}: must be a JSON object with 'tasks' and 'matrix'")
    tasks, matrix, isolation = doc.get("tasks"), doc.get("matrix"), doc.get("isolation")
    if not isinstance(tasks, list) or not tasks or not all(isinstance(t, str) and t for t in tasks):
        raise InputError(f"{location}: 'tasks' must be a non-empty list of task names")
    if len(set(tasks)) != len(tasks):
        raise InputError(f"{location}: 'tasks' has duplicate names")
    if not isinstance(matrix, list) or not matrix:
        raise InputError(f"{location}: 'matrix' must be a non-empty list of rows")
    if len(matrix) > len(tasks):
        raise InputError(f"{location}: 'matrix' has {len(matrix)} rows but only {len(tasks)} tasks")
    for t, row in enumerate(matrix):
        if isinstance(row, list) and len(row) > len(tasks):
            raise InputError(f"{location}: matrix row {t + 1} has {len(row)} entries but there are {len(tasks)} tasks")
    if isolation is not None and (not isinstance(isolation, list) or len(isolation) != len(tasks)):
        raise InputError(f"{location}: 'isolation' must have one score per task ({len(tasks)})")
    try:
        metrics.validate_matrix(matrix)
    except ValueError as e:
        raise InputError(f"{location}: {e}") from None
    return tasks, matrix, isolation


def run_metrics(args: argparse.Namespace) -> int:
    """Print every metric defined for the matrix (per-task values keyed by task name)."""
    tasks, matrix, isolation = load_matrix_file(args.matrix)
    try:
        out = metrics.all_metrics(matrix, isolation)
    except ValueError as e:
        raise InputError(f"{args.matrix}: {e}") from None
    n = out["T"]
    out["tasks"] = tasks[:n]
    out["complete"] = n == len(tasks)
    out["last_per_task"] = dict(zip(tasks, out["last_per_task"]))
    if "avg_per_task" in out:
        out["avg_per_task"] = dict(zip(tasks, out["avg_per_task"]))
        out["B_t"] = dict(zip(tasks[1:], out["B_t"]))  # B_t, M_t are named by the stage's task
        out["M_t"] = dict(zip(tasks[1:], out["M_t"]))
    _print(out)
    return 0


# ---- score -----------------------------------------------------------------------------------


def read_predictions(location: str) -> dict[str, str]:
    """question_id -> text from a LLaVA answer file (JSON lines); errors name file and line."""
    out: dict[str, str] = {}
    lines: dict[str, int] = {}
    for number, line in enumerate(_read_text(location).splitlines(), start=1):
        if not line.strip():
            continue
        try:
            rec = json.loads(line)
        except json.JSONDecodeError as e:
            raise InputError(f"{location} line {number}: invalid JSON: {e}") from None
        if not isinstance(rec, dict):
            raise InputError(f"{location} line {number}: must be a JSON object")
        qid, text = rec.get("question_id"), rec.get("text")
        if qid is None or isinstance(qid, bool) or not isinstance(qid, (str, int)):
            raise InputError(f"{location} line {number}: field 'question_id' missing or not a string/integer")
        if not isinstance(text, str):
            raise InputError(f"{location} line {number}: field 'text' missing or not a string")
        if str(qid) in lines:
            raise InputError(f"{location} line {number}: duplicate question_id {qid!r} (first on line {lines[str(qid)]})")
        lines[str(qid)] = number
        out[str(qid)] = text
    return out


def run_score(args: argparse.Namespace) -> int:
    """Score one task's answer file against its CoIN test JSON."""
    from pipeline.data.coin import DataError, parse_records
    from pipeline.scoring.scorers import score_task

    from pipeline.scoring.scorers import COIN_SCORERS, scorer_info

    scorer = args.scorer or COIN_SCORERS.get(args.task)
    if scorer is None:
        raise ValueError(f"task {args.task!r} is not a CoIN task: give --scorer")
    result = parse_records(_read_json(args.answers), args.task, "test", args.answers,
                           box_answers=scorer_info(scorer).answers == "box", scorer=scorer)
    if result.bad:
        raise DataError(result.bad[0])
    scored = score_task(args.task, result.rows, read_predictions(args.predictions), scorer=scorer)
    _print({"task": scored.task, "score": scored.score, "count": scored.count, "unparseable": scored.unparseable})
    return 0


# ---- check-data ------------------------------------------------------------------------------


def run_check_data(args: argparse.Namespace) -> int:
    """Validate a CoIN download; exit code 1 when anything is bad."""
    from pipeline.data.check import check_data
    from pipeline.data.coin import CoinSource

    instructions = args.instructions
    if not (storage.is_remote(instructions) or instructions.startswith("/")):
        instructions = storage.join(args.root.rstrip("/"), instructions)
    source = CoinSource(instructions, args.image_root or args.root)
    report = check_data(source, args.tasks, decode=not args.no_decode, workers=args.workers,
                        progress_every=args.progress_every, log=sys.stderr)
    _print(report)
    print(f"check-data: {report['records']} records, {report['valid']} valid, {report['bad_count']} bad, "
          f"{report['warning_count']} warning(s){'' if report['ok'] else ' (exit 1)'}", file=sys.stderr, flush=True)
    return 0 if report["ok"] else 1


def add_subcommands(subparsers: argparse._SubParsersAction) -> None:
    """Register ``metrics``, ``score`` and ``check-data`` (each sets ``func``)."""
    p = subparsers.add_parser("metrics", help="continual-learning metrics of an accuracy matrix")
    p.add_argument("matrix", metavar="MATRIX.json",
                   help='{"tasks": [...], "matrix": [[row t], ...], "isolation": [...] (optional, enables FWT)}')
    p.set_defaults(func=_guarded(run_metrics))

    from pipeline.scoring.scorers import SCORERS

    p = subparsers.add_parser(
        "score", help="score a LLaVA answer file against a CoIN (or your own task's) test file",
        epilog="scorers (data.custom_tasks.<Task>.scorer):\n" + "\n".join(f"  {s.name:<9} {s.help}" for s in SCORERS.values()),
        formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--task", required=True, help=f"the task name ({', '.join(COIN_TASKS)} or your own with --scorer)")
    p.add_argument("--scorer", choices=sorted(SCORERS), default=None,
                   help="how answers are scored (default: the CoIN task's own scorer)")
    p.add_argument("--answers", required=True, metavar="TEST.json", help="the task's CoIN test/val JSON")
    p.add_argument("--predictions", required=True, metavar="PRED.jsonl", help='lines {"question_id": ..., "text": ...}')
    p.set_defaults(func=_guarded(run_score))

    p = subparsers.add_parser("check-data", help="validate a CoIN download (local folder or s3://)")
    p.add_argument("--root", required=True, help="folder or s3:// URL holding the download")
    p.add_argument("--instructions", default="Instructions_Original",
                   help="instructions folder, relative to --root unless absolute or a URL")
    p.add_argument("--image-root", default=None, help="image root (default: --root)")
    p.add_argument("--tasks", nargs="+", default=None, metavar="TASK", help="tasks to check (default: all eight)")
    p.add_argument("--no-decode", action="store_true", help="skip decoding every image")
    p.add_argument("--workers", type=int, default=8, help="threads decoding images")
    p.add_argument("--progress-every", type=int, default=1000, metavar="N",
                   help="progress line on stderr every N images (0: none)")
    p.set_defaults(func=_guarded(run_check_data))
