"""Parity of the Triton LoRA convolution with an fp64 reference: interpreter always, CUDA when present.

The cases, the worker that runs them in a child process and the judging live in
`triton_parity.py` (benchmarks/gpu_check.py runs the same worker on a GPU).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from dataclasses import asdict
from pathlib import Path

import pytest
import torch

from tests.kernels.triton_parity import CASE_IDS, CASES, ParityCase, case_failures, check_failures

WORKER = Path(__file__).resolve().parent / "triton_parity.py"
WORKER_TIMEOUT_S = 600


def _run_worker(device: str, out_dir: Path) -> dict:
    env = dict(os.environ)
    if device == "cpu":
        env["TRITON_INTERPRET"] = "1"
    else:
        env.pop("TRITON_INTERPRET", None)
    out = out_dir / f"triton_lora_conv_{device}.json"
    proc = subprocess.run([sys.executable, str(WORKER), "--device", device, "--out", str(out)],
                          env=env, capture_output=True, text=True, timeout=WORKER_TIMEOUT_S)
    if proc.returncode != 0 or not out.exists():
        pytest.fail(f"parity worker on {device} failed (exit {proc.returncode}):\n"
                    f"{proc.stdout[-3000:]}\n{proc.stderr[-6000:]}")
    return json.loads(out.read_text())


@pytest.fixture(scope="module")
def interpreter_results(tmp_path_factory: pytest.TempPathFactory) -> dict:
    return _run_worker("cpu", tmp_path_factory.mktemp("triton_interpreter"))


@pytest.fixture(scope="module")
def cuda_results(tmp_path_factory: pytest.TempPathFactory) -> dict:
    if not torch.cuda.is_available():
        pytest.skip("no CUDA device: the native Triton run needs a GPU")
    return _run_worker("cuda", tmp_path_factory.mktemp("triton_cuda"))


@pytest.mark.parametrize("case", CASES, ids=CASE_IDS)
def test_triton_lora_conv_matches_reference_interpreter(interpreter_results: dict,
                                                        case: ParityCase) -> None:
    assert not case_failures(interpreter_results, case), case_failures(interpreter_results, case)


def test_triton_supports_and_errors_interpreter(interpreter_results: dict) -> None:
    assert not check_failures(interpreter_results["checks"]), check_failures(interpreter_results["checks"])


@pytest.mark.parametrize("case", CASES, ids=CASE_IDS)
def test_triton_lora_conv_matches_reference_cuda(cuda_results: dict, case: ParityCase) -> None:
    assert not case_failures(cuda_results, case), case_failures(cuda_results, case)


def test_triton_supports_and_errors_cuda(cuda_results: dict) -> None:
    assert not check_failures(cuda_results["checks"]), check_failures(cuda_results["checks"])


def test_triton_cases_are_serializable() -> None:
    """The case table crosses the process boundary by name; keep names unique and plain."""
    assert len(set(CASE_IDS)) == len(CASE_IDS)
    json.dumps([asdict(case) for case in CASES])
