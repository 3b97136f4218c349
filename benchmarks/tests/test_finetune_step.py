"""benchmarks/finetune_step.py: each method trains what `vision-ft train` would, in its BN mode."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest
from torch import nn

SCRIPT = Path(__file__).resolve().parents[1] / "finetune_step.py"


@pytest.fixture(scope="module")
def finetune_step():
    spec = importlib.util.spec_from_file_location("finetune_step", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


def _batchnorms(model: nn.Module) -> list[nn.Module]:
    return [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]


@pytest.mark.parametrize("method", ["floor", "floor-folded", "vision-ft", "peft"])
def test_frozen_methods_run_their_batchnorm_in_eval_mode(finetune_step, method):
    if method == "peft":
        pytest.importorskip("peft")
    model = finetune_step.build("resnet18", method, rank=4)
    norms = _batchnorms(model)
    assert norms and not any(m.training for m in norms)
    assert not any(p.requires_grad for m in norms for p in m.parameters())
    trainable = {name for name, p in model.named_parameters() if p.requires_grad}
    if method.startswith("floor"):
        assert not trainable
    else:  # adapters and the head, nothing of the frozen backbone
        assert trainable and all("lora" in name or name.startswith("fc.") for name in trainable)
        assert any(name.startswith("fc.") for name in trainable)


def test_full_fine_tuning_trains_every_batchnorm(finetune_step):
    model = finetune_step.build("resnet18", "full", rank=4)
    assert all(m.training for m in _batchnorms(model))
    assert all(p.requires_grad for p in model.parameters())


def test_the_folded_floor_computes_what_the_floor_computes(finetune_step):
    """Same outputs and input gradients from the same weights; its BN layers pass through."""
    import torch

    floor = finetune_step.build("resnet18", "floor", rank=4)
    with torch.no_grad():  # statistics far from the identity
        for norm in _batchnorms(floor):
            stats = torch.rand(2, norm.num_features) + 0.5
            norm.running_mean.copy_(stats[0] - 1), norm.running_var.copy_(stats[1])
    folded = finetune_step.build("resnet18", "floor", rank=4)
    folded.load_state_dict(floor.state_dict())
    finetune_step.fuse_frozen_conv_norms(folded)
    assert all(type(m).__name__ == "FoldedBatchNorm2d" for m in _batchnorms(folded))
    x = torch.randn(2, 3, 64, 64, requires_grad=True)
    grads = []
    for model in (floor, folded):
        y = model(x)
        grads.append((y.detach(), torch.autograd.grad(y.square().sum(), x)[0]))
    torch.testing.assert_close(grads[0][0], grads[1][0], rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(grads[0][1], grads[1][1], rtol=1e-3, atol=1e-3 * grads[0][1].abs().max().item())
