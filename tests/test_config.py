from pathlib import Path

import pytest
import yaml

from vision_ft.config import Config, build_config, load_config, save_config
from vision_ft.errors import VisionFTError

REPO = Path(__file__).resolve().parents[1]


def test_default_yaml_documents_exactly_the_defaults():
    documented = yaml.safe_load((REPO / "configs" / "default.yaml").read_text())
    assert documented == Config().model_dump(mode="json")


@pytest.mark.parametrize("recipe", sorted((REPO / "configs").glob("*.yaml")), ids=lambda p: p.name)
def test_every_recipe_validates(recipe):
    build_config(recipe)


def test_overrides_and_flags_resolve_in_order(tmp_path):
    recipe = tmp_path / "r.yaml"
    recipe.write_text("train: {epochs: 3}\nmodel: {name: resnet18}\n")
    cfg = build_config(recipe, ["train.epochs=6", "data.image_size=160", "finetune.lora.r=4"], model_name="resnet34")
    assert cfg.train.epochs == 6
    assert cfg.data.image_size == 160
    assert cfg.finetune.lora.r == 4
    assert cfg.model.name == "resnet34"


def test_saved_config_round_trips(tmp_path):
    cfg = build_config(None, ["train.lr=0.0003", "data.mean=[0.5]", "data.std=[0.25]", "data.channels=1"])
    save_config(cfg, tmp_path / "config.yaml")
    assert load_config(tmp_path / "config.yaml") == cfg


@pytest.mark.parametrize(
    "override, expected",
    [
        ("train.epohcs=3", "unknown config key 'train.epohcs'; did you mean 'train.epochs'?"),
        ("trian.epochs=3", "did you mean 'train'?"),
        ("data.image_size=big", "bad value 'big' for 'data.image_size'"),
        ("train.epochs=0", "bad value 0 for 'train.epochs'"),
        ("finetune.strategy=magic", "'full', 'linear_probe', 'partial', 'progressive' or 'lora'"),
        ("data.mean=[0.1,0.2]", "needs 1 or 3 values"),
        ("train.epochs", "needs the form key.path=value"),
    ],
)
def test_bad_overrides_name_the_key_and_the_fix(override, expected):
    with pytest.raises(VisionFTError) as info:
        build_config(None, [override])
    assert expected in str(info.value)
    assert "\n" not in str(info.value)


def test_bad_yaml_files(tmp_path):
    with pytest.raises(VisionFTError, match="does not exist"):
        build_config(tmp_path / "missing.yaml")
    broken = tmp_path / "broken.yaml"
    broken.write_text("train: {epochs: 3\n")
    with pytest.raises(VisionFTError, match="not valid YAML at line"):
        build_config(broken)
    listy = tmp_path / "list.yaml"
    listy.write_text("- 1\n- 2\n")
    with pytest.raises(VisionFTError, match="must hold a mapping"):
        build_config(listy)
