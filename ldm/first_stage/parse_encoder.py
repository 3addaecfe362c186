"""A text encoder for the synthetic grammar: transformer layers on the CLIP's word embeddings, trained
so that the words that speak of an object say what that object is.

Why (docs/TRAINING.md, turns 15, 20 and 21): the U-Net draws what its cross-attention reads. The
CLIP's text tower was trained only through its end-of-text token, so its other outputs lose the
words ("a red circle" and "a red square" at cosine 0.99); the demo therefore reads the embeddings
alone, where every word keeps its vector but no token says which colour goes with which shape, how
many there are, or where. Training layers with the diffusion loss instead memorises the training
captions. Here the layers learn the caption's parse: from each object's shape word on, the words
that speak of it are asked for that object's shape, colour, size, count, place and relation to the
other object, by one linear head per attribute (`word_labels` says which word is asked what). The
result is still a transformers ``CLIPTextModel`` with the CLIP's tokenizer, saved where the
bootstrap saves its text encoder, so ingest, training, export and serving read it as any other.

The labels come from the grammar (`ldm.synth.grammar.parse_caption` of the caption); the captions are
the ones the source can emit, never the held-out ones, which measure how well the parse generalises.
This module is specific to the synthetic grammar, the way the bootstrap's CLIP is: a user's own data
comes with a pretrained text encoder instead.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from transformers import CLIPTextModel

from ldm.config.bootstrap import ParseEncoderConfig
from ldm.optim import adamw
from ldm.synth.grammar import (
    CATEGORIES,
    COLORS,
    POSITIONS,
    RELATIONS,
    SHAPES,
    SIZES,
    PromptSpec,
    all_captions,
    format_caption,
    is_heldout,
    parse_caption,
)

IGNORE = -100  # what a token is not asked (start, end, padding, and the words of `word_labels`)
# What each word of an object is asked for: the values of each attribute, None where the caption
# leaves it open ("a circle and a square" names no colours; only an absolute-position caption names
# a place).
ATTRIBUTES: dict[str, tuple[Any, ...]] = {
    "shape": SHAPES,
    "color": (None, *COLORS),
    "size": (None, *SIZES),
    "count": (1, 2, 3),
    "position": (None, *POSITIONS),
    "relation": (None, *RELATIONS),
}
_INVERSE = {"left of": "right of", "right of": "left of", "above": "below", "below": "above"}
_RELATION_WORDS = frozenset(("left", "right", "above", "below"))  # the word that decides a relation


def word_labels(spec: PromptSpec) -> list[list[int]]:
    """Per word of the caption, the class index of every attribute (``ATTRIBUTES`` order) or IGNORE.

    The encoder is a CLIP text transformer, whose attention is causal: a word sees only the words
    before it. So an object's attributes are asked of the words from its shape word (the end of its
    noun phrase: "a small red *circle*") to the end of what speaks of it; the connector of a relation
    and the place belong to the first object, the subject. Its relation is asked only from the
    relation word on ("to the *left* of"), its place only at the place's last word ("top *left*"):
    before them a word cannot know what follows. The other words ("a", "small", "red", "and") are
    asked nothing, and neither is a relation or place that no word has said yet.
    """
    words = format_caption(spec).split()
    first = len(format_caption(PromptSpec(spec.category, spec.objects[:1])).split())
    second = (
        len(format_caption(PromptSpec(spec.category, spec.objects[1:])).split()) if spec.objects[1:] else 0
    )
    relation_at = next((i for i in range(first, len(words)) if words[i] in _RELATION_WORDS), len(words))
    out = [[IGNORE] * len(ATTRIBUTES) for _ in words]
    end = len(words) - second if spec.relation or spec.position else first
    for i in range(first - 1, end):
        known = {"relation": spec.relation is not None and i >= relation_at,
                 "position": spec.position is not None and i == len(words) - 1}  # fmt: skip
        out[i] = _asked(object_labels(spec, 0), known)
    if second:  # its shape word ends the caption: the relation (or "and": none) is already said
        out[-1] = _asked(object_labels(spec, 1), {"relation": True, "position": False})
    return out


def _asked(labels: list[int], known: dict[str, bool]) -> list[int]:
    return [
        value if known.get(name, True) else IGNORE for name, value in zip(ATTRIBUTES, labels, strict=True)
    ]


def object_labels(spec: PromptSpec, index: int) -> list[int]:
    """The class index of every attribute of ``spec.objects[index]``, in ``ATTRIBUTES`` order."""
    obj = spec.objects[index]
    relation = spec.relation if index == 0 or spec.relation is None else _INVERSE[spec.relation]
    values = {
        "shape": obj.shape,
        "color": obj.color,
        "size": obj.size,
        "count": obj.count,
        "position": spec.position if index == 0 else None,
        "relation": relation,
    }
    return [ATTRIBUTES[name].index(values[name]) for name in ATTRIBUTES]


def token_labels(captions: list[str], tokenizer: Any) -> tuple[torch.Tensor, torch.Tensor]:
    """(token ids [N, L], labels [N, L, len(ATTRIBUTES)]) of captions of the grammar.

    Each word is tokenized alone to know how many tokens it takes ("cyan" and "triangles" take two);
    CLIP's BPE never merges across spaces, so the words' tokens are the caption's (checked).
    """
    length = int(tokenizer.model_max_length)
    ids = tokenizer(captions, padding="max_length", max_length=length, truncation=True, return_tensors="pt")
    labels = torch.full((len(captions), length, len(ATTRIBUTES)), IGNORE, dtype=torch.long)
    for row, caption in enumerate(captions):
        position = 1  # after the start token
        for word, word_label in zip(caption.split(), word_labels(parse_caption(caption)), strict=True):
            pieces = tokenizer(word, add_special_tokens=False).input_ids
            if ids.input_ids[row, position : position + len(pieces)].tolist() != pieces:
                raise ValueError(f"caption {caption!r} does not tokenize word by word at {word!r}")
            labels[row, position : position + len(pieces)] = torch.tensor(word_label)
            position += len(pieces)
    return ids.input_ids, labels


class ParseHeads(torch.nn.Module):
    """One linear classifier per attribute on every token's output; the sum of their cross-entropies."""

    def __init__(self, width: int) -> None:
        super().__init__()
        self.heads = torch.nn.ModuleList(torch.nn.Linear(width, len(v)) for v in ATTRIBUTES.values())

    def forward(self, hidden: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(loss, correct [N, L, A] bool) for hidden [N, L, D] and labels [N, L, A]."""
        loss, correct = hidden.new_zeros(()), []
        for a, head in enumerate(self.heads):
            logits = head(hidden)
            loss = loss + F.cross_entropy(logits.flatten(0, 1), labels[..., a].flatten(), ignore_index=IGNORE)
            correct.append(logits.argmax(-1) == labels[..., a])
        return loss, torch.stack(correct, dim=-1)


def build_parse_encoder(embeddings: CLIPTextModel, layers: int) -> CLIPTextModel:
    """A CLIPTextModel with ``embeddings``' token and position embeddings and final LayerNorm, and
    ``layers`` new transformer layers of its width (randomly initialised)."""
    config = embeddings.config.to_dict()
    config["num_hidden_layers"] = layers
    model = CLIPTextModel(type(embeddings.config).from_dict(config))
    kept = {k: v for k, v in embeddings.state_dict().items() if not k.startswith("encoder.layers.")}
    missing, unexpected = model.load_state_dict(kept, strict=False)
    if unexpected or any(not k.startswith("encoder.layers.") for k in missing):
        raise RuntimeError(f"parse encoder: missing={missing} unexpected={unexpected}")
    return model


def training_captions() -> tuple[list[str], np.ndarray]:
    """Every caption the source can emit (never a held-out one), and the probability of drawing each:
    the source's mix, uniform over the categories, half of position's absolute and half relative."""
    groups: dict[str, list[str]] = {}
    for category, of_category in all_captions().items():
        for caption in of_category:
            if not is_heldout(caption):
                kind = category
                if category == "position":
                    kind += " absolute" if " in the " in caption else " relative"
                groups.setdefault(kind, []).append(caption)
    share = {kind: (0.5 if kind.startswith("position") else 1.0) / len(CATEGORIES) for kind in groups}
    captions = [c for group in groups.values() for c in group]
    weights = np.asarray([share[kind] / len(group) for kind, group in groups.items() for _ in group])
    return captions, weights / weights.sum()


def kept_words_loss(
    hidden: torch.Tensor, embeddings: CLIPTextModel, ids: torch.Tensor, labels: torch.Tensor
) -> torch.Tensor:
    """Mean squared distance, over the tokens asked nothing, between the layers' outputs and what the
    embeddings alone give them: those words ("a", "red", "top", "and", the padding) stay what the
    U-Net reads in the demo's embeddings-only encoder, and the parse is written into the asked ones."""
    with torch.no_grad():
        before = embeddings(ids).last_hidden_state
    unasked = (labels == IGNORE).all(dim=-1)  # [N, L]
    return F.mse_loss(hidden[unasked], before[unasked])


@torch.no_grad()
def parse_accuracy(model: CLIPTextModel, heads: ParseHeads, captions: list[str], tokenizer: Any) -> dict:
    """Per attribute, the fraction of labelled tokens the heads get right, and the fraction of captions
    with every labelled token right (``exact``)."""
    ids, labels = (t.to(model.device) for t in token_labels(captions, tokenizer))
    _, correct = heads(model(ids).last_hidden_state, labels)
    labelled = labels != IGNORE
    out = {name: float(correct[..., a][labelled[..., a]].float().mean()) for a, name in enumerate(ATTRIBUTES)}
    out["exact"] = float((correct | ~labelled).flatten(1).all(dim=1).float().mean())
    return out


def train_parse_encoder(
    embeddings: CLIPTextModel,
    tokenizer: Any,
    cfg: ParseEncoderConfig,
    seed: int = 0,
    log: Callable[[str], None] = print,
) -> tuple[CLIPTextModel, dict[str, float]]:
    """Train ``cfg.layers`` new layers on ``embeddings`` (its token table frozen) to read the parse;
    returns the encoder in eval mode and its accuracy on every held-out caption of the grammar."""
    torch.manual_seed(seed)
    device = embeddings.device  # the bootstrap's (`bootstrap.device`)
    model = build_parse_encoder(embeddings, cfg.layers).to(device).train()
    model.get_input_embeddings().requires_grad_(False)  # most of the weights; a caption moves few rows
    heads = ParseHeads(model.config.hidden_size).to(device)
    trained = [p for p in [*model.parameters(), *heads.parameters()] if p.requires_grad]
    optimizer = adamw(trained, lr=cfg.lr, weight_decay=0.0)
    scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=cfg.steps, eta_min=cfg.lr * 0.05)
    captions, weights = training_captions()
    all_ids, all_labels = (t.to(device) for t in token_labels(captions, tokenizer))  # a few thousand, once
    rng, started = np.random.default_rng(seed), time.perf_counter()
    for step in range(cfg.steps):
        rows = torch.from_numpy(rng.choice(len(captions), size=cfg.batch_size, p=weights)).to(device)
        hidden = model(all_ids[rows]).last_hidden_state
        loss, _ = heads(hidden, all_labels[rows])
        if cfg.keep_weight:
            loss = loss + cfg.keep_weight * kept_words_loss(
                hidden, embeddings, all_ids[rows], all_labels[rows]
            )
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        scheduler.step()
        if not math.isfinite(loss.item()):
            raise FloatingPointError(f"parse encoder loss is {loss.item()} at step {step}")
        if step % 200 == 0 or step == cfg.steps - 1:
            log(
                f"[parse encoder] step {step + 1}/{cfg.steps} loss {loss.item():.4f} ({time.perf_counter() - started:.0f}s)"
            )
    model.eval()
    held_out = [c for captions in all_captions().values() for c in captions if is_heldout(c)]
    accuracy = parse_accuracy(model, heads, held_out, tokenizer)
    return model, {
        **accuracy,
        "heldout_captions": len(held_out),
        "train_seconds": time.perf_counter() - started,
    }
