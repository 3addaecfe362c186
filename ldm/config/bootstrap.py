"""Config of `ldm bootstrap`: the small first-stage models trained on the synthetic source.

Each model section keeps its architecture keys (which must match a saved model for it to be reused)
apart from its run keys (steps, batch, learning rate). The defaults are sized so that CLIP and the
autoencoder together train in about ten minutes on two CPU cores and pass both quality gates.
"""

from __future__ import annotations

from typing import Literal

from pydantic import Field, field_validator, model_validator

from ldm.config.base import ConfigBase


class ClipConfig(ConfigBase):
    """A small open_clip CLIP: a 64-px ViT and a short-context text transformer."""

    # architecture
    embed_dim: int = 128
    image_size: int = 64
    # 8-px patches: an 8x8 token grid. 16-px patches halve the step time (140 against 301 ms at batch
    # 64) and reach the same AUCs in 2000 steps, but the U-Net conditioned on that text tower scored
    # 0.21 on held-out prompts (two seeds) against 0.36 at equal steps (docs/TRAINING.md, turn 9).
    patch_size: int = 8
    vision_width: int = 128
    vision_layers: int = 3
    text_width: int = 128
    text_layers: int = 3
    head_width: int = 32  # per attention head, both towers
    # Captions of the synthetic grammar are at most 13 tokens with their start and end tokens
    # (`tests/test_synth.py` checks it). 16 would do for the CLIP, but the U-Net cross-attends to all
    # of the text encoder's positions, and only 32 was measured end to end (docs/TRAINING.md, turn 9).
    context_length: int = 32
    # run
    # Measured (docs/TRAINING.md): ranking a caption above a random other one takes ~600 steps (AUC
    # 0.983), telling it from the same caption with another shape takes longer: AUC 0.60 at 600 steps,
    # 0.81 at 1500, 0.96 at 2500. The text encoder is this CLIP's text tower, so the U-Net can only
    # follow what it tells apart: 1500 steps lifted the demo's evaluation from 0.04 to 0.11. (Since
    # turn 15 the demo's U-Net reads only the tower's embeddings, `text_encoder_layers`; trained ones
    # still beat random ones there, 0.44 against 0.38 at 2,400 U-Net steps. The demo's CLIP trains
    # 800 steps since turn 16: ldm/config/demo.py.)
    steps: int = 1500
    batch_size: int = 64  # measured: 600 x 64 beats 300 x 128 in the same time (AUC 0.983)
    lr: float = 1e-3
    weight_decay: float = 0.1
    warmup_steps: int = 40
    # Hard negatives per image and step (NegCLIP): captions one edit away from the image's own (a
    # position, a flipped relation, swapped colours, a shape...; `ldm.synth.negatives`), added to the
    # image-to-text softmax. Random in-batch captions almost never differ from the true one by a
    # position alone, so plain InfoNCE leaves the CLIP at chance on position (docs/TRAINING.md, turn 12).
    # Off by default: measured in turn 13, they taught binding (AUC 0.59 -> 0.80) but not position, cost
    # 30-45% more per step, and did not move the U-Net beyond one standard error.
    hard_negatives: int = Field(0, ge=0)
    # Which edit kinds the hard negatives are drawn from when a caption allows one of them (else any
    # kind): empty is every kind, each drawn as often. Names: ldm.synth.negatives.EDIT_KINDS.
    hard_negative_kinds: tuple[str, ...] = ()
    eval_pairs: int = 512  # held-out pairs for the ROC AUC gate

    @field_validator("hard_negative_kinds")
    @classmethod
    def _known_kinds(cls, kinds: tuple[str, ...]) -> tuple[str, ...]:
        from ldm.synth.negatives import EDIT_KINDS

        unknown = sorted(set(kinds) - set(EDIT_KINDS))
        if unknown:
            raise ValueError(f"unknown hard-negative kinds {unknown}; expected some of {list(EDIT_KINDS)}")
        return tuple(sorted(set(kinds)))


class AutoencoderConfig(ConfigBase):
    """A diffusers AutoencoderKL: 64 px -> 4 x 16 x 16 latents with three blocks."""

    # architecture
    block_out_channels: tuple[int, ...] = (16, 32, 64)
    layers_per_block: int = 1
    latent_channels: int = 4
    norm_num_groups: int = 16
    image_size: int = 64
    # run
    steps: int = 900
    batch_size: int = 16
    lr: float = 1e-3
    kl_weight: float = 1e-6
    # Weight of the gradient difference term (`ldm.first_stage.autoencoder.gradient_difference`) beside
    # the pixel MSE: it weighs thin shapes by their edges, not their area. At 1 the evaluation's ceiling
    # rose from 0.917 to 0.944 (two objects 0.73 -> 0.88: fewer small stars come back as blobs) at the
    # same PSNR (29.37 dB) and step time; at 4 it fell to 0.64 (docs/TRAINING.md, turn 21).
    edge_loss_weight: float = Field(1.0, ge=0.0)
    eval_images: int = 256  # held-out renders for the PSNR gate
    scaling_images: int = 1024  # training images whose latent std sets the scaling factor


class ParseEncoderConfig(ConfigBase):
    """Transformer layers on the CLIP's word embeddings, trained to read the grammar's parse
    (`ldm.first_stage.parse_encoder`); 0 layers: off."""

    layers: int = Field(0, ge=0)
    # One layer at 600 x 128 parses every held-out caption exactly on the demo's embeddings (~30 s on
    # one thread; docs/TRAINING.md, turn 21).
    steps: int = Field(600, ge=1)
    batch_size: int = Field(128, ge=1)
    lr: float = Field(1e-3, gt=0)
    # Weight of a term that keeps the words asked nothing ("a", "red", "top") at their embeddings-only
    # outputs (`ldm.first_stage.parse_encoder.kept_words_loss`); 0: they move as the layers like.
    keep_weight: float = Field(0.0, ge=0.0)


class BootstrapConfig(ConfigBase):
    workdir: str = "./ldm-demo"
    seed: int = 0
    num_train_images: int = 20000
    clip: ClipConfig = Field(default_factory=ClipConfig)
    autoencoder: AutoencoderConfig = Field(default_factory=AutoencoderConfig)
    # How many of the CLIP text tower's transformer layers the U-Net's text encoder keeps (None: all;
    # 0: the token and position embeddings and the final LayerNorm). The CLIP's image tower does not see
    # where things are, so its contrastive loss never asks the text tower to keep position words, and
    # the whole tower all but erases them: "top left" and "bottom right" at cosine 0.97 at the words
    # (docs/TRAINING.md, turn 14). Without its layers, every word keeps its own embedding and the
    # U-Net's cross-attention does the composing (turn 15).
    text_encoder_layers: int | None = Field(None, ge=0)
    # New layers on those embeddings, trained to read the caption grammar's parse (an object's shape
    # word and the words after it that speak of it say its shape, colour, size, count and place); they
    # replace the tower's layers, so they need text_encoder_layers: 0 (docs/TRAINING.md, turn 21).
    parse_encoder: ParseEncoderConfig = Field(default_factory=ParseEncoderConfig)
    # quality gates: training that ends below them raises BootstrapGateError
    min_clip_auc: float = 0.98
    min_psnr_db: float = 28.0
    threads: int = 2  # torch threads on the CPU
    # Where the CLIP and the autoencoder train: "auto" is the GPU when torch sees one, else the CPU.
    # Not part of a model's digest: a model trained on either is reused by the other.
    device: Literal["auto", "cpu", "cuda"] = "auto"
    force: bool = False  # retrain even when a model with the same config is already there

    @model_validator(mode="after")
    def _parse_layers_replace_the_tower(self) -> BootstrapConfig:
        if self.parse_encoder.layers and self.text_encoder_layers != 0:
            raise ValueError(
                "parse_encoder.layers replace the CLIP tower's layers: set text_encoder_layers: 0 with them"
            )
        return self
