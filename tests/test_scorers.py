"""Every CoIN scorer on hand-computed cases, plus the reference bugs we do not copy."""

from __future__ import annotations

import pytest

from pipeline.scoring.scorers import (
    ScoringError,
    box_iou,
    normalize_vqa_answer,
    parse_box,
    parse_option_letter,
    predictions_from_records,
    score_task,
    vqa_soft_accuracy,
)


def rows(task: str, answers: dict) -> list[dict]:
    """Schema-style test rows: id -> answer (or a dict of extra fields)."""
    out = []
    for qid, gt in answers.items():
        row = {"task": task, "split": "test", "id": qid, "answer": "", "answers": [], "answer_bbox": "", "size": []}
        row.update(gt if isinstance(gt, dict) else {"answer": gt})
        out.append(row)
    return out


# ---- normalisation and parsing ----------------------------------------------------------------


@pytest.mark.parametrize(
    "raw, want",
    [
        ("Two", "2"),
        ("the cat.", "cat"),
        ("A dog!", "dog"),
        ("dont", "don't"),
        ("3.5", "3.5"),
        ("1,000", "1000"),  # comma between digits: punctuation removed, not spaced
        ("yes, sir", "yes sir"),
        ("red/blue", "red blue"),
        ("  Coca-Cola\n", "coca cola"),
        ("none", "0"),
    ],
)
def test_vqa_normalisation(raw: str, want: str) -> None:
    assert normalize_vqa_answer(raw) == want


def test_vqa_soft_accuracy_coin_formula_and_official_form() -> None:
    ten = ["stop"] * 2 + ["halt"] * 8
    assert vqa_soft_accuracy("Stop.", ten) == pytest.approx(2 / 3)  # min(1, 2/3)
    assert vqa_soft_accuracy("halt", ten) == 1.0
    assert vqa_soft_accuracy("go", ten) == 0.0
    # Official leave-one-out: 2 subsets drop a "stop" (1 match -> 1/3), 8 keep both (2/3).
    assert vqa_soft_accuracy("stop", ten, leave_one_out=True) == pytest.approx((2 * 1 / 3 + 8 * 2 / 3) / 10)
    three = ["a1"] * 3 + ["b"] * 7
    # min(1, 3/3) = 1 under coin.md; official: 3 subsets have 2 matches -> 0.9
    assert vqa_soft_accuracy("a1", three) == 1.0
    assert vqa_soft_accuracy("a1", three, leave_one_out=True) == pytest.approx(0.9)
    assert vqa_soft_accuracy("", ten) == 0.0


@pytest.mark.parametrize(
    "text, want",
    [
        ("B", "B"), ("b", "B"), ("B.", "B"), ("(B)", "B"), ("B)", "B"), ("B) a cat", "B"),
        ("B. a cat", "B"), ("(C) the sun", "C"), ("The answer is B", "B"), ("The answer is D.", "D"),
        ("Answer: (A)", "A"), (" A\n", "A"),
        ("", None), ("a dog", None), ("The answer is blue", None), ("I do not know", None), ("BC", None),
    ],
)
def test_option_letter_parsing(text: str, want: str | None) -> None:
    assert parse_option_letter(text) == want


def test_box_parsing_keeps_every_digit() -> None:
    # The reference parser drops the last digit of the last coordinate (0.987 -> 0.98).
    assert parse_box("[0.123, 0.456, 0.789, 0.987]") == (0.123, 0.456, 0.789, 0.987)
    assert parse_box("[1,0.5,1e-1, .25]") == (1.0, 0.5, 0.1, 0.25)
    assert parse_box("box: [0.1, 0.2, 0.3]") is None
    assert parse_box("no box") is None


def test_box_iou_hand_computed() -> None:
    assert box_iou((0, 0, 1, 1), (0, 0, 1, 1)) == 1.0
    assert box_iou((0, 0, 0.5, 1), (0.25, 0, 0.75, 1)) == pytest.approx(0.25 / 0.75)
    assert box_iou((0, 0, 0.1, 0.1), (0.5, 0.5, 0.6, 0.6)) == 0.0
    assert box_iou((0.5, 0.5, 0.4, 0.4), (0, 0, 1, 1)) == 0.0  # degenerate box


# ---- per-task scores --------------------------------------------------------------------------


def test_scienceqa_scores() -> None:
    gt = rows("ScienceQA", {"1": "A", "2": "B", "3": "C", "4": "D"})
    preds = {"1": "A", "2": "The answer is B.", "3": "(D)", "4": "no idea"}
    r = score_task("ScienceQA", gt, preds)
    assert (r.count, r.correct, r.unparseable) == (4, 2.0, 1)
    assert r.score == pytest.approx(50.0)


def test_textvqa_scores_with_ten_answers_and_single_answer() -> None:
    ten = ["coke"] * 2 + ["pepsi"] * 8
    gt = rows("TextVQA", {"q1": {"answers": ten, "answer": "pepsi"}, "q2": {"answers": ten}, "q3": {"answer": "Nike"}})
    r = score_task("TextVQA", gt, {"q1": "Coke", "q2": "Pepsi.", "q3": "nike"}, keep_items=True)
    assert r.per_item == pytest.approx({"q1": 2 / 3, "q2": 1.0, "q3": 1.0})
    assert r.score == pytest.approx(100 * (2 / 3 + 2) / 3)
    assert r.unparseable == 0


def test_imagenet_normalised_exact_match() -> None:
    gt = rows("ImageNet", {"a": "golden retriever", "b": "tabby cat", "c": "goldfish"})
    r = score_task("ImageNet", gt, {"a": " Golden  Retriever.", "b": "cat", "c": "goldfish"})
    assert r.correct == 2 and r.score == pytest.approx(200 / 3)


def test_gqa_strip_dots_lower() -> None:
    gt = rows("GQA", {"1": "yes", "2": "left", "3": "table"})
    r = score_task("GQA", gt, {"1": "Yes.", "2": "the left", "3": "...TABLE"})
    assert r.correct == 2


@pytest.mark.parametrize("task", ["VizWiz", "VQAv2", "OCRVQA"])
def test_case_insensitive_exact_match(task: str) -> None:
    gt = rows(task, {"1": "unanswerable", "2": "Harry Potter", "3": "2"})
    r = score_task(task, gt, {"1": "Unanswerable", "2": "harry potter", "3": "two"})
    assert (r.correct, r.count) == (2, 3)


def test_grounding_iou_threshold_and_unparseable() -> None:
    box = {"answer_bbox": "[0.0, 0.0, 0.5, 1.0]", "size": [640, 480]}
    gt = rows("Grounding", {"1": box, "2": box, "3": box, "4": box, "5": box})
    preds = {
        "1": "[0.0, 0.0, 0.5, 1.0]",  # IoU 1
        "2": "[0.25, 0.0, 0.75, 1.0]",  # IoU 1/3
        "3": "[0.0, 0.0, 0.5, 0.5]",  # IoU 0.5 exactly: not > 0.5
        "4": "somewhere on the left",  # unparseable
        "5": "",  # empty
    }
    r = score_task("Grounding", gt, preds, keep_items=True)
    assert r.per_item == {"1": 1.0, "2": 0.0, "3": 0.0, "4": 0.0, "5": 0.0}
    assert (r.correct, r.unparseable, r.count) == (1.0, 2, 5)
    assert r.score == pytest.approx(20.0)


def test_grounding_last_digit_matters() -> None:
    """The reference drops the last digit of the last coordinate, reading "0.11" as "0.1".
    Against [0, 0, 1, 0.2] that flips the verdict: IoU 0.55 (right) vs 0.5 (wrong)."""
    gt = rows("Grounding", {"1": {"answer_bbox": "[0.0, 0.0, 1.0, 0.2]"}})
    assert score_task("Grounding", gt, {"1": "[0.0, 0.0, 1.0, 0.11]"}).correct == 1
    assert score_task("Grounding", gt, {"1": "[0.0, 0.0, 1.0, 0.1]"}).correct == 0


# ---- matching by question_id --------------------------------------------------------------------


def test_imagenet_matches_by_question_id_not_position() -> None:
    gt = rows("ImageNet", {"10": "goldfish", "20": "tabby cat"})
    # Dict order is the reverse of the ground truth order; position matching would give 0/2.
    r = score_task("ImageNet", gt, {"20": "tabby cat", "10": "goldfish"})
    assert r.correct == 2


def test_empty_prediction_is_wrong_for_every_task() -> None:
    for task, gt in [("ImageNet", ""), ("VizWiz", ""), ("GQA", ""), ("VQAv2", ""), ("OCRVQA", "")]:
        # Even an empty ground truth does not make an empty prediction right.
        assert score_task(task, rows(task, {"1": gt}), {"1": ""}).correct == 0, task
    assert score_task("TextVQA", rows("TextVQA", {"1": {"answers": [""] * 10}}), {"1": ""}).correct == 0
    r = score_task("ScienceQA", rows("ScienceQA", {"1": "A"}), {"1": ""})
    assert (r.correct, r.unparseable) == (0, 1)


def test_missing_and_extra_predictions_are_named() -> None:
    gt = rows("GQA", {"1": "yes", "2": "no", "3": "no"})
    with pytest.raises(ScoringError, match=r"missing predictions for question_ids '2', '3'"):
        score_task("GQA", gt, {"1": "yes"})
    with pytest.raises(ScoringError, match=r"unknown question_ids '9'"):
        score_task("GQA", gt, {"1": "yes", "2": "no", "3": "no", "9": "x"})


def test_raw_records_with_int_question_ids() -> None:
    records = [{"question_id": 7, "image": "x.png", "text": "q", "answer": "Yes"}]
    assert score_task("VQAv2", records, {"7": "yes"}).correct == 1


def test_duplicates_and_bad_inputs() -> None:
    with pytest.raises(ScoringError, match="duplicate question_ids in the ground truth: '1'"):
        score_task("GQA", rows("GQA", {"1": "a"}) * 2, {"1": "a"})
    with pytest.raises(ScoringError, match="duplicate predictions for question_ids '5'"):
        predictions_from_records([{"question_id": 5, "text": "a"}, {"question_id": "5", "text": "b"}])
    with pytest.raises(ScoringError, match="empty test set"):
        score_task("GQA", [], {})
    with pytest.raises(ValueError, match="unknown task"):
        score_task("COCO", rows("GQA", {"1": "a"}), {"1": "a"})
    with pytest.raises(ScoringError, match="answer_bbox of question_id 1"):
        score_task("Grounding", rows("Grounding", {"1": {"answer_bbox": "[0.1, 0.2]"}}), {"1": "[0, 0, 1, 1]"})
