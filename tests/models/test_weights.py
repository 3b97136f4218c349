import argparse

import pytest
import timm
import torch
from safetensors.torch import load_file, save_file

from vision_ft.errors import VisionFTError
from vision_ft.models.create import check_model_name, create_model
from vision_ft.models.import_weights import import_weights
from vision_ft.models.weights import load_into_model, read_state_dict


def _resnet_state(num_classes=1000):
    torch.manual_seed(0)
    return timm.create_model("resnet18", num_classes=num_classes).state_dict()


def test_unknown_model_suggests_close_names():
    with pytest.raises(VisionFTError, match=r"unknown model 'resnet5O'; did you mean resnet50"):
        check_model_name("resnet5O")
    check_model_name("resnet50.a1_in1k")  # a pretrained tag of a known model


def test_local_file_loads_with_head_dropped_for_new_classes(tmp_path):
    state = _resnet_state()
    path = tmp_path / "r18.safetensors"
    save_file({k: v.contiguous() for k, v in state.items()}, str(path))
    model = create_model("resnet18", num_classes=4, weights=str(path))
    report = load_into_model(timm.create_model("resnet18", num_classes=4), read_state_dict(path), "t")
    assert sorted(report.dropped_head) == ["fc.bias", "fc.weight"]
    assert not report.unexpected
    assert torch.equal(model.conv1.weight, state["conv1.weight"])
    assert model.fc.out_features == 4
    # The new head starts small, so every class starts near equal probability on real features.
    assert model.fc.weight.abs().max() <= 0.02 and not model.fc.bias.any()


def test_new_head_starts_near_uniform_on_an_efficientnet(tmp_path):
    # EfficientNet's own head init (uniform +-1/sqrt(classes)) gives a 2-class head logits of
    # +-15 on pretrained features; the replaced head must start far smaller.
    torch.manual_seed(0)
    source = timm.create_model("tf_efficientnet_lite0", num_classes=1000)
    path = tmp_path / "lite0.safetensors"
    save_file({k: v.contiguous() for k, v in source.state_dict().items()}, str(path))
    model = create_model("tf_efficientnet_lite0", num_classes=2, weights=str(path)).eval()
    scratch = create_model("tf_efficientnet_lite0", num_classes=2, weights="none").eval()
    scratch.load_state_dict({k: v for k, v in model.state_dict().items() if not k.startswith("classifier.")},
                            strict=False)  # same backbone, timm's own head init
    images = torch.rand(4, 3, 64, 64, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        new_logits, timm_logits = model(images), scratch(images)
    assert new_logits.abs().max() < 0.1 * timm_logits.abs().max()
    assert scratch.classifier.weight.abs().max() > 0.1  # training from scratch keeps timm's init


def test_pth_with_wrapper_and_module_prefix(tmp_path):
    state = {f"module.{k}": v for k, v in _resnet_state().items()}
    path = tmp_path / "ckpt.pth"
    torch.save({"state_dict": state, "epoch": 3}, path)
    model = create_model("resnet18", num_classes=1000, weights=str(path))
    assert torch.equal(model.fc.weight, state["module.fc.weight"])


def test_grey_model_folds_the_rgb_stem(tmp_path):
    state = _resnet_state()
    path = tmp_path / "r18.pth"
    torch.save(state, path)
    model = create_model("resnet18", num_classes=2, in_chans=1, weights=str(path))
    assert torch.allclose(model.conv1.weight, state["conv1.weight"].sum(dim=1, keepdim=True))


def test_pickled_objects_are_refused(tmp_path):
    path = tmp_path / "evil.pth"
    torch.save({"weights": torch.zeros(1), "args": argparse.Namespace(lr=0.1)}, path)  # needs full unpickling
    with pytest.raises(VisionFTError, match="pickled Python objects"):
        read_state_dict(path)


def test_corrupt_and_missing_files(tmp_path):
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(b"not a safetensors file")
    with pytest.raises(VisionFTError, match="cannot be read"):
        read_state_dict(bad)
    with pytest.raises(VisionFTError, match="does not exist"):
        read_state_dict(tmp_path / "nope.pth")
    with pytest.raises(VisionFTError, match="suffix '.txt'"):
        (tmp_path / "w.txt").write_text("x")
        read_state_dict(tmp_path / "w.txt")


def test_weights_of_another_architecture_are_refused(tmp_path):
    path = tmp_path / "r18.pth"
    torch.save(_resnet_state(), path)
    with pytest.raises(VisionFTError, match="leave 80 tensors of the model uninitialised"):
        create_model("resnet34", num_classes=2, weights=str(path))
    with pytest.raises(VisionFTError, match=r"do not fit the model: 'bn1.weight' is \(64,\) in the file but \(32,\)"):
        create_model("tf_efficientnet_lite0", num_classes=2, weights=str(path))
    renamed = tmp_path / "renamed.pth"
    torch.save({f"x.{k}": v for k, v in _resnet_state().items()}, renamed)
    with pytest.raises(VisionFTError, match="vision-ft weights import"):
        create_model("resnet18", num_classes=2, weights=str(renamed))


def test_import_by_order_renames_every_key(tmp_path):
    state = _resnet_state()
    foreign = {f"layer_{i:03d}": v for i, (k, v) in enumerate(state.items()) if not k.endswith("num_batches_tracked")}
    src = tmp_path / "foreign.pth"
    torch.save(foreign, src)
    result = import_weights(src, "resnet18", tmp_path / "out.safetensors")
    assert result.mapping == "order"
    converted = load_file(str(result.out))
    assert torch.equal(converted["layer4.1.bn2.running_var"], state["layer4.1.bn2.running_var"])
    with pytest.raises(VisionFTError, match="already exists"):
        import_weights(src, "resnet18", tmp_path / "out.safetensors")


def test_import_by_name_and_a_clear_mismatch(tmp_path):
    src = tmp_path / "r18.pth"
    torch.save(_resnet_state(), src)
    assert import_weights(src, "resnet18", tmp_path / "a.safetensors").mapping == "name"
    with pytest.raises(VisionFTError, match="holds 102 tensors but resnet34 has 182"):
        import_weights(src, "resnet34", tmp_path / "b.safetensors")
    state = _resnet_state()
    foreign = {f"t{i}": v for i, (k, v) in enumerate(state.items()) if not k.endswith("num_batches_tracked")}
    foreign["t0"] = torch.zeros(64, 3, 5, 5)  # a stem of another shape
    torch.save(foreign, src)
    with pytest.raises(VisionFTError, match=r"tensor #0 is 't0' \(64, 3, 5, 5\) in the file but 'conv1.weight'"):
        import_weights(src, "resnet18", tmp_path / "c.safetensors")
