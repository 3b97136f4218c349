"""YAML read with bounded size, and values quoted in errors with bounded length.

YAML anchors and aliases let a few hundred bytes describe a structure of billions of values
("billion laughs"): PyYAML builds it cheaply with shared references, but anything that walks
it (validation, `repr` in an error message) expands every alias and runs out of memory. A
recipe is a few hundred values; we refuse documents whose expanded size passes MAX_VALUES, and
deeply nested or self-referencing ones, before anything walks them.
"""

from __future__ import annotations

import reprlib
from typing import Any

import yaml

from vision_ft.errors import VisionFTError

# The default recipe has about 60 values; a long augmentation list a few hundred.
MAX_VALUES = 10_000
QUOTE_LIMIT = 80

_repr = reprlib.Repr()
_repr.maxlevel, _repr.maxdict, _repr.maxlist, _repr.maxtuple = 2, 4, 4, 4
_repr.maxstring, _repr.maxother, _repr.maxlong = QUOTE_LIMIT, QUOTE_LIMIT, 40


def short_repr(value: Any, limit: int = QUOTE_LIMIT) -> str:
    """`repr(value)` cut to about `limit` characters without ever building the full text."""
    text = _repr.repr(value)
    return text if len(text) <= limit else text[: limit - 1] + "…"


class _TooLarge(Exception):
    pass


def expanded_size(value: Any, limit: int = MAX_VALUES) -> int:
    """How many values `value` holds with every shared reference counted each time it appears.

    Stops counting past `limit` (raises _TooLarge), so a billion-laughs document costs a few
    milliseconds. A container that contains itself counts as too large.
    """
    memo: dict[int, int] = {}
    active: set[int] = set()

    def size(node: Any) -> int:
        if not isinstance(node, (dict, list)):
            return 1
        key = id(node)
        if key in memo:
            return memo[key]
        if key in active:
            raise _TooLarge
        active.add(key)
        total = 1
        for child in (node.values() if isinstance(node, dict) else node):
            total += size(child)
            if total > limit:
                raise _TooLarge
        active.discard(key)
        memo[key] = total
        return total

    return size(value)


def load_yaml(text: str, origin: str) -> Any:
    """`yaml.safe_load(text)`, refusing documents that expand past MAX_VALUES or nest too deep."""
    try:
        loaded = yaml.safe_load(text)
        expanded_size(loaded)
    except _TooLarge:
        raise VisionFTError(
            f"{origin} expands to more than {MAX_VALUES} values through its YAML aliases (&anchor/*alias), or "
            "an alias refers to itself; write the values out instead"
        ) from None
    except RecursionError:
        raise VisionFTError(f"{origin} nests its values too deeply to be a recipe; fix the YAML") from None
    return loaded
