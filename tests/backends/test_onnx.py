"""ONNX backend: hand-built IR graphs emitted to ONNX and checked in ONNX Runtime against torch."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
import torch.nn.functional as F
from onnx import helper

from netsqueeze.backends.onnx import save_onnx, to_onnx
from netsqueeze.errors import UnsupportedOpError
from netsqueeze.frontends.onnx import from_onnx
from netsqueeze.ir.graph import Graph, Origin, TensorMeta
from tests.frontends.onnx_models import run

torch.manual_seed(0)


def small_cnn() -> tuple[Graph, dict[str, torch.Tensor]]:
    p = {"w": torch.randn(8, 3, 3, 3) * 0.3, "b": torch.randn(8), "g": torch.rand(8) + 0.5, "be": torch.randn(8),
         "lw": torch.randn(5, 8) * 0.3, "lb": torch.randn(5)}
    g = Graph("cnn")
    g.add_node("x", "input", attrs={"shape": (1, 3, 8, 8), "dtype": "float32"})
    g.add_node("conv", "conv", ["x"], attrs={"stride": [1, 1], "padding": [1, 1, 1, 1], "dilation": [1, 1], "groups": 1},
               params={"weight": p["w"], "bias": p["b"]})
    g.add_node("gn", "group_norm", ["conv"], attrs={"num_groups": 2, "eps": 1e-5}, params={"weight": p["g"], "bias": p["be"]})
    g.add_node("act", "gelu", ["gn"], attrs={"approximate": "none"})
    g.add_node("pool", "adaptive_avg_pool", ["act"], attrs={"output_size": [1, 1]})
    g.add_node("flat", "flatten", ["pool"], attrs={"start_dim": 1, "end_dim": -1})
    g.add_node("fc", "linear", ["flat"], params={"weight": p["lw"], "bias": p["lb"]})
    g.add_node("out", "output", ["fc"])
    g.infer_shapes()
    g.verify()
    return g, p


def cnn_reference(p: dict[str, torch.Tensor], x: torch.Tensor) -> np.ndarray:
    h = F.gelu(F.group_norm(F.conv2d(x, p["w"], p["b"], padding=1), 2, p["g"], p["be"]))
    return F.linear(h.mean((2, 3)), p["lw"], p["lb"]).numpy()


@pytest.mark.parametrize("opset", [17, 21])
def test_checker_and_other_batch_sizes(opset: int) -> None:
    g, p = small_cnn()
    m = to_onnx(g, opset=opset)
    onnx.checker.check_model(m, full_check=True)
    assert m.opset_import[0].version == opset
    assert m.graph.input[0].type.tensor_type.shape.dim[0].dim_param == "batch"
    assert m.graph.output[0].type.tensor_type.shape.dim[0].dim_param == "batch"
    assert [i.name for i in m.graph.input] == ["x"] and [o.name for o in m.graph.output] == ["out"]
    for batch in (1, 3):
        x = torch.randn(batch, 3, 8, 8)
        (y,) = run(m, x.numpy())
        assert np.abs(y - cnn_reference(p, x)).max() < 1e-4


def test_fp16_halves_the_file_and_keeps_io_fp32() -> None:
    g, _ = small_cnn()
    m32, m16 = to_onnx(g), to_onnx(g, precision="fp16")
    onnx.checker.check_model(m16, full_check=True)
    x = torch.randn(2, 3, 8, 8)
    (y32,), (y16,) = run(m32, x.numpy()), run(m16, x.numpy())
    assert y16.dtype == np.float32
    assert np.abs(y16 - y32).max() / np.abs(y32).max() < 1e-2
    init_bytes = {t.name: len(t.raw_data) for t in m32.graph.initializer}
    half = {t.name: len(t.raw_data) for t in m16.graph.initializer}
    assert sum(half.values()) < 0.6 * sum(init_bytes.values())
    raw = to_onnx(g, precision="fp16", keep_io_fp32=False)
    assert raw.graph.input[0].type.tensor_type.elem_type == onnx.TensorProto.FLOAT16
    (y,) = run(raw, x.numpy().astype(np.float16))
    assert y.dtype == np.float16 and np.abs(y - y32).max() / np.abs(y32).max() < 1e-2


def test_metadata_and_save_one_file(tmp_path: Path) -> None:
    g, _ = small_cnn()
    m = to_onnx(g, metadata={"netsqueeze.policy_hash": "abc123", "netsqueeze.plan": "fold_bn"})
    assert {e.key: e.value for e in m.metadata_props} == {"netsqueeze.plan": "fold_bn", "netsqueeze.policy_hash": "abc123"}
    path = tmp_path / "m.onnx"
    save_onnx(m, path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.onnx"]
    back = onnx.load(str(path))
    assert back.SerializeToString() == m.SerializeToString()


def test_opaque_torch_node_is_an_error() -> None:
    g = Graph("t")
    g.add_node("x", "input", attrs={"shape": (2, 4), "dtype": "float32"})
    g.add_node("weird", "opaque", ["x"], origin=Origin("fx", "weird", "aten.cumsum.default", torch.cumsum))
    g.node("weird").meta = [TensorMeta((2, 4))]  # opaque shapes are what the frontend observed
    g.add_node("y", "output", ["weird"])
    g.infer_shapes()
    with pytest.raises(UnsupportedOpError) as e:
        to_onnx(g)
    assert e.value.message == "node 'weird' is an opaque fx op (aten.cumsum.default) with no ONNX equivalent"
    assert e.value.diagnostics[0].node == "weird"


def test_bad_opset_and_precision() -> None:
    g, _ = small_cnn()
    with pytest.raises(UnsupportedOpError, match=r"cannot export at opset 13: netsqueeze emits opsets 17\.\.23"):
        to_onnx(g, opset=13)
    with pytest.raises(UnsupportedOpError, match="unknown precision 'int4'"):
        to_onnx(g, precision="int4")  # type: ignore[arg-type]


def test_opaque_onnx_node_re_emitted_verbatim() -> None:
    x = helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [2, 5])
    y = helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, [2, 5])
    ax = onnx.numpy_helper.from_array(np.asarray(1, np.int64), "ax")
    node = helper.make_node("CumSum", ["x", "ax"], ["y"], name="cs", exclusive=1, reverse=1)
    m = helper.make_model(helper.make_graph([node], "g", [x], [y], [ax]), opset_imports=[helper.make_opsetid("", 17)],
                          ir_version=8)
    out = to_onnx(from_onnx(m))
    (cs,) = [n for n in out.graph.node if n.op_type == "CumSum"]
    assert cs.name == "cs" and {a.name: a.i for a in cs.attribute} == {"exclusive": 1, "reverse": 1}
    v = np.random.rand(2, 5).astype(np.float32)
    assert np.abs(run(out, v)[0] - run(m, v)[0]).max() < 1e-6


def test_attention_matches_torch() -> None:
    mha = torch.nn.MultiheadAttention(8, 2, batch_first=True).eval()
    g = Graph("attn")
    g.add_node("q", "input", attrs={"shape": (1, 5, 8), "dtype": "float32"})
    g.add_node("mha", "attention", ["q", "q", "q"], attrs={"num_heads": 2, "embed_dim": 8, "head_dim": 4, "batch_first": True},
               params={"in_proj_weight": mha.in_proj_weight.detach(), "in_proj_bias": mha.in_proj_bias.detach(),
                       "out_proj_weight": mha.out_proj.weight.detach(), "out_proj_bias": mha.out_proj.bias.detach()})
    g.add_node("y", "output", ["mha"])
    g.infer_shapes()
    m = to_onnx(g)
    onnx.checker.check_model(m, full_check=True)
    x = torch.randn(3, 5, 8)
    with torch.no_grad():
        ref = mha(x, x, x, need_weights=False)[0].numpy()
    assert np.abs(run(m, x.numpy())[0] - ref).max() < 1e-5


def test_flatten_keeps_torch_semantics() -> None:
    g = Graph("f")
    g.add_node("x", "input", attrs={"shape": (2, 3, 4, 5), "dtype": "float32"})
    g.add_node("inner", "flatten", ["x"], attrs={"start_dim": 2, "end_dim": -1})
    g.add_node("outer", "flatten", ["inner"], attrs={"start_dim": 0, "end_dim": 1})
    g.add_node("y", "output", ["outer"])
    g.infer_shapes()
    x = torch.randn(2, 3, 4, 5)
    (y,) = run(to_onnx(g), x.numpy())
    assert np.array_equal(y, torch.flatten(torch.flatten(x, 2), 0, 1).numpy())


@pytest.mark.parametrize("boolean", [True, False])
def test_attention_with_mask_matches_torch(boolean: bool) -> None:
    mha = torch.nn.MultiheadAttention(8, 2, batch_first=True).eval()
    causal = torch.triu(torch.ones(5, 5, dtype=torch.bool), 1)
    mask = causal if boolean else torch.randn(5, 5)
    g = Graph("attn")
    g.add_node("q", "input", attrs={"shape": (2, 5, 8), "dtype": "float32"})
    g.add_node("m", "constant", params={"value": mask})
    g.add_node("mha", "attention", ["q", "q", "q", "m"],
               attrs={"num_heads": 2, "embed_dim": 8, "head_dim": 4, "batch_first": True},
               params={"in_proj_weight": mha.in_proj_weight.detach(), "in_proj_bias": mha.in_proj_bias.detach(),
                       "out_proj_weight": mha.out_proj.weight.detach(), "out_proj_bias": mha.out_proj.bias.detach()})
    g.add_node("y", "output", ["mha"])
    g.infer_shapes()
    m = to_onnx(g)
    onnx.checker.check_model(m, full_check=True)
    x = torch.randn(2, 5, 8)
    with torch.no_grad():
        ref = mha(x, x, x, attn_mask=mask, need_weights=False)[0].numpy()
    assert np.abs(run(m, x.numpy())[0] - ref).max() < 1e-5


def test_save_past_the_limit_uses_one_external_data_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import netsqueeze.backends.onnx as backend

    w = torch.randn(64, 32)
    g = Graph("fc")
    g.add_node("x", "input", attrs={"shape": (1, 32), "dtype": "float32"})
    g.add_node("fc", "linear", ["x"], params={"weight": w})
    g.add_node("y", "output", ["fc"])
    g.infer_shapes()
    m = to_onnx(g)
    before = m.SerializeToString()
    monkeypatch.setattr(backend, "TWO_GB", 1000)  # stand-in for 2 GB: the same code path, small files
    save_onnx(m, tmp_path / "big.onnx")
    assert sorted(f.name for f in tmp_path.iterdir()) == ["big.onnx", "big.onnx.data"]
    assert m.SerializeToString() == before
    x = torch.randn(3, 32)
    assert np.abs(run(tmp_path / "big.onnx", x.numpy())[0] - (x @ w.T).numpy()).max() < 1e-4
    assert torch.equal(from_onnx(tmp_path / "big.onnx").node("fc").params["weight"], w)


def _one_op(op: str, opset: int, **attrs: object) -> onnx.ModelProto:
    x = helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [2, 5])
    y = helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, [2, 5])
    return helper.make_model(helper.make_graph([helper.make_node(op, ["x"], ["y"], name="op", **attrs)], "g", [x], [y]),
                             opset_imports=[helper.make_opsetid("", opset)], ir_version=7)


def test_old_opaque_op_with_type_only_changes_is_re_emitted() -> None:
    m = _one_op("Cos", 9)  # Cos 7 is still current at 17
    out = to_onnx(from_onnx(m))
    v = np.random.rand(2, 5).astype(np.float32)
    assert np.abs(run(out, v)[0] - np.cos(v)).max() < 1e-6


def test_old_opaque_op_that_was_redefined_is_an_error() -> None:
    g = from_onnx(_one_op("Hardmax", 11, axis=1))  # Hardmax 13 changed its axis semantics
    with pytest.raises(UnsupportedOpError) as e:
        to_onnx(g)
    assert e.value.message == ("node 'op' (Hardmax) was imported at opset 11 and its definition changed by opset 17; "
                               "netsqueeze cannot re-emit it verbatim")


def test_fp16_export_imports_back_with_canonical_ops() -> None:
    g, _ = small_cnn()
    half = to_onnx(g, opset=21, precision="fp16", keep_io_fp32=False)  # 21: GroupNormalization, Gelu native
    back = from_onnx(half)
    assert {n.kind for n in back.nodes()} == {n.kind for n in g.nodes()}
    assert back.node("conv").params["weight"].dtype == torch.float16
    x = np.random.rand(1, 3, 8, 8).astype(np.float16)
    assert np.array_equal(run(to_onnx(back, opset=21), x)[0], run(half, x)[0])


def test_scalar_constants_stay_scalars() -> None:
    g = Graph("s")
    g.add_node("x", "input", attrs={"shape": (2, 3)})
    g.add_node("k", "constant", params={"value": torch.tensor(2.0)})
    g.add_node("m", "mul", ["x", "k"])
    g.add_node("out", "output", ["m"])
    g.infer_shapes()
    m = to_onnx(g)
    const = next(n for n in m.graph.node if n.op_type == "Constant") if not m.graph.initializer else None
    dims = [list(t.dims) for t in m.graph.initializer] if const is None else [list(const.attribute[0].t.dims)]
    assert dims == [[]]  # numpy's ascontiguousarray would have made it [1]
    x = np.ones((2, 3), np.float32)
    assert np.array_equal(run(m, x)[0], 2 * x)


class _Rolls(torch.nn.Module):
    """torch.roll as Swin's shifted windows use it (two spatial dims, negative shifts), one shift past the
    dim's size, one of zero: each an opaque aten node that emits as Slice + Concat."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        a = torch.roll(x, shifts=(-2, -2), dims=(1, 2))
        b = torch.roll(x, shifts=7, dims=3)  # 7 mod 5 = 2
        c = torch.roll(x, shifts=(0,), dims=(1,))
        return a * 2 + b - c


def test_roll_emits_to_onnx_and_runs_as_torch_does() -> None:
    import onnxruntime as ort

    from netsqueeze.frontends.fx import from_torch

    x = torch.randn(2, 6, 6, 5, generator=torch.Generator().manual_seed(0))
    g = from_torch(_Rolls(), (x,))
    assert sorted(n.origin.op_type for n in g.by_kind("opaque")) == ["aten::roll.default"] * 3
    m = to_onnx(g)
    assert [n.op_type for n in m.graph.node].count("Concat") == 3  # dims 1 and 2, then dim 3; the zero shift none
    sess = ort.InferenceSession(m.SerializeToString(), providers=["CPUExecutionProvider"])
    got = sess.run(None, {sess.get_inputs()[0].name: x.numpy()})[0]
    np.testing.assert_allclose(got, _Rolls()(x).numpy(), rtol=0, atol=1e-6)
