"""Training-step cost of LoRA against full fine-tuning, peft's LoRA and the frozen floor.

    python benchmarks/finetune_step.py [--json FILE] [--steps N]

For resnet18 and tf_efficientnet_lite0 (timm, random init, random data; 128 px, batch 32,
rank 8, alpha 16, every non-grouped conv adapted, head trained) it times one training step
(forward + backward + AdamW step, fused as `vision-ft train` runs it) for:

* full      every parameter trains;
* floor     every parameter frozen, backward to the input only: no weight gradient at all,
            the least any adapter method can pay on the model as timm builds it (no optimizer
            step: nothing trains);
* floor, BN folded
            the floor with every frozen conv -> BN pair fused into one conv (the weights
            pre-scaled, the BN layer passed through): the least any adapter method can pay
            when it, too, folds the frozen BN layers;
* vision-ft vision_ft.finetune.lora.apply_lora, which folds each frozen BN layer into the LoRA
            conv before it (vision_ft.finetune.norm_folding), so it can run under the floor;
* peft      peft.inject_adapter_in_model(LoraConfig(target_modules=<the same convs>)).

BatchNorm runs as `vision-ft train` runs it (finetune.frozen_bn: freeze, the default): the
frozen BN layers of floor, vision-ft and peft in eval mode (pretraining's statistics, no batch
statistics to compute or differentiate), every BN layer of full fine-tuning in training mode.

The step time is the median over --steps steps after warmup. The methods' steps are
interleaved (method order rotating each round) so that load from other processes on a
shared machine lands on all of them alike. Peak memory is measured per method in a fresh
subprocess: on CPU the growth of the resident set size (VmHWM after resetting it through
/proc/self/clear_refs, else ru_maxrss) over the RSS measured just before the first step, so it
covers activations, gradients, optimizer state and caches; on CUDA
torch.cuda.max_memory_allocated() minus the memory allocated before the first step.

Every method runs in the layout `vision-ft train` picks for it (train.memory_format auto:
channels-last on CPU for every strategy, contiguous on CUDA), so the floor is the frozen model at
its fastest; --memory-format contiguous or channels_last measures all four in that layout instead.

On CPU the process tunes glibc's malloc the way `vision-ft train` does (vision_ft.cpu_memory:
freed activations stay in the process instead of being page-faulted in again every step);
--plain-malloc measures with glibc's defaults. Plain glibc makes every method slower and the
ratios noisier: how much each step page-faults depends on the heap's history.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import timm
import torch
from torch import nn

from vision_ft.cpu_memory import keep_freed_memory
from vision_ft.finetune.freezing import train_mode_with_frozen_bn
from vision_ft.finetune.lora import apply_lora
from vision_ft.finetune.norm_folding import fold_norms_into
from vision_ft.memory_format import apply_memory_format, resolve_memory_format
from vision_ft.train import build_optimizer

MODELS = ("resnet18", "tf_efficientnet_lite0")
METHODS = ("floor", "floor-folded", "full", "vision-ft", "peft")
NUM_CLASSES = 10
THREADS = 2


def adapted_conv_names(model: nn.Module) -> list[str]:
    """Every non-grouped conv outside the classifier head: the layers both LoRA methods adapt."""
    head_ids = {id(m) for m in model.get_classifier().modules()}
    return [name for name, module in model.named_modules()
            if isinstance(module, nn.Conv2d) and module.groups == 1 and id(module) not in head_ids]


def build(model_name: str, method: str, rank: int, seed: int = 0) -> nn.Module:
    """The model set up for `method`: trainable parameters chosen, adapters injected."""
    torch.manual_seed(seed)
    model = timm.create_model(model_name, pretrained=False, num_classes=NUM_CLASSES)
    head_ids = {id(p) for p in model.get_classifier().parameters()}
    targets = adapted_conv_names(model)
    if method in ("floor", "floor-folded"):
        model.requires_grad_(False)
        if method == "floor-folded":
            fuse_frozen_conv_norms(model)
    elif method == "vision-ft":
        apply_lora(model, r=rank, alpha=2 * rank, target_patterns=targets)  # adapters + head train
    elif method == "peft":
        import peft

        # A regex string is matched in full against module names: exactly these convs.
        pattern = "^(" + "|".join(name.replace(".", r"\.") for name in targets) + ")$"
        model = peft.inject_adapter_in_model(peft.LoraConfig(target_modules=pattern, r=rank, lora_alpha=2 * rank), model)
        for name, param in model.named_parameters():
            param.requires_grad_("lora_" in name or id(param) in head_ids)
    elif method != "full":
        raise ValueError(f"unknown method {method!r}")
    # As the training loop sets it each epoch: frozen BN layers in eval mode (all of full's BN train).
    train_mode_with_frozen_bn(model, "freeze")
    return model


def fuse_frozen_conv_norms(model: nn.Module) -> int:
    """Each conv -> BN pair of a frozen model as one conv with the BN's scale and shift in its
    weight and bias, the BN layer passing its input through (as long as it stays frozen)."""
    return len(fold_norms_into(model))


def make_step(model: nn.Module, method: str, batch: int, size: int, device: torch.device,
              memory_format: str = "contiguous") -> Callable[[], None]:
    """One training step on a fixed random batch."""
    model.to(device)
    apply_memory_format(model, memory_format, device)
    generator = torch.Generator().manual_seed(1)
    images = torch.randn(batch, 3, size, size, generator=generator).to(device)
    labels = torch.randint(0, NUM_CLASSES, (batch,), generator=generator).to(device)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = build_optimizer(params, 1e-4, 0.01, device) if params else None  # as vision-ft train builds it
    if method in ("floor", "floor-folded"):
        images.requires_grad_(True)  # backward all the way to the input, through frozen layers

    def step() -> None:
        loss = nn.functional.cross_entropy(model(images), labels)
        loss.backward()
        if optimizer is not None:
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
        else:
            images.grad = None
        if device.type == "cuda":
            torch.cuda.synchronize()

    return step


def time_methods(model_name: str, methods: list[str], args: argparse.Namespace,
                 device: torch.device) -> tuple[dict[str, list[float]], dict[str, list[float]]]:
    """Wall-clock and process-CPU step times in ms per method, interleaved round by round.

    CPU time is reported beside wall time because the machine may be shared: other processes
    stretch wall time, CPU time much less (OpenMP spin-waits still count in it).
    """
    steps = {m: make_step(build(model_name, m, args.rank), m, args.batch, args.size, device, args.memory_format)
             for m in methods}
    for step in steps.values():
        for _ in range(args.warmup):
            step()
    wall: dict[str, list[float]] = {m: [] for m in methods}
    cpu: dict[str, list[float]] = {m: [] for m in methods}
    for round_index in range(args.steps):
        shift = round_index % len(methods)
        for method in methods[shift:] + methods[:shift]:
            start, start_cpu = time.perf_counter(), time.process_time()
            steps[method]()
            wall[method].append((time.perf_counter() - start) * 1e3)
            cpu[method].append((time.process_time() - start_cpu) * 1e3)
    return wall, cpu


def _rss_kib(field: str) -> int | None:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1])
    except OSError:
        pass
    return None


def measure_memory(model_name: str, method: str, args: argparse.Namespace, device: torch.device) -> dict[str, object]:
    """Peak memory growth (MiB) over the state just before the first training step."""
    step = make_step(build(model_name, method, args.rank), method, args.batch, args.size, device, args.memory_format)
    if device.type == "cuda":
        torch.cuda.synchronize()
        before = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        for _ in range(args.memory_steps):
            step()
        return {"peak_mib": (torch.cuda.max_memory_allocated() - before) / 2**20, "how": "cuda max_memory_allocated"}
    before = _rss_kib("VmRSS")
    how = "VmHWM after clear_refs"
    try:
        Path("/proc/self/clear_refs").write_text("5")  # resets the peak RSS to the current RSS
    except OSError:
        how = "ru_maxrss"
    for _ in range(args.memory_steps):
        step()
    peak = _rss_kib("VmHWM") if how.startswith("VmHWM") else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    if before is None or peak is None:
        return {"peak_mib": None, "how": "unavailable"}
    return {"peak_mib": (peak - before) / 1024, "how": f"RSS growth ({how})"}


def memory_in_subprocess(model_name: str, method: str, args: argparse.Namespace) -> dict[str, object]:
    command = [sys.executable, __file__, "--memory-probe", model_name, method, "--rank", str(args.rank),
               "--batch", str(args.batch), "--size", str(args.size), "--memory-steps", str(args.memory_steps),
               "--device", args.device, "--memory-format", args.memory_format] + (["--plain-malloc"] if args.plain_malloc else [])
    result = subprocess.run(command, capture_output=True, text=True, check=False)
    if result.returncode != 0:
        return {"peak_mib": None, "how": f"probe failed: {result.stderr.strip().splitlines()[-1:]}"}
    return json.loads(result.stdout.strip().splitlines()[-1])


def device_info(device: torch.device) -> dict[str, object]:
    info: dict[str, object] = {
        "device": str(device),
        "torch": torch.__version__,
        "timm": timm.__version__,
        "threads": torch.get_num_threads(),
        "python": platform.python_version(),
    }
    if device.type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(device)
    else:
        try:
            model_line = next(line for line in Path("/proc/cpuinfo").read_text().splitlines() if line.startswith("model name"))
            info["cpu"] = model_line.split(":", 1)[1].strip()
        except (OSError, StopIteration):
            info["cpu"] = platform.processor() or platform.machine()
        info["logical_cpus"] = os.cpu_count()
    try:
        import peft

        info["peft"] = peft.__version__
    except ImportError:
        info["peft"] = None
    return info


def load_average() -> list[float] | None:
    try:
        return [round(v, 2) for v in os.getloadavg()]
    except OSError:
        return None


def print_table(results: dict[str, dict[str, object]], methods: list[str]) -> None:
    labels = {"floor": "frozen floor", "floor-folded": "floor, BN folded", "full": "full fine-tune",
              "vision-ft": "vision-ft LoRA", "peft": "peft LoRA"}
    print(f"\n{'model':22s} {'method':16s} {'step ms':>8s} {'x floor':>8s} {'x folded':>9s} {'cpu ms':>8s} "
          f"{'x floor':>8s} {'peak MiB':>9s}")
    for model_name, result in results.items():
        times, cpu, memory = result["step_ms"], result["step_cpu_ms"], result["peak_memory_mib"]
        for method in methods:
            peak = memory.get(method)
            peak_text = f"{peak:9.0f}" if isinstance(peak, (int, float)) else f"{'-':>9s}"
            print(f"{model_name:22s} {labels[method]:16s} {times[method]:8.1f} {times[method] / times['floor']:8.3f} "
                  f"{times[method] / times['floor-folded']:9.3f} {cpu[method]:8.1f} {cpu[method] / cpu['floor']:8.3f} "
                  f"{peak_text}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--json", type=Path, help="write the results here")
    parser.add_argument("--steps", type=int, default=15, help="timed steps per method (median reported)")
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--models", nargs="+", default=list(MODELS))
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--size", type=int, default=128)
    parser.add_argument("--rank", type=int, default=8)
    parser.add_argument("--memory-steps", type=int, default=2)
    parser.add_argument("--no-memory", action="store_true", help="skip the peak-memory subprocesses")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--memory-format", default="auto", choices=["auto", "channels_last", "contiguous"],
                        help="weight layout of every method (auto: as vision-ft train picks it on the device)")
    parser.add_argument("--plain-malloc", action="store_true",
                        help="leave glibc's malloc as it is (vision-ft train tunes it on CPU: vision_ft.cpu_memory)")
    parser.add_argument("--memory-probe", nargs=2, metavar=("MODEL", "METHOD"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    torch.set_num_threads(THREADS)
    device = torch.device(args.device)
    # Measure the step the way `vision-ft train` runs it: on CPU with freed memory kept in the process.
    malloc = "plain" if args.plain_malloc or device.type != "cpu" else ("tuned" if keep_freed_memory() else "plain (tuning unavailable)")

    args.memory_format = resolve_memory_format(args.memory_format, device)
    if args.memory_probe:
        print(json.dumps(measure_memory(*args.memory_probe, args, device)))
        return

    methods = [m for m in METHODS if m != "peft"]
    try:
        import peft  # noqa: F401

        methods.append("peft")
    except ImportError:
        print("peft is not installed: its column is skipped")

    results: dict[str, dict[str, object]] = {}
    load_before = load_average()
    for model_name in args.models:
        print(f"{model_name}: timing {', '.join(methods)} ({args.steps} interleaved steps each, malloc {malloc})", flush=True)
        times, cpu_times = time_methods(model_name, methods, args, device)
        medians = {m: statistics.median(v) for m, v in times.items()}
        cpu_medians = {m: statistics.median(v) for m, v in cpu_times.items()}
        memory: dict[str, float | None] = {}
        memory_how = None
        if not args.no_memory:
            for method in methods:
                probe = memory_in_subprocess(model_name, method, args)
                memory[method] = probe["peak_mib"]
                memory_how = probe["how"]
        result: dict[str, object] = {
            "lora_over_floor": medians["vision-ft"] / medians["floor"],
            "lora_over_folded_floor": medians["vision-ft"] / medians["floor-folded"],
            "full_over_floor": medians["full"] / medians["floor"],
        }
        if "peft" in medians:
            result["peft_over_floor"] = medians["peft"] / medians["floor"]
            result["lora_over_peft"] = medians["vision-ft"] / medians["peft"]
        result.update({
            "step_ms": medians,
            "step_ms_all": {m: [round(t, 2) for t in v] for m, v in times.items()},
            "step_cpu_ms": cpu_medians,
            "cpu_time_over_floor": {m: cpu_medians[m] / cpu_medians["floor"] for m in methods},
            "peak_memory_mib": memory,
            "peak_memory_method": memory_how,
            "adapted_convs": len(adapted_conv_names(timm.create_model(model_name, pretrained=False))),
        })
        results[model_name] = result

    print_table(results, methods)
    if args.json:
        payload = {
            **results,
            "settings": {"batch": args.batch, "image_size": args.size, "rank": args.rank, "alpha": 2 * args.rank,
                         "steps": args.steps, "warmup": args.warmup, "optimizer": "AdamW (fused on CPU and CUDA)",
                         "timing": "median of interleaved steps, forward + backward + optimizer step",
                         "malloc": malloc, "memory_format": args.memory_format,
                         "batchnorm": "frozen BN in eval mode (finetune.frozen_bn freeze), full fine-tuning's in train mode; "
                                      "vision-ft LoRA folds each frozen BN into the LoRA conv before it, "
                                      "floor-folded every conv -> BN pair"},
            "device_info": device_info(device),
            "load_average": {"before": load_before, "after": load_average()},
        }
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(payload, indent=2) + "\n")
        print(f"\nwrote {args.json}")


if __name__ == "__main__":
    main()
