"""The caption grammar of the synthetic source: what a caption can say, and scenes that make it true.

Captions come from a small fixed grammar that covers GenEval's six categories (Ghosh et al., 2023,
"GenEval: An Object-Focused Framework for Evaluating Text-to-Image Alignment"). As in GenEval, the
*form* of a caption names its category, so `parse_caption` needs nothing but the text:

=============  =========================================  ==========================================
category       form                                       what a correct image shows
=============  =========================================  ==========================================
single_object  "a star", "a small star"                   at least one star (of that size)
two_object     "a circle and a square"                    a circle and a square (any colours)
counting       "three green triangles"                    exactly 3 green triangles (2 or 3)
colors         "a purple square", "a large red circle"    a purple square
position       "a red circle to the left of a blue        the red circle's centre left of the blue
               square" (left of / right of / above /      square's; or the star's centre in that
               below); "a small yellow star in the top    cell of a 3x3 grid
               left" (5 absolute positions)
color_attr     "a green square and a red triangle"        each colour on its own shape (binding)
=============  =========================================  ==========================================

Scenes: 1-3 flat shapes on a plain background, a coarse 3x3 grid (+-2 px), two sizes, never touching;
simple enough for a tiny diffusion model, and checkable by code (`ldm.evaluation`).

Held-out prompts: about 10% of each category's captions (at least 2 per category) are set aside by a
stable hash of the caption text; the source never emits them, so evaluation prompts are unseen. Hard
negatives (one attribute away from a caption) are in `ldm.synth.negatives`.
"""

from __future__ import annotations

import hashlib
import json
import re
from dataclasses import asdict, dataclass, field
from functools import cache

import numpy as np

# --- vocabulary ---------------------------------------------------------------------------------
# Picked so that every pair of colours stays >100 apart in RGB (they must survive a lossy 4x
# autoencoder) and every colour is >120 away from the background.
COLORS: dict[str, tuple[int, int, int]] = {
    "red": (220, 30, 30),
    "green": (30, 170, 50),
    "blue": (40, 70, 230),
    "yellow": (240, 230, 40),
    "purple": (150, 50, 200),
    "orange": (255, 128, 0),
    "cyan": (30, 200, 220),
    "white": (245, 245, 245),
}
BACKGROUND: tuple[int, int, int] = (50, 50, 50)  # dark grey: no shape colour is close to it
SHAPES: tuple[str, ...] = ("circle", "square", "triangle", "star")
SIZES: tuple[str, ...] = ("small", "large")
# Absolute positions, as (column, row) cells of the 3x3 grid.
POSITIONS: dict[str, tuple[int, int]] = {
    "top left": (0, 0),
    "top right": (2, 0),
    "bottom left": (0, 2),
    "bottom right": (2, 2),
    "center": (1, 1),
}
RELATIONS: tuple[str, ...] = ("left of", "right of", "above", "below")
CATEGORIES: tuple[str, ...] = ("single_object", "two_object", "counting", "colors", "position", "color_attr")
COUNT_WORDS: dict[int, str] = {2: "two", 3: "three"}

# --- geometry (64 px reference; `render.py` scales to other sizes) --------------------------------
REFERENCE_SIZE = 64
GRID = 3  # the canvas is a 3x3 grid of cells
GRID_CENTERS: tuple[int, ...] = (12, 32, 52)  # pixel centre of each column/row at 64 px
# Centres move up to this many pixels off the grid point (staying inside the canvas): it multiplies the
# number of distinct pictures by ~25, so the source needs no repeated images, and stays far below the
# 20 px grid spacing, so the cell and the relation of every object are never in doubt.
JITTER = 2
# Half-extent in pixels of each size: a shape of size s fits in a (2r x 2r) box around its centre.
SIZE_RADIUS: dict[str, int] = {"small": 7, "large": 11}
MIN_GAP = 3  # pixels of background kept between the bounding boxes of any two shapes

_RELATION_PHRASES: dict[str, str] = {"left of": "to the left of", "right of": "to the right of",
                                     "above": "above", "below": "below"}  # fmt: skip
HELDOUT_FRACTION = 0.10
MIN_HELDOUT_PER_CATEGORY = 2


@dataclass(frozen=True)
class SceneObject:
    """One flat shape; ``cx, cy`` is its centre in pixels of a 64 px canvas."""

    color: str
    shape: str
    size: str
    cx: int
    cy: int


@dataclass(frozen=True)
class ObjectSpec:
    """What a caption asserts about one kind of object. ``None`` means "any"."""

    shape: str
    color: str | None = None
    size: str | None = None
    count: int = 1


@dataclass(frozen=True)
class PromptSpec:
    """What a caption asserts, in a form code can check.

    ``relation`` (position, relative): ``objects[0]`` is ``relation`` ``objects[1]``.
    ``position`` (position, absolute): the centre of ``objects[0]`` lies in that grid cell.
    """

    category: str
    objects: tuple[ObjectSpec, ...]
    relation: str | None = None
    position: str | None = None

    def caption(self) -> str:
        return format_caption(self)

    def to_json(self) -> str:
        return json.dumps(asdict(self), sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> PromptSpec:
        data = json.loads(text)
        objects = tuple(ObjectSpec(**o) for o in data.pop("objects"))
        return cls(objects=objects, **data)


@dataclass(frozen=True)
class Scene:
    """A renderable scene and the caption that describes it."""

    objects: tuple[SceneObject, ...]
    background: tuple[int, int, int]
    caption: str
    category: str
    spec: PromptSpec = field(repr=False)


# --- captions -----------------------------------------------------------------------------------
def _article(next_word: str) -> str:
    return "an" if next_word[0] in "aeiou" else "a"


def _noun_phrase(obj: ObjectSpec) -> str:
    words = [w for w in (obj.size, obj.color) if w]
    if obj.count == 1:
        words.append(obj.shape)
        return f"{_article(words[0])} {' '.join(words)}"
    return " ".join([COUNT_WORDS[obj.count], *words, obj.shape + "s"])


def format_caption(spec: PromptSpec) -> str:
    """The canonical caption of a spec (``parse_caption(format_caption(s)) == s``)."""
    phrases = [_noun_phrase(o) for o in spec.objects]
    if spec.relation is not None:
        return f"{phrases[0]} {_RELATION_PHRASES[spec.relation]} {phrases[1]}"
    if spec.position is not None:
        return f"{phrases[0]} in the {spec.position}"
    return " and ".join(phrases)


def _alternation(words) -> str:
    return "|".join(re.escape(w) for w in words)


_NP = (
    rf"an? (?:(?P<size{{i}}>{_alternation(SIZES)}) )?(?:(?P<color{{i}}>{_alternation(COLORS)}) )?"
    rf"(?P<shape{{i}}>{_alternation(SHAPES)})"
)
_NP1, _NP2 = _NP.format(i=1), _NP.format(i=2)
_RE_ONE = re.compile(rf"{_NP1}")
_RE_TWO = re.compile(rf"{_NP1} and {_NP2}")
_RE_COUNT = re.compile(
    rf"(?P<count>{_alternation(COUNT_WORDS.values())}) (?:(?P<size1>{_alternation(SIZES)}) )?"
    rf"(?:(?P<color1>{_alternation(COLORS)}) )?(?P<shape1>{_alternation(SHAPES)})s"
)
_RE_RELATIVE = re.compile(rf"{_NP1} (?P<relation>{_alternation(_RELATION_PHRASES.values())}) {_NP2}")
_RE_ABSOLUTE = re.compile(rf"{_NP1} in the (?P<position>{_alternation(POSITIONS)})")
# Matches the absolute-position captions and no other: the demo oversamples them (`ldm/config/demo.py`).
ABSOLUTE_POSITION_PATTERN = rf" in the ({'|'.join(POSITIONS)})$"


def _object(match: re.Match, i: int, count: int = 1) -> ObjectSpec:
    return ObjectSpec(shape=match[f"shape{i}"], color=match[f"color{i}"], size=match[f"size{i}"], count=count)


def parse_caption(text: str) -> PromptSpec:
    """Caption -> `PromptSpec`; raises ValueError for text outside the grammar."""
    caption = " ".join(text.strip().lower().split())
    if m := _RE_ONE.fullmatch(caption):
        obj = _object(m, 1)
        return PromptSpec("colors" if obj.color else "single_object", (obj,))
    if m := _RE_COUNT.fullmatch(caption):
        count = {w: n for n, w in COUNT_WORDS.items()}[m["count"]]
        return PromptSpec("counting", (_object(m, 1, count),))
    if m := _RE_ABSOLUTE.fullmatch(caption):
        return PromptSpec("position", (_object(m, 1),), position=m["position"])
    if m := _RE_RELATIVE.fullmatch(caption):
        relation = {p: r for r, p in _RELATION_PHRASES.items()}[m["relation"]]
        return PromptSpec("position", (_object(m, 1), _object(m, 2)), relation=relation)
    if m := _RE_TWO.fullmatch(caption):
        first, second = _object(m, 1), _object(m, 2)
        if first.shape == second.shape:
            raise ValueError(f"caption {text!r}: the two objects must be different shapes")
        if first.color is None and second.color is None:
            return PromptSpec("two_object", (first, second))
        if first.color is None or second.color is None or first.color == second.color:
            raise ValueError(f"caption {text!r}: give both objects distinct colours, or neither a colour")
        return PromptSpec("color_attr", (first, second))
    raise ValueError(f"caption {text!r} is outside the synthetic grammar")


# --- the caption space, and the held-out split ----------------------------------------------------
def _sizes_or_none():
    return (None, *SIZES)


@cache
def all_captions() -> dict[str, tuple[str, ...]]:
    """Every caption the source can emit, per category (a few thousand; enumerated once)."""
    out: dict[str, list[str]] = {c: [] for c in CATEGORIES}
    for shape in SHAPES:
        for size in _sizes_or_none():
            out["single_object"].append(
                format_caption(PromptSpec("single_object", (ObjectSpec(shape, None, size),)))
            )
            for color in COLORS:
                out["colors"].append(format_caption(PromptSpec("colors", (ObjectSpec(shape, color, size),))))
                for position in POSITIONS:
                    spec = PromptSpec("position", (ObjectSpec(shape, color, size),), position=position)
                    out["position"].append(format_caption(spec))
        for color in COLORS:
            for count in COUNT_WORDS:
                out["counting"].append(
                    format_caption(PromptSpec("counting", (ObjectSpec(shape, color, None, count),)))
                )
    for shape_a in SHAPES:
        for shape_b in SHAPES:
            if shape_a != shape_b:
                spec = PromptSpec("two_object", (ObjectSpec(shape_a), ObjectSpec(shape_b)))
                out["two_object"].append(format_caption(spec))
            for color_a in COLORS:
                for color_b in COLORS:
                    a, b = ObjectSpec(shape_a, color_a), ObjectSpec(shape_b, color_b)
                    if shape_a != shape_b and color_a != color_b:
                        out["color_attr"].append(format_caption(PromptSpec("color_attr", (a, b))))
                        for relation in RELATIONS:
                            spec = PromptSpec("position", (a, b), relation=relation)
                            out["position"].append(format_caption(spec))
    return {c: tuple(v) for c, v in out.items()}


def _pool(caption: str, category: str) -> str:
    # Absolute and relative position captions are split (and drawn for evaluation) separately, so
    # the ~2700 relative captions do not crowd out the 480 absolute ones.
    if category == "position":
        return "position_absolute" if " in the " in caption else "position_relative"
    return category


def _stable_hash(caption: str) -> int:
    # sha256, not hash(): Python's str hash changes with every process (PYTHONHASHSEED).
    return int.from_bytes(hashlib.sha256(caption.encode()).digest()[:8], "big")


@cache
def _heldout_by_pool() -> dict[str, tuple[str, ...]]:
    pools: dict[str, list[str]] = {}
    for category, captions in all_captions().items():
        for caption in captions:
            pools.setdefault(_pool(caption, category), []).append(caption)
    out = {}
    for name, pool in pools.items():
        k = max(MIN_HELDOUT_PER_CATEGORY, round(HELDOUT_FRACTION * len(pool)))
        out[name] = tuple(sorted(pool, key=_stable_hash)[:k])
    return out


@cache
def _heldout_set() -> frozenset[str]:
    return frozenset(c for captions in _heldout_by_pool().values() for c in captions)


def is_heldout(caption: str) -> bool:
    """True for the ~10% of captions reserved for evaluation (never emitted by the source)."""
    return " ".join(caption.strip().lower().split()) in _heldout_set()


def heldout_prompts(n: int, seed: int = 0) -> list[str]:
    """``n`` held-out prompts, balanced over the 6 categories (round robin; repeats only if needed)."""
    if n < 0:
        raise ValueError(f"n must be >= 0, got {n}")
    rng = np.random.default_rng(seed)
    pools = {name: [str(c) for c in rng.permutation(list(p))] for name, p in _heldout_by_pool().items()}
    drawn: dict[str, int] = {}
    out = []
    for i in range(n):
        name = CATEGORIES[i % len(CATEGORIES)]
        if name == "position":  # alternate absolute and relative
            name = ("position_absolute", "position_relative")[(i // len(CATEGORIES)) % 2]
        k = drawn[name] = drawn.get(name, -1) + 1
        out.append(pools[name][k % len(pools[name])])
    return out


# --- scenes ---------------------------------------------------------------------------------------
def _jittered(center: int, radius: int, rng: np.random.Generator) -> int:
    low = max(center - JITTER, radius + 1)  # keep a pixel of background at the border
    high = min(center + JITTER, REFERENCE_SIZE - radius - 1)
    return int(rng.integers(low, high + 1))


def _apart(a: SceneObject, b: SceneObject) -> bool:
    """Bounding boxes at least MIN_GAP apart (Chebyshev distance), so shapes never touch or merge."""
    reach = SIZE_RADIUS[a.size] + SIZE_RADIUS[b.size] + MIN_GAP
    return max(abs(a.cx - b.cx), abs(a.cy - b.cy)) >= reach


def _cells_for(spec: PromptSpec, n_objects: int, rng: np.random.Generator) -> list[tuple[int, int]]:
    if spec.position is not None:
        return [POSITIONS[spec.position]]
    if spec.relation in ("left of", "right of"):
        row = int(rng.integers(GRID))
        cols = sorted(rng.choice(GRID, size=2, replace=False).tolist())
        if spec.relation == "right of":
            cols.reverse()
        return [(cols[0], row), (cols[1], row)]
    if spec.relation in ("above", "below"):
        col = int(rng.integers(GRID))
        rows = sorted(rng.choice(GRID, size=2, replace=False).tolist())
        if spec.relation == "below":
            rows.reverse()
        return [(col, rows[0]), (col, rows[1])]
    picks = rng.choice(GRID * GRID, size=n_objects, replace=False)
    return [(int(p) % GRID, int(p) // GRID) for p in picks]


def scene_for_prompt(spec: PromptSpec, rng: np.random.Generator) -> Scene:
    """A scene that satisfies ``spec``; unspecified colours and sizes are drawn from ``rng``."""
    wanted = [o for o in spec.objects for _ in range(o.count)]
    for _ in range(200):
        cells = _cells_for(spec, len(wanted), rng)
        objects = []
        for obj, (col, row) in zip(wanted, cells, strict=True):
            color = obj.color or str(rng.choice(list(COLORS)))
            size = obj.size or str(rng.choice(SIZES))
            radius = SIZE_RADIUS[size]
            cx = _jittered(GRID_CENTERS[col], radius, rng)
            cy = _jittered(GRID_CENTERS[row], radius, rng)
            objects.append(SceneObject(color, obj.shape, size, cx, cy))
        if all(_apart(a, b) for i, a in enumerate(objects) for b in objects[i + 1 :]):
            return Scene(tuple(objects), BACKGROUND, format_caption(spec), spec.category, spec)
    # Every spec of the grammar has a layout (two large shapes fit in columns 0 and 2, three large
    # ones in three corners), so landing here means a grammar/geometry bug, not bad luck.
    raise ValueError(f"no non-overlapping layout found for {format_caption(spec)!r}")


def random_spec(rng: np.random.Generator, category: str | None = None) -> PromptSpec:
    """A random caption spec of ``category`` (uniform over categories when None)."""
    if category is None:
        category = str(rng.choice(CATEGORIES))
    if category not in CATEGORIES:
        raise ValueError(f"unknown category {category!r}; expected one of {CATEGORIES}")

    def pick(options):
        return options[int(rng.integers(len(options)))]

    colors, sizes = list(COLORS), list(_sizes_or_none())
    if category in ("single_object", "colors"):
        color = pick(colors) if category == "colors" else None
        return PromptSpec(category, (ObjectSpec(pick(SHAPES), color, pick(sizes)),))
    if category == "counting":
        return PromptSpec(category, (ObjectSpec(pick(SHAPES), pick(colors), None, pick([2, 3])),))
    shape_a, shape_b = (str(s) for s in rng.choice(SHAPES, size=2, replace=False))
    color_a, color_b = (str(c) for c in rng.choice(colors, size=2, replace=False))
    if category == "two_object":
        return PromptSpec(category, (ObjectSpec(shape_a), ObjectSpec(shape_b)))
    if category == "color_attr":
        return PromptSpec(category, (ObjectSpec(shape_a, color_a), ObjectSpec(shape_b, color_b)))
    # position: half absolute, half relative
    if rng.random() < 0.5:
        obj = ObjectSpec(pick(SHAPES), pick(colors), pick(sizes))
        return PromptSpec(category, (obj,), position=pick(list(POSITIONS)))
    relation = pick(RELATIONS)
    return PromptSpec(
        category, (ObjectSpec(shape_a, color_a), ObjectSpec(shape_b, color_b)), relation=relation
    )


def sample_scene(rng: np.random.Generator, category: str | None = None) -> Scene:
    """A random training scene; its caption is never a held-out one."""
    while True:
        spec = random_spec(rng, category)
        if not is_heldout(format_caption(spec)):
            return scene_for_prompt(spec, rng)
