"""Two CPU processes under torchrun (gloo): sharded data, one writer, a complete run folder."""

import json
import math

import pytest

from tests.real_data import copy_neu_subset, needs_neu

pytestmark = [pytest.mark.slow, needs_neu]


def test_two_process_ddp_run(tmp_path, torchrun):
    data = copy_neu_subset(tmp_path / "data", ("crazing", "inclusion"), 20)
    out = tmp_path / "run"
    done = torchrun("train", "--data", str(data), "--out", str(out), "--weights", "none", "--set", "data.image_size=64",
                    "--set", "data.workers=0", "--set", "train.epochs=2", "--set", "train.batch_size=8")

    metrics = json.loads((out / "metrics.json").read_text())
    assert {"accuracy", "macro_f1", "auroc"} <= metrics["test"].keys()
    # Only rank 0 writes: one log line per epoch, one final summary on stdout.
    assert len((out / "metrics.jsonl").read_text().splitlines()) == 2
    assert done.stdout.count("run folder:") == 1
    assert (out / "model.onnx").is_file()  # exported once, by rank 0, while rank 1 waits
    # 28 training images shared by 2 ranks: 14 each, 1 full batch of 8 per epoch (vs 3 in one process).
    train_images = len(json.loads((out / "split.json").read_text())["splits"]["train"])
    state = json.loads((out / "checkpoints" / "last" / "state.json").read_text())
    assert state["step"] == 2 * math.floor(math.ceil(train_images / 2) / 8)
