"""Row filters of the ingest job: plain functions, testable as plain Python, used by Ray Data stages.

Every rejected row gets a ``stage`` (where it was dropped), a machine-readable ``reason`` and a
human-readable ``detail``. The reasons are the codes of the ``rejects/`` ledger:

- ``blocked_url``     (guard)    scheme not http(s), or a host resolving to a non-public address
- ``caption_too_short`` (filter) empty or shorter than ``min_caption_chars``
- ``download_failed`` (download) HTTP/network error, or bytes that are not a decodable image
                                 (``detail`` says which: ``http: ...``, ``not_image: ...``,
                                 ``truncated: ...``)
- ``too_small``, ``too_large``, ``extreme_aspect`` (filter) from the *original* width and height
- ``duplicate``       (filter)   same sha256 of the bytes as a row with a lower key
- ``low_clip_score``  (score)    see `pipelines.stages.ClipScorer`
"""

from __future__ import annotations

import hashlib
import io
import warnings
from collections.abc import Iterable
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from ldm.config.ingest import FilterConfig
from ldm.contract import COL_CAPTION, COL_HEIGHT, COL_KEY, COL_SHA256, COL_URL, COL_WIDTH, REJECT_COLUMNS
from pipelines.download import COL_ERROR, COL_IMAGE_BYTES, COL_STATUS

STAGE_GUARD = "guard"
STAGE_DOWNLOAD = "download"
STAGE_FILTER = "filter"
STAGE_SCORE = "score"

REASON_BLOCKED = "blocked_url"
REASON_CAPTION = "caption_too_short"
REASON_DOWNLOAD = "download_failed"
REASON_TOO_SMALL = "too_small"
REASON_TOO_LARGE = "too_large"
REASON_ASPECT = "extreme_aspect"
REASON_DUPLICATE = "duplicate"
REASON_LOW_CLIP = "low_clip_score"

COL_STAGE, COL_REASON, COL_DETAIL = REJECT_COLUMNS[3:]
COL_IMAGE = "image"  # uint8 [S, S, 3], the model-ready image between the filter and the encoder

ACCEPTED = ""  # the reason and stage of a row still in the running (Arrow handles "" better than null)

KEY_WIDTH = 20  # hex characters of a key


def row_key(index: int, url: str, caption: str) -> str:
    """A fixed-width key for input row ``index``: stable across re-runs of the same input.

    The row index is part of it so that two identical input rows still get two keys (each row must
    be accounted for once); url and caption are part of it so that an edited input yields new keys.
    """
    payload = f"{index}\x1f{url}\x1f{caption}".encode()
    return hashlib.sha256(payload).hexdigest()[:KEY_WIDTH]


def caption_problem(caption: str | None, min_chars: int) -> str | None:
    """Why a caption is unusable (a ``detail``), or None."""
    text = (caption or "").strip()
    if not text:
        return "empty caption"
    if len(text) < min_chars:
        return f"caption has {len(text)} characters, fewer than {min_chars}"
    return None


@dataclass(frozen=True)
class ImageCheck:
    """Outcome of `inspect_image`: a rejection (reason + detail) or a model-ready image."""

    reason: str | None
    detail: str
    width: int  # original size, 0 when unknown
    height: int
    image: np.ndarray | None  # uint8 [image_size, image_size, 3] when accepted


def inspect_image(data: bytes | None, filters: FilterConfig, image_size: int) -> ImageCheck:
    """Decode ``data``, apply the size filters to the original size, resize the survivors.

    The size and pixel-count checks run on the header before decoding, so a decompression bomb is
    refused without being decoded. Accepted images are centre-cropped to a square and resized to
    ``image_size`` (the models' input size).
    """
    if not data:
        return ImageCheck(REASON_DOWNLOAD, "no bytes", 0, 0, None)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            img = Image.open(io.BytesIO(data))
            width, height = img.size
    except (UnidentifiedImageError, Image.DecompressionBombWarning, Image.DecompressionBombError) as err:
        return ImageCheck(REASON_DOWNLOAD, f"not_image: {err}", 0, 0, None)
    except Exception as err:  # any decoder error on hostile bytes is a bad download, never a crash
        return ImageCheck(REASON_DOWNLOAD, f"not_image: {type(err).__name__}: {err}", 0, 0, None)
    if width * height > filters.max_pixels:
        return ImageCheck(
            REASON_TOO_LARGE, f"{width}x{height} > {filters.max_pixels} pixels", width, height, None
        )
    # aspect before size: a 256x16 strip is an aspect problem first (the synthetic truth agrees)
    aspect = max(width, height) / max(min(width, height), 1)
    if aspect > filters.max_aspect_ratio:
        detail = f"{width}x{height}, aspect {aspect:.2f} > {filters.max_aspect_ratio}"
        return ImageCheck(REASON_ASPECT, detail, width, height, None)
    if min(width, height) < filters.min_side:
        return ImageCheck(
            REASON_TOO_SMALL, f"{width}x{height}, min side {filters.min_side}", width, height, None
        )
    try:
        img.load()  # a truncated file fails here, not at open
        rgb = img.convert("RGB")
    except Exception as err:
        return ImageCheck(REASON_DOWNLOAD, f"truncated: {err}", width, height, None)
    square = ImageOps.fit(rgb, (image_size, image_size), method=Image.Resampling.BICUBIC)
    return ImageCheck(None, "", width, height, np.asarray(square, dtype=np.uint8))


def duplicate_keys(keys: Iterable[str], hashes: Iterable[str | None]) -> dict[str, str]:
    """Rows whose content hash was already seen under a lower key: {duplicate key: kept key}.

    Rows without a hash (failed downloads) are never duplicates. Keeping the lowest key makes the
    choice independent of download order and of sharding.
    """
    first: dict[str, str] = {}
    pairs = [(key, digest) for key, digest in zip(keys, hashes, strict=True) if digest]
    for key, digest in sorted(pairs):
        first.setdefault(digest, key)
    return {key: first[digest] for key, digest in pairs if first[digest] != key}


def filter_downloads(
    batch: dict[str, np.ndarray],
    filters: FilterConfig,
    image_size: int,
    duplicates: dict[str, str],
) -> dict[str, np.ndarray]:
    """One batch of downloaded rows -> the same rows with a verdict and, when accepted, an image.

    Input columns: key, url, caption, status, error_message, sha256, image_bytes (see
    `pipelines.download`). Output columns: key, url, caption, sha256, width, height, stage, reason,
    detail, image (uint8 [N, S, S, 3]; zeros for rejected rows, which are split off next). Accepted
    rows have reason ``ACCEPTED`` (the empty string).
    """
    n = len(batch["key"])
    reasons: list[str] = []
    stages: list[str] = []
    details: list[str] = []
    widths = np.zeros(n, dtype=np.int32)
    heights = np.zeros(n, dtype=np.int32)
    images = np.zeros((n, image_size, image_size, 3), dtype=np.uint8)
    for i in range(n):
        key = batch[COL_KEY][i]
        if batch[COL_STATUS][i] != "success":
            reason, stage, detail = REASON_DOWNLOAD, STAGE_DOWNLOAD, f"http: {batch[COL_ERROR][i]}"
        else:
            check = inspect_image(batch[COL_IMAGE_BYTES][i], filters, image_size)
            widths[i], heights[i] = check.width, check.height
            reason, detail = check.reason, check.detail
            stage = STAGE_DOWNLOAD if reason == REASON_DOWNLOAD else STAGE_FILTER
            if reason is None and key in duplicates:
                reason, stage, detail = REASON_DUPLICATE, STAGE_FILTER, f"same bytes as key {duplicates[key]}"
            if reason is None:
                reason, stage = ACCEPTED, ACCEPTED
                images[i] = check.image
        reasons.append(reason)
        stages.append(stage)
        details.append(detail)
    return {
        COL_KEY: batch[COL_KEY],
        COL_URL: batch[COL_URL],
        COL_CAPTION: batch[COL_CAPTION],
        COL_SHA256: batch[COL_SHA256],
        COL_WIDTH: widths,
        COL_HEIGHT: heights,
        COL_STAGE: np.array(stages, dtype=object),
        COL_REASON: np.array(reasons, dtype=object),
        COL_DETAIL: np.array(details, dtype=object),
        COL_IMAGE: images,
    }


def keep_accepted(batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """The rows of ``batch`` with no reason to reject them."""
    mask = batch[COL_REASON] == ACCEPTED
    return {name: column[mask] for name, column in batch.items()}


def keep_rejected(batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """The ledger columns (`ldm.contract.REJECT_COLUMNS`) of the rejected rows of ``batch``."""
    mask = batch[COL_REASON] != ACCEPTED
    return {name: batch[name][mask] for name in REJECT_COLUMNS}
