"""The typed training state and its state.json form (old checkpoints must keep resuming)."""

import json
import math

from vision_ft.training_state import TrainingState

# state.json of a checkpoint written before the state was typed (keys in their saved order).
OLD_STATE = {
    "epoch": 2, "step": 6, "best_score": 0.5, "best_epoch": 1, "bad_epochs": 1,
    "history": [{"epoch": 1, "train_loss": 1.1}, {"epoch": 2, "train_loss": 0.9}],
    "stopped_early": False, "strategy": {"start_steps": [0, 3], "epoch": 2},
    "optimizer": {"param_groups": [], "scalars": {}},
}


def test_an_old_state_json_reads_and_writes_back_the_same_keys():
    state = TrainingState.from_dict(json.loads(json.dumps(OLD_STATE)))
    assert (state.epoch, state.step, state.best_epoch, state.strategy["start_steps"]) == (2, 6, 1, [0, 3])
    written = state.to_dict()
    # The optimizer's part belongs to the checkpoint that saves it, everything else round-trips.
    assert written == {k: v for k, v in OLD_STATE.items() if k != "optimizer"}
    assert list(written) == [k for k in OLD_STATE if k != "optimizer"]


def test_unknown_keys_survive_and_missing_ones_take_defaults():
    state = TrainingState.from_dict({"epoch": 1, "ema_decay": 0.999})
    assert state.to_dict()["ema_decay"] == 0.999
    assert (state.step, state.best_score, state.history, state.stopped_early) == (0, None, [], False)


def test_early_stopping_counts_epochs_without_improvement():
    state = TrainingState()
    assert state.record_epoch(1, 0.7, "accuracy", patience=2, last_epoch=10)
    assert not state.record_epoch(2, float("nan"), "accuracy", patience=2, last_epoch=10)
    assert not state.record_epoch(3, 0.6, "accuracy", patience=2, last_epoch=10)
    assert (state.best_epoch, state.bad_epochs, state.should_stop(2), state.stopped_early) == (1, 2, True, True)

    loss = TrainingState()
    assert loss.record_epoch(1, 0.9, "loss", patience=1, last_epoch=2)
    assert loss.record_epoch(2, 0.8, "loss", patience=1, last_epoch=2)
    assert not loss.record_epoch(3, 0.85, "loss", patience=1, last_epoch=3)
    assert loss.should_stop(1) and not loss.stopped_early  # the last epoch is not an early stop
    assert math.isclose(loss.best_score, 0.8)


def test_a_finished_early_stopped_run_trains_on_when_resumed_with_epochs_left(tmp_path):
    from types import SimpleNamespace

    import pytest

    from vision_ft.errors import VisionFTError
    from vision_ft.train import _finished

    (tmp_path / "metrics.json").write_text("{}")
    def loop(epochs):
        return SimpleNamespace(config=SimpleNamespace(train=SimpleNamespace(epochs=epochs)),
                               run=SimpleNamespace(root=tmp_path, metrics=tmp_path / "metrics.json"))

    state = TrainingState(epoch=7, best_epoch=4, bad_epochs=3, stopped_early=True)
    assert _finished(loop(12), state) is False
    assert not state.stopped_early and state.bad_epochs == 0 and state.best_epoch == 4
    done = TrainingState(epoch=12, best_epoch=8, stopped_early=False)
    with pytest.raises(VisionFTError, match="N > 12"):
        _finished(loop(12), done)
