"""Checkpoints without pickle: tensors in safetensors files, everything else in JSON.

A checkpoint folder holds `model.safetensors` (weights), `state.json` (epoch, best score,
history) and, for resumable checkpoints, `optimizer.safetensors` + the optimizer's
hyper-parameters inside `state.json`.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from vision_ft.errors import VisionFTError

MODEL_FILE = "model.safetensors"
OPTIMIZER_FILE = "optimizer.safetensors"
STATE_FILE = "state.json"


def _atomic_write_text(path: Path, text: str) -> None:
    # Write then rename, so an interrupted save never leaves a half-written state file.
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(text)
    tmp.replace(path)


def _flatten_optimizer(state: dict[str, Any]) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    tensors: dict[str, torch.Tensor] = {}
    scalars: dict[str, dict[str, Any]] = {}
    for index, slots in state["state"].items():
        for name, value in slots.items():
            if isinstance(value, torch.Tensor):
                tensors[f"{index}.{name}"] = value.detach().cpu().contiguous()
            else:
                scalars.setdefault(str(index), {})[name] = value
    return tensors, {"param_groups": state["param_groups"], "scalars": scalars}


def _unflatten_optimizer(tensors: dict[str, torch.Tensor], meta: dict[str, Any]) -> dict[str, Any]:
    state: dict[int, dict[str, Any]] = {}
    for key, value in tensors.items():
        index, name = key.split(".", 1)
        state.setdefault(int(index), {})[name] = value
    for index, slots in meta["scalars"].items():
        state.setdefault(int(index), {}).update(slots)
    return {"state": state, "param_groups": meta["param_groups"]}


def save_checkpoint(
    folder: Path,
    model: nn.Module,
    state: dict[str, Any],
    optimizer: torch.optim.Optimizer | None = None,
) -> None:
    """Save weights (and optionally the optimizer) plus a JSON-serialisable `state`."""
    folder.mkdir(parents=True, exist_ok=True)
    weights = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    save_file(weights, str(folder / MODEL_FILE))
    payload = dict(state)
    if optimizer is not None:
        tensors, meta = _flatten_optimizer(optimizer.state_dict())
        save_file(tensors, str(folder / OPTIMIZER_FILE))
        payload["optimizer"] = meta
    _atomic_write_text(folder / STATE_FILE, json.dumps(payload, indent=1))


def load_state(folder: Path) -> dict[str, Any]:
    """The JSON state of a checkpoint folder."""
    path = folder / STATE_FILE
    if not path.is_file():
        raise VisionFTError(f"checkpoint {folder} has no {STATE_FILE}; the run was interrupted before its first save")
    return json.loads(path.read_text())


def load_model_weights(folder: Path, model: nn.Module) -> None:
    """Load a checkpoint's weights into `model`, which must have the same architecture."""
    path = folder / MODEL_FILE
    if not path.is_file():
        raise VisionFTError(f"checkpoint {folder} has no {MODEL_FILE}; was the run folder copied completely?")
    missing, unexpected = model.load_state_dict(load_file(str(path)), strict=False)
    if missing or unexpected:
        first = (missing or unexpected)[0]
        raise VisionFTError(
            f"checkpoint {path} does not fit the model built from the run's config ('{first}' "
            f"{'missing' if missing else 'unexpected'}); was config.yaml edited after training?"
        )


def load_optimizer_state(folder: Path, optimizer: torch.optim.Optimizer, state: dict[str, Any]) -> None:
    """Restore the optimizer saved next to `state` (moments, step counts, group hyper-parameters)."""
    tensors = load_file(str(folder / OPTIMIZER_FILE))
    optimizer.load_state_dict(_unflatten_optimizer(tensors, state["optimizer"]))
