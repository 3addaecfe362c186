"""Prompt sets and the autoencoder's ceiling for the synthetic domain's evaluation.

Three numbers tell a model's failures apart (issue "prompt adherence"):

- the held-out score: compositions the source never emitted (`ldm.synth.grammar.heldout_prompts`), so
  never trained on: can the model *generalise*?
- the seen score (`seen_prompts`): compositions the source did emit, drawn from the captions the model
  was trained on when they are known: can the model *fit* its data?
- the ceiling (`autoencoder_ceiling`): true renders after the model's own autoencoder: the best any
  U-Net can reach through this first stage.
"""

from __future__ import annotations

from collections.abc import Iterable

import numpy as np

from ldm.synth.grammar import CATEGORIES, PromptSpec, is_heldout, parse_caption


def _bucket(spec: PromptSpec) -> str:
    # Absolute and relative position prompts are drawn separately, as heldout_prompts does, so the
    # many relative compositions do not crowd out the absolute ones.
    if spec.category == "position":
        return "position_absolute" if spec.position is not None else "position_relative"
    return spec.category


def seen_prompts(captions: Iterable[str], n: int, seed: int = 0) -> list[str]:
    """``n`` distinct-where-possible prompts among ``captions`` that the grammar parses and does not hold
    out, balanced over the six categories (round robin, as `heldout_prompts`; a category with no
    caption is skipped, repeats only when a category runs out)."""
    rng = np.random.default_rng(seed)
    pools: dict[str, list[str]] = {}
    for caption in sorted(set(captions)):
        try:
            spec = parse_caption(caption)
        except ValueError:
            continue  # a caption outside the grammar (a mismatched web caption, say)
        if not is_heldout(caption):
            pools.setdefault(_bucket(spec), []).append(caption)
    if not pools:
        raise ValueError("no caption of the synthetic grammar to draw seen prompts from")
    shuffled = {name: [str(c) for c in rng.permutation(pool)] for name, pool in pools.items()}
    # Two rounds of the categories: the second takes the other kind of position prompt.
    order = []
    for i in range(2 * len(CATEGORIES)):
        name = CATEGORIES[i % len(CATEGORIES)]
        if name == "position":
            name = ("position_absolute", "position_relative")[i // len(CATEGORIES)]
        if name in shuffled:
            order.append(name)
    drawn: dict[str, int] = {}
    out = []
    for i in range(n):
        name = order[i % len(order)]
        k = drawn[name] = drawn.get(name, -1) + 1
        out.append(shuffled[name][k % len(shuffled[name])])
    return out


def grammar_seen_captions() -> list[str]:
    """Every caption the synthetic source can emit (the grammar minus its held-out split): the seen set
    when the model's training captions are not known."""
    from ldm.synth.grammar import all_captions

    return [c for captions in all_captions().values() for c in captions if not is_heldout(c)]


def autoencoder_ceiling(vae, prompts: list[str], seed: int, size: int) -> dict[str, float]:
    """Scores of true renders of ``prompts`` after a round trip through the pipeline's autoencoder.

    No U-Net can do better than its first stage lets it: a detail the autoencoder cannot reconstruct
    (a small star's arms, at 64 px through 16x16 latents) is lost to generation too. Reported beside the
    model's scores so that a low score can be told apart from a low ceiling.
    """
    from PIL import Image

    from ldm.evaluation.geneval import score
    from ldm.first_stage.autoencoder import decode_latents, encode_images
    from ldm.synth.grammar import scene_for_prompt
    from ldm.synth.render import render_scene

    rng = np.random.default_rng(seed)
    renders = np.stack(
        [np.asarray(render_scene(scene_for_prompt(parse_caption(p), rng), size=size)) for p in prompts]
    )
    decoded = decode_latents(vae, encode_images(vae, renders))
    report = score(prompts, [Image.fromarray(image) for image in decoded])
    return {k: float(v) for k, v in report.items() if isinstance(v, int | float)}
