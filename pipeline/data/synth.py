"""CoIN-synth: a generated benchmark in CoIN's exact file layout, plus a pre-training corpus.

The embedded default of the pipeline trains a tiny LLaVA on this instead of the real CoIN, so that
the whole continual run (pre-train, then eight tasks) takes minutes on a laptop. The eight tasks
mirror CoIN's skills and answer formats on one shared visual world (see ``synth_tasks``); the
pre-training corpus (``synth_pretrain``) teaches the base model that world and seven tasks' visual
skills in its own phrasing, never the tasks' CoIN instructions or Grounding's boxes.
Layout written by :func:`generate_benchmark`::

    out_root/
      Instructions_Original/<Task>/train.json      (LLaVA train format)
      Instructions_Original/<Task>/test.json|val.json   (per schema.TASK_FILES)
      images/<Task>/<train|test>/<id>.png          (``image`` fields are relative to out_root/images)
      pretrain/train.json                          (LLaVA train format)
      images/pretrain/<id>.png
      SPEC.json                                    (spec, sha256 of every file, summary; written last)

Everything is a pure function of the :class:`SynthSpec`: one numpy Generator per (seed, task,
split), fixed PNG encoding, sorted JSON keys, so the same spec gives byte-identical files.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
import zlib
from collections import Counter
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Iterator

import numpy as np

from .schema import COIN_TASKS, IMAGE_TOKEN, TASK_FILES
from .synth_pretrain import SKILL_TASKS, pretrain_sample, skill_sample
from .synth_render import png_bytes, unit
from .synth_tasks import INSTRUCTION_SUFFIXES, TASKS, Sample

__all__ = [
    "SynthSpec",
    "SynthSpecMismatch",
    "generate_benchmark",
    "benchmark_texts",
    "INSTRUCTION_SUFFIXES",
    "GENERATOR_VERSION",
]

# Bump when the generated content changes, so an old directory is not mistaken for a new one.
GENERATOR_VERSION = 4  # 4: locating taught in the corpus (corners), 200 test samples per task by default
INSTRUCTIONS_DIR = "Instructions_Original"
IMAGES_DIR = "images"
PRETRAIN_FILE = "pretrain/train.json"
SPEC_FILE = "SPEC.json"


@dataclass(frozen=True)
class SynthSpec:
    """What to generate. Defaults are the embedded default's sizes (a few minutes of CPU training)."""

    seed: int = 0
    image_size: int = 32
    train_per_task: int = 256
    test_per_task: int = 200
    pretrain_records: int = 1000  # generic records (captions, generic QA)
    pretrain_skill_per_task: int = 400  # skill records per task in SKILL_TASKS
    tasks: tuple = COIN_TASKS
    # Generic pre-training records also use LLaVA-1.5's two generic instructions (synth_pretrain.py).
    generic_instructions: bool = False

    def __post_init__(self) -> None:
        unit(self.image_size)  # validates: a positive multiple of 32
        object.__setattr__(self, "tasks", tuple(self.tasks))
        unknown = [t for t in self.tasks if t not in TASKS]
        if unknown:
            raise ValueError(f"unknown CoIN-synth task(s) {unknown}; known: {list(TASKS)}")
        for name in ("train_per_task", "test_per_task", "pretrain_records", "pretrain_skill_per_task"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be >= 0")


class SynthSpecMismatch(RuntimeError):
    """The output directory already holds a CoIN-synth benchmark generated from another spec."""


def _spec_doc(spec: SynthSpec) -> dict:
    doc = {**asdict(spec), "tasks": list(spec.tasks), "version": GENERATOR_VERSION}
    if not spec.generic_instructions:  # absent by default: existing benchmarks keep their SPEC.json
        del doc["generic_instructions"]
    return doc


def _rng(seed: int, stream: str) -> np.random.Generator:
    """Independent stream per (seed, task, split): adding a task or resizing one leaves others unchanged."""
    return np.random.default_rng([seed, zlib.crc32(stream.encode())])


class _Writer:
    """Atomic writes (tmp file + rename) under a root, remembering each file's sha256.

    File system calls run on a few threads (they release the GIL) so that rendering overlaps with
    writing; ``close()`` waits for them and re-raises the first error.
    """

    def __init__(self, root: Path, threads: int = 4):
        self.root = root
        self.hashes: dict[str, str] = {}
        self._dirs: set[Path] = set()
        self._pool = ThreadPoolExecutor(threads, thread_name_prefix="synth-write") if threads else None
        self._pending: list[Future] = []

    def write(self, rel: str, data: bytes) -> None:
        path = self.root / rel
        if path.parent not in self._dirs:
            path.parent.mkdir(parents=True, exist_ok=True)
            self._dirs.add(path.parent)
        self.hashes[rel] = hashlib.sha256(data).hexdigest()
        if self._pool is None:
            _atomic_write(path, data)
            return
        self._pending.append(self._pool.submit(_atomic_write, path, data))
        if len(self._pending) > 256:
            self._drain()

    def write_json(self, rel: str, obj) -> None:
        self.write(rel, (json.dumps(obj, sort_keys=True, indent=1, ensure_ascii=False) + "\n").encode())

    def _drain(self) -> None:
        pending, self._pending = self._pending, []
        for f in pending:
            f.result()

    def close(self) -> None:
        try:
            self._drain()
        finally:
            if self._pool is not None:
                self._pool.shutdown(wait=True)


def _atomic_write(path: Path, data: bytes) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_bytes(data)
    os.replace(tmp, path)


def _train_record(rid: str, image: str, turns: list[tuple[str, str]], prompt) -> dict:
    conv = []
    for i, (q, a) in enumerate(turns):
        text = prompt(q) if prompt else q
        conv.append({"from": "human", "value": f"{IMAGE_TOKEN}\n{text}" if i == 0 else text})
        conv.append({"from": "gpt", "value": a})
    return {"id": rid, "image": image, "conversations": conv}


def _test_record(task: str, qid: str, image: str, sample: Sample, size: int) -> dict:
    question, answer = sample.turns[0]
    rec = {"question_id": qid, "image": image, "text": TASKS[task].prompt(question)}
    if task == "Grounding":
        rec.update(answer_bbox=answer, size=[size, size])
    else:
        rec["answer"] = answer
    if sample.answers:
        rec["answers"] = sample.answers
    return rec


def _generate_task(w: _Writer, spec: SynthSpec, task: str, split: str) -> tuple[dict, list[float], list[str]]:
    """Write one task/split; returns ({records, turns}, per-record chance, every answer)."""
    n = spec.train_per_task if split == "train" else spec.test_per_task
    rng = _rng(spec.seed, f"{task}/{split}")
    records, chances, answers = [], [], []
    for i in range(n):
        sample = TASKS[task].generate(rng, spec.image_size, split == "train")
        rid = f"{task.lower()}_{split}_{i:05d}"
        image = f"{task}/{split}/{rid}.png"
        w.write(f"{IMAGES_DIR}/{image}", png_bytes(sample.image))
        if split == "train":
            records.append(_train_record(rid, image, sample.turns, TASKS[task].prompt))
        else:
            records.append(_test_record(task, rid, image, sample, spec.image_size))
        turns = sample.turns if split == "train" else sample.turns[:1]
        chances.append(sample.chance)
        answers.extend(a for _, a in turns)
    w.write_json(f"{INSTRUCTIONS_DIR}/{TASK_FILES[task][split]}", records)
    return {"records": n, "turns": len(answers)}, chances, answers


def _task_stats(test_chances: list[float], test_answers: list[str], all_answers: set[str]) -> dict:
    """Reference levels of one task: uniform guess over the question type's answers, always
    giving the most common test answer, and the size of the answer vocabulary."""
    majority = Counter(test_answers).most_common(1)[0][1] / len(test_answers) if test_answers else 0.0
    return {
        "chance": round(float(np.mean(test_chances)), 4) if test_chances else 0.0,
        "majority": round(majority, 4),
        "answer_vocab": len(all_answers),
    }


def _generate_pretrain(w: _Writer, spec: SynthSpec) -> int:
    records = []

    def add(rid: str, canvas: np.ndarray, turns: list[tuple[str, str]]) -> None:
        image = f"pretrain/{rid}.png"
        w.write(f"{IMAGES_DIR}/{image}", png_bytes(canvas))
        records.append(_train_record(rid, image, turns, prompt=None))

    rng = _rng(spec.seed, "pretrain")
    for i in range(spec.pretrain_records):
        add(f"pretrain_{i:05d}", *pretrain_sample(rng, spec.image_size, spec.generic_instructions))
    for task in (t for t in SKILL_TASKS if t in spec.tasks):
        rng = _rng(spec.seed, f"pretrain-skill/{task}")  # never a train/test stream
        for i in range(spec.pretrain_skill_per_task):
            add(f"pretrain_{task.lower()}_{i:05d}", *skill_sample(rng, task, spec.image_size))
    w.write_json(PRETRAIN_FILE, records)
    return sum(len(r["conversations"]) // 2 for r in records)


def pretrain_records(spec: SynthSpec) -> int:
    """Records in the pre-training corpus: generic + skill records."""
    return spec.pretrain_records + spec.pretrain_skill_per_task * sum(t in spec.tasks for t in SKILL_TASKS)


def _existing(out_root: Path) -> dict | None:
    try:
        doc = json.loads((out_root / SPEC_FILE).read_text())
    except FileNotFoundError:
        return None
    except ValueError as e:
        raise SynthSpecMismatch(f"{out_root}: unreadable {SPEC_FILE} ({e}); delete the directory to regenerate") from e
    if not isinstance(doc, dict) or not isinstance(doc.get("files"), dict):
        raise SynthSpecMismatch(f"{out_root}: {SPEC_FILE} is not a CoIN-synth spec file; "
                                "delete the directory to regenerate")
    return doc


def _complete(out_root: Path, hashes: dict[str, str]) -> bool:
    for rel, digest in hashes.items():
        try:
            if hashlib.sha256((out_root / rel).read_bytes()).hexdigest() != digest:
                return False
        except FileNotFoundError:
            return False
    return True


def generate_benchmark(out_root: Path, spec: SynthSpec = SynthSpec()) -> dict:
    """Write the CoIN-synth benchmark and pre-training corpus under ``out_root``; return a summary.

    Idempotent: if ``out_root/SPEC.json`` records the same spec and every listed file still has its
    recorded sha256, nothing is written and the stored summary is returned (``reused: True``).
    A directory generated from a different spec raises :class:`SynthSpecMismatch` (delete it or pick
    another directory); a same-spec directory with missing or changed files is regenerated.

    Summary keys: root, instructions_root, image_root, pretrain_file, counts ({task: {split:
    {records, turns}}}), pretrain ({records, turns}), chance ({task: mean score of a uniform guess
    over each test question's answer type}), majority ({task: score of always giving the most
    common test answer}), answer_vocab ({task: distinct train+test answers}), files, seconds, reused.
    """
    out_root = Path(out_root)
    doc = _spec_doc(spec)
    old = _existing(out_root)
    if old is not None:
        if old.get("spec") != doc:
            raise SynthSpecMismatch(
                f"{out_root} already holds a CoIN-synth benchmark for spec {old.get('spec')}, "
                f"not {doc}; delete it or generate into another directory"
            )
        if _complete(out_root, old["files"]):
            return {**_paths(out_root), **old["summary"], "seconds": 0.0, "reused": True}
        (out_root / SPEC_FILE).unlink(missing_ok=True)  # incomplete: regenerate, SPEC.json is written last again

    start = time.perf_counter()
    w = _Writer(out_root)
    counts, stats = {}, {}
    try:
        for task in spec.tasks:
            counts[task] = {}
            counts[task]["train"], _, train_answers = _generate_task(w, spec, task, "train")
            counts[task]["test"], test_chances, test_answers = _generate_task(w, spec, task, "test")
            stats[task] = _task_stats(test_chances, test_answers, set(train_answers) | set(test_answers))
        pretrain_turns = _generate_pretrain(w, spec)
    finally:
        w.close()
    summary = {  # stored in SPEC.json: nothing here may depend on the directory or the clock
        "counts": counts,
        "pretrain": {"records": pretrain_records(spec), "turns": pretrain_turns},
        "chance": {t: v["chance"] for t, v in stats.items()},
        "majority": {t: v["majority"] for t, v in stats.items()},
        "answer_vocab": {t: v["answer_vocab"] for t, v in stats.items()},
        "files": len(w.hashes) + 1,
    }
    # SPEC.json last, after every other file is in place: its presence means "complete"
    spec_json = json.dumps({"spec": doc, "files": dict(sorted(w.hashes.items())), "summary": summary},
                           sort_keys=True, indent=1)
    _atomic_write(out_root / SPEC_FILE, (spec_json + "\n").encode())
    return {**_paths(out_root), **summary, "seconds": round(time.perf_counter() - start, 2), "reused": False}


def _paths(out_root: Path) -> dict:
    return {
        "root": str(out_root),
        "instructions_root": str(out_root / INSTRUCTIONS_DIR),
        "image_root": str(out_root / IMAGES_DIR),
        "pretrain_file": str(out_root / PRETRAIN_FILE),
    }


def benchmark_texts(out_root: Path) -> Iterator[str]:
    """Every human and gpt text of the benchmark and the pre-training corpus, in file order.

    Human turns come without the "<image>" placeholder (as in schema rows); test files contribute
    "text", "answer", every entry of "answers" and "answer_bbox".
    """
    out_root = Path(out_root)
    files = sorted((out_root / INSTRUCTIONS_DIR).glob("*/*.json")) + [out_root / PRETRAIN_FILE]
    for path in files:
        for rec in json.loads(path.read_text()):
            if "conversations" in rec:
                for turn in rec["conversations"]:
                    yield turn["value"].replace(IMAGE_TOKEN, "").strip("\n")
            else:
                yield rec["text"]
                for key in ("answer", "answer_bbox"):
                    if key in rec:
                        yield rec[key]
                yield from rec.get("answers", [])


def main(argv: list[str] | None = None) -> None:
    """``python -m pipeline.data.synth OUT_DIR [--seed N ...]``: generate and print the summary."""
    import argparse

    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("out_root", type=Path)
    defaults = SynthSpec()
    for name in ("seed", "image_size", "train_per_task", "test_per_task", "pretrain_records", "pretrain_skill_per_task"):
        parser.add_argument(f"--{name.replace('_', '-')}", type=int, default=getattr(defaults, name))
    parser.add_argument("--tasks", nargs="+", default=list(defaults.tasks))
    parser.add_argument("--generic-instructions", action="store_true",
                        help="generic pre-training records also use LLaVA-1.5's two generic instructions")
    args = vars(parser.parse_args(argv))
    out_root = args.pop("out_root")
    print(json.dumps(generate_benchmark(out_root, SynthSpec(**{**args, "tasks": tuple(args["tasks"])})), indent=1))


if __name__ == "__main__":
    main()
