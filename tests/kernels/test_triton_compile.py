"""Ahead-of-time compile check of every Triton kernel specialisation, for sm_80 and sm_90.

The interpreter tests check the kernels' arithmetic; they cannot see what only the compiler
does with a tile (register pressure, shared memory, dtype support in tl.dot).  This test
compiles each kernel (forward, dx, dA) with each of its autotune tiles, for fp16, bf16 and
fp32 activations (fp32 with tf32 dots, torch's default, and with exact 'ieee' dots), for
A100 (sm_80) and H100 (sm_90) targets, through `triton.compile(ASTSource(...),
target=GPUTarget(...))` — no GPU needed — and reads the register and spill counts that
Triton's own `ptxas -v` call reports for the PTX it generated.  Those counts are checked
against `vision_ft_kernels.triton_tiles.SPILL_CLAIMS`, the data next to the tile tables.

Specialisation: the LoRA rank padded to 16 (ranks 1-16, the claims' range), a 3x3 kernel,
a bias and the z store on (the forward's largest variant), adapters in fp32 (autocast
training: A stays fp32 while activations are 16-bit), integer arguments without the
divisibility hints the JIT may add (the variant every layout falls back to).

Triton decides at import time whether kernels are interpreted, so the compiles run in a
child process (this file as a script) without TRITON_INTERPRET, with a fresh cache so that
ptxas really runs, on up to 4 processes (about 1.5 s per compile).
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import os
import re
import subprocess
import sys
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict, dataclass
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
TARGETS = (80, 90)
# (activation dtype, tl.dot input precision): what `dot_settings` can choose on a GPU.
PRECISIONS = (("fp16", "tf32"), ("bf16", "tf32"), ("fp32", "tf32"), ("fp32", "ieee"))
WORKER_TIMEOUT_S = 900


@dataclass(frozen=True)
class Spec:
    kernel: str          # a key of SPILL_CLAIMS
    tile_index: int
    dtype: str
    precision: str
    arch: int


@dataclass(frozen=True)
class Compiled:
    spec: Spec
    registers: int
    spill_store_bytes: int
    spill_load_bytes: int
    shared_bytes: int


# ----------------------------------------------------------------------------- child process

def _kernel_and_tiles(kernel: str):
    from vision_ft_kernels import triton_lora_conv_bwd, triton_lora_conv_fwd, triton_tiles

    table = {
        "forward": (triton_lora_conv_fwd._lora_conv_fwd_kernel, triton_tiles.CONV_TILES),
        "input_grad": (triton_lora_conv_bwd._lora_conv_input_grad_kernel, triton_tiles.CONV_TILES),
        "lora_a_grad": (triton_lora_conv_bwd._lora_a_grad_kernel, triton_tiles.A_GRAD_TILES),
    }
    tuner, tiles = table[kernel]
    return tuner.fn, tiles  # the autotuner wraps the JITFunction


def _signature(fn, spec: Spec, tile) -> tuple[dict[str, str], dict[str, object]]:
    from vision_ft_kernels.triton_tiles import CLAIMED_RANK_PAD

    constexprs = {"KH": 3, "KW": 3, "R_PAD": CLAIMED_RANK_PAD, "HAS_BIAS": True, "STORE_Z": True,
                  "DOT_PRECISION": spec.precision, "UPCAST": False, "BLOCK_M": tile.block_m,
                  "BLOCK_N": tile.block_n, "BLOCK_C": tile.block_n, "BLOCK_K": tile.block_k}
    constexprs = {name: value for name, value in constexprs.items() if name in fn.arg_names}
    signature = {}
    for name in fn.arg_names:
        if name in constexprs:
            signature[name] = "constexpr"
        elif name in ("a_ptr", "partial_ptr"):  # fp32 adapter (autocast) and fp32 dA partials
            signature[name] = "*fp32"
        elif name.endswith("_ptr"):
            signature[name] = f"*{spec.dtype}"
        elif name == "scaling":
            signature[name] = "fp32"
        else:
            signature[name] = "i32"
    missing = [name for name in fn.arg_names if fn.params[fn.arg_names.index(name)].is_constexpr
               and name not in constexprs]
    if missing:
        raise ValueError(f"{fn.__name__}: no value for constexpr {missing}; extend _signature")
    return signature, constexprs


def compile_one(spec: Spec) -> Compiled:
    """Compile one specialisation for its target and parse Triton's `ptxas -v` log."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    fn, tiles = _kernel_and_tiles(spec.kernel)
    tile = tiles[spec.tile_index]
    signature, constexprs = _signature(fn, spec, tile)
    log = io.StringIO()
    with contextlib.redirect_stdout(log):  # TRITON_DUMP_PTXAS_LOG=1 prints ptxas's report
        compiled = triton.compile(ASTSource(fn, signature, constexprs), target=GPUTarget("cuda", spec.arch, 32),
                                  options={"num_warps": tile.num_warps, "num_stages": tile.num_stages})
    report = log.getvalue()
    registers = re.search(r"Used (\d+) registers", report)
    spills = re.search(r"(\d+) bytes spill stores, (\d+) bytes spill loads", report)
    if registers is None or spills is None:
        raise RuntimeError(f"no ptxas -v report for {spec}: {report[-500:]!r}")
    return Compiled(spec, int(registers.group(1)), int(spills.group(1)), int(spills.group(2)),
                    int(compiled.metadata.shared))


def all_specs() -> list[Spec]:
    specs = []
    for kernel in ("forward", "input_grad", "lora_a_grad"):
        tiles = _kernel_and_tiles(kernel)[1]
        specs += [Spec(kernel, index, dtype, precision, arch) for index in range(len(tiles))
                  for dtype, precision in PRECISIONS for arch in TARGETS]
    return specs


def _worker_main(argv: list[str]) -> None:
    parser = argparse.ArgumentParser(description="Compile every Triton kernel specialisation ahead of time.")
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--processes", type=int, default=min(4, os.cpu_count() or 1))
    args = parser.parse_args(argv)
    specs = all_specs()
    with ProcessPoolExecutor(args.processes) as pool:
        results = list(pool.map(compile_one, specs))
    args.out.write_text(json.dumps([asdict(result) for result in results], indent=1))


# ----------------------------------------------------------------------------- pytest side

@pytest.fixture(scope="module")
def compiled(tmp_path_factory: pytest.TempPathFactory) -> list[dict]:
    pytest.importorskip("triton")
    work = tmp_path_factory.mktemp("triton_aot")
    env = {**os.environ, "TRITON_CACHE_DIR": str(work / "cache"), "TRITON_DUMP_PTXAS_LOG": "1"}
    env.pop("TRITON_INTERPRET", None)
    out = work / "compiled.json"
    proc = subprocess.run([sys.executable, __file__, "--out", str(out)], env=env, cwd=REPO,
                          capture_output=True, text=True, timeout=WORKER_TIMEOUT_S)
    if proc.returncode != 0 or not out.exists():
        pytest.fail(f"compile worker failed (exit {proc.returncode}):\n{proc.stderr[-6000:]}")
    return json.loads(out.read_text())


def _label(row: dict) -> str:
    from vision_ft_kernels.triton_tiles import A_GRAD_TILES, CONV_TILES

    spec = row["spec"]
    tiles = A_GRAD_TILES if spec["kernel"] == "lora_a_grad" else CONV_TILES
    return (f"{spec['kernel']} {tiles[spec['tile_index']].label()} {spec['dtype']}/{spec['precision']} "
            f"sm_{spec['arch']}: {row['registers']} registers, {row['spill_store_bytes']} B spill stores")


def test_every_specialisation_compiles_for_sm80_and_sm90(compiled: list[dict]) -> None:
    from vision_ft_kernels.triton_tiles import A_GRAD_TILES, CONV_TILES

    expected = (2 * len(CONV_TILES) + len(A_GRAD_TILES)) * len(PRECISIONS) * len(TARGETS)
    assert len(compiled) == expected
    for row in compiled:
        assert 0 < row["registers"] <= 255, _label(row)
        # sm_80 gives a block at most 163 KiB of shared memory (sm_90: 227 KiB).
        assert row["shared_bytes"] <= 163 * 1024, _label(row)


def _precision_class(spec: dict) -> str:
    """The SpillClaim field a specialisation is held to."""
    return "half" if spec["dtype"] in ("fp16", "bf16") else spec["precision"]


def test_spills_match_the_claims_next_to_the_tile_tables(compiled: list[dict]) -> None:
    from vision_ft_kernels.triton_tiles import A_GRAD_TILES, CONV_TILES, SPILL_CLAIMS

    worst: dict[tuple[str, int, str], int] = {}
    for row in compiled:
        spec = row["spec"]
        tiles = A_GRAD_TILES if spec["kernel"] == "lora_a_grad" else CONV_TILES
        precision = _precision_class(spec)
        claim = getattr(SPILL_CLAIMS[spec["kernel"]][tiles[spec["tile_index"]]], precision)
        assert row["spill_store_bytes"] <= claim, f"{_label(row)}; the claim is {claim} B"
        key = (spec["kernel"], spec["tile_index"], precision)
        worst[key] = max(worst.get(key, 0), row["spill_store_bytes"])
    for (kernel, tile_index, precision), seen in worst.items():
        tiles = A_GRAD_TILES if kernel == "lora_a_grad" else CONV_TILES
        claim = getattr(SPILL_CLAIMS[kernel][tiles[tile_index]], precision)
        # A claim of spills that never happen is a stale comment too.
        assert (claim == 0) == (seen == 0), (
            f"{kernel} {tiles[tile_index].label()} {precision}: claims {claim} B of spills, ptxas reports "
            f"at most {seen} B")


def test_every_tile_has_a_claim() -> None:
    pytest.importorskip("triton")
    from vision_ft_kernels.triton_tiles import A_GRAD_TILES, CONV_TILES, SPILL_CLAIMS

    assert set(SPILL_CLAIMS["forward"]) == set(SPILL_CLAIMS["input_grad"]) == set(CONV_TILES)
    assert set(SPILL_CLAIMS["lora_a_grad"]) == set(A_GRAD_TILES)


if __name__ == "__main__":
    _worker_main(sys.argv[1:])
