"""One head detector for layer groups, LoRA targets, weight loading and head initialisation."""

from __future__ import annotations

import pytest
import timm
import torch
from torch import nn

from vision_ft.finetune.layer_groups import layer_groups
from vision_ft.finetune.lora import apply_lora, lora_modules
from vision_ft.finetune.lora_targets import find_lora_targets
from vision_ft.models.create import NEW_HEAD_STD, init_new_head
from vision_ft.models.head import head_names, head_param_names
from vision_ft.models.weights import load_into_model

DISTILLED = "deit_tiny_distilled_patch16_224"


def distilled(num_classes: int = 3) -> nn.Module:
    torch.manual_seed(0)
    return timm.create_model(DISTILLED, num_classes=num_classes, pretrained=False, img_size=32)


@pytest.mark.parametrize("name, expected", [
    ("resnet18", ["fc"]), ("convnext_atto", ["head.fc"]), ("tf_efficientnet_lite0", ["classifier"]),
    (DISTILLED, ["head", "head_dist"]),
])
def test_heads_come_from_get_classifier(name, expected):
    kwargs = {"img_size": 32} if "deit" in name else {}
    with torch.device("meta"):
        model = timm.create_model(name, num_classes=3, pretrained=False, **kwargs)
    assert head_names(model) == expected


def test_both_heads_of_a_distilled_model_are_the_head_everywhere():
    model = distilled()
    heads = {"head.weight", "head.bias", "head_dist.weight", "head_dist.bias"}
    assert set(head_param_names(model)) == heads
    assert set(layer_groups(model)[-1].param_names) == heads
    targets = find_lora_targets(model, target_types=("linear",))
    assert targets and not {"head", "head_dist"} & set(targets)  # LoRA never wraps a head
    apply_lora(model, r=2, target_types=("linear",))
    assert not any(name.startswith("head") for name, _ in lora_modules(model))
    assert heads <= {n for n, p in model.named_parameters() if p.requires_grad}


def test_pretrained_weights_drop_both_distilled_heads_for_new_classes():
    pretrained = distilled(num_classes=1000).state_dict()
    model = distilled(num_classes=3)
    report = load_into_model(model, pretrained, "deit-imagenet")
    assert sorted(report.dropped_head) == ["head.bias", "head.weight", "head_dist.bias", "head_dist.weight"]
    assert torch.equal(model.blocks[0].attn.qkv.weight, pretrained["blocks.0.attn.qkv.weight"])
    init_new_head(model)
    for head in (model.head, model.head_dist):
        assert head.weight.abs().max() <= 2 * NEW_HEAD_STD and not head.bias.any()


def test_a_model_without_get_classifier_takes_its_last_child_with_parameters():
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU(), nn.Flatten(), nn.Linear(4, 2), nn.Softmax(dim=1))
    assert head_names(model) == ["3"]
    assert find_lora_targets(model) == ["0"]
