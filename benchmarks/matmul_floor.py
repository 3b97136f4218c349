"""How fast onnxruntime could run a model at best: the time its matrix products and convolutions take.

    python benchmarks/matmul_floor.py MODEL.onnx [--batch 32] [--threads N] [--size 224]

A transformer spends most of its time in matrix products (linear layers and attention), a CNN
in convolutions, and no graph rewrite removes their arithmetic. This script runs the model under
onnxruntime's profiler in the session options vision-ft's runtime uses and adds up, per batch,
the kernel time of every matrix-product and convolution node onnxruntime executed (MatMul,
FusedMatMul, Gemm, Conv, FusedConv, after its own fusions and layout changes). That sum
is a floor: if every other operator took no time at all, a batch would still take this long in
the same precision and thread count. So `reference time / floor` is the largest speed-up over
the reference that any amount of graph work (fused attention, fused GELU, fewer transposes)
could reach.

`benchmarks/onnx_runtime.py` prints this floor beside its torch-vs-onnxruntime table.
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnxruntime as ort

from vision_ft.runtime import session_options

# Operator names as onnxruntime's profiler reports them (its NCHWc convolutions report "Conv").
MATRIX_PRODUCTS = ("MatMul", "FusedMatMul", "Gemm", "FusedGemm", "Conv", "FusedConv")


@dataclass(frozen=True)
class MatmulFloor:
    products: int  # matrix-product and convolution nodes onnxruntime ran per batch
    product_seconds: float  # median per batch: time inside those nodes
    total_seconds: float  # median per batch: the whole run, as the profiler saw it

    @property
    def share(self) -> float:
        return self.product_seconds / self.total_seconds


def _per_run(events: list[dict]) -> list[tuple[float, float, int]]:
    """(seconds in products and convolutions, seconds in the run, their nodes) for each profiled run."""
    runs = sorted((e["ts"], e["ts"] + e["dur"]) for e in events if e.get("cat") == "Session" and e.get("name") == "model_run")
    products = [(e["ts"], e["dur"]) for e in events
                if e.get("cat") == "Node" and e.get("name", "").endswith("_kernel_time")
                and e.get("args", {}).get("op_name") in MATRIX_PRODUCTS]
    totals = []
    for start, end in runs:
        inside = [dur for ts, dur in products if start <= ts <= end]
        totals.append((sum(inside) / 1e6, (end - start) / 1e6, len(inside)))
    return totals


def measure_floor(onnx_path: Path, batch: np.ndarray, options: ort.SessionOptions, repeats: int = 5) -> MatmulFloor:
    """Profile `repeats` runs of the model on `batch` (after one warm-up) in a session made with
    `options` (fresh ones: profiling is switched on in them)."""
    with tempfile.TemporaryDirectory(prefix="matmul-floor-") as work:
        options.enable_profiling = True
        options.profile_file_prefix = str(Path(work) / "profile")
        session = ort.InferenceSession(str(onnx_path), options, providers=["CPUExecutionProvider"])
        feed = {session.get_inputs()[0].name: batch}
        for _ in range(repeats + 1):
            session.run(None, feed)
        events = json.loads(Path(session.end_profiling()).read_text())
    runs = _per_run(events)[1:]  # the first run allocates its buffers
    if not runs:
        raise RuntimeError(f"onnxruntime's profile of {onnx_path} recorded no runs")
    return MatmulFloor(products=runs[0][2],
                       product_seconds=statistics.median(r[0] for r in runs),
                       total_seconds=statistics.median(r[1] for r in runs))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("model", type=Path, help="An exported fp32 model (image input first).")
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--size", type=int, default=224, help="Input height and width.")
    args = parser.parse_args()
    if not args.model.is_file():
        parser.error(f"{args.model} does not exist; pass an exported .onnx file (vision-ft export RUN writes one)")
    batch = np.random.default_rng(0).standard_normal((args.batch, 3, args.size, args.size)).astype(np.float32)
    floor = measure_floor(args.model, batch, session_options(args.threads))
    print(f"batch of {args.batch}: {floor.total_seconds * 1e3:.1f} ms, of which {floor.product_seconds * 1e3:.1f} ms "
          f"({floor.share:.0%}) in {floor.products} matrix products and convolutions")


if __name__ == "__main__":
    main()
