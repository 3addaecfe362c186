"""The ingest funnel as pictures for MLflow: rows left after each stage, the CLIP-score histogram,
and sample rejected images per reason.

Plain functions over what the job already has (reject counts, the score histogram, the samples the
shards kept); the job
logs what they return (`pipelines.ingest.log_to_mlflow`). Figures use matplotlib's Agg backend: no
display is needed on a cluster node.
"""

from __future__ import annotations

import base64
import io
import textwrap

import numpy as np

from ldm.contract import FunnelStep
from pipelines import filters

# (rows left after this step, the reasons that drop rows at it), in the order the job applies them
FUNNEL_STEPS: tuple[tuple[str, tuple[str, ...]], ...] = (
    ("URL allowed", (filters.REASON_BLOCKED,)),
    ("caption ok", (filters.REASON_CAPTION,)),
    ("column filters", (filters.REASON_COLUMN,)),
    ("downloaded", (filters.REASON_DOWNLOAD, filters.REASON_OPTED_OUT, filters.REASON_BLOCKED_REDIRECT)),
    (
        "image filters",
        (filters.REASON_TOO_SMALL, filters.REASON_TOO_LARGE, filters.REASON_ASPECT, filters.REASON_DUPLICATE),
    ),
    ("CLIP score", (filters.REASON_LOW_CLIP,)),
    ("not near-duplicate", (filters.REASON_NEAR_DUPLICATE,)),
)
# reasons whose rows hold a decodable image of sane size (a bomb is never decoded, not even here)
SAMPLED_REASONS = (
    filters.REASON_TOO_SMALL,
    filters.REASON_ASPECT,
    filters.REASON_DUPLICATE,
    filters.REASON_LOW_CLIP,
    filters.REASON_NEAR_DUPLICATE,
)
THUMBNAIL = 96


def funnel(num_input: int, rejected_by_reason: dict[str, int]) -> list[FunnelStep]:
    """The input, then the rows left after each of `FUNNEL_STEPS`."""
    known = {reason for _, reasons in FUNNEL_STEPS for reason in reasons}
    unknown = set(rejected_by_reason) - known
    if unknown:
        raise ValueError(f"reject reasons missing from the funnel: {sorted(unknown)}")
    rows, steps = num_input, [FunnelStep(step="input", rows=num_input)]
    for name, reasons in FUNNEL_STEPS:
        rows -= sum(rejected_by_reason.get(reason, 0) for reason in reasons)
        steps.append(FunnelStep(step=name, rows=rows))
    return steps


def funnel_figure(steps: list[FunnelStep]):
    """Horizontal bars, one per step, widest (the input) on top."""
    from matplotlib.figure import Figure

    figure = Figure(figsize=(7, 0.45 * len(steps) + 1.2))
    axes = figure.subplots()
    names = [step.step for step in steps][::-1]
    rows = [step.rows for step in steps][::-1]
    bars = axes.barh(names, rows, color="#4c72b0")
    top = max(rows + [1])
    for bar, value in zip(bars, rows, strict=True):
        axes.text(bar.get_width() + top * 0.01, bar.get_y() + bar.get_height() / 2, f"{value:,}", va="center")
    axes.set_xlim(0, top * 1.15)
    axes.set_xlabel("rows left")
    axes.set_title("ingest funnel")
    figure.tight_layout()
    return figure


def score_histogram(counts: np.ndarray, cutoff: float | None, label: str):
    """The CLIP scores' histogram (``counts``: rows per equal bin over [-1, 1], as pass 2 counts them),
    with the cut marked (``label`` says how it was chosen)."""
    from matplotlib.figure import Figure

    counts = np.asarray(counts, dtype=np.int64)
    edges = np.linspace(-1.0, 1.0, len(counts) + 1)
    used = np.flatnonzero(counts)
    figure = Figure(figsize=(7, 3.5))
    axes = figure.subplots()
    if len(used):  # regroup the fine bins into ~50 bars over the range that holds scores
        lo, hi = used[0], used[-1] + 1
        step = max(1, (hi - lo) // 50)
        sums = np.add.reduceat(counts[lo:hi], np.arange(0, hi - lo, step))
        axes.bar(edges[lo:hi:step], sums, width=step * (edges[1] - edges[0]), align="edge", color="#55a868")
    if cutoff is not None and np.isfinite(cutoff):
        axes.axvline(cutoff, color="#c44e52", linestyle="--", label=f"cut {cutoff:.3f} ({label})")
        axes.legend()
    axes.set_xlabel("CLIP score (cosine similarity)")
    axes.set_ylabel("rows")
    axes.set_title(f"CLIP scores of {int(counts.sum()):,} scored rows")
    figure.tight_layout()
    return figure


def reject_samples(picked: dict[str, list]) -> dict[str, list[tuple[str, np.ndarray]]]:
    """(caption, thumbnail) per sampled reason, from the [key, caption, thumbnail as base64] rows
    the published shards kept, lowest keys first (`pipelines.ingest_publish.publish_all`)."""
    samples: dict[str, list[tuple[str, np.ndarray]]] = {}
    for reason, rows in sorted(picked.items()):
        for _, caption, thumb in sorted(rows):
            image = _thumbnail(base64.b64decode(thumb))
            if image is not None:
                samples.setdefault(reason, []).append((caption, image))
    return samples


def _thumbnail(data: bytes | None) -> np.ndarray | None:
    from PIL import Image

    if not data:
        return None
    try:
        image = Image.open(io.BytesIO(data))
        image.thumbnail((THUMBNAIL, THUMBNAIL))
        return np.asarray(image.convert("RGB"))
    except Exception:  # a sample that will not decode is left out of the picture, nothing more
        return None


def sample_grid(reason: str, samples: list[tuple[str, np.ndarray]]):
    """One row of thumbnails with their (wrapped, shortened) captions."""
    from matplotlib.figure import Figure

    figure = Figure(figsize=(1.8 * len(samples), 2.4))
    axes_list = np.atleast_1d(figure.subplots(1, len(samples)))
    for axes, (caption, image) in zip(axes_list, samples, strict=True):
        axes.imshow(image)
        axes.set_title(textwrap.fill(textwrap.shorten(caption, 60, placeholder="..."), 22), fontsize=6)
        axes.axis("off")
    figure.suptitle(f"rejected: {reason}")
    figure.tight_layout()
    return figure
