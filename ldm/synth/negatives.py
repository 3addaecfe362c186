"""Hard negatives: captions one attribute away from a caption, none of them true of its scenes.

Split from `ldm.synth.grammar` (which it builds on) to keep that module to its grammar and scenes.
"""

from __future__ import annotations

from dataclasses import replace

from ldm.synth.grammar import (
    COLORS,
    COUNT_WORDS,
    POSITIONS,
    SHAPES,
    PromptSpec,
    format_caption,
    parse_caption,
)

# What one hard-negative edit can change (`edit_kind`)
EDIT_KINDS: tuple[str, ...] = ("binding", "colour", "count", "position", "relation", "shape", "size")
_OPPOSITE = {"left of": "right of", "right of": "left of", "above": "below", "below": "above"}


def hard_negatives(caption: str) -> list[str]:
    """Captions that differ from ``caption`` in one attribute, so that none is true of its scenes.

    One edit each: a shape, a colour, a size, the count, the absolute position, the relation flipped,
    or the two colours swapped between their shapes (a binding error). Scenes of the grammar hold
    exactly their caption's objects, so each edit makes a false caption. The bootstrap scores its CLIP
    against these (``hard_negative_auc``): a CLIP that ranks the true caption above a random other one
    can still be blind to shape (the "hard negatives" of NegCLIP, Yuksekgonul et al. 2023, "When and
    why vision-language models behave like bags-of-words").
    """
    spec = parse_caption(caption)
    edits: list[PromptSpec] = []

    def with_object(i: int, **change) -> PromptSpec:
        objects = list(spec.objects)
        objects[i] = replace(objects[i], **change)
        return replace(spec, objects=tuple(objects))

    for i, obj in enumerate(spec.objects):
        edits += [with_object(i, shape=shape) for shape in SHAPES if shape != obj.shape]
        if obj.color is not None:
            edits += [with_object(i, color=color) for color in COLORS if color != obj.color]
        if obj.size is not None:
            edits.append(with_object(i, size="large" if obj.size == "small" else "small"))
        if obj.count > 1:
            edits += [with_object(i, count=n) for n in COUNT_WORDS if n != obj.count]
    if spec.position is not None:
        edits += [replace(spec, position=p) for p in POSITIONS if p != spec.position]
    if spec.relation is not None:
        edits.append(replace(spec, relation=_OPPOSITE[spec.relation]))
    if len(spec.objects) == 2 and None not in (spec.objects[0].color, spec.objects[1].color):
        a, b = spec.objects
        if a.color != b.color:
            edits.append(replace(spec, objects=(replace(a, color=b.color), replace(b, color=a.color))))
    captions = set()
    for edit in edits:
        text = format_caption(edit)
        try:  # an edit may leave the grammar (two objects of one colour, say): skip it
            parse_caption(text)
        except ValueError:
            continue
        captions.add(text)
    captions.discard(format_caption(spec))
    return sorted(captions)


def edit_kind(true: PromptSpec, edited: PromptSpec) -> str:
    """Which single attribute ``edited`` changed in ``true`` (``hard_negatives`` makes one edit each):
    position, relation, shape, colour, size, count, or binding (the two colours swapped)."""
    if true.position != edited.position:
        return "position"
    if true.relation != edited.relation:
        return "relation"
    changed = [(a, b) for a, b in zip(true.objects, edited.objects, strict=True) if a != b]
    if len(changed) == 2:  # both objects changed: their colours were swapped
        return "binding"
    a, b = changed[0]
    for field in ("shape", "color", "size", "count"):
        if getattr(a, field) != getattr(b, field):
            return {"color": "colour"}.get(field, field)
    raise ValueError(f"no single edit between {true} and {edited}")


def hard_negatives_by_kind(caption: str) -> dict[str, list[str]]:
    """``hard_negatives(caption)`` grouped by ``edit_kind``: {kind: [captions]}, kinds sorted."""
    true = parse_caption(caption)
    kinds: dict[str, list[str]] = {}
    for negative in hard_negatives(caption):
        kinds.setdefault(edit_kind(true, parse_caption(negative)), []).append(negative)
    return dict(sorted(kinds.items()))
