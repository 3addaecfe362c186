"""Row filters of the ingest job: plain functions, testable as plain Python, used by Ray Data stages.

Every rejected row gets a ``stage`` (where it was dropped), a machine-readable ``reason`` and a
human-readable ``detail``. The reasons are the codes of the ``rejects/`` ledger:

- ``blocked_url``     (guard)    scheme not http(s), or a host resolving to a non-public address
- ``blocked_redirect`` (download) a redirect to such a URL (the guard checks every hop)
- ``caption_too_short`` (filter) empty or shorter than ``min_caption_chars``
- ``column_filter``   (filter)   an input column outside its ``filters.columns`` bounds, or missing
                                 (``detail``: the column and its value)
- ``download_failed`` (download) HTTP/network error, or bytes that are not a decodable image
                                 (``detail`` says which: ``http: ...``, ``not_image: ...``,
                                 ``truncated: ...``)
- ``opted_out``       (download) the server's X-Robots-Tag forbids the use (``noai``, ...)
- ``too_small``, ``too_large``, ``extreme_aspect`` (filter) from the *original* width and height;
                                 ``too_large`` also covers decompression bombs, refused from the header
- ``duplicate``       (filter)   same sha256 of the bytes as a row with a lower key
- ``low_clip_score``  (score)    below the absolute threshold, or outside the kept top fraction
- ``near_duplicate``  (score)    CLIP image embedding within the cosine threshold of a lower key's
"""

from __future__ import annotations

import hashlib
import io
import unicodedata
import warnings
from collections.abc import Iterable
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from ldm.config.ingest import FilterConfig
from ldm.contract import COL_CAPTION, COL_HEIGHT, COL_KEY, COL_SHA256, COL_URL, COL_WIDTH, REJECT_COLUMNS
from pipelines.download import COL_ERROR, COL_IMAGE_BYTES, COL_STATUS, REDIRECT_BLOCKED

STAGE_GUARD = "guard"
STAGE_DOWNLOAD = "download"
STAGE_FILTER = "filter"
STAGE_SCORE = "score"

REASON_BLOCKED = "blocked_url"
REASON_CAPTION = "caption_too_short"
REASON_COLUMN = "column_filter"
REASON_DOWNLOAD = "download_failed"
REASON_TOO_SMALL = "too_small"
REASON_TOO_LARGE = "too_large"
REASON_ASPECT = "extreme_aspect"
REASON_DUPLICATE = "duplicate"
REASON_LOW_CLIP = "low_clip_score"
REASON_OPTED_OUT = "opted_out"
REASON_BLOCKED_REDIRECT = "blocked_redirect"
REASON_NEAR_DUPLICATE = "near_duplicate"

# img2dataset's error message when an X-Robots-Tag directive forbids the use (downloader.py)
OPT_OUT_MARKER = "disallowed by X-Robots-Tag"

COL_STAGE, COL_REASON, COL_DETAIL = REJECT_COLUMNS[3:]
COL_IMAGE = "image"  # uint8 [S, S, 3], the model-ready image between the filter and the encoder
COL_IMAGE_EMBEDDING = "image_embedding"  # float32 [E], L2-normalised CLIP image features (score stage)

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
    """Why a caption is unusable (a ``detail``), or None.

    Invisible format characters (zero-width spaces and joiners, a byte-order mark) do not count:
    a caption made of them is empty.
    """
    visible = "".join(ch for ch in (caption or "") if unicodedata.category(ch) not in ("Cf", "Cc"))
    text = visible.strip()
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
    except (Image.DecompressionBombWarning, Image.DecompressionBombError) as err:
        # PIL refuses headers beyond its own pixel limit before we see the size: still a bomb
        return ImageCheck(REASON_TOO_LARGE, f"decompression bomb: {err}", 0, 0, None)
    except UnidentifiedImageError as err:
        return ImageCheck(REASON_DOWNLOAD, f"not_image: {err}", 0, 0, None)
    except Exception as err:  # any decoder error on hostile bytes is a bad download, never a crash
        return ImageCheck(REASON_DOWNLOAD, f"not_image: {type(err).__name__}: {err}", 0, 0, None)
    if _exif_orientation(img) in (5, 6, 7, 8):  # stored sideways: judge the upright size
        width, height = height, width
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
        img.load()  # a truncated file fails here, not at open; an animation keeps its first frame
        rgb = to_rgb(ImageOps.exif_transpose(img))
    except Exception as err:
        return ImageCheck(REASON_DOWNLOAD, f"truncated: {type(err).__name__}: {err}", width, height, None)
    square = ImageOps.fit(rgb, (image_size, image_size), method=Image.Resampling.BICUBIC)
    return ImageCheck(None, "", width, height, np.asarray(square, dtype=np.uint8))


def _exif_orientation(img: Image.Image) -> int:
    try:
        return int(img.getexif().get(0x0112, 1))  # 0x0112: the EXIF Orientation tag
    except Exception:  # broken EXIF is not worth a rejection: treat the image as upright
        return 1


def to_rgb(img: Image.Image) -> Image.Image:
    """8-bit RGB from any mode PIL decodes: 16-bit greys are scaled, not clipped; transparency is
    composited on white (dropping alpha would show whatever colour hides under transparent pixels)."""
    if img.mode in ("I;16", "I;16B", "I;16L", "I"):
        # PIL's own convert clips 16-bit values at 255, which turns most 16-bit images white
        grey = np.asarray(img, dtype=np.float64) * (255.0 / 65535.0)
        return Image.fromarray(np.clip(grey, 0, 255).round().astype(np.uint8), "L").convert("RGB")
    if img.mode in ("RGBA", "LA", "PA") or (img.mode == "P" and "transparency" in img.info):
        rgba = img.convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(white, rgba).convert("RGB")
    return img.convert("RGB")


def download_failure_reason(error_message: str | None) -> str:
    """The reject reason of a row img2dataset did not download: an opt-out, a redirect the URL guard
    refused, or a plain failure."""
    message = (error_message or "").lower()
    if OPT_OUT_MARKER.lower() in message:
        return REASON_OPTED_OUT
    if REDIRECT_BLOCKED.lower() in message:
        return REASON_BLOCKED_REDIRECT
    return REASON_DOWNLOAD


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
    carried: list[str] | tuple[str, ...] = (),
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
        reason: str | None
        if batch[COL_STATUS][i] != "success":
            error = batch[COL_ERROR][i]
            reason, stage, detail = download_failure_reason(error), STAGE_DOWNLOAD, f"http: {error}"
        else:
            check = inspect_image(batch[COL_IMAGE_BYTES][i], filters, image_size)
            widths[i], heights[i] = check.width, check.height
            reason, detail = check.reason, check.detail
            stage = STAGE_DOWNLOAD if reason == REASON_DOWNLOAD else STAGE_FILTER
            if reason is None and key in duplicates:
                reason, stage, detail = REASON_DUPLICATE, STAGE_FILTER, f"same bytes as key {duplicates[key]}"
            if reason is None and check.image is not None:
                reason, stage = ACCEPTED, ACCEPTED
                images[i] = check.image
        reasons.append(reason or ACCEPTED)
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
        **{name: batch[name] for name in carried},  # the input's other columns, unchanged
    }


# --- the rules of the verdicts that need every scored row, as plain Python: the job runs them at
# scale in pass 2 (`pipelines.ingest_judge`, `pipelines.ingest_scale`); tests hold it to these ----------
def clip_cutoff(scores: np.ndarray, filters: FilterConfig) -> float:
    """The lowest CLIP score that is kept: the absolute threshold, or the top fraction's cut.

    In ``top_fraction`` mode the cut is the score of the ``ceil(fraction * N)``-th best row, so at
    least that many rows are kept (ties at the cut are all kept). No scores: nothing to cut.
    """
    if filters.clip_mode == "threshold":
        return float(filters.clip_threshold)
    if len(scores) == 0:
        return float("-inf")
    keep = int(np.ceil(filters.clip_keep_fraction * len(scores)))
    return float(np.sort(np.asarray(scores, dtype=np.float64))[::-1][keep - 1])


def near_duplicate_keys(
    keys: list[str], embeddings: np.ndarray, threshold: float, block_rows: int = 1024
) -> dict[str, str]:
    """Rows whose embedding has cosine >= ``threshold`` with a row of lower key: {key: that lower key}.

    Embeddings are L2-normalised (`ldm.first_stage.clip.clip_features`), so cosine is a dot product.
    Like `duplicate_keys`, the lower key wins whatever the order of arrival. A row is dropped when any
    lower key is close to it, even one that is itself dropped: a chain A~B~C drops B and C. Cost is
    O(N^2 E) in blocks of ``block_rows``: the reference the job's LSH pass (`pipelines.ingest_judge`)
    is tested against.
    """
    if len(keys) != len(embeddings):
        raise ValueError(f"{len(keys)} keys but {len(embeddings)} embeddings")
    if len(keys) < 2:
        return {}
    sorted_keys, vectors = _by_key(keys, embeddings)
    found: dict[str, str] = {}
    for start in range(0, len(sorted_keys), block_rows):
        block = vectors[start : start + block_rows]
        similar = block @ vectors[: start + len(block)].T  # [B, rows up to the end of this block]
        for offset, row in enumerate(similar):
            lower = np.flatnonzero(row[: start + offset] >= threshold)  # only lower keys count
            if len(lower):
                found[sorted_keys[start + offset]] = sorted_keys[lower[0]]
    return found


def lsh_miss_probability(cosine: float, bands: int, bits_per_band: int) -> float:
    """Chance that the LSH pass (`pipelines.ingest_judge`) never makes a pair with this cosine a candidate.

    Random-hyperplane LSH (Charikar 2002): one bit agrees with probability p = 1 - arccos(cos)/pi;
    a band of ``bits_per_band`` bits agrees with p^r; the pair is missed when no band agrees:
    (1 - p^r)^bands. At the production defaults (40 bands of 16 bits) a pair at cosine 0.96 is
    missed with probability 5e-5, one at 0.99 with 2e-18.
    """
    p = 1.0 - float(np.arccos(np.clip(cosine, -1.0, 1.0))) / np.pi
    return float((1.0 - p**bits_per_band) ** bands)


def _by_key(keys, embeddings) -> tuple[list, np.ndarray]:
    """Keys and their embeddings (float32) in key order: the lower key of a close pair is the one kept."""
    order = np.argsort(np.asarray(keys, dtype=object), kind="stable")
    return [keys[i] for i in order], np.asarray(embeddings, dtype=np.float32)[order]
