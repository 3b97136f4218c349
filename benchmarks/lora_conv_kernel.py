"""Benchmark the fused Triton LoRA convolution on the conv layers of real networks.

For every conv layer shape of resnet50 and tf_efficientnet_lite0 (shapes collected with forward
hooks on the timm models; batch 64, 224 px, bf16, channels_last) this times forward + backward
(gradients for x, A and B) of four paths:

* triton  - `triton_lora_conv2d` (layers it does not support, e.g. depthwise, take the torch
            path, as the dispatcher would route them; the row says which);
* torch   - `vision_ft_kernels.lora_conv2d(..., backend="torch")`;
* unfused - peft-style: base conv + conv with A + 1x1 conv with B + add, through autograd;
* floor   - the frozen base conv alone, forward + backward to its input: what any adapter
            method must pay at least.

Per network it prints the summed times side by side with speedup_vs_unfused (unfused / triton)
and ratio_to_floor (triton / floor), then times whole resnet50 training steps: full fine-tuning,
the frozen floor, vision-ft LoRA (`vision_ft.finetune.lora.apply_lora`, triton and torch
backends) and peft LoRA.  Results go to benchmarks/results/lora_conv_kernel_<gpu>.json, or to
--json FILE.

Without CUDA the script exits with code 2.  --smoke runs the same code on the CPU under Triton's
interpreter with two tiny layer shapes and a tiny timm model, to check the script itself; its
timings mean nothing.

Usage:
    python benchmarks/lora_conv_kernel.py [--json FILE] [--rank 8] [--batch 64]
    python benchmarks/lora_conv_kernel.py --smoke [--json FILE]
"""

from __future__ import annotations

import argparse
import json
import math
import os
import re
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn

NETWORKS = ("resnet50", "tf_efficientnet_lite0")
STEP_NETWORK = "resnet50"
RESULTS_DIR = Path(__file__).resolve().parent / "results"
PATHS = ("triton", "torch", "unfused", "floor")
LORA_ALPHA = 16.0


@dataclass(frozen=True)
class ConvShape:
    """One convolution as the kernel sees it: the input already padded for TF 'same' convs."""

    c_in: int
    c_out: int
    height: int
    width: int
    kernel: tuple[int, int]
    stride: tuple[int, int]
    padding: tuple[int, int]
    dilation: tuple[int, int]
    groups: int

    def label(self) -> str:
        kh, kw = self.kernel
        text = f"{self.c_in}x{self.height}x{self.width}->{self.c_out} k{kh}x{kw} s{self.stride[0]}"
        if self.dilation != (1, 1):
            text += f" d{self.dilation[0]}"
        if self.groups > 1:
            text += f" g{self.groups}"
        return text


@dataclass
class Settings:
    """What to run on.  `warmup` / `reps` are milliseconds for do_bench on CUDA and call
    counts on the CPU; `step_warmup` / `step_reps` are call counts for training steps."""

    device: torch.device
    dtype: torch.dtype
    batch: int
    image_size: int
    rank: int
    warmup: int
    reps: int
    step_warmup: int
    step_reps: int
    memory_format: torch.memory_format


# ----------------------------------------------------------------------------- layer shapes

def _tf_same_total_padding(size: int, kernel: int, stride: int, dilation: int) -> int:
    """Total padding TensorFlow's 'same' adds along one axis (split unevenly when odd)."""
    return max((math.ceil(size / stride) - 1) * stride + (kernel - 1) * dilation + 1 - size, 0)


def collect_conv_shapes(model_name: str, image_size: int) -> dict[ConvShape, list[str]]:
    """Every nn.Conv2d of the timm model, by shape, with the names of the layers that have it.

    Runs one CPU forward at batch 1 with hooks.  timm's Conv2dSame pads its input inside its
    forward; the shape recorded is the padded input with padding 0, the work actually done.
    """
    import timm
    from timm.layers import Conv2dSame

    model = timm.create_model(model_name, pretrained=False).eval()
    shapes: dict[ConvShape, list[str]] = {}

    def hook_for(name: str) -> Callable:
        def record(module: nn.Conv2d, inputs: tuple[Tensor, ...]) -> None:
            height, width = inputs[0].shape[-2:]
            padding = tuple(module.padding)
            if isinstance(module, Conv2dSame):
                height += _tf_same_total_padding(height, module.kernel_size[0], module.stride[0],
                                                 module.dilation[0])
                width += _tf_same_total_padding(width, module.kernel_size[1], module.stride[1],
                                                module.dilation[1])
                padding = (0, 0)
            shape = ConvShape(module.in_channels, module.out_channels, int(height), int(width),
                              tuple(module.kernel_size), tuple(module.stride), padding,
                              tuple(module.dilation), module.groups)
            shapes.setdefault(shape, []).append(name)
        return record

    handles = [module.register_forward_pre_hook(hook_for(name))
               for name, module in model.named_modules() if isinstance(module, nn.Conv2d)]
    with torch.no_grad():
        model(torch.zeros(1, 3, image_size, image_size))
    for handle in handles:
        handle.remove()
    return shapes


# ----------------------------------------------------------------------------- timing

def time_ms(fn: Callable[[], object], settings: Settings) -> float:
    """Median milliseconds of `fn` (do_bench on CUDA: it flushes L2 between runs)."""
    if settings.device.type == "cuda":
        from triton.testing import do_bench

        fn()  # compile and autotune outside the measurement
        return float(do_bench(fn, warmup=settings.warmup, rep=settings.reps, return_mode="median"))
    return time_calls_ms(fn, settings.warmup, settings.reps, settings.device)


def time_calls_ms(fn: Callable[[], object], warmup: int, reps: int, device: torch.device) -> float:
    """Median milliseconds over `reps` calls after `warmup` calls (for long calls such as a
    training step, where do_bench's time budget would allow a single repetition).  The
    warm-up calls also absorb compilation and autotuning."""
    for _ in range(warmup):
        fn()
    samples = []
    for _ in range(reps):
        if device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            end.synchronize()
            samples.append(start.elapsed_time(end))
        else:
            start_s = time.perf_counter()
            fn()
            samples.append((time.perf_counter() - start_s) * 1e3)
    return statistics.median(samples)


def _unfused_lora_conv2d(x: Tensor, weight: Tensor, bias: Tensor | None, lora_a: Tensor,
                         lora_b: Tensor, scaling: float, shape: ConvShape) -> Tensor:
    """What peft's LoRA Conv2d runs: base conv, conv with A, 1x1 conv with B, add."""
    conv = dict(stride=shape.stride, padding=shape.padding, dilation=shape.dilation)
    base = F.conv2d(x, weight, bias, groups=shape.groups, **conv)
    if shape.groups == 1:
        down = F.conv2d(x, lora_a, **conv)
        up = F.conv2d(down, lora_b[:, :, None, None])
    else:  # rank r per group: A repeated per group, a grouped 1x1 conv with B
        down = F.conv2d(x, lora_a.repeat(shape.groups, 1, 1, 1), groups=shape.groups, **conv)
        up = F.conv2d(down, lora_b[:, :, None, None], groups=shape.groups)
    return base + scaling * up


def layer_paths(shape: ConvShape, settings: Settings) -> tuple[dict[str, Callable[[], object]], bool]:
    """Forward + backward closures for each path on one layer shape; and whether Triton runs it."""
    from vision_ft_kernels import lora_conv2d
    from vision_ft_kernels.triton_lora_conv import triton_lora_conv2d, triton_supports

    device, dtype, fmt = settings.device, settings.dtype, settings.memory_format
    kh, kw = shape.kernel
    c_in_per_group = shape.c_in // shape.groups
    x = torch.randn(settings.batch, shape.c_in, shape.height, shape.width, device=device,
                    dtype=dtype).contiguous(memory_format=fmt).requires_grad_()
    weight = (torch.randn(shape.c_out, c_in_per_group, kh, kw, device=device, dtype=dtype)
              * (c_in_per_group * kh * kw) ** -0.5).contiguous(memory_format=fmt)
    bias = None  # timm's convs are followed by batch norm
    lora_a = (torch.randn(settings.rank, c_in_per_group, kh, kw, device=device, dtype=dtype)
              * 0.01).requires_grad_()
    lora_b = (torch.randn(shape.c_out, settings.rank, device=device, dtype=dtype)
              * 0.01).requires_grad_()
    scaling = LORA_ALPHA / settings.rank
    conv = (shape.stride, shape.padding, shape.dilation)
    with torch.no_grad():
        out = F.conv2d(x, weight, bias, *conv, groups=shape.groups)
    grad_out = torch.randn_like(out)
    trainable = (x, lora_a, lora_b)

    def fwd_bwd(forward: Callable[[], Tensor], inputs: tuple[Tensor, ...]) -> Callable[[], object]:
        return lambda: torch.autograd.grad(forward(), inputs, grad_out)

    def torch_path() -> Tensor:
        return lora_conv2d(x, weight, bias, lora_a, lora_b, scaling, *conv, groups=shape.groups,
                           backend="torch")

    supported = triton_supports(x, weight, lora_a, shape.groups)
    triton_path = ((lambda: triton_lora_conv2d(x, weight, bias, lora_a, lora_b, scaling, *conv))
                   if supported else torch_path)
    paths = {
        "triton": fwd_bwd(triton_path, trainable),
        "torch": fwd_bwd(torch_path, trainable),
        "unfused": fwd_bwd(lambda: _unfused_lora_conv2d(x, weight, bias, lora_a, lora_b, scaling,
                                                        shape), trainable),
        "floor": fwd_bwd(lambda: F.conv2d(x, weight, bias, *conv, groups=shape.groups), (x,)),
    }
    return paths, supported


def benchmark_layers(network: str, shapes: dict[ConvShape, list[str]],
                     settings: Settings) -> list[dict]:
    """One row per distinct layer shape: milliseconds of each path for one call."""
    rows = []
    for shape, names in shapes.items():
        paths, supported = layer_paths(shape, settings)
        row = {"network": network, "shape": shape.label(), "count": len(names), "layers": names,
               "triton_supported": supported, **asdict(shape)}
        for path, fn in paths.items():
            row[f"{path}_ms"] = time_ms(fn, settings)
        rows.append(row)
        print(f"  {shape.label():34s} x{len(names):<3d}"
              + "".join(f" {row[f'{p}_ms']:9.3f}" for p in PATHS)
              + ("" if supported else "   (torch path: not a Triton shape)"), flush=True)
        del paths
    return rows


def summarize(rows: list[dict]) -> dict[str, float]:
    """Per-network totals (each shape weighted by its layer count) and the two ratios."""
    totals = {path: sum(row[f"{path}_ms"] * row["count"] for row in rows) for path in PATHS}
    return {
        **{f"{path}_ms": totals[path] for path in PATHS},
        "speedup_vs_unfused": totals["unfused"] / totals["triton"],
        "ratio_to_floor": totals["triton"] / totals["floor"],
        "torch_speedup_vs_unfused": totals["unfused"] / totals["torch"],
        "torch_ratio_to_floor": totals["torch"] / totals["floor"],
    }


def print_side_by_side(summaries: dict[str, dict[str, float]]) -> None:
    networks = list(summaries)
    print("\nsummed over each network (ms per forward + backward of all conv layers)")
    print(f"  {'':26s}" + "".join(f"{name:>24s}" for name in networks))
    for key in (*(f"{p}_ms" for p in PATHS), "speedup_vs_unfused", "ratio_to_floor",
                "torch_speedup_vs_unfused", "torch_ratio_to_floor"):
        print(f"  {key:26s}" + "".join(f"{summaries[n][key]:24.3f}" for n in networks))


# ----------------------------------------------------------------------------- training step

def _fresh_model(model_name: str, settings: Settings) -> nn.Module:
    import timm

    model = timm.create_model(model_name, pretrained=False, num_classes=10)
    return model.to(settings.device).to(memory_format=settings.memory_format).train()


def _step_variants(model_name: str, settings: Settings) -> dict[str, Callable[[], nn.Module] | str]:
    """Builders of each variant's model (trainable parameters set), or why it is skipped."""
    variants: dict[str, Callable[[], nn.Module] | str] = {}

    def full() -> nn.Module:
        return _fresh_model(model_name, settings)

    def frozen() -> nn.Module:
        model = _fresh_model(model_name, settings)
        model.requires_grad_(False)
        return model

    variants["full_finetune"] = full
    variants["frozen_floor"] = frozen
    try:
        from vision_ft.finetune.lora import apply_lora
    except ImportError as error:
        variants["vision_ft_lora"] = f"vision_ft.finetune.lora unavailable ({error})"
    else:
        for backend in ("triton", "torch"):
            def vision_ft(backend: str = backend) -> nn.Module:
                model = _fresh_model(model_name, settings)
                apply_lora(model, r=settings.rank, alpha=LORA_ALPHA, backend=backend)
                return model.to(settings.device)
            variants[f"vision_ft_lora_{backend}"] = vision_ft
    try:
        from peft import LoraConfig, inject_adapter_in_model
    except ImportError as error:
        variants["peft_lora"] = f"peft unavailable ({error})"
    else:
        def peft_lora() -> nn.Module:
            model = _fresh_model(model_name, settings)
            head = model.get_classifier()
            targets = [name for name, module in model.named_modules()
                       if isinstance(module, nn.Conv2d) and module is not head]
            config = LoraConfig(r=settings.rank, lora_alpha=LORA_ALPHA, target_modules=targets)
            model = inject_adapter_in_model(config, model)
            head.requires_grad_(True)  # as vision-ft trains the head
            return model.to(settings.device)
        variants["peft_lora"] = peft_lora
    return variants


def benchmark_training_step(model_name: str, settings: Settings) -> list[dict]:
    """Milliseconds per optimizer step (AdamW, autocast to the benchmark dtype) per variant.

    The frozen floor trains nothing: its input requires grad, so the backward still runs
    through every layer to the input (what every adapter method needs at least) and no
    weight gradient is computed.
    """
    rows = []
    images = torch.randn(settings.batch, 3, settings.image_size, settings.image_size,
                         device=settings.device).contiguous(memory_format=settings.memory_format)
    labels = torch.randint(0, 10, (settings.batch,), device=settings.device)
    for variant, build in _step_variants(model_name, settings).items():
        if isinstance(build, str):
            print(f"  {variant:24s} skipped: {build}")
            rows.append({"variant": variant, "skipped": build})
            continue
        model = build()
        params = [p for p in model.parameters() if p.requires_grad]
        optimizer = torch.optim.AdamW(params, lr=1e-4) if params else None
        inputs = images.clone().requires_grad_(optimizer is None)

        def step() -> None:
            with torch.autocast(settings.device.type, dtype=settings.dtype):
                loss = F.cross_entropy(model(inputs), labels)
            loss.backward()
            if optimizer is not None:
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)
            inputs.grad = None

        if settings.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(settings.device)
        milliseconds = time_calls_ms(step, settings.step_warmup, settings.step_reps,
                                     settings.device)
        row = {"variant": variant, "step_ms": milliseconds,
               "trainable_params": sum(p.numel() for p in params)}
        if settings.device.type == "cuda":
            row["peak_memory_gib"] = torch.cuda.max_memory_allocated(settings.device) / 2**30
        rows.append(row)
        print(f"  {variant:24s} {milliseconds:10.2f} ms/step   trainable {row['trainable_params']:>11,d}",
              flush=True)
        del model, optimizer, params
        if settings.device.type == "cuda":
            torch.cuda.empty_cache()
    return rows


# ----------------------------------------------------------------------------- main

def _write(result: dict, out: Path | None) -> None:
    if out is not None:
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(result, indent=1))


def _slug(text: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-")


def _parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--json", type=Path, default=None,
                        help="where to write results (default: benchmarks/results/"
                             "lora_conv_kernel_<gpu>.json; --smoke writes only when given)")
    parser.add_argument("--smoke", action="store_true",
                        help="CPU check of this script under the Triton interpreter (tiny shapes)")
    parser.add_argument("--rank", type=int, default=8)
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--image-size", type=int, default=224)
    parser.add_argument("--contiguous", action="store_true",
                        help="NCHW tensors instead of channels_last")
    parser.add_argument("--skip-step", action="store_true", help="skip the training-step comparison")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = _parse_args(argv)
    if args.smoke:
        # Must be set before the kernel module is imported: Triton reads it in `@triton.jit`.
        os.environ["TRITON_INTERPRET"] = "1"
    elif not torch.cuda.is_available():
        print("lora_conv_kernel: no CUDA device; this benchmark needs a GPU "
              "(use --smoke to check the script on the CPU)", file=sys.stderr)
        return 2

    import triton

    memory_format = torch.contiguous_format if args.contiguous else torch.channels_last
    if args.smoke:
        # 16 px keeps the interpreted training step of the tiny model near half a minute.
        settings = Settings(torch.device("cpu"), torch.bfloat16, batch=2, image_size=16,
                            rank=args.rank, warmup=0, reps=1, step_warmup=0, step_reps=1,
                            memory_format=memory_format)
        networks = {"smoke": {
            ConvShape(8, 16, 8, 8, (3, 3), (1, 1), (1, 1), (1, 1), 1): ["smoke.conv3x3"],
            ConvShape(16, 24, 7, 7, (1, 1), (2, 2), (0, 0), (1, 1), 1): ["smoke.down1x1"],
        }}
        step_network = "test_resnet"
        device_name = "cpu (Triton interpreter, smoke)"
    else:
        settings = Settings(torch.device("cuda"), torch.bfloat16, batch=args.batch,
                            image_size=args.image_size, rank=args.rank, warmup=25, reps=100,
                            step_warmup=5, step_reps=20, memory_format=memory_format)
        networks = {name: collect_conv_shapes(name, settings.image_size) for name in NETWORKS}
        step_network = STEP_NETWORK
        device_name = torch.cuda.get_device_name()

    print(f"device {device_name}; torch {torch.__version__}; triton {triton.__version__}; "
          f"batch {settings.batch}, {settings.image_size} px, {settings.dtype}, rank {settings.rank}, "
          f"{'channels_last' if memory_format == torch.channels_last else 'NCHW'}")
    out = args.json
    if out is None and not args.smoke:
        out = RESULTS_DIR / f"lora_conv_kernel_{_slug(device_name)}.json"
    result: dict = {
        "device": device_name,
        "torch": torch.__version__,
        "triton": triton.__version__,
        "settings": {"batch": settings.batch, "image_size": settings.image_size,
                     "dtype": str(settings.dtype).removeprefix("torch."), "rank": settings.rank,
                     "lora_alpha": LORA_ALPHA,
                     "memory_format": "channels_last" if memory_format == torch.channels_last
                     else "contiguous"},
        "complete": False,
        "speedup_vs_unfused": {}, "ratio_to_floor": {}, "network_totals": {}, "layers": [],
        "training_step": {"network": step_network, "rows": []},
    }
    for network, shapes in networks.items():
        print(f"\n{network}: {sum(map(len, shapes.values()))} conv layers, {len(shapes)} shapes "
              f"(ms per call)\n  {'shape':34s} {'n':4s}" + "".join(f" {p:>9s}" for p in PATHS))
        rows = benchmark_layers(network, shapes, settings)
        summary = summarize(rows)
        result["layers"] += rows
        result["network_totals"][network] = summary
        result["speedup_vs_unfused"][network] = summary["speedup_vs_unfused"]
        result["ratio_to_floor"][network] = summary["ratio_to_floor"]
        _write(result, out)  # each part as it finishes: a run cut short keeps what it measured
    print_side_by_side(result["network_totals"])

    if not args.skip_step:
        print(f"\ntraining step, {step_network}, batch {settings.batch}, {settings.image_size} px, "
              f"autocast {settings.dtype}, AdamW")
        result["training_step"]["rows"] = benchmark_training_step(step_network, settings)
    result["complete"] = True
    _write(result, out)
    if out is not None:
        print(f"\nwrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
