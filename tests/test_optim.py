"""ldm.optim.adamw: the fused kernel where torch has it, and AdamW's update all the same."""

from __future__ import annotations

import pytest
import torch

from ldm.optim import adamw


def _model() -> torch.nn.Module:
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.LayerNorm(16), torch.nn.Linear(16, 1))


def _steps(fused_or_not: str) -> list[torch.Tensor]:
    model = _model()
    groups = [
        {"params": [p for p in model.parameters() if p.ndim >= 2], "weight_decay": 0.1},
        {"params": [p for p in model.parameters() if p.ndim < 2], "weight_decay": 0.0},
    ]
    if fused_or_not == "fused":
        optimizer = adamw(groups, lr=1e-2, betas=(0.9, 0.98))
        assert optimizer.defaults["fused"] is True
    else:
        optimizer = torch.optim.AdamW(groups, lr=1e-2, betas=(0.9, 0.98))
        assert not optimizer.defaults["fused"]
    data = torch.randn(32, 8, generator=torch.Generator().manual_seed(1))
    for _ in range(5):
        model(data).pow(2).mean().backward()
        optimizer.step()
        optimizer.zero_grad()
    return [p.detach().clone() for p in model.parameters()]


def test_fused_adamw_takes_the_same_steps_as_torchs_default():
    fused, plain = _steps("fused"), _steps("plain")
    initial = [p.detach() for p in _model().parameters()]
    assert any(not torch.equal(a, b) for a, b in zip(fused, initial, strict=True))  # it did train
    for a, b in zip(fused, plain, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def test_an_empty_parameter_list_is_refused_as_torch_refuses_it():
    with pytest.raises(ValueError, match="empty parameter list"):
        adamw([], lr=1e-3)
