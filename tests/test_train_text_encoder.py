"""``train_text_encoder``: the text encoder trains with the U-Net (pipelines/train/joint.py), is
checkpointed and resumed beside it, and is the encoder the exported pipeline carries."""

from __future__ import annotations

import math
import shutil

import mlflow
import pytest
import torch
from test_train import CAPTIONS, tiny_unet_config
from test_train_input_ids import first_stored_row, token_ids, write_ids_only_workdir

from ldm.config.train import TrainConfig
from ldm.contract import COL_INPUT_IDS, COL_TEXT_EMBEDDING
from ldm.errors import DataError
from ldm.testing import CLIP_VOCAB_SIZE, TINY_TEXT_DIM
from pipelines.train import LatentsFacts, LocalWorld, LoopInputs, NanGuard, tensor_batches, train_loop
from pipelines.train.checkpoint import load_checkpoint, save_checkpoint
from pipelines.train.conditioning import TrainedIds, encode_input_ids, text_conditioning
from pipelines.train.joint import TextEncoderAndUNet
from pipelines.train.loop import build_training_state


def joint_config(**overrides) -> TrainConfig:
    values = dict(
        unet=tiny_unet_config(),
        num_workers=1,
        batch_size=4,
        max_steps=4,
        max_minutes=None,
        warmup_steps=1,
        lr=1e-2,
        train_text_encoder=True,
    )
    return TrainConfig(**{**values, **overrides})


def train_joint(cfg: TrainConfig, checkpoint_dir=None):
    """``train_loop`` on 8 tiny rows of token ids; returns (state, the driver's text encoder)."""
    from ldm.testing import tiny_components

    parts = tiny_components(seed=0, text_len=16)
    tokenizer, encoder = parts["tokenizer"], parts["text_encoder"]
    ids = torch.from_numpy(token_ids(tokenizer, [CAPTIONS[i % 4] for i in range(8)]))
    facts = LatentsFacts(1.0, (4, 8, 8), None, COL_INPUT_IDS, (16,), tokenizer.pad_token_id)
    facts, conditioning = text_conditioning(facts, tokenizer, encoder, train=True)
    assert isinstance(conditioning, TrainedIds)
    latents = torch.randn(8, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    batches = tensor_batches(latents, ids, cfg, conditioning.to(torch.device("cpu")))
    inputs = LoopInputs(cfg, facts, text_encoder=encoder)
    state = train_loop(inputs, batches, LocalWorld(checkpoint_dir=checkpoint_dir), [NanGuard()])
    return state, encoder, inputs


def test_the_loop_trains_the_text_encoder_but_not_its_token_table_and_keeps_an_ema_of_it():
    from ldm.testing import tiny_components

    untouched = tiny_components(seed=0, text_len=16)["text_encoder"].state_dict()
    state, driver_encoder, _ = train_joint(joint_config(text_encoder_lr=1e-3))
    assert state.step == 4 and math.isfinite(state.loss)
    # Two AdamW groups; the encoder's follows the schedule at text_encoder_lr / lr of the U-Net's rate.
    unet_group, encoder_group = state.optimizer.param_groups
    assert unet_group["lr"] == pytest.approx(state.lr) and encoder_group["lr"] == pytest.approx(state.lr / 10)
    assert isinstance(state.unet, TextEncoderAndUNet) and isinstance(state.ema_unet, TextEncoderAndUNet)
    trained = state.unet.text_encoder.state_dict()
    table = "embeddings.token_embedding.weight"
    assert torch.equal(trained[table], untouched[table])  # frozen
    moved = [name for name in trained if not torch.equal(trained[name], untouched[name])]
    assert any(name.startswith("encoder.layers.0.self_attn.") for name in moved)  # the layers took the steps
    assert "embeddings.position_embedding.weight" in moved
    assert "final_layer_norm.weight" in moved
    # The driver's encoder is where training started, not what trained.
    assert all(torch.equal(value, untouched[name]) for name, value in driver_encoder.state_dict().items())
    # The EMA copy follows the trained encoder: it moved, and it lags behind it.
    ema = state.ema_unet.text_encoder.state_dict()
    layer = "encoder.layers.0.self_attn.q_proj.weight"
    assert not torch.equal(ema[layer], untouched[layer]) and not torch.equal(ema[layer], trained[layer])


def test_a_checkpoint_keeps_the_trained_encoder_and_a_resumed_run_starts_from_it(tmp_path):
    state, _, inputs = train_joint(joint_config(max_steps=2))
    folder = tmp_path / "checkpoint_000000"
    folder.mkdir()
    save_checkpoint(folder, state.unet, state.optimizer, state.step, state.cfg, {}, ema_unet=state.ema_unet)
    assert (folder / "text_encoder" / "model.safetensors").is_file()
    assert (folder / "ema_text_encoder" / "model.safetensors").is_file()

    unet, ema_unet, optimizer = build_training_state(inputs)  # fresh: the driver's encoder
    layer = "encoder.layers.1.mlp.fc1.weight"
    assert not torch.equal(unet.text_encoder.state_dict()[layer], state.unet.text_encoder.state_dict()[layer])
    assert load_checkpoint(folder, unet, optimizer, ema_unet=ema_unet) == 2
    for loaded, saved in ((unet, state.unet), (ema_unet, state.ema_unet)):
        for name, value in saved.state_dict().items():
            assert torch.equal(loaded.state_dict()[name], value), name
    # The optimizer state covers the encoder's parameters too (AdamW moments for every trained tensor).
    trained = [p for p in state.unet.parameters() if p.requires_grad]
    assert len(optimizer.state_dict()["state"]) == len(trained)

    # A run that does not train the encoder cannot resume one that did (its U-Net reads that encoder).
    frozen = build_training_state(LoopInputs(joint_config(train_text_encoder=False), inputs.facts))
    with pytest.raises(ValueError, match="resume with train_text_encoder: true"):
        load_checkpoint(folder, frozen[0], frozen[2], ema_unet=frozen[1])
    # A run that trains the encoder cannot resume a checkpoint that has none: one line says so.
    shutil.rmtree(folder / "text_encoder")
    with pytest.raises(ValueError, match="no text_encoder/"):
        load_checkpoint(folder, unet, optimizer, ema_unet=ema_unet)


def test_config_and_data_that_cannot_train_the_encoder_are_refused():
    from ldm.testing import tiny_components

    with pytest.raises(ValueError, match="does not combine with lora"):
        TrainConfig(train_text_encoder=True, init_from="/models/sd", lora={"rank": 4})
    parts = tiny_components(seed=0, text_len=16)
    embeddings_only = LatentsFacts(1.0, (4, 8, 8), (16, 32), COL_TEXT_EMBEDDING)
    with pytest.raises(DataError, match="store_input_ids: true"):
        text_conditioning(embeddings_only, parts["tokenizer"], parts["text_encoder"], train=True)
    # Data with both columns: training reads the ids.
    both = LatentsFacts(1.0, (4, 8, 8), (16, 32), COL_TEXT_EMBEDDING, (16,), parts["tokenizer"].pad_token_id)
    facts, conditioning = text_conditioning(both, parts["tokenizer"], parts["text_encoder"], train=True)
    assert facts.text_column == COL_INPUT_IDS and isinstance(conditioning, TrainedIds)
    with pytest.raises(ValueError, match="needs LoopInputs.text_encoder"):
        build_training_state(LoopInputs(joint_config(), facts))


@pytest.mark.slow
def test_ldm_train_with_the_text_encoder_exports_the_encoder_it_trained(tmp_path, ray_local):
    from diffusers import StableDiffusionPipeline
    from safetensors.torch import load_file

    from ldm.first_stage.text_encoder import load_text_encoder
    from ldm.tracking import configure
    from pipelines.train import run_train

    work, _ = write_ids_only_workdir(tmp_path / "wd", rows=16)
    cfg = joint_config(
        workdir=str(work.root),
        num_workers=2,
        batch_size=8,
        max_steps=3,
        checkpoint_every=3,
        sample_every=3,
        sample_prompts=["a red circle"],
        sample_steps=2,
        run_name="joint",
    )
    summary = run_train(cfg)
    assert summary["steps"] == 3 and math.isfinite(summary["final_loss"])
    configure(work.root)
    run = mlflow.MlflowClient().get_run(summary["run_id"])
    assert run.data.params["train_text_encoder"] == "True"
    table = CLIP_VOCAB_SIZE * TINY_TEXT_DIM  # the tiny encoder's token table is frozen
    trained = int(run.data.params["text_encoder_trainable_params"])
    assert 0 < trained == sum(p.numel() for p in load_text_encoder(str(work.models))[1].parameters()) - table
    # DDP kept the two workers' pairs identical: the fingerprint covers the encoder's weights.
    fingerprints = {replica["sha256"] for replica in summary["replicas"]}
    assert len(summary["replicas"]) == 2 and len(fingerprints) == 1

    pipe = StableDiffusionPipeline.from_pretrained(
        summary["export"], local_files_only=True, use_safetensors=True
    )
    checkpoint = summary["checkpoint"]
    ema_encoder = load_file(f"{checkpoint}/ema_text_encoder/model.safetensors")
    exported = pipe.text_encoder.state_dict()
    assert all(torch.equal(exported[name], value) for name, value in ema_encoder.items())
    _, original = load_text_encoder(str(work.models))
    layer = "encoder.layers.0.self_attn.v_proj.weight"
    assert not torch.equal(exported[layer], original.state_dict()[layer])

    # A prompt encodes at inference as the step encoded its ids with the exported (EMA) encoder.
    ids, caption = first_stored_row(work)
    at_inference, _ = pipe.encode_prompt(caption, "cpu", 1, False)
    assert torch.equal(at_inference, encode_input_ids(pipe.text_encoder, ids, pipe.tokenizer.pad_token_id))
