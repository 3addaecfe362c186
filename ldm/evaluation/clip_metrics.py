"""Evaluation on any data: CLIP score and CMMD, measured with the configured CLIP scorer.

- ``clip_score``: the mean cosine similarity between each generated image and its prompt in the CLIP
  scorer's embedding space (Hessel et al., 2021, "CLIPScore", without its 2.5 weight and clipping at 0:
  the raw cosine, the same number ingest filters on).
- ``cmmd``: the maximum mean discrepancy between the CLIP image embeddings of the generated images and
  those of real images (Jayasumana et al., CVPR 2024, "Rethinking FID: Towards a Better Evaluation
  Metric for Image Generation"): a distance between two image distributions that, unlike FID, assumes
  no normality and is unbiased at small sample sizes. Lower is better; 0 means the same distribution.

Both are reported beside their value for the real (hold-out) images themselves, so a reader can tell a
weak model from a weak scorer: see `reference_metrics`.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch

# The constants of Jayasumana et al. (Sec. 5 and their reference code, google-research/cmmd):
# a Gaussian RBF kernel of bandwidth 10 on L2-normalised CLIP embeddings, the MMD^2 scaled by 1000.
CMMD_SIGMA = 10.0
CMMD_SCALE = 1000.0


def cmmd(x: np.ndarray | torch.Tensor, y: np.ndarray | torch.Tensor, sigma: float = CMMD_SIGMA) -> float:
    """CMMD of two sets of embeddings ``x`` [m, d] and ``y`` [n, d]: ``CMMD_SCALE`` x unbiased MMD^2.

    MMD^2(P, Q) = E k(x, x') + E k(y, y') - 2 E k(x, y) with k(a, b) = exp(-||a - b||^2 / (2 sigma^2))
    (Gretton et al., JMLR 2012, eq. 3, the unbiased U-statistic: the within-set means leave out i == j).
    Its expectation is exactly 0 when ``x`` and ``y`` come from one distribution (a single estimate
    can be slightly negative) and grows as the distributions move apart. The paper's reference code
    averages over i == j too (the biased V-statistic, > 0 even for two samples of one distribution);
    the unbiased form is the one the paper defines. Computed in float64: the kernel values of
    normalised embeddings all lie in [exp(-2 / sigma^2), 1], so the differences are small.
    """
    xs = torch.as_tensor(np.asarray(x), dtype=torch.float64)
    ys = torch.as_tensor(np.asarray(y), dtype=torch.float64)
    if xs.ndim != 2 or ys.ndim != 2 or xs.shape[1] != ys.shape[1]:
        raise ValueError(
            f"expected embeddings [m, d] and [n, d], got {tuple(xs.shape)} and {tuple(ys.shape)}"
        )
    if len(xs) < 2 or len(ys) < 2:
        raise ValueError(f"the unbiased MMD needs at least 2 embeddings per set, got {len(xs)} and {len(ys)}")
    gamma = 1.0 / (2.0 * sigma**2)
    k_xx = torch.exp(-gamma * torch.cdist(xs, xs).square())  # [m, m]
    k_yy = torch.exp(-gamma * torch.cdist(ys, ys).square())  # [n, n]
    k_xy = torch.exp(-gamma * torch.cdist(xs, ys).square())  # [m, n]
    m, n = len(xs), len(ys)
    within_x = (k_xx.sum() - k_xx.diagonal().sum()) / (m * (m - 1))
    within_y = (k_yy.sum() - k_yy.diagonal().sum()) / (n * (n - 1))
    return float(CMMD_SCALE * (within_x + within_y - 2.0 * k_xy.mean()))


def image_text_features(
    bundle, images: Sequence, captions: Sequence[str]
) -> tuple[torch.Tensor, torch.Tensor]:
    """L2-normalised CLIP image and text features of PIL images (or uint8 arrays) and their captions."""
    from ldm.first_stage.clip import clip_features

    size = bundle.preprocess.image_size
    pixels = np.stack([_rgb(image, size) for image in images])
    return clip_features(bundle, pixels, list(captions))


def _rgb(image, size: int) -> np.ndarray:
    """uint8 [size, size, 3]: images of one batch must share a shape before preprocessing."""
    from PIL import Image

    picture = image if isinstance(image, Image.Image) else Image.fromarray(np.asarray(image))
    picture = picture.convert("RGB")
    if picture.size != (size, size):
        picture = picture.resize((size, size), Image.Resampling.BICUBIC)
    return np.asarray(picture, dtype=np.uint8)


def clip_score(image_features: torch.Tensor, text_features: torch.Tensor) -> float:
    """Mean cosine similarity of each (normalised) image feature with its caption's."""
    if image_features.shape != text_features.shape:
        raise ValueError(f"{tuple(image_features.shape)} image vs {tuple(text_features.shape)} text features")
    return float((image_features * text_features).sum(-1).mean())


def reference_metrics(image_features: torch.Tensor, text_features: torch.Tensor) -> dict[str, float]:
    """``clip_score`` and ``cmmd`` of the real hold-out images themselves: the values to read a model's
    against. ``clip_score``: the hold-out images with their own captions (what a model that draws the
    data's own images would get). ``cmmd``: between two halves of the hold-out set (interleaved, so
    neither half is a sorted slice): the value that sampling alone produces at this sample size, since
    the hold-out set against itself is 0 by definition.
    """
    halves = image_features[0::2], image_features[1::2]
    return {
        "clip_score": clip_score(image_features, text_features),
        "cmmd": cmmd(*halves) if min(len(h) for h in halves) >= 2 else float("nan"),
    }
