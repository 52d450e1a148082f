"""Encoded weights: decode, exact sizes, channel selection, and round trips through both backends."""

from __future__ import annotations

import io
import math

import numpy as np
import onnx
import pytest
import torch

from netsqueeze.backends.onnx import to_onnx
from netsqueeze.backends.torch import to_torch
from netsqueeze.frontends.onnx import from_onnx
from netsqueeze.ir.graph import Graph
from netsqueeze.ir.stats import graph_stats
from netsqueeze.ir.weights import (
    Affine,
    Centroids,
    Codebook,
    Encoded,
    Sparse,
    WeightFormError,
    huffman_lengths,
    pack_bits,
    unpack_bits,
)
from tests.frontends.onnx_models import run

torch.manual_seed(0)
W = torch.randn(6, 8, 3, 3)

AFFINE_CASES = {
    "int8 per-tensor": dict(),
    "int8 per-axis": dict(axis=0),
    "int8 per-axis asym": dict(axis=0, symmetric=False),
    "uint8 asym": dict(signed=False, symmetric=False),
    "int4 per-axis": dict(bits=4, axis=0),
    "uint4 per-axis asym": dict(bits=4, signed=False, axis=0, symmetric=False),
    "int4 block 4 on axis 1": dict(bits=4, axis=1, block_size=4),
    "int8 block 3 on axis 1 asym": dict(axis=1, block_size=3, symmetric=False),
}


def test_pack_bits_round_trip_and_size() -> None:
    for bits in (1, 3, 4, 5, 8):
        v = torch.randint(0, 2**bits, (37,))
        p = pack_bits(v, bits)
        assert p.dtype == torch.uint8 and p.numel() == math.ceil(37 * bits / 8)
        assert torch.equal(unpack_bits(p, bits, 37), v)
    assert pack_bits(torch.tensor([1, 2]), 4).tolist() == [0x21]  # low nibble first, as ONNX packs int4


@pytest.mark.parametrize("case", list(AFFINE_CASES))
def test_affine_decode_bytes_select(case: str) -> None:
    kw = AFFINE_CASES[case]
    a = Affine.quantize(W, **kw)  # type: ignore[arg-type]
    d = a.dense()
    bits, block = int(kw.get("bits", 8)), int(kw.get("block_size", 0))
    lo, hi = (-(2 ** (bits - 1)), 2 ** (bits - 1) - 1) if kw.get("signed", True) else (0, 2**bits - 1)
    assert int(a.q.min()) >= lo and int(a.q.max()) <= hi
    # round to nearest: within half a step of the original everywhere
    step = a.scale if a.axis is None else (a.scale.reshape(-1, 1, 1, 1) if not block else
                                           a.scale.repeat_interleave(block, 1)[:, :8])
    assert bool(((d - W).abs() <= step / 2 + 1e-6).all())
    n_scale = a.scale.numel()
    data = math.ceil(W.numel() * bits / 8)
    zp = 0 if a.zero_point is None else math.ceil(n_scale * bits / 8)
    assert a.nbytes() == data + 4 * n_scale + zp
    assert a.nnz() == int(torch.count_nonzero(d))
    assert torch.equal(a.index_select(0, torch.tensor([0, 2, 5])).dense(), d[[0, 2, 5]])
    keep = torch.arange(block, 2 * block) if block else torch.tensor([1, 3, 4])
    assert torch.equal(a.index_select(1, keep).dense(), d[:, keep])
    assert torch.equal(a.permute((1, 0, 2, 3)).dense(), d.permute(1, 0, 2, 3))
    assert torch.equal(Affine.decode(a.storage(), a.static()), d)


def test_affine_block_partial_selection_is_an_error() -> None:
    a = Affine.quantize(W, bits=4, axis=1, block_size=4)
    with pytest.raises(WeightFormError) as e:
        a.index_select(1, torch.tensor([0, 1]))
    assert e.value.message == ("cannot drop part of a quantization block: axis 1 is quantized in blocks of 4; "
                               "keep whole blocks or quantize after removing channels")


def test_affine_rejects_out_of_range_data_and_bad_scale() -> None:
    with pytest.raises(WeightFormError, match=r"int4 data out of range \[-8, 7\]"):
        Affine(torch.tensor([9]), torch.tensor(1.0), bits=4)
    with pytest.raises(WeightFormError, match=r"scale of shape \[3\] does not fit"):
        Affine(torch.zeros(2, 2, dtype=torch.int8), torch.ones(3), axis=0)


def _sparse_w() -> torch.Tensor:
    w = torch.randn(4, 8)
    keep = torch.zeros(4, 2, 4, dtype=torch.bool)
    keep[:, 0, [0, 3]] = True
    keep[:, 1, [1]] = True
    return w * keep.reshape(4, 8)


@pytest.mark.parametrize("layout,expected", [("coo", 12 * 4 + 12 * 2), ("csr", 12 * 4 + 12 * 2 + 5 * 2),
                                             ("nm", 16 * 4 + 4)])
def test_sparse_forms(layout: str, expected: int) -> None:
    w = _sparse_w()
    s = Sparse.from_dense(w, layout, 2, 4) if layout == "nm" else Sparse.from_dense(w, layout)
    assert torch.equal(s.dense(), w)
    assert s.nnz() == 12
    assert s.nbytes() == expected
    assert torch.equal(s.index_select(0, torch.tensor([1, 3])).dense(), w[[1, 3]])
    assert torch.equal(Sparse.decode(s.storage(), s.static()), w)


def test_nm_rejects_a_dense_group() -> None:
    with pytest.raises(WeightFormError, match="the weight is not 2:4 sparse"):
        Sparse.from_dense(torch.ones(2, 4), "nm", 2, 4)


def test_codebook_shared_table_and_huffman_size() -> None:
    c = Centroids(torch.tensor([-1.0, 0.0, 0.5, 2.0]), "shared")
    idx = torch.tensor([[0, 1, 1, 1], [1, 1, 2, 3]])
    cb = Codebook(idx, c)
    assert torch.equal(cb.dense(), c.values[idx])
    assert cb.nbytes() == 1 * 2 + 16  # 8 indices × 2 bits = 2 bytes, + 4 float centroids
    # counts {1: 5, 0: 1, 2: 1, 3: 1} → lengths 1, 3, 3, 2 (or 2, 3, 3 permuted): 5 + 3 + 3 + 2 = 13 bits
    lengths = huffman_lengths({0: 1, 1: 5, 2: 1, 3: 1})
    assert lengths[1] == 1 and sorted(lengths.values()) == [1, 2, 3, 3]
    hc = Codebook(idx, c, huffman=True)
    assert hc.nbytes() == math.ceil(13 / 8) + 4 + 16  # payload + code-length table + centroids
    g = Graph("shared")
    g.add_node("x", "input", attrs={"shape": (1, 4), "dtype": "float32"})
    g.add_node("a", "linear", ["x"], params={"weight": Codebook(idx, c)})
    g.add_node("b", "linear", ["a"], params={"weight": Codebook(idx[:, [0, 1]].t().contiguous(), c)})
    g.add_node("out", "output", ["b"])
    g.infer_shapes()
    st = graph_stats(g)
    assert st.nodes["a"].param_bytes == 18 and st.nodes["b"].param_bytes == 17
    assert st.param_bytes == 18 + 17 - 16  # the shared table once
    assert st.nodes["a"].forms == "weight: codebook k=4"


def _encoded_graph(ws: dict[str, Encoded | torch.Tensor]) -> Graph:
    g = Graph("enc")
    g.add_node("x", "input", attrs={"shape": (2, 8, 6, 6), "dtype": "float32"})
    g.add_node("conv", "conv", ["x"], attrs={"stride": [1, 1], "padding": [1, 1, 1, 1], "dilation": [1, 1],
                                             "groups": 1}, params={"weight": ws["conv"], "bias": ws["bias"]})
    g.add_node("relu", "relu", ["conv"])
    g.add_node("pool", "adaptive_avg_pool", ["relu"], attrs={"output_size": [1, 1]})
    g.add_node("flat", "flatten", ["pool"], attrs={"start_dim": 1, "end_dim": -1})
    g.add_node("fc", "linear", ["flat"], params={"weight": ws["fc"]})
    g.add_node("k", "constant", params={"value": ws["k"]})
    g.add_node("mm", "matmul", ["fc", "k"])
    g.add_node("out", "output", ["mm"])
    g.infer_shapes()
    g.verify()
    return g


def _forms() -> dict[str, dict[str, Encoded | torch.Tensor]]:
    conv_w, fc_w, k = torch.randn(6, 8, 3, 3) * 0.3, torch.randn(4, 6), torch.randn(4, 3)
    sparse_fc = fc_w * (fc_w.abs() > 0.7)
    nm = torch.randn(4, 8)
    nm[:, [1, 2, 5, 7]] = 0
    c = Centroids(torch.tensor([-0.5, -0.1, 0.1, 0.5]))
    return {
        "affine": {"conv": Affine.quantize(conv_w, axis=0), "bias": Affine.quantize(torch.randn(6), bits=32, axis=0),
                   "fc": Affine.quantize(fc_w, bits=4, axis=1, block_size=2, symmetric=False),
                   "k": Affine.quantize(k, signed=False, symmetric=False)},
        "sparse": {"conv": Sparse.from_dense(conv_w * (conv_w.abs() > 0.3)), "bias": torch.randn(6),
                   "fc": Sparse.from_dense(sparse_fc, "csr"), "k": Sparse.from_dense(nm.t().contiguous().t()[:, :4]
                                                                                    .contiguous(), "nm", 2, 4)},
        "codebook": {"conv": Codebook(torch.randint(0, 4, (6, 8, 3, 3)), c), "bias": torch.randn(6),
                     "fc": Codebook(torch.randint(0, 4, (4, 6)), c), "k": Codebook(torch.randint(0, 4, (4, 3)), c)},
    }


def _dense_of(g: Graph) -> Graph:
    d = g.copy()
    for n in d.nodes():
        for k, v in list(n.params.items()):
            if isinstance(v, Encoded):
                n.params[k] = v.dense()
    return d


@pytest.mark.parametrize("form", ["affine", "sparse", "codebook"])
def test_round_trip_through_both_backends(form: str) -> None:
    ws = _forms()[form]
    if form == "sparse":  # an N:M constant needs rows of a multiple of M: a [4, 4] 2:4 matrix
        ws["k"] = Sparse.from_dense(torch.tensor([[1.0, 0, 2, 0], [0, 3, 0, 4], [5, 6, 0, 0], [0, 0, 7, 8]]), "nm", 2, 4)
        ws["fc"] = Sparse.from_dense(torch.randn(4, 6) * (torch.rand(4, 6) > 0.5), "csr")
    g = _encoded_graph(ws)
    x = torch.randn(2, 8, 6, 6)
    ref = to_torch(_dense_of(g))(x).detach()
    tm = to_torch(g)
    assert torch.equal(tm(x).detach(), ref)
    # the state_dict holds the encoded buffers, not a dense copy of the weight
    sd = tm.state_dict()
    assert not any(k.endswith("inner.weight") for k in sd)
    buf = io.BytesIO()
    torch.save(sd, buf)
    assert sum(v.numel() * v.element_size() for v in sd.values()) < sum(
        v.numel() * v.element_size() for v in to_torch(_dense_of(g)).state_dict().values())
    m = to_onnx(g)
    # a sparse_initializer is a sparse tensor to ONNX's type check (ONNX Runtime densifies it at load)
    onnx.checker.check_model(m, full_check=form != "sparse")
    (y,) = run(m, x.numpy())
    assert np.abs(y - ref.numpy()).max() < 1e-5
    if form == "sparse":
        assert len(m.graph.sparse_initializer) == 3
        dense = to_onnx(g, sparse="dense")
        onnx.checker.check_model(dense, full_check=True)
        assert not dense.graph.sparse_initializer
        assert np.abs(run(dense, x.numpy())[0] - ref.numpy()).max() < 1e-5
    back = from_onnx(m)
    for nid in ("conv", "fc"):
        src, dst = g.node(nid).params["weight"], back.node(nid).params["weight"]
        assert type(dst) is type(src)
        assert torch.equal(dst.dense(), src.dense())  # type: ignore[union-attr]
    assert graph_stats(back).param_bytes == graph_stats(g).param_bytes


def test_torch_decode_modules_follow_half() -> None:
    g = _encoded_graph(_forms()["affine"])
    x = torch.randn(2, 8, 6, 6)
    ref = to_torch(_dense_of(g))(x).detach()
    half = to_torch(g).half()
    with torch.no_grad():
        y = half(x.half())
    assert y.dtype == torch.float16
    assert float((y.float() - ref).abs().max()) <= 2e-2 * float(ref.abs().max())
