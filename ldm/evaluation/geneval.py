"""GenEval-style prompt-adherence scoring of images made for captions of the synthetic grammar.

The rules follow GenEval (Ghosh et al., 2023, `evaluation/evaluate_images.py`), with our code-based
detector in place of its Mask2Former, and colour read off the pixels instead of asked of CLIP:

- single_object: at least one object of the named shape (and size, if named);
- two_object: both named shapes present;
- counting: *exactly* N objects of the named colour and shape;
- colors: an object of the named shape has the named colour;
- position, relative: some object A and some object B whose centroids differ by more than
  `POSITION_MARGIN` pixels along the named direction (GenEval also accepts diagonal offsets);
- position, absolute: the object's centroid falls in the named cell of the 3x3 grid;
- color_attr: the first shape in the first colour *and* the second shape in the second colour
  (each colour bound to its own shape).

Unlike GenEval's Mask2Former, our detector reports a component for every coloured blob, noise
included (an untrained model's images hold a dozen), so two rules stand in for a detector's
confidence threshold, or noise would pass "a star and a circle" by chance:

- a component counts as an object only when its shape is recognisable: its best template overlaps
  it with IoU >= `MIN_SHAPE_IOU` (clean renders >= 0.95, the demo autoencoder's round trip of them
  >= 0.90 at the 5th percentile, blobs of an untrained model ~0.6);
- an image with more components than `CLUTTER_LIMIT` (one more than the grammar ever draws) is not a
  scene of the grammar and fails whatever its prompt.

A prompt's image passes or fails as a whole; a category's score is the fraction that pass and
``overall`` is the mean over the categories present, GenEval's headline number.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Protocol

from PIL import Image

from ldm.evaluation.detect import Detection, detect_objects
from ldm.synth.grammar import (
    CATEGORIES,
    COUNT_WORDS,
    GRID,
    POSITIONS,
    REFERENCE_SIZE,
    ObjectSpec,
    PromptSpec,
    parse_caption,
)

# Minimum centroid offset, in 64 px reference pixels, for "left of" and friends. Grid cells are 21 px
# apart, so a correct layout clears it easily while two shapes in one column never count as "left of".
POSITION_MARGIN = 6.0
# A component is an object of its shape only if the shape's template fits it at least this well.
MIN_SHAPE_IOU = 0.75
# Scenes of the grammar hold at most max(COUNT_WORDS) objects; one stray blob more is tolerated.
CLUTTER_LIMIT = max(COUNT_WORDS) + 1


class ObjectLike(Protocol):
    """What `check` needs of an object: a `Detection`, or a `SceneObject` for ground truth."""

    # read-only properties: frozen dataclasses (Detection, SceneObject) satisfy them
    @property
    def color(self) -> str: ...
    @property
    def shape(self) -> str: ...
    @property
    def size(self) -> str: ...
    @property
    def cx(self) -> float: ...
    @property
    def cy(self) -> float: ...


def _matches(obj: ObjectLike, want: ObjectSpec) -> bool:
    return (
        obj.shape == want.shape
        and (want.color is None or obj.color == want.color)
        and (want.size is None or obj.size == want.size)
    )


def grid_cell(obj: ObjectLike) -> tuple[int, int]:
    """(column, row) of the 3x3 grid cell that holds the centre of ``obj``."""
    cell = REFERENCE_SIZE / GRID
    column = min(int(obj.cx // cell), GRID - 1)
    row = min(int(obj.cy // cell), GRID - 1)
    return column, row


def _related(a: ObjectLike, b: ObjectLike, relation: str) -> bool:
    dx, dy = b.cx - a.cx, b.cy - a.cy  # image y grows downwards
    if relation == "left of":
        return dx > POSITION_MARGIN
    if relation == "right of":
        return -dx > POSITION_MARGIN
    if relation == "above":
        return dy > POSITION_MARGIN
    if relation == "below":
        return -dy > POSITION_MARGIN
    raise ValueError(f"unknown relation {relation!r}")


def check(spec: PromptSpec, detections: Sequence[ObjectLike]) -> bool:
    """Does an image with these detected objects satisfy ``spec``?"""
    if spec.category == "counting":
        want = spec.objects[0]
        return sum(_matches(d, want) for d in detections) == want.count
    if spec.relation is not None:
        first, second = spec.objects
        return any(
            _related(a, b, spec.relation)
            for a in detections
            if _matches(a, first)
            for b in detections
            if b is not a and _matches(b, second)
        )
    if spec.position is not None:
        target = POSITIONS[spec.position]
        return any(_matches(d, spec.objects[0]) and grid_cell(d) == target for d in detections)
    if spec.category in ("single_object", "colors", "two_object", "color_attr"):
        return all(any(_matches(d, want) for d in detections) for want in spec.objects)
    raise ValueError(f"unknown category {spec.category!r}")


def judge(spec: PromptSpec, detections: Sequence[Detection]) -> bool:
    """Does an image with these detector outputs satisfy ``spec``? `check` on the recognisable objects,
    after the clutter rule (module docstring)."""
    if len(detections) > CLUTTER_LIMIT:
        return False
    return check(spec, [d for d in detections if d.iou >= MIN_SHAPE_IOU])


def score(prompts: Sequence[str], images: Sequence[Image.Image]) -> dict[str, Any]:
    """Score images against their prompts (one image per prompt, same order).

    Returns ``{category: fraction passed, ..., "overall": mean over categories present,
    "per_prompt": [{"prompt", "category", "passed", "detected"}, ...]}``; categories with no prompt
    are left out rather than reported as 0.
    """
    if len(prompts) != len(images):
        raise ValueError(f"got {len(prompts)} prompts but {len(images)} images")
    if not prompts:
        raise ValueError("nothing to score: no prompts")
    per_prompt = []
    for prompt, image in zip(prompts, images, strict=True):
        spec = parse_caption(prompt)
        detections = detect_objects(image)
        per_prompt.append(
            {
                "prompt": prompt,
                "category": spec.category,
                "passed": judge(spec, detections),
                "detected": [
                    f"{d.size} {d.color} {d.shape} @({d.cx:.0f},{d.cy:.0f}) iou {d.iou:.2f}"
                    for d in detections
                ],
            }
        )
    result: dict[str, Any] = {}
    for category in CATEGORIES:
        outcomes = [bool(p["passed"]) for p in per_prompt if p["category"] == category]
        if outcomes:
            result[category] = sum(outcomes) / len(outcomes)
    result["overall"] = sum(result.values()) / len(result)
    result["per_prompt"] = per_prompt
    return result
