"""LoRA on the U-Net of SD 1.x/2.x-structured folders: what trains, the adapter file, the fused export."""

from __future__ import annotations

import pytest
import torch
from sd_fixtures import LATENT_SIZE, TEXT_WIDTH, sd_folder_for_session

from ldm.config.base import load_config
from ldm.config.lora import LoraConfig
from ldm.diffusion import training_loss
from ldm.lora import (
    LORA_DIR,
    LORA_WEIGHTS_FILE,
    add_lora,
    export_lora_pipeline,
    fused_unet,
    parameter_counts,
    save_lora,
)
from ldm.sd_format import load_unet, read_sd_folder

RANK, ALPHA = 4, 8  # alpha != rank: a loader that dropped alpha would scale the adapter wrongly


@pytest.fixture(scope="module", params=["sd1", "sd2"])
def source(request, tmp_path_factory):
    return read_sd_folder(sd_folder_for_session(tmp_path_factory, request.param))


def _base_key(name: str) -> str:
    return name.replace(".base_layer.", ".")


def test_config_section():
    assert not LoraConfig().enabled
    cfg = load_config(LoraConfig, sets=["rank=4", "alpha=8", "dropout=0.1"])
    assert cfg.enabled and cfg.lora_alpha == 8 and cfg.target_modules == ("to_k", "to_q", "to_v", "to_out.0")
    assert LoraConfig(rank=16).lora_alpha == 16
    with pytest.raises(ValueError):
        LoraConfig(rank=0)
    with pytest.raises(ValueError):
        LoraConfig(rank=4, target_modules=())


def test_parameter_counts(source):
    unet = load_unet(source)
    base = parameter_counts(unet)
    assert base.trainable == base.total
    targets = {
        name: module
        for name, module in unet.named_modules()
        if isinstance(module, torch.nn.Linear) and name.endswith(("to_q", "to_k", "to_v", "to_out.0"))
    }
    expected = sum(RANK * (m.in_features + m.out_features) for m in targets.values())
    add_lora(unet, LoraConfig(rank=RANK, alpha=ALPHA))
    counts = parameter_counts(unet)
    assert counts.trainable == expected > 0
    assert counts.total == base.total + expected
    assert 0 < counts.fraction < 0.2


def test_unknown_target_modules_raise(source):
    with pytest.raises(ValueError, match="target"):
        add_lora(load_unet(source), LoraConfig(rank=2, target_modules=("no_such_layer",)))


def test_training_changes_only_the_adapter(source):
    unet = load_unet(source)
    before = {name: value.clone() for name, value in unet.state_dict().items()}
    add_lora(unet, LoraConfig(rank=RANK, alpha=ALPHA))
    scheduler = source.schedule.make_scheduler()
    optimizer = torch.optim.AdamW(
        [p for p in unet.parameters() if p.requires_grad], lr=1e-2, weight_decay=1e-2
    )
    generator = torch.Generator().manual_seed(0)
    unet.train()
    for _ in range(3):
        latents = torch.randn(2, 4, LATENT_SIZE, LATENT_SIZE, generator=generator)
        text = torch.randn(2, 77, TEXT_WIDTH, generator=generator)
        loss = training_loss(
            unet,
            latents,
            text,
            scheduler,
            prediction_type=source.schedule.prediction_type,
            generator=generator,
        )
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    after = unet.state_dict()
    base_after = {_base_key(k): v for k, v in after.items() if "lora_" not in k}
    assert base_after.keys() == before.keys()
    assert all(torch.equal(base_after[key], before[key]) for key in before)  # byte-identical base
    lora_b = [v for k, v in after.items() if "lora_B" in k]
    assert lora_b and all(v.abs().sum() > 0 for v in lora_b)  # started at zero, moved


def test_adapter_file_matches_fused_export(source, tmp_path):
    from diffusers import StableDiffusionPipeline

    unet = add_lora(load_unet(source), LoraConfig(rank=RANK, alpha=ALPHA))
    with torch.no_grad():  # stands for a trained adapter: lora_B away from its zero init
        generator = torch.Generator().manual_seed(1)
        for name, parameter in unet.named_parameters():
            if "lora_B" in name:
                parameter.copy_(0.05 * torch.randn(parameter.shape, generator=generator))
    out = export_lora_pipeline(source, unet, tmp_path / "export")
    assert (tmp_path / "export" / LORA_DIR / LORA_WEIGHTS_FILE).is_file()

    fused = StableDiffusionPipeline.from_pretrained(out, local_files_only=True, use_safetensors=True)
    adapted = StableDiffusionPipeline.from_pretrained(
        source.local, local_files_only=True, use_safetensors=True
    )
    adapted.load_lora_weights(str(tmp_path / "export" / LORA_DIR))
    base = StableDiffusionPipeline.from_pretrained(source.local, local_files_only=True, use_safetensors=True)
    assert not any("lora" in key for key in fused.unet.state_dict())  # an ordinary U-Net

    generator = torch.Generator().manual_seed(2)
    latents = torch.randn(2, 4, LATENT_SIZE, LATENT_SIZE, generator=generator)
    text = torch.randn(2, 77, TEXT_WIDTH, generator=generator)
    timesteps = torch.tensor([50, 700])
    with torch.no_grad():
        outputs = {
            name: pipe.unet(latents, timesteps, encoder_hidden_states=text).sample
            for name, pipe in {"fused": fused, "adapted": adapted, "base": base}.items()
        }
        in_memory = unet(latents, timesteps, encoder_hidden_states=text).sample
    torch.testing.assert_close(outputs["adapted"], outputs["fused"], atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(in_memory, outputs["fused"], atol=1e-4, rtol=1e-4)
    assert (outputs["fused"] - outputs["base"]).abs().max() > 1e-2  # the adapter does something

    def image(pipe):
        generator = torch.Generator().manual_seed(0)
        return torch.from_numpy(
            pipe("a red circle", num_inference_steps=2, generator=generator, output_type="np").images
        )

    torch.testing.assert_close(image(adapted), image(fused), atol=2e-3, rtol=0)


def test_fused_unet_leaves_the_training_model_alone(source, tmp_path):
    unet = add_lora(load_unet(source), LoraConfig(rank=2))
    fused = fused_unet(unet)
    assert any("lora_A" in key for key in unet.state_dict())
    assert not any("lora" in key for key in fused.state_dict())
    assert save_lora(unet, tmp_path / "adapter").name == LORA_WEIGHTS_FILE
