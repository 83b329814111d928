"""CoIN-synth generator: determinism, layout, record formats, pixel-checked boxes, idempotency."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import re
import subprocess
import sys
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from pipeline.scoring import scorers
from pipeline.data.coin import CoinSource, load_records
from pipeline.data.schema import COIN_TASKS, IMAGE_TOKEN, TASK_FILES
from pipeline.data.synth import (
    INSTRUCTION_SUFFIXES,
    SynthSpec,
    SynthSpecMismatch,
    benchmark_texts,
    generate_benchmark,
    pretrain_records,
)
from pipeline.data.synth_pretrain import GENERIC_INSTRUCTIONS, LOCATE_QUESTIONS, SKILL_TASKS
from pipeline.data.synth_render import COLORS
from pipeline.data.synth_tasks import (
    GROUNDING_PREFIX,
    IMAGENET_CLASSES,
    IMAGENET_QUESTION,
    LETTER,
    SHORT,
    UNANSWERABLE,
)

SPEC = SynthSpec(seed=3, train_per_task=48, test_per_task=16, pretrain_records=80, pretrain_skill_per_task=12)
BOX = re.compile(r"^\[(\d\.\d\d), (\d\.\d\d), (\d\.\d\d), (\d\.\d\d)\]$")


def tree_hashes(root: Path) -> dict[str, str]:
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


def load(root: Path, task: str, split: str) -> list[dict]:
    return json.loads((root / "Instructions_Original" / TASK_FILES[task][split]).read_text())


@pytest.fixture(scope="module")
def bench(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("synth") / "a"
    generate_benchmark(root, SPEC)
    return root


# ---- determinism --------------------------------------------------------------------------


def test_same_seed_gives_byte_identical_files(bench, tmp_path):
    generate_benchmark(tmp_path / "b", SPEC)
    a, b = tree_hashes(bench), tree_hashes(tmp_path / "b")
    assert a == b
    recorded = json.loads((bench / "SPEC.json").read_text())["files"]
    assert recorded == {k: v for k, v in a.items() if k != "SPEC.json"}


def test_same_bytes_in_another_process_with_another_hash_seed(tmp_path):
    """Nothing may depend on set/dict hash order or on the process (CLI run, PYTHONHASHSEED=7)."""
    args = ["--seed", "9", "--train-per-task", "5", "--test-per-task", "5", "--pretrain-records", "10", "--pretrain-skill-per-task", "2"]
    env = {**os.environ, "PYTHONHASHSEED": "7", "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    subprocess.run([sys.executable, "-m", "pipeline.data.synth", str(tmp_path / "cli"), *args],
                   check=True, env=env, capture_output=True)
    generate_benchmark(tmp_path / "here", SynthSpec(seed=9, train_per_task=5, test_per_task=5, pretrain_records=10, pretrain_skill_per_task=2))
    assert tree_hashes(tmp_path / "cli") == tree_hashes(tmp_path / "here")


def test_different_seed_gives_different_files(tmp_path):
    small = dict(train_per_task=6, test_per_task=6, pretrain_records=20, pretrain_skill_per_task=2)
    generate_benchmark(tmp_path / "a", SynthSpec(seed=0, **small))
    generate_benchmark(tmp_path / "c", SynthSpec(seed=1, **small))
    a, c = tree_hashes(tmp_path / "a"), tree_hashes(tmp_path / "c")
    assert a.keys() == c.keys()
    json_files = [k for k in a if k.endswith(".json")]
    assert all(a[k] != c[k] for k in json_files)
    images = [k for k in a if k.endswith(".png")]
    assert sum(a[k] == c[k] for k in images) < len(images) // 20


# ---- layout and counts ----------------------------------------------------------------------


def test_layout_counts_and_images(bench):
    for task in COIN_TASKS:
        for split, n in (("train", SPEC.train_per_task), ("test", SPEC.test_per_task)):
            records = load(bench, task, split)
            assert len(records) == n, (task, split)
            for rec in records:
                assert rec["image"] == f"{task}/{split}/{rec.get('id', rec.get('question_id'))}.png"
                assert (bench / "images" / rec["image"]).is_file()
    pre = json.loads((bench / "pretrain" / "train.json").read_text())
    assert len(pre) == pretrain_records(SPEC) == SPEC.pretrain_records + len(SKILL_TASKS) * SPEC.pretrain_skill_per_task
    assert all((bench / "images" / r["image"]).is_file() for r in pre)
    with Image.open(bench / "images" / pre[0]["image"]) as im:
        assert im.mode == "RGB" and im.size == (SPEC.image_size, SPEC.image_size)
    images = list((bench / "images").rglob("*.png"))
    assert len(images) == len(COIN_TASKS) * (SPEC.train_per_task + SPEC.test_per_task) + len(pre)


def test_summary_reports_counts_chance_and_vocab(tmp_path):
    spec = SynthSpec(seed=1, train_per_task=2, test_per_task=24, pretrain_records=4, pretrain_skill_per_task=1)
    s = generate_benchmark(tmp_path, spec)
    assert not s["reused"]
    assert s["counts"]["GQA"]["test"]["records"] == 24
    assert s["pretrain"]["records"] == 4 + len(SKILL_TASKS)
    assert Path(s["instructions_root"]).name == "Instructions_Original"
    for task in COIN_TASKS:
        assert 0.0 < s["chance"][task] < 0.5, task
        assert s["answer_vocab"][task] >= 4, task
    assert s["chance"]["TextVQA"] == pytest.approx(1 / 20, abs=1e-4)
    assert s["chance"]["ImageNet"] == pytest.approx(1 / len(IMAGENET_CLASSES), abs=1e-4)


# ---- record formats -------------------------------------------------------------------------


def test_train_records_are_llava_conversations(bench):
    multi_turn = Counter()
    for task in COIN_TASKS:
        suffix = INSTRUCTION_SUFFIXES[task]
        for rec in load(bench, task, "train"):
            conv = rec["conversations"]
            assert [t["from"] for t in conv] == ["human", "gpt"] * (len(conv) // 2)
            assert conv[0]["value"].startswith(IMAGE_TOKEN + "\n")
            assert all(IMAGE_TOKEN not in t["value"] for t in conv[1:])
            for human in conv[0::2]:
                if task == "Grounding":
                    assert human["value"].split("\n")[-1].startswith(suffix + " the ")
                else:
                    assert human["value"].endswith("\n" + suffix)
            assert all(0 < len(t["value"].split()) <= 4 for t in conv[1::2])  # short answers
            multi_turn[task] += len(conv) > 2
    assert multi_turn["GQA"] > 0 and multi_turn["VQAv2"] > 0
    assert sum(multi_turn.values()) == multi_turn["GQA"] + multi_turn["VQAv2"]


def test_test_records_have_what_their_scorer_needs(bench):
    for task in COIN_TASKS:
        records = load(bench, task, "test")
        assert len({r["question_id"] for r in records}) == len(records)
        for rec in records:
            assert IMAGE_TOKEN not in rec["text"]
            if task == "Grounding":
                assert "answer" not in rec
                assert rec["size"] == [SPEC.image_size, SPEC.image_size]
                assert rec["text"].startswith(INSTRUCTION_SUFFIXES[task] + " the ")
                assert BOX.match(rec["answer_bbox"]), rec["answer_bbox"]
                continue
            suffix = INSTRUCTION_SUFFIXES[task]
            assert rec["text"] == suffix if task == "ImageNet" else rec["text"].endswith("\n" + suffix)
            assert isinstance(rec["answer"], str) and rec["answer"]
            if task == "ScienceQA":
                options = re.findall(r"^([A-D])\. ", rec["text"], re.M)
                assert options == list("ABCD"[: len(options)]) and len(options) >= 2
                assert rec["answer"] in options
            if task == "TextVQA":
                assert len(rec["answers"]) == 10
                assert Counter(rec["answers"]).most_common(1)[0] == (rec["answer"], max(Counter(rec["answers"]).values()))
            if task == "ImageNet":
                assert rec["answer"] in IMAGENET_CLASSES
    textvqa = load(bench, "TextVQA", "test")
    assert any(len(set(r["answers"])) > 1 for r in textvqa)  # variants make soft accuracy matter


def test_oracle_scores_100_and_a_wrong_answer_scores_0(bench):
    for task in COIN_TASKS:
        records = load(bench, task, "test")
        oracle = {r["question_id"]: r.get("answer_bbox", r.get("answer")) for r in records}
        assert scorers.score_task(task, records, oracle).score == pytest.approx(100.0), task
        wrong = {qid: "[0.00, 0.00, 0.01, 0.01]" if task == "Grounding" else "zebra" for qid in oracle}
        assert scorers.score_task(task, records, wrong).score == 0.0, task


def test_vizwiz_has_some_unanswerable(bench):
    answers = [r["answer"] for r in load(bench, "VizWiz", "test")]
    answers += [r["conversations"][1]["value"] for r in load(bench, "VizWiz", "train")]
    share = answers.count(UNANSWERABLE) / len(answers)
    assert 0.1 <= share <= 0.45, share


# ---- Grounding boxes against the pixels ----------------------------------------------------


def components(mask: np.ndarray) -> list[np.ndarray]:
    """4-connected components of a boolean mask, each as an (n, 2) array of (row, col)."""
    seen = np.zeros_like(mask)
    out = []
    for start in zip(*np.nonzero(mask)):
        if seen[start]:
            continue
        stack, pixels = [start], []
        seen[start] = True
        while stack:
            r, c = stack.pop()
            pixels.append((r, c))
            for rr, cc in ((r + 1, c), (r - 1, c), (r, c + 1), (r, c - 1)):
                if 0 <= rr < mask.shape[0] and 0 <= cc < mask.shape[1] and mask[rr, cc] and not seen[rr, cc]:
                    seen[rr, cc] = True
                    stack.append((rr, cc))
        out.append(np.array(pixels))
    return out


def check_box(image: np.ndarray, box: str, description: str) -> None:
    """The box is well formed and is the tight box of one object, of the described colour."""
    x1, y1, x2, y2 = (float(v) for v in BOX.match(box).groups())
    assert 0.0 <= x1 < x2 <= 1.0 and 0.0 <= y1 < y2 <= 1.0, box
    size = image.shape[0]
    # background = most common unsaturated colour (flat light backdrop + tiny noise); objects are
    # saturated, and large ones can cover more of the image than the backdrop
    flat = image.reshape(-1, 3).astype(int)
    quant = (flat[flat.max(1) - flat.min(1) < 40] // 16)
    values, counts = np.unique(quant, axis=0, return_counts=True)
    bg = values[counts.argmax()].astype(int) * 16 + 8
    objects = np.abs(image.astype(int) - bg).max(axis=2) > 48
    # the object whose pixel bounds, normalised and rounded outwards, give exactly this box
    found = []
    for pix in components(objects):
        r0, c0 = pix.min(0)
        r1, c1 = pix.max(0) + 1
        lo = [np.floor(v * 100 / size) / 100 for v in (c0, r0)]
        hi = [np.ceil(v * 100 / size) / 100 for v in (c1, r1)]
        if np.allclose(lo + hi, [x1, y1, x2, y2]):
            found.append(pix)
    assert len(found) == 1, (box, description)
    # every pixel of it lies inside the box (in pixel units)
    rows, cols = found[0][:, 0], found[0][:, 1]
    assert cols.min() >= x1 * size - 1e-6 and cols.max() + 1 <= x2 * size + 1e-6
    assert rows.min() >= y1 * size - 1e-6 and rows.max() + 1 <= y2 * size + 1e-6
    named = [c for c in COLORS if f" {c} " in f" {description} "]
    if named:
        mean = image[rows, cols].astype(float).mean(0)
        nearest = min(COLORS, key=lambda c: np.abs(np.array(COLORS[c]) - mean).sum())
        assert nearest == named[0], (box, description, mean)


def test_grounding_boxes_enclose_the_described_object(bench):
    checked = 0
    for split in ("train", "test"):
        for rec in load(bench, "Grounding", split):
            if split == "train":
                text, box = rec["conversations"][0]["value"], rec["conversations"][1]["value"]
            else:
                text, box = rec["text"], rec["answer_bbox"]
            description = text.split(INSTRUCTION_SUFFIXES["Grounding"])[1].strip(" .")
            image = np.asarray(Image.open(bench / "images" / rec["image"]).convert("RGB"))
            check_box(image, box, description)
            checked += 1
    assert checked == SPEC.train_per_task + SPEC.test_per_task


def test_grounding_boxes_at_64_pixels(tmp_path):
    spec = SynthSpec(seed=5, image_size=64, train_per_task=12, test_per_task=12, pretrain_records=2,
                     tasks=("Grounding",))
    generate_benchmark(tmp_path, spec)
    for rec in load(tmp_path, "Grounding", "test"):
        image = np.asarray(Image.open(tmp_path / "images" / rec["image"]).convert("RGB"))
        assert image.shape == (64, 64, 3) and rec["size"] == [64, 64]
        check_box(image, rec["answer_bbox"], rec["text"].split(":")[1].strip(" ."))


# ---- pre-training corpus --------------------------------------------------------------------


def _is_generic(rec: dict) -> bool:
    """A generic pre-training record (``pretrain_00012``), not a skill record (``pretrain_gqa_00012``)."""
    return re.fullmatch(r"pretrain_\d{5}", rec["id"]) is not None


def _assert_skills_taught_and_no_boxes(pre: list[dict], answers: Counter) -> None:
    # Grounding's box format is never taught; locating is, in the corpus's corner convention
    assert not any(a.startswith("[") for a in answers)
    assert any(CORNERS.fullmatch(a) for a in answers)
    # the skill records carry the tasks' answer conventions (letters, class names, "unanswerable")
    assert {"A", "B", "C"} <= set(answers) and set(IMAGENET_CLASSES) & set(answers) and UNANSWERABLE in answers
    assert set(COLORS) & set(answers) and {"yes", "no"} <= set(answers)
    per_task = Counter(r["id"].rsplit("_", 1)[0] for r in pre)
    for task in SKILL_TASKS:
        assert per_task[f"pretrain_{task.lower()}"] == SPEC.pretrain_skill_per_task


CORNERS = re.compile(r"\((\d\.\d\d), (\d\.\d\d)\) to \((\d\.\d\d), (\d\.\d\d)\)")


def test_the_corpus_locates_grounding_expressions_with_corners_that_enclose_the_object(bench):
    pre = [r for r in json.loads((bench / "pretrain" / "train.json").read_text())
           if r["id"].startswith("pretrain_grounding")]
    assert len(pre) == SPEC.pretrain_skill_per_task
    for rec in pre:
        question, answer = (t["value"] for t in rec["conversations"])
        assert not question.startswith(IMAGE_TOKEN + "\n" + INSTRUCTION_SUFFIXES["Grounding"])
        text = question.removeprefix(IMAGE_TOKEN + "\n")
        description = next(m["thing"] for q in LOCATE_QUESTIONS
                           if (m := re.fullmatch(re.escape(q).replace(re.escape("{thing}"), "(?P<thing>.+)"), text)))
        image = np.asarray(Image.open(bench / "images" / rec["image"]).convert("RGB"))
        x1, y1, x2, y2 = CORNERS.fullmatch(answer).groups()
        check_box(image, f"[{x1}, {y1}, {x2}, {y2}]", description)


def test_pretrain_teaches_skills_but_never_coin_instructions_or_boxes(bench):
    pre = json.loads((bench / "pretrain" / "train.json").read_text())
    suffix_lines = {line for s in INSTRUCTION_SUFFIXES.values() for line in s.split("\n")}
    test_texts = {rec["text"] for task in COIN_TASKS for rec in load(bench, task, "test")}
    train_images = {rec["image"] for task in COIN_TASKS for split in ("train", "test") for rec in load(bench, task, split)}
    answers = Counter()
    for rec in pre:
        conv = rec["conversations"]
        assert conv[0]["value"].startswith(IMAGE_TOKEN + "\n")
        assert rec["image"].startswith("pretrain/") and rec["image"] not in train_images
        for human in conv[0::2]:
            text = human["value"].replace(IMAGE_TOKEN + "\n", "")
            # CoIN's instruction texts are met first in continual tuning
            assert not any(line in text for line in suffix_lines), text
            assert text not in test_texts, text
        answers.update(t["value"] for t in conv[1::2])
    _assert_skills_taught_and_no_boxes(pre, answers)


def test_generic_instructions_appear_only_on_generic_records_and_only_the_generic_ones(tmp_path, bench):
    default_bench, bench = bench, tmp_path / "gi"
    summary = generate_benchmark(bench, dataclasses.replace(SPEC, generic_instructions=True))
    assert json.loads((bench / "SPEC.json").read_text())["spec"]["generic_instructions"] is True, summary
    # only the generic records change: the task streams and the skill records are the same files
    a, b = tree_hashes(bench), tree_hashes(default_bench)
    changed = {k for k in a if a[k] != b.get(k)}
    assert changed and all(k in ("SPEC.json", "pretrain/train.json") or re.fullmatch(r"images/pretrain/pretrain_\d{5}\.png", k)
                           for k in changed), sorted(changed)[:5]
    pre = json.loads((bench / "pretrain" / "train.json").read_text())
    generic_lines = set(GENERIC_INSTRUCTIONS)
    task_lines = {line for s in INSTRUCTION_SUFFIXES.values() for line in s.split("\n")} - generic_lines
    assert task_lines == {IMAGENET_QUESTION, GROUNDING_PREFIX}
    test_texts = {rec["text"] for task in COIN_TASKS for rec in load(bench, task, "test")}
    train_images = {rec["image"] for task in COIN_TASKS for split in ("train", "test") for rec in load(bench, task, split)}
    answers, instructed = Counter(), Counter()
    for rec in pre:
        conv = rec["conversations"]
        generic = _is_generic(rec)
        assert conv[0]["value"].startswith(IMAGE_TOKEN + "\n")
        assert rec["image"].startswith("pretrain/") and rec["image"] not in train_images
        for human, gpt in zip(conv[0::2], conv[1::2]):
            text = human["value"].replace(IMAGE_TOKEN + "\n", "")
            lines = text.split("\n")
            # task-specific instructions are met first in continual tuning
            assert not any(line in text for line in task_lines), text
            assert text not in test_texts, text
            if generic:  # LLaVA-1.5's two generic instructions: only as the last line
                for line in generic_lines & set(lines):
                    assert lines[-1] == line, text
                    instructed[line] += 1
                if lines[-1] == LETTER:  # the answer is the letter of a listed option
                    assert f"{gpt['value']}. " in text and re.fullmatch("[A-D]", gpt["value"]), (text, gpt)
            else:  # skill records never carry a CoIN instruction
                assert not generic_lines & set(lines), text
        answers.update(t["value"] for t in conv[1::2])
    turns = sum(len(r["conversations"]) // 2 for r in pre if _is_generic(r))
    assert 0.1 * turns < instructed[SHORT] < 0.6 * turns and 0.03 * turns < instructed[LETTER] < 0.3 * turns
    _assert_skills_taught_and_no_boxes(pre, answers)


def test_benchmark_texts_cover_questions_and_answers(bench):
    texts = list(benchmark_texts(bench))
    assert all(isinstance(t, str) and IMAGE_TOKEN not in t for t in texts)
    vocab = set(texts)
    for task in COIN_TASKS:
        for rec in load(bench, task, "test"):
            assert rec["text"] in vocab
            assert rec.get("answer_bbox", rec.get("answer")) in vocab
    assert "Describe the image." in vocab or "Write a caption for the picture." in vocab


# ---- idempotency ----------------------------------------------------------------------------


def test_rerun_with_same_spec_rewrites_nothing(bench):
    before = {p: p.stat().st_mtime_ns for p in bench.rglob("*")}
    summary = generate_benchmark(bench, SPEC)
    assert summary["reused"]
    assert {p: p.stat().st_mtime_ns for p in bench.rglob("*")} == before


def test_different_spec_in_same_dir_raises_naming_it(bench):
    other = SynthSpec(**{**SPEC.__dict__, "train_per_task": 47})
    with pytest.raises(SynthSpecMismatch, match=re.escape(str(bench))):
        generate_benchmark(bench, other)


def test_damaged_benchmark_is_regenerated(tmp_path):
    spec = SynthSpec(seed=2, train_per_task=4, test_per_task=4, pretrain_records=4, pretrain_skill_per_task=2)
    generate_benchmark(tmp_path, spec)
    before = tree_hashes(tmp_path)
    (tmp_path / "images" / "GQA" / "test" / "gqa_test_00001.png").unlink()
    (tmp_path / "Instructions_Original" / "VizWiz" / "val.json").write_text("[]")
    assert not generate_benchmark(tmp_path, spec)["reused"]
    assert tree_hashes(tmp_path) == before


def test_spec_validation():
    with pytest.raises(ValueError, match="multiple of 32"):
        SynthSpec(image_size=40)
    with pytest.raises(ValueError, match="unknown"):
        SynthSpec(tasks=("ScienceQA", "MNIST"))


# ---- round trip through the CoIN reader -----------------------------------------------------


def test_round_trip_through_coin_reader(bench):
    source = CoinSource(str(bench / "Instructions_Original"), str(bench / "images"))
    for task in COIN_TASKS:
        for split, n in (("train", SPEC.train_per_task), ("test", SPEC.test_per_task)):
            result = load_records(source, task, split)
            # every record passes its task's answer-format checks, without a warning
            assert len(result.rows) == n and not result.bad and not result.warnings, (task, split, result.warnings[:3])
            row = result.rows[0]
            assert row["task"] == task and row["image_path"].startswith(f"{task}/{split}/")
            if split == "test" and task == "Grounding":
                assert row["answer_bbox"] and row["size"] == [SPEC.image_size] * 2
            elif split == "test":
                assert row["answer"]
            else:
                assert len(row["gpt_turns"]) == len(row["human_turns"]) >= 1
