"""LoRA modules, injection into timm models, merging and adapter checkpoints."""

from __future__ import annotations

import copy

import pytest
import timm
import torch
from timm.layers import Conv2dSame
from torch import nn

from vision_ft.errors import VisionFTError
from vision_ft.finetune.lora import (
    LoRAConv2d,
    LoRALinear,
    apply_lora,
    load_lora_state_dict,
    lora_modules,
    lora_state_dict,
    merge_lora,
)


def _randomise_b(model_or_module: nn.Module, seed: int = 0) -> None:
    """A trained-looking adapter: B is zero at init, which would hide every bug."""
    g = torch.Generator().manual_seed(seed)
    modules = [model_or_module] if isinstance(model_or_module, (LoRAConv2d, LoRALinear)) else \
        [m for _, m in lora_modules(model_or_module)]
    with torch.no_grad():
        for module in modules:
            module.lora_b.copy_(torch.randn(module.lora_b.shape, generator=g) * 0.1)


CONVS = {
    "plain_3x3": lambda: nn.Conv2d(6, 8, 3, padding=1),
    "strided_no_bias": lambda: nn.Conv2d(6, 8, 3, stride=2, padding=1, bias=False),
    "dilated": lambda: nn.Conv2d(6, 8, 3, padding=2, dilation=2),
    "same_even_kernel": lambda: nn.Conv2d(6, 8, 4, padding="same"),  # asymmetric: one pixel more after
    "same_dilated": lambda: nn.Conv2d(6, 8, 3, padding="same", dilation=2),
    "valid_5x5": lambda: nn.Conv2d(6, 8, 5, padding="valid"),
    "tuple_padding": lambda: nn.Conv2d(6, 8, (3, 5), padding=(1, 2), stride=(1, 2)),
    "reflect": lambda: nn.Conv2d(6, 8, 3, padding=1, padding_mode="reflect"),
    "replicate_strided": lambda: nn.Conv2d(6, 8, 3, stride=2, padding=1, padding_mode="replicate"),
    "circular_same": lambda: nn.Conv2d(6, 8, 3, padding="same", padding_mode="circular"),
    "grouped": lambda: nn.Conv2d(6, 8, 3, padding=1, groups=2),
    "depthwise_strided": lambda: nn.Conv2d(6, 6, 3, stride=2, padding=1, groups=6),
    "depthwise_reflect_dilated": lambda: nn.Conv2d(6, 12, 3, padding=2, dilation=2, groups=6, padding_mode="reflect"),
    "timm_conv2d_same_strided": lambda: Conv2dSame(6, 8, 3, stride=2),
}


@pytest.mark.filterwarnings("ignore:Using padding='same' with even kernel")  # torch's own conv, the reference
@pytest.mark.parametrize("make_conv", list(CONVS.values()), ids=list(CONVS))
def test_lora_conv_matches_merged_conv_for_every_conv_flavour(make_conv):
    torch.manual_seed(0)
    conv = make_conv()
    x = torch.randn(2, 6, 11, 10)
    base_out = conv(x)
    base_weight = conv.weight.detach().clone()
    lora = LoRAConv2d(conv, r=3, alpha=6.0)
    torch.testing.assert_close(lora(x), base_out)  # B = 0: a fresh adapter changes nothing

    _randomise_b(lora)
    unmerged = lora(x)
    assert not torch.allclose(unmerged, base_out, atol=1e-3)
    reference = copy.deepcopy(conv)  # the same conv type with W + scaling * B @ A: the definition of the delta
    with torch.no_grad():
        reference.weight.add_(lora.delta_weight())
    torch.testing.assert_close(unmerged, reference(x), atol=1e-5, rtol=1e-4)

    lora.merge()
    torch.testing.assert_close(lora(x), unmerged, atol=1e-5, rtol=1e-4)
    plain = lora.to_base()
    assert type(plain) is type(conv)
    torch.testing.assert_close(plain(x), unmerged, atol=1e-5, rtol=1e-4)
    lora.unmerge()
    torch.testing.assert_close(lora.weight, base_weight, atol=1e-6, rtol=0)
    torch.testing.assert_close(lora(x), unmerged, atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("make_conv", [CONVS["plain_3x3"], CONVS["reflect"], CONVS["depthwise_strided"]],
                         ids=["plain", "reflect", "depthwise"])
def test_lora_conv_grads_reach_only_the_adapter(make_conv):
    torch.manual_seed(0)
    lora = LoRAConv2d(make_conv(), r=2)
    _randomise_b(lora)
    x = torch.randn(2, 6, 9, 9, requires_grad=True)
    lora(x).square().mean().backward()
    assert lora.weight.grad is None and (lora.bias is None or lora.bias.grad is None)
    assert lora.lora_a.grad is not None and lora.lora_a.grad.abs().sum() > 0
    assert lora.lora_b.grad is not None and x.grad is not None


def test_dropout_trains_unfused_and_is_identity_in_eval():
    torch.manual_seed(0)
    lora = LoRAConv2d(nn.Conv2d(6, 8, 3, padding=1, padding_mode="reflect"), r=4, dropout=0.5)
    _randomise_b(lora)
    x = torch.randn(2, 6, 8, 8)
    lora.eval()
    eval_out = lora(x)
    lora.merge()
    torch.testing.assert_close(lora(x), eval_out, atol=1e-5, rtol=1e-4)
    lora.unmerge()
    lora.train()
    train_out = lora(x)
    assert train_out.shape == eval_out.shape and not torch.allclose(train_out, eval_out)
    train_out.sum().backward()
    assert lora.lora_a.grad is not None


def test_rslora_scaling():
    conv = nn.Conv2d(4, 4, 1)
    assert LoRAConv2d(conv, r=16, alpha=8).scaling == pytest.approx(0.5)
    assert LoRAConv2d(nn.Conv2d(4, 4, 1), r=16, alpha=8, rslora=True).scaling == pytest.approx(2.0)


def test_lora_linear_merge_unmerge_and_grads():
    torch.manual_seed(0)
    linear = nn.Linear(10, 7)
    x = torch.randn(3, 5, 10)
    base_out, base_weight = linear(x), linear.weight.detach().clone()
    lora = LoRALinear(linear, r=4, alpha=8)
    torch.testing.assert_close(lora(x), base_out)
    _randomise_b(lora)
    out = lora(x)
    assert not torch.allclose(out, base_out, atol=1e-3)
    out.square().mean().backward()
    assert lora.weight.grad is None and lora.lora_a.grad is not None and lora.lora_b.grad is not None
    lora.merge()
    torch.testing.assert_close(lora(x), out, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(lora.to_base()(x), out, atol=1e-5, rtol=1e-4)
    lora.unmerge()
    torch.testing.assert_close(lora.weight, base_weight, atol=1e-6, rtol=0)


def _timm(name: str) -> nn.Module:
    torch.manual_seed(0)
    kwargs = {"img_size": 32} if name.startswith("vit") else {}
    return timm.create_model(name, pretrained=False, num_classes=5, **kwargs).eval()


# name -> (input size, expected LoRA module types, layer the default targets must include)
TIMM_MODELS = {
    "resnet18": (32, {LoRAConv2d}, "layer1.0.conv1"),
    "tf_efficientnet_lite0": (32, {LoRAConv2d}, "blocks.1.0.conv_dw"),
    "vit_tiny_patch16_224": (32, {LoRAConv2d, LoRALinear}, "blocks.0.attn.qkv"),
}


@pytest.mark.parametrize("name", list(TIMM_MODELS))
def test_apply_lora_on_timm_models(name):
    size, expected_types, must_wrap = TIMM_MODELS[name]
    model = _timm(name)
    x = torch.randn(2, 3, size, size)
    base_out = model(x)
    head = model.get_classifier()
    wrapped = apply_lora(model, r=4, alpha=8)

    assert must_wrap in wrapped
    assert {type(m) for _, m in lora_modules(model)} == expected_types
    assert [n for n, _ in lora_modules(model)] == wrapped
    assert model.get_classifier() is head and type(head) is nn.Linear  # the head is never wrapped
    if name.startswith("vit"):
        linear_names = {n.rsplit(".", 1)[-1] for n, m in lora_modules(model) if isinstance(m, LoRALinear)}
        assert linear_names == {"qkv", "proj", "fc1", "fc2"}
    torch.testing.assert_close(model(x), base_out)

    _randomise_b(model)
    model.train()
    model(x).logsumexp(1).mean().backward()
    head_params = {id(p) for p in head.parameters()}
    for param_name, param in model.named_parameters():
        trains = param_name.endswith(("lora_a", "lora_b")) or id(param) in head_params
        assert param.requires_grad == trains, param_name
        assert (param.grad is not None) == trains, param_name


@pytest.mark.parametrize("name", list(TIMM_MODELS))
def test_merge_lora_leaves_plain_layers_with_the_same_outputs(name):
    size = TIMM_MODELS[name][0]
    model = _timm(name)
    x = torch.randn(2, 3, size, size)
    base_out = model(x)
    apply_lora(model, r=4, alpha=8)
    _randomise_b(model)
    lora_out = model(x)
    assert not torch.allclose(lora_out, base_out, atol=1e-4)
    merged = merge_lora(model)
    assert merged is model
    assert not any(isinstance(m, (LoRAConv2d, LoRALinear)) for m in model.modules())
    assert not any("lora" in key for key in model.state_dict())
    torch.testing.assert_close(model(x), lora_out, atol=1e-4, rtol=1e-3)
    assert set(model.state_dict()) == set(_timm(name).state_dict())  # loads into a fresh model of the name


def test_train_norm_and_target_patterns():
    model = _timm("resnet18")
    wrapped = apply_lora(model, target_patterns=["layer1.*", "downsample.0"], train_norm=True)
    assert wrapped == ["layer1.0.conv1", "layer1.0.conv2", "layer1.1.conv1", "layer1.1.conv2",
                       "layer2.0.downsample.0", "layer3.0.downsample.0", "layer4.0.downsample.0"]
    assert model.bn1.weight.requires_grad and model.layer4[1].bn2.bias.requires_grad
    assert not model.conv1.weight.requires_grad and model.fc.weight.requires_grad


def test_linear_only_targets_on_vit():
    model = _timm("vit_tiny_patch16_224")
    wrapped = apply_lora(model, target_types=("linear",))
    assert "patch_embed.proj" not in wrapped and type(model.patch_embed.proj) is nn.Conv2d


@pytest.mark.parametrize("patterns, message", [
    (["layer9.*"], "matches no layer"),
    (["fc"], "classifier head"),
    (["layer1.0"], "type BasicBlock"),
])
def test_targets_that_select_nothing_raise(patterns, message):
    with pytest.raises(VisionFTError, match=message):
        apply_lora(_timm("resnet18"), target_patterns=patterns)


def test_apply_lora_twice_raises():
    model = _timm("resnet18")
    apply_lora(model)
    with pytest.raises(VisionFTError, match="already has LoRA"):
        apply_lora(model)


def test_adapter_state_round_trip():
    base = _timm("tf_efficientnet_lite0")
    trained, fresh = copy.deepcopy(base), copy.deepcopy(base)
    apply_lora(trained, r=4)
    apply_lora(fresh, r=4)
    _randomise_b(trained)
    state = lora_state_dict(trained)
    assert state and all(key.endswith(("lora_a", "lora_b")) for key in state)
    adapter_size = sum(t.numel() for t in state.values())
    assert adapter_size < sum(p.numel() for p in base.parameters()) / 5
    load_lora_state_dict(fresh, state)
    x = torch.randn(2, 3, 32, 32)
    torch.testing.assert_close(fresh(x), trained(x))

    fresh_merged = copy.deepcopy(fresh)
    fresh_merged.conv_stem.merge()  # loading onto merged layers re-merges the new values
    load_lora_state_dict(fresh_merged, lora_state_dict(trained))
    torch.testing.assert_close(fresh_merged(x), trained(x), atol=1e-5, rtol=1e-4)


def test_mismatched_adapter_state_is_one_clear_line():
    trained, other = _timm("resnet18"), _timm("resnet18")
    apply_lora(trained, r=8)
    apply_lora(other, r=4)
    with pytest.raises(VisionFTError) as err:
        load_lora_state_dict(other, lora_state_dict(trained))
    message = str(err.value)
    assert "\n" not in message
    assert "'conv1.lora_a'" in message and "(8, 3, 7, 7)" in message and "(4, 3, 7, 7)" in message
    assert "r=8" in message

    partial = _timm("resnet18")
    apply_lora(partial, r=8, target_patterns=["layer1.*"])
    with pytest.raises(VisionFTError, match="'conv1.lora_a' has no LoRA layer"):
        load_lora_state_dict(partial, lora_state_dict(trained))
    with pytest.raises(VisionFTError, match="lacks 'conv1.lora_a'"):
        load_lora_state_dict(trained, {})
    with pytest.raises(VisionFTError, match="no LoRA adapters"):
        load_lora_state_dict(_timm("resnet18"), lora_state_dict(trained))
