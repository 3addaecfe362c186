"""Does a text encoder keep the words a caption's meaning rests on? (docs/TRAINING.md, turn 20)

For each encoder (a folder holding ``text_encoder/`` and ``tokenizer/``: a bootstrap models folder, an
exported pipeline, an SD folder) and each pair of captions that differ in one attribute (the place,
the shape, which colour goes with which shape), it prints the cosine similarity of the encoder's
outputs at each token of the two captions, as the U-Net's cross-attention reads them: the minimum
over the caption's tokens, and the mean. 1.00 means the U-Net cannot tell the two captions apart from
the text; the demo's frozen embeddings give 0.44 (place) and 0.54 (shape), the bootstrap CLIP's tower
0.89 and 0.99.

    python benchmarks/word_separation.py NAME=FOLDER [NAME=FOLDER ...]

Each line is a JSON object: {"encoder": NAME, "pair": PAIR, "min": ..., "mean": ...}.
"""

from __future__ import annotations

import argparse
import json

import torch

from ldm.first_stage.text_encoder import load_text_encoder
from ldm.text import encode_captions

PAIRS = {
    "place": ("a large red circle in the top left", "a large red circle in the bottom right"),
    "shape": ("a red circle", "a red square"),
    "binding": ("a red circle and a blue square", "a blue circle and a red square"),
}


def separation(tokenizer, text_encoder, first: str, second: str) -> tuple[float, float]:
    """(min, mean) over the first caption's tokens (start, words, end) of the per-token cosine."""
    hidden = encode_captions(tokenizer, text_encoder, [first, second])  # [2, L, D]
    length = len(tokenizer(first).input_ids)
    cosine = torch.nn.functional.cosine_similarity(hidden[0, :length], hidden[1, :length], dim=-1)
    return float(cosine.min()), float(cosine.mean())


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("encoders", nargs="+", metavar="NAME=FOLDER")
    args = parser.parse_args()
    for item in args.encoders:
        name, sep, folder = item.partition("=")
        if not sep:
            parser.error(f"{item!r}: expected NAME=FOLDER")
        tokenizer, text_encoder = load_text_encoder(folder)
        for pair, (first, second) in PAIRS.items():
            low, mean = separation(tokenizer, text_encoder, first, second)
            print(json.dumps({"encoder": name, "pair": pair, "min": round(low, 3), "mean": round(mean, 3)}))


if __name__ == "__main__":
    main()
