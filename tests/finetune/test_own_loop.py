"""`vision_ft.finetune.prepare` and `vision_ft.lora` inside a hand-written loop, on NEU-DET images."""

from __future__ import annotations

import numpy as np
import pytest
import timm
import torch
from PIL import Image
from safetensors.torch import save_file

import vision_ft.lora as lora
from tests.real_data import NEU, needs_neu
from vision_ft.errors import VisionFTError
from vision_ft.finetune import prepare

pytestmark = needs_neu
CLASSES = ("crazing", "patches", "scratches")


@pytest.fixture(scope="module")
def batch() -> tuple[torch.Tensor, torch.Tensor]:
    """Four NEU-DET images per class at 32 px, scaled to 0..1, as a batch with labels."""
    images, labels = [], []
    for label, name in enumerate(CLASSES):
        for path in sorted((NEU / name).glob("*.jpg"))[:4]:
            grey = np.asarray(Image.open(path).convert("L").resize((32, 32)), dtype=np.float32) / 255.0
            images.append(np.stack([grey] * 3))
            labels.append(label)
    return torch.from_numpy(np.stack(images)), torch.tensor(labels)


def _model(seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    return timm.create_model("resnet18", num_classes=len(CLASSES))


def _steps(model, optimizer, batch, count=2) -> None:
    images, labels = batch
    for _ in range(count):
        loss = torch.nn.functional.cross_entropy(model(images), labels)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()


def test_progressive_prepare_unfreezes_on_schedule_in_a_plain_loop(batch):
    model = _model()
    groups, schedule = prepare(model, "progressive", lr=1e-3, unfreeze_every=1, lr_decay=0.5)
    optimizer = torch.optim.AdamW(groups)
    assert {g["layer_group"] for g in groups} == {"fc"}
    stem_before = model.conv1.weight.detach().clone()
    layer4_before = model.layer4[0].conv1.weight.detach().clone()
    bn_stats_before = model.layer4[0].bn1.running_mean.clone()

    assert schedule.on_epoch_start(1, optimizer) is False
    schedule.train_mode()
    _steps(model, optimizer, batch)
    assert torch.equal(model.layer4[0].conv1.weight, layer4_before)  # frozen in epoch 1
    assert torch.equal(model.layer4[0].bn1.running_mean, bn_stats_before)  # frozen BN keeps its statistics

    assert schedule.on_epoch_start(2, optimizer) is True  # layer4 joins at half the head's rate
    rates = {g["layer_group"]: g["lr"] for g in optimizer.param_groups}
    assert rates == {"fc": 1e-3, "layer4": 5e-4}
    schedule.train_mode()
    _steps(model, optimizer, batch)
    assert not torch.equal(model.layer4[0].conv1.weight, layer4_before)
    assert torch.equal(model.conv1.weight, stem_before)
    assert "layer3 at epoch 3" in schedule.describe()


def test_prepare_validates_settings_like_the_config():
    with pytest.raises(VisionFTError, match="bad value 'progresive' for 'finetune.strategy'"):
        prepare(_model(), "progresive")
    with pytest.raises(VisionFTError, match="unknown config key 'finetune.unfreeze_evry'"):
        prepare(_model(), "progressive", unfreeze_evry=2)
    with pytest.raises(VisionFTError, match="freeze_groups=9 but resnet18 has only 5 layer groups"):
        prepare(_model(), "partial", freeze_groups=9)


def test_lora_inject_train_save_load_and_merge(batch, tmp_path):
    model = _model()
    wrapped = lora.inject(model, r=4, targets=["layer3.*", "layer4.*"])
    assert wrapped and all(name.startswith(("layer3", "layer4")) for name in wrapped)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all("lora_" in n or n.startswith("fc.") for n in trainable)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    model.train()
    _steps(model, optimizer, batch, count=3)
    model.eval()
    images = batch[0]
    with torch.no_grad():
        trained = model(images)

    adapter = lora.save_adapter(model, tmp_path / "adapter.safetensors")
    fresh = _model()  # the same base weights, no adapters yet
    assert lora.load_adapter(fresh, adapter) == wrapped
    fresh.eval()
    with torch.no_grad():
        torch.testing.assert_close(fresh(images), trained)
        lora.merge(model)
        assert not any("lora" in type(m).__name__.lower() for m in model.modules())
        torch.testing.assert_close(model(images), trained, atol=1e-4, rtol=1e-4)


def test_lora_adapter_files_that_do_not_fit_are_one_line_errors(tmp_path):
    model = _model()
    lora.inject(model, r=4, targets=["layer4.*"])
    adapter = lora.save_adapter(model, tmp_path / "adapter.safetensors")
    five_classes = timm.create_model("resnet18", num_classes=5)
    with pytest.raises(VisionFTError, match=r"'fc\.(weight|bias)' in .* but the model's is \(5.*same number of classes"):
        lora.load_adapter(five_classes, adapter)
    assert not any("lora" in type(m).__name__.lower() for m in five_classes.modules())  # left as it was
    with pytest.raises(VisionFTError, match="does not exist"):
        lora.load_adapter(_model(), tmp_path / "missing.safetensors")
    plain = tmp_path / "plain.safetensors"
    save_file({"x": torch.zeros(2)}, str(plain))
    with pytest.raises(VisionFTError, match="carries no LoRA settings"):
        lora.load_adapter(_model(), plain)
    broken = tmp_path / "broken.safetensors"
    broken.write_bytes(b"not a safetensors file")
    with pytest.raises(VisionFTError, match="not a readable safetensors file"):
        lora.load_adapter(_model(), broken)
    with pytest.raises(VisionFTError, match="no LoRA adapters to save"):
        lora.save_adapter(_model(), tmp_path / "none.safetensors")
    with pytest.raises(VisionFTError, match="matches no layer"):
        lora.inject(_model(), targets=["nothing.*"])
