"""Strategies: what trains, at which rate, with which BatchNorm policy, on which schedule."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import numpy as np
import pytest
import timm
import torch
from PIL import Image
from safetensors.torch import load_file
from torch import nn

from tests.real_data import copy_neu_subset
from vision_ft.cli import main
from vision_ft.config import FinetuneConfig, LoRAConfig
from vision_ft.errors import VisionFTError
from vision_ft.finetune.build import build_strategy
from vision_ft.finetune.freezing import has_running_stats
from vision_ft.finetune.layer_groups import group_index_of_params, layer_groups
from vision_ft.schedule import apply_learning_rates
from vision_ft.train import build_optimizer

ARCHS = {
    "resnet18": {},
    "tf_efficientnet_lite0": {},
    "vit_tiny_patch16_224": {"img_size": 32},
}
LR, WD = 1e-3, 0.05


def make_model(name: str) -> nn.Module:
    torch.manual_seed(0)
    return timm.create_model(name, num_classes=3, pretrained=False, **ARCHS.get(name, {}))


def prepared(name: str, **settings) -> tuple[nn.Module, object, torch.optim.Optimizer]:
    model = make_model(name)
    strategy = build_strategy(FinetuneConfig(**settings))
    strategy.prepare(model)
    # The optimizer training builds (fused AdamW on CPU): groups joining later must inherit it.
    optimizer = build_optimizer(strategy.param_groups(model, LR, WD), LR, WD, torch.device("cpu"))
    return model, strategy, optimizer


def backward_once(model: nn.Module, strategy) -> None:
    strategy.set_train_mode(model)
    model(torch.randn(2, 3, 32, 32)).logsumexp(1).sum().backward()


def trainable_group_indices(model: nn.Module) -> set[int]:
    index = group_index_of_params(layer_groups(model))
    return {index[n] for n, p in model.named_parameters() if p.requires_grad}


# ---------------------------------------------------------------- what trains, where gradients flow


def expected_trainable(strategy: str, name: str, groups) -> bool | None:
    """Whether parameter `name` should train (None: decided per parameter, LoRA)."""
    last = len(groups) - 1
    index = group_index_of_params(groups)[name]
    return {
        "full": True,
        "linear_probe": index == last,
        "partial": index >= 2,
        "progressive": index >= last - 1,  # after one unfreeze: the head and the group below it
        "lora": index == last or name.endswith((".lora_a", ".lora_b")),
    }[strategy]


@pytest.mark.parametrize("arch", list(ARCHS))
@pytest.mark.parametrize("strategy_name", ["full", "linear_probe", "partial", "progressive", "lora"])
def test_gradients_flow_only_into_the_parameters_that_train(strategy_name, arch):
    settings = {"strategy": strategy_name}
    if strategy_name == "partial":
        settings["freeze_groups"] = 2
    model, strategy, optimizer = prepared(arch, **settings)
    if strategy_name == "progressive":
        assert strategy.on_epoch_start(3, model, optimizer, 10, LR, WD)  # unfreeze_every=2: epoch 3 adds a group
    backward_once(model, strategy)
    groups = layer_groups(model)
    in_optimizer = {id(p) for g in optimizer.param_groups for p in g["params"]}
    for name, param in model.named_parameters():
        should = expected_trainable(strategy_name, name, groups)
        assert param.requires_grad == should, name
        assert (param.grad is not None) == should, name
        assert (id(param) in in_optimizer) == should, name
    if strategy_name == "lora":
        assert any(n.endswith(".lora_a") for n, _ in model.named_parameters())


# ---------------------------------------------------------------- layer-wise learning rates


@pytest.mark.parametrize("arch", ["resnet18", "vit_tiny_patch16_224"])
def test_learning_rate_decays_by_group_below_the_head(arch):
    model, strategy, optimizer = prepared(arch, lr_decay=0.7)
    groups = layer_groups(model)
    by_name = {}
    for group in optimizer.param_groups:
        by_name.setdefault(group["layer_group"], []).append(group["base_lr"])
    assert list(by_name) == [g.name for g in reversed(groups)]  # head first, top-down
    for depth, group in enumerate(reversed(groups)):
        assert by_name[group.name] == pytest.approx([LR * 0.7**depth] * len(by_name[group.name])), group.name
    no_decay = [g for g in optimizer.param_groups if g["weight_decay"] == 0.0]
    assert no_decay and all(p.ndim <= 1 for g in no_decay for p in g["params"])


def test_lora_adapters_follow_the_layer_decay_of_their_block():
    model, strategy, optimizer = prepared("resnet18", strategy="lora", lr_decay=0.5)
    rate = {id(p): g["base_lr"] for g in optimizer.param_groups for p in g["params"]}
    params = dict(model.named_parameters())
    assert rate[id(params["fc.weight"])] == pytest.approx(LR)
    assert rate[id(params["layer4.0.conv1.lora_a"])] == pytest.approx(LR * 0.5)
    assert rate[id(params["layer1.0.conv1.lora_a"])] == pytest.approx(LR * 0.5**4)


# ---------------------------------------------------------------- BatchNorm policy


def running_means(model: nn.Module) -> dict[str, torch.Tensor]:
    return {n: m.running_mean.clone() for n, m in model.named_modules() if has_running_stats(m)}


@pytest.mark.parametrize("frozen_bn", ["freeze", "train"])
def test_frozen_groups_keep_batchnorm_statistics_under_freeze(frozen_bn):
    model, strategy, _ = prepared("resnet18", strategy="partial", freeze_groups=2, frozen_bn=frozen_bn)
    before = running_means(model)
    strategy.set_train_mode(model)
    with torch.no_grad():
        model(torch.randn(4, 3, 32, 32) * 3 + 1)
    after = running_means(model)
    modules = dict(model.named_modules())
    for name in before:
        frozen = name.startswith(("bn1", "layer1."))  # stem and layer1 are the 2 frozen groups
        keep = frozen and frozen_bn == "freeze"
        assert modules[name].training != keep, name
        assert torch.equal(before[name], after[name]) == keep, name


@pytest.mark.parametrize("strategy_name", ["linear_probe", "lora"])
def test_frozen_backbone_batchnorm_stays_in_eval_mode(strategy_name):
    model, strategy, _ = prepared("tf_efficientnet_lite0", strategy=strategy_name)
    strategy.set_train_mode(model)
    norms = [m for m in model.modules() if has_running_stats(m)]
    assert norms and not any(m.training for m in norms)
    assert model.training and model.classifier.training


def test_lora_with_trained_norms_updates_their_statistics():
    model, strategy, _ = prepared("resnet18", strategy="lora", lora=LoRAConfig(r=2, train_norm=True))
    strategy.set_train_mode(model)
    assert all(m.training for m in model.modules() if has_running_stats(m))
    assert model.bn1.weight.requires_grad


# ---------------------------------------------------------------- progressive schedule


def schedule_table(epochs: int, **settings) -> tuple[list[list[str]], list[bool], object, torch.optim.Optimizer]:
    """The groups that train in epochs 1..N, and whether each epoch changed the set."""
    model, strategy, optimizer = prepared("resnet18", strategy="progressive", lr_decay=0.5, **settings)
    groups = layer_groups(model)
    table, changes = [], []
    for epoch in range(1, epochs + 1):
        changes.append(strategy.on_epoch_start(epoch, model, optimizer, (epoch - 1) * 10, LR, WD))
        table.append([groups[i].name for i in sorted(trainable_group_indices(model), reverse=True)])
        optimized = [p for g in optimizer.param_groups for p in g["params"]]
        assert len(optimized) == len({id(p) for p in optimized})  # no parameter twice
        assert {id(p) for p in optimized} == {id(p) for p in model.parameters() if p.requires_grad}
    return table, changes, model, optimizer


HEAD, L4, L3, L2, L1, STEM = "fc", "layer4", "layer3", "layer2", "layer1", "conv1+bn1"


def test_unfreeze_every_two_epochs_goes_top_down():
    table, changes, _, optimizer = schedule_table(12, unfreeze_every=2)
    assert table == [[HEAD], [HEAD],
                     [HEAD, L4], [HEAD, L4],
                     [HEAD, L4, L3], [HEAD, L4, L3],
                     [HEAD, L4, L3, L2], [HEAD, L4, L3, L2],
                     [HEAD, L4, L3, L2, L1], [HEAD, L4, L3, L2, L1],
                     [HEAD, L4, L3, L2, L1, STEM], [HEAD, L4, L3, L2, L1, STEM]]
    assert changes == [False, False, True, False, True, False, True, False, True, False, True, False]
    joined = {g["layer_group"]: (g["start_step"], g["base_lr"]) for g in optimizer.param_groups}
    assert joined == {HEAD: (0, LR), L4: (20, LR / 2), L3: (40, LR / 4), L2: (60, LR / 8), L1: (80, LR / 16),
                      STEM: (100, LR / 32)}


def test_unfreeze_at_listed_epochs_then_stops():
    table, changes, _, _ = schedule_table(9, unfreeze_at=[2, 4, 7])
    assert table == [[HEAD], [HEAD, L4], [HEAD, L4], [HEAD, L4, L3], [HEAD, L4, L3], [HEAD, L4, L3],
                     [HEAD, L4, L3, L2], [HEAD, L4, L3, L2], [HEAD, L4, L3, L2]]
    assert [i + 1 for i, c in enumerate(changes) if c] == [2, 4, 7]


def test_freeze_groups_keeps_the_stem_side_frozen_during_progressive():
    table, _, _, _ = schedule_table(6, unfreeze_every=1, freeze_groups=3)
    assert table == [[HEAD], [HEAD, L4], [HEAD, L4, L3], [HEAD, L4, L3], [HEAD, L4, L3], [HEAD, L4, L3]]


def test_a_joining_group_warms_up_from_its_start_step():
    _, _, _, optimizer = schedule_table(3, unfreeze_every=2, group_warmup_epochs=0.5)
    apply_learning_rates(optimizer, step=24, total_steps=100, warmup_steps=0, min_ratio=1.0, group_warmup_steps=10)
    lrs = {g["layer_group"]: g["lr"] for g in optimizer.param_groups}
    assert lrs[HEAD] == pytest.approx(LR)
    assert lrs[L4] == pytest.approx(LR / 2 * 5 / 10)  # joined at step 20: 5 of 10 warmup steps done


def test_describe_names_the_training_groups_and_the_next_unfreeze():
    model, strategy, optimizer = prepared("resnet18", strategy="progressive", unfreeze_every=2)
    strategy.on_epoch_start(3, model, optimizer, 20, LR, WD)
    line = strategy.describe(model)
    assert "training fc, layer4 (2 of 6 layer groups)" in line
    assert "next: layer3 at epoch 5" in line and "parameters train" in line and "\n" not in line


def train_steps(model, strategy, optimizer, steps: int, seed: int) -> None:
    generator = torch.Generator().manual_seed(seed)
    strategy.set_train_mode(model)
    for _ in range(steps):
        images = torch.randn(4, 3, 32, 32, generator=generator)
        labels = torch.randint(0, 3, (4,), generator=generator)
        optimizer.zero_grad()
        nn.functional.cross_entropy(model(images), labels).backward()
        optimizer.step()


def test_resume_rebuilds_the_same_optimizer_groups_mid_schedule():
    settings = dict(strategy="progressive", unfreeze_every=1, lr_decay=0.8)
    model, strategy, optimizer = prepared("resnet18", **settings)
    for epoch in (1, 2, 3):
        strategy.on_epoch_start(epoch, model, optimizer, (epoch - 1) * 2, LR, WD)
        train_steps(model, strategy, optimizer, 2, seed=epoch)
    saved_strategy = json.loads(json.dumps(strategy.state_dict()))  # as state.json stores it
    saved_optimizer = copy.deepcopy(optimizer.state_dict())  # state_dict() shares the live moment tensors

    resumed = make_model("resnet18")
    resumed_strategy = build_strategy(FinetuneConfig(**settings))
    resumed_strategy.prepare(resumed)  # as training builds the model, frozen BN folding included
    resumed.load_state_dict(model.state_dict())
    resumed_strategy.load_state_dict(saved_strategy)
    resumed_strategy.set_trainable(resumed, epoch=3)  # as training does: the last finished epoch
    resumed_optimizer = build_optimizer(resumed_strategy.param_groups(resumed, LR, WD), LR, WD, torch.device("cpu"))
    resumed_optimizer.load_state_dict(saved_optimizer)

    keys = ("layer_group", "start_step", "base_lr", "weight_decay")
    assert [[g[k] for k in keys] + [len(g["params"])] for g in resumed_optimizer.param_groups] == \
           [[g[k] for k in keys] + [len(g["params"])] for g in optimizer.param_groups]
    for m, s, o in ((model, strategy, optimizer), (resumed, resumed_strategy, resumed_optimizer)):
        assert s.on_epoch_start(4, m, o, 6, LR, WD)  # layer2 joins after the resume point
        train_steps(m, s, o, 2, seed=4)
    for (name, a), b in zip(model.state_dict().items(), resumed.state_dict().values()):
        assert torch.equal(a, b), name


# ---------------------------------------------------------------- user mistakes


@pytest.mark.parametrize("settings, words", [
    ({"strategy": "partial", "freeze_groups": 9}, ["freeze_groups=9", "only 5 layer groups", "at most 5"]),
    ({"strategy": "partial"}, ["freeze_groups=0", "freezes nothing", "between 1 and 5"]),
    ({"strategy": "full", "freeze_groups": 2}, ["freeze_groups=2", "'partial'"]),
    ({"strategy": "progressive", "unfreeze_at": [3, 3]}, ["unfreeze_at=[3, 3]", "not increasing"]),
    ({"strategy": "progressive", "unfreeze_at": [1, 3]}, ["unfreeze_at=[1, 3]", "start at 2"]),
    ({"strategy": "progressive", "unfreeze_at": [2, 3, 4, 5, 6, 7]}, ["lists 6 epochs", "only 5 groups", "at most 5"]),
    ({"strategy": "progressive", "freeze_groups": 5}, ["freeze_groups=5", "at most 4", "linear_probe"]),
    ({"strategy": "progressive", "unfreeze_every": None}, ["unfreeze_every", "unfreeze_at"]),
    ({"strategy": "lora", "lora": LoRAConfig(targets=["attn.*"])}, ["'attn.*'", "matches no layer"]),
])
def test_mistakes_raise_one_line_naming_value_limit_and_fix(settings, words):
    model = make_model("resnet18")
    with pytest.raises(VisionFTError) as error:
        build_strategy(FinetuneConfig(**settings)).prepare(model)
    message = str(error.value)
    assert "\n" not in message
    for word in words:
        assert word in message


def _tiny_folder(root: Path) -> Path:
    rng = np.random.default_rng(0)
    for name in ("ok", "scratch"):
        (root / name).mkdir(parents=True)
        for i in range(8):
            Image.fromarray(rng.integers(0, 255, (40, 40, 3), dtype=np.uint8)).save(root / name / f"{i}.png")
    return root


def test_a_strategy_that_does_not_fit_stops_before_the_run_folder_exists(tmp_path, capsys):
    data = _tiny_folder(tmp_path / "data")
    code = main(["train", "--data", str(data), "--out", str(tmp_path / "run"), "--weights", "none",
                 "--set", "finetune.strategy=partial", "--set", "finetune.freeze_groups=7"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and err[-1].startswith("error: finetune.freeze_groups=7")
    assert not (tmp_path / "run").exists()


# ---------------------------------------------------------------- LoRA specifics


def test_lora_adapter_file_holds_only_the_adapters():
    model, strategy, _ = prepared("resnet18", strategy="lora", lora=LoRAConfig(r=4))
    files = strategy.extra_checkpoint_files(model)
    assert list(files) == ["adapter.safetensors"]
    adapter = files["adapter.safetensors"]
    assert adapter and all(k.endswith((".lora_a", ".lora_b")) for k in adapter)
    assert adapter["layer1.0.conv1.lora_a"].shape[0] == 4


def test_lora_backend_is_a_per_module_setting_and_auto_leaves_the_env_var_in_charge(monkeypatch):
    import vision_ft_kernels
    from vision_ft.finetune.lora import LoRAConv2d, lora_modules

    def conv_backends(model: nn.Module) -> set:
        return {m.backend for _, m in lora_modules(model) if isinstance(m, LoRAConv2d)}

    monkeypatch.setenv("VISION_FT_LORA_BACKEND", "auto")
    torch_model, _, _ = prepared("resnet18", strategy="lora", lora=LoRAConfig(backend="torch"))
    assert conv_backends(torch_model) == {"torch"}
    auto_model, _, _ = prepared("resnet18", strategy="lora", lora=LoRAConfig(backend="auto"))
    assert conv_backends(auto_model) == {None}  # the one default decides, per call
    assert conv_backends(torch_model) == {"torch"}  # building another model changed nothing process-wide
    assert vision_ft_kernels.requested_lora_backend() == "auto"
    monkeypatch.setenv("VISION_FT_LORA_BACKEND", "torch")
    assert vision_ft_kernels.requested_lora_backend() == "torch"
    assert not hasattr(vision_ft_kernels, "set_lora_backend")


def test_loading_a_run_only_adapts_the_architecture():
    """adapt() injects the adapters and leaves requires_grad alone; set_trainable() chooses what trains."""
    strategy = build_strategy(FinetuneConfig(strategy="lora", lora=LoRAConfig(r=4)))
    model = make_model("resnet18")
    strategy.adapt(model)
    adapters = {n for n, _ in model.named_parameters() if n.endswith(("lora_a", "lora_b"))}
    assert adapters and all(p.requires_grad for n, p in model.named_parameters() if n in adapters)
    assert model.get_submodule("layer1.0.conv1").weight.requires_grad is False  # wrapped W is frozen
    assert model.fc.weight.requires_grad and model.layer1[0].bn1.weight.requires_grad  # untouched by adapt
    strategy.set_trainable(model, epoch=1)
    trains = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trains == adapters | {"fc.weight", "fc.bias"}


def test_progressive_set_trainable_follows_the_schedule():
    strategy = build_strategy(FinetuneConfig(strategy="progressive", unfreeze_every=2))
    model = make_model("resnet18")
    strategy.adapt(model)
    for epoch, groups in ((1, {5}), (2, {5}), (3, {4, 5}), (5, {3, 4, 5})):
        strategy.set_trainable(model, epoch)
        assert trainable_group_indices(model) == groups, epoch


# ---------------------------------------------------------------- end to end on real images

FAST = ["--set", "export.onnx=false", "--set", "data.image_size=64", "--set", "data.workers=0", "--set", "train.batch_size=16",
        "--set", "train.warmup_epochs=0", "--weights", "none", "--model", "resnet18"]


@pytest.fixture(scope="module")
def neu_small(tmp_path_factory) -> Path:
    return copy_neu_subset(tmp_path_factory.mktemp("neu"), ("crazing", "inclusion", "scratches"), 12)


@pytest.mark.slow
def test_lora_run_saves_adapters_and_reloads_for_eval(neu_small, tmp_path):
    out = tmp_path / "lora"
    assert main(["train", "--data", str(neu_small), "--out", str(out), "--set", "train.epochs=2",
                 "--set", "finetune.strategy=lora", "--set", "finetune.lora.r=4", *FAST]) == 0
    model_keys = load_file(str(out / "checkpoints/last/model.safetensors")).keys()
    for folder in ("best", "last"):
        adapter = load_file(str(out / "checkpoints" / folder / "adapter.safetensors"))
        assert adapter and set(adapter) <= set(model_keys)
        assert all(k.endswith((".lora_a", ".lora_b")) for k in adapter)
    assert "lora: adapters r=4" in (out / "train.log").read_text()
    assert main(["eval", str(out), "--data", str(neu_small), "--out", str(tmp_path / "eval.json")]) == 0


@pytest.mark.slow
def test_linear_probe_run_leaves_backbone_batchnorm_statistics_untouched(neu_small, tmp_path):
    out = tmp_path / "probe"
    assert main(["train", "--data", str(neu_small), "--out", str(out), "--set", "train.epochs=1",
                 "--set", "finetune.strategy=linear_probe", *FAST]) == 0
    weights = load_file(str(out / "checkpoints/last/model.safetensors"))
    means = [v for k, v in weights.items() if k.endswith("running_mean")]
    variances = [v for k, v in weights.items() if k.endswith("running_var")]
    assert means and all(torch.equal(m, torch.zeros_like(m)) for m in means)  # fresh BN: mean 0, var 1
    assert all(torch.equal(v, torch.ones_like(v)) for v in variances)
    assert "linear_probe: training fc (1 of 6 layer groups)" in (out / "train.log").read_text()
