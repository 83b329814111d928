"""The scorers, by name (``SCORERS``), and the one each CoIN task uses (``COIN_SCORERS``), as the
evaluation code of CoIN (github.com/zackschen/CoIN, ETrain/Eval/LLaVA/CoIN/) and LLaVA score them;
a user's task names one in ``data.custom_tasks.<Task>.scorer``.

Predictions are matched to ground truth by question_id, never by position. Every test record
needs exactly one prediction: missing or extra question_ids are a ``ScoringError`` that names
them. An empty prediction is wrong. A prediction that cannot be parsed (no option letter for
ScienceQA, no box for Grounding) scores 0 and is counted in ``ScoreResult.unparseable``.

Per task, as the reference evaluator does it:
* ScienceQA (``letter``, eval_science_qa.py): the first one-character word of the prediction,
  upper-cased, is its option letter; right when it is the ground truth's.
* TextVQA (``vqa``, m4c_evaluator.py, LLaVA's and CoIN's copy): the official VQA accuracy, the
  mean over the leave-one-out subsets of the answers of min(1, matches / 3), answers and
  prediction normalised by EvalAIAnswerProcessor (``normalize_vqa_answer``).
* ImageNet (``label``, eval_ImagetNet.py): right when the label is contained in the prediction or
  the prediction in the label (case counts).
* GQA (``gqa``, LLaVA's convert_gqa_for_eval.py + eval_gqa.py): the prediction, final periods
  removed and lower-cased, equals the answer.
* VizWiz, VQAv2 (``vqa_exact``, eval_vizwiz.py / eval_vqav2.py): equal ignoring case; a record
  that carries the ten human ``answers`` gets the official VQA accuracy instead.
* OCRVQA (``exact``, eval_ocrvqa.py): equal ignoring case.
* Grounding (``iou``, eval_grounding.py): the prediction is four comma-separated numbers (brackets
  optional); right when its IoU with ``answer_bbox`` exceeds 0.5.

Deliberate differences (docs/scoring.md has the cases): matching by question_id and a missing
prediction is an error (the references match ImageNet by list position and score whatever
predictions exist); an empty prediction is wrong (ImageNet's containment test counts it as right);
Grounding reads every character of the box (the reference cuts the first and last character after
removing the brackets: "0.987]" is read as 0.98); predictions and answers are compared without
surrounding white space (the references compare the stripped model output with the raw answer).

This module is pure Python: it never imports ray.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from typing import Any
from dataclasses import dataclass, field

from pipeline.data.schema import COIN_TASKS

# ---- VQA answer normalisation (EvalAIAnswerProcessor of LLaVA's and CoIN's m4c_evaluator.py) ----

_CONTRACTIONS = {
    "aint": "ain't", "arent": "aren't", "cant": "can't", "couldve": "could've", "couldnt": "couldn't",
    "couldn'tve": "couldn't've", "couldnt've": "couldn't've", "didnt": "didn't", "doesnt": "doesn't",
    "dont": "don't", "hadnt": "hadn't", "hadnt've": "hadn't've", "hadn'tve": "hadn't've",
    "hasnt": "hasn't", "havent": "haven't", "hed": "he'd", "hed've": "he'd've", "he'dve": "he'd've",
    "hes": "he's", "howd": "how'd", "howll": "how'll", "hows": "how's", "Id've": "I'd've",
    "I'dve": "I'd've", "Im": "I'm", "Ive": "I've", "isnt": "isn't", "itd": "it'd", "itd've": "it'd've",
    "it'dve": "it'd've", "itll": "it'll", "let's": "let's", "maam": "ma'am", "mightnt": "mightn't",
    "mightnt've": "mightn't've", "mightn'tve": "mightn't've", "mightve": "might've",
    "mustnt": "mustn't", "mustve": "must've", "neednt": "needn't", "notve": "not've",
    "oclock": "o'clock", "oughtnt": "oughtn't", "ow's'at": "'ow's'at", "'ows'at": "'ow's'at",
    "'ow'sat": "'ow's'at", "shant": "shan't", "shed've": "she'd've", "she'dve": "she'd've",
    "she's": "she's", "shouldve": "should've", "shouldnt": "shouldn't", "shouldnt've": "shouldn't've",
    "shouldn'tve": "shouldn't've", "somebody'd": "somebodyd", "somebodyd've": "somebody'd've",
    "somebody'dve": "somebody'd've", "somebodyll": "somebody'll", "somebodys": "somebody's",
    "someoned": "someone'd", "someoned've": "someone'd've", "someone'dve": "someone'd've",
    "someonell": "someone'll", "someones": "someone's", "somethingd": "something'd",
    "somethingd've": "something'd've", "something'dve": "something'd've", "somethingll": "something'll",
    "thats": "that's", "thered": "there'd", "thered've": "there'd've", "there'dve": "there'd've",
    "therere": "there're", "theres": "there's", "theyd": "they'd", "theyd've": "they'd've",
    "they'dve": "they'd've", "theyll": "they'll", "theyre": "they're", "theyve": "they've",
    "twas": "'twas", "wasnt": "wasn't", "wed've": "we'd've", "we'dve": "we'd've", "weve": "we've",
    "werent": "weren't", "whatll": "what'll", "whatre": "what're", "whats": "what's",
    "whatve": "what've", "whens": "when's", "whered": "where'd", "wheres": "where's",
    "whereve": "where've", "whod": "who'd", "whod've": "who'd've", "who'dve": "who'd've",
    "wholl": "who'll", "whos": "who's", "whove": "who've", "whyll": "why'll", "whyre": "why're",
    "whys": "why's", "wont": "won't", "wouldve": "would've", "wouldnt": "wouldn't",
    "wouldnt've": "wouldn't've", "wouldn'tve": "wouldn't've", "yall": "y'all", "yall'll": "y'all'll",
    "y'allll": "y'all'll", "yall'd've": "y'all'd've", "y'alld've": "y'all'd've",
    "y'all'dve": "y'all'd've", "youd": "you'd", "youd've": "you'd've", "you'dve": "you'd've",
    "youll": "you'll", "youre": "you're", "youve": "you've",
}
_NUMBER_WORDS = {
    "none": "0", "zero": "0", "one": "1", "two": "2", "three": "3", "four": "4", "five": "5",
    "six": "6", "seven": "7", "eight": "8", "nine": "9", "ten": "10",
}
_ARTICLES = {"a", "an", "the"}
_PUNCT = [";", "/", "[", "]", '"', "{", "}", "(", ")", "=", "+", "\\", "_", "-", ">", "<", "@", "`", ",", "?", "!"]
# The reference writes "(?!<=\d)(\.)(?!\d)": a malformed look-behind that in effect strips every
# period not followed by a digit ("5." -> "5", "3.5" kept). It passes re.UNICODE (32) where
# re.sub takes its count, so at most 32 periods go; both kept.
_PERIOD_STRIP = re.compile(r"\.(?!\d)")
_PERIOD_STRIP_COUNT = 32
_COMMA_STRIP = re.compile(r"(?<=\d)(,)+(?=\d)")


def _word_tokenize(text: str) -> str:
    return text.lower().replace(",", "").replace("?", "").replace("'s", " 's").strip()


def _process_punctuation(text: str) -> str:
    out = text
    for p in _PUNCT:
        if (p + " " in text or " " + p in text) or _COMMA_STRIP.search(text) is not None:
            out = out.replace(p, "")
        else:
            out = out.replace(p, " ")
    return _PERIOD_STRIP.sub("", out, count=_PERIOD_STRIP_COUNT)


def _process_digit_article(text: str) -> str:
    words = [_NUMBER_WORDS.get(w, w) for w in text.lower().split()]
    words = [_CONTRACTIONS.get(w, w) for w in words if w not in _ARTICLES]
    return " ".join(words)


def normalize_vqa_answer(text: str) -> str:
    """EvalAIAnswerProcessor, step by step: lower case, commas and question marks dropped, "'s"
    split off; white space; punctuation (removed next to a space, else a space); periods not
    followed by a digit; number words to digits; articles dropped; contractions restored."""
    text = _word_tokenize(text).replace("\n", " ").replace("\t", " ").strip()
    return _process_digit_article(_process_punctuation(text))


def vqa_soft_accuracy(prediction: str, answers: Sequence[str]) -> float:
    """The official VQA accuracy of one prediction against the human answers (ten in VQAv2,
    TextVQA and VizWiz): the mean, over the subsets that leave one answer out, of
    min(1, matches / 3), prediction and answers normalised. 2 matching answers of 10 give 0.6,
    3 give 0.9, 4 or more 1.0. An empty prediction scores 0."""
    if not prediction.strip() or not answers:
        return 0.0
    pred = normalize_vqa_answer(prediction)
    gts = [normalize_vqa_answer(a) for a in answers]
    scores = []
    for skip in range(len(gts)):
        matches = sum(g == pred for j, g in enumerate(gts) if j != skip)
        scores.append(min(1.0, matches / 3))
    return sum(scores) / len(scores)


# ---- option letters and boxes ----------------------------------------------------------------

_ONE_CHARACTER_WORD = re.compile(r"\b(\w)\b")


def prediction_letter(text: str) -> str | None:
    """The option letter CoIN's eval_science_qa.py reads from a prediction, or None.

    The reference takes the prediction itself when it is a letter, the first character of
    "X. ...", and otherwise the first one-character word, upper-cased; all three are the first
    one-character word. So "B", "b", "(B)", "B. a cat", "The answer is B." read as B, and "a dog"
    as A (the article, as in the reference). None: no one-character word, or one that is no
    letter ("2 of them").
    """
    m = _ONE_CHARACTER_WORD.search(text)
    if m is None:
        return None
    letter = m.group(1).upper()
    return letter if len(letter) == 1 and "A" <= letter <= "Z" else None


_LETTER_ALONE = re.compile(r"\(?([A-Za-z])\)?[.):]?")
_LETTER_LEAD = re.compile(r"(?:\(([A-Z])\)|([A-Z])[.):])\s")
_LETTER_SENTENCE = re.compile(r"answer(?: is)?\s*[:\-]?\s*\(?([A-Z])\)?(?![A-Za-z])", re.IGNORECASE)


def parse_option_letter(text: str) -> str | None:
    """The option letter a ground truth or training target states, upper case, or None.

    Stricter than ``prediction_letter``: accepts "B", "b", "B.", "(B)", "B)", "B: text",
    "B. text", "(B) text", "The answer is B.", "Answer: (B)". A lower-case letter counts only on
    its own ("a dog" is not option A).
    """
    s = text.strip()
    m = _LETTER_ALONE.fullmatch(s)
    if m:
        return m.group(1).upper()
    m = _LETTER_LEAD.match(s)
    if m:
        return m.group(1) or m.group(2)
    m = _LETTER_SENTENCE.search(s)
    if m and m.group(1).isupper():
        return m.group(1)
    return None


def parse_box(text: str) -> tuple[float, float, float, float] | None:
    """A box as CoIN's eval_grounding.py reads one, at full precision, or None: the whole text,
    brackets removed, must be four comma-separated finite numbers ("[0.1, 0.2, 0.5, 0.9]").
    (The reference then also cuts the first and last character; we do not.)"""
    parts = text.replace("[", "").replace("]", "").split(",")
    if len(parts) != 4:
        return None
    try:
        x1, y1, x2, y2 = (float(p) for p in parts)
    except ValueError:
        return None
    if not all(math.isfinite(v) for v in (x1, y1, x2, y2)):
        return None
    return (x1, y1, x2, y2)


def box_iou(a: Sequence[float], b: Sequence[float]) -> float:
    """Intersection over union of two [x1, y1, x2, y2] boxes (degenerate boxes have area 0)."""
    iw = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
    ih = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    inter = iw * ih
    area_a = max(0.0, a[2] - a[0]) * max(0.0, a[3] - a[1])
    area_b = max(0.0, b[2] - b[0]) * max(0.0, b[3] - b[1])
    union = area_a + area_b - inter
    return inter / union if union > 0 else 0.0


# ---- per-task item scorers: (prediction, ground truth row) -> score in [0, 1] or None -------


class ScoringError(ValueError):
    """Predictions and ground truth do not line up, or ground truth itself is unusable."""


def _gt_answer(row: Mapping) -> str:
    return str(row.get("answer", "") or "")


def _gt_answers(row: Mapping) -> list[str]:
    return [str(a) for a in (row.get("answers") or [])]


def _single_answer(row: Mapping) -> str:
    """The one reference answer of a record without a list of human answers."""
    answers = _gt_answers(row)
    return _gt_answer(row) or (answers[0] if answers else "")


def _score_scienceqa(pred: str, row: Mapping) -> float | None:
    letter = prediction_letter(pred)
    if letter is None:
        return None
    gt = parse_option_letter(_gt_answer(row))
    if gt is None:
        raise ScoringError(f"ScienceQA ground truth {_gt_answer(row)!r} of question_id {_qid(row)} is no option letter")
    return float(letter == gt)


def _score_textvqa(pred: str, row: Mapping) -> float:
    answers = _gt_answers(row)
    if len(answers) >= 2:
        return vqa_soft_accuracy(pred, answers)
    # A single reference answer (no human answer list): normalised exact match.
    p = normalize_vqa_answer(pred)
    return float(bool(pred.strip()) and p == normalize_vqa_answer(_single_answer(row)))


def _score_imagenet(pred: str, row: Mapping) -> float:
    p, gt = pred.strip(), _gt_answer(row).strip()
    return float(bool(p) and bool(gt) and (gt in p or p in gt))


def _score_gqa(pred: str, row: Mapping) -> float:
    p = pred.strip().rstrip(".").lower()
    return float(bool(p) and p == _gt_answer(row).strip().lower())


def _score_exact_ci(pred: str, row: Mapping) -> float:
    p = pred.strip()
    return float(bool(p) and p.upper() == _single_answer(row).strip().upper())


def _score_vqa_or_exact(pred: str, row: Mapping) -> float:
    answers = _gt_answers(row)
    return vqa_soft_accuracy(pred, answers) if len(answers) >= 2 else _score_exact_ci(pred, row)


def _score_grounding(pred: str, row: Mapping) -> float | None:
    box = parse_box(pred)
    if box is None:
        return None
    gt = parse_box(str(row.get("answer_bbox", "") or ""))
    if gt is None:
        raise ScoringError(f"Grounding answer_bbox of question_id {_qid(row)} is not a box: {row.get('answer_bbox')!r}")
    return float(box_iou(box, gt) > 0.5)


# ---- answer formats: what a record must carry to be learned from and scored -----------------
# A validator takes one schema row (pipeline.data.schema; train or test) and returns its problems.
# Errors: a test record that can never be scored (an empty, unparseable or out-of-range ground
# truth), a training target that teaches nothing or the wrong thing (empty, out of range).
# Warnings: a training target that is not in the task's answer format (it still trains, but not
# the format the scorer reads), a VQA record whose few answers cap its score.


@dataclass(frozen=True)
class AnswerProblem:
    """One problem with a record's answer. ``field``: "answer", "answers", "answer_bbox" or a
    training target, "conversations[1].value"; ``error`` False: a warning (the record is kept)."""

    field: str
    reason: str
    error: bool = True


_NEVER = "the record can never be scored"


def _targets(row: Mapping) -> Iterator[tuple[str, str, str]]:
    """(field, human turn, target) of every assistant turn of a training row."""
    for k, (human, target) in enumerate(zip(row.get("human_turns") or [], row.get("gpt_turns") or [])):
        yield f"conversations[{2 * k + 1}].value", human, target


def _empty_target(field_name: str) -> AnswerProblem:
    return AnswerProblem(field_name, "empty target: the record teaches nothing")


def validate_text_answers(row: Mapping) -> list[AnswerProblem]:
    """The checks every text scorer needs (the default of ``register_scorer``): no empty training
    target; a test record's answer (``answer``, else the only entry of ``answers``) not empty."""
    if row.get("split") == "train":
        return [_empty_target(f) for f, _, target in _targets(row) if not target.strip()]
    if not _single_answer(row).strip():
        return [AnswerProblem("answer", f"empty answer: {_NEVER}")]
    return []


def _validate_vqa(row: Mapping) -> list[AnswerProblem]:
    answers = _gt_answers(row)
    if row.get("split") == "train" or len(answers) < 2:
        return validate_text_answers(row)
    if not any(a.strip() for a in answers):
        return [AnswerProblem("answers", f"every one of the {len(answers)} answers is empty: {_NEVER}")]
    if len(answers) < 4:  # a prediction matching all n answers scores min(1, (n - 1) / 3)
        return [AnswerProblem("answers", f"only {len(answers)} answers: even a prediction matching all of them "
                                         f"scores {min(1.0, (len(answers) - 1) / 3):.2f} (VQA accuracy; official "
                                         "files carry 10)", error=False)]
    return []


_OPTION = re.compile(r"(?m)^[ \t]*\(?([A-Z])[.)][ \t]|\(([A-Z])\)[ \t]")


def listed_options(question: str) -> str:
    """The option letters a question lists ("A. ..." / "A) ..." / "(A) ..." lines, or inline
    "(A) ... (B) ..."), as the run "AB..." from A on; "" when it lists none."""
    run = ""
    for a, b in _OPTION.findall(question):
        if (a or b) == chr(ord("A") + len(run)):
            run += a or b
    return run


def _letter_problems(field_name: str, text: str, question: str, train: bool) -> list[AnswerProblem]:
    letter = parse_option_letter(text)
    if letter is None:
        if train:
            return [AnswerProblem(field_name, f"{text!r} is not an option letter: it trains an answer the "
                                              "letter scorer does not expect", error=False)]
        return [AnswerProblem(field_name, f"{text!r} is not an option letter: {_NEVER}")]
    options = listed_options(question)
    if options and letter not in options:
        what = "it teaches a wrong answer" if train else "no prediction can match it"
        return [AnswerProblem(field_name, f"option {letter} is out of range: the question lists "
                                          f"{options[0]}-{options[-1]}; {what}")]
    return []


def _validate_letter(row: Mapping) -> list[AnswerProblem]:
    if row.get("split") == "train":
        problems = []
        for f, human, target in _targets(row):
            problems += [_empty_target(f)] if not target.strip() else _letter_problems(f, target, human, True)
        return problems
    return validate_text_answers(row) or _letter_problems(
        "answer", _single_answer(row), (row.get("human_turns") or [""])[0], False)


def _box_problems(field_name: str, text: str, train: bool) -> list[AnswerProblem]:
    box = parse_box(text)
    if box is None:
        if train:
            return [AnswerProblem(field_name, f"{text!r} is not a box '[x1, y1, x2, y2]': it trains an answer "
                                              "the iou scorer cannot read", error=False)]
        return [AnswerProblem(field_name, f"{text!r} is not a box '[x1, y1, x2, y2]' of four numbers: {_NEVER}")]
    what = "it teaches a wrong box" if train else "no prediction can match it"
    if not all(0.0 <= v <= 1.0 for v in box):
        return [AnswerProblem(field_name, f"box {text!r} is out of range: coordinates are fractions of the image "
                                          f"(padded to a square), in [0, 1]; {what}")]
    if box[2] <= box[0] or box[3] <= box[1]:
        return [AnswerProblem(field_name, f"box {text!r} encloses nothing (needs x1 < x2 and y1 < y2); {what}")]
    return []


def validate_box_answers(row: Mapping) -> list[AnswerProblem]:
    """Box tasks (the default of ``register_scorer(answers="box")``): training targets and the
    test ``answer_bbox`` are boxes of four numbers in [0, 1] with x1 < x2 and y1 < y2."""
    if row.get("split") == "train":
        problems = []
        for f, _, target in _targets(row):
            problems += [_empty_target(f)] if not target.strip() else _box_problems(f, target, True)
        return problems
    text = str(row.get("answer_bbox") or "")
    if not text.strip():
        return [AnswerProblem("answer_bbox", f"empty box: {_NEVER}")]
    return _box_problems("answer_bbox", text, False)


@dataclass(frozen=True)
class Scorer:
    """A scorer by name: ``score(prediction, ground-truth row)`` -> item score in [0, 1], or None
    when the prediction cannot be parsed (counted as wrong and reported as unparseable).
    ``answers``: what a test record must carry: "text" (``answer`` / ``answers``) or "box"
    (``answer_bbox`` and ``size``). ``validate(row)`` -> the row's ``AnswerProblem``s, checked
    by ``check-data`` and the reader before any training."""

    name: str
    score: Any
    answers: str
    help: str
    validate: Callable[[Mapping], list[AnswerProblem]] = validate_text_answers


SCORERS: dict[str, Scorer] = {s.name: s for s in (
    Scorer("letter", _score_scienceqa, "text", "the first one-character word of the answer, as an option letter, == the letter (ScienceQA)",
           _validate_letter),
    Scorer("vqa", _score_textvqa, "text", "official VQA accuracy over `answers` (>= 2), else normalised exact match (TextVQA)",
           _validate_vqa),
    Scorer("label", _score_imagenet, "text", "the label in the answer or the answer in the label, case counts (ImageNet)"),
    Scorer("gqa", _score_gqa, "text", "exact match, final periods and case ignored (GQA)"),
    Scorer("vqa_exact", _score_vqa_or_exact, "text", "official VQA accuracy over `answers` (>= 2), else exact match ignoring case (VizWiz, VQAv2)",
           _validate_vqa),
    Scorer("exact", _score_exact_ci, "text", "exact match, case and surrounding spaces ignored (OCR-VQA)"),
    Scorer("iou", _score_grounding, "box", "box IoU with `answer_bbox` > 0.5 (Grounding)", validate_box_answers),
)}

# the scorer of each CoIN task (where the task description and CoIN's evaluation code differ, the code decides)
COIN_SCORERS: dict[str, str] = {
    "ScienceQA": "letter", "TextVQA": "vqa", "ImageNet": "label", "GQA": "gqa", "VizWiz": "vqa_exact",
    "Grounding": "iou", "VQAv2": "vqa_exact", "OCRVQA": "exact",
}
assert set(COIN_SCORERS) == set(COIN_TASKS)


def register_scorer(name: str, score: Any, *, answers: str = "text", help: str = "",
                    validate: Callable[[Mapping], list[AnswerProblem]] | None = None) -> None:
    """Add a scorer by name (e.g. from a method plugin or a user module). ``validate``: the
    record check (default ``validate_text_answers`` / ``validate_box_answers``; a scorer's own
    check can extend them: ``lambda row: validate_text_answers(row) + mine(row)``)."""
    if name in SCORERS:
        raise ValueError(f"scorer {name!r} exists")
    if answers not in ("text", "box"):
        raise ValueError(f"scorer {name!r}: answers must be 'text' or 'box'")
    default = validate_box_answers if answers == "box" else validate_text_answers
    SCORERS[name] = Scorer(name, score, answers, help, validate or default)


def scorer_info(name: str) -> Scorer:
    if name not in SCORERS:
        raise ValueError(f"unknown scorer {name!r}; known: {sorted(SCORERS)}")
    return SCORERS[name]


# ---- matching and the public entry point ----------------------------------------------------


@dataclass(frozen=True)
class ScoreResult:
    """Score of one task's predictions. ``score`` is in percent; ``correct`` may be fractional
    (TextVQA soft accuracy). ``per_item`` maps question_id to its item score when requested."""

    task: str
    score: float
    count: int
    correct: float
    unparseable: int
    per_item: dict[str, float] | None = field(default=None, repr=False)


def _qid(row: Mapping) -> str:
    qid = row.get("question_id", row.get("id"))
    if qid is None or isinstance(qid, bool) or not isinstance(qid, (str, int)):
        raise ScoringError(f"ground-truth record without a usable question_id/id: {qid!r}")
    return str(qid)


def _show(ids: Iterable[str], limit: int = 10) -> str:
    ids = sorted(ids)
    head = ", ".join(repr(i) for i in ids[:limit])
    return head + (f" and {len(ids) - limit} more" if len(ids) > limit else "")


def _index_ground_truth(rows: Iterable[Mapping]) -> dict[str, Mapping]:
    by_id: dict[str, Mapping] = {}
    dups: set[str] = set()
    for row in rows:
        qid = _qid(row)
        if qid in by_id:
            dups.add(qid)
        by_id[qid] = row
    if dups:
        raise ScoringError(f"duplicate question_ids in the ground truth: {_show(dups)}")
    return by_id


def score_task(
    task: str,
    test_rows_or_records: Iterable[Mapping],
    predictions: Mapping[str, str],
    *,
    keep_items: bool = False,
    scorer: str | None = None,
) -> ScoreResult:
    """Score ``predictions`` (question_id -> answer text) against one task's test set.

    ``test_rows_or_records`` are schema rows (``id``) or raw CoIN test records
    (``question_id``). Raises ``ScoringError`` naming question_ids when a prediction is
    missing or has no test record, or when the test set is empty.
    """
    if scorer is None:
        if task not in COIN_SCORERS:
            raise ValueError(f"unknown task {task!r}; expected one of {', '.join(COIN_TASKS)} (or give a scorer)")
        scorer = COIN_SCORERS[task]
    score_item = scorer_info(scorer).score
    gt = _index_ground_truth(test_rows_or_records)
    if not gt:
        raise ScoringError(f"{task}: empty test set")
    preds = {str(k): v for k, v in predictions.items()}
    missing, extra = set(gt) - set(preds), set(preds) - set(gt)
    if missing or extra:
        parts = [f"missing predictions for question_ids {_show(missing)}"] if missing else []
        parts += [f"predictions for unknown question_ids {_show(extra)}"] if extra else []
        raise ScoringError(f"{task}: " + "; ".join(parts))
    items: dict[str, float] = {}
    unparseable = 0
    for qid, row in gt.items():
        pred = preds[qid]
        value = score_item(pred, row) if isinstance(pred, str) else None
        if value is None:
            unparseable += 1
            value = 0.0
        items[qid] = value
    correct = sum(items.values())
    return ScoreResult(task, 100.0 * correct / len(gt), len(gt), correct, unparseable,
                       items if keep_items else None)


def predictions_from_records(records: Iterable[Mapping], source: str = "predictions") -> dict[str, str]:
    """question_id -> text from LLaVA answer-file records; duplicates are a ``ScoringError``."""
    out: dict[str, str] = {}
    dups: set[str] = set()
    for n, rec in enumerate(records, start=1):
        qid, text = rec.get("question_id"), rec.get("text")
        if qid is None or isinstance(qid, bool) or not isinstance(qid, (str, int)):
            raise ScoringError(f"{source}: record {n} has no usable question_id")
        if not isinstance(text, str):
            raise ScoringError(f"{source}: record {n} (question_id {qid!r}) field 'text' is not a string")
        if str(qid) in out:
            dups.add(str(qid))
        out[str(qid)] = text
    if dups:
        raise ScoringError(f"{source}: duplicate predictions for question_ids {_show(dups)}")
    return out
