"""The U-Net's text conditioning from what ``latents/`` stores: a text embedding, or only token ids.

Ingest stores a caption as its text embedding (``text_embedding``, [L, D]), its token ids
(``input_ids``, [L]), or both (``docs/DATA.md``, "Text conditioning"). Training reads the embedding
when it is there and the run's text encoder reproduces it; otherwise, with ids (only ids, or an
encoder other than ingest's), each worker holds the run's frozen text encoder and encodes every
micro-batch as it is made, without gradients, the way ``ldm.text.encode_captions`` (and so the
exported pipeline at inference) encodes the caption: no attention mask unless the encoder's config
asks for one, the last hidden state. Caption dropout swaps in the empty caption, before encoding
for ids (its ids) and as its embedding otherwise: both give the pipeline's unconditional input.
"""

from __future__ import annotations

import dataclasses
import warnings
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch

from ldm.contract import COL_INPUT_IDS, COL_TEXT_EMBEDDING
from ldm.errors import DataError
from ldm.text import encode_captions
from pipelines.train.recipe import caption_dropout

if TYPE_CHECKING:  # data.py imports this module
    from pipelines.train.data import LatentsFacts

# Largest difference, relative to the stored embedding's largest magnitude, between a stored embedding
# and the run's encoding of its caption that still counts as the same encoder: float16 storage rounds
# by ~0.1%, an encoder run on a GPU in half precision by more; another encoder differs by ~100%.
STORED_EMBEDDING_TOLERANCE = 0.05


@dataclass(frozen=True)
class StoredEmbeddings:
    """The stored ``text_embedding`` column is the conditioning."""

    empty_embedding: torch.Tensor  # [L, D], the empty prompt as the pipeline encodes it

    column = COL_TEXT_EMBEDDING
    dtype = torch.float32

    def to(self, device: torch.device) -> StoredEmbeddings:
        return StoredEmbeddings(self.empty_embedding.to(device))

    def __call__(self, stored: torch.Tensor, p: float, generator: torch.Generator) -> torch.Tensor:
        """[B, L, D] with caption dropout."""
        return caption_dropout(stored, self.empty_embedding, p, generator)


@dataclass(frozen=True)
class EncodedIds:
    """The stored ``input_ids`` column, encoded in the step by the run's frozen text encoder."""

    text_encoder: Any  # transformers' CLIPTextModel (the run's, frozen)
    empty_ids: torch.Tensor  # [L] int64, the empty caption's ids (the tokenizer's own padding)
    pad_token_id: int

    column = COL_INPUT_IDS
    dtype = torch.int64

    def to(self, device: torch.device) -> EncodedIds:
        encoder = self.text_encoder.to(device).eval().requires_grad_(False)
        return EncodedIds(encoder, self.empty_ids.to(device), self.pad_token_id)

    def __call__(self, stored: torch.Tensor, p: float, generator: torch.Generator) -> torch.Tensor:
        """[B, L, D] with caption dropout (the same draw as ``StoredEmbeddings``: one per row)."""
        # caption_dropout swaps rows of a [B, L, D] tensor: the ids ride in it as [B, L, 1].
        ids = caption_dropout(stored[:, :, None], self.empty_ids[:, None], p, generator)[:, :, 0]
        return encode_input_ids(self.text_encoder, ids, self.pad_token_id)


@dataclass(frozen=True)
class TrainedIds:
    """The stored ``input_ids`` column, handed to the step as ids: with ``train_text_encoder`` the text
    encoder trains, so the model encodes them itself (``pipelines/train/joint.py``)."""

    text_encoder: Any  # where the trained encoder starts: the run's (the one ingest's ids are for)
    empty_ids: torch.Tensor  # [L] int64
    pad_token_id: int

    column = COL_INPUT_IDS
    dtype = torch.int64

    def to(self, device: torch.device) -> TrainedIds:
        return TrainedIds(self.text_encoder, self.empty_ids.to(device), self.pad_token_id)

    def __call__(self, stored: torch.Tensor, p: float, generator: torch.Generator) -> torch.Tensor:
        """[B, L] int64 with caption dropout (the draw of ``EncodedIds``)."""
        return caption_dropout(stored[:, :, None], self.empty_ids[:, None], p, generator)[:, :, 0]


TextConditioning = StoredEmbeddings | EncodedIds | TrainedIds


def text_conditioning(
    facts: LatentsFacts, tokenizer: Any, text_encoder: Any, *, train: bool = False
) -> tuple[LatentsFacts, TextConditioning]:
    """The facts with the conditioning's shape [L, D] known, and how the step makes it, for the run's
    tokenizer and text encoder: the ones the exported pipeline encodes prompts with. ``train``
    (``train_text_encoder``): the step gets the stored ids, whatever else the data holds."""
    empty_embedding = encode_captions(tokenizer, text_encoder, [""])[0].detach().float().cpu()  # [L, D]
    shape = (int(empty_embedding.shape[0]), int(empty_embedding.shape[1]))
    if train and facts.input_ids_shape is None:
        raise DataError(
            "train_text_encoder reads the captions' token ids, and this data holds text embeddings "
            "only: ingest again with `store_input_ids: true`"
        )
    if facts.text_column == COL_TEXT_EMBEDDING and not train:
        mismatch = _stored_embedding_mismatch(facts, shape, tokenizer, text_encoder)
        if mismatch is None:
            return facts, StoredEmbeddings(empty_embedding)
        if facts.input_ids_shape is None:
            raise DataError(f"{mismatch}: train with the text encoder that ingest used")
        # The data's ids name the words: the run's encoder encodes them, as the exported pipeline will.
        warnings.warn(
            f"{mismatch}: encoding the stored token ids with this run's encoder instead", stacklevel=2
        )
    # Token ids only: any text encoder of the same tokenizer will do (the ids name the words); the
    # exported pipeline carries this one, so training conditions on what inference computes.
    length, pad = int(tokenizer.model_max_length), int(tokenizer.pad_token_id)
    if facts.input_ids_shape != (length,) or facts.pad_token_id != pad:
        raise DataError(
            f"the data's token ids (length {facts.input_ids_shape}, pad id {facts.pad_token_id}, made by "
            f"{facts.text_encoder}) do not match this run's tokenizer (length {length}, pad id {pad}): "
            "train with the tokenizer that ingest used (`text_encoder`)"
        )
    empty_ids = tokenizer([""], padding="max_length", max_length=length, truncation=True, return_tensors="pt")
    kind = TrainedIds if train else EncodedIds
    conditioning = kind(text_encoder, empty_ids.input_ids[0].long(), pad)
    return dataclasses.replace(facts, text_embedding_shape=shape, text_column=COL_INPUT_IDS), conditioning


def _stored_embedding_mismatch(
    facts: LatentsFacts, shape: tuple[int, int], tokenizer: Any, text_encoder: Any
) -> str | None:
    """Why the stored embeddings are not what this run's text encoder computes, or None when they are.

    The shape alone does not tell two encoders of one width apart (a bootstrap encoder and a
    parse-trained one; SD 1.5's CLIP and a fine-tuned copy): the first stored caption is encoded
    again and compared with its stored embedding, which Parquet keeps in float16.
    """
    if shape != facts.text_embedding_shape:
        return f"the text encoder gives embeddings of shape {shape} but the data holds {facts.text_embedding_shape}"
    if facts.probe is None:
        return None
    caption, stored = facts.probe
    encoded = encode_captions(tokenizer, text_encoder, [caption])[0].detach().float().cpu()
    difference = float((encoded - stored).abs().max())
    if difference > STORED_EMBEDDING_TOLERANCE * max(1.0, float(stored.abs().max())):
        return (
            f"the stored embedding of {caption!r} differs from this run's text encoder's by up to "
            f"{difference:.3g}: ingest used another encoder ({facts.text_encoder})"
        )
    return None


@torch.no_grad()
def encode_input_ids(text_encoder: Any, input_ids: torch.Tensor, pad_token_id: int) -> torch.Tensor:
    """``text_hidden_states`` without gradients: what a frozen encoder gives the step."""
    return text_hidden_states(text_encoder, input_ids, pad_token_id)


def text_hidden_states(text_encoder: Any, input_ids: torch.Tensor, pad_token_id: int) -> torch.Tensor:
    """[B, L, D] float32: ``ldm.text.encode_captions`` from ids the tokenizer already made.

    The pipeline passes an attention mask only when ``text_encoder.config.use_attention_mask`` is set
    (CLIP's is not). The tokenizer's mask is not stored, so it is rebuilt here: every position before
    the trailing run of pad ids, plus the first of that run when the pad id is also end-of-text (CLIP
    pads with its end-of-text token, which is part of the caption).
    """
    attention_mask = None
    if getattr(text_encoder.config, "use_attention_mask", False):
        length = input_ids.shape[1]
        is_pad = (input_ids == pad_token_id).int()
        trailing = is_pad.flip(1).cumprod(1).sum(1)  # [B] pads at the end
        if pad_token_id == getattr(text_encoder.config, "eos_token_id", None):
            trailing = (trailing - 1).clamp(min=0)
        positions = torch.arange(length, device=input_ids.device)
        attention_mask = (positions[None, :] < (length - trailing)[:, None]).long()
    output = text_encoder(input_ids.long(), attention_mask=attention_mask)
    return output[0].float()
