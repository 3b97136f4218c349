"""LoRA for your own training loop: inject adapters, train, save or merge them.

    import vision_ft.lora as lora
    lora.inject(model, r=8, targets=["layer3.*", "layer4.*"])   # only adapters + the head train
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3)
    ...                                                          # your loop
    lora.save_adapter(model, "adapter.safetensors")              # a few hundred KB
    lora.merge(model)                                            # plain Conv2d/Linear again, same outputs

The layers are vision-ft's own (`vision_ft.finetune.lora`): convolutions of every kind
(grouped, depthwise, dilated, 'same' padding) merge exactly, and the training loop of
`vision-ft train` uses the same modules.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path

from safetensors import safe_open
import torch
from safetensors.torch import save_file
from torch import Tensor, nn

from vision_ft.errors import VisionFTError
from vision_ft.finetune.lora import apply_lora, load_lora_state_dict, lora_modules, lora_state_dict, merge_lora

__all__ = ["inject", "merge", "save_adapter", "load_adapter"]

_METADATA_KEY = "vision_ft.lora"


def inject(
    model: nn.Module,
    r: int = 8,
    targets: Sequence[str] | None = None,
    alpha: float = 16.0,
    dropout: float = 0.0,
    rslora: bool = False,
    train_norm: bool = False,
) -> list[str]:
    """Wrap `model`'s conv and linear layers (all but the classifier head, or those whose names
    match the fnmatch patterns in `targets`) in LoRA adapters, in place. Afterwards only the
    adapters, the head and, with `train_norm`, normalisation layers require grad.

    Returns:
        The names of the wrapped layers.

    Raises:
        VisionFTError: a pattern matches nothing (the message lists what it could match), bad r or
        dropout, or the model already has adapters.
    """
    return apply_lora(model, r=r, alpha=alpha, dropout=dropout, rslora=rslora,
                      target_patterns=list(targets) if targets is not None else None, train_norm=train_norm)


def merge(model: nn.Module) -> nn.Module:
    """Fold every adapter into its layer and swap plain nn.Conv2d / nn.Linear layers back in
    (in place); the model computes the same outputs and exports like the original. Returns `model`."""
    return merge_lora(model)


def _trained_tensors(model: nn.Module) -> dict[str, Tensor]:
    """Adapter tensors, every other parameter that trains (the new head, trained norms), and the
    buffers: a loop that calls model.train() updates BatchNorm statistics of the frozen backbone
    too (resnet18's are 9,600 numbers, 40 KB)."""
    tensors = lora_state_dict(model)
    for name, param in model.named_parameters():
        if param.requires_grad and name not in tensors:
            tensors[name] = param.detach().clone()
    for name, buffer in model.named_buffers():
        tensors[name] = buffer.detach().clone()
    return tensors


def save_adapter(model: nn.Module, path: str | Path) -> Path:
    """Write the adapters and the other trained tensors (head, norms) to a .safetensors file,
    with the LoRA settings in its metadata so `load_adapter` can rebuild them on a fresh model."""
    modules = list(lora_modules(model))
    if not modules:
        raise VisionFTError("the model has no LoRA adapters to save; call vision_ft.lora.inject(model, ...) first")
    first = modules[0][1]
    settings = {"r": first.r, "alpha": first.alpha, "rslora": first.rslora, "layers": [name for name, _ in modules]}
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tensors = {k: v.detach().cpu().contiguous() for k, v in _trained_tensors(model).items()}
    save_file(tensors, str(path), metadata={_METADATA_KEY: json.dumps(settings)})
    return path


def load_adapter(model: nn.Module, path: str | Path) -> list[str]:
    """Load a `save_adapter` file into `model`: injects the same adapters first when the model has
    none, then copies the adapter, head and norm tensors. Returns the names of the adapted layers.

    Raises:
        VisionFTError: a missing or foreign file, or tensors that do not fit the model (another
        architecture, rank or number of classes), naming the first mismatch.
    """
    path = Path(path)
    if not path.is_file():
        raise VisionFTError(f"adapter file {path} does not exist; pass a file written by vision_ft.lora.save_adapter")
    try:
        with safe_open(str(path), framework="pt") as handle:
            metadata = handle.metadata() or {}
            tensors = {key: handle.get_tensor(key) for key in handle.keys()}
    except Exception as exc:  # safetensors raises its own error types for damaged files
        raise VisionFTError(f"{path} is not a readable safetensors file ({type(exc).__name__}); "
                            "pass a file written by vision_ft.lora.save_adapter") from None
    if _METADATA_KEY not in metadata:
        raise VisionFTError(f"{path} carries no LoRA settings; pass a file written by vision_ft.lora.save_adapter")
    settings = json.loads(metadata[_METADATA_KEY])
    adapters = {k: v for k, v in tensors.items() if k.endswith((".lora_a", ".lora_b"))}
    others = {k: v for k, v in tensors.items() if k not in adapters}
    # Check the head and norms before injecting anything, so a file that does not fit leaves the model as it was.
    own = {**dict(model.named_parameters()), **dict(model.named_buffers())}
    for key, value in others.items():
        if key not in own:
            raise VisionFTError(f"adapter file {path} holds '{key}', which this model does not have; "
                                "load it into the architecture it was trained on")
        if tuple(own[key].shape) != tuple(value.shape):
            raise VisionFTError(f"'{key}' in {path} has shape {tuple(value.shape)} but the model's is "
                                f"{tuple(own[key].shape)}; build the model with the same number of classes")
    if not any(True for _ in lora_modules(model)):
        apply_lora(model, r=settings["r"], alpha=settings["alpha"], rslora=settings["rslora"],
                   target_patterns=settings["layers"])
    load_lora_state_dict(model, adapters)
    with torch.no_grad():
        for key, value in others.items():
            own[key].copy_(value)
    return [name for name, _ in lora_modules(model)]
