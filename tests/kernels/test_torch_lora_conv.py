"""The torch LoRA conv path against the plain reference composition, plus backend selection."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import vision_ft_kernels.dispatch as dispatch
from vision_ft_kernels import lora_conv2d, requested_lora_backend, resolve_lora_backend
from tests.kernels.reference import low_rank_grouped_lora_conv2d, reference_lora_conv2d
import vision_ft_kernels.torch_lora_conv as torch_path
from vision_ft_kernels.torch_lora_conv import torch_lora_conv2d

# (batch, cin, height, width, cout, kernel, stride, padding, dilation, rank)
SHAPES = {
    "ordinary_3x3": (2, 8, 8, 8, 16, 3, 1, 1, 1, 4),
    "odd_channels_hw_stride2_batch1": (1, 5, 9, 7, 11, 3, 2, 1, 1, 3),
    "dilation2_same": (2, 6, 11, 10, 7, 3, 1, 2, 2, 2),
    "pointwise_1x1": (2, 7, 9, 9, 5, 1, 1, 0, 1, 4),
    "pointwise_1x1_stride2_odd_hw": (2, 7, 9, 8, 5, 1, 2, 0, 1, 3),
    "5x5_same": (2, 4, 10, 10, 6, 5, 1, 2, 1, 3),
    "5x5_pad0_stride2": (3, 3, 12, 13, 9, 5, 2, 0, 1, 2),
    "rank1_stride2_pad0": (2, 9, 7, 7, 10, 3, 2, 0, 1, 1),
}

TOLERANCES = {torch.float32: dict(atol=1e-4, rtol=1e-4), torch.bfloat16: dict(atol=6e-2, rtol=4e-2)}


def _case(shape, dtype, with_bias=True, seed=0):
    n, cin, h, w, cout, k, s, p, d, r = shape
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, cin, h, w, generator=g).to(dtype).requires_grad_()
    weight = (torch.randn(cout, cin, k, k, generator=g) / (cin * k * k) ** 0.5).to(dtype)
    bias = torch.randn(cout, generator=g).to(dtype) if with_bias else None
    lora_a = (torch.randn(r, cin, k, k, generator=g) / (cin * k * k) ** 0.5).to(dtype).requires_grad_()
    lora_b = torch.randn(cout, r, generator=g).to(dtype).requires_grad_()
    return x, weight, bias, lora_a, lora_b, 1.7, (s, s), (p, p), (d, d)


def _grads(out, inputs, grad_out):
    return torch.autograd.grad(out, inputs, grad_out, allow_unused=True)


def _assert_close(actual, expected, dtype, what):
    tol = TOLERANCES[dtype]
    scale = expected.float().abs().max().clamp_min(1.0)
    torch.testing.assert_close(actual.float() / scale, expected.float() / scale, **tol, msg=lambda m: f"{what}: {m}")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("shape", list(SHAPES.values()), ids=list(SHAPES))
def test_matches_reference_output_and_grads(shape, dtype):
    args = _case(shape, dtype)
    x, weight, bias, lora_a, lora_b = args[:5]
    out = lora_conv2d(*args, backend="torch")
    # The reference runs in fp32 from the same (rounded) values: bf16 is judged against exact math.
    ref_args = [a.detach().float().requires_grad_(a.requires_grad) if torch.is_tensor(a) else a for a in args]
    expected = reference_lora_conv2d(*ref_args)
    assert out.dtype == dtype and out.shape == expected.shape
    _assert_close(out, expected, dtype, "y")

    grad_out = torch.randn(out.shape, generator=torch.Generator().manual_seed(1))
    got = _grads(out, (x, lora_a, lora_b), grad_out.to(dtype))
    want = _grads(expected, (ref_args[0], ref_args[3], ref_args[4]), grad_out)
    for name, g, e in zip(("dx", "dA", "dB"), got, want):
        assert g.dtype == dtype
        _assert_close(g, e, dtype, name)


@pytest.mark.parametrize("grad_layout", ["channels_last", "contiguous"])
@pytest.mark.parametrize("shape", list(SHAPES.values()), ids=list(SHAPES))
def test_channels_last_models_match_the_reference(shape, grad_layout):
    """A channels-last model (CPU training's default layout) feeds channels-last x, W and A; the
    gradient arriving from above may come in either layout."""
    args = list(_case(shape, torch.float32))
    for i in (0, 1, 3):  # x, W, A: the 4-D tensors a channels-last model holds
        args[i] = args[i].detach().contiguous(memory_format=torch.channels_last).requires_grad_(args[i].requires_grad)
    x, weight, bias, lora_a, lora_b = args[:5]
    out = lora_conv2d(*args, backend="torch")
    ref_args = [a.detach().contiguous().requires_grad_(a.requires_grad) if torch.is_tensor(a) else a for a in args]
    expected = reference_lora_conv2d(*ref_args)
    _assert_close(out, expected, torch.float32, "y")
    grad_out = torch.randn(out.shape, generator=torch.Generator().manual_seed(1))
    layout = torch.channels_last if grad_layout == "channels_last" else torch.contiguous_format
    got = _grads(out, (x, lora_a, lora_b), grad_out.contiguous(memory_format=layout))
    want = _grads(expected, (ref_args[0], ref_args[3], ref_args[4]), grad_out)
    for name, g, e in zip(("dx", "dA", "dB"), got, want):
        _assert_close(g, e, torch.float32, name)


def test_adapter_grads_through_the_weight_gradient_only_for_narrow_layers():
    # Per pixel, dW costs Cout * Cin*kh*kw multiply-adds and the rank-r products r * (2 Cout + Cin*kh*kw).
    chooses = torch_path._adapter_grads_from_weight_grad
    assert chooses(torch.empty(96, 16, 1, 1), 8)        # lite0's 16 -> 96 expansion: 1536 vs 1664
    assert not chooses(torch.empty(32, 3, 3, 3), 8)     # a 3-channel stem: 864 vs 728
    assert not chooses(torch.empty(240, 40, 1, 1), 8)   # 9600 vs 4160
    assert not chooses(torch.empty(64, 64, 3, 3), 8)    # resnet's 3x3: 36864 vs 5632
    assert not chooses(torch.empty(96, 16, 1, 1), 1)    # rank 1 makes the rank-r products cheap: 1536 vs 208


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("through_weight_grad", [False, True], ids=["rank_products", "weight_gradient"])
def test_both_adapter_gradient_routes_match_reference(monkeypatch, through_weight_grad, dtype):
    # Force each way of computing dA and dB, on 3x3, strided, pointwise (GEMM) and strided 1x1 convs.
    monkeypatch.setattr(torch_path, "_adapter_grads_from_weight_grad", lambda weight, rank: through_weight_grad)
    for name in ("ordinary_3x3", "odd_channels_hw_stride2_batch1", "pointwise_1x1", "pointwise_1x1_stride2_odd_hw"):
        test_matches_reference_output_and_grads(SHAPES[name], dtype)
    calls = []
    monkeypatch.setattr(torch_path, "_channel_product",
                        lambda *a, real=torch_path._channel_product: calls.append("rank-r product") or real(*a))
    test_matches_reference_output_and_grads(SHAPES["pointwise_1x1"], dtype)
    # Through dW neither u = A x (forward) nor scaling * B^T dy (backward) is computed.
    assert bool(calls) is not through_weight_grad


@pytest.mark.parametrize("shape", [SHAPES["ordinary_3x3"], SHAPES["odd_channels_hw_stride2_batch1"]], ids=["3x3", "odd"])
def test_unfrozen_weight_and_bias_get_correct_grads(shape):
    args = list(_case(shape, torch.float32))
    args[1].requires_grad_()
    args[2].requires_grad_()
    out = lora_conv2d(*args, backend="torch")
    expected = reference_lora_conv2d(*args)
    grad_out = torch.randn_like(out)
    inputs = (args[0], args[1], args[2], args[3], args[4])
    for name, g, e in zip(("dx", "dW", "dbias", "dA", "dB"), _grads(out, inputs, grad_out), _grads(expected, inputs, grad_out)):
        _assert_close(g, e, torch.float32, name)


def test_evaluation_without_autograd_matches_reference():
    args = _case(SHAPES["dilation2_same"], torch.float32)
    with torch.no_grad():
        first = lora_conv2d(*args)
        again = lora_conv2d(*args)  # merged again: the same numbers
    torch.testing.assert_close(first, reference_lora_conv2d(*args), atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(again, first)


def test_frozen_weight_gets_no_grad_and_input_without_grad_is_skipped():
    x, weight, bias, lora_a, lora_b, *rest = _case(SHAPES["ordinary_3x3"], torch.float32)
    x = x.detach()  # like a model's stem: the image needs no gradient
    out = lora_conv2d(x, weight, bias, lora_a, lora_b, *rest, backend="torch")
    out.square().sum().backward()
    assert weight.grad is None and bias.grad is None and x.grad is None
    expected = reference_lora_conv2d(x, weight, bias, lora_a.detach().requires_grad_(), lora_b.detach().requires_grad_(), *rest)
    assert lora_a.grad is not None and lora_b.grad is not None
    torch.testing.assert_close(out, expected, atol=1e-4, rtol=1e-4)


def test_without_bias_and_channels_last_input():
    args = list(_case(SHAPES["odd_channels_hw_stride2_batch1"], torch.float32, with_bias=False))
    expected = reference_lora_conv2d(*args)
    grad_out = torch.randn_like(expected)
    want = _grads(expected, (args[0], args[3], args[4]), grad_out)
    args[0] = args[0].detach().to(memory_format=torch.channels_last).requires_grad_()
    out = lora_conv2d(*args, backend="torch")
    assert out.is_contiguous(memory_format=torch.channels_last)
    torch.testing.assert_close(out, expected, atol=1e-4, rtol=1e-4)
    for g, e in zip(_grads(out, (args[0], args[3], args[4]), grad_out), want):
        torch.testing.assert_close(g, e, atol=1e-4, rtol=1e-4)


def test_effective_weight_follows_in_place_updates():
    x, weight, bias, lora_a, lora_b, *rest = _case(SHAPES["ordinary_3x3"], torch.float32)
    lora_a, lora_b = torch.nn.Parameter(lora_a.detach()), torch.nn.Parameter(lora_b.detach())
    optimizer = torch.optim.SGD([lora_a, lora_b], lr=0.5)
    for _ in range(2):  # an optimizer step changes A in place: the next forward must see it
        lora_conv2d(x, weight, bias, lora_a, lora_b, *rest, backend="torch").square().mean().backward()
        optimizer.step()
        optimizer.zero_grad()
        expected = reference_lora_conv2d(x, weight, bias, lora_a, lora_b, *rest)
        torch.testing.assert_close(lora_conv2d(x, weight, bias, lora_a, lora_b, *rest, backend="torch"), expected,
                                   atol=1e-4, rtol=1e-4)
    with torch.no_grad():
        weight.mul_(2.0)
        bias.add_(1.0)
    expected = reference_lora_conv2d(x, weight, bias, lora_a, lora_b, *rest)
    torch.testing.assert_close(lora_conv2d(x, weight, bias, lora_a, lora_b, *rest, backend="torch"), expected,
                               atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("optimizer_kind", ["foreach", "fused"])
def test_evaluation_sees_every_optimizer_update(optimizer_kind):
    # Fused optimizers update parameters in place without bumping their version counters: the
    # next evaluation must still see the new A and B.
    x, weight, bias, lora_a, lora_b, *rest = _case(SHAPES["pointwise_1x1"], torch.float32)
    x = x.detach()
    lora_a, lora_b = torch.nn.Parameter(lora_a.detach()), torch.nn.Parameter(lora_b.detach())
    optimizer = torch.optim.AdamW([lora_a, lora_b], lr=0.1, **{optimizer_kind: True})
    for _ in range(3):
        with torch.no_grad():
            before = lora_conv2d(x, weight, bias, lora_a, lora_b, *rest, backend="torch")
        out = lora_conv2d(x, weight, bias, lora_a, lora_b, *rest, backend="torch")
        torch.testing.assert_close(out.detach(), before)
        out.square().mean().backward()
        optimizer.step()
        optimizer.zero_grad()
        with torch.no_grad():
            after = lora_conv2d(x, weight, bias, lora_a, lora_b, *rest, backend="torch")
            expected = reference_lora_conv2d(x, weight, bias, lora_a, lora_b, *rest)
        torch.testing.assert_close(after, expected, atol=1e-4, rtol=1e-4)
        assert not torch.allclose(after, before)


def test_adapter_changed_between_forward_and_backward_fails_loudly():
    x, weight, bias, lora_a, lora_b, *rest = _case(SHAPES["ordinary_3x3"], torch.float32)
    out = lora_conv2d(x, weight, bias, lora_a, lora_b, *rest, backend="torch")
    with torch.no_grad():
        lora_a.add_(1.0)
    lora_conv2d(x, weight, bias, lora_a, lora_b, *rest, backend="torch")  # a second forward after the change
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        out.sum().backward()


@pytest.mark.parametrize("groups", [2, 6], ids=["grouped", "depthwise"])
def test_grouped_matches_reference_and_low_rank_form(groups):
    g = torch.Generator().manual_seed(0)
    cin = cout = 6
    x = torch.randn(2, cin, 9, 8, generator=g, requires_grad=True)
    weight = torch.randn(cout, cin // groups, 3, 3, generator=g)
    bias = torch.randn(cout, generator=g)
    lora_a = torch.randn(4, cin // groups, 3, 3, generator=g, requires_grad=True)
    lora_b = torch.randn(cout, 4, generator=g, requires_grad=True)
    args = (x, weight, bias, lora_a, lora_b, 0.5, (2, 2), (1, 1), (1, 1), groups)
    out = lora_conv2d(*args)
    expected = reference_lora_conv2d(*args)
    torch.testing.assert_close(out, expected, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(low_rank_grouped_lora_conv2d(*args), expected, atol=1e-4, rtol=1e-4)
    grad_out = torch.randn_like(out)
    for got, want in zip(_grads(out, (x, lora_a, lora_b), grad_out), _grads(expected, (x, lora_a, lora_b), grad_out)):
        torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)


def test_cpu_autocast_runs_in_bf16():
    args = _case(SHAPES["ordinary_3x3"], torch.float32)
    expected = reference_lora_conv2d(*args)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = lora_conv2d(*args)
    assert out.dtype == torch.bfloat16
    _assert_close(out, expected, torch.bfloat16, "y")
    out.float().sum().backward()
    assert args[3].grad.dtype == torch.float32 and args[4].grad.dtype == torch.float32


def test_shape_mismatch_is_a_clear_error():
    x, weight, bias, lora_a, lora_b, *rest = _case(SHAPES["ordinary_3x3"], torch.float32)
    with pytest.raises(ValueError, match="lora_b"):
        lora_conv2d(x, weight, bias, lora_a, lora_b.t(), *rest)


@pytest.fixture
def clean_backend(monkeypatch):
    monkeypatch.delenv(dispatch.ENV_VAR, raising=False)
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    return monkeypatch


def test_backend_precedence_argument_then_env(clean_backend):
    assert requested_lora_backend() == "auto"
    clean_backend.setenv(dispatch.ENV_VAR, "triton")
    assert requested_lora_backend() == "triton"
    assert requested_lora_backend("torch") == "torch"
    assert requested_lora_backend("auto") == "auto"


def test_unknown_backend_names_value_and_choices(clean_backend):
    clean_backend.setenv(dispatch.ENV_VAR, "cudnn")
    with pytest.raises(ValueError, match=r"'cudnn'.*VISION_FT_LORA_BACKEND.*auto, torch, triton"):
        requested_lora_backend()
    with pytest.raises(ValueError, match="'fast'"):
        requested_lora_backend("fast")


def test_auto_on_cpu_is_torch_and_explicit_triton_on_cpu_is_an_error(clean_backend):
    x, weight, bias, lora_a, lora_b, *rest = _case(SHAPES["ordinary_3x3"], torch.float32)
    assert resolve_lora_backend(x, weight, lora_a) == "torch"
    assert resolve_lora_backend(x, weight, lora_a, backend="torch") == "torch"
    with pytest.raises(ValueError, match="triton"):
        lora_conv2d(x, weight, bias, lora_a, lora_b, *rest, backend="triton")


def test_missing_triton_module_falls_back_on_auto_and_errors_on_triton(clean_backend):
    clean_backend.setattr(dispatch, "_triton_module", None)
    clean_backend.setattr(dispatch, "_triton_import_error", "ModuleNotFoundError: No module named 'triton'")
    x, weight, bias, lora_a, lora_b, *rest = _case(SHAPES["ordinary_3x3"], torch.float32)
    clean_backend.setenv("TRITON_INTERPRET", "1")
    assert resolve_lora_backend(x, weight, lora_a, backend="auto") == "torch"
    with pytest.raises(ValueError, match="cannot be imported"):
        resolve_lora_backend(x, weight, lora_a, backend="triton")


def test_torch_entry_point_equals_dispatch(clean_backend):
    args = _case(SHAPES["pointwise_1x1"], torch.float32)
    torch.testing.assert_close(torch_lora_conv2d(*args), lora_conv2d(*args, backend="torch"))


_INTERPRETED_TRITON_CHECK = """
import torch
from vision_ft_kernels import lora_conv2d, resolve_lora_backend
from tests.kernels.reference import reference_lora_conv2d
g = torch.Generator().manual_seed(0)
x = torch.randn(1, 4, 6, 5, generator=g, requires_grad=True)
weight, bias = torch.randn(5, 4, 3, 3, generator=g), torch.randn(5, generator=g)
lora_a = torch.randn(2, 4, 3, 3, generator=g, requires_grad=True)
lora_b = torch.randn(5, 2, generator=g, requires_grad=True)
args = (x, weight, bias, lora_a, lora_b, 0.5, (1, 1), (1, 1), (1, 1))
assert resolve_lora_backend(x, weight, lora_a, 1, "triton", bias) == "triton"
out, expected = lora_conv2d(*args, backend="triton"), reference_lora_conv2d(*args)
torch.testing.assert_close(out, expected, atol=1e-4, rtol=1e-4)
grad_out = torch.randn(out.shape, generator=g)
for got, want in zip(torch.autograd.grad(out, (x, lora_a, lora_b), grad_out),
                     torch.autograd.grad(expected, (x, lora_a, lora_b), grad_out)):
    torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)
print("ok")
"""


def test_explicit_triton_runs_the_kernel_under_the_interpreter():
    """The dispatcher's side of the Triton contract, on CPU through Triton's interpreter.

    A subprocess: TRITON_INTERPRET must be set before triton is first imported.
    """
    if dispatch._load_triton() is None:
        pytest.skip(f"Triton kernel not importable: {dispatch._triton_import_error}")
    env = {**os.environ, "TRITON_INTERPRET": "1", dispatch.ENV_VAR: "auto"}
    result = subprocess.run([sys.executable, "-c", _INTERPRETED_TRITON_CHECK], env=env, capture_output=True,
                            text=True, timeout=300, cwd=Path(__file__).resolve().parents[2])
    assert result.returncode == 0 and result.stdout.strip().endswith("ok"), result.stderr[-2000:]
