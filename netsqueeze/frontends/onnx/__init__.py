"""ONNX frontend: a model file or `onnx.ModelProto`, read through onnx-graphsurgeon, becomes an `ir.Graph`;
constant subgraphs are folded into params, unknown ops become opaque nodes re-emitted verbatim.

By concern: `load` (reading a model, opset and structure checks), `importer` (the walk, constant
folding, the opaque fallback), `ops` (the per-op handlers, opset differences inside each), `weights`
(stored-weight subgraphs kept encoded), `torch_ops` (opaque ONNX ops that torch can still run).
"""

from netsqueeze.frontends.onnx.importer import HANDLERS, from_onnx
from netsqueeze.frontends.onnx.load import (
    MAX_OPSET,
    MIN_OPSET,
    check_structure,
    load_model,
    model_opset,
    onnx_dtype_name,
    skeleton,
)
from netsqueeze.frontends.onnx.torch_ops import OnnxTorchOp

__all__ = ["HANDLERS", "MAX_OPSET", "MIN_OPSET", "OnnxTorchOp", "check_structure", "from_onnx", "load_model",
           "model_opset", "onnx_dtype_name", "skeleton"]
