"""Training-step time in float32 against bfloat16 autocast on a CPU, per backbone.

    python benchmarks/cpu_autocast.py [--json FILE] [--models M ...] [--sizes 128 224] [--batch 16]
                                      [--steps 5] [--strategy full|lora]

For each timm model (random init, two classes, channels-last weights and AdamW fused, as
`vision-ft train` builds it on a CPU) one training step is timed in float32 and under
`torch.autocast("cpu", dtype=torch.bfloat16)`, the two interleaved so that other load lands on
both alike; the medians and their ratio are printed side by side. This is the evidence behind
`train.amp: auto` on CPUs (vision_ft/precision.py), which times the same two steps for the run
itself and takes bfloat16 only when it is 1.2x faster. The header says whether the processor has
bfloat16 instructions: without them bfloat16 is emulated and slow.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import time
from pathlib import Path

import timm
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from memory_format import make_step  # noqa: E402  (the same model, layout and optimizer)

from vision_ft.cpu_memory import keep_freed_memory  # noqa: E402
from vision_ft.precision import cpu_has_bf16_instructions  # noqa: E402

MODELS = ("resnet18", "resnet50", "tf_efficientnet_lite0", "efficientnet_b0", "mobilenetv3_large_100",
          "convnext_atto", "vit_tiny_patch16_224")
PRECISIONS = ("float32", "bfloat16")


def time_model(model_name: str, size: int, args: argparse.Namespace) -> dict[str, float]:
    step = make_step(model_name, "channels_last", args.batch, size, args.strategy)

    def run(precision: str) -> float:
        started = time.perf_counter()
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=precision == "bfloat16"):
            step()
        return (time.perf_counter() - started) * 1e3

    for _ in range(args.warmup):
        for precision in PRECISIONS:
            run(precision)
    times: dict[str, list[float]] = {p: [] for p in PRECISIONS}
    for round_index in range(args.steps):
        for precision in PRECISIONS if round_index % 2 == 0 else reversed(PRECISIONS):
            times[precision].append(run(precision))
    medians = {p: statistics.median(v) for p, v in times.items()}
    return {"float32_ms": medians["float32"], "bfloat16_ms": medians["bfloat16"],
            "speedup": medians["float32"] / medians["bfloat16"]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--json", type=Path)
    parser.add_argument("--models", nargs="+", default=list(MODELS))
    parser.add_argument("--sizes", nargs="+", type=int, default=[128, 224])
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--strategy", choices=["full", "lora"], default="full")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    keep_freed_memory()  # glibc's malloc tuned as `vision-ft train` tunes it on CPU
    bf16 = cpu_has_bf16_instructions()
    print(f"bfloat16 instructions (AVX512-BF16 or AMX): {'yes' if bf16 else 'no'}; batch {args.batch}, "
          f"{args.strategy}, {args.threads} threads")
    print(f"{'model':24s} {'px':>4s} {'float32 ms':>11s} {'bfloat16 ms':>12s} {'speedup':>8s}")
    results: dict[str, dict[str, dict[str, float]]] = {}
    for model_name in args.models:
        for size in args.sizes:
            result = time_model(model_name, size, args)
            results.setdefault(model_name, {})[str(size)] = result
            print(f"{model_name:24s} {size:4d} {result['float32_ms']:11.0f} {result['bfloat16_ms']:12.0f} "
                  f"{result['speedup']:7.2f}x", flush=True)
    if args.json:
        payload = {"results": results, "settings": vars(args) | {"json": str(args.json)},
                   "machine": {"cpu": platform.processor() or platform.machine(), "bf16_instructions": bf16,
                               "torch": torch.__version__, "timm": timm.__version__,
                               "threads": torch.get_num_threads()}}
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(payload, indent=2) + "\n")
        print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
