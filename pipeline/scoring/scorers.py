"""The scorers, by name (``SCORERS``), and the one each CoIN task uses (``COIN_SCORERS``), as CoIN's
official evaluation code scores them; a user's task names one in ``data.custom_tasks.<Task>.scorer``.

Predictions are matched to ground truth by question_id, never by position. Every test record
needs exactly one prediction: missing or extra question_ids are a ``ScoringError`` that names
them. An empty prediction is wrong. A prediction that cannot be parsed (no option letter for
ScienceQA, no box for Grounding) scores 0 and is counted in ``ScoreResult.unparseable``.

Deliberate differences from the reference scorers (see coin.md):
* ImageNet matches by question_id and an empty prediction is wrong (the reference matches by
  list position and counts empty as correct).
* Grounding parses every digit of the box (the reference drops the last digit of the last
  coordinate).
* TextVQA uses coin.md's min(1, matches/3) over the 10 answers. The official VQA/TextVQA
  evaluator averages that quantity over the 10 leave-one-out subsets of 9 answers;
  ``vqa_soft_accuracy(..., leave_one_out=True)`` gives that form for comparison.

This module is pure Python: it never imports ray.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping, Sequence
from typing import Any
from dataclasses import dataclass, field

from pipeline.data.schema import COIN_TASKS

# ---- VQA answer normalisation (the standard VQA evaluation processing) ---------------------

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
# period not followed by a digit ("5." -> "5", "3.5" kept). We keep that effective behaviour.
_PERIOD_STRIP = re.compile(r"\.(?!\d)")
_COMMA_STRIP = re.compile(r"(\d)(,)(\d)")


def _process_punctuation(text: str) -> str:
    out = text
    for p in _PUNCT:
        if (p + " " in text or " " + p in text) or _COMMA_STRIP.search(text) is not None:
            out = out.replace(p, "")
        else:
            out = out.replace(p, " ")
    return _PERIOD_STRIP.sub("", out)


def _process_digit_article(text: str) -> str:
    words = [_NUMBER_WORDS.get(w, w) for w in text.lower().split()]
    words = [_CONTRACTIONS.get(w, w) for w in words if w not in _ARTICLES]
    return " ".join(words)


def normalize_vqa_answer(text: str) -> str:
    """Standard VQA answer processing: whitespace, punctuation, number words, articles,
    contractions, lower case (as LLaVA's EvalAIAnswerProcessor applies it)."""
    text = text.replace("\n", " ").replace("\t", " ").strip().lower()
    return _process_digit_article(_process_punctuation(text))


def vqa_soft_accuracy(prediction: str, answers: Sequence[str], *, leave_one_out: bool = False) -> float:
    """Soft accuracy of one prediction against human answers, both normalised.

    Default (coin.md): min(1, matches / 3). With ``leave_one_out`` the official VQA form: the
    mean of min(1, matches / 3) over the len(answers) subsets that leave one answer out.
    """
    pred = normalize_vqa_answer(prediction)
    if not pred:
        return 0.0
    gts = [normalize_vqa_answer(a) for a in answers]
    if not leave_one_out:
        return min(1.0, sum(g == pred for g in gts) / 3)
    scores = []
    for skip in range(len(gts)):
        matches = sum(g == pred for j, g in enumerate(gts) if j != skip)
        scores.append(min(1.0, matches / 3))
    return sum(scores) / len(scores)


# ---- option letters and boxes ----------------------------------------------------------------

_LETTER_ALONE = re.compile(r"\(?([A-Za-z])\)?[.):]?")
_LETTER_LEAD = re.compile(r"(?:\(([A-Z])\)|([A-Z])[.):])\s")
_LETTER_SENTENCE = re.compile(r"answer(?: is)?\s*[:\-]?\s*\(?([A-Z])\)?(?![A-Za-z])", re.IGNORECASE)


def parse_option_letter(text: str) -> str | None:
    """The option letter in a ScienceQA answer, upper case, or None.

    Accepts "B", "b", "B.", "(B)", "B)", "B: text", "B. text", "(B) text", "The answer is B.",
    "Answer: (B)". A lower-case letter counts only on its own ("a dog" is not option A).
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


_NUM = r"[-+]?(?:\d+(?:\.\d*)?|\.\d+)(?:[eE][-+]?\d+)?"
_BOX = re.compile(rf"\[\s*({_NUM})\s*,\s*({_NUM})\s*,\s*({_NUM})\s*,\s*({_NUM})\s*\]")


def parse_box(text: str) -> tuple[float, float, float, float] | None:
    """Parse "[x1, y1, x2, y2]" at full precision (first box in the text), or None."""
    m = _BOX.search(text)
    if m is None:
        return None
    x1, y1, x2, y2 = (float(g) for g in m.groups())
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


def _score_scienceqa(pred: str, row: Mapping) -> float | None:
    letter = parse_option_letter(pred)
    if letter is None:
        return None
    gt = parse_option_letter(_gt_answer(row))
    if gt is None:
        raise ScoringError(f"ScienceQA ground truth {_gt_answer(row)!r} of question_id {_qid(row)} is no option letter")
    return float(letter == gt)


def _score_textvqa(pred: str, row: Mapping) -> float:
    answers = list(row.get("answers") or [])
    if len(answers) >= 2:
        return vqa_soft_accuracy(pred, answers)
    # A single reference answer (CoIN's own val.json): normalised exact match.
    return float(bool(normalize_vqa_answer(pred)) and normalize_vqa_answer(pred) == normalize_vqa_answer(_gt_answer(row)))


def _normalize_label(text: str) -> str:
    return " ".join(text.strip().lower().rstrip(".").split())


def _score_imagenet(pred: str, row: Mapping) -> float:
    p = _normalize_label(pred)
    return float(bool(p) and p == _normalize_label(_gt_answer(row)))


def _score_gqa(pred: str, row: Mapping) -> float:
    p = pred.strip().strip(".").lower()
    return float(bool(p) and p == _gt_answer(row).strip().strip(".").lower())


def _score_exact_ci(pred: str, row: Mapping) -> float:
    p = pred.strip().lower()
    return float(bool(p) and p == _gt_answer(row).strip().lower())


def _score_grounding(pred: str, row: Mapping) -> float | None:
    box = parse_box(pred)
    if box is None:
        return None
    gt = parse_box(str(row.get("answer_bbox", "") or ""))
    if gt is None:
        raise ScoringError(f"Grounding answer_bbox of question_id {_qid(row)} is not a box: {row.get('answer_bbox')!r}")
    return float(box_iou(box, gt) > 0.5)


@dataclass(frozen=True)
class Scorer:
    """A scorer by name: ``score(prediction, ground-truth row)`` -> item score in [0, 1], or None
    when the prediction cannot be parsed (counted as wrong and reported as unparseable).
    ``answers``: what a test record must carry: "text" (``answer`` / ``answers``) or "box"
    (``answer_bbox`` and ``size``)."""

    name: str
    score: Any
    answers: str
    help: str


SCORERS: dict[str, Scorer] = {s.name: s for s in (
    Scorer("letter", _score_scienceqa, "text", "option letter (A, B, ...) parsed from the answer == the letter (ScienceQA)"),
    Scorer("vqa", _score_textvqa, "text", "VQA soft accuracy over `answers` (>= 2), else normalised exact match (TextVQA)"),
    Scorer("label", _score_imagenet, "text", "class label, case and a final period ignored (ImageNet)"),
    Scorer("gqa", _score_gqa, "text", "exact match, case and surrounding periods ignored (GQA)"),
    Scorer("exact", _score_exact_ci, "text", "exact match, case and surrounding spaces ignored (VizWiz, VQAv2, OCR-VQA)"),
    Scorer("iou", _score_grounding, "box", "box IoU with `answer_bbox` > 0.5 (Grounding)"),
)}

# the scorer of each CoIN task (where the task description and CoIN's evaluation code differ, the code decides)
COIN_SCORERS: dict[str, str] = {
    "ScienceQA": "letter", "TextVQA": "vqa", "ImageNet": "label", "GQA": "gqa", "VizWiz": "exact",
    "Grounding": "iou", "VQAv2": "exact", "OCRVQA": "exact",
}
assert set(COIN_SCORERS) == set(COIN_TASKS)


def register_scorer(name: str, score: Any, *, answers: str = "text", help: str = "") -> None:
    """Add a scorer by name (e.g. from a method plugin or a user module)."""
    if name in SCORERS:
        raise ValueError(f"scorer {name!r} exists")
    if answers not in ("text", "box"):
        raise ValueError(f"scorer {name!r}: answers must be 'text' or 'box'")
    SCORERS[name] = Scorer(name, score, answers, help)


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
