"""What a bootstrap CLIP tells apart, by kind of edit (docs/TRAINING.md, turn 12).

Each held-out render is scored with its own caption and with one caption a single attribute away
(`ldm.synth.negatives.hard_negatives_by_kind`), grouped by what the edit changed: position,
relation, shape, colour, size, count, or the two colours swapped between their shapes (binding).
The printed figure is the ROC AUC of matched against edited scores per kind (0.5: the CLIP cannot
tell that kind apart).
The bootstrap's own ``hard_negative_auc`` pools all kinds into one number.

    python benchmarks/clip_edit_auc.py ./ldm-demo/models/clip [./ldm-quality/models/clip ...]
"""

from __future__ import annotations

import argparse
from collections import defaultdict

import numpy as np

from ldm.first_stage import clip
from ldm.synth.negatives import hard_negatives_by_kind
from ldm.synth.render import render_batch
from ldm.synth.source import HELDOUT_SEED_OFFSET


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("clips", nargs="+", help="bootstrap CLIP folders (WORKDIR/models/clip)")
    parser.add_argument("--renders", type=int, default=1536)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()

    rng = np.random.default_rng(args.seed)
    images, captions, _ = render_batch(args.renders, args.seed + HELDOUT_SEED_OFFSET + 7)
    by_kind: dict[str, tuple[list[int], list[str]]] = defaultdict(lambda: ([], []))
    for i, caption in enumerate(captions):
        # one edit of each kind the caption allows
        for kind, negatives in hard_negatives_by_kind(caption).items():
            by_kind[kind][0].append(i)
            by_kind[kind][1].append(str(rng.choice(negatives)))

    for folder in args.clips:
        bundle = clip.load_clip(folder)
        figures = []
        for kind in sorted(by_kind):
            index, negatives = by_kind[kind]
            matched = [captions[i] for i in index]
            auc = clip.matched_vs_mismatched_auc(bundle, images[index], matched, negatives)
            figures.append(f"{kind} {auc:.3f} (n={len(index)})")
        print(f"{folder}: " + " | ".join(figures), flush=True)


if __name__ == "__main__":
    main()
