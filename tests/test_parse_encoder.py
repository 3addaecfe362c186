"""The parse-trained text encoder (`ldm.first_stage.parse_encoder`): its labels, and that it learns."""

from __future__ import annotations

import pytest
import torch
from transformers import CLIPTextConfig, CLIPTextModel

from ldm.config.bootstrap import BootstrapConfig, ParseEncoderConfig
from ldm.first_stage import parse_encoder as pe
from ldm.first_stage.text_encoder import BOS_TOKEN_ID, EOS_TOKEN_ID
from ldm.first_stage.tokenizer import CLIP_VOCAB_SIZE, build_clip_tokenizer
from ldm.synth.grammar import is_heldout

IGNORED = object()  # an attribute the token is not asked
NOTHING = [pe.IGNORE] * len(pe.ATTRIBUTES)  # a token asked nothing


def label(shape, color, size, count, position, relation) -> list[int]:
    values = {"shape": shape, "color": color, "size": size, "count": count, "position": position,
              "relation": relation}  # fmt: skip
    return [pe.IGNORE if v is IGNORED else pe.ATTRIBUTES[n].index(v) for n, v in values.items()]


def tiny_embeddings() -> CLIPTextModel:
    """A 32-wide CLIP text model without layers (token and position embeddings, final norm), seed 0:
    what the bootstrap's `text_encoder_layers: 0` gives, at a test's size."""
    config = CLIPTextConfig(vocab_size=CLIP_VOCAB_SIZE, hidden_size=32, intermediate_size=64,
                            num_hidden_layers=0, num_attention_heads=2, max_position_embeddings=16,
                            bos_token_id=BOS_TOKEN_ID, eos_token_id=EOS_TOKEN_ID,
                            pad_token_id=EOS_TOKEN_ID)  # fmt: skip
    torch.manual_seed(0)
    return CLIPTextModel(config).eval()


@pytest.fixture(scope="module")
def tokenizer():
    return build_clip_tokenizer(model_max_length=16)


def test_an_object_is_asked_of_its_shape_word_and_what_follows_it_and_only_what_was_said(tokenizer):
    captions = [
        "a red circle to the left of a cyan square",  # "cyan" is two tokens
        "a star and a large square",
        "three green triangles",  # "triangles" is two tokens
        "a small yellow star in the top left",
    ]
    ids, labels = pe.token_labels(captions, tokenizer)
    assert ids.shape == (4, 16) and labels.shape == (4, 16, len(pe.ATTRIBUTES))
    assert (ids[:, 0] == BOS_TOKEN_ID).all()

    def asked(shape, color=None, size=None, count=1, position=IGNORED, relation=IGNORED) -> list[int]:
        return label(shape, color, size, count, position, relation)

    # <start> a red | circle to the | left of | a cyan(2) | square <end> + padding: the causal encoder
    # knows the circle at "circle", its relation from "left" on; the square's relation is known.
    circle = asked("circle", "red")
    left_of = asked("circle", "red", relation="left of")
    square = asked("square", "cyan", relation="right of")
    assert (
        labels[0].tolist()
        == [NOTHING] * 3 + [circle] * 3 + [left_of] * 2 + [NOTHING] * 3 + [square] + [NOTHING] * 4
    )
    assert ids[0, 12].item() == EOS_TOKEN_ID
    # "and" and the first object's missing relation are asked nothing; no colour named is "any" (None)
    assert (
        labels[1].tolist()
        == [NOTHING] * 2
        + [asked("star")]
        + [NOTHING] * 3
        + [asked("square", size="large", relation=None)]
        + [NOTHING] * 9
    )
    assert labels[2, 1:4].tolist() == [NOTHING] * 2 + [asked("triangle", "green", count=3)]
    assert labels[2, 4].tolist() == asked("triangle", "green", count=3)  # the word's second token
    # the place belongs to the object, known at its last word
    star = asked("star", "yellow", "small")
    assert labels[3, 1:9].tolist() == [NOTHING] * 3 + [star] * 4 + [
        asked("star", "yellow", "small", position="top left")
    ]


def test_captions_outside_the_grammar_are_refused(tokenizer):
    with pytest.raises(ValueError, match="outside the synthetic grammar"):
        pe.token_labels(["a dog on a sofa"], tokenizer)


def test_training_captions_never_hold_a_held_out_one():
    captions, weights = pe.training_captions()
    assert len(captions) == len(set(captions)) == len(weights) > 3000
    assert not any(is_heldout(c) for c in captions)
    assert weights.sum() == pytest.approx(1.0) and (weights > 0).all()
    # the source's mix: each of the six categories a sixth of the draws
    counting = sum(w for c, w in zip(captions, weights, strict=True) if c.startswith(("two ", "three ")))
    assert counting == pytest.approx(1 / 6)


def test_the_layers_learn_to_parse_held_out_captions_and_the_token_table_stays(tokenizer):
    embeddings = tiny_embeddings()
    untrained = pe.build_parse_encoder(embeddings, layers=1)
    heads = pe.ParseHeads(32)
    captions = pe.training_captions()[0][:64]
    before = pe.parse_accuracy(untrained, heads, captions, tokenizer)

    model, metrics = pe.train_parse_encoder(
        embeddings,
        tokenizer,
        ParseEncoderConfig(layers=1, steps=300, batch_size=64, lr=3e-3),
        log=lambda _: None,
    )
    assert isinstance(model, CLIPTextModel) and model.config.num_hidden_layers == 1 and not model.training
    # Held-out captions (never drawn in training) are read: 300 steps of a 32-wide layer parse ~3/4
    # of them exactly (0.76 at seed 0), where the untrained layer parses none.
    assert metrics["heldout_captions"] > 300
    assert before["exact"] == 0.0 and metrics["exact"] > 0.5, (before, metrics)
    assert min(metrics[name] for name in pe.ATTRIBUTES) > 0.8, metrics
    # the token table is the CLIP's, frozen; the position embedding trained
    state, start = model.state_dict(), embeddings.state_dict()
    key = "embeddings.token_embedding.weight"
    assert torch.equal(state[key], start[key])
    assert not torch.equal(
        state["embeddings.position_embedding.weight"], start["embeddings.position_embedding.weight"]
    )


def test_keep_weight_holds_the_words_asked_nothing_at_their_embeddings(tokenizer):
    embeddings = tiny_embeddings()
    ids, labels = pe.token_labels(pe.training_captions()[0][:256], tokenizer)
    drift = {}
    for keep in (0.0, 10.0):
        cfg = ParseEncoderConfig(layers=1, steps=100, batch_size=64, lr=3e-3, keep_weight=keep)
        model, _ = pe.train_parse_encoder(embeddings, tokenizer, cfg, log=lambda _: None)
        with torch.no_grad():
            drift[keep] = float(pe.kept_words_loss(model(ids).last_hidden_state, embeddings, ids, labels))
    assert drift[10.0] < 0.25 * drift[0.0], drift


def test_parse_layers_need_the_tower_s_layers_off():
    with pytest.raises(ValueError, match="text_encoder_layers: 0"):
        BootstrapConfig(parse_encoder=ParseEncoderConfig(layers=2))
    assert (
        BootstrapConfig(
            text_encoder_layers=0, parse_encoder=ParseEncoderConfig(layers=2)
        ).parse_encoder.layers
        == 2
    )
