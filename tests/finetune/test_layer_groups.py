"""Layer groups follow each backbone's own timm grouping, stem first, head last."""

from __future__ import annotations

import pytest
import timm
import torch
from torch import nn

from vision_ft.finetune.layer_groups import group_index_of_params, group_names, layer_groups


def meta_model(name: str, **kwargs) -> nn.Module:
    # Grouping only reads names and shapes: the meta device skips allocation and initialisation.
    with torch.device("meta"):
        return timm.create_model(name, num_classes=4, pretrained=False, **kwargs)


EXPECTED = {
    "resnet18": ["conv1+bn1", "layer1", "layer2", "layer3", "layer4", "fc"],
    "vit_tiny_patch16_224": ["cls_token+pos_embed+patch_embed", *[f"blocks.{i}" for i in range(11)], "blocks.11+norm", "head"],
    "tf_efficientnet_lite0": ["conv_stem+bn1", *[f"blocks.{i}" for i in range(6)], "blocks.6+conv_head+bn2", "classifier"],
    # timm leaves ConvNeXt's final norm (head.norm) unmatched; it joins the last stage, the classifier stays alone.
    "convnext_atto": ["stem", "stages.0", "stages.1", "stages.2", "stages.3+head.norm", "head.fc"],
}


@pytest.mark.parametrize("name", list(EXPECTED))
def test_groups_come_in_order_with_the_head_last(name):
    model = meta_model(name)
    groups = layer_groups(model)
    assert [g.name for g in groups] == EXPECTED[name]
    assert [g.index for g in groups] == list(range(len(groups)))
    assert [g.is_head for g in groups] == [False] * (len(groups) - 1) + [True]
    head_params = {n for n, _ in model.get_classifier().named_parameters()}
    assert {n.rsplit(".", 1)[-1] for n in groups[-1].param_names} == head_params


@pytest.mark.parametrize("name", list(EXPECTED))
def test_every_parameter_is_in_exactly_one_group(name):
    model = meta_model(name)
    groups = layer_groups(model)
    names = [n for g in groups for n in g.param_names]
    assert sorted(names) == sorted(n for n, _ in model.named_parameters())
    assert len(names) == len(set(names))


def test_group_order_follows_the_forward_pass_in_resnet():
    groups = group_index_of_params(layer_groups(meta_model("resnet18")))
    assert groups["conv1.weight"] < groups["layer1.0.conv1.weight"] < groups["layer4.1.bn2.bias"] < groups["fc.weight"]


def test_model_without_group_matcher_falls_back_to_top_level_children():
    model = nn.Sequential()
    model.add_module("stem", nn.Conv2d(3, 8, 3))
    model.add_module("stages", nn.Sequential(nn.Conv2d(8, 8, 3), nn.Conv2d(8, 8, 3)))
    model.add_module("pool", nn.AdaptiveAvgPool2d(1))
    model.add_module("flatten", nn.Flatten())
    model.add_module("fc", nn.Linear(8, 2))
    assert [g.name for g in layer_groups(model)] == ["stem", "stages.0", "stages.1", "fc"]


def test_labels_name_the_shallowest_modules_wholly_inside_a_group():
    grouping = [["conv1.weight", "bn1.weight", "bn1.bias"], ["layer1.0.conv1.weight", "layer1.1.conv1.weight"],
                ["layer2.0.conv1.weight", "fc2.weight"], ["fc.weight", "fc.bias"]]
    assert group_names(grouping) == ["conv1+bn1", "layer1", "layer2+fc2", "fc"]


def test_lora_adapters_fall_into_the_group_of_the_layer_they_wrap():
    from vision_ft.finetune.lora import apply_lora

    model = timm.create_model("resnet18", num_classes=4, pretrained=False)
    apply_lora(model, r=2)
    groups = layer_groups(model)
    assert [g.name for g in groups] == EXPECTED["resnet18"]
    index = group_index_of_params(groups)
    assert index["layer3.0.conv1.lora_a"] == index["layer3.0.conv1.weight"] == 3
