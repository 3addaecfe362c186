"""``train_text_encoder``: the text encoder trains together with the U-Net, as one module.

``TextEncoderAndUNet`` holds both and takes the caption as token ids: ``ldm.diffusion``'s loss calls it
as it calls a U-Net, and the loop's other steps then need no second path. DDP wraps the pair (one
gradient all-reduce), one norm is clipped, one AdamW steps both, and the EMA copy is a copy of the
pair. Checkpoints keep the encoder beside the U-Net (``text_encoder/``, ``ema_text_encoder/``,
``pipelines/train/checkpoint.py``) and the export carries the EMA one, so that the served pipeline
encodes prompts with the encoder the U-Net learned to read.

This is what diffusers' DreamBooth scripts do with ``--train_text_encoder`` (one optimizer over both
models' parameters), except that the token embedding table stays frozen here: it is most of a CLIP
text model's weights (49,408 x width) and all-reduce bytes, and a caption moves only its own
words' rows. Position embeddings, the transformer layers and the final norm train. On the demo's
domain it did not pay at 2,400 steps (docs/TRAINING.md, "Experiments for issue 13, turn 20"); it is
for a user's encoder that the data should move, as DreamBooth's is.
"""

from __future__ import annotations

import copy
from typing import Any

import torch

from pipelines.train.conditioning import text_hidden_states


class TextEncoderAndUNet(torch.nn.Module):
    """A U-Net whose cross-attention context comes from a text encoder that trains with it."""

    def __init__(self, unet: Any, text_encoder: Any, pad_token_id: int):
        super().__init__()
        self.unet, self.text_encoder, self.pad_token_id = unet, text_encoder, pad_token_id

    def forward(
        self, sample: torch.Tensor, timestep: torch.Tensor, encoder_hidden_states: torch.Tensor
    ) -> Any:
        """The U-Net's output for token ids [B, L]: ``training_loss_terms`` hands the batch's text to
        any U-Net under diffusers' keyword, and here the text is ids, encoded with gradients."""
        text = text_hidden_states(self.text_encoder, encoder_hidden_states, self.pad_token_id)
        return self.unet(sample, timestep, encoder_hidden_states=text)


def with_trained_text_encoder(unet: Any, text_encoder: Any, pad_token_id: int) -> TextEncoderAndUNet:
    """The pair, with a copy of ``text_encoder`` (the driver's stays as it was) whose token embedding
    table is frozen and whose other weights train."""
    encoder = copy.deepcopy(text_encoder).float().train().requires_grad_(True)
    encoder.get_input_embeddings().requires_grad_(False)
    return TextEncoderAndUNet(unet, encoder, pad_token_id)


def split_pair(module: torch.nn.Module) -> tuple[Any, Any]:
    """(U-Net, trained text encoder or None) of what the loop trains."""
    if isinstance(module, TextEncoderAndUNet):
        return module.unet, module.text_encoder
    return module, None
