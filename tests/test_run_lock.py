"""One process per run folder: train, resume and --force refuse a folder another process holds."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from vision_ft.cli import main
from vision_ft.errors import VisionFTError
from vision_ft.run_folder import MARKER, create_run_folder
from vision_ft.run_lock import LOCK_FILE, RunLock

_HOLDER = "import sys, time; from vision_ft.run_lock import RunLock; RunLock(sys.argv[1]).acquire(); print('held', flush=True); time.sleep(600)"


def _hold_in_another_process(folder: Path) -> subprocess.Popen:
    holder = subprocess.Popen([sys.executable, "-c", _HOLDER, str(folder)], stdout=subprocess.PIPE, text=True)
    assert holder.stdout.readline().strip() == "held"
    return holder


def _a_run_folder(root: Path) -> Path:
    run = create_run_folder(root / "run").root
    (run / "config.yaml").write_text("model: {name: resnet18}\n")
    (run / "metrics.jsonl").write_text('{"epoch": 1}\n')
    return run


@pytest.fixture
def held_run(tmp_path):
    run = _a_run_folder(tmp_path)
    holder = _hold_in_another_process(run)
    yield run, holder.pid
    holder.kill()
    holder.wait()


@pytest.mark.parametrize("command", [
    ["train", "--resume", "--out"],
    ["train", "--force", "--data", "DATA", "--weights", "none", "--set", "data.image_size=32", "--out"],
])
def test_a_second_process_gets_one_line_naming_the_holder(held_run, command, tmp_path, capsys):
    run, pid = held_run
    data = tmp_path / "data"
    for name in ("a", "b"):
        (data / name).mkdir(parents=True)
        from PIL import Image
        for i in range(4):
            Image.new("RGB", (8, 8), (i * 40, 0, 0)).save(data / name / f"{i}.png")
    argv = [str(data) if arg == "DATA" else arg for arg in command] + [str(run)]
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and f"in use by process {pid}" in err, err
    # Nothing the holder had is touched: --force deleted nothing.
    assert (run / "metrics.jsonl").read_text() == '{"epoch": 1}\n' and (run / MARKER).is_file()


def test_a_lock_dies_with_its_process(tmp_path):
    run = _a_run_folder(tmp_path)
    holder = _hold_in_another_process(run)
    with pytest.raises(VisionFTError, match=f"in use by process {holder.pid}"):
        RunLock(run).acquire()
    holder.send_signal(signal.SIGKILL)  # no clean-up: the lock file keeps its note
    holder.wait()
    assert str(holder.pid) in (run / LOCK_FILE).read_text()
    with RunLock(run) as lock:
        assert f"process {os.getpid()}" in (run / LOCK_FILE).read_text()
    assert lock.stale_holder.startswith(f"process {holder.pid} ")  # detected as stale, and logged
    assert (run / LOCK_FILE).read_text() == ""  # released: the note is cleared


def test_force_keeps_the_lock_while_it_empties_the_folder(tmp_path):
    run = _a_run_folder(tmp_path)
    with RunLock(run) as lock:
        create_run_folder(run, force=True, lock=lock)
        assert sorted(p.name for p in run.iterdir()) == [LOCK_FILE, MARKER]
        with pytest.raises(VisionFTError, match="in use by process"):
            RunLock(run).acquire()  # a second lock in this process is refused too (flock is per open file)


def test_force_on_a_symlink_is_a_clean_refusal(tmp_path, capsys):
    run = _a_run_folder(tmp_path)
    link = tmp_path / "link"
    link.symlink_to(run, target_is_directory=True)
    with pytest.raises(VisionFTError, match="is a symbolic link .* pass the folder itself"):
        create_run_folder(link, force=True)
    assert (run / "metrics.jsonl").is_file() and link.is_symlink()
