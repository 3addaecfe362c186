"""The model stages of the ingest job: callable classes for ``Dataset.map_batches``.

Each loads its model once in ``__init__`` (one load per actor) and transforms one numpy batch in
``__call__``. Resources (``batch_size``, ``concurrency``, ``num_gpus``) are declared where the job
calls ``map_batches`` (`pipelines.ingest`), not here. Both run on the GPU when the actor was given one.
"""

from __future__ import annotations

import numpy as np
import torch

from ldm.contract import (
    COL_CAPTION,
    COL_CLIP_SCORE,
    COL_HEIGHT,
    COL_INPUT_IDS,
    COL_KEY,
    COL_LATENT,
    COL_SHA256,
    COL_TEXT_EMBEDDING,
    COL_URL,
    COL_WIDTH,
    INPUT_IDS_DTYPE,
    LATENT_DTYPE,
    TEXT_EMBEDDING_DTYPE,
)
from ldm.text import encode_captions
from pipelines.filters import (
    COL_DETAIL,
    COL_IMAGE,
    COL_IMAGE_EMBEDDING,
    COL_REASON,
    COL_STAGE,
    REASON_LOW_CLIP,
    STAGE_SCORE,
)

# columns of an encoded row, in the order they are written to latents/
LATENT_ROW_COLUMNS = (
    COL_KEY,
    COL_URL,
    COL_CAPTION,
    COL_CLIP_SCORE,
    COL_WIDTH,
    COL_HEIGHT,
    COL_SHA256,
    COL_LATENT,
    COL_TEXT_EMBEDDING,
)


def _device(use_gpu: bool, torch_threads: int) -> str:
    torch.set_num_threads(torch_threads)  # actors share the node's cores with each other and with Data tasks
    if use_gpu and not torch.cuda.is_available():
        raise RuntimeError("this stage was given a GPU (num_gpus > 0) but torch sees no CUDA device")
    return "cuda" if use_gpu else "cpu"


class ClipScorer:
    """Adds ``clip_score`` (cosine similarity, float32) and ``image_embedding`` (float32 [E]).

    With a ``threshold`` it also rejects pairs below it. The ingest job passes none (through
    `ScoreEncoder`): its cut may be a top fraction of all scores and near-duplicates need every
    embedding, so it judges the scores in pass 2 (`pipelines.ingest_judge`).
    """

    def __init__(
        self, spec: str, threshold: float | None = None, use_gpu: bool = False, torch_threads: int = 1
    ):
        from ldm.first_stage.clip import load_clip

        self.device = _device(use_gpu, torch_threads)
        self.bundle = load_clip(spec, device=self.device)
        self.threshold = threshold
        self.embed_dim = int(self.bundle.model_cfg["embed_dim"])

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        from ldm.first_stage.clip import clip_features

        if len(batch[COL_KEY]) == 0:  # Ray may hand over an empty block once every row was rejected
            batch[COL_CLIP_SCORE] = np.zeros(0, dtype=np.float32)
            batch[COL_IMAGE_EMBEDDING] = np.zeros((0, self.embed_dim), dtype=np.float32)
            return batch
        image_features, text_features = clip_features(
            self.bundle, batch[COL_IMAGE], [str(c) for c in batch[COL_CAPTION]]
        )
        scores = (image_features * text_features).sum(-1).numpy().astype(np.float32)
        batch[COL_CLIP_SCORE] = scores
        batch[COL_IMAGE_EMBEDDING] = image_features.numpy().astype(np.float32)
        if self.threshold is None:
            return batch
        low = scores < self.threshold
        batch[COL_REASON] = np.where(low, REASON_LOW_CLIP, batch[COL_REASON]).astype(object)
        batch[COL_STAGE] = np.where(low, STAGE_SCORE, batch[COL_STAGE]).astype(object)
        details = [f"clip score {s:.4f} < {self.threshold}" for s in scores]
        batch[COL_DETAIL] = np.where(low, np.array(details, dtype=object), batch[COL_DETAIL]).astype(object)
        return batch


class LatentEncoder:
    """Adds ``latent`` (fp16 [C, H, W], the autoencoder's unscaled posterior mean) and
    ``text_embedding`` (fp16 [L, D], `ldm.text.encode_captions`) and/or ``input_ids`` (int32 [L], the
    same tokenizer call); drops the pixels and keeps the ``carried`` input columns."""

    def __init__(
        self,
        autoencoder_spec: str,
        text_encoder_spec: str,
        use_gpu: bool = False,
        torch_threads: int = 1,
        store_text_embeddings: bool = True,
        store_input_ids: bool = False,
        carried: list[str] | tuple[str, ...] = (),
    ):
        from ldm.first_stage.autoencoder import load_autoencoder
        from ldm.first_stage.text_encoder import load_text_encoder

        self.device = _device(use_gpu, torch_threads)
        self.vae = load_autoencoder(autoencoder_spec, device=self.device)
        self.tokenizer, self.text_encoder = load_text_encoder(text_encoder_spec, device=self.device)
        self.store_text_embeddings, self.store_input_ids = store_text_embeddings, store_input_ids
        self.carried = tuple(carried)

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        from ldm.first_stage.autoencoder import encode_images

        if len(batch[COL_KEY]) == 0:
            latents, text = self._empty_outputs(batch[COL_IMAGE].shape[1])
        else:
            latents = encode_images(self.vae, batch[COL_IMAGE]).numpy()  # [N, C, H, W] float32
            captions = [str(c) for c in batch[COL_CAPTION]]
            text = (
                encode_captions(self.tokenizer, self.text_encoder, captions, device=self.device).cpu().numpy()
            )
        # fp16 tops out at 65504: a latent beyond it would be stored as inf and poison training
        for name, values in ((COL_LATENT, latents), (COL_TEXT_EMBEDDING, text)):
            if not np.isfinite(values).all() or np.abs(values).max(initial=0.0) > np.finfo(np.float16).max:
                raise ValueError(
                    f"{name} values are not finite in float16 (keys {list(batch[COL_KEY][:3])}...)"
                )
        out = {name: batch[name] for name in (*LATENT_ROW_COLUMNS[:7], *self.carried)}
        out[COL_LATENT] = latents.astype(LATENT_DTYPE)
        if self.store_text_embeddings:
            out[COL_TEXT_EMBEDDING] = text.astype(TEXT_EMBEDDING_DTYPE)
        if self.store_input_ids:
            out[COL_INPUT_IDS] = self._input_ids([str(c) for c in batch[COL_CAPTION]])
        return out

    def _input_ids(self, captions: list[str]) -> np.ndarray:
        """int32 [N, L]: the tokenizer call `ldm.text.encode_captions` makes, so ids and embeddings agree."""
        length = self.tokenizer.model_max_length
        if not captions:
            return np.zeros((0, length), dtype=INPUT_IDS_DTYPE)
        tokens = self.tokenizer(captions, padding="max_length", max_length=length, truncation=True)
        return np.asarray(tokens["input_ids"], dtype=INPUT_IDS_DTYPE)

    def _empty_outputs(self, image_size: int) -> tuple[np.ndarray, np.ndarray]:
        """Zero-row latents and text embeddings of the right shapes (an empty block keeps its schema)."""
        config = self.vae.config
        side = image_size // 2 ** (len(config.block_out_channels) - 1)
        latents = np.zeros((0, config.latent_channels, side, side), dtype=np.float32)
        text = np.zeros(
            (0, self.tokenizer.model_max_length, self.text_encoder.config.hidden_size), np.float32
        )
        return latents, text


# columns of the streaming plan (`pipelines.ingest_stream`) that never reach latents/ or rejects/
COL_SHARD = "ldm_shard"  # int64: the input shard a row came from
COL_NOTE = "ldm_note"  # "" on a row; a JSON summary on the one marker row each input shard sends


class ScoreEncoder:
    """CLIP score, image embedding, latent and caption encoding in one actor (pixels die here).

    One model stage instead of two: the images are dropped as soon as both models saw them, and one
    actor start-up is paid instead of two. Rows whose ``ldm_note`` is set are the shards' marker rows
    (`pipelines.ingest_stream`): they pass through, with zeros in the computed columns. Returns key,
    sha256, ``ldm_shard``, ``ldm_note``, clip_score, image_embedding, latent, and text_embedding and/or
    input_ids as configured.
    """

    def __init__(
        self,
        clip_spec: str,
        autoencoder_spec: str,
        text_encoder_spec: str,
        use_gpu: bool = False,
        torch_threads: int = 1,
        store_text_embeddings: bool = True,
        store_input_ids: bool = False,
    ):
        self.scorer = ClipScorer(clip_spec, None, use_gpu, torch_threads)
        self.encoder = LatentEncoder(
            autoencoder_spec,
            text_encoder_spec,
            use_gpu,
            torch_threads,
            store_text_embeddings,
            store_input_ids,
        )
        self.computed: tuple[str, ...] = (COL_CLIP_SCORE, COL_IMAGE_EMBEDDING, COL_LATENT)
        self.computed += (COL_TEXT_EMBEDDING,) if store_text_embeddings else ()
        self.computed += (COL_INPUT_IDS,) if store_input_ids else ()

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        real = np.array([not note for note in batch[COL_NOTE]], dtype=bool)
        rows = {name: values[real] for name, values in batch.items()}
        n = int(real.sum())
        scored = self.scorer(
            {COL_KEY: rows[COL_KEY], COL_IMAGE: rows[COL_IMAGE], COL_CAPTION: rows[COL_CAPTION]}
        )
        blank = {name: np.zeros(n, dtype=object) for name in (COL_URL, COL_SHA256)}
        blank |= {name: np.zeros(n, dtype=np.int32) for name in (COL_WIDTH, COL_HEIGHT)}
        encoded = self.encoder(
            blank
            | {COL_KEY: rows[COL_KEY], COL_CAPTION: rows[COL_CAPTION], COL_IMAGE: rows[COL_IMAGE]}
            | {COL_CLIP_SCORE: scored[COL_CLIP_SCORE]}
        )
        out = {name: rows[name] for name in (COL_KEY, COL_SHA256, COL_SHARD, COL_NOTE)}
        out |= {name: scored[name] if name in scored else encoded[name] for name in self.computed}
        markers = ~real
        return {
            name: np.concatenate(
                [values, batch[name][markers] if name in batch else _zeros_like(values, int(markers.sum()))]
            )
            for name, values in out.items()
        }


def _zeros_like(values: np.ndarray, rows: int) -> np.ndarray:
    return np.zeros((rows, *values.shape[1:]), dtype=values.dtype)
