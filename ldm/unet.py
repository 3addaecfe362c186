"""The denoising network: a diffusers ``UNet2DConditionModel`` built from a frozen, typed config.

``UNetConfig`` holds only architecture keys (they must match when weights are loaded back); the latent
shape and the text embedding width are not in it because they come from the data (Parquet schema
metadata) and are passed to ``build_unet``. The weights are saved with the model's own
``save_pretrained`` (config.json + safetensors), so a checkpoint or an exported pipeline reloads
without this module.

A pretrained Stable Diffusion folder is not described by ``UNetConfig``: its U-Net's own diffusers
config is the architecture (``ldm/sd_format.py``). ``UNetConfig`` can still state an SD 2.x-style
architecture from scratch (per-block head counts, linear projections).

Default (sized for the CPU, docs/TRAPS.md): for 16x16 latents the three blocks run at 16x16, 8x8 and 4x4; only
the 8x8 block and the 4x4 mid block have cross-attention. Self-attention at 16x16 roughly doubles the
step time, and the 4x4 block is where it would be cheapest but gains least. About 5.6M parameters,
~1.1 steps/s at batch 64 on 2 cores. The demo itself trains a quarter-size U-Net, (32, 64, 64) with
the pooled caption in the timestep embedding (``ldm/config/demo.py``): on 2 cores, more optimizer
steps in its few minutes buy more than width (docs/TRAINING.md, turns 6 and 7).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Literal

from pydantic import model_validator

from ldm.config.base import ConfigBase

if TYPE_CHECKING:
    from diffusers import UNet2DConditionModel

DownBlock = Literal["DownBlock2D", "CrossAttnDownBlock2D"]
UpBlock = Literal["UpBlock2D", "CrossAttnUpBlock2D"]


class UNetConfig(ConfigBase):
    """Architecture of the U-Net (STYLE.md 4): constructor arguments of ``UNet2DConditionModel``.

    Down blocks are listed from the highest resolution down; up blocks from the lowest resolution up
    (diffusers' order), so the default puts cross-attention at the same 8x8 resolution on both sides.
    """

    block_out_channels: tuple[int, ...] = (64, 128, 128)
    down_block_types: tuple[DownBlock, ...] = ("DownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D")
    up_block_types: tuple[UpBlock, ...] = ("UpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D")
    mid_block_cross_attention: bool = True
    layers_per_block: int = 1
    # One head count for every block (SD 1.x) or one per down block (SD 2.x: e.g. (5, 10, 20, 20)).
    # diffusers calls the number of heads attention_head_dim; the name is kept for the config's sake.
    attention_head_dim: int | tuple[int, ...] = 8
    use_linear_projection: bool = False  # SD 2.x projects into the transformer blocks with Linear
    upcast_attention: bool = False  # SD 2.1 computes attention scores in float32
    norm_num_groups: int = 32
    # "text": the text embedding, attention-pooled (diffusers' TextTimeEmbedding, as DeepFloyd IF and
    # Imagen do), is added to the timestep embedding, so every ResNet block at every resolution is
    # conditioned on the caption, not only the blocks with cross-attention.
    addition_embed_type: Literal["text"] | None = None
    addition_embed_type_num_heads: int = 8
    # True: a learned absolute position embedding is added to the features after conv_in
    # (ldm/positional_unet.py), so a query of the cross-attention knows which cell it is in.
    position_embedding: bool = False

    @model_validator(mode="after")
    def _consistent(self) -> UNetConfig:
        levels = len(self.block_out_channels)
        if len(self.down_block_types) != levels or len(self.up_block_types) != levels:
            raise ValueError(
                f"block_out_channels has {levels} levels but down_block_types has "
                f"{len(self.down_block_types)} and up_block_types {len(self.up_block_types)}"
            )
        heads = self.attention_head_dim
        if isinstance(heads, tuple) and len(heads) != levels:
            raise ValueError(f"attention_head_dim has {len(heads)} entries for {levels} blocks")
        bad = [c for c in self.block_out_channels if c % self.norm_num_groups]
        if bad:
            raise ValueError(
                f"block_out_channels {bad} not divisible by norm_num_groups={self.norm_num_groups}"
            )
        return self


def build_unet(
    cfg: UNetConfig, sample_size: int, in_channels: int, cross_attention_dim: int
) -> UNet2DConditionModel:
    """A freshly initialised ``UNet2DConditionModel`` for latents [in_channels, sample_size, sample_size]
    conditioned on text embeddings of width ``cross_attention_dim``."""
    from diffusers import UNet2DConditionModel

    downsamplings = len(cfg.block_out_channels) - 1
    if sample_size % (2**downsamplings):
        raise ValueError(f"latent size {sample_size} is not divisible by 2**{downsamplings} (U-Net depth)")
    if cfg.addition_embed_type is not None and cross_attention_dim % cfg.addition_embed_type_num_heads:
        raise ValueError(
            f"addition_embed_type_num_heads={cfg.addition_embed_type_num_heads} does not divide the text "
            f"embedding width {cross_attention_dim}"
        )
    cls: type[UNet2DConditionModel] = UNet2DConditionModel
    if cfg.position_embedding:
        from ldm.positional_unet import PositionalUNet2DConditionModel

        cls = PositionalUNet2DConditionModel
    return cls(
        sample_size=sample_size,
        in_channels=in_channels,
        out_channels=in_channels,
        block_out_channels=cfg.block_out_channels,
        down_block_types=cfg.down_block_types,
        up_block_types=cfg.up_block_types,
        mid_block_type="UNetMidBlock2DCrossAttn" if cfg.mid_block_cross_attention else None,
        layers_per_block=cfg.layers_per_block,
        attention_head_dim=cfg.attention_head_dim,
        use_linear_projection=cfg.use_linear_projection,
        upcast_attention=cfg.upcast_attention,
        norm_num_groups=cfg.norm_num_groups,
        cross_attention_dim=cross_attention_dim,
        addition_embed_type=cfg.addition_embed_type,
        addition_embed_type_num_heads=cfg.addition_embed_type_num_heads,
    )
