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

Models have random weights: speed does not depend on them. Usage:

    .venv/bin/python benchmarks/train.py [--steps 20] [--batch-size 64] [--threads 1]
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import torch

Batch = tuple[torch.Tensor, torch.Tensor]  # latents [B, C, H, W] scaled, text [B, L, D]


def build_models(text_len: int):
    """U-Net (demo default), autoencoder and text encoder (bootstrap shapes), tokenizer."""
    from ldm.config.bootstrap import AutoencoderConfig, ClipConfig
    from ldm.first_stage.autoencoder import build_autoencoder
    from ldm.first_stage.clip import build_clip
    from ldm.first_stage.text_encoder import build_text_tokenizer, clip_text_tower_to_transformers
    from ldm.unet import UNetConfig, build_unet

    torch.manual_seed(0)
    clip = build_clip(ClipConfig(context_length=text_len))
    text_encoder = clip_text_tower_to_transformers(clip).eval()
    tokenizer = build_text_tokenizer(clip)
    vae = build_autoencoder(AutoencoderConfig()).eval()
    latent_size = AutoencoderConfig().image_size // 2 ** (len(AutoencoderConfig().block_out_channels) - 1)
    unet = build_unet(UNetConfig(), latent_size, vae.config.latent_channels, text_encoder.config.hidden_size)
    return unet.train(), vae, text_encoder, tokenizer


def time_steps(step: Callable[[], None], next_batch: Callable[[], Batch], warmup: int, steps: int) -> dict:
    """Seconds per step over ``steps`` steps after ``warmup``, and the fraction spent waiting for data."""
    for _ in range(warmup):
        step(*next_batch())
    waited = 0.0
    started = time.perf_counter()
    for _ in range(steps):
        before = time.perf_counter()
        batch = next_batch()
        waited += time.perf_counter() - before
        step(*batch)
    elapsed = time.perf_counter() - started
    return {"seconds_per_step": elapsed / steps, "data_wait_fraction": waited / elapsed}


def cycle(items: list) -> Iterator:
    while True:
        yield from items


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

    from ldm.config.train import TrainConfig
    from ldm.contract import COL_LATENT, COL_TEXT_EMBEDDING
    from ldm.diffusion import make_noise_scheduler, training_loss_terms
    from ldm.first_stage.autoencoder import encode_images
    from ldm.synth.render import render_batch
    from ldm.text import encode_captions
    from pipelines.train import LatentsFacts, batch_stream, caption_dropout

    text_len = 32
    unet, vae, text_encoder, tokenizer = build_models(text_len)
    optimizer = torch.optim.AdamW(unet.parameters(), lr=1e-4)
    scheduler = make_noise_scheduler()
    generator = torch.Generator().manual_seed(0)
    cfg = TrainConfig(num_workers=1, batch_size=args.batch_size, shuffle_buffer=4 * args.batch_size)

    def train_step(latents: torch.Tensor, text: torch.Tensor) -> None:
        terms = training_loss_terms(
            unet, latents, text, scheduler, loss_weighting="min_snr", generator=generator
        )
        terms.loss.backward()
        torch.nn.utils.clip_grad_norm_(unet.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    # The data: rendered scenes, and what ingest would store for them (unscaled fp16 latents).
    images, captions, _ = render_batch(args.rows, seed=0)
    started = time.perf_counter()
    # contiguous: the VAE returns channels-last strides, which Arrow would store as a permuted tensor
    latents = encode_images(vae, images).contiguous()
    text = encode_captions(tokenizer, text_encoder, captions)
    encode_seconds = time.perf_counter() - started
    scaling = float(1.0 / latents.std())
    empty = encode_captions(tokenizer, text_encoder, [""])[0]
    dropout_generator = torch.Generator().manual_seed(1)
    b = args.batch_size
    starts = list(range(0, args.rows - b + 1, b))

    def in_memory() -> Iterator[Batch]:
        for start in cycle(starts):
            yield (
                latents[start : start + b].half().float() * scaling,
                caption_dropout(text[start : start + b].half().float(), empty, 0.1, dropout_generator),
            )

    def on_the_fly() -> Iterator[Batch]:
        for start in cycle(starts):
            with torch.no_grad():
                batch_latents = encode_images(vae, images[start : start + b]) * scaling
                batch_text = encode_captions(tokenizer, text_encoder, captions[start : start + b])
            yield batch_latents, caption_dropout(batch_text, empty, 0.1, dropout_generator)

    results: dict[str, dict] = {}
    memory_stream, fly_stream = in_memory(), on_the_fly()
    results["precomputed_in_memory"] = time_steps(
        train_step, lambda: next(memory_stream), args.warmup, args.steps
    )
    results["encode_on_the_fly"] = time_steps(train_step, lambda: next(fly_stream), args.warmup, args.steps)

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
        dataset = ray.data.read_parquet(tmp).select_columns([COL_LATENT, COL_TEXT_EMBEDDING])
        facts = LatentsFacts(scaling, tuple(latents.shape[1:]), tuple(text.shape[1:]))
        stream = batch_stream(dataset.iterator(), cfg, facts, empty, 0, 0, torch.device("cpu"))
        try:
            results["ray_data_iterator"] = time_steps(
                train_step, lambda: next(stream)[1:], args.warmup, args.steps
            )
        finally:
            stream.close()  # stop the iterator before Ray goes away
            ray.shutdown()
    # In memory once more, after Ray: the machine's load drifts, so compare with the mean of both.
    memory_stream = in_memory()
    results["precomputed_in_memory_again"] = time_steps(
        train_step, lambda: next(memory_stream), args.warmup, args.steps
    )

    memory = (
        results["precomputed_in_memory"]["seconds_per_step"]
        + results["precomputed_in_memory_again"]["seconds_per_step"]
    ) / 2
    summary = {
        "batch_size": b,
        "threads": args.threads,
        "steps": args.steps,
        "encode_all_rows_seconds": round(encode_seconds, 2),
        **{name: {k: round(v, 4) for k, v in r.items()} for name, r in results.items()},
        "speedup_precomputed_vs_on_the_fly": round(
            results["encode_on_the_fly"]["seconds_per_step"] / memory, 3
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
