"""Layer groups: a backbone cut into ordered blocks, from the stem up to the classifier head.

The cut comes from each timm model's own `group_matcher(coarse=True)` (applied with
`timm.models.group_parameters`), so one setting means the same thing for ResNet (stem,
layer1..4), ViT (patch embedding, one group per block), EfficientNet (stem, 7 block stages)
and ConvNeXt (stem, 4 stages).

Two rules on top of timm's grouping:

* The classifier (`vision_ft.models.head`, built on `get_classifier()`) is always its own,
  last group.
* Whatever else timm leaves unmatched (a final norm or 1x1 conv between the last block and
  the classifier) joins the last backbone group. timm does exactly that for ViT's final norm
  and EfficientNet's conv_head, via MATCH_PREV_GROUP; doing it everywhere keeps a tiny
  two-tensor "neck" from costing a whole step of a progressive schedule.

Models without a usable group_matcher fall back to their top-level children, with
Sequential/ModuleList containers (stages) opened one level.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

from timm.models import group_parameters
from torch import nn

from vision_ft.models.head import head_param_names

log = logging.getLogger("vision_ft")


@dataclass(frozen=True)
class LayerGroup:
    """One group of parameters; `index` 0 is the stem, the last group is the head."""

    index: int
    name: str
    param_names: tuple[str, ...]
    is_head: bool = False

    def parameters(self, model: nn.Module) -> list[nn.Parameter]:
        """The group's parameters in `model`, in the group's order."""
        params = dict(model.named_parameters())
        return [params[name] for name in self.param_names]

    def numel(self, model: nn.Module) -> int:
        return sum(p.numel() for p in self.parameters(model))


def _timm_grouping(model: nn.Module) -> list[list[str]] | None:
    """timm's coarse grouping of parameter names (stem first), or None when the model has none."""
    matcher_fn = getattr(model, "group_matcher", None)
    if not callable(matcher_fn):
        return None
    for coarse in (True, False):  # a few timm models implement only the fine grouping
        try:
            matcher = matcher_fn(coarse=coarse)
        except (AssertionError, NotImplementedError, TypeError):
            continue
        grouped = group_parameters(model, matcher)
        return [grouped[key] for key in sorted(grouped)]
    return None


def _children_grouping(model: nn.Module) -> list[list[str]]:
    """Fallback: one group per top-level child, stage containers opened one level."""
    units: list[str] = []
    for name, child in model.named_children():
        if isinstance(child, (nn.Sequential, nn.ModuleList)) and len(child) > 1:
            units.extend(f"{name}.{sub}" for sub, _ in child.named_children())
        else:
            units.append(name)
    groups: dict[str, list[str]] = {unit: [] for unit in units}
    loose: list[str] = []  # parameters set directly on the model (tokens, embeddings)
    for param_name, _ in model.named_parameters():
        unit = next((u for u in units if param_name.startswith(u + ".")), None)
        (groups[unit] if unit else loose).append(param_name)
    ordered = [names for names in groups.values() if names]
    if loose:
        # Model-level tensors such as a class token feed the first block: treat them as stem.
        ordered = [loose + ordered[0], *ordered[1:]] if ordered else [loose]
    return ordered


def _prefixes(param_name: str) -> list[str]:
    """Owning module names of a parameter, shallowest first, then the parameter itself."""
    parts = param_name.split(".")
    return [".".join(parts[: i + 1]) for i in range(len(parts))]


def group_names(grouping: list[list[str]]) -> list[str]:
    """A short label per group: the shallowest modules that lie wholly inside it.

    E.g. 'conv1+bn1', 'layer4', 'blocks.6+conv_head+bn2', 'cls_token+pos_embed+patch_embed'.
    """
    total: dict[str, int] = {}
    for names in grouping:
        for name in names:
            for prefix in _prefixes(name):
                total[prefix] = total.get(prefix, 0) + 1
    labels = []
    for names in grouping:
        inside: dict[str, int] = {}
        for name in names:
            for prefix in _prefixes(name):
                inside[prefix] = inside.get(prefix, 0) + 1
        units: list[str] = []
        for name in names:
            unit = next(p for p in _prefixes(name) if inside[p] == total[p])
            if unit not in units:
                units.append(unit)
        labels.append("+".join(units))
    return labels


def layer_groups(model: nn.Module) -> list[LayerGroup]:
    """The model's layer groups from the stem (index 0) to the head (last), each non-empty."""
    head = head_param_names(model)
    head_set = set(head)
    grouping = _timm_grouping(model)
    if grouping is None:
        log.info("%s has no timm group_matcher; grouping by top-level modules", type(model).__name__)
        grouping = _children_grouping(model)
    body = [[n for n in names if n not in head_set] for names in grouping]
    # timm maps everything its patterns miss (the classifier and any neck) to the last ordinal.
    # Once the head is taken out, a leftover neck merges down into the last backbone group.
    last_had_head = bool(grouping) and any(n in head_set for n in grouping[-1])
    if last_had_head and len(body) >= 2 and body[-1]:
        body[-2] = body[-2] + body[-1]
        body[-1] = []
    ordered = [names for names in body if names] + [head]
    labels = group_names(ordered)
    last = len(ordered) - 1
    return [LayerGroup(i, labels[i], tuple(names), is_head=i == last) for i, names in enumerate(ordered)]


def group_index_of_params(groups: list[LayerGroup]) -> dict[str, int]:
    """Parameter name -> index of the group that holds it."""
    return {name: group.index for group in groups for name in group.param_names}

