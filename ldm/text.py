"""Caption -> text conditioning, done exactly the way diffusers' StableDiffusionPipeline does it.

Ingest pre-encodes captions with this function and training swaps in `encode_captions([""])` for
caption dropout, so the embeddings the U-Net learns from are the ones the pipeline produces at
inference: padding to ``tokenizer.model_max_length`` with the tokenizer's pad token, truncation, no
attention mask (the pipeline only passes one when ``text_encoder.config.use_attention_mask`` is set),
and the last hidden state.
"""

from __future__ import annotations

import torch


@torch.no_grad()
def encode_captions(
    tokenizer, text_encoder, captions: list[str], device: str | torch.device = "cpu"
) -> torch.Tensor:
    """Return the text encoder's last hidden state, [N, L, D] float32, L = tokenizer.model_max_length."""
    tokens = tokenizer(
        list(captions),
        padding="max_length",
        max_length=tokenizer.model_max_length,
        truncation=True,
        return_tensors="pt",
    )
    attention_mask = None
    if getattr(text_encoder.config, "use_attention_mask", False):
        attention_mask = tokens.attention_mask.to(device)
    output = text_encoder(tokens.input_ids.to(device), attention_mask=attention_mask)
    return output[0].float()
