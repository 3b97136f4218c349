"""`vision-ft weights import`: convert a foreign state_dict to a timm model's own key names.

Mapping is by name when every key of the model is in the file with the same shape; otherwise
by position, when both hold the same number of tensors and every shape matches in order
(ports of TF/Keras models often keep the order but rename every key).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import timm
import torch
from safetensors.torch import save_file

from vision_ft.errors import VisionFTError
from vision_ft.models.create import check_model_name
from vision_ft.models.weights import read_state_dict


@dataclass
class ImportResult:
    out: Path
    tensors: int
    mapping: str  # "name" or "order"


def _without_counters(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    # BatchNorm step counters carry no learned information and are absent from many ports.
    return {k: v for k, v in state.items() if not k.endswith("num_batches_tracked")}


def map_state_dict(source: dict[str, torch.Tensor], target: dict[str, torch.Tensor], src_name: str, model: str) -> tuple[dict[str, torch.Tensor], str]:
    """Return `source` re-keyed to `target`'s names, and which mapping was used."""
    source, target = _without_counters(source), _without_counters(target)
    if all(k in source and source[k].shape == t.shape for k, t in target.items()):
        return {k: source[k] for k in target}, "name"
    if len(source) != len(target):
        raise VisionFTError(
            f"{src_name} holds {len(source)} tensors but {model} has {len(target)} and the key names differ; "
            "check that --model names the architecture these weights belong to"
        )
    for index, ((s_key, s_val), (t_key, t_val)) in enumerate(zip(source.items(), target.items())):
        if s_val.shape != t_val.shape:
            raise VisionFTError(
                f"{src_name} does not match {model} by name or by order: tensor #{index} is '{s_key}' "
                f"{tuple(s_val.shape)} in the file but '{t_key}' {tuple(t_val.shape)} in the model"
            )
    return {t_key: s_val.contiguous() for (t_key, _), s_val in zip(target.items(), source.values())}, "order"


def import_weights(src: Path, model_name: str, out: Path, force: bool = False) -> ImportResult:
    """Convert `src` to `model_name`'s key names and save it as safetensors at `out`."""
    check_model_name(model_name)
    out = Path(out)
    if out.exists() and not force:
        raise VisionFTError(f"{out} already exists; choose another --out or pass --force to replace it")
    if out.suffix != ".safetensors":
        raise VisionFTError(f"--out {out} must end in .safetensors")
    source = read_state_dict(Path(src))
    # The model keeps its original head so ImageNet classifiers convert too.
    target = timm.create_model(model_name, pretrained=False).state_dict()
    mapped, mapping = map_state_dict(source, target, str(src), model_name)
    out.parent.mkdir(parents=True, exist_ok=True)
    save_file(mapped, str(out), metadata={"model": model_name, "source": Path(src).name, "mapping": mapping})
    return ImportResult(out=out, tensors=len(mapped), mapping=mapping)
