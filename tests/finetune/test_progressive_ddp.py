"""Progressive unfreezing end to end: resume mid-schedule, two DDP processes, mixed precision."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import timm
import torch
from safetensors.torch import load_file

from tests.real_data import copy_neu_subset, needs_neu
from tests.interrupt import interrupt_at_epoch
from vision_ft.cli import main
from vision_ft.config import FinetuneConfig
from vision_ft.finetune.build import build_strategy

# Epoch 1 trains fc, 2 adds layer4, 3 adds layer3, 4 adds layer2 (resnet18 has 6 layer groups).
PROGRESSIVE = ["--set", "finetune.strategy=progressive", "--set", "finetune.unfreeze_every=1",
               "--set", "finetune.lr_decay=0.7", "--set", "finetune.group_warmup_epochs=0.5"]
FAST = ["--set", "export.onnx=false", "--set", "data.image_size=64", "--set", "data.workers=0", "--set", "train.batch_size=16",
        "--set", "train.warmup_epochs=0", "--set", "data.augment.train=[]", "--weights", "none",
        "--model", "resnet18"]


def optimizer_groups(run: Path) -> list[tuple[str, int]]:
    state = json.loads((run / "checkpoints/last/state.json").read_text())
    return [(g["layer_group"], g["start_step"]) for g in state["optimizer"]["param_groups"]]


@pytest.mark.slow
@needs_neu
def test_resume_mid_schedule_equals_an_uninterrupted_run(tmp_path, monkeypatch):
    data = copy_neu_subset(tmp_path / "data", ("crazing", "inclusion", "scratches"), 16)
    same = ["--set", "train.epochs=4", *PROGRESSIVE, *FAST]
    whole, interrupted = tmp_path / "whole", tmp_path / "interrupted"
    assert main(["train", "--data", str(data), "--out", str(whole), *same]) == 0

    stop_interrupting = interrupt_at_epoch(monkeypatch, 3)
    assert main(["train", "--data", str(data), "--out", str(interrupted), *same]) == 130
    assert [g for g, _ in optimizer_groups(interrupted)] == ["fc", "fc", "layer4", "layer4"]  # saved after epoch 2
    stop_interrupting()
    assert main(["train", "--resume", "--out", str(interrupted)]) == 0

    steps = 2  # 33 training images in batches of 16
    assert optimizer_groups(whole) == optimizer_groups(interrupted) == [
        ("fc", 0), ("fc", 0), ("layer4", steps), ("layer4", steps),
        ("layer3", 2 * steps), ("layer3", 2 * steps), ("layer2", 3 * steps), ("layer2", 3 * steps)]
    a = load_file(str(whole / "checkpoints/last/model.safetensors"))
    b = load_file(str(interrupted / "checkpoints/last/model.safetensors"))
    assert a.keys() == b.keys()
    for key in a:
        assert (a[key].float() - b[key].float()).abs().max() < 1e-5, key
    log = (interrupted / "train.log").read_text()
    assert "epoch 3: progressive: training fc, layer4, layer3 (3 of 6 layer groups)" in log


@pytest.mark.slow
@needs_neu
def test_two_process_ddp_run_unfreezes_groups_mid_run(tmp_path, torchrun):
    data = copy_neu_subset(tmp_path / "data", ("crazing", "inclusion"), 20)
    out = tmp_path / "run"
    torchrun("train", "--data", str(data), "--out", str(out), "--set", "train.epochs=3", "--set", "train.batch_size=8",
             *PROGRESSIVE, *FAST)

    log = (out / "train.log").read_text()
    assert "epoch 1: progressive: training fc (1 of 6 layer groups)" in log
    assert "epoch 2: progressive: training fc, layer4 (2 of 6 layer groups)" in log
    assert "epoch 3: progressive: training fc, layer4, layer3 (3 of 6 layer groups)" in log
    assert [g for g, _ in optimizer_groups(out)] == ["fc", "fc", "layer4", "layer4", "layer3", "layer3"]
    # Groups that never trained keep their fresh BatchNorm statistics on every rank (frozen_bn: freeze).
    weights = load_file(str(out / "checkpoints/last/model.safetensors"))
    for key, value in weights.items():
        if key.endswith("running_mean"):
            assert torch.equal(value, torch.zeros_like(value)) == key.startswith(("bn1", "layer1.", "layer2.")), key


def test_progressive_groups_train_under_bf16_autocast():
    torch.manual_seed(0)
    model = timm.create_model("resnet18", num_classes=3, pretrained=False)
    strategy = build_strategy(FinetuneConfig(strategy="progressive", unfreeze_every=1))
    strategy.prepare(model)
    optimizer = torch.optim.AdamW(strategy.param_groups(model, 1e-3, 0.05))
    assert strategy.on_epoch_start(2, model, optimizer, 5, 1e-3, 0.05)
    strategy.set_train_mode(model)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = model(torch.randn(2, 3, 32, 32)).float().logsumexp(1).sum()
    loss.backward()
    optimizer.step()
    for name, param in model.named_parameters():
        trains = name.startswith(("fc.", "layer4."))
        assert (param.grad is not None) == trains, name
        if trains:
            assert param.grad.dtype == torch.float32 and torch.isfinite(param.grad).all(), name
