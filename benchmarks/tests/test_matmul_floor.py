"""benchmarks/matmul_floor.py: counts the products onnxruntime ran and splits the time correctly."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from vision_ft.runtime import session_options

SCRIPT = Path(__file__).resolve().parents[1] / "matmul_floor.py"


@pytest.fixture(scope="module")
def matmul_floor():
    spec = importlib.util.spec_from_file_location("matmul_floor", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


def _save(nodes: list[onnx.NodeProto], weights: dict[str, np.ndarray], path: Path) -> Path:
    graph = helper.make_graph(
        nodes, "tiny", [helper.make_tensor_value_info("image", TensorProto.FLOAT, ["batch", 3, 16, 16])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, None)],
        [numpy_helper.from_array(w, name) for name, w in weights.items()])
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), str(path))
    return path


def test_products_and_the_rest_are_told_apart(matmul_floor, tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    weights = {"conv_w": rng.standard_normal((8, 3, 3, 3)).astype(np.float32),
               "fc1": rng.standard_normal((8 * 16 * 16, 64)).astype(np.float32),
               "fc2": rng.standard_normal((64, 5)).astype(np.float32)}
    nodes = [helper.make_node("Conv", ["image", "conv_w"], ["c"], pads=[1, 1, 1, 1]),
             helper.make_node("Flatten", ["c"], ["f"]),
             helper.make_node("MatMul", ["f", "fc1"], ["h"]),
             helper.make_node("Softmax", ["h"], ["s"]),
             helper.make_node("MatMul", ["s", "fc2"], ["logits"])]
    path = _save(nodes, weights, tmp_path / "tiny.onnx")
    batch = rng.standard_normal((4, 3, 16, 16)).astype(np.float32)

    floor = matmul_floor.measure_floor(path, batch, session_options(1), repeats=3)

    assert floor.products == 3  # the convolution and both MatMuls, whatever onnxruntime fused them into
    assert 0 < floor.product_seconds < floor.total_seconds
    assert 0 < floor.share < 1


def test_a_graph_without_products_has_a_zero_floor(matmul_floor, tmp_path: Path) -> None:
    path = _save([helper.make_node("Relu", ["image"], ["r"]), helper.make_node("Softmax", ["r"], ["logits"])],
                 {}, tmp_path / "no_products.onnx")
    batch = np.ones((2, 3, 16, 16), np.float32)

    floor = matmul_floor.measure_floor(path, batch, session_options(1), repeats=2)

    assert floor.products == 0
    assert floor.product_seconds == 0
    assert floor.total_seconds > 0
