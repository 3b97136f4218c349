"""train.memory_format: channels-last weights on CPU, and everything that touches them after."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch
import yaml
from torch import nn

from vision_ft.checkpoint import load_model_weights, load_optimizer_state, save_checkpoints
from vision_ft.memory_format import apply_memory_format, resolve_memory_format
from vision_ft.run_model import load_run


def _channels_last(tensor: torch.Tensor) -> bool:
    return tensor.is_contiguous(memory_format=torch.channels_last) and not tensor.is_contiguous()


def test_auto_is_channels_last_on_cpu_and_contiguous_on_cuda() -> None:
    assert resolve_memory_format("auto", torch.device("cpu")) == "channels_last"
    assert resolve_memory_format("auto", torch.device("cuda")) == "contiguous"
    assert resolve_memory_format("contiguous", torch.device("cpu")) == "contiguous"
    conv = apply_memory_format(nn.Sequential(nn.Conv2d(3, 8, 3), nn.Linear(2, 2)), "auto", torch.device("cpu"))
    assert _channels_last(conv[0].weight) and conv[1].weight.is_contiguous()


def test_a_cpu_run_trains_channels_last_and_predicts_as_a_contiguous_model(trained_run: Path, neu_subset: Path) -> None:
    config = yaml.safe_load((trained_run / "config.yaml").read_text())
    assert config["train"]["memory_format"] == "channels_last"  # the resolved value, not "auto"
    assert any("train.memory_format channels_last" in line for line in (trained_run / "train.log").read_text().splitlines())
    loaded = load_run(trained_run)
    convs = [m for m in loaded.model.modules() if isinstance(m, nn.Conv2d)]
    assert convs and all(_channels_last(m.weight) for m in convs if m.kernel_size != (1, 1))  # 1x1: both layouts coincide
    images = torch.rand(4, 3, 32, 32)
    with torch.no_grad():
        channels_last = loaded.model(images)
        contiguous = loaded.model.to(memory_format=torch.contiguous_format)(images)
    np.testing.assert_allclose(channels_last.numpy(), contiguous.numpy(), atol=1e-4)


def _step(model: nn.Module, optimizer: torch.optim.Optimizer, seed: int) -> None:
    generator = torch.Generator().manual_seed(seed)
    images = torch.randn(4, 3, 8, 8, generator=generator)
    optimizer.zero_grad()
    model(images).square().mean().backward()
    optimizer.step()


def test_resumed_moments_take_the_channels_last_layout_of_their_weights(tmp_path: Path) -> None:
    """Checkpoints hold contiguous moments; the fused AdamW pairs elements by memory position, so a
    channels-last weight stepped with contiguous moments would drift from the uninterrupted run."""

    def build() -> tuple[nn.Module, torch.optim.Optimizer]:
        torch.manual_seed(0)
        model = nn.Sequential(nn.Conv2d(3, 6, 3), nn.Conv2d(6, 4, 3)).to(memory_format=torch.channels_last)
        return model, torch.optim.AdamW(model.parameters(), lr=0.1, fused=True)

    model, optimizer = build()
    _step(model, optimizer, 1)
    save_checkpoints(tmp_path / "checkpoints", model, {"epoch": 1}, optimizer, improved=True)
    _step(model, optimizer, 2)

    resumed, resumed_optimizer = build()
    load_model_weights(tmp_path / "checkpoints" / "last", resumed)
    state = json.loads((tmp_path / "checkpoints" / "last" / "state.json").read_text())
    load_optimizer_state(tmp_path / "checkpoints" / "last", resumed_optimizer, state)
    for param in resumed.parameters():
        for moment in resumed_optimizer.state[param].values():
            if moment.dim() == 4:
                assert moment.stride() == param.stride()
    _step(resumed, resumed_optimizer, 2)
    for after_resume, uninterrupted in zip(resumed.parameters(), model.parameters()):
        torch.testing.assert_close(after_resume, uninterrupted)


def test_lora_layers_of_a_channels_last_model_return_channels_last_outputs() -> None:
    """An adapter must not turn a channels-last model's activations back to NCHW (the merged weight
    takes W's layout): the layer after it would convert them again, on every step."""
    from vision_ft.finetune.lora import apply_lora, lora_modules

    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 16, 3, padding=1), nn.BatchNorm2d(16), nn.Conv2d(16, 16, 1),
                          nn.Conv2d(16, 16, 3, padding=1, groups=4), nn.Conv2d(16, 8, 3, stride=2),
                          nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 2))
    apply_lora(model, r=4, alpha=8.0)
    apply_memory_format(model, "auto", torch.device("cpu"))
    layouts = {}
    for name, module in lora_modules(model):
        if isinstance(module, nn.Module) and module.weight.dim() == 4:
            module.register_forward_hook(lambda m, i, out, name=name: layouts.__setitem__(name, _channels_last(out)))
    model(torch.randn(2, 3, 12, 12)).sum().backward()  # NCHW images, as the data loader gives them
    assert len(layouts) == 4 and all(layouts.values()), layouts
