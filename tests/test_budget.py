"""train.time_budget and train.epochs: auto (the planning arithmetic; no wall-clock assertions)."""

import pytest

from vision_ft.budget import AUTO_MAX_EPOCHS, AUTO_MIN_EPOCHS, BudgetPlanner, auto_epochs, parse_duration
from vision_ft.config import build_config
from vision_ft.errors import VisionFTError


@pytest.mark.parametrize("text, seconds", [("10m", 600), ("90s", 90), ("1h30m", 5400), ("1.5h", 5400),
                                           ("2m30s", 150), (45, 45), ("10min", 600)])
def test_durations(text, seconds):
    assert parse_duration(text) == seconds


@pytest.mark.parametrize("text", ["soon", "ten minutes", "10x", "-5m", "0s"])
def test_bad_durations_are_one_line_config_errors(text):
    with pytest.raises(VisionFTError) as info:
        build_config(None, [f"train.time_budget={text}"])
    assert "train.time_budget" in str(info.value) and "\n" not in str(info.value)


def test_auto_epochs_scale_with_dataset_size():
    assert auto_epochs(8, 32) == AUTO_MAX_EPOCHS  # 800 steps would need 100 epochs
    assert auto_epochs(49, 32) == 17  # ELPV binary at batch 32
    assert auto_epochs(98, 16) == 17  # ... and at batch 16: the same images shown, twice the steps
    assert auto_epochs(10_000, 16) == AUTO_MIN_EPOCHS


def _planner(**kw):
    defaults = dict(budget_s=600, steps_per_epoch=50, batch_size=32, val_images=400, test_images=600,
                    max_epochs=60, started=0.0)
    defaults.update(kw)
    return BudgetPlanner(**defaults)


def test_the_plan_fills_the_budget_after_the_end_costs(monkeypatch):
    clock = {"now": 30.0}
    monkeypatch.setattr("vision_ft.budget.time.monotonic", lambda: clock["now"])
    planner = _planner()
    planner.step_seconds = 1.0
    planner.eval_seconds_per_image = 0.01
    # an epoch: 50 s of steps + 4 s of validation; the end: 10 s of val+test, 20 s export + 4 s check
    assert planner.estimated_epoch_seconds() == pytest.approx(54)
    assert planner.final_seconds() == pytest.approx(34)
    assert planner.plan(epochs_done=0) == int((600 - 30 - 34) // 54)
    clock["now"] = 600 - 34 - 53  # one second short of another epoch
    assert not planner.another_epoch_fits()
    clock["now"] = 600 - 34 - 55
    assert planner.another_epoch_fits()


def test_the_plan_never_exceeds_the_cap_nor_drops_below_one_epoch(monkeypatch):
    monkeypatch.setattr("vision_ft.budget.time.monotonic", lambda: 0.0)
    planner = _planner(budget_s=10_000, max_epochs=12)
    planner.step_seconds = 0.1
    assert planner.plan(0) == 12
    tight = _planner(budget_s=5)
    tight.step_seconds = 1.0
    assert tight.plan(0) == 1


def test_a_budget_shorter_than_one_epoch_trains_the_steps_that_fit(monkeypatch):
    clock = {"now": 20.0}
    monkeypatch.setattr("vision_ft.budget.time.monotonic", lambda: clock["now"])
    planner = _planner(budget_s=120, steps_per_epoch=500)
    planner.step_seconds, planner.eval_seconds_per_image = 0.5, 0.01
    planner._step_times = [0.0] * 11  # the steps timed so far
    # left: 120 - 20 s elapsed - 34 s for the end - 4 s of validation = 62 s = 124 steps more
    assert planner.steps_that_fit() == 11 + 124
    roomy = _planner(budget_s=10_000, steps_per_epoch=500)
    roomy.step_seconds, roomy._step_times = 0.5, [0.0] * 11
    assert roomy.steps_that_fit() is None  # the whole epoch fits: no cut
    assert _planner().steps_that_fit() is None  # not timed yet


def test_the_second_epoch_replans_up_or_down_and_later_ones_only_add_caution(monkeypatch):
    clock = {"now": 19.0 + 48.0}
    monkeypatch.setattr("vision_ft.budget.time.monotonic", lambda: clock["now"])
    planner = _planner(budget_s=540)
    planner.step_seconds, planner.eval_seconds_per_image = 0.8, 0.01
    assert planner.record_epoch(1, 48.0)  # slow: it started the workers
    first_plan = planner.plan(epochs_done=1)
    assert first_plan == 1 + int((540 - 67 - 34) // 48)
    clock["now"] += 37.0
    assert planner.record_epoch(2, 37.0)  # steady state: more epochs fit than planned
    assert planner.plan(epochs_done=2) == 2 + int((540 - 104 - 34) // 37) > first_plan
    clock["now"] += 60.0
    assert not planner.record_epoch(3, 60.0)  # a slow later epoch: no re-plan, a cautious estimate
    assert planner.estimated_epoch_seconds() == 60.0
    assert not planner.record_epoch(4, 30.0) and planner.estimated_epoch_seconds() == 60.0


def test_one_slow_validation_pass_does_not_price_the_end_of_the_run():
    planner = _planner()
    planner.step_seconds = 1.0
    for seconds in (4.0, 4.0, 16.0):  # 400 images; the third pass shared the CPU with another job
        planner.record_eval(seconds, 400)
    assert planner.eval_seconds_per_image == pytest.approx(0.01)
    assert planner.final_seconds() == pytest.approx(34)  # as with three normal passes
    planner.record_eval(16.0, 400)
    planner.record_eval(16.0, 400)
    assert planner.eval_seconds_per_image == pytest.approx(0.04)  # a machine that stays slow is believed


def test_step_time_is_measured_after_the_warmup_steps(monkeypatch):
    times = iter([0.0, 5.0, 6.0] + [6.0 + 0.5 * i for i in range(1, 20)])
    monkeypatch.setattr("vision_ft.budget.time.monotonic", lambda: next(times))
    planner = _planner()
    known = [planner.record_step() for _ in range(11)]
    assert known[-1] and not any(known[:-1])
    assert planner.step_seconds == pytest.approx(0.5)  # the slow first steps are left out


def test_a_tight_budget_trains_at_a_smaller_size_instead_of_too_few_epochs():
    from vision_ft.budget import MIN_BUDGET_EPOCHS, size_for_budget

    # 2.4 s a step at 224 px, 49 steps an epoch, 9 minutes: about 3 epochs would fit
    smaller = size_for_budget(224, 2.4, 49, 540, stride=32, min_size=96)
    assert smaller == 128 and (smaller / 224) ** 2 * 2.4 * 49 * MIN_BUDGET_EPOCHS <= 0.75 * 540
    assert size_for_budget(224, 0.5, 49, 540, stride=32, min_size=96) == 224  # 16 epochs fit: keep the size
    assert size_for_budget(224, 30.0, 49, 540, stride=32, min_size=96) == 96  # never below the minimum


@pytest.mark.parametrize("first_probe_s, step_224_s, expected", [(2.0, 2.0, 160), (6.0, 2.0, 160), (0.5, 0.5, 224),
                                                                (3.0, 0.9, 224)])
def test_the_budget_size_is_timed_again_where_the_first_probe_points(monkeypatch, first_probe_s, step_224_s,
                                                                     expected):
    """A machine where a training step takes `step_224_s` at 224 px, in proportion to the pixels.
    At 2 s, the first (small-batch) probe reads 2 s, or 6 s when another process slowed it: both
    end at 160 px (8 epochs of 49 steps fit in 9 minutes there), because the size it points to is
    timed again. A fast machine keeps 224 px, also when its first probe read three times slow: the
    larger size is then timed again on the training batch before it is given up."""
    from vision_ft import auto_config

    calls = []

    def probe(model_name, num_classes, channels, image_size, batch_size, device, memory_format, probe_batch, finetune,
              amp_dtype=None):
        assert finetune.strategy == "full"  # the run's strategy is what gets timed
        calls.append((image_size, probe_batch))
        if len(calls) == 1:
            return first_probe_s
        return step_224_s * (image_size / 224) ** 2
    monkeypatch.setattr(auto_config, "probe_step_seconds", probe)
    config = build_config(None, ["train.time_budget=9m", "model.name=tf_efficientnet_lite0", "data.image_size=224",
                                  "train.batch_size=32"])
    notes = auto_config._fit_size_to_budget(config, train_images=49 * 32, num_classes=2, processes=1)
    assert config.data.image_size == expected
    assert calls[0] == (224, 8) and all(batch == 32 for _, batch in calls[1:])  # the deciding probes run the real batch
    if first_probe_s == 3.0:
        assert calls == [(224, 8), (128, 32), (224, 32)]
    if expected < 224:
        assert len(notes) == 1 and f"{first_probe_s:.2f} s at 224 px" in notes[0] and "at 160 px" in notes[0]
    else:
        assert notes == []


@pytest.mark.parametrize("known_s, expected_calls, expected", [(0.5, [], 224), (2.0, [(160, 32)], 160)])
def test_a_step_the_precision_choice_timed_replaces_the_first_probe(monkeypatch, known_s, expected_calls, expected):
    """`train.amp: auto` already timed a step at the data's size on the training batch: the size
    fit starts from it instead of its cheap, noisier small-batch probe."""
    from vision_ft import auto_config

    calls = []

    def probe(model_name, num_classes, channels, image_size, batch_size, device, memory_format, probe_batch, finetune,
              amp_dtype=None):
        calls.append((image_size, probe_batch))
        return known_s * (image_size / 224) ** 2
    monkeypatch.setattr(auto_config, "probe_step_seconds", probe)
    config = build_config(None, ["train.time_budget=9m", "model.name=tf_efficientnet_lite0", "data.image_size=224",
                                  "train.batch_size=32", "train.amp=off"])
    auto_config._fit_size_to_budget(config, train_images=49 * 32, num_classes=2, processes=1, step_seconds=known_s)
    assert calls == expected_calls and config.data.image_size == expected


def test_the_probe_times_a_real_training_step():
    import torch

    from vision_ft.budget import probe_step_seconds

    seconds = probe_step_seconds("resnet18", num_classes=2, channels=3, image_size=32, batch_size=16,
                                 device=torch.device("cpu"))
    assert seconds > 0


@pytest.mark.parametrize("strategy", ["linear_probe", "lora", "partial", "progressive", "full"])
def test_the_probe_times_the_runs_strategy(monkeypatch, strategy):
    """A linear probe or LoRA step is timed as such (a fraction of a full step, so the budget
    affords a larger size); progressive unfreezing as full fine-tuning, which its last epochs are."""
    import torch

    from vision_ft import budget
    from vision_ft.config import FinetuneConfig

    optimized: list[list[torch.Tensor]] = []
    real_adamw = torch.optim.AdamW

    def spy(params, **kwargs):
        optimized.append(list(params))
        return real_adamw(optimized[-1], **kwargs)
    monkeypatch.setattr(torch.optim, "AdamW", spy)
    extra = {"freeze_groups": 2} if strategy == "partial" else {}
    budget.probe_step_seconds("resnet18", num_classes=2, channels=3, image_size=32, batch_size=4,
                              device=torch.device("cpu"), finetune=FinetuneConfig(strategy=strategy, **extra))
    total = sum(p.numel() for p in optimized[0])
    head = 512 * 2 + 2
    if strategy == "linear_probe":
        assert total == head
    elif strategy == "lora":
        assert head < total < 1_000_000  # adapters and head, not ResNet-18's 11.2 M weights
    elif strategy == "partial":
        assert 1_000_000 < total < 11_177_538  # the upper groups only
    else:
        assert total == 11_177_538
