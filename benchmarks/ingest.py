"""Ingest throughput: the Ray job end to end against a naive script and against the models alone.

Three measurements on the same rows (rendered synthetic scenes served over HTTP on 127.0.0.1), the
same models (the bootstrap defaults' sizes, random weights: throughput does not depend on them) and
the same torch thread count, in one run:

1. **pipeline**: `pipelines.ingest.run_ingest` (download shards, filters, CLIP-score and encode
   actor pools, write), pairs/s from its start to its manifest, Ray already running;
2. **naive**: a sequential script doing the same work one pair at a time (fetch, decode and check,
   CLIP score, encode image and caption);
3. **model-only**: the scoring and encoding stages on pre-decoded batches of the job's batch sizes,
   i.e. the bound the pipeline would reach if downloading, decoding and moving rows cost nothing.

Prints pairs/s of each and the ratios: pipeline / naive (target >= 3) and pipeline / model-only
(1 - that is the pipeline's overhead; target <= 20%). Usage:

    .venv/bin/python benchmarks/ingest.py [--rows 512] [--threads 2]
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
import urllib.request
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def build_models(work) -> None:
    """Random-weight first-stage models of the bootstrap defaults' sizes, where ingest looks for them."""
    import torch

    from ldm.config.bootstrap import AutoencoderConfig, ClipConfig
    from ldm.first_stage.autoencoder import build_autoencoder, save_autoencoder
    from ldm.first_stage.clip import build_clip, save_clip
    from ldm.first_stage.text_encoder import (
        build_text_tokenizer,
        clip_text_tower_to_transformers,
        save_text_encoder,
    )

    torch.manual_seed(0)
    clip = build_clip(ClipConfig())
    save_clip(clip, work.clip)
    save_text_encoder(build_text_tokenizer(clip), clip_text_tower_to_transformers(clip), work.models)
    save_autoencoder(build_autoencoder(AutoencoderConfig()), work.autoencoder)


def write_crawl(root: Path, rows: int, image_size: int) -> tuple[Path, list[str]]:
    """``rows`` distinct rendered scenes as PNG files in ``root/www``; returns (folder, captions)."""
    from PIL import Image

    from ldm.synth import render_batch

    www = root / "www"
    www.mkdir(parents=True)
    images, captions, _ = render_batch(rows, seed=0, size=image_size)
    for i, image in enumerate(images):
        Image.fromarray(image).save(www / f"{i:06d}.png")
    return www, captions


def naive(urls: list[str], captions: list[str], work, cfg, threads: int) -> float:
    """The same work, one pair at a time, in one process; returns pairs/s."""
    import torch

    from ldm.first_stage.autoencoder import encode_images, load_autoencoder
    from ldm.first_stage.clip import clip_score, load_clip
    from ldm.first_stage.text_encoder import load_text_encoder
    from ldm.text import encode_captions
    from pipelines.filters import inspect_image

    torch.set_num_threads(threads)
    clip = load_clip(str(work.clip))
    vae = load_autoencoder(str(work.autoencoder))
    tokenizer, text_encoder = load_text_encoder(str(work.models))
    started = time.perf_counter()
    for url, caption in zip(urls, captions, strict=True):
        with urllib.request.urlopen(url, timeout=10) as response:
            data = response.read()
        check = inspect_image(data, cfg.filters, cfg.image_size)
        image = check.image[None]
        clip_score(clip, image, [caption])
        encode_images(vae, image)
        encode_captions(tokenizer, text_encoder, [caption])
    return len(urls) / (time.perf_counter() - started)


def model_only(www: Path, captions: list[str], work, cfg, threads: int) -> float:
    """Scoring and encoding on pre-decoded images, at the job's batch sizes; returns pairs/s."""
    import numpy as np
    import torch
    from PIL import Image

    from pipelines.stages import ClipScorer, LatentEncoder

    images = np.stack([np.asarray(Image.open(p).convert("RGB")) for p in sorted(www.glob("*.png"))])
    scorer = ClipScorer(str(work.clip), torch_threads=threads)
    encoder = LatentEncoder(str(work.autoencoder), str(work.models), torch_threads=threads)
    torch.set_num_threads(threads)
    n = len(captions)
    started = time.perf_counter()
    for start in range(0, n, cfg.score.batch_size):
        part = slice(start, start + cfg.score.batch_size)
        scorer(
            {
                "key": np.arange(n)[part],
                "image": images[part],
                "caption": np.array(captions[part], dtype=object),
            }
        )
    for start in range(0, n, cfg.encode.batch_size):
        part = slice(start, start + cfg.encode.batch_size)
        batch = {
            name: np.zeros(len(images[part])) for name in ("url", "clip_score", "width", "height", "sha256")
        }
        batch |= {
            "key": np.arange(n)[part],
            "image": images[part],
            "caption": np.array(captions[part], dtype=object),
        }
        encoder(batch)
    return n / (time.perf_counter() - started)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rows", type=int, default=512)
    parser.add_argument("--threads", type=int, default=2, help="torch threads of each model stage")
    parser.add_argument("--num-cpus", type=int, default=None, help="CPUs of the local Ray (default: all)")
    args = parser.parse_args()

    import pyarrow as pa
    import pyarrow.parquet as pq
    import ray

    from ldm.config.ingest import FilterConfig, IngestConfig, StageResources
    from ldm.contract import WorkDir
    from ldm.synth.server import ImageServer
    from pipelines.ingest import run_ingest

    with tempfile.TemporaryDirectory(prefix="ldm-bench-ingest-") as tmp:
        work = WorkDir(tmp)
        build_models(work)
        www, captions = write_crawl(Path(tmp), args.rows, image_size=64)
        cfg = IngestConfig(
            workdir=tmp,
            allow_hosts=["127.0.0.1"],
            filters=FilterConfig(clip_threshold=-1.0),  # random CLIP: keep every pair, do all the work
            score=StageResources(batch_size=64),
            encode=StageResources(batch_size=64),
            torch_threads=args.threads,
            log_mlflow=False,
        )
        ray.init(address="local", num_cpus=args.num_cpus, include_dashboard=False, log_to_driver=False)
        with ImageServer(www) as server:
            urls = [f"{server.base_url}/{p.name}" for p in sorted(www.glob("*.png"))]
            pairs = Path(tmp) / "pairs.parquet"
            pq.write_table(pa.table({"url": urls, "caption": captions}), pairs)
            cfg = cfg.model_copy(update={"input": str(pairs)})
            started = time.perf_counter()
            manifest = run_ingest(cfg)
            pipeline = args.rows / (time.perf_counter() - started)
            # rendered scenes can repeat exactly (duplicates); all else must be kept and encoded
            assert manifest.counts.accepted >= 0.95 * args.rows, manifest.counts
            sequential = naive(urls, captions, work, cfg, args.threads)
        bound = model_only(www, captions, work, cfg, args.threads)
        ray.shutdown()
    result = {
        "rows": args.rows,
        "cpus": os.cpu_count(),
        "pipeline_pairs_per_s": round(pipeline, 2),
        "naive_pairs_per_s": round(sequential, 2),
        "model_only_pairs_per_s": round(bound, 2),
        "pipeline_over_naive": round(pipeline / sequential, 2),
        "pipeline_over_model_only": round(pipeline / bound, 2),
    }
    print(f"pipeline   {pipeline:8.2f} pairs/s (end to end, {args.rows} rows)")
    print(f"naive      {sequential:8.2f} pairs/s (one pair at a time)")
    print(f"model-only {bound:8.2f} pairs/s (scoring + encoding on pre-decoded batches)")
    print(f"pipeline / naive      = {pipeline / sequential:.2f}x (target >= 3)")
    print(
        f"pipeline / model-only = {pipeline / bound:.2f} (overhead {1 - pipeline / bound:.0%}, target <= 20%)"
    )
    print(json.dumps(result))


if __name__ == "__main__":  # img2dataset and Ray start processes that re-import __main__
    main()
