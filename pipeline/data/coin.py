"""Reader for the real CoIN layout, local or on s3://, into the rows of ``pipeline.data.schema``.

A layout is an instructions root (``<Task>/<file>`` per ``schema.TASK_FILES``) and an image
root that every record's ``image`` is relative to. ``load_records`` validates a split and
returns its rows (all schema columns except ``image``); ``read_dataset`` turns them into a
Ray Dataset whose images are decoded lazily in a ``map_batches`` stage; ``iter_decoded`` does
the same in plain Python for small tools and tests.

Bad input policy: ``on_bad="error"`` raises ``DataError`` (naming file, record index, id and
field) for the first bad record; ``on_bad="skip"`` (train only) drops bad records and lists
every one in ``LoadResult.bad``. The test split never skips: evaluation must see every record.
Every record is also checked against its task's answer format (the scorer's ``validate``, see
``pipeline.scoring.scorers``): errors make the record bad, warnings are listed in
``LoadResult.warnings`` and the record is kept.

Undecodable images are found only while decoding (checking every image up front would read
the whole image set twice). Under "error", or for the test split, the decode stage raises
``DataError``. Under "skip" the decode stage drops the row and records a ``BadRecord`` in a
small Ray actor owned by the ``LoadResult``; ``LoadResult.decode_failures()`` returns them
once the dataset has been consumed, and ``LoadResult.all_bad()`` is both lists together.
"""

from __future__ import annotations

import io
import posixpath
from collections.abc import Collection, Iterator
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np

from pipeline.data import storage
from pipeline.scoring.scorers import COIN_SCORERS, scorer_info
from pipeline.data.schema import IMAGE_TOKEN, SPLITS

ON_BAD = ("error", "skip")


@dataclass(frozen=True)
class CoinSource:
    """Where a benchmark's files live: both roots may be local folders or ``s3://`` URLs.
    ``custom``: the user's own tasks (``pipeline.tasks.TaskSpec``), each with its own files."""

    instructions_root: str
    image_root: str
    custom: tuple = ()

    def spec(self, task: str):
        """The task's ``TaskSpec`` (DataError naming the known tasks if there is none)."""
        from pipeline.tasks import task_table

        table = task_table(self.custom)
        if task not in table:
            raise DataError(BadRecord(self.instructions_root, None, None, "task",
                                      f"unknown task {task!r}; expected one of {', '.join(table)}"))
        return table[task]

    def image_root_for(self, task: str) -> str:
        return self.spec(task).image_root or self.image_root

    def file_location(self, task: str, split: str) -> tuple[Any, str]:
        """(filesystem, path) of one split's JSON file."""
        rel = self.spec(task).file(split)
        if "://" in rel or rel.startswith("/"):
            return storage.resolve(rel)
        fs, root = storage.resolve(self.instructions_root)
        return fs, storage.join(root, rel)


@dataclass(frozen=True)
class BadRecord:
    """One bad input: ``index``/``id``/``field`` are None when the problem is the whole file."""

    file: str
    index: int | None
    id: str | None
    field: str | None
    reason: str

    def message(self) -> str:
        where = self.file
        if self.index is not None:
            where += f": record {self.index} (id={self.id if self.id is not None else '?'})"
        if self.field is not None:
            where += f" field '{self.field}'"
        return f"{where}: {self.reason}"

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


class DataError(ValueError):
    """Bad CoIN input; carries the structured ``BadRecord`` (also as attributes)."""

    def __init__(self, bad: BadRecord) -> None:
        super().__init__(bad.message())
        self.bad = bad
        self.file, self.index, self.id, self.field, self.reason = bad.file, bad.index, bad.id, bad.field, bad.reason

    def __reduce__(self):  # keep the structured fields across Ray's pickling
        return (DataError, (self.bad,))


class BadRecordsError(DataError):
    """The data stage's scan found ``count`` bad records; ``bad`` is the first, ``report`` the file
    that lists them all."""

    def __init__(self, bad: BadRecord, count: int, report: str, hint: str = "") -> None:
        super().__init__(bad)
        self.count, self.report, self.hint = count, report, hint
        ValueError.__init__(self, f"data: {count} bad record(s) (all listed in {report}); first: "
                                  f"{bad.message()}{hint}")

    def __reduce__(self):
        return (BadRecordsError, (self.bad, self.count, self.report, self.hint))


@dataclass
class LoadResult:
    """Validated rows of one split plus every bad record found (see the module docstring)."""

    rows: list[dict[str, Any]]
    bad: list[BadRecord]
    file: str = ""
    total: int = 0  # records in the file, good and bad
    decode_log: Any = field(default=None, repr=False, compare=False)
    warnings: list[BadRecord] = field(default_factory=list)  # kept records with a doubtful answer

    def decode_failures(self) -> list[BadRecord]:
        """Rows dropped while images were decoded under on_bad="skip" (``decode_log``: a callable
        returning them, set by the reader that decodes, e.g. ``stages.datasets.read_dataset``;
        complete once the dataset has been fully consumed)."""
        return [] if self.decode_log is None else list(self.decode_log())

    def all_bad(self) -> list[BadRecord]:
        return self.bad + self.decode_failures()


class _FieldError(Exception):
    def __init__(self, field: str | None, reason: str) -> None:
        super().__init__(reason)
        self.field, self.reason = field, reason


# ---- record parsing (pure) -----------------------------------------------------------------


def strip_image_token(text: str) -> str:
    """Remove the ``<image>`` placeholder and the newline next to it, then outer whitespace."""
    return text.replace(IMAGE_TOKEN + "\n", "").replace("\n" + IMAGE_TOKEN, "").replace(IMAGE_TOKEN, "").strip()


def _record_id(rec: dict, key: str) -> str:
    value = rec.get(key)
    if value is None:
        raise _FieldError(key, "missing")
    if isinstance(value, bool) or not isinstance(value, (str, int)) or value == "":
        raise _FieldError(key, f"must be a non-empty string or integer, got {type(value).__name__}")
    return str(value)


def _image_path(rec: dict) -> str:
    if "image" not in rec:
        return ""
    value = rec["image"]
    if not isinstance(value, str) or not value:
        raise _FieldError("image", "must be a non-empty relative path string")
    why = storage.lexical_escape(value)
    if why is not None:
        raise _FieldError("image", why)
    return posixpath.normpath(value)


def _text(rec: dict, key: str) -> str:
    if key not in rec:
        raise _FieldError(key, "missing")
    if not isinstance(rec[key], str):
        raise _FieldError(key, f"must be a string, got {type(rec[key]).__name__}")
    return rec[key]


def _conversation(rec: dict) -> tuple[list[str], list[str]]:
    turns = rec.get("conversations")
    if turns is None:
        raise _FieldError("conversations", "missing")
    if not isinstance(turns, list) or not turns:
        raise _FieldError("conversations", "must be a non-empty list of turns")
    if len(turns) % 2:
        raise _FieldError("conversations", f"has {len(turns)} turns; every human turn needs a gpt reply")
    human, gpt = [], []
    for k, turn in enumerate(turns):
        name = f"conversations[{k}]"
        want = "human" if k % 2 == 0 else "gpt"
        if not isinstance(turn, dict):
            raise _FieldError(name, "must be an object")
        if turn.get("from") != want:
            raise _FieldError(f"{name}.from", f"expected {want!r}, got {turn.get('from')!r}")
        value = turn.get("value")
        if not isinstance(value, str):
            raise _FieldError(f"{name}.value", "must be a string")
        (human if want == "human" else gpt).append(strip_image_token(value) if want == "human" else value)
    return human, gpt


def _row(task: str, split: str, index: int, rid: str, image: str, human: list[str], gpt: list[str]) -> dict:
    return {
        "task": task, "split": split, "id": rid, "index": index, "image_path": image,
        "human_turns": human, "gpt_turns": gpt, "instruction": human[0],
        "answer": "", "answers": [], "answer_bbox": "", "size": [],
    }


def _parse_train(rec: dict, task: str, index: int) -> dict:
    rid = _record_id(rec, "id")
    image = _image_path(rec)
    human, gpt = _conversation(rec)
    return _row(task, "train", index, rid, image, human, gpt)


def _answer_fields(rec: dict, box: bool) -> dict:
    if box:
        box = _text(rec, "answer_bbox")  # its format: the scorer's validate
        size = rec.get("size")
        if (not isinstance(size, list) or len(size) != 2
                or not all(isinstance(v, int) and not isinstance(v, bool) and v > 0 for v in size)):
            raise _FieldError("size", f"must be [width, height] of positive integers, got {size!r}")
        return {"answer_bbox": box, "size": list(size)}
    out: dict[str, Any] = {}
    if "answers" in rec:
        answers = rec["answers"]
        if not isinstance(answers, list) or not answers or not all(isinstance(a, str) for a in answers):
            raise _FieldError("answers", "must be a non-empty list of strings")
        out["answers"] = list(answers)
    if "answer" in rec or not out:
        value = rec.get("answer")
        if value is None:
            raise _FieldError("answer", "missing")
        if isinstance(value, bool) or not isinstance(value, (str, int, float)):
            raise _FieldError("answer", f"must be a string, got {type(value).__name__}")
        out["answer"] = str(value)
    return out


def _parse_test(rec: dict, task: str, index: int, box: bool = False) -> dict:
    rid = _record_id(rec, "question_id")
    image = _image_path(rec)
    row = _row(task, "test", index, rid, image, [strip_image_token(_text(rec, "text"))], [])
    row.update(_answer_fields(rec, box))
    return row


def parse_records(records: Any, task: str, split: str, file: str, box_answers: bool | None = None,
                  scorer: str | None = None) -> LoadResult:
    """Validate already-loaded JSON ``records`` of one split (no I/O, no image checks).
    ``scorer``: the task's scorer, whose ``validate`` checks every record's answers (default: the
    CoIN task's; none for other names, e.g. the pre-training corpus). ``box_answers``: test
    records answer with a box (default: the scorer's kind, else whether the task is Grounding).

    Collects every bad record; file-level problems (not a list, empty) are one ``BadRecord``
    with ``index=None``. Duplicate ids: the first occurrence is kept, later ones are bad.
    """
    info = scorer_info(scorer or COIN_SCORERS[task]) if scorer or task in COIN_SCORERS else None
    if not isinstance(records, list):
        return LoadResult([], [BadRecord(file, None, None, None, f"must be a JSON list of records, got {type(records).__name__}")], file, 0)
    if not records:
        return LoadResult([], [BadRecord(file, None, None, None, f"empty {split} split: the file has no records")], file, 0)
    if box_answers is None:
        box_answers = info.answers == "box" if info is not None else task == "Grounding"
    box = box_answers
    parse, id_key = (_parse_train, "id") if split == "train" else (
        (lambda rec, task, index: _parse_test(rec, task, index, box)), "question_id")
    rows, bad, warnings, seen = [], [], [], {}
    for index, rec in enumerate(records):
        if not isinstance(rec, dict):
            bad.append(BadRecord(file, index, None, "(record)", f"must be a JSON object, got {type(rec).__name__}"))
            continue
        raw_id = rec.get(id_key)
        shown = str(raw_id) if isinstance(raw_id, (str, int)) and not isinstance(raw_id, bool) else None
        try:
            row = parse(rec, task, index)
        except _FieldError as e:
            bad.append(BadRecord(file, index, shown, e.field, e.reason))
            continue
        problems = info.validate(row) if info is not None else []
        errors = [p for p in problems if p.error]
        if errors:
            bad.append(BadRecord(file, index, row["id"], errors[0].field, errors[0].reason))
            continue
        if row["id"] in seen:
            bad.append(BadRecord(file, index, row["id"], id_key, f"duplicate {id_key}, first at record {seen[row['id']]}"))
            continue
        seen[row["id"]] = index
        warnings += [BadRecord(file, index, row["id"], p.field, p.reason) for p in problems]
        rows.append(row)
    return LoadResult(rows, bad, file, len(records), warnings=warnings)


# ---- files and images ------------------------------------------------------------------------


def task_file(source: CoinSource, task: str, split: str) -> str:
    """Location of one split's JSON file (a display path / URL)."""
    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r}; expected one of {SPLITS}")
    fs, path = source.file_location(task, split)
    return storage.display(fs, path)


def list_images(source: CoinSource, task: str | None = None) -> set[str]:
    """Every file under the image root (of ``task``: a user task may have its own), relative to it
    (one recursive listing)."""
    fs, root = storage.resolve(source.image_root_for(task) if task else source.image_root)
    return storage.list_files(fs, root)


def _read_file(source: CoinSource, task: str, split: str) -> tuple[str, Any, BadRecord | None]:
    file = task_file(source, task, split)
    fs, path = source.file_location(task, split)
    try:
        return file, storage.read_json(fs, path), None
    except FileNotFoundError:
        return file, None, BadRecord(file, None, None, None, "file not found")
    except (UnicodeDecodeError, ValueError) as e:
        return file, None, BadRecord(file, None, None, None, f"invalid JSON: {e}")


def scan_split(source: CoinSource, task: str, split: str, *, image_files: Collection[str] | None = None) -> LoadResult:
    """Validate one split completely and collect every bad record (never raises for data).

    ``image_files`` is a listing from ``list_images`` to reuse across splits; without it the
    image root is listed once here. Rows whose image is missing, or whose path leads out of the
    image root once resolved (symbolic links included, see ``storage.Confinement``), are moved
    to ``bad``.
    """
    file, records, problem = _read_file(source, task, split)
    if problem is not None:
        return LoadResult([], [problem], file, 0)
    spec = source.spec(task)
    result = parse_records(records, task, split, file, box_answers=spec.box_answers, scorer=spec.scorer)
    if not any(r["image_path"] for r in result.rows):
        return result
    own_root = spec.image_root is not None
    files = image_files if image_files is not None and not own_root else list_images(source, task)
    confinement = storage.Confinement(*storage.resolve(source.image_root_for(task)))
    kept = []
    for row in result.rows:
        path = row["image_path"]
        why = confinement.escape(path) if path else None
        if why is None and path and path not in files:
            why = f"image file {path!r} not found under {source.image_root_for(task)}"
        if why is None:
            kept.append(row)
        else:
            result.bad.append(BadRecord(file, row["index"], row["id"], "image", why))
    result.rows = kept
    result.bad.sort(key=lambda b: -1 if b.index is None else b.index)
    gone = {b.index for b in result.bad}
    result.warnings = [w for w in result.warnings if w.index not in gone]
    return result


def load_records(source: CoinSource, task: str, split: str, *, on_bad: str = "error",
                 image_files: Collection[str] | None = None) -> LoadResult:
    """Validated rows of one split, under the bad-input policy ``on_bad`` ("error" | "skip")."""
    if on_bad not in ON_BAD:
        raise ValueError(f"on_bad must be one of {ON_BAD}, got {on_bad!r}")
    if split == "test" and on_bad == "skip":
        raise ValueError("on_bad='skip' is not allowed for the test split: evaluation never skips records")
    result = scan_split(source, task, split, image_files=image_files)
    file_level = [b for b in result.bad if b.index is None]
    if file_level or (result.bad and on_bad == "error"):
        raise DataError((file_level or result.bad)[0])
    if not result.rows:
        raise DataError(BadRecord(result.file, None, None, None, f"no valid records left in the {split} split"))
    return result


def open_image(fs: Any, path: str):
    """Open and fully decode one image as RGB (PIL raises on corrupt or truncated data)."""
    from PIL import Image

    image = Image.open(io.BytesIO(storage.read_bytes(fs, path)))
    image.load()
    return image.convert("RGB")


def decode_error_reason(path: str, error: Exception) -> str:
    """The ``reason`` text for an image that failed to open or decode."""
    from PIL import UnidentifiedImageError

    detail = "unrecognised image data" if isinstance(error, UnidentifiedImageError) else f"{type(error).__name__}: {error}"
    return f"cannot decode image {path!r}: {detail}"


PadColor = tuple[int, int, int] | None  # RGB of the square an image is centred on; None = stretch


def expand_to_square(image, color: tuple[int, int, int]):
    """A PIL image centred on a square of ``color`` (LLaVA-1.5's ``expand2square``: the short side
    is padded, (long - short) // 2 before the image, the rest after)."""
    from PIL import Image

    width, height = image.size
    if width == height:
        return image
    side = max(width, height)
    square = Image.new(image.mode, (side, side), tuple(color))
    square.paste(image, ((side - width) // 2, (side - height) // 2))
    return square


def decode_image(fs: Any, path: str, size: int, pad_color: PadColor = None) -> np.ndarray:
    """Decoded image resized to ``size x size``: uint8 array of shape (size, size, 3). With
    ``pad_color`` the image is first padded to a square of that colour (``expand_to_square``),
    otherwise a non-square image is stretched."""
    from PIL import Image

    image = open_image(fs, path)
    if pad_color is not None:
        image = expand_to_square(image, pad_color)
    image = image.resize((size, size), Image.Resampling.BICUBIC)
    return np.asarray(image, dtype=np.uint8)


def _decode_one(fs: Any, root: str, row_path: str, size: int, bad: BadRecord, pad_color: PadColor = None
                ) -> np.ndarray:
    """Decode a row's image (zeros when the record has none); DataError naming the record."""
    if not row_path:
        return np.zeros((size, size, 3), dtype=np.uint8)
    try:
        return decode_image(fs, storage.join(root, row_path), size, pad_color)
    except storage.StorageError:  # the store failed, not the record: never skipped as bad data
        raise
    except Exception as e:  # PIL raises many types (OSError, ValueError, SyntaxError, ...)
        raise DataError(BadRecord(bad.file, bad.index, bad.id, "image", decode_error_reason(row_path, e))) from e


def iter_decoded(source: CoinSource, task: str, split: str, image_size: int, *, on_bad: str = "error",
                 bad_out: list[BadRecord] | None = None, pad_color: PadColor = None) -> Iterator[dict[str, Any]]:
    """Yield validated rows with their decoded ``image``, without Ray, one at a time.

    Under on_bad="skip" every skipped record (validation and decode) is appended to
    ``bad_out`` when one is given.
    """
    result = load_records(source, task, split, on_bad=on_bad)
    if bad_out is not None:
        bad_out.extend(result.bad)
    fs, root = storage.resolve(source.image_root_for(task))
    for row in result.rows:
        try:
            image = _decode_one(fs, root, row["image_path"], image_size,
                                BadRecord(result.file, row["index"], row["id"], None, ""), pad_color)
        except DataError as e:
            if on_bad != "skip":
                raise
            if bad_out is not None:
                bad_out.append(e.bad)
            continue
        yield {**row, "image": image}
