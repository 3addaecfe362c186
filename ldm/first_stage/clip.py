"""The CLIP scorer: an open_clip model that says how well a caption matches an image.

Ingest keeps or rejects pairs by its cosine similarity (`clip_score`). Two kinds of model load here:

- the offline default, a small CLIP that `ldm bootstrap` trains on the synthetic source and saves in
  open_clip's own ``local-dir`` layout (``open_clip_config.json`` + ``model.safetensors``), so that
  ``open_clip.create_model("local-dir:FOLDER")`` reads it as well as `load_clip` does;
- a production model, named by the spec ``open_clip:ARCH@WEIGHTS`` (an open_clip architecture such as
  ``ViT-B-32`` and a local or ``s3://`` weights file).

Images enter as uint8 NHWC batches (what the download stage yields), captions as strings.
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
import torch.nn.functional as F
from safetensors.torch import save_file

from ldm.config.bootstrap import ClipConfig
from ldm.optim import adamw
from ldm.storage import is_remote, materialize
from ldm.synth.grammar import is_heldout
from ldm.synth.negatives import hard_negatives_by_kind

if TYPE_CHECKING:  # for the annotations only: open_clip is imported where it is used (it is slow to import)
    from open_clip.model import CLIP, CustomTextCLIP

CLIP_CONFIG_FILE = "open_clip_config.json"  # the name open_clip's "local-dir:" loader looks for
CLIP_WEIGHTS_FILE = "model.safetensors"
PRODUCTION_PREFIX = "open_clip:"
# open_clip's defaults (OpenAI's normalisation); the bootstrap CLIP is trained with them.
DEFAULT_MEAN = (0.48145466, 0.4578275, 0.40821073)
DEFAULT_STD = (0.26862954, 0.26130258, 0.27577711)


class ImagePreprocess:
    """uint8 NHWC numpy batch -> normalised float NCHW tensor at the model's input size.

    open_clip's own transforms work on one PIL image at a time; ingest scores whole batches, so this
    does the same steps (resize the shorter side, centre crop, normalise) on a tensor batch.
    """

    def __init__(self, image_size: int, mean: tuple[float, ...], std: tuple[float, ...]):
        self.image_size = int(image_size)
        self.mean = torch.tensor(mean, dtype=torch.float32).view(1, 3, 1, 1)
        self.std = torch.tensor(std, dtype=torch.float32).view(1, 3, 1, 1)

    def __call__(self, images: np.ndarray) -> torch.Tensor:
        images = check_images(images)
        x = torch.from_numpy(images).permute(0, 3, 1, 2).float().div_(255.0)  # [N, 3, H, W] in 0..1
        height, width = x.shape[-2:]
        size = self.image_size
        if (height, width) != (size, size):
            scale = size / min(height, width)
            new_h, new_w = max(size, round(height * scale)), max(size, round(width * scale))
            x = F.interpolate(x, size=(new_h, new_w), mode="bicubic", antialias=True, align_corners=False)
            top, left = (new_h - size) // 2, (new_w - size) // 2
            x = x[..., top : top + size, left : left + size].clamp_(0.0, 1.0)
        return (x - self.mean) / self.std


@dataclass
class ClipBundle:
    """A CLIP model with the image preprocessing and tokenizer it was trained with."""

    model: CLIP | CustomTextCLIP  # what open_clip.create_model builds (a torch.nn.Module)
    preprocess: ImagePreprocess
    tokenizer: Callable[[list[str]], torch.Tensor]  # captions -> LongTensor [N, context_length]
    model_cfg: dict[str, Any]  # open_clip's model config (embed_dim, vision_cfg, text_cfg)
    name: str  # where it came from: a folder or a production spec

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device


def check_images(images: np.ndarray) -> np.ndarray:
    if (
        not isinstance(images, np.ndarray)
        or images.dtype != np.uint8
        or images.ndim != 4
        or images.shape[-1] != 3
    ):
        shape = getattr(images, "shape", None)
        dtype = getattr(images, "dtype", type(images).__name__)
        raise ValueError(f"expected a uint8 array [N, H, W, 3], got {dtype} with shape {shape}")
    return images


def clip_model_config(cfg: ClipConfig) -> dict[str, Any]:
    """The open_clip model config (the JSON that open_clip's registry holds) of a bootstrap CLIP."""
    if cfg.vision_width % cfg.head_width or cfg.text_width % cfg.head_width:
        raise ValueError(f"vision_width and text_width must be multiples of head_width={cfg.head_width}")
    return {
        "embed_dim": cfg.embed_dim,
        "vision_cfg": {
            "image_size": cfg.image_size,
            "patch_size": cfg.patch_size,
            "width": cfg.vision_width,
            "layers": cfg.vision_layers,
            "head_width": cfg.head_width,
        },
        "text_cfg": {
            "context_length": cfg.context_length,
            "vocab_size": 49408,  # the BPE vocabulary shipped with open_clip; the tokenizer needs all of it
            "width": cfg.text_width,
            "heads": cfg.text_width // cfg.head_width,
            "layers": cfg.text_layers,
        },
    }


def default_preprocess_cfg(image_size: int) -> dict[str, Any]:
    return {"size": image_size, "mean": list(DEFAULT_MEAN), "std": list(DEFAULT_STD)}


def build_clip(cfg: ClipConfig | dict[str, Any]) -> torch.nn.Module:
    """A randomly initialised open_clip CLIP from a `ClipConfig` or an open_clip model config dict."""
    from open_clip.model import CLIP, set_model_preprocess_cfg

    model_cfg = clip_model_config(cfg) if isinstance(cfg, ClipConfig) else dict(cfg)
    missing = {"embed_dim", "vision_cfg", "text_cfg"} - model_cfg.keys()
    if missing:
        raise ValueError(f"open_clip model config lacks {sorted(missing)}")
    if model_cfg.get("custom_text") or "hf_model_name" in model_cfg["text_cfg"]:
        raise ValueError("build_clip builds the plain open_clip CLIP only (no custom or HF text tower)")
    model = CLIP(**model_cfg, output_dict=True)
    set_model_preprocess_cfg(model, default_preprocess_cfg(model_cfg["vision_cfg"]["image_size"]))
    model.ldm_model_cfg = model_cfg  # kept on the module so that save_clip can write it
    return model


def bundle_for(model: torch.nn.Module, name: str = "in-memory") -> ClipBundle:
    """Wrap a CLIP built by `build_clip` (or loaded) with its preprocessing and tokenizer."""
    from open_clip import get_model_preprocess_cfg
    from open_clip.tokenizer import SimpleTokenizer

    model_cfg = getattr(model, "ldm_model_cfg", None)
    if model_cfg is None:
        raise ValueError(
            "this CLIP carries no model config; build it with build_clip or load it with load_clip"
        )
    pp = get_model_preprocess_cfg(model)
    size = pp["size"] if isinstance(pp["size"], int) else pp["size"][0]
    return ClipBundle(
        model=model,
        preprocess=ImagePreprocess(size, tuple(pp["mean"]), tuple(pp["std"])),
        tokenizer=SimpleTokenizer(context_length=model_cfg["text_cfg"]["context_length"]),
        model_cfg=model_cfg,
        name=name,
    )


def save_clip(bundle_or_model: ClipBundle | torch.nn.Module, folder: str | Path) -> Path:
    """Write ``open_clip_config.json`` and ``model.safetensors`` (no pickles) into ``folder``."""
    from open_clip import get_model_preprocess_cfg

    bundle = bundle_or_model if isinstance(bundle_or_model, ClipBundle) else bundle_for(bundle_or_model)
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    config = {"model_cfg": bundle.model_cfg, "preprocess_cfg": get_model_preprocess_cfg(bundle.model)}
    (folder / CLIP_CONFIG_FILE).write_text(json.dumps(config, indent=2))
    # contiguous CPU copies: safetensors refuses shared or strided storage
    state = {key: value.detach().cpu().contiguous() for key, value in bundle.model.state_dict().items()}
    save_file(state, str(folder / CLIP_WEIGHTS_FILE))
    return folder


def load_clip(spec: str, device: str | torch.device = "cpu") -> ClipBundle:
    """Load a CLIP scorer, in eval mode, from a folder (local or ``s3://``) or ``open_clip:ARCH@WEIGHTS``."""
    import open_clip

    spec = str(spec)
    if spec.startswith(PRODUCTION_PREFIX):
        arch, sep, weights = spec[len(PRODUCTION_PREFIX) :].partition("@")
        if not sep or not arch or not weights:
            raise ValueError(f"production CLIP spec must look like open_clip:ARCH@WEIGHTS_FILE, got {spec!r}")
        if open_clip.get_model_config(arch) is None:
            raise ValueError(f"unknown open_clip architecture {arch!r} in {spec!r}")
        if is_remote(weights):
            weights = str(materialize(weights) / weights.rstrip("/").rsplit("/", 1)[-1])
        elif not Path(weights).is_file():
            raise FileNotFoundError(f"no such CLIP weights file: {weights}")
        model = open_clip.create_model(arch, pretrained=weights, device=device, output_dict=True)
        model.ldm_model_cfg = open_clip.get_model_config(arch)
        bundle = bundle_for(model, name=spec)
        # production architectures may use their own tokenizer (open_clip knows which, offline for BPE ones)
        bundle.tokenizer = open_clip.get_tokenizer(arch)
    else:
        folder = materialize(spec)
        if not (folder / CLIP_CONFIG_FILE).is_file():
            raise FileNotFoundError(f"{spec} is not a CLIP folder: it has no {CLIP_CONFIG_FILE}")
        model = open_clip.create_model(f"local-dir:{folder}", device=device, output_dict=True)
        model.ldm_model_cfg = json.loads((folder / CLIP_CONFIG_FILE).read_text())["model_cfg"]
        bundle = bundle_for(model, name=spec)
    model.eval()
    return bundle


@torch.no_grad()
def clip_features(
    bundle: ClipBundle, images: np.ndarray, captions: list[str], batch_size: int = 256
) -> tuple[torch.Tensor, torch.Tensor]:
    """L2-normalised image and text features, [N, embed_dim] each, float32 on the CPU."""
    if len(images) != len(captions):
        raise ValueError(f"{len(images)} images but {len(captions)} captions")
    device = bundle.device
    image_parts, text_parts = [], []
    for start in range(0, len(captions), batch_size):
        pixels = bundle.preprocess(images[start : start + batch_size]).to(device)
        tokens = bundle.tokenizer(list(captions[start : start + batch_size])).to(device)
        image_parts.append(bundle.model.encode_image(pixels, normalize=True).float().cpu())
        text_parts.append(bundle.model.encode_text(tokens, normalize=True).float().cpu())
    return torch.cat(image_parts), torch.cat(text_parts)


def clip_score(bundle: ClipBundle, images: np.ndarray, captions: list[str]) -> np.ndarray:
    """Cosine similarity of each image with its caption, float32 [N] in -1..1."""
    image_features, text_features = clip_features(bundle, images, captions)
    return (image_features * text_features).sum(-1).numpy().astype(np.float32)


def roc_auc(positives: np.ndarray, negatives: np.ndarray) -> float:
    """Area under the ROC curve as the Mann-Whitney statistic (ties count half); no sklearn needed."""
    positives, negatives = np.asarray(positives)[:, None], np.asarray(negatives)[None, :]
    return float((positives > negatives).mean() + 0.5 * (positives == negatives).mean())


def matched_vs_mismatched_auc(
    bundle: ClipBundle, images: np.ndarray, captions: list[str], mismatched_captions: list[str]
) -> float:
    """ROC AUC of each image's score with its caption against its score with a caption it does not fit."""
    if len(mismatched_captions) != len(captions):
        raise ValueError(f"{len(captions)} captions but {len(mismatched_captions)} mismatched captions")
    matched = clip_score(bundle, images, captions)
    mismatched = clip_score(bundle, images, mismatched_captions)
    return roc_auc(matched, mismatched)


def train_clip(
    bundle: ClipBundle,
    images: np.ndarray,
    captions: list[str],
    cfg: ClipConfig,
    seed: int = 0,
    log: Callable[[str], None] = print,
) -> list[float]:
    """Contrastive training (CLIP's symmetric InfoNCE) on rendered pairs; returns the loss per step.

    The synthetic source repeats captions (a few hundred of them), so two pairs of one batch often
    share a caption; plain InfoNCE would push those apart as negatives. The targets here spread each
    row's probability over every pair with the same caption instead. (Counting as positives every
    caption that is merely *true* of an image, "a circle" for a red circle, measured worse: held-out
    AUC 0.960 after 300 steps of 128 against 0.979 after 200.) With ``cfg.hard_negatives``, each
    image also ranks captions one edit away from its own (NegCLIP; see ``_draw_negatives``).
    """
    model = bundle.model
    model.train()
    generator = torch.Generator().manual_seed(seed)
    unique = sorted(set(captions))
    lookup = {caption: i for i, caption in enumerate(unique)}
    caption_ids = torch.tensor([lookup[c] for c in captions])
    texts, negative_kinds = _training_texts(unique, cfg)
    text_tokens = bundle.tokenizer(texts)  # each text tokenised once
    rng = np.random.default_rng(seed)

    # no weight decay on LayerNorm gains, biases and the temperature (as open_clip's training does)
    decay = [p for n, p in model.named_parameters() if p.ndim >= 2 and "logit_scale" not in n]
    no_decay = [p for n, p in model.named_parameters() if p.ndim < 2 or "logit_scale" in n]
    optimizer = adamw(
        [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
        lr=cfg.lr,
        betas=(0.9, 0.98),
        eps=1e-6,
    )

    def lr_factor(step: int) -> float:  # linear warm-up, then cosine decay to zero
        if step < cfg.warmup_steps:
            return (step + 1) / cfg.warmup_steps
        progress = (step - cfg.warmup_steps) / max(1, cfg.steps - cfg.warmup_steps)
        return 0.5 * (1.0 + math.cos(math.pi * progress))

    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_factor)
    losses: list[float] = []
    started = time.perf_counter()
    for step in range(cfg.steps):
        index = torch.randint(len(captions), (cfg.batch_size,), generator=generator)
        pixels = bundle.preprocess(images[index.numpy()]).to(bundle.device)
        ids = caption_ids[index]
        text_ids = torch.cat([ids, _draw_negatives(negative_kinds, ids, cfg.hard_negatives, rng)])
        out = model(pixels, text_tokens[text_ids].to(bundle.device))
        # [B, B + B x hard_negatives]: the batch's captions first, then the hard negatives
        logits = out["logit_scale"] * out["image_features"] @ out["text_features"].T
        loss = _contrastive_loss(logits, ids, text_ids)

        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        scheduler.step()
        with torch.no_grad():  # CLIP clamps the learned temperature at 100
            model.logit_scale.clamp_(0, math.log(100))

        losses.append(loss.item())
        if not math.isfinite(losses[-1]):
            raise FloatingPointError(f"CLIP loss is {losses[-1]} at step {step}")
        if step % 50 == 0 or step == cfg.steps - 1:
            log(
                f"[clip] step {step + 1}/{cfg.steps} loss {losses[-1]:.3f} ({time.perf_counter() - started:.0f}s)"
            )
    model.eval()
    return losses


def _training_texts(unique: list[str], cfg: ClipConfig) -> tuple[list[str], list[list[list[int]]]]:
    """(texts, negative_kinds): the distinct captions (text i is caption id i), then, with
    ``cfg.hard_negatives``, every hard negative of one that is not itself a training caption; and per
    distinct caption, its negatives' text indices grouped by edit kind."""
    if not cfg.hard_negatives:
        return list(unique), []
    grouped = [
        _preferred_kinds(hard_negatives_by_kind(caption), cfg.hard_negative_kinds) for caption in unique
    ]
    text_index = {caption: i for i, caption in enumerate(unique)}
    for kinds in grouped:
        for group in kinds:
            for negative in group:
                text_index.setdefault(negative, len(text_index))
    negative_kinds = [[[text_index[n] for n in group] for group in kinds] for kinds in grouped]
    return list(text_index), negative_kinds


def _contrastive_loss(logits: torch.Tensor, ids: torch.Tensor, text_ids: torch.Tensor) -> torch.Tensor:
    """Symmetric InfoNCE over logits [B, T] (images x texts, the batch's own captions first).

    A text is a positive of every row with the same caption id; a hard negative that happens to be
    another row's caption is that row's positive (its text index is that caption's id). Text-to-image
    ranks the batch's images for the batch's own captions only.
    """
    positives = (ids[:, None] == text_ids[None, :]).float().to(logits.device)
    batch = len(ids)
    image_to_text = F.cross_entropy(logits, positives / positives.sum(1, keepdim=True))
    same_caption = positives[:, :batch]  # symmetric
    text_to_image = F.cross_entropy(logits[:, :batch].T, same_caption / same_caption.sum(1, keepdim=True))
    return 0.5 * (image_to_text + text_to_image)


def _preferred_kinds(by_kind: dict[str, list[str]], preferred: tuple[str, ...]) -> list[list[str]]:
    """The groups of ``preferred`` kinds when the caption has any, else all of its groups; held-out
    captions left out, so that evaluation prompts stay text the CLIP never saw, not even as negatives."""
    by_kind = {
        kind: kept for kind, group in by_kind.items() if (kept := [n for n in group if not is_heldout(n)])
    }
    picked = [group for kind, group in by_kind.items() if kind in preferred]
    return picked or list(by_kind.values())


def _draw_negatives(
    negative_kinds: list[list[list[int]]], ids: torch.Tensor, per_image: int, rng: np.random.Generator
) -> torch.Tensor:
    """[B x per_image] text indices: for each row, ``per_image`` hard negatives of its caption, each
    drawn from an edit kind chosen uniformly (so position and binding, a few edits each, are drawn as
    often as colour, which has seven)."""
    drawn: list[int] = []
    if per_image == 0:
        return torch.tensor(drawn, dtype=torch.long)
    for caption in ids.tolist():
        kinds = negative_kinds[caption]
        for _ in range(per_image if kinds else 0):
            group = kinds[rng.integers(len(kinds))]
            drawn.append(group[rng.integers(len(group))])
    return torch.tensor(drawn, dtype=torch.long)
