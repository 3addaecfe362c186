"""Rendering scenes of the caption grammar to RGB images, deterministically and fast.

Shapes are drawn with PIL at 4x the target resolution and box-downsampled, which anti-aliases the
edges (hard pixel staircases are a pattern a small autoencoder wastes capacity on). Geometry is
defined on a 64 px canvas (`grammar.REFERENCE_SIZE`) and scaled to other sizes.
"""

from __future__ import annotations

import math

import numpy as np
from PIL import Image, ImageDraw

from ldm.synth.grammar import (
    CATEGORIES,
    COLORS,
    REFERENCE_SIZE,
    SIZE_RADIUS,
    Scene,
    SceneObject,
    sample_scene,
)

SUPERSAMPLE = 4
SQUARE_HALF_SIDE = 0.85  # of the radius: a square of the full box looks much bigger than a circle
STAR_INNER_RATIO = 0.5  # inner/outer radius of the 5-point star; fatter arms survive at 64 px


def _star_points(cx: float, cy: float, radius: float) -> list[tuple[float, float]]:
    points = []
    for k in range(10):
        r = radius if k % 2 == 0 else radius * STAR_INNER_RATIO
        angle = -math.pi / 2 + k * math.pi / 5  # first point straight up
        points.append((cx + r * math.cos(angle), cy + r * math.sin(angle)))
    # The 5-point star spans only (1 + cos 36°) r vertically; shift it down so its box is centred.
    shift = radius * (1 - math.cos(math.pi / 5)) / 2
    return [(x, y + shift) for x, y in points]


def shape_centroid_offset(shape: str, radius: float) -> float:
    """How far below ``cy`` the area centroid of `draw_shape`'s shape lies (the detector aligns on it)."""
    if shape == "triangle":
        return radius / 3  # centroid of (0,-r), (r,r), (-r,r)
    if shape == "star":
        return radius * (1 - math.cos(math.pi / 5)) / 2  # the centring shift of `_star_points`
    return 0.0


def draw_shape(
    draw: ImageDraw.ImageDraw, shape: str, cx: float, cy: float, radius: float, fill: tuple[int, ...] | int
) -> None:
    """Draw one shape fitting the (2 radius)-wide box centred on (cx, cy); coordinates may be fractional."""
    r = radius
    if shape == "circle":
        draw.ellipse((cx - r, cy - r, cx + r, cy + r), fill=fill)
    elif shape == "square":
        h = r * SQUARE_HALF_SIDE
        draw.rectangle((cx - h, cy - h, cx + h, cy + h), fill=fill)
    elif shape == "triangle":
        draw.polygon([(cx, cy - r), (cx + r, cy + r), (cx - r, cy + r)], fill=fill)
    elif shape == "star":
        draw.polygon(_star_points(cx, cy, r), fill=fill)
    else:
        raise ValueError(f"unknown shape {shape!r}")


def _draw_object(draw: ImageDraw.ImageDraw, obj: SceneObject, scale: float) -> None:
    radius = SIZE_RADIUS[obj.size] * scale
    draw_shape(draw, obj.shape, obj.cx * scale, obj.cy * scale, radius, COLORS[obj.color])


def render_scene(scene: Scene, size: int = REFERENCE_SIZE) -> Image.Image:
    """Render ``scene`` to a ``size`` x ``size`` RGB image (same scene -> same pixels)."""
    if size < 8:
        raise ValueError(f"size must be >= 8, got {size}")
    big = size * SUPERSAMPLE
    canvas = Image.new("RGB", (big, big), scene.background)
    draw = ImageDraw.Draw(canvas)
    scale = big / REFERENCE_SIZE
    for obj in scene.objects:
        _draw_object(draw, obj, scale)
    return canvas.reduce(SUPERSAMPLE)  # box filter: the mean of each 4x4 block


def render_batch(
    n: int, seed: int, categories: list[str] | tuple[str, ...] | None = None, size: int = REFERENCE_SIZE
) -> tuple[np.ndarray, list[str], list[Scene]]:
    """``n`` random training scenes: (uint8 images [n, size, size, 3], captions, scenes).

    Categories cycle through ``categories`` (all six by default), so every batch is balanced.
    Same ``seed`` -> same batch. No held-out caption ever appears.
    """
    if n < 0:
        raise ValueError(f"n must be >= 0, got {n}")
    categories = tuple(categories or CATEGORIES)
    unknown = set(categories) - set(CATEGORIES)
    if unknown:
        raise ValueError(f"unknown categories {sorted(unknown)}; expected some of {CATEGORIES}")
    rng = np.random.default_rng(seed)
    images = np.empty((n, size, size, 3), dtype=np.uint8)
    scenes = []
    for i in range(n):
        scene = sample_scene(rng, categories[i % len(categories)])
        images[i] = np.asarray(render_scene(scene, size))
        scenes.append(scene)
    return images, [s.caption for s in scenes], scenes
