"""Shared helpers for the ONNX tests: the onnx package's light models, weight randomisation, ORT runs."""

from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import helper, numpy_helper

LIGHT = Path(onnx.__file__).parent / "backend" / "test" / "data" / "light"
LIGHT_MODELS = sorted(p.stem.removeprefix("light_") for p in LIGHT.glob("light_*.onnx"))
# the light models whose import/trim tests take 3-25 s each: marked `slow` (`make test` skips them,
# `make test-all` runs them); the other light models keep every route covered in `make test`
SLOW_LIGHT = frozenset({"bvlc_alexnet", "densenet121", "resnet50", "vgg19", "zfnet512"})
LIGHT_PARAMS = [pytest.param(n, marks=pytest.mark.slow) if n in SLOW_LIGHT else n for n in LIGHT_MODELS]


def light_path(name: str) -> Path:
    return LIGHT / f"light_{name}.onnx"


def light_reference(name: str) -> np.ndarray:
    t = onnx.TensorProto()
    t.ParseFromString((LIGHT / f"light_{name}_output_0.pb").read_bytes())
    return numpy_helper.to_array(t)


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def randomized(path: Path, seed: int = 0) -> onnx.ModelProto:
    """The model with its ConstantOfShape-filled weights replaced by random ones.

    The light models' weights are constants (every output is 1/1000), which would hide wrong
    wiring; random weights (fan-in scaled, 1-D vectors positive so BN variances stay valid) do not.
    """
    rng = np.random.default_rng(seed)
    # Tiling a prime-length random pool is ~10x cheaper than fresh normals for VGG-sized weights,
    # and its period lines up with no tensor dimension.
    pool = rng.standard_normal(1_000_003, dtype=np.float32)
    model = onnx.load(str(path))
    inits = {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}
    nodes = []
    for n in model.graph.node:
        if n.op_type == "ConstantOfShape" and n.input[0] in inits:
            shape = tuple(int(d) for d in inits[n.input[0]])
            if len(shape) >= 2:
                v = np.resize(np.roll(pool, int(rng.integers(len(pool)))), shape)
                v *= np.float32(1 / np.sqrt(np.prod(shape[1:])))
            else:
                v = rng.uniform(0.5, 1.5, shape).astype(np.float32)
            n = helper.make_node("Constant", [], list(n.output), name=n.name, value=numpy_helper.from_array(v))
        nodes.append(n)
    del model.graph.node[:]
    model.graph.node.extend(nodes)
    return model


def session(model: onnx.ModelProto | Path) -> ort.InferenceSession:
    so = ort.SessionOptions()
    so.intra_op_num_threads = 2
    so.log_severity_level = 3
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_BASIC
    data = model.SerializeToString() if isinstance(model, onnx.ModelProto) else str(model)
    return ort.InferenceSession(data, so, providers=["CPUExecutionProvider"])


def run(model: onnx.ModelProto | Path, *inputs: np.ndarray) -> list[np.ndarray]:
    s = session(model)
    feeds = {i.name: x for i, x in zip(s.get_inputs(), inputs)}
    return [np.asarray(o) for o in s.run(None, feeds)]


def input_shapes(model: onnx.ModelProto) -> list[tuple[int, ...]]:
    inits = {t.name for t in model.graph.initializer}
    return [tuple(d.dim_value or 1 for d in i.type.tensor_type.shape.dim) for i in model.graph.input
            if i.name not in inits]


_REFERENCES: dict[str, tuple[np.ndarray, np.ndarray]] = {}


def randomized_reference(name: str, model: onnx.ModelProto | None = None) -> tuple[np.ndarray, np.ndarray]:
    """(input, ORT output) of the randomized light model; computed once per test session."""
    if name not in _REFERENCES:
        m = model if model is not None else randomized(light_path(name))
        x = np.random.default_rng(1).standard_normal(input_shapes(m)[0], dtype=np.float32)
        _REFERENCES[name] = (x, run(m, x)[0])
    return _REFERENCES[name]
