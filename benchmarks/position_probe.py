"""Does a model read "in the top left", or does the seed decide where the object goes? (docs/TRAINING.md,
turn 14)

For each model (a pipeline folder, ``s3://`` or ``models:/`` URI) it prints three things:
- ``text``: how much the text encoder's hidden states (what the cross-attention reads) change when
  only the place changes ("top left" to "bottom right"), as a fraction of how much they change when
  only the colour changes. Near 0: the text encoder erases the place.
- ``first estimate``: the x0 estimate at t = T for "a large red circle in the <place>", minus the
  empty prompt's, over ``--seeds`` noise draws. Printed: the centroid of that difference for each of
  the five places, in latent pixels (column, row). A model that reads the place moves it towards the
  named corner.
- ``placement``: the held-out absolute-position prompts of ``ldm eval`` (its prompts and seeds, from
  ``--eval-config``) and how many pass the detector.

With ``--latents`` (an ingested ``latents/`` folder) it also prints ``caption use``: on the data's
absolute-position rows, the denoising loss with the place swapped for another, with the colour
swapped, and with the empty caption, each divided by the loss with the true caption (same noise and
timesteps), for t in 800-1000 and 500-800. 1.00: the model ignores that part of the caption
(turn 15 measured it on a U-Net trained on those rows alone).

With two or more models it also prints, for each pair, the number of prompts in which the two put an
object in a shared grid cell for the same seed, against the mean number with another prompt's seed.
Far above: the seed's noise decides the place, whatever the model.

    python benchmarks/position_probe.py --eval-config ./ldm-demo/eval.yaml \
        [--latents ./ldm-demo/data/latents] MODEL [MODEL ...]
"""

from __future__ import annotations

import argparse
import dataclasses
import itertools

import torch

from ldm.config.base import load_config
from ldm.config.eval import EvalConfig
from ldm.evaluation.detect import detect_objects
from ldm.evaluation.geneval import check, grid_cell
from ldm.pipeline import load_pipeline
from ldm.synth.grammar import COLORS, POSITIONS, PromptSpec, format_caption, heldout_prompts, parse_caption
from ldm.text import encode_captions
from pipelines.eval import generate_all

PLACE_PROMPT = "a large red circle in the {}"
T_BANDS = ((800, 1000), (500, 800))


def _hidden(pipe, text: str) -> torch.Tensor:
    """[L, D] hidden states of ``text``, encoded as the pipeline encodes prompts."""
    return encode_captions(pipe.tokenizer, pipe.text_encoder, [text])[0].double()


def text_place_to_colour(pipe) -> float:
    """|h(top left) - h(bottom right)| / |h(red) - h(blue)|, whole sequences (module docstring)."""
    base = _hidden(pipe, PLACE_PROMPT.format("top left"))
    place = (base - _hidden(pipe, PLACE_PROMPT.format("bottom right"))).norm()
    colour = (base - _hidden(pipe, "a large blue circle in the top left")).norm()
    return float(place / colour)


def first_estimate_centroids(pipe, seeds: int) -> dict[str, tuple[float, float]]:
    """(column, row) centroid of |x0(T | place prompt) - x0(T | "")| per place (module docstring)."""
    unet, scheduler = pipe.unet, pipe.scheduler
    size = unet.config.sample_size
    noise = torch.randn(
        seeds, unet.config.in_channels, size, size, generator=torch.Generator().manual_seed(0)
    )
    alpha_bar = scheduler.alphas_cumprod[-1].double()
    last = torch.full((seeds,), scheduler.config.num_train_timesteps - 1)

    def x0(text: str) -> torch.Tensor:
        context = _hidden(pipe, text).float().expand(seeds, -1, -1)
        out = unet(noise, last, encoder_hidden_states=context).sample.double()
        if scheduler.config.prediction_type == "v_prediction":
            return alpha_bar.sqrt() * noise.double() - (1 - alpha_bar).sqrt() * out
        return (noise.double() - (1 - alpha_bar).sqrt() * out) / alpha_bar.sqrt()

    rows, cols = torch.meshgrid(torch.arange(size).double(), torch.arange(size).double(), indexing="ij")
    empty = x0("")
    centroids = {}
    for place in POSITIONS:
        difference = (x0(PLACE_PROMPT.format(place)) - empty).abs().sum(dim=1)  # [seeds, H, W]
        weights = difference / difference.sum(dim=(1, 2), keepdim=True).clamp_min(1e-12)
        centroids[place] = (
            float((weights * cols).sum(dim=(1, 2)).mean()),
            float((weights * rows).sum(dim=(1, 2)).mean()),
        )
    return centroids


def _next(options, current: str) -> str:
    names = list(options)
    return names[(names.index(current) + 1) % len(names)]


def _edits(spec: PromptSpec) -> dict[str, str | None]:
    """The caption with its place, then its colour, changed to the grammar's next one (None: no colour)."""
    first = spec.objects[0]
    recoloured = None
    if first.color is not None:
        objects = (dataclasses.replace(first, color=_next(COLORS, first.color)), *spec.objects[1:])
        recoloured = format_caption(dataclasses.replace(spec, objects=objects))
    assert spec.position is not None
    return {"place": format_caption(dataclasses.replace(spec, position=_next(POSITIONS, spec.position))),
            "colour": recoloured, "empty": ""}  # fmt: skip


def _position_rows(latents: str, max_rows: int) -> tuple[torch.Tensor, list[PromptSpec]]:
    """Unscaled latents [N, C, H, W] and parsed captions of the folder's absolute-position rows."""
    import pyarrow.parquet as pq

    table = pq.read_table(latents, columns=["caption", "latent"])
    keep, specs = [], []
    for i, caption in enumerate(table.column("caption").to_pylist()):
        try:
            spec = parse_caption(caption)
        except ValueError:
            continue
        if spec.position and len(keep) < max_rows:
            keep.append(i)
            specs.append(spec)
    stored = table.column("latent").combine_chunks().to_numpy_ndarray()
    return torch.from_numpy(stored[keep]).float(), specs


def _losses(
    pipe, captions: list[str], noisy: torch.Tensor, t: torch.Tensor, target: torch.Tensor
) -> torch.Tensor:
    """Per-row denoising loss [N] of the pipeline's U-Net under ``captions``."""
    context = encode_captions(pipe.tokenizer, pipe.text_encoder, captions)
    pred = pipe.unet(noisy, t, encoder_hidden_states=context).sample
    return ((pred - target) ** 2).mean(dim=(1, 2, 3)).double()


def caption_use(
    pipe, latents: str, max_rows: int = 256
) -> tuple[int, dict[tuple[int, int], dict[str, float]]]:
    """(rows, {t band: {edit: loss with the edit / loss with the true caption}}) (module docstring)."""
    from diffusers import DDPMScheduler

    stored, specs = _position_rows(latents, max_rows)
    if not specs:
        raise SystemExit(f"{latents} has no absolute-position rows to probe")
    x0 = stored * pipe.vae.config.scaling_factor
    noise_scheduler = DDPMScheduler.from_config(pipe.scheduler.config)  # the training schedule's betas
    edits = [_edits(spec) for spec in specs]
    generator = torch.Generator().manual_seed(0)
    out = {}
    for low, high in T_BANDS:
        t = torch.randint(low, high, (len(specs),), generator=generator)
        noise = torch.randn(x0.shape, generator=generator)
        noisy = noise_scheduler.add_noise(x0, noise, t)
        if noise_scheduler.config.prediction_type == "v_prediction":
            target = noise_scheduler.get_velocity(x0, noise, t)
        else:
            target = noise

        true = _losses(pipe, [spec.caption() for spec in specs], noisy, t, target)
        band = {}
        for kind in ("place", "colour", "empty"):
            rows = [i for i, edit in enumerate(edits) if edit[kind] is not None]
            if rows:
                edited = _losses(pipe, [edits[i][kind] for i in rows], noisy[rows], t[rows], target[rows])
                band[kind] = float(edited.sum() / true[rows].sum())
        out[(low, high)] = band
    return len(specs), out


def placements(pipe, cfg: EvalConfig) -> list[tuple[set, bool]]:
    """(cells of the detected objects, passed) for each held-out absolute-position prompt, in order."""
    prompts = [p for p in heldout_prompts(cfg.num_prompts, cfg.prompt_seed) if parse_caption(p).position]
    images = generate_all(pipe, prompts, cfg, "position prompts")
    out = []
    for prompt, image in zip(prompts, images, strict=True):
        found = detect_objects(image)
        out.append(({grid_cell(d) for d in found}, check(parse_caption(prompt), found)))
    return out


def shared_cells(a: list[tuple[set, bool]], b: list[tuple[set, bool]]) -> tuple[int, float]:
    """Prompts where a and b share a cell with the same seed; the mean count with other prompts' seeds."""
    same = sum(bool(x[0] & y[0]) for x, y in zip(a, b, strict=True))
    n = len(a)
    other = sum(bool(a[i][0] & b[j][0]) for i in range(n) for j in range(n) if i != j)
    return same, other / max(n - 1, 1)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("models", nargs="+", help="pipeline folders or model URIs")
    parser.add_argument(
        "--eval-config", help="`ldm eval`'s config (prompts, seeds, sampler); default: its defaults"
    )
    parser.add_argument("--workdir", help="work directory whose MLflow resolves models:/ URIs")
    parser.add_argument("--seeds", type=int, default=16, help="noise draws for the first estimate")
    parser.add_argument("--latents", help="an ingested latents/ folder: also print the caption-use ratios")
    args = parser.parse_args()
    cfg = load_config(EvalConfig, args.eval_config) if args.eval_config else EvalConfig()
    if args.workdir:
        from ldm import tracking

        tracking.configure(args.workdir)

    placed = {}
    for model in args.models:
        pipe = load_pipeline(model).pipe
        with torch.no_grad():
            ratio = text_place_to_colour(pipe)
            centroids = first_estimate_centroids(pipe, args.seeds)
        placed[model] = placements(pipe, cfg)
        print(f"{model}")
        print(f"  text: a change of place moves the hidden states {ratio:.3f} as far as a change of colour")
        cells = " | ".join(f"{place} ({c:.2f}, {r:.2f})" for place, (c, r) in centroids.items())
        print(f"  first estimate, centroid (column, row): {cells}")
        passed = sum(ok for _, ok in placed[model])
        print(f"  placement: {passed} of {len(placed[model])} absolute-position prompts passed")
        if args.latents:
            with torch.no_grad():
                rows, bands = caption_use(pipe, args.latents)
            text = " | ".join(
                f"t {low}-{high}: " + ", ".join(f"{kind} {ratio:.3f}" for kind, ratio in band.items())
                for (low, high), band in bands.items()
            )
            print(f"  caption use ({rows} rows, loss edited / true): {text}")
    for a, b in itertools.combinations(args.models, 2):
        same, other = shared_cells(placed[a], placed[b])
        print(f"same seed, shared cell: {a} vs {b}: {same} of {len(placed[a])} (other seeds {other:.1f})")


if __name__ == "__main__":
    main()
