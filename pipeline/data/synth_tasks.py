"""The eight CoIN-synth tasks: vocabularies, question templates and one generator per task.

Each generator draws one :class:`Sample` (an image and its QA turns) from a seeded numpy Generator.
The tasks share one visual world (coloured shapes, rendered words) but differ in image style
(backgrounds, layouts, object counts, degradations), question templates and answer format, the way
CoIN's source datasets do. Task -> skill -> answer format:

    ScienceQA  diagram questions, options listed         letter "A".."D"
    TextVQA    read the word on a sign                   word (10 annotator answers)
    ImageNet   classify one object into 12 classes       class name
    GQA        spatial/attribute relations, 2-3 objects  colour / shape / yes / no / left / right
    VizWiz     degraded photos                           colour / shape / label word / "unanswerable"
    Grounding  referring expression -> box               "[x1, y1, x2, y2]" (2 decimals, in [0, 1])
    VQAv2      counting, colour, existence, 1-6 objects  digit / colour / shape / yes / no
    OCRVQA     book cover: title, author, genre          Title / Author / genre / yes / no

``Sample.chance`` is the expected score of a uniform guess over the answer set of the question's
type (Grounding: a uniform guess over the layout grammar's boxes, scored IoU > 0.5).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

import numpy as np

from . import synth_render as R
from .synth_render import COLORS, SHAPES, Obj, pick

# ---------------------------------------------------------------------------------------------
# Instructions (CoIN "Original" type, verbatim from docs/coin.md)
# ---------------------------------------------------------------------------------------------
SHORT = "Answer the question using a single word or phrase."
LETTER = "Answer with the option's letter from the given choices directly."
IMAGENET_QUESTION = "What is the object in the image?"
GROUNDING_PREFIX = "Please provide the bounding box coordinate of the region this sentence describes:"

# Every instruction text a task appends; the pre-training corpus must contain none of them.
INSTRUCTION_SUFFIXES: dict[str, str] = {
    "ScienceQA": LETTER,
    "TextVQA": SHORT,
    "ImageNet": f"{IMAGENET_QUESTION}\n{SHORT}",
    "GQA": SHORT,
    "VizWiz": SHORT,
    "Grounding": GROUNDING_PREFIX,
    "VQAv2": SHORT,
    "OCRVQA": SHORT,
}

# ---------------------------------------------------------------------------------------------
# Vocabularies
# ---------------------------------------------------------------------------------------------
COLOR_NAMES = tuple(COLORS)
WORDS = ("stop", "open", "exit", "sale", "cafe", "taxi", "bus", "park", "hotel", "bank",
         "pizza", "milk", "fire", "zoo", "gym", "shop", "free", "push", "pull", "bar")  # TextVQA signs
LABELS = ("soup", "tea", "rice", "salt", "corn", "jam", "oil", "beans")  # VizWiz product labels
TITLES = ("Moon", "Rain", "Gold", "Wolf", "Sea", "Rose", "Snow", "Iron", "Dusk", "Oak", "Fox", "Night")
AUTHORS = ("Lee", "Kim", "Ross", "Hale", "Dunn", "Ward", "Cole", "Moss", "Reid", "Beck")
GENRES = {"circle": "science", "triangle": "travel", "cross": "health", "diamond": "fantasy", "square": "history"}
UNANSWERABLE = "unanswerable"

# ImageNet classes: shape, base colour, texture (kind, second colour) or None, decoration.
WHITE, BLACK = (238, 238, 238), (25, 25, 25)
IMAGENET_CLASSES: dict[str, tuple] = {
    "tomato": ("circle", (210, 35, 35), None, "stem"),
    "lemon": ("circle", (240, 220, 50), None, None),
    "button": ("circle", (45, 85, 215), ("dots", WHITE), None),
    "donut": ("ring", (200, 130, 60), None, None),
    "brick": ("square", (180, 75, 45), ("hstripes", (200, 200, 200)), None),
    "tile": ("square", (45, 85, 215), ("checker", WHITE), None),
    "dice": ("square", WHITE, ("dots", BLACK), None),
    "medkit": ("square", WHITE, None, "cross"),
    "pyramid": ("triangle", (215, 185, 110), None, None),
    "tree": ("triangle", (40, 150, 60), None, "trunk"),
    "kite": ("diamond", (215, 40, 40), None, None),
    "gem": ("diamond", (140, 60, 190), ("checker", (190, 130, 230)), None),
}


@dataclass
class Sample:
    """One generated image with its QA turns.

    turns: [(question, answer)], the question without instruction; Grounding: the description.
    answers: TextVQA's 10 annotator answers (else empty). chance: uniform-guess score of turn 0.
    """

    image: np.ndarray
    turns: list[tuple[str, str]]
    chance: float
    answers: list[str] = field(default_factory=list)


@dataclass(frozen=True)
class TaskDef:
    generate: Callable[[np.random.Generator, int, bool], Sample]  # (rng, image_size, train)
    prompt: Callable[[str], str]  # question -> full human text (question + instruction)


def _suffixed(suffix: str) -> Callable[[str], str]:
    return lambda q: f"{q}\n{suffix}"


def _choose_turns(rng: np.random.Generator, candidates: list, train: bool, p_multi: float = 0.15):
    """Pick one candidate (question, answer, chance); on train, sometimes a second distinct one."""
    order = rng.permutation(len(candidates))
    n = 2 if train and len(candidates) > 1 and rng.random() < p_multi else 1
    chosen = [candidates[i] for i in order[:n]]
    return [(q, a) for q, a, _ in chosen], chosen[0][2]


def _other(rng: np.random.Generator, pool, exclude) -> str:
    return pick(rng, [x for x in pool if x != exclude])


# ---------------------------------------------------------------------------------------------
# 1. ScienceQA: diagram questions with lettered options
# ---------------------------------------------------------------------------------------------
def scienceqa(rng: np.random.Generator, size: int, train: bool) -> Sample:
    u = R.unit(size)
    canvas = R.bg_paper(rng, size)
    kind = pick(rng, ("colour", "shape", "larger", "count", "common"))
    k = int(rng.integers(3, 5))  # number of options (3 or 4: the answer letter is near uniform)
    if kind in ("colour", "shape"):
        objs = [Obj(pick(rng, SHAPES), pick(rng, COLOR_NAMES), 0, 0, int(rng.integers(10, 19)) * u)]
    elif kind == "count":
        objs = [Obj(pick(rng, SHAPES), pick(rng, COLOR_NAMES), 0, 0, int(rng.integers(6, 10)) * u)
                for _ in range(int(rng.integers(1, 5)))]
    else:  # two objects of clearly different sizes
        a, b = rng.choice(len(COLOR_NAMES), 2, replace=False)
        s1, s2 = rng.choice(len(SHAPES), 2, replace=False)
        if kind == "common":  # share exactly one of colour / shape
            if rng.random() < 0.5:
                b = a
            else:
                s2 = s1
        objs = [Obj(SHAPES[s1], COLOR_NAMES[a], 0, 0, int(rng.integers(6, 9)) * u),
                Obj(SHAPES[s2], COLOR_NAMES[b], 0, 0, int(rng.integers(13, 17)) * u)]
        objs = [objs[i] for i in rng.permutation(2)]
    corners = R.place(rng, [o.w for o in objs], (2 * u, 2 * u, size - 2 * u, size - 2 * u), gap=2 * u)
    if corners is None:  # rare: retry with a fresh draw
        return scienceqa(rng, size, train)
    for o, (x, y) in zip(objs, corners):
        o = Obj(o.shape, o.color, x, y, o.w)
        R.outline(canvas, R.draw_obj(rng, canvas, o))

    if kind == "colour":
        q = pick(rng, ("Which colour is the shape in the diagram?", "What colour is the shape shown in the diagram?",
                       "Which colour best describes the object in the diagram?"))
        right, pool = objs[0].color, COLOR_NAMES
    elif kind == "shape":
        q = pick(rng, ("Which shape is shown in the diagram?", "Which figure is drawn in the diagram?"))
        right, pool = objs[0].shape, SHAPES
    elif kind == "larger":
        q = pick(rng, ("Which colour is the larger shape?", "The larger shape in the diagram has which colour?"))
        big, small = sorted(objs, key=lambda o: -o.w)
        right, pool = big.color, COLOR_NAMES
    elif kind == "count":
        q = pick(rng, ("How many shapes are in the diagram?", "How many figures does the diagram show?"))
        right, pool = str(len(objs)), ("1", "2", "3", "4", "5")
    else:
        q = pick(rng, ("Which property do the two shapes have in common?",
                       "What do the two figures in the diagram have in common?"))
        right = "colour" if objs[0].color == objs[1].color else "shape"
        pool = ("colour", "shape", "size")  # sizes always differ, so only one is right
        k = min(k, 3)
    distractors = [pool[i] for i in rng.permutation(len(pool)) if pool[i] != right]
    if kind == "larger":  # the smaller shape's colour is always among the options
        distractors = [small.color] + [d for d in distractors if d != small.color]
    options = [right] + distractors[: k - 1]
    return Sample(canvas, [lettered(rng, q, options)], 1.0 / len(options))


def lettered(rng: np.random.Generator, question: str, options: list[str]) -> tuple[str, str]:
    """(question with the shuffled options listed "A. ..", one per line; the right one's letter).
    ``options[0]`` is the right answer."""
    shuffled = [options[i] for i in rng.permutation(len(options))]
    text = question + "\n" + "\n".join(f"{'ABCD'[i]}. {o}" for i, o in enumerate(shuffled))
    return text, "ABCD"[shuffled.index(options[0])]


# ---------------------------------------------------------------------------------------------
# 2. TextVQA: read the word on a sign
# ---------------------------------------------------------------------------------------------
SIGN_STYLES = (((240, 240, 235), BLACK), ((235, 205, 40), BLACK), ((30, 100, 50), WHITE),
               ((30, 50, 130), WHITE), ((190, 30, 30), WHITE), (BLACK, (240, 210, 60)))


def textvqa(rng: np.random.Generator, size: int, train: bool) -> Sample:
    u = R.unit(size)
    if rng.random() < 0.5:
        canvas = R.bg_horizon(rng, size, pick(rng, R.SKY_BG), pick(rng, R.GROUND_BG), rng.uniform(0.3, 0.7))
    else:
        canvas = R.bg_gradient(rng, size, pick(rng, R.SKY_BG), pick(rng, R.DARK_BG))
    word = pick(rng, WORDS)
    sign_w = min(32, 6 * len(word) + 2)
    sx, sy = int(rng.integers(0, 33 - sign_w)), int(rng.integers(1, 22))
    if rng.random() < 0.5:  # a distractor shape above or below the sign
        w = int(rng.integers(5, 8))
        y = int(rng.integers(0, max(1, sy - w))) if sy >= 12 else int(rng.integers(sy + 11, 33 - w))
        shape, color, x = pick(rng, SHAPES), pick(rng, COLOR_NAMES), int(rng.integers(0, 33 - w))
        R.draw_obj(rng, canvas, Obj(shape, color, x * u, y * u, w * u))
    board, ink = pick(rng, SIGN_STYLES)
    canvas[sy * u : (sy + 10) * u, sx * u : (sx + sign_w) * u] = R.jitter(rng, board, 8)
    R.stamp_text(canvas, word.upper(), (sx + (sign_w - 6 * len(word) + 1) // 2) * u, (sy - 1) * u, ink)

    q = pick(rng, ("What does the sign say?", "What word is written on the sign?", "What is written on the sign?",
                   "What does the sign read?", "Which word is shown on the sign?"))
    n_main = int(rng.integers(6, 11))
    variants = [pick(rng, (f"{word} sign", _other(rng, WORDS, word), f"{word}s")) for _ in range(10 - n_main)]
    answers = [word] * n_main + variants
    answers = [answers[i] for i in rng.permutation(10)]
    return Sample(canvas, [(q, word)], 1.0 / len(WORDS), answers)


# ---------------------------------------------------------------------------------------------
# 3. ImageNet: one object, 12 named classes
# ---------------------------------------------------------------------------------------------
def imagenet(rng: np.random.Generator, size: int, train: bool) -> Sample:
    u = R.unit(size)
    name = pick(rng, tuple(IMAGENET_CLASSES))
    shape, rgb, texture, deco = IMAGENET_CLASSES[name]
    canvas = R.bg_blotchy(rng, size, pick(rng, R.LIGHT_BG + R.DARK_BG))
    w = int(rng.integers(16, 24))
    x = int(np.clip((32 - w) // 2 + rng.integers(-3, 4), 0, 32 - w))
    y = int(np.clip((32 - w) // 2 + rng.integers(-3, 4), 3, 29 - w))
    mask = R.shape_mask(shape, x * u, y * u, w * u, size)
    col = R.jitter(rng, rgb, 14)
    if texture is None:
        R.paint(canvas, mask, col)
    else:
        R.paint_texture(canvas, mask, texture[0], col, R.jitter(rng, texture[1], 10), period=max(3, w // 5) * u)
    c = (x + w // 2) * u
    if deco == "stem":
        canvas[(y - 2) * u : (y + 1) * u, c - u : c + u] = R.jitter(rng, (40, 140, 40), 10)
    elif deco == "trunk":
        canvas[(y + w) * u : (y + w + 3) * u, c - 2 * u : c + 2 * u] = R.jitter(rng, (110, 70, 35), 10)
    elif deco == "cross":
        t = w // 2
        R.paint(canvas, R.shape_mask("cross", (x + (w - t) // 2) * u, (y + (w - t) // 2) * u, t * u, size),
                R.jitter(rng, (210, 30, 30), 10))
    return Sample(canvas, [(IMAGENET_QUESTION, name)], 1.0 / len(IMAGENET_CLASSES))


# ---------------------------------------------------------------------------------------------
# 4. GQA: relations between 2-3 objects of distinct shapes
# ---------------------------------------------------------------------------------------------
def gqa(rng: np.random.Generator, size: int, train: bool) -> Sample:
    u = R.unit(size)
    canvas = R.bg_horizon(rng, size, pick(rng, R.SKY_BG), pick(rng, R.GROUND_BG), rng.uniform(0.35, 0.6))
    n = int(rng.integers(2, 4))
    shapes = [SHAPES[i] for i in rng.choice(len(SHAPES), n, replace=False)]
    slot = 32 // n  # one object per vertical slot, 2 units apart: left/right is never ambiguous
    objs = []
    for i, s in enumerate(shapes):
        w = int(rng.integers(7, min(11, slot - 1)))
        x = i * slot + 1 + int(rng.integers(0, slot - 1 - w))
        objs.append(Obj(s, pick(rng, COLOR_NAMES), x * u, int(rng.integers(1, 32 - w)) * u, w * u))
    a, b = (objs[i] for i in rng.choice(n, 2, replace=False))
    if rng.random() < 0.5:  # make "same colour?" questions balanced
        objs[objs.index(b)] = b = Obj(b.shape, a.color, b.x, b.y, b.w)
    for o in objs:
        R.draw_obj(rng, canvas, o)

    # "the shape left of X" must name exactly one object: objects are sorted left to right by slot
    pairs = [(objs[1], "left", objs[0]), (objs[n - 2], "right", objs[n - 1])]
    ref, side, other = pairs[int(rng.integers(2))]
    cands = [(pick(rng, (f"What colour is the shape {side} of the {ref.shape}?",
                         f"What is the colour of the object to the {side} of the {ref.shape}?")),
              other.color, 1 / len(COLOR_NAMES))]
    ref, side, other = pairs[int(rng.integers(2))]
    cands.append((pick(rng, (f"What shape is to the {side} of the {ref.color} {ref.shape}?",
                             f"Which shape is on the {side} side of the {ref.shape}?")),
                  other.shape, 1 / len(SHAPES)))
    if abs(a.cy - b.cy) >= 5 * u:
        rel = pick(rng, ("above", "below"))
        truth = (a.cy < b.cy) == (rel == "above")
        cands.append((f"Is the {a.shape} {rel} the {b.shape}?", "yes" if truth else "no", 0.5))
    cands.append((pick(rng, (f"Is the {a.shape} to the left or to the right of the {b.shape}?",
                             f"Is the {a.shape} on the left or right of the {b.shape}?")),
                  "left" if a.cx < b.cx else "right", 0.5))
    cands.append((pick(rng, (f"Are the {a.shape} and the {b.shape} the same colour?",
                             f"Do the {a.shape} and the {b.shape} have the same colour?")),
                  "yes" if a.color == b.color else "no", 0.5))
    turns, chance = _choose_turns(rng, cands, train)
    return Sample(canvas, turns, chance)


# ---------------------------------------------------------------------------------------------
# 5. VizWiz: degraded close-up photos, some unanswerable
# ---------------------------------------------------------------------------------------------
P_UNANSWERABLE = 0.25


def vizwiz(rng: np.random.Generator, size: int, train: bool) -> Sample:
    u = R.unit(size)
    kind = pick(rng, ("colour", "shape", "text"))
    canvas = R.bg_blotchy(rng, size, pick(rng, R.LIGHT_BG + R.DARK_BG), strength=12.0)
    unanswerable = rng.random() < P_UNANSWERABLE
    ruin = pick(rng, ("dark", "absent", "washed") + (("blur",) if kind != "colour" else ())) if unanswerable else None
    if kind == "text":
        word = pick(rng, LABELS)
        lw = 6 * len(word) + 2
        x, y = int(rng.integers(0, 33 - lw)), int(rng.integers(2, 20))
        if ruin != "absent":
            can = pick(rng, tuple(COLORS.values()))
            canvas[max(0, y - 4) * u : (y + 14) * u, max(0, x - 2) * u : (x + lw + 2) * u] = R.jitter(rng, can, 10)
            canvas[y * u : (y + 10) * u, x * u : (x + lw) * u] = R.jitter(rng, (236, 232, 220), 6)
            R.stamp_text(canvas, word.upper(), (x + 1) * u, (y - 1) * u, BLACK)
        answer, n_answers = word, len(LABELS)
        q = pick(rng, ("What does this say?", "Can you read this label?", "What is written on this?"))
    else:
        o = Obj(pick(rng, SHAPES), pick(rng, COLOR_NAMES), 0, 0, int(rng.integers(14, 23)) * u)
        if ruin != "absent":  # hand-held framing: up to a fifth of the object may leave the frame
            lo, hi = -(o.w // u) // 5, 32 - o.w // u + (o.w // u) // 5
            o = Obj(o.shape, o.color, int(rng.integers(lo, hi + 1)) * u, int(rng.integers(lo, hi + 1)) * u, o.w)
            R.draw_obj(rng, canvas, o)
        if kind == "colour":
            answer, n_answers = o.color, len(COLORS)
            q = pick(rng, ("What color is this?", "Can you tell me what color this is?", "What color is this item?"))
        else:
            answer, n_answers = o.shape, len(SHAPES)
            q = pick(rng, ("What is this?", "What shape is this?", "Can you tell me what shape this is?"))

    if ruin == "dark":
        canvas = R.brightness(canvas, rng.uniform(0.04, 0.09))
    elif ruin == "washed":
        canvas = R.wash_out(canvas, rng.uniform(0.96, 0.99))
    elif ruin == "blur":
        canvas = R.blur(canvas, rng.uniform(3.5, 5.0) * u)
    elif ruin is None:  # mild, information-preserving degradations
        if rng.random() < 0.5:
            canvas = R.blur(canvas, rng.uniform(0.3, 0.8) * u)
        canvas = R.brightness(canvas, rng.uniform(0.5, 1.05))
    canvas = R.noise(rng, canvas, rng.uniform(2.0, 7.0))
    return Sample(canvas, [(q, UNANSWERABLE if unanswerable else answer)], 1.0 / (n_answers + 1))


# ---------------------------------------------------------------------------------------------
# 6. Grounding: referring expression -> normalised box
# ---------------------------------------------------------------------------------------------
GRID, BOX_SIZES = 4, (8, 12)  # layout grammar in units: boxes on a 4-unit lattice, sides 8 or 12


def box_string(box: tuple[int, int, int, int], size: int) -> str:
    """Pixel box (x2/y2 exclusive) -> "[x1, y1, x2, y2]" normalised, rounded outwards to 2 decimals."""
    lo = [(v * 100) // size for v in box[:2]]
    hi = [-((-v * 100) // size) for v in box[2:]]
    return "[" + ", ".join(f"{c // 100}.{c % 100:02d}" for c in lo + hi) + "]"


def _iou(a, b) -> float:
    ix = max(0, min(a[2], b[2]) - max(a[0], b[0]))
    iy = max(0, min(a[3], b[3]) - max(a[1], b[1]))
    inter = ix * iy
    return inter / ((a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter)


def _grounding_chance(target: Obj, u: int) -> float:
    cands = [(x * u, y * u, (x + w) * u, (y + w) * u)
             for w in BOX_SIZES for x in range(0, 33 - w, GRID) for y in range(0, 33 - w, GRID)]
    return sum(_iou(c, target.box) > 0.5 for c in cands) / len(cands)


def _expressions(rng: np.random.Generator, t: Obj, objs: list[Obj], u: int) -> list[str]:
    """Every description that singles out ``t`` among ``objs``."""
    same_shape = [o for o in objs if o.shape == t.shape]
    out = []
    if sum(o.shape == t.shape and o.color == t.color for o in objs) == 1:
        out.append(f"the {t.color} {t.shape}")
    if len(same_shape) == 1:
        out.append(f"the {t.shape}")
    if sum(o.color == t.color for o in objs) == 1:
        out.append(f"the {t.color} {pick(rng, ('shape', 'object', 'one'))}")
    if len(same_shape) == 2:
        o = same_shape[1] if same_shape[0] == t else same_shape[0]
        if abs(o.cx - t.cx) >= 4 * u:
            out.append(f"the {t.shape} on the {'left' if t.cx < o.cx else 'right'}")
        if abs(o.cy - t.cy) >= 4 * u:
            out.append(f"the {'top' if t.cy < o.cy else 'bottom'} {t.shape}")
        if o.w != t.w:
            out.append(f"the {'big' if t.w > o.w else 'small'} {t.shape}")
    return out


def grounding(rng: np.random.Generator, size: int, train: bool) -> Sample:
    u = R.unit(size)
    canvas = R.bg_flat(rng, size, pick(rng, R.LIGHT_BG), noise=2.0)
    n = int(rng.integers(2, 5))
    sizes = [int(pick(rng, BOX_SIZES)) * u for _ in range(n)]
    corners = R.place(rng, sizes, (0, 0, size, size), gap=1, grid=GRID * u)
    if corners is None:
        return grounding(rng, size, train)
    shapes = [pick(rng, SHAPES) for _ in range(n)]
    if rng.random() < 0.35:  # a repeated shape calls for left/right, top/bottom, big/small
        shapes[1] = shapes[0]
    objs = [Obj(s, pick(rng, COLOR_NAMES), x, y, w) for s, (x, y), w in zip(shapes, corners, sizes)]
    options = [(o, e) for o in objs for e in _expressions(rng, o, objs, u)]
    if not options:
        return grounding(rng, size, train)
    for o in objs:
        R.draw_obj(rng, canvas, o, amount=10)
    target, expr = options[int(rng.integers(len(options)))]
    return Sample(canvas, [(expr, box_string(target.box, size))], _grounding_chance(target, u))


# ---------------------------------------------------------------------------------------------
# 7. VQAv2: counting, colour, existence on 1-6 small objects
# ---------------------------------------------------------------------------------------------
MAX_COUNT = 6


def vqav2(rng: np.random.Generator, size: int, train: bool) -> Sample:
    u = R.unit(size)
    palette = R.LIGHT_BG + R.DARK_BG + R.SKY_BG
    if rng.random() < 0.5:
        canvas = R.bg_flat(rng, size, pick(rng, palette))
    else:
        canvas = R.bg_gradient(rng, size, pick(rng, palette), pick(rng, palette))
    n = int(rng.integers(1, MAX_COUNT + 1))
    sizes = [int(rng.integers(6, 10)) * u for _ in range(n)]
    corners = R.place(rng, sizes, (0, 0, size, size), gap=u)
    if corners is None:
        return vqav2(rng, size, train)
    objs = [Obj(pick(rng, SHAPES), pick(rng, COLOR_NAMES), x, y, w) for (x, y), w in zip(corners, sizes)]
    for o in objs:
        R.draw_obj(rng, canvas, o)

    cands = [(pick(rng, ("How many shapes are there?", "How many objects are in the picture?",
                         "How many shapes are in the image?")), str(n), 1 / MAX_COUNT)]
    c = pick(rng, [o.color for o in objs]) if rng.random() < 0.75 else pick(rng, COLOR_NAMES)
    cands.append((pick(rng, (f"How many {c} shapes are there?", f"How many {c} objects are there?")),
                  str(sum(o.color == c for o in objs)), 1 / (MAX_COUNT + 1)))
    unique_shapes = [o for o in objs if sum(p.shape == o.shape for p in objs) == 1]
    if unique_shapes:
        o = pick(rng, unique_shapes)
        cands.append((pick(rng, (f"What colour is the {o.shape}?", f"What is the colour of the {o.shape}?")),
                      o.color, 1 / len(COLORS)))
    unique_colors = [o for o in objs if sum(p.color == o.color for p in objs) == 1]
    if unique_colors:
        o = pick(rng, unique_colors)
        cands.append((f"What shape is the {o.color} object?", o.shape, 1 / len(SHAPES)))
    present = {(o.color, o.shape) for o in objs}
    if rng.random() < 0.5:
        cs, ans = pick(rng, sorted(present)), "yes"
    else:
        absent = [(c, s) for c in COLOR_NAMES for s in SHAPES if (c, s) not in present]
        cs, ans = pick(rng, absent), "no"
    cands.append((pick(rng, (f"Is there a {cs[0]} {cs[1]}?", f"Is there a {cs[0]} {cs[1]} in the image?")), ans, 0.5))
    turns, chance = _choose_turns(rng, cands, train)
    return Sample(canvas, turns, chance)


# ---------------------------------------------------------------------------------------------
# 8. OCRVQA: book covers with a title, an author and a genre icon
# ---------------------------------------------------------------------------------------------
COVERS = (((130, 30, 40), WHITE), ((30, 40, 100), WHITE), ((30, 80, 50), (235, 200, 80)),
          ((230, 220, 190), BLACK), ((50, 50, 55), (235, 200, 80)), ((30, 110, 120), WHITE),
          ((200, 160, 50), BLACK))


def ocrvqa(rng: np.random.Generator, size: int, train: bool) -> Sample:
    u = R.unit(size)
    cover, ink = pick(rng, COVERS)
    canvas = R.bg_flat(rng, size, cover, noise=2.0)
    canvas[:, : 2 * u] = (R.jitter(rng, cover, 6).astype(np.int32) * 6 // 10).astype(np.uint8)  # spine
    title, author = pick(rng, TITLES), pick(rng, AUTHORS)
    shape = pick(rng, tuple(GENRES))
    genre = GENRES[shape]
    for word, top in ((title, 0), (author, 20)):
        R.stamp_text(canvas, word.upper(), (33 - 6 * len(word)) // 2 * u, top * u, ink)
    w = 8
    R.paint(canvas, R.shape_mask(shape, 12 * u, 12 * u, w * u, size), R.jitter(rng, ink, 8))

    other = _other(rng, tuple(GENRES.values()), genre)
    asked = genre if rng.random() < 0.5 else other
    cands = [
        (pick(rng, ("What is the title of this book?", "What is the name of this book?")), title, 1 / len(TITLES)),
        (pick(rng, ("Who wrote this book?", "Who is the author of this book?")), author, 1 / len(AUTHORS)),
        (pick(rng, ("What is the genre of this book?", "What type of book is this?")), genre, 1 / len(GENRES)),
        (f"Is this a {asked} book?", "yes" if asked == genre else "no", 0.5),
    ]
    turns, chance = _choose_turns(rng, cands, train=False)
    return Sample(canvas, turns, chance)


TASKS: dict[str, TaskDef] = {
    "ScienceQA": TaskDef(scienceqa, _suffixed(LETTER)),
    "TextVQA": TaskDef(textvqa, _suffixed(SHORT)),
    "ImageNet": TaskDef(imagenet, _suffixed(SHORT)),
    "GQA": TaskDef(gqa, _suffixed(SHORT)),
    "VizWiz": TaskDef(vizwiz, _suffixed(SHORT)),
    "Grounding": TaskDef(grounding, lambda desc: f"{GROUNDING_PREFIX} {desc}."),
    "VQAv2": TaskDef(vqav2, _suffixed(SHORT)),
    "OCRVQA": TaskDef(ocrvqa, _suffixed(SHORT)),
}
