"""What an autoencoder recipe buys: training time, PSNR and the evaluation's ceiling, per variant.

Trains the bootstrap's autoencoder (`ldm.first_stage.autoencoder`, the config of
`ldm.config.bootstrap.AutoencoderConfig`) once per variant on the same renders, then prints for each
its training seconds as a ratio of the first variant's (same process, one after the other), its
held-out PSNR (the bootstrap's gate), and the autoencoder ceiling of `ldm eval`: the score of true
renders of held-out prompts after a round trip through it (`ldm.evaluation.synthetic`). The
ceiling is what no U-Net on these latents can beat (docs/TRAINING.md, turn 19).

    python benchmarks/autoencoder_ceiling.py --variant demo --variant lat8 latent_channels=8 \
        --variant wide 'block_out_channels=[32,64,128]' norm_num_groups=32

A variant is a name and any number of `key=value` (JSON values) of `AutoencoderConfig`; a variant
with no keys is the default. ``--json`` prints one JSON object per variant instead of the table.
"""

from __future__ import annotations

import argparse
import json
import time

import torch

from ldm.config.bootstrap import AutoencoderConfig
from ldm.evaluation.synthetic import autoencoder_ceiling
from ldm.first_stage import autoencoder as ae
from ldm.synth.grammar import CATEGORIES, heldout_prompts
from ldm.synth.render import render_batch
from ldm.synth.source import HELDOUT_SEED_OFFSET


def parse_variant(words: list[str]) -> tuple[str, AutoencoderConfig]:
    """``["lat8", "latent_channels=8"]`` -> ("lat8", AutoencoderConfig(latent_channels=8))."""
    name, overrides = words[0], {}
    for word in words[1:]:
        key, sep, value = word.partition("=")
        if not sep:
            raise SystemExit(f"variant {name!r}: expected key=value, got {word!r}")
        try:
            overrides[key] = json.loads(value)
        except json.JSONDecodeError as err:
            raise SystemExit(f"variant {name!r}: {key}={value!r} is not a JSON value ({err})") from None
    return name, AutoencoderConfig(**overrides)


def measure(cfg: AutoencoderConfig, images, held_out, prompts: list[str], seed: int) -> dict[str, float]:
    torch.manual_seed(seed)
    vae = ae.build_autoencoder(cfg)
    started = time.perf_counter()
    ae.train_autoencoder(vae, images, cfg, seed=seed, log=lambda line: None)
    seconds = time.perf_counter() - started
    ceiling = autoencoder_ceiling(vae, prompts, seed, cfg.image_size)
    return {"train_s": seconds, "psnr_db": ae.reconstruction_psnr(vae, held_out), **ceiling}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--variant", nargs="+", action="append", metavar="NAME [KEY=VALUE ...]")
    parser.add_argument("--images", type=int, default=20000, help="training renders (the bootstrap's)")
    parser.add_argument("--prompts", type=int, default=288, help="held-out prompts for the ceiling")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()

    torch.set_num_threads(args.threads)
    variants = [parse_variant(words) for words in (args.variant or [["default"]])]
    images, _, _ = render_batch(args.images, args.seed)
    held_out, _, _ = render_batch(256, args.seed + HELDOUT_SEED_OFFSET + 1)  # the bootstrap's gate set
    prompts = heldout_prompts(args.prompts, 1234)  # `ldm eval`'s default prompt seed
    first = None
    if not args.json:
        print("variant | train time (x first) | PSNR dB | ceiling | " + " / ".join(CATEGORIES))
    for name, cfg in variants:
        result = measure(cfg, images, held_out, prompts, args.seed)
        first = first or result["train_s"]
        if args.json:
            print(json.dumps({"variant": name, "config": cfg.to_dict(), **result}), flush=True)
            continue
        per_category = " / ".join(f"{result[c]:.2f}" for c in CATEGORIES)
        print(
            f"{name} | {result['train_s'] / first:.2f} | {result['psnr_db']:.2f} | "
            f"{result['overall']:.3f} | {per_category}",
            flush=True,
        )


if __name__ == "__main__":
    main()
