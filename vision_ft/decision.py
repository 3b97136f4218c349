"""What a shipped model decides, from its logits: numpy only, shared by torch code and the runtime.

Training, `eval`, `predict` and the torch-free runtime all turn logits into probabilities and
labels through these functions, so a temperature or a threshold chosen after training is
applied identically everywhere (tests/evaluation/test_decision_parity.py checks it on an ONNX
model). Nothing here imports torch.

Order of the decision, for each image:

1. probabilities = softmax(logits / temperature) (temperature 1: the plain softmax);
2. an operating threshold, when the run chose one:
   * binary (`positive_class` + `positive_threshold`): the positive class when its probability
     is at least the threshold, else the other class;
   * per class (`class_thresholds`, e.g. ``{"crack": 0.04}`` for 99 % recall on crack): the most
     probable class among those at or above their threshold; when none is, the most probable
     class if it has no threshold of its own, else ``uncertain`` (below every threshold that
     could have claimed it);
3. the reject band (`--threshold`, on top): ``uncertain`` when the decided class's probability
   is below it.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

UNCERTAIN = "uncertain"


def calibrated_softmax(logits: np.ndarray, temperature: float = 1.0) -> np.ndarray:
    """Row-wise softmax of logits / temperature, in float64 (stable for large logits)."""
    if not temperature > 0:
        raise ValueError(f"temperature {temperature} must be positive")
    scaled = np.asarray(logits, dtype=np.float64) / temperature
    scaled -= scaled.max(axis=1, keepdims=True)
    exp = np.exp(scaled)
    return exp / exp.sum(axis=1, keepdims=True)


def log_softmax(logits: np.ndarray) -> np.ndarray:
    """Row-wise log-probabilities in float64: the softmax's order within each class, without
    probabilities that round to exactly 0 or 1."""
    shifted = np.asarray(logits, dtype=np.float64)
    shifted = shifted - shifted.max(axis=1, keepdims=True)
    return shifted - np.log(np.exp(shifted).sum(axis=1, keepdims=True))


@dataclass(frozen=True)
class DecisionRule:
    """Temperature and operating thresholds of a model (all optional)."""

    temperature: float = 1.0
    positive_class: int | None = None
    positive_threshold: float | None = None
    class_thresholds: dict[int, float] = field(default_factory=dict)

    def probabilities(self, logits: np.ndarray) -> np.ndarray:
        return calibrated_softmax(logits, self.temperature)

    def decide(self, probabilities: np.ndarray) -> np.ndarray:
        """Decided class index per image; -1 means uncertain."""
        probabilities = np.asarray(probabilities, dtype=np.float64)
        top = probabilities.argmax(axis=1)
        if self.positive_class is not None and self.positive_threshold is not None:
            other = 1 - self.positive_class
            return np.where(probabilities[:, self.positive_class] >= self.positive_threshold, self.positive_class, other)
        if not self.class_thresholds:
            return top
        thresholds = np.full(probabilities.shape[1], np.inf)
        for index, value in self.class_thresholds.items():
            thresholds[index] = value
        passing = probabilities >= thresholds
        best_passing = np.where(passing, probabilities, -np.inf).argmax(axis=1)
        top_has_threshold = np.isfinite(thresholds[top])
        return np.where(passing.any(axis=1), best_passing, np.where(top_has_threshold, -1, top))

    def labels(self, probabilities: np.ndarray, class_names: list[str], reject_below: float | None = None) -> list[str]:
        """Class names (or `UNCERTAIN`) per image; `reject_below` is the `--threshold` reject band."""
        decided = self.decide(probabilities)
        names = []
        for row, index in zip(probabilities, decided):
            # `not >=`: a NaN score is below every threshold, so it never passes the reject band
            if index < 0 or (reject_below is not None and not row[index] >= reject_below):
                names.append(UNCERTAIN)
            else:
                names.append(class_names[index])
        return names

    def to_json(self, class_names: list[str]) -> dict:
        """The rule with class names instead of indices (for the run folder and ONNX metadata)."""
        return {
            "temperature": self.temperature,
            "positive_class": None if self.positive_class is None else class_names[self.positive_class],
            "positive_threshold": self.positive_threshold,
            "class_thresholds": {class_names[i]: t for i, t in sorted(self.class_thresholds.items())},
        }

    @classmethod
    def from_json(cls, document: dict | None, class_names: list[str]) -> "DecisionRule":
        """Inverse of `to_json`; None or {} is the plain softmax + argmax. Raises ValueError on unknown names."""
        if not document:
            return cls()

        def index(name: str) -> int:
            if name not in class_names:
                raise ValueError(f"class {name!r} is not one of {', '.join(class_names)}")
            return class_names.index(name)

        positive = document.get("positive_class")
        return cls(
            temperature=float(document.get("temperature") or 1.0),
            positive_class=None if positive is None else index(positive),
            positive_threshold=document.get("positive_threshold"),
            class_thresholds={index(n): float(t) for n, t in (document.get("class_thresholds") or {}).items()},
        )
