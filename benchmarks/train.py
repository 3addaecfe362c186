"""What feeds a training step, measured in one run: two ratios of seconds per optimizer step.

1. **Precomputed latents vs encoding on the fly.** The same U-Net step (the demo's default U-Net,
   AdamW, batch 64) fed either by latents and text embeddings computed once at ingest, or by rendered
   64-px images and captions that go through the autoencoder and the text encoder (the bootstrap's
   shapes) inside every step, as a pipeline without an ingest stage would. Target: >= 2x
   (MosaicML measured 1.4x for SD-2 at 256 px, where the U-Net dominates more).
2. **Ray Data iterator vs in-memory batches.** The same precomputed step fed by the training job's
   own ``batch_stream`` (Parquet read with Ray Data, row shuffle buffer, caption dropout, scaling)
   or by slices of tensors already in memory (same dropout and scaling). The stall is the relative
   extra time per step. Target: <= 5 %. The default ``--rows`` keeps the run inside one epoch: each
   new epoch restarts the Ray Data read (measured here ~1-2 s, +10 % per step at 16 steps per epoch).

Every figure is the product's own step: ``pipelines.train.train_loop`` in a single-process
``LocalWorld`` (recipe defaults: EMA, clipping, NaN guard, caption dropout), timed by its
``StepTimes`` hook; only the batch source changes. Models have random weights: speed does not depend
on them. Usage:

    .venv/bin/python benchmarks/train.py [--steps 20] [--batch-size 64] [--threads 1]
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import torch


def build_models(text_len: int):
    """Autoencoder and text encoder (bootstrap shapes), tokenizer, and the demo's latent size."""
    from ldm.config.bootstrap import AutoencoderConfig, ClipConfig
    from ldm.first_stage.autoencoder import build_autoencoder
    from ldm.first_stage.clip import build_clip
    from ldm.first_stage.text_encoder import build_text_tokenizer, clip_text_tower_to_transformers

    torch.manual_seed(0)
    clip = build_clip(ClipConfig(context_length=text_len))
    text_encoder = clip_text_tower_to_transformers(clip).eval()
    tokenizer = build_text_tokenizer(clip)
    vae = build_autoencoder(AutoencoderConfig()).eval()
    return vae, text_encoder, tokenizer


def time_loop(inputs, batches, warmup: int, steps: int) -> dict:
    """Seconds per step of ``train_loop`` over ``steps`` steps after ``warmup``, and the data-wait fraction."""
    from pipelines.train import LocalWorld, LoopInputs, NanGuard, StepTimes, train_loop

    times = StepTimes()
    cfg = inputs.cfg.model_copy(update={"max_steps": warmup + steps})
    train_loop(LoopInputs(cfg, inputs.facts), batches, LocalWorld(), [NanGuard(), times])
    return times.summary(skip=warmup)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--rows", type=int, default=4096)  # > (warmup + steps) x batch: no epoch restart
    parser.add_argument("--threads", type=int, default=1)  # as each training worker (torch_threads)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    import pyarrow as pa
    import pyarrow.parquet as pq
    import ray
    import ray.data

    from ldm.config.train import TrainConfig
    from ldm.contract import COL_LATENT, COL_TEXT_EMBEDDING
    from ldm.first_stage.autoencoder import encode_images
    from ldm.synth.render import render_batch
    from ldm.text import encode_captions
    from pipelines.train import LatentsFacts, LoopInputs, caption_dropout, ray_batches, tensor_batches
    from pipelines.train.conditioning import EncodedIds, StoredEmbeddings

    vae, text_encoder, tokenizer = build_models(text_len=32)
    b = args.batch_size
    cfg = TrainConfig(num_workers=1, batch_size=b, shuffle_buffer=4 * b, max_minutes=None)

    # The data: rendered scenes, and what ingest would store for them (unscaled fp16 latents).
    images, captions, _ = render_batch(args.rows, seed=0)
    started = time.perf_counter()
    # contiguous: the VAE returns channels-last strides, which Arrow would store as a permuted tensor
    latents = encode_images(vae, images).contiguous()
    text = encode_captions(tokenizer, text_encoder, captions)
    encode_seconds = time.perf_counter() - started
    scaling = float(1.0 / latents.std())
    empty = encode_captions(tokenizer, text_encoder, [""])[0]
    facts = LatentsFacts(scaling, tuple(latents.shape[1:]), tuple(text.shape[1:]))  # type: ignore[arg-type]
    inputs = LoopInputs(cfg, facts)
    in_memory = tensor_batches(latents.half().float() * scaling, text.half().float(), cfg, empty)

    def on_the_fly(first_epoch: int) -> Iterator[tuple[int, torch.Tensor, torch.Tensor]]:
        dropout = torch.Generator().manual_seed(1)
        while True:
            for start in range(0, args.rows - b + 1, b):
                with torch.no_grad():
                    batch_latents = encode_images(vae, images[start : start + b]) * scaling
                    batch_text = encode_captions(tokenizer, text_encoder, captions[start : start + b])
                yield (
                    first_epoch,
                    batch_latents,
                    caption_dropout(batch_text, empty, cfg.caption_dropout, dropout),
                )

    results: dict[str, dict] = {}
    results["precomputed_in_memory"] = time_loop(inputs, in_memory, args.warmup, args.steps)
    results["encode_on_the_fly"] = time_loop(inputs, on_the_fly, args.warmup, args.steps)
    # Token-id data (`store_text_embeddings: false`): the frozen text encoder runs in every step.
    ids = tokenizer(captions, padding="max_length", max_length=tokenizer.model_max_length, truncation=True)
    empty_ids = tokenizer([""], padding="max_length", max_length=tokenizer.model_max_length).input_ids[0]
    encoded = EncodedIds(text_encoder, torch.tensor(empty_ids), int(tokenizer.pad_token_id))
    from_ids = tensor_batches(latents.half().float() * scaling, torch.tensor(ids.input_ids), cfg, encoded)
    results["ids_encoded_in_step"] = time_loop(inputs, from_ids, args.warmup, args.steps)

    with tempfile.TemporaryDirectory(prefix="ldm-bench-") as tmp:
        table = pa.table(
            {
                COL_LATENT: pa.FixedShapeTensorArray.from_numpy_ndarray(latents.half().numpy()),
                COL_TEXT_EMBEDDING: pa.FixedShapeTensorArray.from_numpy_ndarray(text.half().numpy()),
            }
        )
        for part in range(4):  # several files, as ingest writes them
            rows = slice(part * args.rows // 4, (part + 1) * args.rows // 4)
            pq.write_table(
                table.slice(rows.start, rows.stop - rows.start), Path(tmp) / f"part-{part}.parquet"
            )
        ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False)
        try:
            dataset = ray.data.read_parquet(tmp).select_columns([COL_LATENT, COL_TEXT_EMBEDDING])
            conditioning = StoredEmbeddings(empty)
            stream = ray_batches(dataset.iterator(), cfg, facts, conditioning, 0, torch.device("cpu"))
            results["ray_data_iterator"] = time_loop(inputs, stream, args.warmup, args.steps)
        finally:
            ray.shutdown()
    # In memory once more, after Ray: the machine's load drifts, so compare with the mean of both.
    results["precomputed_in_memory_again"] = time_loop(inputs, in_memory, args.warmup, args.steps)
    print_summary(results, args, encode_seconds)


def print_summary(results: dict[str, dict], args: argparse.Namespace, encode_seconds: float) -> None:
    memory = (
        results["precomputed_in_memory"]["seconds_per_step"]
        + results["precomputed_in_memory_again"]["seconds_per_step"]
    ) / 2
    summary = {
        "batch_size": args.batch_size,
        "threads": args.threads,
        "steps": args.steps,
        "encode_all_rows_seconds": round(encode_seconds, 2),
        **{name: {k: round(v, 4) for k, v in r.items()} for name, r in results.items()},
        "speedup_precomputed_vs_on_the_fly": round(
            results["encode_on_the_fly"]["seconds_per_step"] / memory, 3
        ),
        "ids_encoded_in_step_vs_stored_embeddings": round(
            results["ids_encoded_in_step"]["seconds_per_step"] / memory, 3
        ),
        "ray_data_stall_vs_in_memory": round(
            results["ray_data_iterator"]["seconds_per_step"] / memory - 1, 4
        ),
    }
    print(json.dumps(summary, indent=2))
    print(
        f"precomputed latents are {summary['speedup_precomputed_vs_on_the_fly']:.2f}x faster per step "
        f"(target >= 2x); the Ray Data iterator stalls {100 * summary['ray_data_stall_vs_in_memory']:+.1f}% "
        "vs in-memory batches (target <= 5%)"
    )


if __name__ == "__main__":
    main()
