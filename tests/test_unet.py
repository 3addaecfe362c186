"""The U-Net config and builder (ldm/unet.py) and the train config (ldm/config/train.py)."""

from __future__ import annotations

import pytest
import torch

from ldm.config.train import TrainConfig
from ldm.unet import UNetConfig, build_unet


def test_configs_round_trip_through_yaml(tmp_path):
    from ldm.config import dump_config, load_config

    cfg = TrainConfig(
        unet=UNetConfig(block_out_channels=(32, 64, 64)), batch_size=32, prediction_type="v_prediction"
    )
    path = dump_config(cfg, tmp_path / "train.yaml")
    assert load_config(TrainConfig, path) == cfg
    assert UNetConfig.model_validate(cfg.unet.to_dict()) == cfg.unet
    assert load_config(TrainConfig, path, sets=["unet.layers_per_block=2"]).unet.layers_per_block == 2


@pytest.mark.parametrize(
    "bad",
    [
        {"prediction_type": "sample"},
        {"loss_weighting": "p2"},
        {"batch_size": 63},  # not divisible by the 2 default workers
        {"unet": {"block_out_channels": [64, 128]}},  # 2 levels, 3 block types
        {"unet": {"block_out_channels": [48, 128, 128]}},  # not divisible by 32 groups
        {"unet": {"down_block_types": ["DownBlock2D", "AttnDownBlock2D", "DownBlock2D"]}},
        {"no_such_key": 1},
        {"zero_terminal_snr": True},  # epsilon by default: nothing to predict at the last step
        {"zero_terminal_snr": True, "prediction_type": "epsilon", "init_from": "/a/folder"},
    ],
)
def test_bad_train_config_raises(bad):
    with pytest.raises(ValueError):
        TrainConfig.model_validate(bad)
    # the zero-SNR configs that are fine: v-prediction, or a folder whose scheduler decides
    TrainConfig(zero_terminal_snr=True, prediction_type="v_prediction")
    TrainConfig(zero_terminal_snr=True, init_from="/a/folder")


def test_default_unet_has_cross_attention_only_at_8x8_and_mid_for_16x16_latents():
    torch.manual_seed(0)
    unet = build_unet(UNetConfig(), sample_size=16, in_channels=4, cross_attention_dim=128)
    params = sum(p.numel() for p in unet.parameters())
    assert 5.0e6 < params < 6.0e6, params

    blocks = {f"down{i}": block for i, block in enumerate(unet.down_blocks)}
    blocks["mid"] = unet.mid_block
    blocks.update({f"up{i}": block for i, block in enumerate(unet.up_blocks)})

    # Record the spatial size each block runs at.
    seen: dict[str, int] = {}
    hooks = [
        block.register_forward_pre_hook(
            lambda module, args, kwargs, name=name: seen.__setitem__(
                name, kwargs.get("hidden_states", *args[:1]).shape[-1]
            ),
            with_kwargs=True,
        )
        for name, block in blocks.items()
    ]
    with torch.no_grad():
        out = unet(
            torch.randn(2, 4, 16, 16), torch.tensor([1, 500]), encoder_hidden_states=torch.randn(2, 8, 128)
        )
    for hook in hooks:
        hook.remove()
    assert out.sample.shape == (2, 4, 16, 16)
    assert seen == {"down0": 16, "down1": 8, "down2": 4, "mid": 4, "up0": 4, "up1": 8, "up2": 16}
    with_cross_attention = {
        name for name, block in blocks.items() if getattr(block, "has_cross_attention", False)
    }
    assert with_cross_attention == {"down1", "mid", "up1"}


def test_build_unet_rejects_latents_that_do_not_divide():
    with pytest.raises(ValueError, match="not divisible"):
        build_unet(UNetConfig(), sample_size=10, in_channels=4, cross_attention_dim=32)


def test_pooled_text_conditions_a_unet_without_any_cross_attention():
    """`addition_embed_type: text` adds the attention-pooled caption to the timestep embedding, so even
    a U-Net with no cross-attention block sees the text; without it such a U-Net ignores the text."""
    plain = dict(
        block_out_channels=(16, 32),
        down_block_types=("DownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "UpBlock2D"),
        mid_block_cross_attention=False,
        norm_num_groups=8,
    )
    latents, t = torch.randn(2, 4, 8, 8), torch.tensor([500, 500])
    text_a, text_b = torch.randn(2, 6, 32), torch.randn(2, 6, 32)
    outputs = {}
    for pooled in (None, "text"):
        torch.manual_seed(0)
        unet = build_unet(
            UNetConfig(**plain, addition_embed_type=pooled, addition_embed_type_num_heads=4),
            sample_size=8,
            in_channels=4,
            cross_attention_dim=32,
        ).eval()
        with torch.no_grad():
            outputs[pooled] = [unet(latents, t, encoder_hidden_states=x).sample for x in (text_a, text_b)]
    assert torch.equal(outputs[None][0], outputs[None][1])
    assert (outputs["text"][0] - outputs["text"][1]).abs().mean() > 1e-3


def test_pooled_text_heads_must_divide_the_text_width():
    cfg = UNetConfig(addition_embed_type="text", addition_embed_type_num_heads=5)
    with pytest.raises(ValueError, match="addition_embed_type_num_heads"):
        build_unet(cfg, sample_size=16, in_channels=4, cross_attention_dim=128)


def test_the_position_embedding_tells_every_cell_apart_and_the_unet_uses_it(tmp_path):
    from diffusers import UNet2DConditionModel

    from ldm.positional_unet import PositionalUNet2DConditionModel, sincos_2d, unet_class

    table = sincos_2d(32, 16)[0].flatten(1).T  # [256 cells, 32 channels]
    assert torch.cdist(table, table).add(torch.eye(256) * 1e3).min() > 0.1
    with pytest.raises(ValueError, match="divisible by 4"):
        sincos_2d(30, 16)

    cfg = UNetConfig(block_out_channels=(32, 64, 64), norm_num_groups=16)
    torch.manual_seed(0)
    stock = build_unet(cfg, sample_size=16, in_channels=4, cross_attention_dim=32)
    torch.manual_seed(0)
    unet = build_unet(
        cfg.model_copy(update={"position_embedding": True}), 16, in_channels=4, cross_attention_dim=32
    )
    assert type(stock) is UNet2DConditionModel and type(unet) is PositionalUNet2DConditionModel
    extra = sum(p.numel() for p in unet.parameters()) - sum(p.numel() for p in stock.parameters())
    assert extra == 32 * 16 * 16
    assert unet.config.in_channels == 4  # the pipeline still makes 4-channel latents

    args = (torch.randn(2, 4, 16, 16), torch.tensor([10, 700]), torch.randn(2, 8, 32))
    with torch.no_grad():
        out = unet(*args).sample
        unet.conv_in.position.zero_()
        without = unet(*args).sample
        unet.conv_in.position.copy_(sincos_2d(32, 16))
        # other latent sizes resize the table instead of failing
        assert unet(torch.randn(1, 4, 24, 24), torch.tensor([5]), args[2][:1]).sample.shape == (1, 4, 24, 24)
    assert (out - without).abs().mean() > 1e-3

    unet.save_pretrained(tmp_path / "positional")
    stock.save_pretrained(tmp_path / "stock")
    assert unet_class(tmp_path / "stock") is UNet2DConditionModel
    loaded = unet_class(tmp_path / "positional").from_pretrained(tmp_path / "positional")
    with torch.no_grad():
        assert torch.allclose(loaded(*args).sample, out, atol=1e-5)
    config = (tmp_path / "stock" / "config.json").read_text()
    (tmp_path / "stock" / "config.json").write_text(
        config.replace("UNet2DConditionModel", "UNetSpatioTemporal")
    )
    with pytest.raises(ValueError, match="UNetSpatioTemporal"):
        unet_class(tmp_path / "stock")
