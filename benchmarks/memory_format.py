"""Training-step time with contiguous (NCHW) against channels-last weights, per backbone.

    python benchmarks/memory_format.py [--json FILE] [--models M ...] [--size 128] [--steps 5]
                                       [--strategy full|lora]

For each timm model (random init, two classes, batch 32, AdamW fused as `vision-ft train` builds
it) one training step is timed in both layouts, the two models' steps interleaved so that other
load lands on both alike; the median per layout and their ratio are printed side by side. This is
the evidence behind `train.memory_format: auto` (channels-last on CPU). `--strategy lora` times
LoRA runs as `finetune.strategy: lora` sets them up (rank 8, alpha 16, every conv and linear layer
but the head adapted, the head trained) instead of full fine-tuning.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time
from pathlib import Path

import timm
import torch

from vision_ft.cpu_memory import keep_freed_memory
from vision_ft.finetune.lora import apply_lora
from vision_ft.memory_format import FORMATS
from vision_ft.models.create import create_model
from vision_ft.train import build_optimizer

MODELS = ("resnet18", "resnet50", "tf_efficientnet_lite0", "efficientnet_b0", "mobilenetv3_large_100",
          "regnety_008", "densenet121", "convnext_atto", "vit_tiny_patch16_224")
LAYOUTS = ("contiguous", "channels_last")


def make_step(model_name: str, layout: str, batch: int, size: int, strategy: str = "full"):
    torch.manual_seed(0)
    # vision-ft's model factory: fixed-size models (ViT) are built for `size`, as training builds them.
    model = create_model(model_name, num_classes=2, weights="none", image_size=size).train()
    if strategy == "lora":
        apply_lora(model, r=8, alpha=16.0)  # the finetune.lora defaults: every conv and linear but the head
    model = model.to(memory_format=FORMATS[layout])
    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = build_optimizer(trainable, 1e-4, 0.05, torch.device("cpu"))
    generator = torch.Generator().manual_seed(1)
    images = torch.randn(batch, 3, size, size, generator=generator)
    labels = torch.randint(0, 2, (batch,), generator=generator)

    def step() -> None:
        torch.nn.functional.cross_entropy(model(images), labels).backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    return step


def time_model(model_name: str, args: argparse.Namespace) -> dict[str, float]:
    steps = {layout: make_step(model_name, layout, args.batch, args.size, args.strategy) for layout in LAYOUTS}
    for step in steps.values():
        for _ in range(args.warmup):
            step()
    times: dict[str, list[float]] = {layout: [] for layout in LAYOUTS}
    for round_index in range(args.steps):
        order = list(LAYOUTS) if round_index % 2 == 0 else list(reversed(LAYOUTS))
        for layout in order:
            started = time.perf_counter()
            steps[layout]()
            times[layout].append((time.perf_counter() - started) * 1e3)
    medians = {layout: statistics.median(values) for layout, values in times.items()}
    return {"contiguous_ms": medians["contiguous"], "channels_last_ms": medians["channels_last"],
            "speedup": medians["contiguous"] / medians["channels_last"]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--json", type=Path)
    parser.add_argument("--models", nargs="+", default=list(MODELS))
    parser.add_argument("--size", type=int, default=128)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--strategy", choices=["full", "lora"], default="full")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    keep_freed_memory()  # glibc's malloc tuned as `vision-ft train` tunes it on CPU
    print(f"{'model':24s} {'NCHW ms':>9s} {'channels-last ms':>17s} {'speedup':>8s}")
    results = {}
    for model_name in args.models:
        result = time_model(model_name, args)
        results[model_name] = result
        print(f"{model_name:24s} {result['contiguous_ms']:9.0f} {result['channels_last_ms']:17.0f} "
              f"{result['speedup']:7.2f}x", flush=True)
    if args.json:
        payload = {"results": results, "settings": vars(args) | {"json": str(args.json), "malloc": "tuned"},
                   "machine": {"cpu": platform.processor() or platform.machine(), "torch": torch.__version__,
                               "timm": timm.__version__, "threads": torch.get_num_threads()}}
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(payload, indent=2) + "\n")
        print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
