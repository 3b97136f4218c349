"""Frozen BatchNorm folded into the conv before it: same outputs and gradients, or no fold."""

from __future__ import annotations

import copy
import pickle

import pytest
import timm
import torch
from torch import nn

from vision_ft.finetune.freezing import train_mode_with_frozen_bn
from vision_ft.finetune.lora import apply_lora, lora_modules, merge_lora
from vision_ft.finetune.norm_folding import (
    FoldedBatchNorm2d,
    FoldingConv2d,
    FoldingConv2dSame,
    fold_norms_into,
    norm_is_frozen,
    unfold_norms,
)


def _pretrained_looking(model: nn.Module, seed: int = 0) -> None:
    """BN statistics and affine far from the identity, and a non-zero B in every adapter: a fold
    that dropped the scale, the shift or the conv bias would change the outputs."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, nn.BatchNorm2d):
                module.running_mean.copy_(torch.rand(module.num_features, generator=g) - 0.5)
                module.running_var.copy_(torch.rand(module.num_features, generator=g) * 2 + 0.3)
                if module.weight is not None:
                    module.weight.copy_(torch.rand(module.num_features, generator=g) + 0.5)
                    module.bias.copy_(torch.rand(module.num_features, generator=g) - 0.5)
        for _, module in lora_modules(model):
            module.lora_b.copy_(torch.randn(module.lora_b.shape, generator=g) * 0.1)


def _folded_norms(model: nn.Module) -> list[str]:
    return [name for name, module in model.named_modules() if type(module).__name__.startswith("Folded")]


def _step(model: nn.Module, x: torch.Tensor, frozen_bn: str = "freeze") -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    train_mode_with_frozen_bn(model, frozen_bn)
    y = model(x)
    (y.square().sum() + y.sum()).backward()
    grads = {name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None}
    model.zero_grad(set_to_none=True)
    return y.detach(), grads


def _assert_same(a: tuple[torch.Tensor, dict], b: tuple[torch.Tensor, dict]) -> None:
    (y_a, g_a), (y_b, g_b) = a, b
    torch.testing.assert_close(y_a, y_b, rtol=1e-4, atol=1e-4)
    assert g_a.keys() == g_b.keys() and g_a
    for name in g_a:  # float32 sums in another order: tolerance relative to the gradient's scale
        scale = g_b[name].abs().max().item()
        torch.testing.assert_close(g_a[name], g_b[name], rtol=1e-3, atol=1e-4 * scale + 1e-9, msg=name)


@pytest.mark.parametrize("name, expected_folds", [("resnet18", 20), ("tf_efficientnet_lite0", 49)])
def test_folded_training_step_matches_the_plain_bn_layers(name, expected_folds):
    torch.manual_seed(0)
    model = timm.create_model(name, pretrained=False, num_classes=3)
    apply_lora(model, r=4, alpha=8)
    _pretrained_looking(model)
    plain = copy.deepcopy(model)
    unfold_norms(plain)
    assert len(_folded_norms(model)) == expected_folds  # every conv -> BN pair in both families
    assert not _folded_norms(plain)
    assert model.state_dict().keys() == plain.state_dict().keys()

    x = torch.randn(2, 3, 64, 64)
    _assert_same(_step(model, x), _step(plain, x))
    # Only adapters and head train; the frozen BN layers' statistics did not move.
    torch.testing.assert_close(model.state_dict(), plain.state_dict())

    model.eval(), plain.eval()
    with torch.no_grad():
        torch.testing.assert_close(model(x), plain(x), rtol=1e-4, atol=1e-4)


def test_bn_layers_that_train_are_not_folded():
    """LoRA with train_norm, or BN in training mode (frozen_bn: train): the BN layer runs itself,
    and its statistics or affine parameters change as without folding."""
    torch.manual_seed(0)
    model = timm.create_model("resnet18", pretrained=False, num_classes=3)
    apply_lora(model, r=4, alpha=8, train_norm=True)
    _pretrained_looking(model)
    plain = copy.deepcopy(model)
    unfold_norms(plain)
    x = torch.randn(4, 3, 64, 64)
    norm = model.get_submodule("layer1.0.bn1")
    assert isinstance(norm, FoldedBatchNorm2d) and not norm_is_frozen(norm)
    folded_step, plain_step = _step(model, x), _step(plain, x)
    _assert_same(folded_step, plain_step)
    assert any(name.endswith("bn1.weight") for name in folded_step[1])

    model.requires_grad_(False)
    plain.requires_grad_(False)
    for m in (model, plain):  # frozen parameters but batch statistics: BN must still run itself
        m.train()
        with torch.no_grad():
            y = m(x)
        m.eval()
        assert torch.isfinite(y).all()
    torch.testing.assert_close(model.state_dict(), plain.state_dict())  # running stats moved alike


class _SharedOutput(nn.Module):
    """conv1's output feeds its BN and a shortcut; bn2 normalises a sum, not a conv output."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1, self.bn1 = nn.Conv2d(3, 4, 3, padding=1), nn.BatchNorm2d(4)
        self.conv2, self.bn2 = nn.Conv2d(4, 4, 1), nn.BatchNorm2d(4)
        self.conv3, self.bn3 = nn.Conv2d(4, 4, 1), nn.BatchNorm2d(4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        a = self.conv1(x)
        b = self.bn1(a) + a
        c = self.bn2(self.conv2(b) + 1)
        return self.bn3(self.conv3(c))


def test_only_exclusive_conv_to_bn_pairs_fold():
    model = _SharedOutput()
    apply_lora(model, r=2, alpha=4)
    _pretrained_looking(model)
    assert _folded_norms(model) == ["bn3"]
    plain = copy.deepcopy(model)
    unfold_norms(plain)
    x = torch.randn(2, 3, 8, 8)
    _assert_same(_step(model, x), _step(plain, x))


def test_merging_copying_and_pickling_a_folded_model():
    torch.manual_seed(0)
    model = timm.create_model("tf_efficientnet_lite0", pretrained=False, num_classes=3)
    apply_lora(model, r=4, alpha=8)
    _pretrained_looking(model)
    model.eval()
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        expected = model(x)
        # Copies fold their own BN layers (not the original's), and pickle round-trips.
        for clone in (copy.deepcopy(model), pickle.loads(pickle.dumps(model))):
            conv = clone.get_submodule("conv_stem")
            assert conv.folded_norm is clone.get_submodule("bn1")
            torch.testing.assert_close(clone(x), expected)
        merged = merge_lora(copy.deepcopy(model))
        # Exported models hold plain BN layers again, with the adapter merged into W.
        assert not _folded_norms(merged)
        torch.testing.assert_close(merged(x), expected, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("frozen", ["all but the head", "the first half"])
def test_plain_frozen_convs_fold_like_linear_probing_and_partial_freezing(frozen):
    """Without adapters: plain convs (and timm's TF-'SAME' Conv2dSame) apply their frozen BN;
    where a BN layer trains (partial freezing's upper half) it runs itself, with equal gradients."""
    torch.manual_seed(0)
    model = timm.create_model("tf_efficientnet_lite0", pretrained=False, num_classes=3)
    _pretrained_looking(model)
    names = [name for name, _ in model.named_parameters()]
    trainable = {n for n in names if n.startswith("classifier.")}
    if frozen == "the first half":
        trainable |= set(names[len(names) // 2:])
    for name, param in model.named_parameters():
        param.requires_grad_(name in trainable)
    # float64: the upper half's BN layers normalise with the statistics of a 2-image batch, which
    # on a random network magnify float32 rounding differences to a few per cent.
    model.double()
    plain = copy.deepcopy(model)
    folded_names = fold_norms_into(model)
    assert len(folded_names) == 49
    conv_classes = {type(m) for m in model.modules() if isinstance(m, nn.Conv2d)}
    assert conv_classes == {FoldingConv2d, FoldingConv2dSame}
    x = torch.randn(2, 3, 64, 64, dtype=torch.float64)
    _assert_same(_step(model, x), _step(plain, x))
    active = sum(norm_is_frozen(model.get_submodule(name)) for name in folded_names)
    assert (active == 49) == (frozen == "all but the head") and active > 0
    torch.testing.assert_close(model.state_dict(), plain.state_dict())

    unfold_norms(model)  # back to the classes timm built, nothing left behind
    assert {type(m) for m in model.modules()} == {type(m) for m in plain.modules()}
    assert not any("folded_norm" in vars(m) for m in model.modules())
