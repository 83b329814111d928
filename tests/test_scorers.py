"""Every CoIN scorer on hand-computed cases, as CoIN's and LLaVA's evaluation code scores them,
plus the reference bugs we do not copy (docs/scoring.md)."""

from __future__ import annotations

import pytest

from pipeline.scoring.scorers import (
    SCORERS,
    ScoringError,
    box_iou,
    listed_options,
    normalize_vqa_answer,
    parse_box,
    parse_option_letter,
    prediction_letter,
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
        # EvalAIAnswerProcessor's word_tokenize runs first: commas and "?" go, "'s" is split off
        ("red,blue", "redblue"),
        ("What?", "what"),
        ("John's", "john 's"),
        ("x" + "." * 40, "x" + "." * 8),  # the reference strips at most 32 periods (re.UNICODE as count)
    ],
)
def test_vqa_normalisation(raw: str, want: str) -> None:
    assert normalize_vqa_answer(raw) == want


@pytest.mark.parametrize("matching, want", [(0, 0.0), (1, 0.3), (2, 0.6), (3, 0.9), (4, 1.0), (7, 1.0), (10, 1.0)])
def test_vqa_accuracy_is_the_official_leave_one_out_average(matching: int, want: float) -> None:
    """By hand, k of 10 answers matching: the k subsets that leave out a match hold k - 1 matches,
    the 10 - k others hold k; each scores min(1, matches / 3). 2 of 10: (2 * 1/3 + 8 * 2/3) / 10 =
    0.6 (min(1, 2/3) over all ten would say 0.667); 3 of 10: (3 * 2/3 + 7 * 1) / 10 = 0.9."""
    answers = ["Stop."] * matching + ["halt"] * (10 - matching)
    assert vqa_soft_accuracy("stop", answers) == pytest.approx(want, abs=1e-12)
    gt = rows("TextVQA", {"q": {"answers": answers, "answer": "halt"}})
    assert score_task("TextVQA", gt, {"q": "STOP"}).score == pytest.approx(100 * want)


def test_vqa_accuracy_edge_cases() -> None:
    ten = ["stop"] * 2 + ["halt"] * 8
    assert vqa_soft_accuracy("", ten) == 0.0 and vqa_soft_accuracy("  ", [""] * 10) == 0.0  # empty: wrong
    # a prediction that normalises to nothing ("the") matches answers that do, as the reference has it
    assert vqa_soft_accuracy("the", ["a"] * 10) == 1.0
    # fewer answers: the same leave-one-out mean over however many there are
    assert vqa_soft_accuracy("x", ["x", "x", "x", "y"]) == pytest.approx((3 * 2 / 3 + 1) / 4)


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


@pytest.mark.parametrize(
    "text, want",
    [
        ("B", "B"), ("b", "B"), ("B.", "B"), ("(B)", "B"), ("B. a cat", "B"), ("The answer is B.", "B"),
        ("Answer: (A)", "A"), ("It is C", "C"), ("B is right", "B"),
        # CoIN's eval_science_qa.py takes the first one-character word, whatever it is
        ("a dog", "A"), ("I think B", "I"), ("A or B", "A"),
        ("", None), ("BC", None), ("The answer is blue", None), ("2 of them", None), ("no idea", None),
    ],
)
def test_prediction_letter_as_coin_reads_it(text: str, want: str | None) -> None:
    assert prediction_letter(text) == want


def test_box_parsing_keeps_every_digit() -> None:
    # The reference cuts the first and last character after removing the brackets (0.987 -> 0.98).
    assert parse_box("[0.123, 0.456, 0.789, 0.987]") == (0.123, 0.456, 0.789, 0.987)
    assert parse_box("[1,0.5,1e-1, .25]") == (1.0, 0.5, 0.1, 0.25)
    assert parse_box(" 0.1, 0.2, 0.3, 0.4 ") == (0.1, 0.2, 0.3, 0.4)  # brackets optional, as in the reference
    # the whole answer must be the box, as in the reference
    assert parse_box("box: [0.1, 0.2, 0.3, 0.4]") is None
    assert parse_box("[0.1, 0.2, 0.3]") is None and parse_box("[0.1, 0.2, 0.3, 0.4, 0.5]") is None
    assert parse_box("[0.1, 0.2, nan, 0.4]") is None
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
    gt = rows("TextVQA", {"q1": {"answers": ten, "answer": "pepsi"}, "q2": {"answers": ten}, "q3": {"answer": "Nike"},
                          "q4": {"answers": ["Nike"]}})
    r = score_task("TextVQA", gt, {"q1": "Coke", "q2": "Pepsi.", "q3": "nike", "q4": "the nike"}, keep_items=True)
    assert r.per_item == pytest.approx({"q1": 0.6, "q2": 1.0, "q3": 1.0, "q4": 1.0})
    assert r.score == pytest.approx(100 * 3.6 / 4)
    assert r.unparseable == 0


@pytest.mark.parametrize("task", ["VQAv2", "VizWiz"])
def test_vqa_tasks_with_ten_answers_get_the_official_accuracy(task: str) -> None:
    ten = ["two"] * 2 + ["3"] * 8
    gt = rows(task, {"a": {"answers": ten, "answer": "3"}, "b": {"answer": "two"}})
    r = score_task(task, gt, {"a": "2", "b": "2"}, keep_items=True)
    # "a": "2" matches the two "two"s once normalised: 0.6; "b": one answer, exact match ignoring case
    assert r.per_item == pytest.approx({"a": 0.6, "b": 0.0})


def test_imagenet_containment_as_coin() -> None:
    """CoIN's eval_ImagetNet.py: right when the label is in the prediction or the prediction in the
    label, case counting; an empty prediction, which that test would count, is wrong here."""
    gt = rows("ImageNet", {"a": "golden retriever", "b": "tabby cat", "c": "goldfish", "d": "tabby cat", "e": "cat"})
    r = score_task("ImageNet", gt, {"a": "a golden retriever", "b": "cat", "c": "Goldfish", "d": " ", "e": "bobcat"},
                   keep_items=True)
    assert r.per_item == {"a": 1.0, "b": 1.0, "c": 0.0, "d": 0.0, "e": 1.0}


def test_gqa_final_periods_and_case() -> None:
    """LLaVA's convert_gqa_for_eval.py: rstrip('.') and lower(), then GQA's exact match."""
    gt = rows("GQA", {"1": "yes", "2": "left", "3": "table", "4": "table"})
    r = score_task("GQA", gt, {"1": "Yes.", "2": "the left", "3": "TABLE..", "4": "...table"}, keep_items=True)
    assert r.per_item == {"1": 1.0, "2": 0.0, "3": 1.0, "4": 0.0}


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
        "6": "The box is [0.0, 0.0, 0.5, 1.0].",  # the whole answer must be the box
        "7": "0.0, 0.0, 0.5, 1.0",  # brackets optional
    }
    gt += rows("Grounding", {"6": box, "7": box})
    r = score_task("Grounding", gt, preds, keep_items=True)
    assert r.per_item == {"1": 1.0, "2": 0.0, "3": 0.0, "4": 0.0, "5": 0.0, "6": 0.0, "7": 1.0}
    assert (r.correct, r.unparseable, r.count) == (2.0, 3, 7)
    assert r.score == pytest.approx(200 / 7)


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


# ---- answer formats (each scorer's validate; the reader and check-data apply them) ----------------


@pytest.mark.parametrize("question, want", [
    ("Which?\nA. red\nB. blue\nC. green\nAnswer with the option's letter from the given choices directly.", "ABC"),
    ("Which? (A) red (B) blue", "AB"), ("Which?\n(A) red\n(B) blue", "AB"), ("Which?\nA) red\nB) blue", "AB"),
    ("Context: Vitamin C. is sour.\nWhich?\nA. x\nB. y", "AB"),  # an inline "C." is no option
    ("What colour is it?", ""), ("Which?\nB. red\nC. blue", ""),  # no run from A: nothing to check against
])
def test_listed_options(question: str, want: str) -> None:
    assert listed_options(question) == want


def _problems(scorer: str, **row) -> list[tuple[str, bool]]:
    base = {"split": "test", "human_turns": ["Q"], "gpt_turns": [], "answer": "", "answers": [], "answer_bbox": ""}
    return [(p.field, p.error) for p in SCORERS[scorer].validate({**base, **row})]


def test_validators_errors_and_warnings() -> None:
    train = {"split": "train"}
    # fine
    assert _problems("letter", answer="B", human_turns=["Q?\nA. x\nB. y"]) == []
    assert _problems("letter", answer="(C)") == []  # no options listed: the range is not checked
    assert _problems("vqa", answers=["x"] * 10) == [] and _problems("vqa", answer="x") == []
    assert _problems("vqa", answers=["x"] * 4) == [] and _problems("vqa_exact", answers=["x"]) == []
    assert _problems("iou", answer_bbox="[0, 0, 1, 1]") == [] and _problems("exact", answer="2") == []
    assert _problems("iou", **train, human_turns=["Q"], gpt_turns=["[0.1, 0.2, 0.3, 0.4]"]) == []
    # errors: never scorable, or teaching nothing / the wrong thing
    assert _problems("label", answer=" ") == [("answer", True)]
    assert _problems("letter", answer="B", human_turns=["Q?\nA. x"]) == [("answer", True)]
    assert _problems("vqa_exact", answers=[" "] * 10) == [("answers", True)]
    assert _problems("iou", answer_bbox="[0, 0, 1, 1.01]") == [("answer_bbox", True)]
    assert _problems("iou", answer_bbox="[0.2, 0, 0.2, 1]") == [("answer_bbox", True)]  # zero width
    assert _problems("gqa", **train, human_turns=["Q", "Q2"], gpt_turns=["yes", " "]) == [("conversations[3].value", True)]
    assert _problems("letter", **train, human_turns=["Q?\nA. x\nB. y"], gpt_turns=["C"]) == [("conversations[1].value", True)]
    # warnings: kept, but worth knowing
    assert _problems("vqa", answers=["x", "x"]) == [("answers", False)]
    assert _problems("letter", **train, human_turns=["Q"], gpt_turns=["a cat"]) == [("conversations[1].value", False)]
    assert _problems("iou", **train, human_turns=["Q"], gpt_turns=["left"]) == [("conversations[1].value", False)]
