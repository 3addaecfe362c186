"""AdamW for every model this project trains (U-Net, bootstrap CLIP and autoencoder).

torch's fused AdamW kernel (``fused=True``, on CPU since torch 2.4) updates all parameters in one pass
instead of a loop of small tensor ops. On 2 CPU cores the demo U-Net's optimizer step took 4 ms fused
against 16 ms unfused, 4-12% of its whole training step (docs/TRAINING.md, turn 11).
The update is AdamW's all the same; only the kernel differs.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch

FUSED_DEVICES = ("cpu", "cuda")


def adamw(params: Iterable[Any], **options: Any) -> torch.optim.AdamW:
    """``torch.optim.AdamW`` over ``params`` (tensors or param groups), fused where torch has the kernel."""
    params = list(params)
    tensors = [p for group in params for p in (group["params"] if isinstance(group, dict) else [group])]
    fused = bool(tensors) and all(t.device.type in FUSED_DEVICES and t.is_floating_point() for t in tensors)
    return torch.optim.AdamW(params, fused=fused or None, **options)
