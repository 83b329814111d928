"""Pre-training corpus of CoIN-synth: what the base model knows before continual tuning starts.

Two parts, the way LLaVA-1.5 comes to CoIN already able to see and answer:

* generic records (``pretrain_sample``): captions and generic QA about the shared visual world
  (coloured shapes, written words) with varied phrasing;
* skill records (``skill_sample``): the visual skills of seven tasks, drawn from the task generators
  on their own seed stream (never the train/test streams), asked as the bare question with, most of
  the time, a *pre-training dialect* reply hint ("Reply briefly.", "Give the letter only.").

By default no record contains a CoIN instruction text (``INSTRUCTION_SUFFIXES``), and Grounding's
box format is never taught: the base model meets CoIN's instructions and boxes first during
continual tuning. Locating is taught in the corpus's own convention, "(x1, y1) to (x2, y2)" with
CoIN-synth's normalised two-decimal coordinates (``corners``), for generic objects and for
Grounding's referring expressions: the base can point at things, and tuning on Grounding has to
learn CoIN's instruction and its "[x1, y1, x2, y2]" boxes. Measured effect (issue 3): a 2-layer 128-wide model cannot learn these skills
inside a task's few dozen tuning steps, so without skill records every method stayed near 0; with
them, tuning has to learn each task's instruction format and answer conventions on top of a base
that can see. The unseen instructions derail that base: its zero-shot answers are "left"/"right"
for nearly every question.

``generic_instructions=True`` (``data.synth.generic_instructions``) gives the base what LLaVA-1.5's
own instruction mix gives it: LLaVA-665K asks its VQA data with "Answer the question using a single
word or phrase." and its multiple-choice data with "Answer with the option's letter from the given
choices directly.", the texts CoIN's "Original" instructions reuse. Then some generic questions carry
the first (``P_SHORT``), and some generic records open with a multiple-choice question about the
visual world answered by letter (``P_CHOICE``). Skill records still never carry a CoIN instruction,
and the task-specific instructions (ImageNet's question, Grounding's prefix and boxes) never appear.
Measured in the README ("A base that knows LLaVA-1.5's generic instructions").
"""

from __future__ import annotations

import numpy as np

from . import synth_render as R
from .synth_render import COLORS, SHAPES, Obj, pick
from .synth_tasks import LABELS, LETTER, SHORT, TASKS, WORDS, box_string, lettered

COLOR_NAMES = tuple(COLORS)
EXTRA_WORDS = ("sun", "cat", "dog", "home", "book", "road", "city", "art", "news", "map")
READ_WORDS = WORDS + LABELS + EXTRA_WORDS
DARK_INKS = ((15, 15, 15), (170, 20, 20), (20, 40, 140))
LIGHT_INKS = ((245, 245, 245), (240, 210, 60))
NUMBER = ("zero", "one", "two", "three", "four", "five", "six")
# The two generic instructions of LLaVA-1.5's instruction mix (the texts CoIN's "Original"
# instructions reuse); with ``generic_instructions`` generic records carry them, skill records never.
GENERIC_INSTRUCTIONS = (SHORT, LETTER)
P_SHORT = 0.5  # share of generic short-answer questions asked with SHORT
P_CHOICE = 0.25  # share of generic records (with shapes) that open with a multiple-choice question


def _background(rng: np.random.Generator, size: int) -> np.ndarray:
    style = pick(rng, ("flat", "gradient", "horizon", "blotchy", "paper"))
    palette = R.LIGHT_BG + R.DARK_BG + R.SKY_BG + R.GROUND_BG
    if style == "flat":
        return R.bg_flat(rng, size, pick(rng, palette))
    if style == "gradient":
        return R.bg_gradient(rng, size, pick(rng, palette), pick(rng, palette))
    if style == "horizon":
        return R.bg_horizon(rng, size, pick(rng, R.SKY_BG), pick(rng, R.GROUND_BG), rng.uniform(0.3, 0.7))
    if style == "blotchy":
        return R.bg_blotchy(rng, size, pick(rng, palette))
    return R.bg_paper(rng, size)


def _side(o: Obj, size: int) -> str:
    c = o.cx / size
    return "left" if c < 0.4 else "right" if c > 0.6 else "middle"


def pretrain_sample(rng: np.random.Generator, size: int, generic_instructions: bool = False
                    ) -> tuple[np.ndarray, list[tuple[str, str]]]:
    """One image (0-4 shapes, maybe a written word) and 1-3 (question, answer) turns; with
    ``generic_instructions``, some turns in LLaVA-1.5's two generic instruction formats."""
    u = R.unit(size)
    canvas = _background(rng, size)
    word = pick(rng, READ_WORDS) if rng.random() < 0.3 else None
    area = (0, 0, size, size)
    if word:  # a line of text at the top or bottom; the shapes share the rest of the image
        top = pick(rng, (0, 19))
        band = canvas[(top + 3) * u : (top + 9) * u]
        ink = pick(rng, DARK_INKS if band.mean() > 128 else LIGHT_INKS)  # always legible
        R.stamp_text(canvas, word.upper(), (33 - 6 * len(word)) // 2 * u, top * u, ink)
        area = (0, 11 * u, size, size) if top == 0 else (0, 0, size, 20 * u)
    n = int(rng.integers(0, 3)) if word else int(rng.integers(1, 5))
    sizes = [int(rng.integers(6, 15 if n <= 2 and not word else 10)) * u for _ in range(n)]
    corners = R.place(rng, sizes, area, gap=u) or []  # rarely too crowded: then no shapes
    objs = sorted((Obj(pick(rng, SHAPES), pick(rng, COLOR_NAMES), x, y, w) for (x, y), w in zip(corners, sizes)),
                  key=lambda o: o.cx)
    for o in objs:
        R.draw_obj(rng, canvas, o)
    return canvas, _questions(rng, objs, word, size, generic_instructions)


def _questions(rng: np.random.Generator, objs: list[Obj], word: str | None, size: int,
               generic_instructions: bool) -> list[tuple[str, str]]:
    parts = [f"{'an' if o.color[0] in 'aeiou' else 'a'} {o.color} {o.shape}" for o in objs]
    if word:
        parts.append(f"the word {word}")
    caption = " and ".join(parts) if len(parts) <= 2 else ", ".join(parts[:-1]) + " and " + parts[-1]
    cands = [(pick(rng, ("Describe the image.", "Give a short description of this picture.",
                         "What can you see here?", "Write a caption for the picture.")), caption)]
    if word:
        cands.append((pick(rng, ("Read the word in the picture.", "Which word appears in the image?",
                                 "Tell me the text you see.", "What word can you read here?")), word))
    cands.append((pick(rng, ("Count the shapes in the picture.", "How many things can you see?",
                             "Tell me the number of shapes.", "Count the objects here.")),
                  str(len(objs)) if rng.random() < 0.7 else NUMBER[len(objs)]))
    if objs:
        shapes, colors = [o.shape for o in objs], [o.color for o in objs]
        o = pick(rng, objs)
        if shapes.count(o.shape) == 1:
            cands.append((pick(rng, (f"Tell me the colour of the {o.shape}.", f"The {o.shape} has which colour?",
                                     f"Name the colour of the {o.shape}.", f"What colour does the {o.shape} have?")),
                          o.color))
            cands.append((pick(rng, (f"Where is the {o.shape}?", f"On which side is the {o.shape}?",
                                     f"Tell me where the {o.color} {o.shape} is.")), _side(o, size)))
            cands.append((pick(rng, LOCATE_QUESTIONS).format(thing=f"the {o.shape}"), corners(o.box, size)))
        if colors.count(o.color) == 1:
            cands.append((pick(rng, (f"Name the shape that is {o.color}.", f"Which kind of shape is {o.color}?",
                                     f"Tell me the shape of the {o.color} thing.")), o.shape))
    if rng.random() < 0.5 and objs:
        c, s, ans = objs[0].color, objs[0].shape, "yes"
    else:
        c, s = pick(rng, COLOR_NAMES), pick(rng, SHAPES)
        ans = "yes" if any(o.color == c and o.shape == s for o in objs) else "no"
    cands.append((pick(rng, (f"Can you see a {c} {s}?", f"Does the picture contain a {c} {s}?",
                             f"Is a {c} {s} visible?")), ans))
    order = rng.permutation(len(cands))
    n_turns = 1 if rng.random() < 0.6 else int(rng.integers(2, 4))
    turns = [cands[i] for i in order[:n_turns]]
    if not generic_instructions:  # (draws nothing more: the default corpus stays as it was)
        return turns
    turns = [(f"{q}\n{SHORT}" if i and rng.random() < P_SHORT else q, a)  # not the caption (cands[0])
             for i, (q, a) in zip(order, turns)]
    if objs and rng.random() < P_CHOICE:
        turns = [_choice(rng, objs)] + turns[: n_turns - 1]
    return turns


def _choice(rng: np.random.Generator, objs: list[Obj]) -> tuple[str, str]:
    """A multiple-choice question about the colour of the only object of its shape (or the shape of
    the only object of its colour), answered by letter."""
    shapes, colors = [o.shape for o in objs], [o.color for o in objs]
    by_shape = [o for o in objs if shapes.count(o.shape) == 1]
    by_color = [o for o in objs if colors.count(o.color) == 1]
    if by_shape and (not by_color or rng.random() < 0.5):
        o = pick(rng, by_shape)
        q = pick(rng, (f"What colour is the {o.shape}?", f"Which colour does the {o.shape} have?"))
        right, pool = o.color, COLOR_NAMES
    elif by_color:
        o = pick(rng, by_color)
        q = pick(rng, (f"Which shape is {o.color}?", f"What kind of shape is the {o.color} one?"))
        right, pool = o.shape, SHAPES
    else:  # every shape and every colour repeats: ask how many objects there are
        q, right, pool = "How many shapes can you see?", str(len(objs)), ("1", "2", "3", "4", "5")
    k = int(rng.integers(2, 5))
    options = [right] + [pool[i] for i in rng.permutation(len(pool)) if pool[i] != right][: k - 1]
    text, letter = lettered(rng, q, options)
    return f"{text}\n{LETTER}", letter


def corners(box: tuple[int, int, int, int], size: int) -> str:
    """The corpus's locating answer: "(x1, y1) to (x2, y2)", the numbers of CoIN-synth's
    normalised box (``box_string``) in another convention than Grounding's "[x1, y1, x2, y2]"."""
    x1, y1, x2, y2 = box_string(box, size).strip("[]").split(", ")
    return f"({x1}, {y1}) to ({x2}, {y2})"


LOCATE_QUESTIONS = ("Where exactly is {thing}? Give its corners.", "Give the corners of {thing}.",
                    "Point out {thing} with its two corners.", "Which corners frame {thing}?")

# Tasks whose skill is pre-trained. Grounding's is taught in the corpus's own locating convention
# (``corners``); its CoIN instruction and "[x1, y1, x2, y2]" boxes are left for continual tuning.
SKILL_TASKS = ("ScienceQA", "TextVQA", "ImageNet", "GQA", "VizWiz", "Grounding", "VQAv2", "OCRVQA")
# Reply hints of the pre-training dialect; none is (part of) a CoIN instruction.
REPLY_HINTS = ("Reply briefly.", "Give a short answer.", "One word, please.", "Keep it short.",
               "Answer in a few words.", "Be concise.", "Tell me quickly.")
LETTER_HINTS = ("Reply with the letter.", "Pick one option.", "Choose the right option.", "Give the letter only.")
P_HINT = 0.7
OBJECT_QUESTIONS = ("What object is this?", "Name the object in the picture.", "Which object is shown?")


def skill_sample(rng: np.random.Generator, task: str, size: int) -> tuple[np.ndarray, list[tuple[str, str]]]:
    """One skill record of ``task``: the task generator's image and QA turns, each question followed
    by a reply hint with probability ``P_HINT`` (a letter hint for ScienceQA)."""
    if task not in SKILL_TASKS:
        raise ValueError(f"no pre-training skill records for {task!r}; skill tasks: {SKILL_TASKS}")
    sample = TASKS[task].generate(rng, size, True)
    if task == "Grounding":  # the referring expression, asked generically, answered in corners
        (expr, box), = sample.turns
        x1, y1, x2, y2 = box.strip("[]").split(", ")
        return sample.image, [(pick(rng, LOCATE_QUESTIONS).format(thing=expr), f"({x1}, {y1}) to ({x2}, {y2})")]
    if task == "ImageNet":  # ImageNet's question is part of its CoIN instruction: ask it another way
        sample.turns = [(pick(rng, OBJECT_QUESTIONS), a) for _, a in sample.turns]
    hints = LETTER_HINTS if task == "ScienceQA" else REPLY_HINTS
    turns = [(f"{q}\n{pick(rng, hints)}" if rng.random() < P_HINT else q, a) for q, a in sample.turns]
    return sample.image, turns
