"""Train a timm model on NEU-DET steel-surface defects with a plain, hand-written PyTorch loop,
using only two pieces of vision-ft: `vision_ft.finetune.prepare` (progressive unfreezing with
layer-wise learning rates) or `vision_ft.lora` (LoRA adapters, saved and merged at the end).

    python examples/own_loop/train_neu_det.py --data path/to/neu-det --strategy progressive \\
        --weights .examples/weights/tf_efficientnet_lite0.safetensors
    python examples/own_loop/train_neu_det.py --data path/to/neu-det --strategy lora \\
        --weights .examples/weights/tf_efficientnet_lite0.safetensors

Everything else (data, model, optimizer, loop, evaluation) is torchvision, timm and torch.
`--weights` takes a timm-named state dict (`vision-ft weights import` writes one); without it
the model starts from random weights.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import timm
import torch
from safetensors.torch import load_file
from torch import nn
from torch.utils.data import DataLoader, random_split
from torchvision import datasets, transforms

import vision_ft.lora as lora
from vision_ft.finetune import prepare


def loaders(data: Path, image_size: int, batch_size: int, mean: tuple, std: tuple,
            per_class: int | None) -> tuple[DataLoader, DataLoader, list[str]]:
    """80 / 20 random split of an ImageFolder tree (the first `per_class` images of each class when
    given); grey images become 3-channel, normalised as the backbone was pretrained."""
    common = [transforms.Grayscale(3), transforms.Resize((image_size, image_size))]
    train_tf = transforms.Compose([*common, transforms.RandomHorizontalFlip(), transforms.RandomVerticalFlip(),
                                   transforms.ToTensor(), transforms.Normalize(mean, std)])
    eval_tf = transforms.Compose([*common, transforms.ToTensor(), transforms.Normalize(mean, std)])
    full = datasets.ImageFolder(str(data))
    chosen = list(range(len(full)))
    if per_class is not None:
        counts: dict[int, int] = {}
        chosen = []
        for index, (_, label) in enumerate(full.samples):
            if counts.get(label, 0) < per_class:
                chosen.append(index)
                counts[label] = counts.get(label, 0) + 1
    train_idx, val_idx = random_split(chosen, [0.8, 0.2], generator=torch.Generator().manual_seed(0))
    train_set = torch.utils.data.Subset(datasets.ImageFolder(str(data), transform=train_tf), list(train_idx))
    val_set = torch.utils.data.Subset(datasets.ImageFolder(str(data), transform=eval_tf), list(val_idx))
    return (DataLoader(train_set, batch_size, shuffle=True, num_workers=2),
            DataLoader(val_set, batch_size * 2, num_workers=2), full.classes)


def build_model(name: str, num_classes: int, weights: Path | None) -> nn.Module:
    model = timm.create_model(name, pretrained=False, num_classes=num_classes)
    if weights is not None:
        state = {k: v for k, v in load_file(str(weights)).items()
                 if not k.startswith(model.default_cfg.get("classifier", "classifier"))}
        missing, _ = model.load_state_dict(state, strict=False)
        print(f"loaded {len(state)} tensors from {weights} ({len(missing)} left at init: the new head)")
        # timm's EfficientNet heads start at uniform(+-1/sqrt(classes)): on 1280 pretrained features
        # that gives logits in the tens and a first-epoch loss near 10. Start the new head small.
        head = model.get_classifier()
        nn.init.normal_(head.weight, std=0.01)
        nn.init.zeros_(head.bias)
    return model


@torch.no_grad()
def accuracy(model: nn.Module, loader: DataLoader) -> float:
    model.eval()
    correct = total = 0
    for images, labels in loader:
        correct += int((model(images).argmax(1) == labels).sum())
        total += len(labels)
    return correct / total


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, required=True, help="NEU-DET folder (one folder per class)")
    parser.add_argument("--strategy", choices=["progressive", "lora"], default="progressive")
    parser.add_argument("--model", default="tf_efficientnet_lite0")
    parser.add_argument("--weights", type=Path, help="timm-named .safetensors (default: random init)")
    parser.add_argument("--epochs", type=int, default=4)
    parser.add_argument("--image-size", type=int, default=64)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--per-class", type=int, help="use only the first N images of each class (a quick run)")
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--out", type=Path, default=Path("runs/own_loop"))
    args = parser.parse_args()
    torch.manual_seed(0)

    classes = datasets.ImageFolder(str(args.data)).classes
    model = build_model(args.model, len(classes), args.weights)
    data_config = timm.data.resolve_data_config({}, model=model)
    train_loader, val_loader, _ = loaders(args.data, args.image_size, args.batch_size, data_config["mean"],
                                          data_config["std"], args.per_class)
    print(f"{len(train_loader.dataset)} training and {len(val_loader.dataset)} validation images of "
          f"{len(classes)} classes at {args.image_size} px")
    total_steps = args.epochs * len(train_loader)

    if args.strategy == "progressive":
        # Head first, one more layer group every epoch, each group below at 0.7x the rate above it.
        groups, schedule = prepare(model, "progressive", lr=args.lr, unfreeze_every=1, lr_decay=0.7)
        optimizer = torch.optim.AdamW(groups)
    else:
        wrapped = lora.inject(model, r=8)  # every conv/linear outside the head; only adapters + head train
        print(f"LoRA on {len(wrapped)} layers")
        optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=args.lr)
        scheduler = torch.optim.lr_scheduler.OneCycleLR(optimizer, args.lr, total_steps=total_steps)
    loss_fn = nn.CrossEntropyLoss(label_smoothing=0.1)

    for epoch in range(1, args.epochs + 1):
        started = time.time()
        if args.strategy == "progressive":
            schedule.on_epoch_start(epoch, optimizer)
            schedule.train_mode()  # frozen groups keep their BatchNorm statistics
            print(f"epoch {epoch}: {schedule.describe()}")
        else:
            model.train()
        seen, running = 0, 0.0
        for images, labels in train_loader:
            if args.strategy == "progressive":
                schedule.set_learning_rates(optimizer, total_steps, warmup_steps=len(train_loader) // 2)
            loss = loss_fn(model(images), labels)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            if args.strategy == "lora":
                scheduler.step()
            running += loss.item() * len(labels)
            seen += len(labels)
        print(f"epoch {epoch}: train loss {running / seen:.3f}  val accuracy {accuracy(model, val_loader):.3f}  "
              f"({time.time() - started:.0f} s)")

    if args.strategy == "lora":
        adapter = lora.save_adapter(model, args.out / "adapter.safetensors")
        print(f"adapter + head: {adapter} ({adapter.stat().st_size / 1e6:.2f} MB)")
        before = accuracy(model, val_loader)
        lora.merge(model)  # plain conv/linear layers again, ready for torch.onnx or timm tooling
        print(f"merged model: val accuracy {accuracy(model, val_loader):.3f} (adapters: {before:.3f})")


if __name__ == "__main__":
    main()
