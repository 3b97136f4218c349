"""Building a timm backbone with a new head for the dataset's classes."""

from __future__ import annotations

import difflib
import logging
import os
import socket
from contextlib import contextmanager
from functools import lru_cache
from typing import Iterator
from pathlib import Path

import timm
from torch import nn

from vision_ft.errors import VisionFTError
from vision_ft.models.head import head_modules
from vision_ft.models.input_size import fixed_size_kwargs, resample_for_input_size
from vision_ft.models.weights import load_into_model, read_state_dict

log = logging.getLogger(__name__)


@lru_cache(maxsize=1)
def _all_model_names() -> tuple[str, ...]:
    return tuple(timm.list_models())


def _hub_reachable(host: str = "huggingface.co", timeout: float = 3.0) -> bool:
    try:
        socket.create_connection((host, 443), timeout=timeout).close()
        return True
    except OSError:
        return False


@contextmanager
def _offline_unless_reachable() -> Iterator[None]:
    """Without a network, huggingface_hub retries for about a minute before failing; its
    offline mode answers at once from the local cache instead."""
    if os.environ.get("HF_HUB_OFFLINE") or _hub_reachable():
        yield
        return
    import huggingface_hub.constants as hub_constants

    # huggingface_hub reads HF_HUB_OFFLINE once at import, so the setting is switched directly.
    previous = hub_constants.HF_HUB_OFFLINE
    hub_constants.HF_HUB_OFFLINE = True
    try:
        yield
    finally:
        hub_constants.HF_HUB_OFFLINE = previous


def check_model_name(name: str) -> None:
    """Fail early, with close matches, on a model name timm does not know."""
    if name.startswith(("hf-hub:", "hf_hub:")) or timm.is_model(name):
        return
    base = name.split(".")[0]  # "resnet50.a1_in1k" names a pretrained tag of resnet50
    if timm.is_model(base):
        return
    close = difflib.get_close_matches(name, _all_model_names(), n=4, cutoff=0.6)
    hint = f"; did you mean {', '.join(close)}?" if close else "; see timm.list_models() for the names"
    raise VisionFTError(f"unknown model '{name}'{hint}")


def create_model(
    name: str,
    num_classes: int,
    in_chans: int = 3,
    weights: str = "hub",
    drop_rate: float = 0.0,
    image_size: int | None = None,
) -> nn.Module:
    """Create `name` with a `num_classes` head, initialised from `weights` ('hub', 'none' or a file).

    Heads are replaced through timm's own `num_classes` argument, which knows each
    architecture's classifier (fc, classifier, head.fc, ...). Models built for one input size
    (ViT, Swin, ...) are built for `image_size`, their position tables resampled from the
    pretrained grid.
    """
    check_model_name(name)
    kwargs = dict(num_classes=num_classes, in_chans=in_chans, drop_rate=drop_rate, **fixed_size_kwargs(name, image_size))
    if weights == "hub":
        try:
            with _offline_unless_reachable():
                model = timm.create_model(name, pretrained=True, **kwargs)
        except Exception as exc:  # offline, no pretrained weights for this name, hub errors
            reason = str(exc).splitlines()[0][:100] if str(exc) else type(exc).__name__
            raise VisionFTError(
                f"could not fetch pretrained weights for '{name}' from the hub ({reason}); when offline pass a "
                "local file with --weights path/to/weights.safetensors, or --weights none to start from scratch"
            ) from None
        if num_classes != (model.pretrained_cfg or {}).get("num_classes"):
            init_new_head(model)
        return model
    model = _create(name, kwargs)
    if weights == "none":
        return model
    path = Path(weights)
    report = load_into_model(model, resample_for_input_size(model, read_state_dict(path)), str(path))
    if report.dropped_head or report.head_absent:
        init_new_head(model)
    log.info("weights %s: %s", path, report.summary())
    return model


def _create(name: str, kwargs: dict) -> nn.Module:
    try:
        return timm.create_model(name, pretrained=False, **kwargs)
    except (AssertionError, ValueError, RuntimeError) as exc:  # e.g. a size the window layout cannot take
        size = kwargs.get("img_size")
        reason = str(exc).splitlines()[0][:120] if str(exc) else type(exc).__name__
        raise VisionFTError(f"cannot build '{name}'{f' for {size} px' if size else ''} ({reason}); "
                            "try another data.image_size, e.g. the model's pretraining size") from None


# Standard deviation of a new head's weights on a pretrained backbone. timm initialises heads
# for 1000 classes; EfficientNet's rule (uniform ±1/sqrt(classes)) gives a 2-class head weights
# of ±0.7, logits of ±15 on pretrained features and a first-epoch loss of 2.4 on ELPV instead
# of ~0.7. Small weights start every class near equal probability, as a linear probe should.
NEW_HEAD_STD = 0.01


def init_new_head(model: nn.Module) -> None:
    """Re-initialise the classifier (`get_classifier()`, every head of distilled models) with small weights and zero biases."""
    for module in (m for _, head in head_modules(model) for m in head.modules()):
        if isinstance(module, (nn.Linear, nn.Conv2d)):
            nn.init.trunc_normal_(module.weight, std=NEW_HEAD_STD, a=-2 * NEW_HEAD_STD, b=2 * NEW_HEAD_STD)
            if module.bias is not None:
                nn.init.zeros_(module.bias)


def pretrained_normalisation(model: nn.Module) -> tuple[list[float], list[float]]:
    """Mean and std the backbone was pretrained with (ImageNet's when the config has none)."""
    cfg = getattr(model, "pretrained_cfg", None) or {}
    mean = list(cfg.get("mean", (0.485, 0.456, 0.406)))
    std = list(cfg.get("std", (0.229, 0.224, 0.225)))
    return mean, std
