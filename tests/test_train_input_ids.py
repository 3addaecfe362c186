"""Training on data that stores captions as token ids only (`store_text_embeddings: false`): the step
encodes them with the run's frozen text encoder, and the conditioning equals what the pipeline
computes at inference for the same caption."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from test_train import CAPTIONS, SCALING_FACTOR, tensor_column, tiny_unet_config

from ldm.config.train import TrainConfig
from ldm.contract import (
    COL_CAPTION,
    COL_INPUT_IDS,
    COL_KEY,
    COL_LATENT,
    COL_TEXT_EMBEDDING,
    LATENTS_DIR,
    MANIFEST_FILE,
    META_INPUT_IDS_SHAPE,
    META_LATENT_SHAPE,
    META_PAD_TOKEN_ID,
    META_SCALING_FACTOR,
    META_TEXT_EMBEDDING_SHAPE,
    META_TEXT_ENCODER,
    WorkDir,
)
from ldm.errors import DataError
from ldm.text import encode_captions
from pipelines.train import LatentsFacts, LocalWorld, LoopInputs, NanGuard, read_latents_facts, tensor_batches
from pipelines.train.conditioning import EncodedIds, StoredEmbeddings, encode_input_ids, text_conditioning


def token_ids(tokenizer, captions: list[str]) -> np.ndarray:
    """int32 [N, L]: the tokenizer call ingest's LatentEncoder makes."""
    tokens = tokenizer(captions, padding="max_length", max_length=tokenizer.model_max_length, truncation=True)
    return np.asarray(tokens["input_ids"], dtype=np.int32)


def write_ids_only_workdir(root: Path, rows: int = 16) -> tuple[WorkDir, dict]:
    """Tiny first-stage models where bootstrap puts them, and latents/ as ingest writes it with
    ``store_text_embeddings: false``: ``input_ids`` and no ``text_embedding``."""
    from ldm.first_stage.autoencoder import save_autoencoder
    from ldm.first_stage.text_encoder import save_text_encoder
    from ldm.testing import manifest_json, tiny_components

    work = WorkDir(root)
    parts = tiny_components(seed=0, latent_size=8, text_len=16)
    parts["vae"].register_to_config(scaling_factor=SCALING_FACTOR)
    save_autoencoder(parts["vae"], work.autoencoder)
    save_text_encoder(parts["tokenizer"], parts["text_encoder"], work.models)
    captions = [CAPTIONS[i % len(CAPTIONS)] for i in range(rows)]
    ids = token_ids(parts["tokenizer"], captions)
    latents = np.random.default_rng(0).normal(0, 0.8, size=(rows, 4, 8, 8)).astype(np.float16)
    table = pa.table(
        {
            COL_KEY: [f"{i:04d}" for i in range(rows)],
            COL_CAPTION: captions,
            COL_LATENT: tensor_column(latents),
            COL_INPUT_IDS: tensor_column(ids),
        }
    )
    metadata = {
        META_SCALING_FACTOR: json.dumps(SCALING_FACTOR),
        META_LATENT_SHAPE: json.dumps([4, 8, 8]),
        META_INPUT_IDS_SHAPE: json.dumps([ids.shape[1]]),
        META_PAD_TOKEN_ID: json.dumps(int(parts["tokenizer"].pad_token_id)),
        META_TEXT_ENCODER: json.dumps({"spec": str(work.models), "sha256": "0" * 16}),
    }
    latents_dir = work.data / LATENTS_DIR
    latents_dir.mkdir(parents=True)
    pq.write_table(table.replace_schema_metadata(metadata), latents_dir / "part-00000.parquet")
    (work.data / MANIFEST_FILE).write_text(
        manifest_json(rows, "ids", list(latents.shape[1:]), float(SCALING_FACTOR))
    )
    return work, parts


def first_stored_row(work: WorkDir) -> tuple[torch.Tensor, str]:
    """The first row of ``latents/`` as training reads it: its token ids [1, L] int64 and its caption."""
    stored = pq.read_table(work.data / LATENTS_DIR).slice(0, 1)
    ids = torch.from_numpy(stored.column(COL_INPUT_IDS).combine_chunks().to_numpy_ndarray().astype(np.int64))
    return ids, stored.column(COL_CAPTION)[0].as_py()


def test_ids_encode_as_the_captions_do_with_and_without_an_attention_mask():
    from ldm.testing import tiny_components

    parts = tiny_components(seed=0, text_len=16)
    tokenizer, encoder = parts["tokenizer"], parts["text_encoder"]
    captions = ["a red circle", "", "a very long caption " * 6]  # the last one is truncated
    ids = torch.from_numpy(token_ids(tokenizer, captions))
    expected = encode_captions(tokenizer, encoder, captions)
    assert torch.equal(encode_input_ids(encoder, ids, tokenizer.pad_token_id), expected)
    # An encoder that asks for a mask: the mask rebuilt from the ids is the tokenizer's.
    encoder.config.use_attention_mask = True
    masked = encode_captions(tokenizer, encoder, captions)
    assert not torch.allclose(masked[0], expected[0])  # the mask changes the result, so it is tested
    assert torch.equal(encode_input_ids(encoder, ids, tokenizer.pad_token_id), masked)


def test_facts_without_the_embedding_column_and_the_conditioning_they_resolve_to(tmp_path):
    work, parts = write_ids_only_workdir(tmp_path / "wd", rows=4)
    facts = read_latents_facts(str(work.data / LATENTS_DIR))
    assert facts.text_column == COL_INPUT_IDS and facts.text_embedding_shape is None
    assert facts.input_ids_shape == (16,) and facts.pad_token_id == parts["tokenizer"].pad_token_id
    assert facts.text_encoder == str(work.models)
    with pytest.raises(DataError, match="token ids only"):
        _ = facts.text_width

    resolved, conditioning = text_conditioning(facts, parts["tokenizer"], parts["text_encoder"])
    assert resolved.text_embedding_shape == (16, 32) and resolved.text_width == 32
    assert isinstance(conditioning, EncodedIds) and conditioning.column == COL_INPUT_IDS
    # Ids of another tokenizer length would name other positions: refused with one line.
    other = LatentsFacts(1.0, (4, 8, 8), None, COL_INPUT_IDS, (77,), facts.pad_token_id, "sd-tokenizer")
    with pytest.raises(DataError, match="do not match this run's tokenizer"):
        text_conditioning(other, parts["tokenizer"], parts["text_encoder"])


def test_stored_embeddings_another_encoder_made_are_not_trained_on(tmp_path):
    """Two encoders of one width give embeddings of one shape: the first stored caption, encoded again,
    tells whether the stored embeddings are the run's encoder's. When not, the stored ids are encoded
    (what the exported pipeline computes), or, without ids, the run is refused."""
    from ldm.testing import tiny_components

    work, parts = write_ids_only_workdir(tmp_path / "wd", rows=4)
    path = work.data / LATENTS_DIR / "part-00000.parquet"
    table = pq.read_table(path)
    embeddings = encode_captions(
        parts["tokenizer"], parts["text_encoder"], table.column(COL_CAPTION).to_pylist()
    )
    metadata = {**table.schema.metadata, META_TEXT_EMBEDDING_SHAPE: json.dumps([16, 32]).encode()}
    both = table.append_column(COL_TEXT_EMBEDDING, tensor_column(embeddings.numpy().astype(np.float16)))
    pq.write_table(both.replace_schema_metadata(metadata), path)
    # A shard whose rows were all rejected leaves an empty file, first in the listing here.
    pq.write_table(both.slice(0, 0).replace_schema_metadata(metadata), path.with_name("part-0000.parquet"))

    facts = read_latents_facts(str(work.data / LATENTS_DIR))
    assert facts.text_column == COL_TEXT_EMBEDDING and facts.probe is not None
    caption, stored = facts.probe
    assert caption == CAPTIONS[0] and torch.allclose(stored, embeddings[0], atol=1e-2)
    _, same = text_conditioning(facts, parts["tokenizer"], parts["text_encoder"])
    assert isinstance(same, StoredEmbeddings)

    other = tiny_components(seed=1, latent_size=8, text_len=16)["text_encoder"]  # same width, other weights
    with pytest.warns(UserWarning, match="ingest used another encoder.*encoding the stored token ids"):
        resolved, encoded = text_conditioning(facts, parts["tokenizer"], other)
    assert isinstance(encoded, EncodedIds) and resolved.text_column == COL_INPUT_IDS

    embeddings_only_table = both.drop_columns([COL_INPUT_IDS]).replace_schema_metadata(metadata)
    pq.write_table(embeddings_only_table, path)
    pq.write_table(embeddings_only_table.slice(0, 0), path.with_name("part-0000.parquet"))
    embeddings_only = read_latents_facts(str(work.data / LATENTS_DIR))
    with pytest.raises(
        DataError, match=r"stored embedding of 'a red circle'.*train with the text encoder that ingest used"
    ):
        text_conditioning(embeddings_only, parts["tokenizer"], other)


def test_id_batches_equal_embedding_batches_with_the_same_caption_dropout():
    """The same seeds give the same rows and the same dropped captions; encoding the ids in the step
    gives the embeddings ingest would have stored (fp32 here; ingest stores fp16)."""
    from ldm.testing import tiny_components

    parts = tiny_components(seed=0, text_len=16)
    tokenizer, encoder = parts["tokenizer"], parts["text_encoder"]
    captions = [CAPTIONS[i % len(CAPTIONS)] for i in range(8)]
    ids = torch.from_numpy(token_ids(tokenizer, captions))
    embeddings = encode_captions(tokenizer, encoder, captions)
    latents = torch.randn(8, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    cfg = TrainConfig(num_workers=1, batch_size=4, caption_dropout=0.5, seed=3)
    facts = LatentsFacts(1.0, (4, 8, 8), None, COL_INPUT_IDS, (16,), tokenizer.pad_token_id)
    _, from_ids_conditioning = text_conditioning(facts, tokenizer, encoder)
    empty = encode_captions(tokenizer, encoder, [""])[0]
    from_ids = tensor_batches(latents, ids, cfg, from_ids_conditioning)(0)
    from_embeddings = tensor_batches(latents, embeddings, cfg, empty)(0)
    dropped = 0
    for _ in range(6):  # three epochs of two batches
        (epoch_a, latents_a, text_a), (epoch_b, latents_b, text_b) = next(from_ids), next(from_embeddings)
        assert epoch_a == epoch_b and torch.equal(latents_a, latents_b)
        assert torch.allclose(text_a, text_b, atol=1e-6)
        dropped += int((text_a - empty).abs().amax(dim=(1, 2)).lt(1e-6).sum())
    assert 0 < dropped < 24


def test_the_loop_trains_on_ids_with_the_text_encoder_frozen():
    from ldm.testing import tiny_components
    from pipelines.train import train_loop

    parts = tiny_components(seed=0, text_len=16)
    tokenizer, encoder = parts["tokenizer"], parts["text_encoder"]
    before = {name: value.clone() for name, value in encoder.state_dict().items()}
    ids = torch.from_numpy(token_ids(tokenizer, [CAPTIONS[i % 4] for i in range(8)]))
    cfg = TrainConfig(
        unet=tiny_unet_config(), num_workers=1, batch_size=4, max_steps=3, max_minutes=None, warmup_steps=1
    )
    facts = LatentsFacts(1.0, (4, 8, 8), None, COL_INPUT_IDS, (16,), tokenizer.pad_token_id)
    facts, conditioning = text_conditioning(facts, tokenizer, encoder)
    latents = torch.randn(8, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    batches = tensor_batches(latents, ids, cfg, conditioning.to(torch.device("cpu")))
    state = train_loop(LoopInputs(cfg, facts), batches, LocalWorld(), [NanGuard()])
    assert state.step == 3 and math.isfinite(state.loss) and state.loss > 0
    assert all(param.grad is None for param in encoder.parameters())
    assert all(torch.equal(before[name], value) for name, value in encoder.state_dict().items())


@pytest.mark.slow
def test_ldm_train_on_ids_only_data_exports_a_pipeline_whose_prompts_encode_as_training_saw(
    tmp_path, ray_local
):
    from diffusers import StableDiffusionPipeline

    from ldm.pipeline import generate
    from pipelines.train import run_train

    work, _ = write_ids_only_workdir(tmp_path / "wd", rows=16)
    cfg = TrainConfig(
        workdir=str(work.root),
        unet=tiny_unet_config(),
        num_workers=2,
        batch_size=8,
        max_steps=3,
        max_minutes=None,
        warmup_steps=1,
        checkpoint_every=3,
        sample_every=3,
        sample_prompts=["a red circle"],
        sample_steps=2,
        run_name="ids",
    )
    summary = run_train(cfg)
    assert summary["steps"] == 3 and math.isfinite(summary["final_loss"])

    pipe = StableDiffusionPipeline.from_pretrained(
        summary["export"], local_files_only=True, use_safetensors=True
    )
    ids, caption = first_stored_row(work)
    at_inference, _ = pipe.encode_prompt(caption, "cpu", 1, False)
    in_training = encode_input_ids(pipe.text_encoder, ids, pipe.tokenizer.pad_token_id)
    assert torch.equal(at_inference, in_training)
    image = generate(pipe, caption, num_inference_steps=2, seed=1).images[0]
    assert image.size == (32, 32) and np.asarray(image).std() > 0
