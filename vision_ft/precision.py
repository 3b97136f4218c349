"""`train.amp: auto`: the arithmetic precision of training steps, for the device at hand.

On a GPU: bfloat16 autocast where the GPU supports it, else float16 with loss scaling.

On a CPU it depends on the processor and on the model. Only processors with bfloat16
instructions (AVX512-BF16, AMX) run oneDNN's bfloat16 convolutions and matrix products fast,
and even there depthwise-heavy networks lose: on a 2-core x86 CPU with AVX512-BF16, batch 16, a
training step ran 1.5x (128 px) to 1.85-1.9x (224 px) faster under bfloat16 autocast for ResNet-18,
ResNet-50 and ViT-Tiny, 1.06-1.2x for ConvNeXt-Atto, and 0.6-0.8x as fast for EfficientNet-Lite0
and -B0 (`python benchmarks/cpu_autocast.py`, benchmarks/results/cpu_autocast.json). So on such a CPU
auto times a training step both ways, at the run's size and batch, and takes bfloat16 only when it
is at least MIN_SPEEDUP faster. It does so only under a time budget, where the run already depends
on the machine's timing: two readings near the threshold can differ (1.10x and 1.20x for the same
small ResNet-18 step), and a run without a budget must repeat exactly. The weights, the optimizer
and the final evaluation stay float32.
"""

from __future__ import annotations

import platform
from collections.abc import Callable
from pathlib import Path

import torch

# bfloat16 keeps 8 bits of mantissa: worth it only for a clear gain in speed.
MIN_SPEEDUP = 1.2
# A step this short is neither worth the rounding nor measurable in a few probe steps.
MIN_STEP_SECONDS = 0.05
_BF16_FLAGS = ("avx512_bf16", "amx_bf16")


def cpu_has_bf16_instructions(cpuinfo: Path = Path("/proc/cpuinfo")) -> bool:
    """Whether this x86 processor has bfloat16 instructions; False where that cannot be read."""
    if platform.system() != "Linux" or platform.machine().lower() not in ("x86_64", "amd64"):
        return False
    try:
        text = cpuinfo.read_text()
    except OSError:
        return False
    flags = next((line.split(":", 1)[1].split() for line in text.splitlines() if line.startswith("flags")), [])
    return any(flag in flags for flag in _BF16_FLAGS)


def autocast_dtype(amp: str) -> torch.dtype | None:
    """The autocast dtype of a resolved `train.amp` (off, bf16 or fp16)."""
    return {"bf16": torch.bfloat16, "fp16": torch.float16}.get(amp)


def gpu_amp() -> tuple[str, str]:
    """(`train.amp` on this CUDA GPU, the reason in words)."""
    if torch.cuda.is_bf16_supported():
        return "bf16", "bfloat16 autocast: the GPU supports it"
    return "fp16", "float16 autocast with loss scaling: the GPU has no bfloat16"


def choose_amp(device: torch.device, time_step: Callable[[torch.dtype | None], float],
               has_bf16: Callable[[], bool] = cpu_has_bf16_instructions, timed: bool = True) -> tuple[str, str]:
    """(`train.amp` for `device`, the reason in words). `time_step(dtype)` returns the seconds of
    one of the run's training steps under autocast to `dtype` (None: float32). With `timed` False
    (a run without a time budget) a CPU stays float32: a choice made from timings could differ
    between two runs of the same command, and so would their results."""
    if device.type == "cuda":
        return gpu_amp()
    if device.type != "cpu":
        return "off", f"float32: no autocast on {device.type}"
    if not has_bf16():
        return "off", "float32: this CPU has no bfloat16 instructions (AVX512-BF16 or AMX)"
    if not timed:
        return "off", ("float32, so that the run repeats exactly (only a time budget times bfloat16); this CPU has "
                       "bfloat16 instructions: train.amp=bf16 trains ResNets and ViTs 1.5-1.9x faster")
    float32 = time_step(None)
    if float32 < MIN_STEP_SECONDS:
        return "off", f"float32: a training step takes {float32 * 1e3:.0f} ms, too short for bfloat16 to pay"
    bfloat16 = time_step(torch.bfloat16)
    # A process's first timed steps can run slow (allocator growth, threads starting): float32 went
    # first, so it is timed again after bfloat16 and the faster reading kept (ELPV, Lite0: 0.86 s
    # first, where training ran 0.43-0.49 s a step; the first reading alone chose bfloat16, 0.8x).
    float32 = min(float32, time_step(None))
    speedup = float32 / max(bfloat16, 1e-9)
    timing = f"a training step took {bfloat16:.2f} s under bfloat16 autocast, {float32:.2f} s in float32"
    if speedup >= MIN_SPEEDUP:
        return "bf16", f"bfloat16 autocast: {timing} ({speedup:.2f}x faster)"
    return "off", f"float32: {timing} (bfloat16 {speedup:.2f}x, under the {MIN_SPEEDUP}x that pays for its rounding)"
