"""The text encoder that conditions the U-Net: the trained CLIP's text tower as a transformers ``CLIPTextModel``.

diffusers' StableDiffusionPipeline runs a transformers ``CLIPTextModel`` with a ``CLIPTokenizer``, while
the scorer is an open_clip model. Rather than train a second text model, the open_clip text tower is
copied weight for weight into a ``CLIPTextModel`` (same architecture: pre-LayerNorm causal transformer
with learned positions), so the conditioning and the scorer share one trained text understanding.
The U-Net's copy may keep only the tower's first layers (``BootstrapConfig.text_encoder_layers``).

On disk it is the Stable Diffusion layout: a models folder holding ``text_encoder/`` and ``tokenizer/``.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

import torch
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

from ldm.first_stage.tokenizer import CLIP_VOCAB_SIZE, build_clip_tokenizer
from ldm.storage import materialize

if TYPE_CHECKING:  # for the annotations only: at run time this module never imports open_clip
    from open_clip.model import CLIP

EOS_TOKEN_ID = 49407  # <|endoftext|> in open_clip's BPE vocabulary
BOS_TOKEN_ID = 49406
TEXT_ENCODER_DIR = "text_encoder"
TOKENIZER_DIR = "tokenizer"


def _text_tower_config(clip_model: CLIP, num_layers: int | None = None) -> CLIPTextConfig:
    """The CLIPTextConfig matching an open_clip CLIP's (built-in, non-HF) text tower, or its first
    ``num_layers`` transformer layers."""
    if not hasattr(clip_model, "token_embedding") or not hasattr(clip_model, "transformer"):
        raise ValueError("expected an open_clip CLIP with its built-in text tower (not a CustomTextCLIP)")
    if getattr(clip_model, "text_pool_type", "argmax") != "argmax":
        raise ValueError(f"text pooling {clip_model.text_pool_type!r} has no CLIPTextModel equivalent")
    block = clip_model.transformer.resblocks[0]
    if not isinstance(block.ls_1, torch.nn.Identity):
        raise ValueError("text towers with layer scale have no CLIPTextModel equivalent")
    layers = len(clip_model.transformer.resblocks)
    if num_layers is not None and not 0 <= num_layers <= layers:
        raise ValueError(f"num_layers={num_layers}: the text tower has {layers} transformer layers")
    vocab_size, width = clip_model.token_embedding.weight.shape
    if vocab_size != CLIP_VOCAB_SIZE:
        raise ValueError(f"text tower vocabulary is {vocab_size}, the CLIP tokenizer needs {CLIP_VOCAB_SIZE}")
    # open_clip's default activation is exact GELU; only *-quickgelu models use QuickGELU
    act = block.mlp.gelu
    hidden_act = "quick_gelu" if type(act).__name__ == "QuickGELU" else "gelu"
    if hidden_act == "gelu" and not isinstance(act, torch.nn.GELU):
        raise ValueError(f"unsupported text-tower activation {type(act).__name__}")
    return CLIPTextConfig(
        vocab_size=vocab_size,
        hidden_size=width,
        intermediate_size=block.mlp.c_fc.out_features,
        num_hidden_layers=layers if num_layers is None else num_layers,
        num_attention_heads=block.attn.num_heads,
        max_position_embeddings=clip_model.positional_embedding.shape[0],
        hidden_act=hidden_act,
        layer_norm_eps=clip_model.ln_final.eps,
        projection_dim=clip_model.text_projection.shape[1],
        bos_token_id=BOS_TOKEN_ID,
        eos_token_id=EOS_TOKEN_ID,
        pad_token_id=EOS_TOKEN_ID,  # the tokenizer pads with <|endoftext|> (Stable Diffusion's convention)
    )


def clip_text_tower_to_transformers(clip_model: CLIP, num_layers: int | None = None) -> CLIPTextModel:
    """Copy an open_clip CLIP's text tower into an equivalent transformers CLIPTextModel (eval mode).

    Hidden states agree with open_clip's up to and including the end-of-text token (positions after it
    differ only by what the two tokenizers pad with). The text projection is not part of CLIPTextModel.

    ``num_layers`` keeps only the first transformer layers (then the final LayerNorm, as in the whole
    tower); 0 keeps the token and position embeddings alone. Why a shallower tower can condition a
    U-Net better than the whole one: ``BootstrapConfig.text_encoder_layers``.
    """
    config = _text_tower_config(clip_model, num_layers)
    source = {key: value.detach().cpu() for key, value in clip_model.state_dict().items()}
    state = {
        "embeddings.token_embedding.weight": source["token_embedding.weight"],
        "embeddings.position_embedding.weight": source["positional_embedding"],
        "final_layer_norm.weight": source["ln_final.weight"],
        "final_layer_norm.bias": source["ln_final.bias"],
    }
    for i in range(config.num_hidden_layers):
        src, dst = f"transformer.resblocks.{i}.", f"encoder.layers.{i}."
        # nn.MultiheadAttention keeps query, key and value stacked in one in_proj matrix
        query_w, key_w, value_w = source[src + "attn.in_proj_weight"].chunk(3, dim=0)
        query_b, key_b, value_b = source[src + "attn.in_proj_bias"].chunk(3, dim=0)
        state |= {
            dst + "self_attn.q_proj.weight": query_w,
            dst + "self_attn.q_proj.bias": query_b,
            dst + "self_attn.k_proj.weight": key_w,
            dst + "self_attn.k_proj.bias": key_b,
            dst + "self_attn.v_proj.weight": value_w,
            dst + "self_attn.v_proj.bias": value_b,
            dst + "self_attn.out_proj.weight": source[src + "attn.out_proj.weight"],
            dst + "self_attn.out_proj.bias": source[src + "attn.out_proj.bias"],
            dst + "layer_norm1.weight": source[src + "ln_1.weight"],
            dst + "layer_norm1.bias": source[src + "ln_1.bias"],
            dst + "layer_norm2.weight": source[src + "ln_2.weight"],
            dst + "layer_norm2.bias": source[src + "ln_2.bias"],
            dst + "mlp.fc1.weight": source[src + "mlp.c_fc.weight"],
            dst + "mlp.fc1.bias": source[src + "mlp.c_fc.bias"],
            dst + "mlp.fc2.weight": source[src + "mlp.c_proj.weight"],
            dst + "mlp.fc2.bias": source[src + "mlp.c_proj.bias"],
        }
    model = CLIPTextModel(config)
    missing, unexpected = model.load_state_dict({k: v.clone() for k, v in state.items()}, strict=False)
    missing = [key for key in missing if not key.endswith("position_ids")]  # a buffer, not a weight
    if missing or unexpected:
        raise RuntimeError(f"text tower conversion left missing={missing} unexpected={unexpected}")
    return model.eval()


def build_text_tokenizer(clip_model: CLIP) -> CLIPTokenizer:
    """The CLIPTokenizer (open_clip's ids, padding with end-of-text) for this CLIP's context length."""
    return build_clip_tokenizer(model_max_length=clip_model.positional_embedding.shape[0])


def save_text_encoder(tokenizer: CLIPTokenizer, model: CLIPTextModel, models_dir: str | Path) -> Path:
    """Write ``models_dir/text_encoder`` (safetensors) and ``models_dir/tokenizer``; returns models_dir."""
    models_dir = Path(models_dir)
    model.save_pretrained(str(models_dir / TEXT_ENCODER_DIR), safe_serialization=True)
    tokenizer.save_pretrained(str(models_dir / TOKENIZER_DIR))
    return models_dir


def load_text_encoder(spec: str, device: str | torch.device = "cpu") -> tuple[CLIPTokenizer, CLIPTextModel]:
    """(tokenizer, text encoder in eval mode) from a folder holding ``text_encoder/`` and ``tokenizer/``.

    That is both the bootstrap models folder and the Stable Diffusion layout; local or ``s3://``.
    """
    folder = materialize(str(spec))
    for sub in (TEXT_ENCODER_DIR, TOKENIZER_DIR):
        if not (folder / sub).is_dir():
            raise FileNotFoundError(
                f"{spec} holds no {sub}/ folder (expected {TEXT_ENCODER_DIR}/ and {TOKENIZER_DIR}/)"
            )
    tokenizer = CLIPTokenizer.from_pretrained(str(folder / TOKENIZER_DIR), local_files_only=True)
    model = CLIPTextModel.from_pretrained(str(folder / TEXT_ENCODER_DIR), local_files_only=True)
    return tokenizer, model.to(device).eval()


@torch.no_grad()
def max_hidden_state_difference(clip_model: CLIP, text_encoder: CLIPTextModel, captions: list[str]) -> float:
    """Largest |difference| between open_clip's and the CLIPTextModel's final hidden states, up to EOS.

    Both get the same ids (the CLIPTokenizer's, padded with end-of-text); positions after the first
    end-of-text are excluded because open_clip's own tokenizer pads with 0 there.
    """
    tokenizer = build_text_tokenizer(clip_model)
    ids = tokenizer(list(captions), padding="max_length", truncation=True, return_tensors="pt").input_ids
    x = clip_model.token_embedding(ids) + clip_model.positional_embedding  # open_clip's encode_text, unpooled
    layers = text_encoder.config.num_hidden_layers  # the converted model may keep only the first layers
    if layers:
        _, (x,) = clip_model.transformer.forward_intermediates(
            x, attn_mask=clip_model.attn_mask, indices=[layers - 1], stop_early=True
        )
    x = clip_model.ln_final(x)
    y = text_encoder(ids.to(text_encoder.device)).last_hidden_state.cpu()
    first_eos = (ids == EOS_TOKEN_ID).int().argmax(dim=1)
    upto_eos = torch.arange(ids.shape[1])[None, :] <= first_eos[:, None]  # [N, L]
    return float((x - y).abs().amax(dim=-1)[upto_eos].max())
