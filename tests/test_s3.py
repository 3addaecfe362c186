"""Ingest from S3 to S3 against a real S3-compatible server (moto's standalone server on 127.0.0.1).

Everything the job touches is on S3: the input list (LAION-style column names), the three models,
the download staging, latents/, rejects/ and the manifest. The result is read back with plain
pyarrow and with the training side's readers. The endpoint comes from the config; the environment
holds a wrong one on purpose, so the test fails if any stage ignores the config.
"""

from __future__ import annotations

import json
import uuid
from collections import Counter

import numpy as np
import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq
import pytest
import s3_fixtures
from ingest_fixtures import SCALING_FACTOR, Route, ScriptedServer, encoded, picture, write_tiny_models

from ldm.config.ingest import DownloadConfig, FilterConfig, IngestConfig, StageResources
from ldm.contract import COL_LATENT, LATENTS_DIR, META_SCALING_FACTOR, REJECTS_DIR, read_manifest
from pipelines import filters

s3_endpoint = s3_fixtures.s3_endpoint  # the shared moto server fixture


def _s3(endpoint: str) -> pafs.S3FileSystem:
    """Plain pyarrow, configured by hand: the reader a user of the data would write."""
    return pafs.S3FileSystem(
        endpoint_override=endpoint.removeprefix("http://"),
        scheme="http",
        access_key="testing",
        secret_key="testing",
        region="us-east-1",
        allow_bucket_creation=True,
    )


@pytest.mark.slow  # one ingest run through S3: ~30 s on 2 busy cores
def test_ingest_from_s3_to_s3(ray_local, s3_endpoint, tmp_path, monkeypatch):
    import ray.data

    for name, value in {
        "AWS_ACCESS_KEY_ID": "testing",
        "AWS_SECRET_ACCESS_KEY": "testing",
        "AWS_REGION": "us-east-1",
        "AWS_EC2_METADATA_DISABLED": "true",  # never ask a cloud metadata service for credentials
        "AWS_ENDPOINT_URL_S3": "http://127.0.0.1:9",  # wrong on purpose: the config must win
        "LDM_CACHE": str(tmp_path / "cache"),
    }.items():
        monkeypatch.setenv(name, value)
    fs = _s3(s3_endpoint)
    bucket = f"ldm-{uuid.uuid4().hex[:8]}"
    fs.create_dir(bucket)
    work = write_tiny_models(tmp_path / "work")
    pafs.copy_files(str(work.models), f"{bucket}/models", destination_filesystem=fs)

    routes = {f"/good{i}.png": Route(encoded(picture(seed=i), "PNG")) for i in range(4)}
    routes["/tiny.png"] = Route(encoded(picture(8, 8), "PNG"))
    with ScriptedServer(routes) as server:
        urls = [server.base_url + path for path in [*routes, "/missing.png"]]
        captions = [f"a picture number {i}" for i in range(len(urls))]
        # LAION's own column names, to show they are configurable
        pq.write_table(pa.table({"URL": urls, "TEXT": captions}), f"{bucket}/in/pairs.parquet", filesystem=fs)
        cfg = IngestConfig(
            workdir=str(work.root),
            input=f"s3://{bucket}/in/pairs.parquet",
            output=f"s3://{bucket}/out",
            s3_endpoint=s3_endpoint,
            url_col="URL",
            caption_col="TEXT",
            allow_hosts=["127.0.0.1"],
            clip=f"s3://{bucket}/models/clip",
            autoencoder=f"s3://{bucket}/models/autoencoder",
            text_encoder=f"s3://{bucket}/models",
            download=DownloadConfig(rows_per_shard=3, timeout_s=5),
            filters=FilterConfig(clip_mode="top_fraction", clip_keep_fraction=0.5),
            encode=StageResources(batch_size=8),
            torch_threads=1,
        )
        from pipelines.ingest import run_ingest

        manifest = run_ingest(cfg)

    out = f"{bucket}/out"
    latents = pq.read_table(f"{out}/{LATENTS_DIR}", filesystem=fs)
    rejects = pq.read_table(f"{out}/{REJECTS_DIR}", filesystem=fs)
    # 4 good pictures, the top half kept by CLIP score (random CLIP: distinct scores)
    assert latents.num_rows == 2
    assert Counter(rejects.column("reason").to_pylist()) == {
        "low_clip_score": 2,
        "too_small": 1,
        "download_failed": 1,
    }
    expected_keys = {filters.row_key(i, u, c) for i, (u, c) in enumerate(zip(urls, captions, strict=True))}
    keys = latents.column("key").to_pylist() + rejects.column("key").to_pylist()
    assert len(keys) == len(set(keys)) and set(keys) == expected_keys
    kept_scores = latents.column("clip_score").to_numpy()
    assert kept_scores.min() >= manifest.clip_cutoff
    latent_type = latents.schema.field(COL_LATENT).type
    assert latent_type.shape == [4, 16, 16] and latent_type.value_type == pa.float16()
    tensor = latents.column(COL_LATENT).combine_chunks().to_numpy_ndarray()
    assert tensor.shape == (2, 4, 16, 16) and np.isfinite(tensor).all()
    stored = read_manifest(f"s3://{out}")
    assert stored.counts == manifest.counts and stored.counts.input == 6
    markers = fs.get_file_info(pafs.FileSelector(f"{out}/_staging/rows"))
    assert sum(info.path.endswith(".json") for info in markers) == 2  # 6 rows, 3 per shard
    published = fs.get_file_info(pafs.FileSelector(f"{out}/{LATENTS_DIR}"))
    assert sorted(info.base_name for info in published) == [
        "part-00000-000.parquet",
        "part-00001-000.parquet",
    ]
    assert stored.shards == 2
    assert not (work.root / "data").exists()  # nothing went to the local default

    # the training side reads the same S3 latents: facts from the schema, rows through Ray Data
    from pipelines.train import read_latents_facts

    facts = read_latents_facts(f"s3://{out}/{LATENTS_DIR}")
    assert facts.scaling_factor == SCALING_FACTOR == json.loads(latents.schema.metadata[META_SCALING_FACTOR])
    read_back = ray.data.read_parquet(f"{out}/{LATENTS_DIR}", filesystem=fs, columns=[COL_LATENT])
    assert read_back.count() == 2
