"""onnxruntime against torch eager on CPU: latency (batch 1) and throughput (batch 32).

    python benchmarks/onnx_runtime.py [--json FILE] [--threads N] [--rounds R] [--models a b ...]
                                      [--keep-freed-memory]

Each model (random weights, 224 x 224 RGB, 1000 classes) is exported with vision-ft's own
exporter (`vision_ft.export.to_onnx`) and run in the session vision-ft's runtime uses
(`vision_ft.runtime.session_options`: all graph optimisations, sequential execution). Both
frameworks get the same number of threads: `torch.set_num_threads(N)` and onnxruntime's
`intra_op_num_threads = N` (inter-op 1 for both), and neither pool spins while idle
(OMP_WAIT_POLICY=PASSIVE for torch's OpenMP, allow_spinning=0 for onnxruntime). torch runs
eager fp32 under `torch.inference_mode()`, the way `vision-ft predict` runs a run folder, with
glibc's malloc as it comes; `--keep-freed-memory` gives torch the tuning `vision-ft train` uses,
so that neither side page-faults its activations back in every call (onnxruntime's arena never
does).

Timing: after warm-up, R rounds; in each round torch and onnxruntime alternate on the same
input, so load from other jobs on a shared machine hits both alike. Reported numbers are medians
over every timed call of all rounds. The outputs of both are compared as a sanity check.
Target: onnxruntime throughput >= 1.3x torch eager on every model.

A second table shows where onnxruntime's batch-32 time goes (`benchmarks/matmul_floor.py`):
the kernel time of its matrix products and convolutions, which no graph rewrite can shrink in
fp32, the time of everything else, and how small everything else would have to get to reach the
target.
"""

from __future__ import annotations

import os

# Both thread pools sleep when idle instead of spinning (onnxruntime: allow_spinning=0 in the
# runtime's session options). Set before torch loads OpenMP. On a shared machine GNU OpenMP's
# spinning barriers stall whenever one of torch's threads is descheduled: resnet18 batch 1
# took 1.4 s with 2 threads instead of 47 ms, which would flatter onnxruntime unfairly.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import argparse  # noqa: E402
import json  # noqa: E402
import platform  # noqa: E402
import statistics  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402
from typing import Callable  # noqa: E402

import numpy as np  # noqa: E402
import onnx  # noqa: E402
import onnxruntime as ort  # noqa: E402
import timm  # noqa: E402
import torch  # noqa: E402

import vision_ft  # noqa: E402
from vision_ft.cpu_memory import keep_freed_memory  # noqa: E402
from vision_ft.export import OPSET, to_onnx  # noqa: E402
from vision_ft.runtime import session_options  # noqa: E402

from matmul_floor import measure_floor  # noqa: E402  (beside this script)

MODELS = ("resnet18", "vit_tiny_patch16_224", "tf_efficientnet_lite0")
IMAGE_SIZE = 224
THROUGHPUT_BATCH = 32
TARGET_SPEEDUP = 1.3


def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def load_average() -> list[float] | None:
    return [round(v, 2) for v in os.getloadavg()] if hasattr(os, "getloadavg") else None


def timed(fn: Callable[[], object], calls: int) -> list[float]:
    """Seconds per call of `fn`, `calls` times."""
    out = []
    for _ in range(calls):
        start = time.perf_counter()
        fn()
        out.append(time.perf_counter() - start)
    return out


def bench_model(name: str, threads: int, rounds: int, latency_calls: int, throughput_calls: int, work: Path) -> dict:
    torch.manual_seed(0)
    model = timm.create_model(name, pretrained=False, num_classes=1000).eval()
    onnx_path = work / f"{name}.onnx"
    started = time.perf_counter()
    proto = to_onnx(model, 3, (IMAGE_SIZE, IMAGE_SIZE))
    onnx.save(proto, str(onnx_path))
    export_seconds = time.perf_counter() - started
    session = ort.InferenceSession(str(onnx_path), session_options(threads), providers=["CPUExecutionProvider"])

    rng = np.random.default_rng(0)
    inputs = {b: rng.standard_normal((b, 3, IMAGE_SIZE, IMAGE_SIZE)).astype(np.float32) for b in (1, THROUGHPUT_BATCH)}
    tensors = {b: torch.from_numpy(x) for b, x in inputs.items()}

    def run_torch(b: int) -> np.ndarray:
        with torch.inference_mode():
            return model(tensors[b]).numpy()

    def run_ort(b: int) -> np.ndarray:
        return session.run(["logits"], {"image": inputs[b]})[0]

    max_diff = float(np.abs(run_torch(THROUGHPUT_BATCH) - run_ort(THROUGHPUT_BATCH)).max())  # also warms up
    for b in (1, THROUGHPUT_BATCH):
        run_torch(b), run_ort(b)

    samples: dict[str, list[float]] = {"torch_1": [], "ort_1": [], "torch_32": [], "ort_32": []}
    for _ in range(rounds):
        samples["torch_1"] += timed(lambda: run_torch(1), latency_calls)
        samples["ort_1"] += timed(lambda: run_ort(1), latency_calls)
        samples["torch_32"] += timed(lambda: run_torch(THROUGHPUT_BATCH), throughput_calls)
        samples["ort_32"] += timed(lambda: run_ort(THROUGHPUT_BATCH), throughput_calls)
    median = {k: statistics.median(v) for k, v in samples.items()}
    result = {
        "model": name,
        "params_m": round(sum(p.numel() for p in model.parameters()) / 1e6, 2),
        "torch_latency_ms": round(median["torch_1"] * 1e3, 2),
        "ort_latency_ms": round(median["ort_1"] * 1e3, 2),
        "latency_speedup": round(median["torch_1"] / median["ort_1"], 2),
        "torch_images_per_s": round(THROUGHPUT_BATCH / median["torch_32"], 1),
        "ort_images_per_s": round(THROUGHPUT_BATCH / median["ort_32"], 1),
        "throughput_speedup": round(median["torch_32"] / median["ort_32"], 2),
        "max_abs_logit_diff": max_diff,
        "export_seconds": round(export_seconds, 1),
        "timed_calls": {k: len(v) for k, v in samples.items()},
    }
    result["target_met"] = result["throughput_speedup"] >= TARGET_SPEEDUP
    floor = measure_floor(onnx_path, inputs[THROUGHPUT_BATCH], session_options(threads))
    target_seconds = median["torch_32"] / TARGET_SPEEDUP
    result["ort_profile_b32"] = {
        "total_ms": round(floor.total_seconds * 1e3, 1),
        "products_ms": round(floor.product_seconds * 1e3, 1),
        "product_nodes": floor.products,
        "other_ms": round((floor.total_seconds - floor.product_seconds) * 1e3, 1),
        # What the other operators may take at most for the target, given the products' time.
        "other_ms_allowed_for_target": round((target_seconds - floor.product_seconds) * 1e3, 1),
        "speedup_if_only_products_took_time": round(median["torch_32"] / floor.product_seconds, 2),
    }
    return result


def print_table(results: list[dict]) -> None:
    header = (f"{'model':<24} {'latency b1 torch':>17} {'ort':>9} {'ratio':>6}   "
              f"{'throughput b32 torch':>21} {'ort':>9} {'ratio':>6}  target")
    print(header)
    print("-" * len(header))
    for r in results:
        print(f"{r['model']:<24} {r['torch_latency_ms']:>14.1f} ms {r['ort_latency_ms']:>6.1f} ms {r['latency_speedup']:>5.2f}x   "
              f"{r['torch_images_per_s']:>16.1f} im/s {r['ort_images_per_s']:>4.1f} im/s {r['throughput_speedup']:>5.2f}x  "
              f"{'met' if r['target_met'] else 'MISSED'}")


def print_profile_table(results: list[dict]) -> None:
    print(f"\nWhere onnxruntime's batch-{THROUGHPUT_BATCH} time goes (its profiler; products = matrix-product and "
          "convolution kernels):")
    header = (f"{'model':<24} {'ort total':>10} {'products':>9} {'other':>8}   "
              f"{'other allowed for ' + str(TARGET_SPEEDUP) + 'x':>24}   {'ratio if other took 0':>21}")
    print(header)
    print("-" * len(header))
    for r in results:
        p = r["ort_profile_b32"]
        allowed = p["other_ms_allowed_for_target"]
        print(f"{r['model']:<24} {p['total_ms']:>7.1f} ms {p['products_ms']:>6.1f} ms {p['other_ms']:>5.1f} ms   "
              f"{allowed:>21.1f} ms   {p['speedup_if_only_products_took_time']:>20.2f}x")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", type=Path, help="Write the results here as JSON.")
    parser.add_argument("--threads", type=int, default=min(4, os.cpu_count() or 1),
                        help="Threads for both frameworks (default: up to 4).")
    parser.add_argument("--rounds", type=int, default=3, help="Alternating timing rounds per model.")
    parser.add_argument("--latency-calls", type=int, default=10, help="Batch-1 calls per round and framework.")
    parser.add_argument("--throughput-calls", type=int, default=3, help="Batch-32 calls per round and framework.")
    parser.add_argument("--models", nargs="+", default=list(MODELS))
    parser.add_argument("--keep-freed-memory", action="store_true",
                        help="Give torch the malloc tuning `vision-ft train` uses (vision_ft.cpu_memory): freed "
                             "activations stay in the process instead of being page-faulted back every call. "
                             "onnxruntime's own arena does this already, so this is the stricter comparison.")
    args = parser.parse_args()
    unknown = [name for name in args.models if not timm.is_model(name)]
    if unknown:
        parser.error(f"unknown timm model {', '.join(unknown)}; see timm.list_models() for the names")
    malloc = "glibc defaults"
    if args.keep_freed_memory:
        malloc = "freed memory kept (vision_ft.cpu_memory)" if keep_freed_memory() else "glibc defaults (tuning unavailable)"

    torch.set_num_threads(args.threads)
    torch.set_num_interop_threads(1)
    load_before = load_average()
    results = []
    with tempfile.TemporaryDirectory(prefix="vision-ft-bench-") as work:
        for name in args.models:
            results.append(bench_model(name, args.threads, args.rounds, args.latency_calls, args.throughput_calls, Path(work)))
            print(f"{name}: done", flush=True)
    print()
    print(f"CPU: {cpu_name()}, {os.cpu_count()} logical cores; threads {args.threads} for torch and onnxruntime; "
          f"malloc: {malloc}")
    print_table(results)
    print_profile_table(results)
    report = {
        "benchmark": "onnxruntime vs torch eager, CPU, fp32, 224x224, random weights",
        "machine": {"cpu": cpu_name(), "logical_cores": os.cpu_count(), "platform": platform.platform(),
                    "load_average_before": load_before, "load_average_after": load_average()},
        "versions": {"vision_ft": vision_ft.__version__, "torch": torch.__version__, "onnxruntime": ort.__version__,
                     "timm": timm.__version__, "python": platform.python_version()},
        "settings": {
            "threads": args.threads,
            "torch": f"eager fp32, inference_mode, set_num_threads({args.threads}), interop 1, "
                     f"OMP_WAIT_POLICY={os.environ.get('OMP_WAIT_POLICY')}, malloc: {malloc}",
            "onnxruntime": f"CPUExecutionProvider, ORT_ENABLE_ALL, sequential, intra_op {args.threads}, inter_op 1, "
                           "allow_spinning 0 (vision_ft.runtime.session_options)",
            "exporter": f"torch.onnx.export(dynamo=True), opset {OPSET}",
            "rounds": args.rounds, "latency_calls_per_round": args.latency_calls,
            "throughput_calls_per_round": args.throughput_calls, "statistic": "median over all timed calls",
        },
        "target": f"onnxruntime throughput >= {TARGET_SPEEDUP}x torch eager on every model",
        "all_targets_met": all(r["target_met"] for r in results),
        "results": results,
    }
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(report, indent=1) + "\n")
        print(f"results written to {args.json}")


if __name__ == "__main__":
    main()
