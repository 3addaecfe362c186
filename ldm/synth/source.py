"""The synthetic source as a small web crawl: image files, a URL list, and the truth about each row.

`render_source` writes one file per row into ``www/`` (served by `ldm.synth.server.ImageServer`) and
``truth.parquet``, which says for every row whether it is good or which fault it carries, and the
reject reason a correct ingest must give it. `write_pairs` writes the crawl's URL list,
``pairs.parquet`` (``url``, ``caption``), the input of `ldm ingest`.

Faults and the reasons ingest must give (``EXPECTED_REASON``):

- dead_url: no file behind the URL, the server answers 404 -> download_failed;
- not_image: an HTML page served as text/html under a ``.png`` URL -> download_failed;
- truncated: a PNG cut in half (OpenCV, which img2dataset decodes with, returns no image for it, and
  PIL raises "image file is truncated") -> download_failed;
- tiny: an 8x8 image -> too_small;
- extreme_aspect: a 256x16 strip -> extreme_aspect;
- caption_mismatch: a good image with a caption it does not satisfy -> low_clip_score;
- duplicate: the same bytes as a good row, under a different URL and with the same caption
  -> duplicate. Exactly one of the two must be rejected; truth marks the copy, but an ingest that
  keeps the copy and rejects the original is just as right (compare counts, not rows).

Every good image is distinct, byte for byte, from every other (the scene space has repeats, e.g.
"a star" and "a small star" can render the same picture), so the planted duplicates are the only ones.
"""

from __future__ import annotations

import hashlib
import io
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from PIL import Image

from ldm.config.synth import SynthConfig
from ldm.contract import COL_CAPTION, COL_URL
from ldm.evaluation.geneval import check
from ldm.synth.grammar import CATEGORIES, Scene, parse_caption, sample_scene
from ldm.synth.render import render_scene

HELDOUT_SEED_OFFSET = 1_000_003  # held-out renders (bootstrap gates, benchmarks) use another seed
GOOD = "good"
FAULTS: tuple[str, ...] = (
    "dead_url",
    "not_image",
    "truncated",
    "tiny",
    "extreme_aspect",
    "caption_mismatch",
    "duplicate",
)
EXPECTED_REASON: dict[str, str] = {
    GOOD: "",
    "dead_url": "download_failed",
    "not_image": "download_failed",
    "truncated": "download_failed",
    "tiny": "too_small",
    "extreme_aspect": "extreme_aspect",
    "caption_mismatch": "low_clip_score",
    "duplicate": "duplicate",
}
TINY_SIZE = (8, 8)
EXTREME_ASPECT_SIZE = (256, 16)  # width, height
WWW_DIR = "www"
TRUTH_FILE = "truth.parquet"
PAIRS_FILE = "pairs.parquet"
NOT_IMAGE_SUFFIX = ".html"  # "<id>.png.html" on disk is served as text/html at "<id>.png"
_NOT_IMAGE_BODY = (
    "<!doctype html><html><head><title>Image not available</title></head>"
    "<body><h1>This image has moved</h1><p>Please enable JavaScript.</p></body></html>"
)

TRUTH_SCHEMA = pa.schema(
    [
        ("path", pa.string()),
        ("caption", pa.string()),
        ("kind", pa.string()),
        ("expected_reason", pa.string()),
        ("category", pa.string()),
        ("spec_json", pa.string()),
    ]
)


def fault_counts(cfg: SynthConfig) -> dict[str, int]:
    """Rows of each kind: ``round(rate * num_pairs)`` per fault, the rest good."""
    counts = {fault: round(getattr(cfg.bad_rows, fault) * cfg.num_pairs) for fault in FAULTS}
    counts[GOOD] = cfg.num_pairs - sum(counts.values())
    # each duplicate copies a distinct good row
    if counts[GOOD] < max(1, counts["duplicate"]):
        raise ValueError(
            f"num_pairs={cfg.num_pairs} leaves no good rows; raise it or lower the bad-row rates"
        )
    return counts


def _png(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def _row_id(seed: int, index: int) -> str:
    # Stable across re-runs with the same seed, and URL-like rather than a giveaway counter.
    return hashlib.sha1(f"ldm-synth:{seed}:{index}".encode()).hexdigest()[:16]


class _Writer:
    """Writes rows' files and collects their truth; keeps every full-size image distinct."""

    def __init__(self, www: Path, cfg: SynthConfig, rng: np.random.Generator):
        self.www, self.cfg, self.rng = www, cfg, rng
        self.rows: list[dict[str, str]] = []
        self.seen: set[str] = set()
        self.good: list[tuple[bytes, str, Scene]] = []  # candidates for the duplicate fault

    def fresh_scene(self, category: str) -> tuple[Scene, Image.Image, bytes]:
        """A scene whose rendering no earlier row has."""
        for _ in range(1000):
            scene = sample_scene(self.rng, category)
            image = render_scene(scene, self.cfg.image_size)
            data = _png(image)
            digest = hashlib.sha256(data).hexdigest()
            if digest not in self.seen:
                self.seen.add(digest)
                return scene, image, data
        raise RuntimeError(f"cannot find a new {category} image: num_pairs is too large for the scene space")

    def add(self, kind: str, caption: str, data: bytes | None, suffix: str = "") -> None:
        path = f"{_row_id(self.cfg.seed, len(self.rows))}.png"
        if data is not None:
            (self.www / (path + suffix)).write_bytes(data)
        spec = parse_caption(caption)
        self.rows.append(
            {
                "path": path,
                "caption": caption,
                "kind": kind,
                "expected_reason": EXPECTED_REASON[kind],
                "category": spec.category,
                "spec_json": spec.to_json(),
            }
        )


def mismatched_captions(scenes: list[Scene], seed: int) -> list[str]:
    """For each scene, another scene's caption that it does NOT satisfy (by the evaluation's rules).

    A random other caption is often still true ("a circle and a square" for a red square beside a
    blue circle); counting those as negatives would cap the AUC below 1 for a perfect scorer.
    """
    rng = np.random.default_rng(seed)
    mismatched = []
    for scene in scenes:
        while True:
            other = scenes[int(rng.integers(len(scenes)))]
            if not check(other.spec, scene.objects):
                mismatched.append(other.caption)
                break
    return mismatched


def _mismatched_caption(scene: Scene, rng: np.random.Generator) -> str:
    """Another scene's caption that this scene does not satisfy (checked by the evaluation rules)."""
    while True:
        other = sample_scene(rng)
        if not check(other.spec, scene.objects):
            return other.caption


def render_source(cfg: SynthConfig, out_dir: str | Path) -> dict[str, int]:
    """Render every row's file into ``out_dir/www/`` and write ``out_dir/truth.parquet``.

    Same config -> same files and truth. Returns the number of rows of each kind.
    """
    out_dir = Path(out_dir)
    www = out_dir / WWW_DIR
    if www.exists():
        shutil.rmtree(www)  # a re-run with other settings must not leave stale files being served
    www.mkdir(parents=True)
    counts = fault_counts(cfg)
    rng = np.random.default_rng(cfg.seed)
    writer = _Writer(www, cfg, rng)

    def category(i: int) -> str:
        return CATEGORIES[i % len(CATEGORIES)]  # balanced over the six categories

    for i in range(counts[GOOD]):
        scene, _, data = writer.fresh_scene(category(i))
        writer.add(GOOD, scene.caption, data)
        writer.good.append((data, scene.caption, scene))
    for i in range(counts["dead_url"]):
        writer.add("dead_url", sample_scene(rng, category(i)).caption, None)
    for i in range(counts["not_image"]):
        caption = sample_scene(rng, category(i)).caption
        writer.add("not_image", caption, _NOT_IMAGE_BODY.encode(), suffix=NOT_IMAGE_SUFFIX)
    for i in range(counts["truncated"]):
        scene, _, data = writer.fresh_scene(category(i))
        writer.add("truncated", scene.caption, data[: len(data) // 2])
    for kind, shape in (("tiny", TINY_SIZE), ("extreme_aspect", EXTREME_ASPECT_SIZE)):
        for i in range(counts[kind]):
            scene, image, _ = writer.fresh_scene(category(i))
            writer.add(kind, scene.caption, _png(image.resize(shape, Image.Resampling.BILINEAR)))
    for i in range(counts["caption_mismatch"]):
        scene, _, data = writer.fresh_scene(category(i))
        writer.add("caption_mismatch", _mismatched_caption(scene, rng), data)
    originals = rng.choice(len(writer.good), size=counts["duplicate"], replace=False)
    for j in originals:
        data, caption, _ = writer.good[int(j)]
        writer.add("duplicate", caption, data)

    pq.write_table(pa.Table.from_pylist(writer.rows, schema=TRUTH_SCHEMA), out_dir / TRUTH_FILE)
    return counts


def write_pairs(out_dir: str | Path, base_url: str) -> Path:
    """Write ``out_dir/pairs.parquet`` (``url``, ``caption``) for the rows of ``truth.parquet``.

    Rows are shuffled (so faults are not bunched at the end) by a stable hash of their path: the
    same source gives the same order, whatever the base URL.
    """
    out_dir = Path(out_dir)
    truth = pq.read_table(out_dir / TRUTH_FILE).to_pylist()
    truth.sort(key=lambda row: hashlib.sha256(row["path"].encode()).digest())
    prefix = base_url.rstrip("/")
    table = pa.table(
        {
            COL_URL: pa.array([f"{prefix}/{row['path']}" for row in truth], pa.string()),
            COL_CAPTION: pa.array([row["caption"] for row in truth], pa.string()),
        }
    )
    path = out_dir / PAIRS_FILE
    pq.write_table(table, path)
    return path


def read_truth(out_dir: str | Path) -> list[dict[str, Any]]:
    """The rows of ``truth.parquet``, with ``spec_json`` left as text (`PromptSpec.from_json` reads it)."""
    return pq.read_table(Path(out_dir) / TRUTH_FILE).to_pylist()
