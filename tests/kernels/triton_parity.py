"""Parity cases of the Triton LoRA convolution against an fp64 torch reference, and their worker.

The output and every gradient (dx, dA, dB) are compared on ordinary and awkward shapes
(channels not a multiple of the tile, odd H/W, stride 2, dilation 2, batch 1, padding 0
and 'same', 1x1 / 3x3 / 7x7 / non-square kernels, channels_last, rank above 16), in fp32,
fp16 and bf16.

Where the kernels run: Triton decides at import time of the kernel module whether its
`@triton.jit` functions are compiled or interpreted (TRITON_INTERPRET).  So every kernel
call happens in a child process, this file run as a script:

    python tests/kernels/triton_parity.py --device cpu|cuda --out RESULTS.json

with TRITON_INTERPRET=1 on the CPU, which works on any machine, and natively on CUDA when a
GPU is present.  `case_failures` and `check_failures` judge the results; the pytest tests
(test_triton_lora_conv.py) and benchmarks/gpu_check.py both use them.  This module imports
only torch (and the kernels in the child), so it runs without pytest.

Errors are max |out - ref| / max |ref|, with the reference evaluated in fp64 from the same
(rounded) inputs.  The bounds sit a few times above what the precision allows: fp32 1e-5
(exact fp32 dots: the interpreter, or CUDA with TF32 disabled), fp16 3e-3 (6x its unit
roundoff 4.9e-4) and bf16 2e-2 (5x its unit roundoff 3.9e-3).  Under the interpreter bf16
dots use exactly upcast operands (see `dot_settings`), but the interpreter's fp32 -> bf16
cast truncates instead of rounding to nearest (up to 7.8e-3 per cast), so bf16 errors read
about twice what the GPU gives; the bf16 bound covers both.  Each failure message also
shows torch's own error in the same dtype, for scale.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import traceback
import warnings
import zlib
from dataclasses import dataclass
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[2]
TOLERANCE = {"float32": 1e-5, "float16": 3e-3, "bfloat16": 2e-2}


@dataclass(frozen=True)
class ParityCase:
    """One call of the fused conv, described by plain values so it crosses a process boundary."""

    name: str
    dtype: str = "float32"
    batch: int = 2
    c_in: int = 20          # > the interpreter's 16-channel tile and not a multiple of it
    c_out: int = 24
    height: int = 9
    width: int = 7          # odd, and != height
    kernel: tuple[int, int] = (3, 3)
    stride: tuple[int, int] = (1, 1)
    padding: tuple[int, int] = (1, 1)
    dilation: tuple[int, int] = (1, 1)
    rank: int = 4
    bias: bool = True
    channels_last: bool = False
    x_requires_grad: bool = True
    adapter_dtype: str | None = None      # LoRA parameters in another dtype (autocast-style)
    sum_loss: bool = False                # backward of y.sum(): an expanded, stride-0 grad


CASES = [
    ParityCase("fp32_3x3_same"),
    ParityCase("fp32_1x1_pad0", kernel=(1, 1), padding=(0, 0)),
    ParityCase("fp32_3x3_stride2_odd", stride=(2, 2), height=11, width=9),
    ParityCase("fp32_3x3_dilation2_same", padding=(2, 2), dilation=(2, 2)),
    ParityCase("fp32_batch1_pad0_nobias", batch=1, padding=(0, 0), bias=False),
    ParityCase("fp32_tiny_channels_rank20", c_in=5, c_out=6, rank=20),
    ParityCase("fp32_7x7_stride2_stem", c_in=3, c_out=16, height=12, width=11, kernel=(7, 7),
               stride=(2, 2), padding=(3, 3)),
    ParityCase("fp32_mixed_geometry", kernel=(3, 1), stride=(2, 1), padding=(1, 0),
               dilation=(1, 2), height=10, width=8),
    ParityCase("fp32_channels_last_3x3_stride2", channels_last=True, stride=(2, 2)),
    ParityCase("fp32_channels_last_1x1_stride2", channels_last=True, kernel=(1, 1),
               stride=(2, 2), padding=(0, 0)),
    ParityCase("fp32_frozen_input_sum_loss", x_requires_grad=False, sum_loss=True),
    # 1 x 2 map under stride 2: the dx kernel's odd-row phase owns no pixels.
    ParityCase("fp32_map_smaller_than_stride", height=1, width=2, kernel=(1, 1), stride=(2, 2),
               padding=(0, 0)),
    ParityCase("fp16_3x3_same", dtype="float16"),
    ParityCase("fp16_channels_last_3x3_stride2", dtype="float16", channels_last=True,
               stride=(2, 2)),
    ParityCase("fp16_1x1", dtype="float16", kernel=(1, 1), padding=(0, 0)),
    ParityCase("bf16_3x3_same", dtype="bfloat16"),
    ParityCase("bf16_channels_last_3x3_dilation2", dtype="bfloat16", channels_last=True,
               padding=(2, 2), dilation=(2, 2)),
    ParityCase("bf16_fp32_adapters", dtype="bfloat16", adapter_dtype="float32",
               stride=(2, 2), channels_last=True),
]
CASE_IDS = [case.name for case in CASES]


# ----------------------------------------------------------------------------- child process

def _normalized_error(actual: torch.Tensor, expected: torch.Tensor) -> float:
    return ((actual.double() - expected).abs().max() / expected.abs().max().clamp_min(1e-12)).item()


def _run_case(case: ParityCase, device: str) -> dict:
    """Kernel output and gradients vs the fp64 reference; also torch in the same dtype."""
    from tests.kernels.reference import reference_lora_conv2d
    from vision_ft_kernels.triton_lora_conv import triton_lora_conv2d

    dtype = getattr(torch, case.dtype)
    adapter_dtype = getattr(torch, case.adapter_dtype or case.dtype)
    generator = torch.Generator().manual_seed(zlib.crc32(case.name.encode()))
    kh, kw = case.kernel
    fan_in = case.c_in * kh * kw

    def randn(*shape: int, scale: float = 1.0) -> torch.Tensor:
        return torch.randn(*shape, generator=generator, dtype=torch.float64) * scale

    x = randn(case.batch, case.c_in, case.height, case.width)
    weight = randn(case.c_out, case.c_in, kh, kw, scale=fan_in**-0.5)
    bias = randn(case.c_out) if case.bias else None
    lora_a = randn(case.rank, case.c_in, kh, kw, scale=fan_in**-0.5)
    lora_b = randn(case.c_out, case.rank, scale=case.rank**-0.5)
    scaling = 2.0 / case.rank
    conv_args = (case.stride, case.padding, case.dilation)

    def prepare(tensor: torch.Tensor | None, to: torch.dtype, grad: bool) -> torch.Tensor | None:
        if tensor is None:
            return None
        out = tensor.to(device=device, dtype=to)
        return out.requires_grad_(grad)

    inputs = {
        "x": prepare(x, dtype, case.x_requires_grad),
        "weight": prepare(weight, dtype, False),
        "bias": prepare(bias, dtype, False),
        "lora_a": prepare(lora_a, adapter_dtype, True),
        "lora_b": prepare(lora_b, adapter_dtype, True),
    }
    if case.channels_last:
        inputs["x"] = inputs["x"].detach().contiguous(memory_format=torch.channels_last)
        inputs["x"].requires_grad_(case.x_requires_grad)
    grad_names = [name for name in ("x", "lora_a", "lora_b") if inputs[name].requires_grad]

    def run(fn, tensors: dict) -> tuple[torch.Tensor, dict]:
        y = fn(tensors["x"], tensors["weight"], tensors["bias"], tensors["lora_a"],
               tensors["lora_b"], scaling, *conv_args)
        if case.sum_loss:
            y.sum().backward()
        else:
            out_grad = torch.randn(y.shape, generator=torch.Generator().manual_seed(1),
                                   dtype=torch.float64).to(dtype=y.dtype)
            y.backward(out_grad.to(y.device))
        return y, {name: tensors[name].grad for name in grad_names}

    y, grads = run(triton_lora_conv2d, inputs)
    # Reference: the same rounded values, in fp64 on the CPU.
    ref_inputs = {name: (t.detach().cpu().double().requires_grad_(t.requires_grad)
                         if t is not None else None) for name, t in inputs.items()}
    y_ref, grads_ref = run(reference_lora_conv2d, ref_inputs)
    # Torch in the case's own dtype, for scale in failure messages (CPU torch lacks some
    # reduced-precision convs; then this is skipped).
    try:
        same_inputs = {name: (t.detach().cpu().requires_grad_(t.requires_grad)
                              if t is not None else None) for name, t in inputs.items()}
        y_same, grads_same = run(reference_lora_conv2d, same_inputs)
        torch_errors = {"y": _normalized_error(y_same, y_ref)} | {
            f"d{name}": _normalized_error(grads_same[name], grads_ref[name]) for name in grad_names}
    except RuntimeError:
        torch_errors = {}

    report = {
        "errors": {"y": _normalized_error(y.cpu(), y_ref)} | {
            f"d{name}": _normalized_error(grads[name].cpu(), grads_ref[name]) for name in grad_names},
        "torch_same_dtype_errors": torch_errors,
        "y_dtype": str(y.dtype).removeprefix("torch."),
        "y_channels_last": (y.is_contiguous(memory_format=torch.channels_last)
                            and not y.is_contiguous()),
        "grad_dtypes": {f"d{name}": str(grads[name].dtype).removeprefix("torch.")
                        for name in grad_names},
    }
    if "x" in grad_names:
        report["dx_channels_last"] = (grads["x"].is_contiguous(memory_format=torch.channels_last)
                                      and not grads["x"].is_contiguous())
    return report


def _run_checks(device: str) -> dict:
    """API checks that need the kernel module: supports(), errors, no-grad and determinism."""
    import torch.nn.functional as F

    from vision_ft_kernels.triton_lora_conv import triton_lora_conv2d, triton_supports

    def t(*shape: int, dtype: torch.dtype = torch.float32, grad: bool = False) -> torch.Tensor:
        return torch.randn(*shape, dtype=dtype, device=device).requires_grad_(grad)

    x, weight, lora_a, lora_b = t(2, 8, 6, 6), t(8, 8, 3, 3), t(4, 8, 3, 3, grad=True), t(8, 4)
    lora_b.requires_grad_(True)
    checks: dict = {
        "supports_plain": triton_supports(x, weight, lora_a, groups=1),
        "supports_fp16": triton_supports(x.half(), weight.half(), lora_a, groups=1),
        "supports_bf16": triton_supports(x.bfloat16(), weight.bfloat16(), lora_a.bfloat16(), 1),
        "supports_groups2": triton_supports(x, t(8, 4, 3, 3), t(4, 4, 3, 3), groups=2),
        "supports_depthwise": triton_supports(x, t(8, 1, 3, 3), t(4, 1, 3, 3), groups=8),
        "supports_float64": triton_supports(x.double(), weight.double(), lora_a.double(), 1),
        "supports_int8": triton_supports(x.to(torch.int8), weight.to(torch.int8), lora_a, 1),
        "supports_mixed_x_weight": triton_supports(x.half(), weight, lora_a, groups=1),
        "supports_rank_too_big": triton_supports(x, weight, t(65, 8, 3, 3), groups=1),
        "supports_trainable_weight": triton_supports(x, weight.clone().requires_grad_(True),
                                                     lora_a, groups=1),
    }
    for label, kwargs in (("raises_trainable_weight", {"weight": weight.clone().requires_grad_()}),
                          ("raises_trainable_bias", {"bias": t(8, grad=True)})):
        args = {"weight": weight, "bias": None} | kwargs
        try:
            triton_lora_conv2d(x, args["weight"], args["bias"], lora_a, lora_b, 1.0,
                               (1, 1), (1, 1), (1, 1))
            checks[label] = "no error"
        except ValueError as error:
            checks[label] = "ValueError: " + str(error)

    with torch.no_grad():  # forward only: the kernel skips the z store
        y = triton_lora_conv2d(x, weight, None, lora_a, lora_b, 0.5, (1, 1), (1, 1), (1, 1))
        y_ref = F.conv2d(x, weight, None, 1, 1) + 0.5 * F.conv2d(
            F.conv2d(x, lora_a, None, 1, 1), lora_b[:, :, None, None])
    checks["no_grad_error"] = _normalized_error(y.cpu(), y_ref.double().cpu())

    # dA sums per-split partials in a fixed order and dx has no atomics: bit-reproducible
    # (with cuDNN's deterministic algorithms for its dz and dB on CUDA).
    grads = []
    for _ in range(2):
        xg = x.clone().requires_grad_(True)
        a, b = lora_a.detach().clone().requires_grad_(), lora_b.detach().clone().requires_grad_()
        triton_lora_conv2d(xg, weight, None, a, b, 0.5, (1, 1), (1, 1), (1, 1)).square().sum().backward()
        grads.append((xg.grad, a.grad, b.grad))
    checks["repeat_bit_identical"] = all(torch.equal(g0, g1) for g0, g1 in zip(*grads))
    return checks


def _worker_main(argv: list[str]) -> None:
    parser = argparse.ArgumentParser(description="Run the Triton LoRA conv parity cases.")
    parser.add_argument("--device", choices=["cpu", "cuda"], required=True)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--cases", nargs="+", choices=CASE_IDS, default=CASE_IDS, help="run only these cases")
    args = parser.parse_args(argv)
    sys.path.insert(0, str(REPO))  # run as a script: make `tests.kernels.reference` importable
    if args.device == "cpu":
        if os.environ.get("TRITON_INTERPRET") != "1":
            raise SystemExit("the CPU worker needs TRITON_INTERPRET=1 in its environment")
        # The interpreter runs kernel arithmetic in numpy: an integer division by zero there
        # (undefined behaviour on the GPU, even when the lanes are masked) is a kernel bug.
        warnings.filterwarnings("error", message="divide by zero", category=RuntimeWarning)
    if args.device == "cuda":
        # fp32 parity needs exact fp32 dots on both sides.
        torch.backends.cudnn.allow_tf32 = False
        torch.backends.cuda.matmul.allow_tf32 = False
        # dz and dB come from cuDNN; the repeat check needs its deterministic algorithms (the
        # Triton kernels are deterministic by construction).
        torch.backends.cudnn.deterministic = True
        # One tile configuration per kernel: autotuning every case would compile for minutes.
        from vision_ft_kernels import triton_lora_conv_bwd, triton_lora_conv_fwd
        for tuner in (triton_lora_conv_fwd._lora_conv_fwd_kernel,
                      triton_lora_conv_bwd._lora_conv_input_grad_kernel,
                      triton_lora_conv_bwd._lora_a_grad_kernel):
            tuner.configs = tuner.configs[:1]
    results: dict = {"cases": {}}
    for case in (case for case in CASES if case.name in args.cases):
        try:
            results["cases"][case.name] = _run_case(case, args.device)
        except Exception:  # reported per case by the parent
            results["cases"][case.name] = {"crash": traceback.format_exc()}
    try:
        results["checks"] = _run_checks(args.device)
    except Exception:
        results["checks"] = {"crash": traceback.format_exc()}
    args.out.write_text(json.dumps(results, indent=1))


# ----------------------------------------------------------------------------- judging results

def case_failures(results: dict, case: ParityCase) -> list[str]:
    """What is wrong with one case's report (empty when it passes)."""
    report = results["cases"][case.name]
    if "crash" in report:
        return [f"{case.name} crashed: {report['crash']}"]
    failures = []
    tolerance = TOLERANCE[case.dtype]
    too_far = {name: err for name, err in report["errors"].items() if not err <= tolerance}
    if too_far:
        failures.append(f"{case.name}: errors {too_far} exceed {tolerance} (torch in the same dtype: "
                        f"{report['torch_same_dtype_errors']})")
    expected_grads = {"dlora_a", "dlora_b"} | ({"dx"} if case.x_requires_grad else set())
    if set(report["errors"]) != {"y"} | expected_grads:
        failures.append(f"{case.name}: compared {sorted(report['errors'])}, expected y and {sorted(expected_grads)}")
    if report["y_dtype"] != case.dtype:
        failures.append(f"{case.name}: y is {report['y_dtype']}, expected {case.dtype}")
    if report["y_channels_last"] != case.channels_last:
        failures.append(f"{case.name}: y channels_last is {report['y_channels_last']}")
    if case.x_requires_grad and report["dx_channels_last"] != case.channels_last:
        failures.append(f"{case.name}: dx channels_last is {report['dx_channels_last']}")
    adapter = case.adapter_dtype or case.dtype
    if not report["grad_dtypes"]["dlora_a"] == report["grad_dtypes"]["dlora_b"] == adapter:
        failures.append(f"{case.name}: adapter gradients are {report['grad_dtypes']}, expected {adapter}")
    return failures


def check_failures(checks: dict) -> list[str]:
    """What is wrong with the API checks (empty when they pass)."""
    if "crash" in checks:
        return [f"checks crashed: {checks['crash']}"]
    failures = [f"{name} is {checks[name]}, expected True"
                for name in ("supports_plain", "supports_fp16", "supports_bf16") if checks[name] is not True]
    failures += [f"{name} is {checks[name]}, expected False"
                 for name in ("supports_groups2", "supports_depthwise", "supports_float64", "supports_int8",
                              "supports_mixed_x_weight", "supports_rank_too_big", "supports_trainable_weight")
                 if checks[name] is not False]
    if not (checks["raises_trainable_weight"].startswith("ValueError: ") and "frozen" in checks["raises_trainable_weight"]):
        failures.append(f"a trainable weight: {checks['raises_trainable_weight']}")
    if not checks["raises_trainable_bias"].startswith("ValueError: "):
        failures.append(f"a trainable bias: {checks['raises_trainable_bias']}")
    if not checks["no_grad_error"] <= TOLERANCE["float32"]:
        failures.append(f"no-grad forward error {checks['no_grad_error']}")
    if checks["repeat_bit_identical"] is not True:
        failures.append("two backward passes differ bit for bit")
    return failures


def all_failures(results: dict) -> list[str]:
    """Every failure of a worker's results: the cases it ran, then the API checks."""
    failures = [failure for case in CASES if case.name in results["cases"]
                for failure in case_failures(results, case)]
    return failures + check_failures(results["checks"])


if __name__ == "__main__":
    _worker_main(sys.argv[1:])
