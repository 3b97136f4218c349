"""The GPU benchmark script runs end to end on the CPU under Triton's interpreter (`--smoke`),
so a session that has a GPU only spends its time measuring, not debugging the script."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]


@pytest.mark.slow
def test_triton_kernel_benchmark_smoke_run_writes_every_field(tmp_path):
    out = tmp_path / "smoke.json"
    env = {**os.environ, "TRITON_INTERPRET": "1", "CUDA_VISIBLE_DEVICES": ""}
    done = subprocess.run(
        [sys.executable, str(REPO / "benchmarks" / "lora_conv_kernel.py"), "--smoke", "--skip-step", "--json", str(out)],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads(out.read_text())
    for key in ("device", "torch", "triton", "speedup_vs_unfused", "ratio_to_floor", "layers"):
        assert key in result, key
    assert len(result["layers"]) == 2
    for row in result["layers"]:
        assert all(row[f"{path}_ms"] > 0 for path in ("triton", "torch", "unfused", "floor")), row
    assert result["speedup_vs_unfused"]["smoke"] > 0 and result["ratio_to_floor"]["smoke"] > 0
