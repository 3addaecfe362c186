"""A transformers ``CLIPTokenizer`` built offline from the BPE vocabulary that open_clip ships.

Nothing may be downloaded at run time, so the tokenizer of the offline default cannot come from a hub.
open_clip's wheel carries OpenAI's BPE merges; rebuilding ``vocab.json`` in open_clip's
``SimpleTokenizer`` order (bytes, bytes + ``</w>``, merges, then the two special tokens) and writing
``merges.txt`` with a ``#version`` header gives a CLIPTokenizer whose ids equal open_clip's, so one
text tower can both score (open_clip) and condition (transformers/diffusers).
"""

from __future__ import annotations

import gzip
import json
import tempfile
from pathlib import Path

# OpenAI CLIP's BPE: 49152 - 256 - 2 merges are used; the vocabulary is 49408 ids.
CLIP_VOCAB_SIZE = 49408
BOS_TOKEN = "<|startoftext|>"
EOS_TOKEN = "<|endoftext|>"


def _clip_vocab_and_merges() -> tuple[dict[str, int], list[str]]:
    from open_clip.tokenizer import bytes_to_unicode, default_bpe

    lines = gzip.open(default_bpe()).read().decode("utf-8").split("\n")
    merges = lines[1 : 49152 - 256 - 2 + 1]
    byte_symbols = list(bytes_to_unicode().values())
    vocab = byte_symbols + [symbol + "</w>" for symbol in byte_symbols]
    vocab += ["".join(merge.split()) for merge in merges]
    vocab += [BOS_TOKEN, EOS_TOKEN]
    assert len(vocab) == CLIP_VOCAB_SIZE, len(vocab)
    return {token: index for index, token in enumerate(vocab)}, merges


def build_clip_tokenizer(model_max_length: int = 77):
    """Return a ``transformers.CLIPTokenizer`` with open_clip's ids, padding with ``<|endoftext|>``.

    Padding with EOS is the convention of Stable Diffusion's tokenizers; the CLIP scorer pools at the
    first EOS (argmax of the ids), so pad positions never change its score.
    """
    from transformers import CLIPTokenizer

    vocab, merges = _clip_vocab_and_merges()
    with tempfile.TemporaryDirectory() as tmp:
        vocab_file = Path(tmp) / "vocab.json"
        merges_file = Path(tmp) / "merges.txt"
        vocab_file.write_text(json.dumps(vocab))
        merges_file.write_text("#version: 0.2\n" + "\n".join(merges) + "\n")
        return CLIPTokenizer(
            str(vocab_file),
            str(merges_file),
            model_max_length=model_max_length,
            bos_token=BOS_TOKEN,
            eos_token=EOS_TOKEN,
            pad_token=EOS_TOKEN,
            unk_token=EOS_TOKEN,
        )
