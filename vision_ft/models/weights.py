"""Reading state_dicts safely and fitting them onto a timm model, with a report of what matched.

Files are read without unpickling arbitrary objects: `.safetensors` through safetensors, and
`.pth/.bin/.pt` through `torch.load(weights_only=True)`, which refuses anything but tensors and
plain containers.
"""

from __future__ import annotations

import pickle
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from vision_ft.errors import VisionFTError
from vision_ft.models.head import head_names, is_head_key

WEIGHT_SUFFIXES = (".safetensors", ".pth", ".pt", ".bin")
# Wrappers that training scripts commonly put around the real state_dict.
_NESTED_KEYS = ("state_dict", "model", "model_state_dict", "module")


@dataclass
class LoadReport:
    matched: int
    missing: list[str] = field(default_factory=list)
    unexpected: list[str] = field(default_factory=list)
    dropped_head: list[str] = field(default_factory=list)
    adapted_stem: str | None = None
    head_absent: bool = False  # the file has no classifier tensors (a backbone-only export)

    def summary(self) -> str:
        parts = [f"{self.matched} tensors matched"]
        if self.dropped_head:
            parts.append(f"head dropped for the new classes ({', '.join(self.dropped_head)})")
        if self.adapted_stem:
            parts.append(f"stem '{self.adapted_stem}' adapted to the input channels")
        if self.missing:
            parts.append(f"{len(self.missing)} missing ({', '.join(self.missing[:3])}{'…' if len(self.missing) > 3 else ''})")
        if self.unexpected:
            parts.append(
                f"{len(self.unexpected)} unexpected ({', '.join(self.unexpected[:3])}{'…' if len(self.unexpected) > 3 else ''})"
            )
        return "; ".join(parts)


def read_state_dict(path: Path) -> dict[str, torch.Tensor]:
    """Load a plain tensor state_dict from a weights file, unwrapping common containers."""
    path = Path(path)
    if not path.is_file():
        raise VisionFTError(f"weights file {path} does not exist; pass an existing file, 'hub' or 'none' to --weights")
    if path.suffix not in WEIGHT_SUFFIXES:
        raise VisionFTError(
            f"weights file {path} has suffix '{path.suffix}'; expected one of {', '.join(WEIGHT_SUFFIXES)}"
        )
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            state = load_file(str(path), device="cpu")
        else:
            with warnings.catch_warnings():
                # torch warns before refusing some files (TorchScript archives); the refusal
                # becomes our one-line error below, the warning would only repeat it noisily.
                warnings.simplefilter("ignore")
                state = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError:
        raise VisionFTError(
            f"weights file {path} holds pickled Python objects, not only tensors; vision-ft does not unpickle "
            "untrusted code: re-save it as a plain state_dict (torch.save(model.state_dict(), ...)) or .safetensors"
        ) from None
    except Exception as exc:  # corrupt zip, truncated file, wrong format
        if "TorchScript" in str(exc):
            raise VisionFTError(
                f"weights file {path} is a TorchScript archive (torch.jit.save), which holds code, not a state_dict; "
                "save the weights with torch.save(model.state_dict(), FILE) or as .safetensors"
            ) from None
        reason = str(exc).splitlines()[0][:120] if str(exc) else type(exc).__name__
        raise VisionFTError(f"weights file {path} cannot be read ({reason}); is it a complete state_dict file?") from None
    for key in _NESTED_KEYS:
        if isinstance(state, dict) and isinstance(state.get(key), dict):
            state = state[key]
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise VisionFTError(f"weights file {path} does not hold a state_dict of tensors")
    # DataParallel/DDP checkpoints prefix every key with "module.".
    if state and all(k.startswith("module.") for k in state):
        state = {k[len("module."):]: v for k, v in state.items()}
    return state


def load_into_model(model: nn.Module, state: dict[str, torch.Tensor], source: str) -> LoadReport:
    """Copy matching tensors of `state` into `model`.

    The classifier is dropped when its shape differs (new class count), a 3-channel stem is
    folded onto a 1-channel model, and any other shape mismatch is an error naming the key.
    """
    own = model.state_dict()
    head_prefixes = head_names(model)
    stem = (getattr(model, "pretrained_cfg", None) or {}).get("first_conv")
    to_load: dict[str, torch.Tensor] = {}
    report = LoadReport(matched=0)
    for key, tensor in state.items():
        if key not in own:
            report.unexpected.append(key)
            continue
        target = own[key]
        if tensor.shape != target.shape:
            if is_head_key(key, head_prefixes):
                report.dropped_head.append(key)
                continue
            if stem and key == f"{stem}.weight" and tensor.dim() == 4 and tensor.shape[1] != target.shape[1]:
                from timm.models import adapt_input_conv

                tensor = adapt_input_conv(target.shape[1], tensor)
                report.adapted_stem = key
            else:
                raise VisionFTError(
                    f"weights {source} do not fit the model: '{key}' is {tuple(tensor.shape)} in the file but "
                    f"{tuple(target.shape)} in the model; check that --model names the architecture the weights came from"
                )
        to_load[key] = tensor.to(target.dtype)
    report.matched = len(to_load)
    report.head_absent = not any(is_head_key(k, head_prefixes) for k in state)
    report.missing = [
        k for k in own if k not in to_load and not k.endswith("num_batches_tracked")
        and not is_head_key(k, head_prefixes)
    ]
    backbone_total = report.matched + len(report.missing)
    if backbone_total and report.matched < 0.5 * backbone_total:
        raise VisionFTError(
            f"weights {source} match only {report.matched} of {backbone_total} tensors of the model; the key names "
            "differ: convert the file with `vision-ft weights import SRC --model NAME --out FILE.safetensors`"
        )
    unexpected = [k for k in report.unexpected if not k.endswith("num_batches_tracked")]
    if unexpected:
        raise VisionFTError(
            f"weights {source} hold {len(unexpected)} tensors the model does not have (first: '{unexpected[0]}'); "
            "check that --model names the architecture the weights came from, or remove those keys from the file"
        )
    if report.missing:
        # A partly loaded backbone trains, but from a broken start; that is never what a user wants.
        raise VisionFTError(
            f"weights {source} leave {len(report.missing)} tensors of the model uninitialised (first: "
            f"'{report.missing[0]}'); check that --model names the architecture the weights came from"
        )
    model.load_state_dict(to_load, strict=False)
    return report
