"""The CoIN reader on small hand-made files in the real CoIN format (local folder).

``write_coin_layout`` is shared with the S3 and CLI tests.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from PIL import Image

from pipeline.data.coin import (
    CoinSource,
    DataError,
    iter_decoded,
    load_records,
    strip_image_token,
)
from pipeline.data.schema import ROW_COLUMNS, TASK_FILES
from stages.datasets import read_dataset
from tests.helpers import COLORS, GOOD, TEN, write_coin_layout

@pytest.fixture
def layout(tmp_path: Path) -> CoinSource:
    return write_coin_layout(tmp_path)


def base_row(**kw: Any) -> dict[str, Any]:
    row = {"answer": "", "answers": [], "answer_bbox": "", "size": [], "gpt_turns": []}
    row.update(kw)
    return row


def test_train_rows_multi_turn(layout: CoinSource) -> None:
    result = load_records(layout, "ScienceQA", "train")
    assert result.bad == [] and result.total == 2
    assert result.file == f"{layout.instructions_root}/ScienceQA/train.json"
    assert result.rows == [
        base_row(task="ScienceQA", split="train", id="sqa-1", index=0, image_path="sqa/1.png",
                 human_turns=["Which color?\nA. red\nB. blue\nAnswer with the option's letter from the given choices directly."],
                 gpt_turns=["A"],
                 instruction="Which color?\nA. red\nB. blue\nAnswer with the option's letter from the given choices directly."),
        base_row(task="ScienceQA", split="train", id="sqa-2", index=1, image_path="sqa/2.png",
                 human_turns=["What is shown?", "And its color?"], gpt_turns=["A leaf.", "Green."],
                 instruction="What is shown?"),
    ]
    assert all(tuple(r) == ROW_COLUMNS for r in result.rows)


def test_test_rows_answers_bbox_and_int_ids(layout: CoinSource) -> None:
    sqa = load_records(layout, "ScienceQA", "test").rows
    assert [r["id"] for r in sqa] == ["q1", "2"]
    assert sqa[0]["human_turns"] == ["Which is blue?\nA. sky\nB. grass"] and sqa[0]["gpt_turns"] == []
    assert sqa[0]["instruction"] == sqa[0]["human_turns"][0]
    text = load_records(layout, "TextVQA", "test").rows
    assert text[0]["answers"] == TEN and text[0]["answer"] == "nike"
    assert text[1]["answers"] == [] and text[1]["answer"] == "7"
    (ref,) = load_records(layout, "Grounding", "test").rows
    assert ref == base_row(task="Grounding", split="test", id="r1", index=0, image_path="ref/g.png",
                           human_turns=["Please provide the bounding box coordinate of the region this sentence describes: cat."],
                           instruction="Please provide the bounding box coordinate of the region this sentence describes: cat.",
                           answer_bbox="[0.123, 0.2, 0.5, 0.987]", size=[16, 12])
    for row in sqa + text + [ref]:
        assert set(row) == set(ROW_COLUMNS)


@pytest.mark.parametrize("raw, want", [("<image>\nQ?", "Q?"), ("Q?\n<image>", "Q?"), ("<image>Q?", "Q?"), ("Q?", "Q?")])
def test_strip_image_token(raw: str, want: str) -> None:
    assert strip_image_token(raw) == want


def _train(records: list) -> dict[str, Any]:
    return {"ScienceQA/train.json": records}




def _with(**changes: Any) -> dict:
    rec = json.loads(json.dumps(GOOD))
    for key, value in changes.items():
        if value is None:
            rec.pop(key)
        else:
            rec[key] = value
    return rec


# (files, task, split, expected index, id, field, words in the reason)
BAD_CASES = [
    ("missing-file", {}, "ScienceQA", "train", None, None, None, "file not found"),
    ("not-a-list", _train({"a": 1}), "ScienceQA", "train", None, None, None, "JSON list"),
    ("invalid-json", {"ScienceQA/train.json": "[{"}, "ScienceQA", "train", None, None, None, "invalid JSON"),
    ("empty", _train([]), "ScienceQA", "train", None, None, None, "empty train split"),
    ("not-object", _train([GOOD, "oops"]), "ScienceQA", "train", 1, None, "(record)", "JSON object"),
    ("missing-id", _train([GOOD, _with(id=None)]), "ScienceQA", "train", 1, None, "id", "missing"),
    ("bad-id", _train([_with(id=["x"])]), "ScienceQA", "train", 0, None, "id", "string or integer"),
    ("no-conv", _train([GOOD, _with(id="b", conversations=None)]), "ScienceQA", "train", 1, "b", "conversations", "missing"),
    ("bad-from", _train([_with(conversations=[{"from": "human", "value": "Q"}, {"from": "bot", "value": "A"}])]),
     "ScienceQA", "train", 0, "ok", "conversations[1].from", "expected 'gpt'"),
    ("bad-value", _train([_with(conversations=[{"from": "human", "value": 3}, {"from": "gpt", "value": "A"}])]),
     "ScienceQA", "train", 0, "ok", "conversations[0].value", "string"),
    ("odd-turns", _train([_with(conversations=[{"from": "human", "value": "Q"}])]), "ScienceQA", "train", 0, "ok",
     "conversations", "gpt reply"),
    ("absolute", _train([GOOD, _with(id="c", image="/etc/passwd")]), "ScienceQA", "train", 1, "c", "image", "absolute"),
    ("dotdot", _train([_with(id="d", image="sqa/../../secret.png")]), "ScienceQA", "train", 0, "d", "image", "'..'"),
    ("no-image-file", _train([GOOD, _with(id="e", image="sqa/404.png")]), "ScienceQA", "train", 1, "e", "image", "not found"),
    ("dup-id", _train([GOOD, GOOD]), "ScienceQA", "train", 1, "ok", "id", "duplicate id, first at record 0"),
    ("test-no-answer", {"GQA/test.json": [{"question_id": 5, "image": "sqa/1.png", "text": "Q"}]}, "GQA", "test", 0, "5", "answer", "missing"),
    ("test-no-text", {"GQA/test.json": [{"question_id": 5, "image": "sqa/1.png", "answer": "x"}]}, "GQA", "test", 0, "5", "text", "missing"),
    ("test-answers-type", {"TextVQA/val.json": [{"question_id": 5, "text": "Q", "answers": "nike"}]}, "TextVQA", "test", 0, "5",
     "answers", "list of strings"),
    ("test-dup", {"GQA/test.json": [{"question_id": 5, "text": "Q", "answer": "x"}, {"question_id": "5", "text": "Q", "answer": "y"}]},
     "GQA", "test", 1, "5", "question_id", "duplicate"),
    ("bbox", {"Grounding/test.json": [{"question_id": "r", "text": "Q", "answer_bbox": "[0.1, 0.2, 0.3]", "size": [4, 4]}]},
     "Grounding", "test", 0, "r", "answer_bbox", "not a box"),
    ("size", {"Grounding/test.json": [{"question_id": "r", "text": "Q", "answer_bbox": "[0, 0, 1, 1]", "size": [4]}]},
     "Grounding", "test", 0, "r", "size", "[width, height]"),
    # answers checked against the task's answer format (the scorer's validate)
    ("empty-target", _train([GOOD, _with(id="e", conversations=[{"from": "human", "value": "Q"}, {"from": "gpt", "value": " "}])]),
     "ScienceQA", "train", 1, "e", "conversations[1].value", "empty target"),
    ("empty-2nd-target", {"GQA/train.json": [_with(id="g", conversations=[
        {"from": "human", "value": "Q"}, {"from": "gpt", "value": "yes"}, {"from": "human", "value": "Q2"}, {"from": "gpt", "value": ""}])]},
     "GQA", "train", 0, "g", "conversations[3].value", "empty target"),
    ("letter-out-of-range", _train([_with(id="l", conversations=[{"from": "human", "value": "Q?\nA. x\nB. y"}, {"from": "gpt", "value": "C"}])]),
     "ScienceQA", "train", 0, "l", "conversations[1].value", "option C is out of range: the question lists A-B"),
    ("test-empty-answer", {"GQA/test.json": [{"question_id": 5, "text": "Q", "answer": "  "}]}, "GQA", "test", 0, "5",
     "answer", "empty answer: the record can never be scored"),
    ("test-not-a-letter", {"ScienceQA/test.json": [{"question_id": "s", "text": "Q?\nA. x\nB. y", "answer": "blue"}]},
     "ScienceQA", "test", 0, "s", "answer", "'blue' is not an option letter: the record can never be scored"),
    ("test-letter-out-of-range", {"ScienceQA/test.json": [{"question_id": "s", "text": "Q?\nA. x\nB. y\nC. z", "answer": "D"}]},
     "ScienceQA", "test", 0, "s", "answer", "option D is out of range: the question lists A-C"),
    ("test-answers-all-empty", {"TextVQA/val.json": [{"question_id": 5, "text": "Q", "answer": "", "answers": [""] * 10}]},
     "TextVQA", "test", 0, "5", "answers", "every one of the 10 answers is empty"),
    ("bbox-out-of-range", {"Grounding/test.json": [{"question_id": "r", "text": "Q", "answer_bbox": "[0.1, 0.2, 1.3, 0.9]", "size": [4, 4]}]},
     "Grounding", "test", 0, "r", "answer_bbox", "out of range"),
    ("bbox-inverted", {"Grounding/test.json": [{"question_id": "r", "text": "Q", "answer_bbox": "[0.5, 0.2, 0.1, 0.9]", "size": [4, 4]}]},
     "Grounding", "test", 0, "r", "answer_bbox", "encloses nothing"),
    ("bbox-five-numbers", {"Grounding/test.json": [{"question_id": "r", "text": "Q", "answer_bbox": "[0, 0, 1, 1, 1]", "size": [4, 4]}]},
     "Grounding", "test", 0, "r", "answer_bbox", "not a box"),
    ("train-box-out-of-range", {"Grounding/train.json": [_with(id="t", conversations=[
        {"from": "human", "value": "Q"}, {"from": "gpt", "value": "[-0.1, 0.2, 0.5, 0.9]"}])]},
     "Grounding", "train", 0, "t", "conversations[1].value", "out of range"),
]


@pytest.mark.parametrize("case", BAD_CASES, ids=[c[0] for c in BAD_CASES])
def test_bad_input_names_file_record_and_field(tmp_path: Path, case: tuple) -> None:
    _, files, task, split, index, rid, field, reason = case
    source = write_coin_layout(tmp_path, files)
    with pytest.raises(DataError) as info:
        load_records(source, task, split)
    e = info.value
    name = TASK_FILES[task][split]
    assert e.file == f"{source.instructions_root}/{name}"
    assert (e.index, e.id, e.field) == (index, rid, field)
    assert reason in e.reason
    message = str(e)
    assert e.file in message and reason in message
    if index is not None:
        assert f"record {index} (id={rid if rid is not None else '?'})" in message
    if field is not None:
        assert f"field '{field}'" in message


# ---- image paths stay inside the image root ---------------------------------------------------


def _escape_layout(tmp_path: Path) -> tuple[CoinSource, list[dict]]:
    """A layout whose image root holds a link to a file outside it, a link to a folder outside it
    and a link that stays inside; the records try every way out (and the harmless link)."""
    source = write_coin_layout(tmp_path, {})
    images, outside = tmp_path / "images", tmp_path / "outside"
    (outside / "dir").mkdir(parents=True)
    for target in (outside / "secret.png", outside / "dir" / "x.png"):
        Image.new("RGB", (4, 4), (1, 2, 3)).save(target)
    (images / "link.png").symlink_to(outside / "secret.png")
    (images / "linkdir").symlink_to(outside / "dir", target_is_directory=True)
    (images / "sqa" / "inside.png").symlink_to(images / "sqa" / "1.png")
    records = [GOOD, _with(id="abs", image=str(outside / "secret.png")), _with(id="up", image="sqa/../../outside/secret.png"),
               _with(id="filelink", image="link.png"), _with(id="dirlink", image="linkdir/x.png"),
               _with(id="in", image="sqa/inside.png")]
    return source, records


ESCAPES = [(1, "abs", "absolute path"), (2, "up", "contains '..'"),
           (3, "filelink", "outside the image root"), (4, "dirlink", "outside the image root")]


@pytest.mark.parametrize("index, rid, reason", ESCAPES, ids=[e[1] for e in ESCAPES])
def test_every_way_out_of_the_image_root_is_refused(tmp_path: Path, index: int, rid: str, reason: str) -> None:
    source, records = _escape_layout(tmp_path)
    files = {"ScienceQA/train.json": [records[0], records[index]]}
    source = write_coin_layout(tmp_path, files)
    with pytest.raises(DataError) as info:
        load_records(source, "ScienceQA", "train")
    e = info.value
    assert (e.file, e.index, e.id, e.field) == (f"{source.instructions_root}/ScienceQA/train.json", 1, rid, "image")
    assert reason in e.reason and f"record 1 (id={rid}) field 'image'" in str(e)
    if "link" in rid:  # the message says where the link leads
        assert str(tmp_path / "outside") in e.reason


def test_links_out_are_skipped_and_listed_links_inside_are_read(tmp_path: Path) -> None:
    source, records = _escape_layout(tmp_path)
    source = write_coin_layout(tmp_path, {"ScienceQA/train.json": records})
    result = load_records(source, "ScienceQA", "train", on_bad="skip")
    assert [r["id"] for r in result.rows] == ["ok", "in"]
    assert [(b.index, b.id, b.field) for b in result.bad] == [(i, rid, "image") for i, rid, _ in ESCAPES]
    rows = list(iter_decoded(source, "ScienceQA", "train", 4, on_bad="skip"))
    assert [r["id"] for r in rows] == ["ok", "in"]
    assert (rows[1]["image"] == np.array(COLORS["sqa/1.png"], dtype=np.uint8)).all()


def test_a_root_reached_through_a_link_is_fine(tmp_path: Path) -> None:
    """Only where a path ends up matters: an image root that is itself a link is resolved too."""
    write_coin_layout(tmp_path)
    (tmp_path / "alias").symlink_to(tmp_path / "images", target_is_directory=True)
    source = CoinSource(str(tmp_path / "Instructions_Original"), str(tmp_path / "alias"))
    assert [r["id"] for r in load_records(source, "ScienceQA", "train").rows] == ["sqa-1", "sqa-2"]


def test_doubtful_answers_are_kept_with_a_warning(tmp_path: Path) -> None:
    """Warnings, not errors: a training reply outside the task's answer format still trains, and a
    VQA record with few answers can be scored (its best score is below 1)."""
    files = {
        "ScienceQA/train.json": [GOOD, _with(id="free", conversations=[{"from": "human", "value": "Q?\nA. x\nB. y"},
                                                                       {"from": "gpt", "value": "It is x."}])],
        "TextVQA/val.json": [{"question_id": 1, "text": "Q", "answers": ["nike", "nike", "nike"]},
                             {"question_id": 2, "text": "Q", "answers": ["nike"] * 4}],
        "Grounding/train.json": [_with(id="g", conversations=[{"from": "human", "value": "Q"},
                                                              {"from": "gpt", "value": "the left dog"}])],
    }
    source = write_coin_layout(tmp_path, files)
    sqa = load_records(source, "ScienceQA", "train")
    assert [r["id"] for r in sqa.rows] == ["ok", "free"] and sqa.bad == []
    assert [(w.index, w.id, w.field) for w in sqa.warnings] == [(1, "free", "conversations[1].value")]
    assert "not an option letter" in sqa.warnings[0].reason
    text = load_records(source, "TextVQA", "test")
    assert [(w.index, w.id, w.field) for w in text.warnings] == [(0, "1", "answers")]
    assert "only 3 answers" in text.warnings[0].reason and "0.67" in text.warnings[0].reason
    box = load_records(source, "Grounding", "train")
    assert [(w.id, w.field) for w in box.warnings] == [("g", "conversations[1].value")] and "not a box" in box.warnings[0].reason


def test_a_user_task_is_checked_by_its_scorer(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """data.custom_tasks get the checks of the scorer they name, a registered scorer its own."""
    from pipeline.scoring import scorers
    from pipeline.tasks import TaskSpec

    monkeypatch.setattr(scorers, "SCORERS", dict(scorers.SCORERS))
    scorers.register_scorer("yesno", lambda pred, row: float(pred.strip() == row["answer"]),
                            validate=lambda row: scorers.validate_text_answers(row) + (
                                [] if row["split"] == "train" or row["answer"] in ("yes", "no")
                                else [scorers.AnswerProblem("answer", "must be yes or no")]))
    write_coin_layout(tmp_path, {})
    data = tmp_path / "mine"
    data.mkdir()
    (data / "test.json").write_text(json.dumps([{"question_id": "a", "text": "Q", "answer_bbox": "[0.6, 0.1, 0.2, 0.5]", "size": [4, 4]}]))
    (data / "yn.json").write_text(json.dumps([{"question_id": "a", "text": "Q", "answer": "yes"},
                                              {"question_id": "b", "text": "Q", "answer": "maybe"}]))
    custom = (TaskSpec("MyBoxes", str(data / "train.json"), str(data / "test.json"), "iou"),
              TaskSpec("MyYesNo", str(data / "train.json"), str(data / "yn.json"), "yesno"))
    source = CoinSource(str(tmp_path / "Instructions_Original"), str(tmp_path / "images"), custom)
    with pytest.raises(DataError) as info:
        load_records(source, "MyBoxes", "test")
    assert (info.value.file, info.value.index, info.value.id, info.value.field) == (str(data / "test.json"), 0, "a", "answer_bbox")
    assert "encloses nothing" in info.value.reason
    with pytest.raises(DataError) as info:
        load_records(source, "MyYesNo", "test")
    assert (info.value.index, info.value.id, info.value.field, info.value.reason) == (1, "b", "answer", "must be yes or no")


def test_unknown_task_and_split(layout: CoinSource) -> None:
    with pytest.raises(DataError) as info:
        load_records(layout, "COCO", "train")
    assert info.value.field == "task" and "unknown task 'COCO'" in str(info.value)
    with pytest.raises(ValueError, match="unknown split"):
        load_records(layout, "ScienceQA", "val")


def test_test_split_never_skips(layout: CoinSource) -> None:
    with pytest.raises(ValueError, match="not allowed for the test split"):
        load_records(layout, "ScienceQA", "test", on_bad="skip")


def test_skip_keeps_good_records_and_lists_every_bad_one(tmp_path: Path) -> None:
    records = [GOOD, _with(id="abs", image="/x.png"), "junk", _with(id="gone", image="sqa/404.png"), _with(id="ok2")]
    source = write_coin_layout(tmp_path, _train(records))
    result = load_records(source, "ScienceQA", "train", on_bad="skip")
    assert [r["id"] for r in result.rows] == ["ok", "ok2"]
    assert [(b.index, b.id, b.field) for b in result.bad] == [(1, "abs", "image"), (2, None, "(record)"), (3, "gone", "image")]
    assert result.total == 5
    with pytest.raises(DataError, match="record 1 "):
        load_records(source, "ScienceQA", "train")  # "error" stops at the first


def test_skip_with_nothing_left_is_an_error(tmp_path: Path) -> None:
    source = write_coin_layout(tmp_path, _train(["junk"]))
    with pytest.raises(DataError, match="no valid records"):
        load_records(source, "ScienceQA", "train", on_bad="skip")


def test_missing_images_come_from_one_listing(layout: CoinSource) -> None:
    """Existence is decided by the image-root listing (passed in here), not by per-file stats."""
    result = load_records(layout, "TextVQA", "test", on_bad="error", image_files={"text/a.png", "text/b.png"})
    assert len(result.rows) == 2
    with pytest.raises(DataError, match="'text/b.png' not found"):
        load_records(layout, "TextVQA", "test", image_files={"text/a.png"})


def test_iter_decoded_resizes_to_rgb_uint8(layout: CoinSource) -> None:
    rows = list(iter_decoded(layout, "ScienceQA", "test", 8))
    assert [r["id"] for r in rows] == ["q1", "2"]
    for row, rel in zip(rows, ["sqa/3.png", "sqa/1.png"]):
        assert row["image"].shape == (8, 8, 3) and row["image"].dtype == np.uint8
        assert (row["image"] == np.array(COLORS[rel], dtype=np.uint8)).all()


def _corrupt_layout(tmp_path: Path) -> CoinSource:
    files = _train([GOOD, _with(id="broken", image="bad/broken.png"), _with(id="ok2", image="sqa/2.png")])
    source = write_coin_layout(tmp_path, files)
    (tmp_path / "images" / "bad").mkdir()
    (tmp_path / "images" / "bad" / "broken.png").write_bytes(b"\x89PNG not really")
    return source


def test_iter_decoded_undecodable_image(tmp_path: Path) -> None:
    source = _corrupt_layout(tmp_path)
    with pytest.raises(DataError) as info:
        list(iter_decoded(source, "ScienceQA", "train", 8))
    assert (info.value.index, info.value.id, info.value.field) == (1, "broken", "image")
    bad: list = []
    rows = list(iter_decoded(source, "ScienceQA", "train", 8, on_bad="skip", bad_out=bad))
    assert [r["id"] for r in rows] == ["ok", "ok2"]
    assert [(b.index, b.id, b.field) for b in bad] == [(1, "broken", "image")]


# ---- Ray Data ----------------------------------------------------------------------------------


def _plain(rows: list[dict]) -> list[dict]:
    return [{k: (list(v) if isinstance(v, (list, np.ndarray)) and k != "image" else v) for k, v in r.items() if k != "image"}
            for r in rows]


def test_read_dataset_matches_plain_reader(ray_session, layout: CoinSource) -> None:
    ds, result = read_dataset(layout, "TextVQA", "test", image_size=8, ray_parallelism=2)
    got = ds.take_all()
    assert _plain(got) == result.rows
    expected = list(iter_decoded(layout, "TextVQA", "test", 8))
    for g, e in zip(got, expected, strict=True):
        assert g["image"].dtype == np.uint8 and g["image"].shape == (8, 8, 3)
        np.testing.assert_array_equal(g["image"], e["image"])
    assert str(ds.schema().types[list(ds.schema().names).index("answers")]) == "list<item: string>"


def test_read_dataset_skip_drops_and_records_undecodable(ray_session, tmp_path: Path) -> None:
    source = _corrupt_layout(tmp_path)
    ds, result = read_dataset(source, "ScienceQA", "train", image_size=4, on_bad="skip",
                              ray_parallelism=2, decode_batch_size=1)
    assert [r["id"] for r in ds.take_all()] == ["ok", "ok2"]
    assert result.bad == []
    failures = result.decode_failures()
    assert [(b.file, b.index, b.id, b.field) for b in failures] == [(result.file, 1, "broken", "image")]
    assert result.all_bad() == failures


def test_read_dataset_error_names_record_when_decoding(ray_session, tmp_path: Path) -> None:
    source = _corrupt_layout(tmp_path)
    ds, _ = read_dataset(source, "ScienceQA", "train", image_size=4)
    with pytest.raises(Exception) as info:  # Ray wraps the DataError in its UserCodeException
        ds.take_all()
    message = str(info.value)
    assert "ScienceQA/train.json: record 1 (id=broken) field 'image': cannot decode image 'bad/broken.png'" in message
