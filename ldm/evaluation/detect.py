"""A code-based object detector for images of the synthetic grammar (no learned judge).

GenEval scores prompt adherence with an object detector; our scenes are flat shapes on a plain
background, so plain image processing does the job exactly and cannot be fooled the way a learned
judge can:

1. background = the median colour of the image border (shapes rarely touch it, and the median
   ignores those that do);
2. every pixel is explained as a blend of the background with one palette colour (`_unmix`): the
   colour whose blend line it sits closest to, and how far along it is (alpha). Pixels no palette
   colour explains are background;
3. foreground = alpha > 0.5, the half-contrast iso-line where a blurred edge truly lies whatever the
   colour; 8-connected components per colour (`scipy.ndimage.label`), specks dropped;
4. shape and size = the template that overlaps a component best: each shape is drawn with the
   renderer's own geometry, blurred by 0, 1 or 1.5 px, at the radius that matches the component's
   area, centred on its centroid, and scored by IoU. Template matching, not hand-tuned
   fill/solidity thresholds, because blur makes small stars and triangles overlap on those features.

Positions are reported on the 64 px reference canvas of the grammar, whatever the image size.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageDraw
from scipy import ndimage

from ldm.synth.grammar import COLORS, REFERENCE_SIZE, SHAPES, SIZE_RADIUS
from ldm.synth.render import draw_shape, shape_centroid_offset

# Components smaller than this (in 64 px reference pixels) are specks, not objects: half the smallest
# object of the grammar (a small star covers ~77, ~72 after the demo autoencoder's round trip).
MIN_AREA = 35.0
# A pixel farther than this from every palette colour's blend line is not part of an object
# (palette colours are >=100 apart, so 80 still accepts a colour shifted by a lossy decoder).
MAX_COLOR_DISTANCE = 80.0
# Size boundary: halfway between the small and large radius.
SIZE_THRESHOLD = (SIZE_RADIUS["small"] + SIZE_RADIUS["large"]) / 2
_TEMPLATE_SUPERSAMPLE = 4
# Blurs (64 px reference pixels) the templates are tried at: generated images are softer than renders,
# and a blurred small star thresholded at half contrast looks like a rounded blob, not a sharp star.
TEMPLATE_BLURS: tuple[float, ...] = (0.0, 1.0, 1.5)
_PALETTE_NAMES = tuple(COLORS)
_PALETTE = np.array([COLORS[c] for c in _PALETTE_NAMES], dtype=np.float32)


@dataclass(frozen=True)
class Detection:
    """One detected shape. ``cx, cy`` (area centroid) and ``area`` are in 64 px reference units;
    ``bbox`` is (x0, y0, x1, y1) in pixels of the input image, end-exclusive."""

    color: str
    shape: str
    size: str
    cx: float
    cy: float
    area: float
    bbox: tuple[int, int, int, int]
    iou: float  # overlap with the best template: how shape-like the component is


def _unit_area(shape: str) -> float:
    """Area of `draw_shape`'s shape at radius 1, measured once on a large rendering."""
    r = 200
    canvas = Image.new("L", (2 * r + 4, 2 * r + 4), 0)
    draw_shape(ImageDraw.Draw(canvas), shape, r + 2, r + 2, r, 255)
    return float((np.asarray(canvas) > 127).sum()) / r**2


_UNIT_AREA = {shape: _unit_area(shape) for shape in SHAPES}


def _template(
    shape: str, radius: float, cx: float, cy: float, height: int, width: int, blur: float
) -> np.ndarray:
    """Binary mask of ``shape`` whose centroid sits at (cx, cy) on a (height, width) crop, as it
    looks after a Gaussian blur of ``blur`` pixels and the detector's half-contrast threshold."""
    s = _TEMPLATE_SUPERSAMPLE
    canvas = Image.new("L", (width * s, height * s), 0)
    # pixel (i, j) covers [j, j+1): its centre is at j + 0.5
    centre_y = cy + 0.5 - shape_centroid_offset(shape, radius)
    draw_shape(ImageDraw.Draw(canvas), shape, (cx + 0.5) * s, centre_y * s, radius * s, 255)
    soft = np.asarray(canvas.reduce(s), dtype=np.float32)
    if blur > 0:
        soft = ndimage.gaussian_filter(soft, blur, mode="constant")
    return soft > 127.5


def _background(pixels: np.ndarray) -> np.ndarray:
    border = np.concatenate([pixels[0], pixels[-1], pixels[:, 0], pixels[:, -1]])
    return np.median(border, axis=0)


def _unmix(pixels: np.ndarray, background: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per pixel: the palette colour it is a blend of with the background, and how much of it.

    A pixel on a shape's anti-aliased or blurred edge is ``background + alpha * (colour - background)``.
    For every palette colour, ``alpha`` is the projection of the pixel onto that line and the residual
    is its distance from it; the pixel belongs to the colour with the smallest residual. Returns
    (colour index [H, W], alpha [H, W]); alpha is 0 where no colour explains the pixel.
    """
    offset = pixels - background  # [H, W, 3]
    directions = _PALETTE - background  # [K, 3]
    alpha = np.einsum("hwc,kc->hwk", offset, directions) / (directions**2).sum(axis=1)
    alpha = np.clip(alpha, 0.0, None)
    residual = np.linalg.norm(offset[:, :, None, :] - alpha[..., None] * directions, axis=-1)  # [H, W, K]
    # favour colours the pixel is well along the way to (a faint pixel fits every line near 0)
    residual = np.where(alpha > 0.25, residual, np.inf)
    index = residual.argmin(axis=-1)
    best_alpha = np.take_along_axis(alpha, index[..., None], axis=-1)[..., 0]
    best_residual = np.take_along_axis(residual, index[..., None], axis=-1)[..., 0]
    best_alpha[best_residual > MAX_COLOR_DISTANCE] = 0.0
    return index, best_alpha


def detect_objects(image: Image.Image | np.ndarray) -> list[Detection]:
    """Find the flat coloured shapes in an RGB image (PIL or uint8 HxWx3 array)."""
    pixels = np.asarray(image.convert("RGB") if isinstance(image, Image.Image) else image, dtype=np.float32)
    if pixels.ndim != 3 or pixels.shape[2] != 3:
        raise ValueError(f"expected an RGB image (H, W, 3), got shape {pixels.shape}")
    height, width = pixels.shape[:2]
    scale = REFERENCE_SIZE / width  # image pixels -> reference pixels
    background = _background(pixels)
    color_index, alpha = _unmix(pixels, background)
    # The edge of a shape lies where it is half blended with the background, whatever blur or colour.
    foreground = alpha > 0.5

    detections = []
    for k, color in enumerate(_PALETTE_NAMES):
        labels, _ = ndimage.label(foreground & (color_index == k), structure=np.ones((3, 3)))
        for index, box in enumerate(ndimage.find_objects(labels), start=1):
            if box is None:
                continue
            detection = _describe(labels, index, box, color, scale)
            if detection is not None:
                detections.append(detection)
    return sorted(detections, key=lambda d: (d.cy, d.cx))


def _describe(
    labels: np.ndarray, index: int, box: tuple[slice, slice], color: str, scale: float
) -> Detection | None:
    """Shape, size and position of one component, or None for a speck."""
    height, width = labels.shape
    # pad the box so the templates fit in the crop
    y0, y1 = max(box[0].start - 3, 0), min(box[0].stop + 3, height)
    x0, x1 = max(box[1].start - 3, 0), min(box[1].stop + 3, width)
    mask = labels[y0:y1, x0:x1] == index
    area = float(mask.sum())
    if area * scale**2 < MIN_AREA:
        return None
    ys, xs = np.nonzero(mask)
    cy, cx = float(ys.mean()), float(xs.mean())

    height, width = mask.shape  # a 2-D crop
    best = ("circle", 0.0, -1.0)  # shape, radius, iou
    for blur in TEMPLATE_BLURS:
        for shape in SHAPES:
            radius = float(np.sqrt(area / _UNIT_AREA[shape]))
            template = _template(shape, radius, cx, cy, height, width, blur / scale)
            # blur eats thin parts (star arms): rescale once so the template's area matches
            radius *= float(np.sqrt(area / max(template.sum(), 1)))
            template = _template(shape, radius, cx, cy, height, width, blur / scale)
            iou = float((template & mask).sum() / max((template | mask).sum(), 1))
            if iou > best[2] + 1e-9:
                best = (shape, radius, iou)
    shape, radius, iou = best
    return Detection(
        color=color,
        shape=shape,
        size="small" if radius * scale < SIZE_THRESHOLD else "large",
        cx=(cx + x0 + 0.5) * scale,
        cy=(cy + y0 + 0.5) * scale,
        area=area * scale**2,
        bbox=(box[1].start, box[0].start, box[1].stop, box[0].stop),
        iou=iou,
    )
