"""GPU figures for `ldm train`'s step: samples/s and MFU, and how far more compute takes the demo model.

Issue 4 item 9. Runs on one CUDA device (it falls back to the CPU only so that the script itself can be
checked on a laptop with tiny settings). Each run prints one JSON line per measurement and writes them
all to ``--out``:

1. ``throughput``: seconds per optimizer step, samples/s and model FLOPs utilisation of the training
   step at two sizes, with bf16 autocast as ``mixed_precision="auto"`` gives on GPU:
   - ``demo``: the default ``UNetConfig`` (5.6M parameters) on 4x16x16 latents and [32, 128] text;
   - ``sd15``: Stable Diffusion 1.5's U-Net shape (860M parameters) on 4x64x64 latents and [77, 768]
     text, the production size this recipe is for.
   FLOPs per step are counted by ``torch.utils.flop_counter.FlopCounterMode`` over one forward and
   backward pass (matmuls, convolutions, attention), MFU = FLOPs per step / seconds per step / the
   chip's dense bf16 peak.
2. ``quality`` (``--latents DIR``, the demo's ``data/latents``): trains U-Nets on the demo's real
   latents with the recipe's defaults (``TrainConfig``) for the demo's 400 steps and for as many steps
   as ``--quality-seconds`` buys, and writes each run's EMA weights (fp16 safetensors) and U-Net config
   to ``--out``. Score them with the real evaluation on any machine:
   ``python benchmarks/train_gpu.py export --weights W --template EXPORTED_PIPELINE --dest DIR`` then
   ``ldm eval --model DIR``.
3. ``clips`` and ``autoencoders``: the bootstrap's CLIP and autoencoder trained for longer (and wider
   or with finer patches) on its own training renders, with what each CLIP tells apart (AUC against a
   random other caption, a caption one attribute away, the same caption with another shape) and each
   autoencoder's PSNR and ceiling (``ldm.evaluation.synthetic.autoencoder_ceiling``). No files but JSON.

Why a single process rather than ``ldm train``: the device this was written for cannot install
Ray (no network, and Ray's 79 MB wheel is over the 64 MiB that may be carried there). So it runs the
product's own loop, ``pipelines.train.train_loop``, in a single-process ``LocalWorld`` (the NaN guard
on, EMA, clipping, schedule and caption dropout as the job has them), timed by the ``StepTimes``
hook; what it leaves out is Ray Data's iterator (measured separately by ``benchmarks/train.py``) and
the NCCL all-reduce. Usage:

    python benchmarks/train_gpu.py run --latents DIR --empty-embedding empty.npy --out OUT
    python benchmarks/train_gpu.py run --tiny --latents DIR --empty-embedding empty.npy --out OUT  # CPU check
    python benchmarks/train_gpu.py prepare --workdir ldm-demo --dest empty.npy  # the empty prompt's embedding
    python benchmarks/train_gpu.py clips --out OUT
    python benchmarks/train_gpu.py autoencoders --out OUT
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import torch

# Dense bf16 peak of the chips this is run on (vendor datasheets, SXM parts, no sparsity).
PEAK_BF16_FLOPS = {"H100": 989.4e12, "H200": 989.4e12, "A100": 312e12}

SD15_UNET = {
    "block_out_channels": (320, 640, 1280, 1280),
    "down_block_types": ("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
    "up_block_types": ("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3,
    "layers_per_block": 2,
    "attention_head_dim": 8,
}
# The demo U-Net with cross-attention at every resolution (16x16 too): where layout words can act.
ATTN_ALL_UNET = {
    "down_block_types": ("CrossAttnDownBlock2D",) * 3,
    "up_block_types": ("CrossAttnUpBlock2D",) * 3,
}


def log(record: dict) -> None:
    print(json.dumps(record), flush=True)


def pick_device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def repeat_batch(latents: torch.Tensor, text: torch.Tensor):
    """A batch source that yields the same batch forever (throughput does not depend on the data)."""

    def stream(first_epoch: int):
        while True:
            yield first_epoch, latents, text

    return stream


def run_loop(cfg, facts, batches, device: torch.device, *hooks):
    """The product's ``train_loop`` in a single-process ``LocalWorld`` on ``device``; returns its state."""
    from pipelines.train import LocalWorld, LoopInputs, NanGuard, train_loop

    return train_loop(LoopInputs(cfg, facts), batches, LocalWorld(device), [NanGuard(), *hooks])


def flops_per_step(cfg, facts, batches, device: torch.device) -> int:
    """FLOPs of one optimizer step of the loop, counted op by op (matmuls, convolutions, attention:
    the forward and backward passes; AdamW's and the EMA's element-wise updates count nothing)."""
    from torch.utils.flop_counter import FlopCounterMode

    counter = FlopCounterMode(display=False)
    with counter:
        run_loop(cfg.model_copy(update={"max_steps": 1}), facts, batches, device)
    return counter.get_total_flops()


def peak_flops(device: torch.device) -> float | None:
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    return next((peak for chip, peak in PEAK_BF16_FLOPS.items() if chip in name), None)


def throughput(
    name: str, unet: dict, shape: tuple, text_shape: tuple, batch: int, steps: int, device
) -> dict:
    from ldm.config.train import TrainConfig
    from pipelines.train import LatentsFacts, StepTimes

    warmup = max(3, steps // 5)  # cuDNN autotuning, allocator
    cfg = TrainConfig(unet=unet, batch_size=batch, num_workers=1, max_steps=warmup + steps, max_minutes=None)
    facts = LatentsFacts(1.0, shape, text_shape)
    batches = repeat_batch(
        torch.randn((batch, *shape), device=device), torch.randn((batch, *text_shape), device=device)
    )
    flops = flops_per_step(cfg, facts, batches, device)
    times = StepTimes()  # the loop reads the loss every step: each step ends synchronized
    state = run_loop(cfg, facts, batches, device, times)
    seconds = times.summary(skip=warmup)["seconds_per_step"]
    peak = peak_flops(device)
    record = {
        "part": "throughput",
        "model": name,
        "parameters_m": round(sum(p.numel() for p in state.unet.parameters()) / 1e6, 2),
        "latent_shape": list(shape),
        "batch_size": batch,
        "seconds_per_step": round(seconds, 5),
        "samples_per_second": round(batch / seconds, 1),
        "tflop_per_step": round(flops / 1e12, 3),
        "achieved_tflops": round(flops / seconds / 1e12, 1),
        "mfu": round(flops / seconds / peak, 4) if peak else None,
        "max_memory_gib": round(torch.cuda.max_memory_allocated(device) / 2**30, 1)
        if device.type == "cuda"
        else None,
    }
    del state
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
    return record


def load_latents(folder: Path, device: torch.device):
    """All of the demo's latents (scaled) and text embeddings, on the device: they fit many times over."""
    import pyarrow.parquet as pq

    from ldm.contract import COL_LATENT, COL_TEXT_EMBEDDING
    from pipelines.train import read_latents_facts

    facts = read_latents_facts(str(folder))
    table = pq.read_table(folder, columns=[COL_LATENT, COL_TEXT_EMBEDDING])
    latents = np.stack(table.column(COL_LATENT).to_numpy(zero_copy_only=False)).reshape(
        -1, *facts.latent_shape
    )
    text = np.stack(table.column(COL_TEXT_EMBEDDING).to_numpy(zero_copy_only=False)).reshape(
        -1, *facts.text_embedding_shape
    )
    return (
        facts,
        torch.tensor(latents, dtype=torch.float32, device=device) * facts.scaling_factor,
        torch.tensor(text, dtype=torch.float32, device=device),
    )


def quality_run(
    name: str,
    unet: dict,
    batch: int,
    max_steps: int,
    seconds: float | None,
    data,
    empty: torch.Tensor,
    out: Path,
    device: torch.device,
    seed: int = 0,
) -> dict:
    """Train with the demo's recipe; the cosine spans ``max_steps`` (or what ``seconds`` buys at the
    speed of a 50-step probe, whichever is smaller); write the EMA weights."""
    from safetensors.torch import save_file

    from ldm.config.train import TrainConfig
    from pipelines.train import StepTimes, tensor_batches

    facts, latents, text = data
    cfg = TrainConfig(
        unet=unet, batch_size=batch, num_workers=1, max_steps=max_steps, max_minutes=None, seed=seed
    )
    batches = tensor_batches(latents, text, cfg, empty)
    if seconds is not None and max_steps > 50:  # shorten the horizon so that the cosine still completes
        probe = StepTimes()
        run_loop(cfg.model_copy(update={"max_steps": 50}), facts, batches, device, probe)
        affordable = int(seconds / probe.summary(skip=5)["seconds_per_step"])
        cfg = cfg.model_copy(update={"max_steps": min(max_steps, max(affordable, 100))})
    times = StepTimes()
    state = run_loop(cfg, facts, batches, device, times)
    synchronize(device)
    elapsed = times.ends[-1] - times.started
    weights = out / f"{name}.safetensors"
    ema = state.sample_unet
    weights_fp16 = {k: v.detach().to(torch.float16).cpu().contiguous() for k, v in ema.state_dict().items()}
    save_file(
        weights_fp16,
        str(weights),
        metadata={"unet_config": json.dumps(state.unet.config), "steps": str(state.step)},
    )
    return {
        "part": "quality",
        "run": name,
        "steps": state.step,
        "epochs": round(state.step * cfg.batch_size / latents.shape[0], 1),
        "batch_size": cfg.batch_size,
        "seconds": round(elapsed, 1),
        "steps_per_second": round(state.step / elapsed, 1),
        "final_loss_last50": round(sum(times.losses[-50:]) / len(times.losses[-50:]), 4),
        "weights": weights.name,
    }


def run(args) -> None:
    device = pick_device()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    env = {
        "part": "device",
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "torch": torch.__version__,
    }
    log(env)
    records = [env]
    if args.tiny:  # check the script on a CPU: tiny sizes, a few steps
        sizes = [("demo", {}, (4, 16, 16), (32, 128), 8, 3)]
        quality = [("demo400", {}, 64, 12, None)]
    else:
        sizes = [
            ("demo", {}, (4, 16, 16), (32, 128), 64, 50),
            ("demo", {}, (4, 16, 16), (32, 128), 256, 50),
            ("sd15", SD15_UNET, (4, 64, 64), (77, 768), 32, 20),
        ]
        quality = [
            ("demo400", {}, 64, 400, None),  # the CPU demo's run
            ("demo_long", {}, 64, args.quality_max_steps, args.quality_seconds),
            ("demo_long_b256", {}, 256, args.quality_max_steps, args.quality_seconds),
            ("attn_all_long", ATTN_ALL_UNET, 64, args.quality_max_steps, args.quality_seconds),
        ]
    if not args.skip_throughput:
        for name, unet, shape, text_shape, batch, steps in sizes:
            record = throughput(name, unet, shape, text_shape, batch, steps, device)
            log(record)
            records.append(record)
    if args.latents:
        data = load_latents(Path(args.latents), device)
        empty = torch.tensor(np.load(args.empty_embedding), dtype=torch.float32, device=device)
        for name, unet, batch, max_steps, seconds in quality:
            record = quality_run(name, unet, batch, max_steps, seconds, data, empty, out, device)
            log(record)
            records.append(record)
    (out / "train_gpu.json").write_text(json.dumps(records, indent=1))


def export(args) -> None:
    """A pipeline folder = ``--template`` (an exported pipeline) with its U-Net replaced by ``--weights``."""
    import shutil

    from diffusers import UNet2DConditionModel
    from safetensors import safe_open
    from safetensors.torch import load_file

    with safe_open(args.weights, framework="pt") as handle:
        config = json.loads(handle.metadata()["unet_config"])
    unet = UNet2DConditionModel.from_config(config)
    unet.load_state_dict({k: v.float() for k, v in load_file(args.weights).items()})
    dest = Path(args.dest)
    shutil.copytree(args.template, dest, ignore=shutil.ignore_patterns("unet"))
    unet.save_pretrained(dest / "unet")
    print(dest)


def autoencoders(args) -> None:
    """Train the bootstrap's autoencoder for longer, and a wider one, with ``train_autoencoder`` on
    the bootstrap's own training renders, and measure each one's ceiling: what the evaluation scores
    true renders of its held-out prompts after a round trip (``ldm.evaluation.synthetic.autoencoder_ceiling``),
    the best any U-Net could score through it."""
    from ldm.config.bootstrap import AutoencoderConfig
    from ldm.config.eval import EvalConfig
    from ldm.evaluation.synthetic import autoencoder_ceiling
    from ldm.first_stage import autoencoder as ae
    from ldm.synth.grammar import heldout_prompts
    from ldm.synth.render import render_batch

    device = pick_device()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    images, _, _ = render_batch(args.images, seed=0)
    held, _, _ = render_batch(256, seed=args.images + 1)
    steps = args.ae_steps
    records = []
    variants = [
        ("ae_demo", {}),  # the demo's bootstrap as configured
        ("ae_long", {"steps": steps, "batch_size": 64}),
        ("ae_wide_long", {"block_out_channels": (32, 64, 128), "steps": steps, "batch_size": 64}),
    ]
    for name, update in variants:
        cfg = AutoencoderConfig(**{**update, **({"steps": 3} if args.tiny else {})})
        torch.manual_seed(0)
        vae = ae.build_autoencoder(cfg).to(device)
        started = time.perf_counter()
        ae.train_autoencoder(vae, images, cfg, seed=0, log=lambda _message: None)
        synchronize(device)
        seconds = time.perf_counter() - started
        vae.eval()
        record = {
            "part": "autoencoder",
            "run": name,
            "steps": cfg.steps,
            "batch_size": cfg.batch_size,
            "block_out_channels": list(cfg.block_out_channels),
            "seconds": round(seconds, 1),
            "psnr_db": round(ae.reconstruction_psnr(vae, held), 2),
            # the held-out prompts of `ldm eval --set num_prompts=96`
            "ceiling": autoencoder_ceiling(
                vae, heldout_prompts(96, EvalConfig().prompt_seed), EvalConfig().seed, cfg.image_size
            ),
            "scaling_factor": round(ae.latent_scaling_factor(vae, images[: cfg.scaling_images]), 4),
        }
        log(record)
        records.append(record)
    (out / "autoencoders.json").write_text(json.dumps(records, indent=1))


def shape_edit(caption: str) -> str:
    """``caption`` with its first object's shape changed: a negative only shape tells apart."""
    from dataclasses import replace

    from ldm.synth.grammar import SHAPES, parse_caption

    spec = parse_caption(caption)
    first = spec.objects[0]
    for shape in SHAPES:
        if shape == first.shape:
            continue
        edited = replace(spec, objects=(replace(first, shape=shape), *spec.objects[1:])).caption()
        try:
            parse_caption(edited)
        except ValueError:
            continue
        return edited
    raise ValueError(f"no shape edit of {caption!r} stays in the grammar")


def clips(args) -> None:
    """Train the bootstrap's CLIP for longer (and with finer patches) on the
    bootstrap's training renders, and measure how well each tells a caption from a false one: a random
    other caption (the bootstrap's gate), one attribute changed, the shape alone changed."""
    from ldm.config.bootstrap import BootstrapConfig, ClipConfig
    from ldm.first_stage import clip
    from ldm.synth.negatives import hard_negatives
    from ldm.synth.render import render_batch
    from ldm.synth.source import HELDOUT_SEED_OFFSET, mismatched_captions

    device = pick_device()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    images, captions, _ = render_batch(args.images, seed=0)
    held, held_captions, held_scenes = render_batch(512, seed=HELDOUT_SEED_OFFSET)
    rng = np.random.default_rng(0)
    negatives = {
        "random": mismatched_captions(held_scenes, 0),
        "one_attribute": [str(rng.choice(hard_negatives(c))) for c in held_captions],
        "shape_only": [shape_edit(c) for c in held_captions],
    }
    steps = 3 if args.tiny else args.clip_steps
    records = []
    for name, update in [
        ("clip_demo", {}),
        ("clip_long", {"steps": steps}),
        ("clip_long_patch4", {"steps": steps, "patch_size": 4}),
    ]:
        cfg = ClipConfig(**{**update, **({"steps": 3} if args.tiny else {})})
        torch.manual_seed(0)
        bundle = clip.bundle_for(clip.build_clip(cfg), name=name)
        bundle.model.to(device)
        started = time.perf_counter()
        clip.train_clip(bundle, images, captions, cfg, seed=0, log=lambda _message: None)
        synchronize(device)
        record = {
            "part": "clip",
            "run": name,
            "steps": cfg.steps,
            "patch_size": cfg.patch_size,
            "seconds": round(time.perf_counter() - started, 1),
            **{
                f"auc_{kind}": round(clip.matched_vs_mismatched_auc(bundle, held, held_captions, false), 4)
                for kind, false in negatives.items()
            },
            "gate": BootstrapConfig().min_clip_auc,
        }
        log(record)
        records.append(record)
    (out / "clips.json").write_text(json.dumps(records, indent=1))


def prepare(args) -> None:
    """The empty prompt's embedding of a work directory's text encoder, for ``run --empty-embedding``."""
    from ldm.contract import WorkDir
    from ldm.first_stage.text_encoder import load_text_encoder
    from ldm.text import encode_captions

    tokenizer, text_encoder = load_text_encoder(str(WorkDir(args.workdir).models))
    np.save(args.dest, encode_captions(tokenizer, text_encoder, [""])[0].float().numpy())
    print(args.dest)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    r = sub.add_parser("run", help="throughput and quality runs on this machine's GPU")
    r.add_argument("--out", required=True)
    r.add_argument("--latents", help="the demo's data/latents folder; without it only throughput runs")
    r.add_argument("--empty-embedding", help=".npy of the empty prompt's embedding [L, D] (caption dropout)")
    r.add_argument("--quality-seconds", type=float, default=100.0, help="time budget of each long run")
    r.add_argument("--quality-max-steps", type=int, default=20_000)
    r.add_argument("--skip-throughput", action="store_true")
    r.add_argument(
        "--tiny", action="store_true", help="a few steps at tiny sizes (checks the script on a CPU)"
    )
    e = sub.add_parser("export", help="turn written weights into a pipeline folder for `ldm eval`")
    e.add_argument("--weights", required=True)
    e.add_argument("--template", required=True, help="an exported pipeline folder (its U-Net is replaced)")
    e.add_argument("--dest", required=True)
    a = sub.add_parser("autoencoders", help="longer and wider autoencoder runs (their ceilings)")
    a.add_argument("--out", required=True)
    a.add_argument("--images", type=int, default=20_000, help="training renders, as the bootstrap")
    a.add_argument("--ae-steps", type=int, default=4000)
    a.add_argument("--tiny", action="store_true", help="3 steps each (checks the script on a CPU)")
    c = sub.add_parser("clips", help="longer and finer CLIP runs (what they tell apart)")
    c.add_argument("--out", required=True)
    c.add_argument("--images", type=int, default=20_000, help="training renders, as the bootstrap")
    c.add_argument("--clip-steps", type=int, default=3000)
    c.add_argument("--tiny", action="store_true", help="3 steps each (checks the script on a CPU)")
    p = sub.add_parser("prepare", help="write the empty prompt's embedding of a work directory")
    p.add_argument("--workdir", required=True)
    p.add_argument("--dest", required=True)
    args = parser.parse_args()
    {"run": run, "export": export, "prepare": prepare, "autoencoders": autoencoders, "clips": clips}[
        args.command
    ](args)


if __name__ == "__main__":
    main()
