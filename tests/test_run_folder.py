import pytest

from vision_ft.errors import VisionFTError
from vision_ft.run_folder import MARKER, create_run_folder, next_run_path, open_run_folder


def test_run_names_never_collide(tmp_path):
    first = next_run_path(tmp_path, "resnet18", tmp_path / "my data")
    assert first.name == "my-data-resnet18-1"
    first.mkdir()
    assert next_run_path(tmp_path, "resnet18", tmp_path / "my data").name == "my-data-resnet18-2"


def test_existing_run_needs_force_and_user_folders_are_never_replaced(tmp_path):
    run = create_run_folder(tmp_path / "run")
    (run.root / "metrics.jsonl").write_text("{}\n")
    with pytest.raises(VisionFTError, match="already exists; pass --resume .* --force"):
        create_run_folder(tmp_path / "run")
    create_run_folder(tmp_path / "run", force=True)
    assert not (tmp_path / "run" / "metrics.jsonl").exists()

    precious = tmp_path / "photos"
    precious.mkdir()
    (precious / "holiday.jpg").write_bytes(b"x")
    with pytest.raises(VisionFTError, match="not a vision-ft run folder; refusing"):
        create_run_folder(precious, force=True)
    assert (precious / "holiday.jpg").exists()
    assert not (precious / MARKER).exists()


def test_open_checks_it_is_a_run(tmp_path):
    with pytest.raises(VisionFTError, match="does not exist"):
        open_run_folder(tmp_path / "nope")
    with pytest.raises(VisionFTError, match="not a vision-ft run folder"):
        open_run_folder(tmp_path)
