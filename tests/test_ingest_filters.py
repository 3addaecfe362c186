"""Ingest filters as plain Python: keys, captions, image checks, duplicates, batch verdicts, accounting."""

from __future__ import annotations

import io

import numpy as np
import pytest
from PIL import Image

from ldm.config.base import load_config
from ldm.config.ingest import FilterConfig, IngestConfig
from pipelines import filters
from pipelines.ingest import IngestAccountingError, check_accounting

FILTERS = FilterConfig(min_side=32, max_aspect_ratio=3.0, max_pixels=200_000, min_caption_chars=3)


def png(width: int, height: int, seed: int = 0) -> bytes:
    pixels = np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="PNG")
    return buffer.getvalue()


def test_row_key_is_stable_fixed_width_and_row_specific():
    key = filters.row_key(3, "http://a/x.png", "a red circle")
    assert key == filters.row_key(3, "http://a/x.png", "a red circle")
    assert len(key) == filters.KEY_WIDTH and int(key, 16) >= 0
    assert key != filters.row_key(4, "http://a/x.png", "a red circle")  # identical rows, two keys
    assert key != filters.row_key(3, "http://a/x.png", "a blue circle")


def test_caption_problem():
    assert filters.caption_problem("a red circle", 3) is None
    assert filters.caption_problem("   ", 3) == "empty caption"
    assert filters.caption_problem(None, 3) == "empty caption"
    assert "2 characters" in filters.caption_problem(" ab ", 3)


def test_inspect_image_accepts_and_resizes_from_the_original_size():
    check = filters.inspect_image(png(64, 64), FILTERS, 64)
    assert check.reason is None and (check.width, check.height) == (64, 64)
    original = np.asarray(Image.open(io.BytesIO(png(64, 64))))
    np.testing.assert_array_equal(check.image, original)  # already the model size: untouched
    wide = filters.inspect_image(png(128, 96), FILTERS, 64)
    assert wide.reason is None and (wide.width, wide.height) == (128, 96)
    assert wide.image.shape == (64, 64, 3) and wide.image.dtype == np.uint8


@pytest.mark.parametrize(
    ("data", "reason", "detail"),
    [
        (png(8, 8), filters.REASON_TOO_SMALL, "8x8"),
        (png(256, 16), filters.REASON_ASPECT, "aspect 16.00"),
        (png(500, 500), filters.REASON_TOO_LARGE, "500x500"),  # refused from the header, never decoded
        (png(64, 64)[:300], filters.REASON_DOWNLOAD, "truncated"),
        (b"<!doctype html><html>moved</html>", filters.REASON_DOWNLOAD, "not_image"),
        (b"", filters.REASON_DOWNLOAD, "no bytes"),
    ],
)
def test_inspect_image_rejections(data, reason, detail):
    check = filters.inspect_image(data, FILTERS, 64)
    assert check.reason == reason
    assert detail in check.detail
    assert check.image is None


def test_duplicate_keys_keeps_the_lowest_key():
    keys = ["c", "a", "b", "d", "e"]
    hashes = ["h1", "h1", "h2", "h1", None]
    assert filters.duplicate_keys(keys, hashes) == {"c": "a", "d": "a"}
    assert filters.duplicate_keys(list(reversed(keys)), list(reversed(hashes))) == {"c": "a", "d": "a"}


def test_filter_downloads_batch_verdicts():
    good, tiny = png(64, 64, seed=1), png(8, 8)
    batch = {
        "key": np.array(["k0", "k1", "k2", "k3", "k4"], dtype=object),
        "url": np.array([f"http://h/{i}.png" for i in range(5)], dtype=object),
        "caption": np.array(["a red circle"] * 5, dtype=object),
        "status": np.array(["success", "failed_to_download", "success", "success", "success"], dtype=object),
        "error_message": np.array([None, "HTTP Error 404: File not found", None, None, None], dtype=object),
        "sha256": np.array(["h0", None, "h2", "h0", "h4"], dtype=object),
        "image_bytes": np.array([good, None, tiny, good, b"junk"], dtype=object),
    }
    out = filters.filter_downloads(batch, FILTERS, 64, duplicates={"k3": "k0"})
    assert list(out["reason"]) == ["", "download_failed", "too_small", "duplicate", "download_failed"]
    assert list(out["stage"]) == ["", "download", "filter", "filter", "download"]
    assert "404" in out["detail"][1] and "k0" in out["detail"][3]
    assert out["image"].shape == (5, 64, 64, 3) and out["image"][0].any() and not out["image"][1].any()
    assert list(out["width"]) == [64, 0, 8, 64, 0]


def test_check_accounting():
    check_accounting(["a", "b", "c"], ["a"], ["c", "b"])
    with pytest.raises(IngestAccountingError, match="missing 1"):
        check_accounting(["a", "b", "c"], ["a"], ["c"])
    with pytest.raises(IngestAccountingError, match="repeated 1"):
        check_accounting(["a", "b"], ["a", "b"], ["b"])


def test_ingest_config_round_trip(tmp_path):
    cfg = IngestConfig(workdir=str(tmp_path), allow_hosts=["127.0.0.1"], filters=FILTERS)
    path = tmp_path / "ingest.yaml"
    path.write_text(cfg.to_yaml())
    assert load_config(IngestConfig, path) == cfg
    assert load_config(IngestConfig, path, sets=["encode.batch_size=8"]).encode.batch_size == 8
    with pytest.raises(ValueError, match="clip_treshold"):
        load_config(IngestConfig, sets=["filters.clip_treshold=0.1"])
    assert cfg.output_uri == str(tmp_path.resolve() / "data")
    # the synthetic default input allows its loopback server; an explicit input does not
    assert "127.0.0.1" in IngestConfig(workdir=str(tmp_path)).allowed_hosts
    assert IngestConfig(workdir=str(tmp_path), input="x.parquet").allowed_hosts == frozenset()


def test_caption_of_invisible_characters_is_empty():
    assert filters.caption_problem("\u200b\u200b\u200b\ufeff", 3) == "empty caption"
    assert filters.caption_problem("\u200bab\u200b", 3) == "caption has 2 characters, fewer than 3"
    assert filters.caption_problem("caf\ufffd \U0001f534", 3) is None


def test_opt_out_is_its_own_reason():
    message = "Use of image disallowed by X-Robots-Tag directive"  # img2dataset's wording
    assert filters.download_failure_reason(message) == filters.REASON_OPTED_OUT
    assert filters.download_failure_reason("HTTP Error 404: Not Found") == filters.REASON_DOWNLOAD
    assert filters.download_failure_reason(None) == filters.REASON_DOWNLOAD


def test_clip_cutoff_threshold_and_top_fraction():
    scores = np.array([0.10, 0.40, 0.25, 0.30, 0.20, 0.35, 0.15, 0.05, 0.45, 0.50], dtype=np.float32)
    assert filters.clip_cutoff(scores, FilterConfig(clip_threshold=0.28)) == 0.28
    top = FilterConfig(clip_mode="top_fraction", clip_keep_fraction=0.3)
    cutoff = filters.clip_cutoff(scores, top)
    assert (scores >= cutoff).sum() == 3 and cutoff == pytest.approx(0.40)
    # a fraction that is not a whole number of rows rounds up: 25% of 10 keeps 3
    quarter = FilterConfig(clip_mode="top_fraction", clip_keep_fraction=0.25)
    assert (scores >= filters.clip_cutoff(scores, quarter)).sum() == 3
    assert filters.clip_cutoff(np.zeros(0), top) == float("-inf")
    with pytest.raises(ValueError):
        FilterConfig(clip_mode="top_fraction", clip_keep_fraction=0.0)
    with pytest.raises(ValueError):
        FilterConfig(clip_mode="best")


def test_near_duplicate_keys_keep_the_lowest_key():
    rng = np.random.default_rng(0)
    base = rng.normal(size=(4, 16))
    base /= np.linalg.norm(base, axis=1, keepdims=True)
    close = base[1] + 0.01 * rng.normal(size=16)
    vectors = np.vstack([base, close / np.linalg.norm(close)])
    keys = ["d", "b", "a", "c", "e"]  # "e" is close to "b"; the rest are unrelated random directions
    cosine = float(vectors[1] @ vectors[4])
    assert 0.99 < cosine < 1.0
    assert filters.near_duplicate_keys(keys, vectors, threshold=0.99) == {"e": "b"}
    assert filters.near_duplicate_keys(keys, vectors, threshold=cosine + 1e-4) == {}
    # order of arrival and block size do not matter
    order = [4, 2, 0, 3, 1]
    shuffled = filters.near_duplicate_keys([keys[i] for i in order], vectors[order], 0.99, block_rows=2)
    assert shuffled == {"e": "b"}
    with pytest.raises(ValueError, match="keys"):
        filters.near_duplicate_keys(keys, vectors[:3], 0.99)


def test_production_ingest_config_validates():
    from pathlib import Path

    import open_clip

    path = Path(__file__).resolve().parents[1] / "configs" / "production-ingest.yaml"
    cfg = load_config(IngestConfig, path)
    assert cfg.input_uri.startswith("s3://") and cfg.output_uri.startswith("s3://")
    assert (cfg.url_col, cfg.caption_col) == ("URL", "TEXT")
    arch, _, weights = cfg.clip_spec.removeprefix("open_clip:").partition("@")
    assert open_clip.get_model_config(arch) is not None and weights.startswith("s3://")
    assert cfg.filters.clip_threshold == 0.28 and cfg.filters.near_duplicate_threshold == 0.96
    assert cfg.encode.num_gpus == 1 and cfg.score is None
    assert cfg.download.disallowed_header_directives == ["noai", "noimageai", "noindex", "noimageindex"]
    assert (
        load_config(IngestConfig, path, sets=["filters.clip_mode=top_fraction"]).filters.clip_mode
        == "top_fraction"
    )


def test_redirect_refused_by_the_guard_is_its_own_reason():
    from pipelines.download import REDIRECT_BLOCKED

    message = f"HTTP Error 302: {REDIRECT_BLOCKED}: host 'localhost' resolves to loopback address 127.0.0.1"
    assert filters.download_failure_reason(message) == filters.REASON_BLOCKED_REDIRECT


def test_lsh_miss_probability_at_the_production_defaults():
    # the distributed LSH pass itself is checked against the exact rule in tests/test_ingest_stream.py
    assert filters.lsh_miss_probability(0.96, 40, 16) < 1e-4
    assert filters.lsh_miss_probability(0.5, 40, 16) > 0.9  # unrelated rows rarely collide
    assert filters.lsh_miss_probability(1.0, 40, 16) == 0.0
    assert filters.lsh_miss_probability(0.95, 60, 4) < 1e-20
