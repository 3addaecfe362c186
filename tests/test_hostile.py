"""The ingest job against a hostile crawl: every row ends in exactly one of latents/ or rejects/.

A scripted HTTP server on 127.0.0.1 serves what the web serves: wrong content types, HTML and SVG
where an image was promised, animated GIFs, CMYK and EXIF-rotated JPEGs, 16-bit, palette and alpha
PNGs, empty bodies, a decompression-bomb header, truncated files, a slow endpoint beyond the
timeout, a redirect loop, an opt-out header, and so on; the input list (a CSV written byte by byte)
adds non-UTF-8, very long and odd-unicode captions, empty and invisible captions, duplicate URLs
and URLs the guard must refuse. The expected reason of every row is written next to it.

The same crawl is then ingested by a separate process that is killed (SIGKILL) once an input
shard is staged; a re-run into the same output must give exactly the uninterrupted result.
"""

from __future__ import annotations

import os
import signal
import struct
import subprocess
import sys
import time
import zlib
from collections import Counter
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
from ingest_fixtures import Route, ScriptedServer, encoded, picture, write_tiny_models
from PIL import Image

from ldm.config.ingest import DownloadConfig, FilterConfig, IngestConfig, StageResources
from ldm.contract import LATENTS_DIR, MANIFEST_FILE, REJECTS_DIR, FunnelStep
from pipelines import filters
from pipelines.ingest_files import staging

ACCEPTED = ""
# rows expected in pairs, one kept and one rejected: which one depends on the keys (hence on the port)
PAIRS = {"twin": filters.REASON_NEAR_DUPLICATE, "same-url": filters.REASON_DUPLICATE}
ROWS_PER_SHARD = 6


def _png_chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def bomb_png(side: int = 30_000) -> bytes:
    """A valid PNG header claiming side x side pixels, in ~60 bytes (never decodable in full)."""
    header = struct.pack(">IIBBBBB", side, side, 8, 2, 0, 0, 0)  # 8-bit RGB
    return (
        b"\x89PNG\r\n\x1a\n"
        + _png_chunk(b"IHDR", header)
        + _png_chunk(b"IDAT", zlib.compress(b"\x00" * 64))
        + _png_chunk(b"IEND", b"")
    )


def animated_gif() -> bytes:
    frames = [picture(seed=30 + i) for i in range(3)]
    return encoded(frames[0], "GIF", save_all=True, append_images=frames[1:], duration=80, loop=0)


def sixteen_bit_png(value: int = 32768) -> bytes:
    grey = np.full((64, 64), value, dtype=np.uint16)
    grey[:, 32:] = value // 2
    return encoded(Image.fromarray(grey), "PNG")


def exif_rotated_jpeg() -> bytes:
    """Stored 48 wide x 80 tall, left half red, right half blue; EXIF says: rotate 90 degrees to show."""
    stored = np.zeros((80, 48, 3), dtype=np.uint8)
    stored[:, :24] = (230, 20, 20)
    stored[:, 24:] = (20, 20, 230)
    exif = Image.Exif()
    exif[0x0112] = 6  # Orientation: the upright picture is this one turned 90 degrees clockwise
    return encoded(Image.fromarray(stored), "JPEG", quality=95, exif=exif.tobytes())


def transparent_png() -> bytes:
    rgba = np.zeros((64, 64, 4), dtype=np.uint8)
    rgba[..., 0] = 255  # red under fully transparent pixels: must come out white, not red
    rgba[:, 32:, 3] = 255  # the right half is opaque red
    return encoded(Image.fromarray(rgba, "RGBA"), "PNG")


def palette_png() -> bytes:
    return encoded(
        picture(seed=21).convert("P", palette=Image.Palette.ADAPTIVE, colors=8), "PNG", transparency=0
    )


SVG = b'<svg xmlns="http://www.w3.org/2000/svg" width="64" height="64"><circle r="20" cx="32" cy="32"/></svg>'
HTML = b"<!doctype html><html><body>This image has moved</body></html>"


def hostile_routes() -> dict[str, Route]:
    twin = picture(seed=13)
    return {
        "/good.png": Route(encoded(picture(seed=1), "PNG")),
        "/good2.png": Route(encoded(picture(seed=14), "PNG")),
        "/wrong-type.png": Route(encoded(picture(seed=2), "PNG"), content_type="text/html"),
        "/jpeg-named.png": Route(encoded(picture(seed=11), "JPEG"), content_type="image/png"),
        "/page.png": Route(HTML, content_type="image/png"),
        "/drawing.svg": Route(SVG, content_type="image/svg+xml"),
        "/anim.gif": Route(animated_gif(), content_type="image/gif"),
        "/cmyk.jpg": Route(encoded(picture(seed=4, mode="CMYK"), "JPEG"), content_type="image/jpeg"),
        "/deep.png": Route(sixteen_bit_png()),
        "/palette.png": Route(palette_png()),
        "/alpha.png": Route(transparent_png()),
        "/rotated.jpg": Route(exif_rotated_jpeg(), content_type="image/jpeg"),
        "/image.webp": Route(encoded(picture(seed=12), "WEBP"), content_type="image/webp"),
        "/twin-a.png": Route(encoded(twin, "PNG", compress_level=9)),
        "/twin-b.png": Route(encoded(twin, "PNG", compress_level=1)),  # other bytes, same pixels
        "/long.png": Route(encoded(picture(seed=8), "PNG")),
        "/latin.png": Route(encoded(picture(seed=9), "PNG")),
        "/unicode.png": Route(encoded(picture(seed=10), "PNG")),
        "/empty.png": Route(b""),
        "/bomb.png": Route(bomb_png()),
        "/tiny.gif": Route(encoded(picture(1, 1), "GIF"), content_type="image/gif"),
        "/strip.png": Route(encoded(picture(400, 20, seed=5), "PNG")),
        "/truncated.jpg": Route(encoded(picture(seed=6), "JPEG")[:200], content_type="image/jpeg"),
        "/slow.png": Route(encoded(picture(seed=7), "PNG"), delay_s=10.0),
        "/loop-a": Route(location="/loop-b"),
        "/loop-b": Route(location="/loop-a"),
        "/moved.png": Route(location="/target.png"),
        "/target.png": Route(encoded(picture(seed=15), "PNG")),
        "/error.png": Route(b"oops", content_type="text/plain", status=500),
        "/noai.png": Route(encoded(picture(seed=16), "PNG"), headers={"X-Robots-Tag": "noai"}),
        "/other-bot.png": Route(  # an opt-out aimed at another crawler does not apply to us
            encoded(picture(seed=17), "PNG"), headers={"X-Robots-Tag": "otherbot: noai"}
        ),
    }


def hostile_rows(base: str) -> list[tuple[bytes, bytes, str]]:
    """(url, caption, expected reason) as raw CSV bytes; ACCEPTED ("") for rows that must be kept."""
    caption = b"a picture of coloured blocks"
    port = base.rsplit(":", 1)[1]
    rows: list[tuple[bytes, bytes, str]] = [
        (f"{base}{path}".encode(), caption, reason)
        for path, reason in [
            ("/good.png", "same-url"),  # one of the two rows of this URL is kept (the lower key)
            ("/wrong-type.png", ACCEPTED),  # the bytes decide, not the content type
            ("/jpeg-named.png", ACCEPTED),
            ("/page.png", filters.REASON_DOWNLOAD),
            ("/drawing.svg", filters.REASON_DOWNLOAD),
            ("/anim.gif", ACCEPTED),
            ("/cmyk.jpg", ACCEPTED),
            ("/deep.png", ACCEPTED),
            ("/palette.png", ACCEPTED),
            ("/alpha.png", ACCEPTED),
            ("/rotated.jpg", ACCEPTED),
            ("/image.webp", ACCEPTED),
            ("/twin-a.png", "twin"),  # one of the twins is kept, the other is a near-duplicate
            ("/twin-b.png", "twin"),
            ("/empty.png", filters.REASON_DOWNLOAD),
            ("/bomb.png", filters.REASON_TOO_LARGE),
            ("/tiny.gif", filters.REASON_TOO_SMALL),
            ("/strip.png", filters.REASON_ASPECT),
            ("/truncated.jpg", filters.REASON_DOWNLOAD),
            ("/slow.png", filters.REASON_DOWNLOAD),
            ("/loop-a", filters.REASON_DOWNLOAD),
            ("/moved.png", ACCEPTED),
            ("/error.png", filters.REASON_DOWNLOAD),
            ("/missing.png", filters.REASON_DOWNLOAD),
            ("/noai.png", filters.REASON_OPTED_OUT),
            ("/to-loopback.png", filters.REASON_BLOCKED_REDIRECT),  # the guard checks every hop
            ("/to-file.png", filters.REASON_DOWNLOAD),  # urllib itself refuses a redirect to file:
            ("/other-bot.png", ACCEPTED),
            ("/" + "x" * 5000 + ".png", filters.REASON_DOWNLOAD),  # a very long URL
        ]
    ]
    rows += [
        (f"{base}/good.png".encode(), caption, "same-url"),  # the same URL again: a duplicate
        (f"{base}/good2.png".encode(), b"", filters.REASON_CAPTION),
        (f"{base}/good2.png".encode(), "\u200b\u200b\u200b\u200b".encode(), filters.REASON_CAPTION),
        (f"{base}/long.png".encode(), b"red " * 5000, ACCEPTED),
        (f"{base}/latin.png".encode(), "caf\xe9 cr\xe8me bl\xf6cks".encode("latin-1"), ACCEPTED),
        (
            f"{base}/unicode.png".encode(),
            "\U0001f534 red \u202eblocks\u202c \u0915\u094d\u200d\u0937 e\u0301 \ufeff".encode(),
            ACCEPTED,
        ),
        (b"file:///etc/passwd", caption, filters.REASON_BLOCKED),
        (b"data:image/png;base64,iVBORw0KGgo=", caption, filters.REASON_BLOCKED),
        (b"", caption, filters.REASON_BLOCKED),
        (b"not a url", caption, filters.REASON_BLOCKED),
        (f"http://localhost:{port}/good.png".encode(), caption, filters.REASON_BLOCKED),
    ]
    return rows


def write_csv(rows: list[tuple[bytes, bytes, str]], path: Path) -> Path:
    """A CSV with bytes as given (the latin-1 caption stays invalid UTF-8); fields quoted."""

    def quote(field: bytes) -> bytes:
        return b'"' + field.replace(b'"', b'""') + b'"'

    lines = [b"url,caption"] + [quote(url) + b"," + quote(caption) for url, caption, _ in rows]
    path.write_bytes(b"\n".join(lines) + b"\n")
    return path


def hostile_config(root: Path, input_csv: Path, output: Path) -> IngestConfig:
    return IngestConfig(
        workdir=str(root),
        input=str(input_csv),
        output=str(output),
        allow_hosts=["127.0.0.1"],
        download=DownloadConfig(timeout_s=4, retries=0, rows_per_shard=ROWS_PER_SHARD, thread_count=8),
        # random CLIP: keep every score; twins have identical pixels, so identical embeddings
        filters=FilterConfig(clip_threshold=-1.0, near_duplicate_threshold=0.9999),
        encode=StageResources(batch_size=16),
        torch_threads=1,
        num_cpus=2,
        log_mlflow=True,
    )


@pytest.fixture(scope="module")
def hostile_run(ray_local, tmp_path_factory):
    """The hostile crawl ingested once, uninterrupted; the server stays up for the kill test."""
    root = tmp_path_factory.mktemp("hostile")
    work = write_tiny_models(root)
    with ScriptedServer(hostile_routes()) as server:
        port = server.base_url.rsplit(":", 1)[1]
        # redirects the guard must refuse (the targets need the port, known once the server runs)
        server.routes["/to-loopback.png"] = Route(location=f"http://localhost:{port}/good.png")
        server.routes["/to-file.png"] = Route(location="file:///etc/passwd")
        rows = hostile_rows(server.base_url)
        input_csv = write_csv(rows, root / "crawl.csv")
        cfg = hostile_config(work.root, input_csv, root / "uninterrupted")
        from pipelines.ingest import run_ingest

        manifest = run_ingest(cfg)
        yield cfg, rows, manifest


def _outputs(output: Path):
    return pq.read_table(output / LATENTS_DIR), pq.read_table(output / REJECTS_DIR)


@pytest.mark.slow  # one ingest run of the hostile crawl: ~40 s on 2 busy cores
def test_every_hostile_row_ends_once_with_a_sensible_reason(hostile_run):
    from pipelines.ingest import read_pairs

    cfg, rows, manifest = hostile_run
    latents, rejects = _outputs(Path(cfg.output_uri))
    inputs = read_pairs(cfg.input_uri)
    keys = inputs.column("key").to_pylist()
    got = dict.fromkeys(latents.column("key").to_pylist(), ACCEPTED)
    for key, reason in zip(
        rejects.column("key").to_pylist(), rejects.column("reason").to_pylist(), strict=True
    ):
        assert key not in got, f"{key} is in latents/ and rejects/, or twice in rejects/"
        got[key] = reason
    assert len(got) == latents.num_rows + rejects.num_rows == len(rows) == len(keys)

    verdicts = [got[key] for key in keys]
    wrong = [
        (url[:80], expected, actual)
        for (url, _, expected), actual in zip(rows, verdicts, strict=True)
        if expected not in PAIRS and actual != expected
    ]
    assert not wrong, wrong
    for pair, rejected_as in PAIRS.items():
        pair_verdicts = [actual for (_, _, exp), actual in zip(rows, verdicts, strict=True) if exp == pair]
        assert sorted(pair_verdicts) == [ACCEPTED, rejected_as], pair

    # every reject carries its stage and a detail; the detail says what went wrong
    details = dict(zip(rejects.column("key").to_pylist(), rejects.column("detail").to_pylist(), strict=True))
    assert all(details.values())
    slow_key = keys[[url.endswith(b"/slow.png") for url, _, _ in rows].index(True)]
    assert "timed out" in details[slow_key].lower()
    assert Counter(rejects.column("stage").to_pylist()) == {
        "guard": 5,
        "filter": 6,  # 2 captions, bomb, tiny, strip, duplicate URL
        "download": 12,  # 10 failures, 1 opt-out, 1 redirect refused by the guard
        "score": 1,
    }

    # captions survive as given (non-UTF-8 bytes become U+FFFD), latents keep the upright size
    captions = dict(
        zip(latents.column("key").to_pylist(), latents.column("caption").to_pylist(), strict=True)
    )
    sizes = {
        key: (w, h)
        for key, w, h in zip(
            latents.column("key").to_pylist(),
            latents.column("width").to_pylist(),
            latents.column("height").to_pylist(),
            strict=True,
        )
    }
    index = {url.rsplit(b"/", 1)[-1]: i for i, (url, _, _) in enumerate(rows)}
    assert captions[keys[index[b"latin.png"]]] == "caf\ufffd cr\ufffdme bl\ufffdcks"
    assert len(captions[keys[index[b"long.png"]]]) == 20_000
    assert sizes[keys[index[b"rotated.jpg"]]] == (80, 48)
    assert manifest.counts.accepted == latents.num_rows == 16
    assert manifest.funnel[-1] == FunnelStep(step="not near-duplicate", rows=16)


@pytest.mark.slow  # reads the MLflow run of the shared hostile run
def test_ingest_run_logs_the_funnel_as_pictures(hostile_run):
    import mlflow

    from ldm import tracking

    cfg, _, manifest = hostile_run
    tracking.configure(cfg.workdir)
    (run,) = mlflow.search_runs(experiment_names=["ingest"], output_format="list")
    client = mlflow.MlflowClient()
    top = {item.path for item in client.list_artifacts(run.info.run_id)}
    assert {"funnel.png", "clip_scores.png", "manifest.json", "rejects"} <= top
    grids = {item.path for item in client.list_artifacts(run.info.run_id, "rejects")}
    # the reasons whose rows hold a picture; download failures and the bomb are never decoded
    assert grids == {
        f"rejects/{r}.png" for r in ("duplicate", "extreme_aspect", "near_duplicate", "too_small")
    }
    local = client.download_artifacts(run.info.run_id, "funnel.png", dst_path=str(Path(cfg.workdir) / "dl"))
    assert Image.open(local).size[0] > 300
    rows_left = [step.rows for step in manifest.funnel]
    # input, URL allowed, caption ok, column filters (none here), downloaded, image filters, CLIP, near-dup
    assert rows_left == [40, 35, 33, 33, 21, 17, 17, 16] and rows_left == sorted(rows_left, reverse=True)
    assert run.data.metrics["rejected_opted_out"] == 1 and run.data.metrics["clip_cutoff"] == -1.0


@pytest.mark.slow  # the hostile run (shared) plus one killed and one completed run: ~60 s
def test_killed_ingest_reruns_to_the_same_result(hostile_run, tmp_path):
    cfg, rows, reference = hostile_run
    output = tmp_path / "killed"
    # one shard task at a time and small model batches: shards are staged one after another
    one_at_a_time = cfg.download.model_copy(update={"shard_concurrency": 1})
    update = {"output": str(output), "log_mlflow": False, "download": one_at_a_time}
    killed_cfg = cfg.model_copy(update=update | {"encode": StageResources(batch_size=2)})
    config_file = tmp_path / "ingest.yaml"
    config_file.write_text(killed_cfg.to_yaml())
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    # its own session (process group), so the kill takes the driver and every Ray process it started
    process = subprocess.Popen(
        [sys.executable, "-m", "ldm.cli", "ingest", "--config", str(config_file)],
        env=env,
        start_new_session=True,
        stdout=subprocess.DEVNULL,
        stderr=(tmp_path / "ingest.log").open("wb"),
    )
    staged = Path(staging(str(output), "rows"))
    shards = -(-len(rows) // ROWS_PER_SHARD)  # input shards: every row, the guard's rejects too
    try:
        deadline = time.monotonic() + 240
        while not list(staged.glob("shard-*.json")):
            log = (tmp_path / "ingest.log").read_bytes()[-3000:].decode(errors="replace")
            assert process.poll() is None, f"the ingest process ended before any shard was staged: {log}"
            assert time.monotonic() < deadline, "no shard was staged in time"
            time.sleep(0.05)
        os.killpg(process.pid, signal.SIGKILL)
    finally:
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGKILL)
        process.wait(timeout=60)
    done_before = {p: p.stat().st_mtime_ns for p in staged.glob("shard-*.json")}
    # killed in pass 1, or later (a loaded machine may stage every shard between two polls)
    assert 1 <= len(done_before) <= shards
    assert not (output / MANIFEST_FILE).exists()

    from pipelines.ingest import run_ingest

    again = run_ingest(killed_cfg)
    # the shards staged before the kill were reused, not fetched again
    assert {p: p.stat().st_mtime_ns for p in done_before} == done_before
    assert len(list(staged.glob("shard-*.json"))) == shards
    latents, rejects = _outputs(output)
    ref_latents, ref_rejects = _outputs(Path(cfg.output_uri))
    keys = latents.column("key").to_pylist() + rejects.column("key").to_pylist()
    assert len(keys) == len(set(keys)) == len(rows)  # no duplicates, no holes
    assert sorted(latents.column("key").to_pylist()) == sorted(ref_latents.column("key").to_pylist())
    assert sorted(
        zip(rejects.column("key").to_pylist(), rejects.column("reason").to_pylist(), strict=True)
    ) == (
        sorted(
            zip(ref_rejects.column("key").to_pylist(), ref_rejects.column("reason").to_pylist(), strict=True)
        )
    )
    assert again.dataset_digest == reference.dataset_digest
    assert again.counts == reference.counts


# --- the decoding side of the hostile inputs, as plain Python (fast) -----------------------------
FILTERS = FilterConfig()


def test_sixteen_bit_images_are_scaled_not_clipped():
    check = filters.inspect_image(sixteen_bit_png(32768), FILTERS, 64)
    assert check.reason is None
    assert abs(int(check.image[10, 10, 0]) - 128) <= 1 and abs(int(check.image[10, 50, 0]) - 64) <= 1


def test_transparency_is_composited_on_white():
    check = filters.inspect_image(transparent_png(), FILTERS, 64)
    assert check.reason is None
    assert tuple(check.image[10, 5]) == (255, 255, 255)  # transparent red: white
    assert tuple(check.image[10, 60]) == (255, 0, 0)  # opaque red: red


def test_exif_rotation_is_applied_before_the_checks_and_the_resize():
    check = filters.inspect_image(exif_rotated_jpeg(), FILTERS, 64)
    assert check.reason is None and (check.width, check.height) == (80, 48)
    top, bottom = check.image[4, 32].astype(int), check.image[60, 32].astype(int)
    assert top[0] > 180 and top[2] < 80  # the red half is on top once upright
    assert bottom[2] > 180 and bottom[0] < 80


@pytest.mark.parametrize(
    ("data", "reason", "detail"),
    [
        (bomb_png(), filters.REASON_TOO_LARGE, "bomb"),
        (bomb_png(9000), filters.REASON_TOO_LARGE, "9000x9000"),  # under PIL's limit, over ours
        (SVG, filters.REASON_DOWNLOAD, "not_image"),
        (HTML, filters.REASON_DOWNLOAD, "not_image"),
        (encoded(picture(seed=6), "JPEG")[:200], filters.REASON_DOWNLOAD, "runcated"),  # at open
    ],
)
def test_hostile_bytes_are_rejected_with_a_reason(data, reason, detail):
    check = filters.inspect_image(data, FILTERS, 64)
    assert check.reason == reason and detail in check.detail and check.image is None


@pytest.mark.parametrize(
    "data", [animated_gif(), encoded(picture(seed=4, mode="CMYK"), "JPEG"), palette_png()]
)
def test_odd_modes_decode_to_rgb(data):
    check = filters.inspect_image(data, FILTERS, 64)
    assert check.reason is None and check.image.shape == (64, 64, 3) and check.image.dtype == np.uint8
    assert check.image.std() > 5  # a picture, not a flat fill


def test_non_utf8_csv_captions_are_read_with_replacement_characters(tmp_path):
    from pipelines.ingest import read_pairs

    path = write_csv(
        [(b"http://h/a.png", "caf\xe9".encode("latin-1"), ""), (b"http://h/b.png", b"ok", "")],
        tmp_path / "x.csv",
    )
    table = read_pairs(str(path))
    assert table.column("caption").to_pylist() == ["caf\ufffd", "ok"]
