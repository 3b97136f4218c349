"""The package list in pyproject.toml is explicit (kernels/ ships under another name): keep it complete."""

import tomllib
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def test_every_subpackage_is_listed():
    config = tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["setuptools"]
    listed = set(config["packages"])
    found = {".".join(p.parent.relative_to(REPO).parts) for p in (REPO / "vision_ft").rglob("__init__.py")}
    assert found <= listed, f"add {sorted(found - listed)} to [tool.setuptools] packages"
    assert config["package-dir"]["vision_ft_kernels"] == "kernels"


def test_kernels_import_under_our_own_name():
    import vision_ft_kernels

    assert Path(vision_ft_kernels.__file__).parent == REPO / "kernels"
