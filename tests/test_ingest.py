"""The ingest job on a tiny synthetic crawl: real HTTP, real img2dataset, real Ray, tiny real models.

The models are built here with random weights (no bootstrap training), so CLIP scores carry no
meaning: the end-to-end run keeps every pair (``clip_threshold=-1``) and checks the other faults
land in rejects/ with the reasons the synthetic source's truth expects; the score threshold itself
is tested on the `ClipScorer` stage as plain Python with a threshold set from the scores.
"""

from __future__ import annotations

import json
import time
from collections import Counter

import numpy as np
import pyarrow as pa
import pyarrow.csv as pacsv
import pyarrow.parquet as pq
import pytest
from ingest_fixtures import SCALING_FACTOR, write_tiny_models

from ldm.config.ingest import FilterConfig, IngestConfig, StageResources
from ldm.config.synth import BadRowRates, SynthConfig
from ldm.contract import (
    COL_LATENT,
    COL_TEXT_EMBEDDING,
    LATENTS_DIR,
    META_AUTOENCODER,
    META_LATENT_SHAPE,
    META_SCALING_FACTOR,
    META_TEXT_EMBEDDING_SHAPE,
    REJECT_COLUMNS,
    REJECTS_DIR,
    WorkDir,
    read_manifest,
)
from ldm.text import encode_captions
from pipelines.stages import ClipScorer, LatentEncoder


@pytest.fixture(scope="module")
def workdir(tmp_path_factory) -> WorkDir:
    """A work directory holding tiny random first-stage models where `ldm bootstrap` would put them."""
    return write_tiny_models(tmp_path_factory.mktemp("ingest-work"))


def test_clip_scorer_rejects_below_the_threshold(workdir):
    from ldm.first_stage.clip import clip_score, load_clip
    from ldm.synth import render_batch

    images, captions, _ = render_batch(8, seed=1)
    scores = clip_score(load_clip(str(workdir.clip)), images, captions)
    threshold = float(np.median(scores))
    batch = {
        "key": np.array([f"k{i}" for i in range(8)], dtype=object),
        "caption": np.array(captions, dtype=object),
        "image": images,
        "stage": np.array([""] * 8, dtype=object),
        "reason": np.array([""] * 8, dtype=object),
        "detail": np.array([""] * 8, dtype=object),
    }
    out = ClipScorer(str(workdir.clip), threshold)(batch)
    np.testing.assert_allclose(out["clip_score"], scores, atol=1e-6)
    low = scores < threshold
    assert low.sum() == 4  # 8 distinct scores, half under their median
    assert list(out["reason"]) == ["low_clip_score" if x else "" for x in low]
    assert all(out["stage"][low] == "score") and all("<" in d for d in out["detail"][low])


def test_latent_encoder_writes_fp16_latents_and_text_embeddings(workdir):
    from ldm.first_stage.autoencoder import encode_images, load_autoencoder
    from ldm.first_stage.text_encoder import load_text_encoder
    from ldm.synth import render_batch

    images, captions, _ = render_batch(3, seed=2)
    batch = {
        name: np.array(values, dtype=object)
        for name, values in {
            "key": ["a", "b", "c"],
            "url": ["u"] * 3,
            "caption": captions,
            "sha256": ["h"] * 3,
        }.items()
    }
    batch |= {
        "image": images,
        "clip_score": np.zeros(3, np.float32),
        "width": np.full(3, 64),
        "height": np.full(3, 64),
    }
    out = LatentEncoder(str(workdir.autoencoder), str(workdir.models), store_input_ids=True)(batch)
    assert "image" not in out
    assert out[COL_LATENT].dtype == np.float16 and out[COL_LATENT].shape == (3, 4, 16, 16)
    expected = encode_images(load_autoencoder(str(workdir.autoencoder)), images).numpy()
    np.testing.assert_allclose(out[COL_LATENT], expected, atol=2e-3, rtol=1e-3)  # unscaled posterior mean
    tokenizer, text_encoder = load_text_encoder(str(workdir.models))
    text = encode_captions(tokenizer, text_encoder, captions).numpy()
    assert out[COL_TEXT_EMBEDDING].shape == text.shape == (3, 16, 32)
    np.testing.assert_allclose(out[COL_TEXT_EMBEDDING], text, atol=5e-3, rtol=1e-3)
    # the token ids come from the same tokenizer call as the embedding
    ids = tokenizer(captions, padding="max_length", max_length=tokenizer.model_max_length, truncation=True)
    assert out["input_ids"].dtype == np.int32 and out["input_ids"].tolist() == ids["input_ids"]


@pytest.fixture(scope="module")
def crawl(workdir):
    """60 synthetic rows, 3 of each fault, served by a real ImageServer on 127.0.0.1."""
    from ldm.synth.server import ImageServer
    from ldm.synth.source import read_truth, render_source, write_pairs

    rate = 0.05
    synth = SynthConfig(
        workdir=str(workdir.root),
        num_pairs=60,
        bad_rows=BadRowRates(
            **dict.fromkeys(
                (
                    "dead_url",
                    "not_image",
                    "truncated",
                    "tiny",
                    "extreme_aspect",
                    "caption_mismatch",
                    "duplicate",
                ),
                rate,
            )
        ),
    )
    render_source(synth, workdir.synth)
    with ImageServer(workdir.synth / "www") as server:
        pairs = write_pairs(workdir.synth, server.base_url)
        yield pairs, read_truth(workdir.synth)


@pytest.mark.slow  # two ingest runs: ~90 s on 2 busy cores, most of it process and model start-up
def test_ingest_end_to_end_accounts_for_every_row(ray_local, workdir, crawl, capsys):
    import mlflow

    pairs, truth = crawl
    # The crawl plus rows the guard and the caption check must stop before any byte is fetched
    # (10.0.0.1 is never connected to: the guard refuses it from the literal). As CSV, to read one.
    table = pq.read_table(pairs)
    good_paths = {row["path"] for row in truth if row["kind"] == "good"}
    good_url = next(url for url in table.column("url").to_pylist() if url.rsplit("/", 1)[1] in good_paths)
    port = good_url.split(":")[2].split("/")[0]
    extra = {
        "file:///etc/passwd": "a red circle",
        "data:image/png;base64,iVBORw0KGgo=": "a red circle",
        "http://10.0.0.1/a.png": "a red circle",
        f"http://localhost:{port}/a.png": "a red circle",  # loopback, and not the allowed spelling
        good_url: "  ",  # a good image with an empty caption
    }
    rows = table.to_pylist() + [{"url": url, "caption": caption} for url, caption in extra.items()]
    input_csv = workdir.root / "input.csv"
    pacsv.write_csv(pa.Table.from_pylist(rows), input_csv)
    cfg = IngestConfig(
        workdir=str(workdir.root),
        input=str(input_csv),
        allow_hosts=["127.0.0.1"],
        filters=FilterConfig(clip_threshold=-1.0),  # random CLIP: keep every pair (see module doc)
        encode=StageResources(batch_size=16),
        rows_per_file=20,
        torch_threads=1,
    )
    started = time.perf_counter()
    manifest = run_ingest_quiet(cfg)
    seconds = time.perf_counter() - started
    with capsys.disabled():
        print(f"\ningest: {len(rows)} rows in {seconds:.1f} s = {len(rows) / seconds:.2f} rows/s")

    out = WorkDir(workdir.root).data
    latents = pq.read_table(out / LATENTS_DIR)
    rejects = pq.read_table(out / REJECTS_DIR)
    expected = Counter(row["expected_reason"] for row in truth if row["kind"] != "caption_mismatch")
    accepted_kinds = {"good", "caption_mismatch"}
    assert latents.num_rows == sum(row["kind"] in accepted_kinds for row in truth) == 42
    expected = {r: n for r, n in expected.items() if r} | {"blocked_url": 4, "caption_too_short": 1}
    assert Counter(rejects.column("reason").to_pylist()) == expected
    assert rejects.column_names == list(REJECT_COLUMNS)
    # every input row exactly once, in latents/ or rejects/
    keys = latents.column("key").to_pylist() + rejects.column("key").to_pylist()
    assert len(keys) == len(set(keys)) == len(rows) == 65
    # rejected URLs are the faulty ones: match on the path the truth names
    rejected_paths = {
        url.rsplit("/", 1)[1]: reason
        for url, reason in zip(
            rejects.column("url").to_pylist(), rejects.column("reason").to_pylist(), strict=True
        )
    }
    rejected_paths.pop(good_url.rsplit("/", 1)[1])  # the empty-caption copy of a good row
    for row in truth:
        if row["kind"] not in accepted_kinds | {"duplicate"}:
            assert rejected_paths.get(row["path"]) == row["expected_reason"], row
    details = dict(
        zip(rejects.column("reason").to_pylist(), rejects.column("detail").to_pylist(), strict=False)
    )
    assert details["download_failed"]  # a reason always comes with a detail

    # plain pyarrow reads the tensor shape and the metadata back
    schema = pq.read_schema(next((out / LATENTS_DIR).glob("*.parquet")))
    assert schema.field(COL_LATENT).type.shape == [4, 16, 16]
    assert schema.field(COL_LATENT).type.value_type == "halffloat"
    assert json.loads(schema.metadata[META_SCALING_FACTOR]) == SCALING_FACTOR
    assert json.loads(schema.metadata[META_LATENT_SHAPE]) == [4, 16, 16]
    assert json.loads(schema.metadata[META_TEXT_EMBEDDING_SHAPE]) == [16, 32]
    assert json.loads(schema.metadata[META_AUTOENCODER])["spec"] == str(workdir.autoencoder)
    tensor = latents.column(COL_LATENT).combine_chunks().to_numpy_ndarray()
    assert tensor.shape == (42, 4, 16, 16) and tensor.dtype == np.float16 and np.isfinite(tensor).all()
    assert len(list((out / LATENTS_DIR).glob("*.parquet"))) == 3  # 42 rows at 20 per file

    assert manifest == read_manifest(str(out))
    assert manifest.counts.input == 65 and manifest.counts.accepted == 42
    assert manifest.counts.rejected_by_stage == {"download": 9, "filter": 10, "guard": 4}
    assert manifest.scaling_factor == SCALING_FACTOR

    runs = mlflow.search_runs(experiment_names=["ingest"], output_format="list")
    assert len(runs) == 1
    assert runs[0].data.metrics["accepted_rows"] == 42 and runs[0].data.params["input"] == str(input_csv)

    # a re-run into the same output reuses the staged and published shards: nothing is redone or duplicated
    staged = [
        *(out / "_staging" / "rows").glob("shard-*.json"),
        *(out / "_staging" / "published").glob("*.json"),
    ]
    markers = {p: p.stat().st_mtime_ns for p in [*staged, *(out / LATENTS_DIR).glob("*.parquet")]}
    assert len(staged) == 2
    again = run_ingest_quiet(cfg.model_copy(update={"log_mlflow": False}))
    assert {p: p.stat().st_mtime_ns for p in markers} == markers
    assert again.dataset_digest == manifest.dataset_digest and again.counts == manifest.counts
    assert pq.read_table(out / LATENTS_DIR).num_rows == 42 and pq.read_table(out / REJECTS_DIR).num_rows == 23


def run_ingest_quiet(cfg: IngestConfig) -> dict:
    from pipelines.ingest import run_ingest

    return run_ingest(cfg)
