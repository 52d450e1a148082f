"""HAM / sHAM / CSR / dense storage: exact encode → decode, Huffman and size bounds, the compressed-domain dot
product, the compressed model file (round trip bit-identical, atomic, errors) and `compile(store=)`."""

from __future__ import annotations

import math
import os
import re
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import torch

import netsqueeze as ns
from netsqueeze.backends.ham_linear import CompressedLinear, dot_compressed
from netsqueeze.backends.storage import (
    StorageError,
    decode_model,
    decode_stream,
    decode_weight,
    encode_model,
    encode_stream,
    encode_weight,
    ham_size_bound,
    huffman_bound_bits,
    huffman_code,
    psi,
    seal,
    sham_size_bound,
    unsealed,
)
from netsqueeze.errors import FileError, NetsqueezeError
from netsqueeze.ir.graph import Graph
from netsqueeze.ir.printer import print_graph
from tests.passes.graphs import cnn
from tests.zoo import MLP

STORES = ("ham", "sham", "csr", "dense")


@pytest.fixture(autouse=True)
def _one_thread() -> Iterator[None]:
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def _gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _codebook_matrix(rows: int, cols: int, k: int, density: float, seed: int = 0) -> torch.Tensor:
    g = _gen(seed)
    table = torch.randn(k, generator=g)
    w = table[torch.randint(0, k, (rows, cols), generator=g)]
    w[torch.rand(rows, cols, generator=g) >= density] = 0
    return w


def _matrices() -> dict[str, torch.Tensor]:
    g = _gen(1)
    dense = torch.randn(17, 33, generator=g)
    sparse = dense.clone()
    sparse[torch.rand(17, 33, generator=g) < 0.9] = 0
    empty_rows = _codebook_matrix(40, 50, 6, 0.2, 2)
    empty_rows[::3] = 0
    signed_zero = torch.tensor([[0.0, -0.0, 1.5], [-0.0, 0.0, 0.0]])
    return {
        "dense": dense, "sparse": sparse, "codebook": _codebook_matrix(64, 96, 8, 0.05),
        "empty_rows": empty_rows, "all_zero": torch.zeros(5, 7), "identity": torch.eye(12),
        "one_value": torch.full((3, 4), 0.25), "signed_zero": signed_zero,
        "conv": _codebook_matrix(8 * 4, 9, 4, 0.3, 3).reshape(8, 4, 3, 3),
        "fp16": torch.randn(6, 10, generator=g).half(), "row": torch.randn(1, 9, generator=g),
    }


@pytest.mark.parametrize("store", STORES)
@pytest.mark.parametrize("name", list(_matrices()))
def test_encode_decode_is_bit_exact(store: str, name: str) -> None:
    w = _matrices()[name]
    data = encode_weight(w, store)  # type: ignore[arg-type]
    back = decode_weight(data, store, tuple(w.shape), w.dtype)  # type: ignore[arg-type]
    assert back.dtype == w.dtype and back.shape == w.shape
    assert torch.equal(back.view(-1).view(torch.int16 if w.element_size() == 2 else torch.int32),
                       w.reshape(-1).view(torch.int16 if w.element_size() == 2 else torch.int32))
    assert psi(w, store) == len(data) / (4 * w.numel())  # type: ignore[arg-type]


@pytest.mark.parametrize("probs", [[0.5, 0.5], [0.9, 0.05, 0.03, 0.02], [1.0], list(np.geomspace(1, 1e-4, 20))])
def test_huffman_stream_round_trip_and_entropy_bounds(probs: list[float]) -> None:
    p = np.array(probs) / np.sum(probs)
    sym = np.random.default_rng(0).choice(len(p), size=5000, p=p)
    code = huffman_code(sym, len(p))
    data, nbits = encode_stream(sym, code)
    assert len(data) * 8 == nbits + (-nbits) % 32  # whole 32-bit words
    assert np.array_equal(decode_stream(data, nbits, sym.size, code), sym)
    lo, hi = huffman_bound_bits(sym)
    assert lo - 1e-6 <= nbits <= max(hi, sym.size)  # one symbol: 1 bit each


def test_size_formulas_bound_the_bytes_written() -> None:
    for seed, (rows, cols, k, density) in enumerate([(64, 96, 8, 0.05), (128, 256, 32, 0.01), (50, 50, 2, 0.5),
                                                     (300, 40, 64, 0.2)]):
        w = _codebook_matrix(rows, cols, k, density, seed)
        distinct = int(torch.unique(w).numel())
        nnz = int((w != 0).sum())
        assert len(encode_weight(w, "ham")) <= ham_size_bound(rows, cols, distinct)
        assert len(encode_weight(w, "sham")) <= sham_size_bound(rows, cols, nnz, distinct - 1)
    # the paper's regime: 99% zeros and a small codebook give ψ well under 0.01
    w = _codebook_matrix(512, 1024, 16, 0.01, 9)
    assert psi(w, "sham") < 0.01
    assert psi(w, "sham") < psi(w, "ham") < 1.0 / 8


def test_corrupt_data_is_a_clear_error() -> None:
    w = _codebook_matrix(10, 12, 4, 0.5)
    data = encode_weight(w, "sham")
    with pytest.raises(StorageError, match="weight is truncated"):
        decode_weight(data[:-6], "sham", (10, 12), torch.float32)
    with pytest.raises(StorageError, match=r"stored as a 10x12 matrix, which does not hold shape \[12, 10\]"):
        decode_weight(data, "sham", (12, 10), torch.float32)
    with pytest.raises(StorageError, match="8 bytes left over after the ham data"):
        decode_weight(encode_weight(w, "ham") + bytes(8), "ham", (10, 12), torch.float32)
    with pytest.raises(StorageError, match="unknown store 'zip'"):
        encode_weight(w, "zip")  # type: ignore[arg-type]


@pytest.mark.parametrize("store", ["ham", "sham"])
def test_compressed_dot_product_equals_the_dense_one(store: str) -> None:
    for w in (_codebook_matrix(48, 80, 8, 0.1, 4), torch.randn(20, 30, generator=_gen(5)), torch.zeros(4, 6)):
        x = torch.randn(2, 3, w.shape[1], generator=_gen(6))
        y = dot_compressed(x, encode_weight(w, store), store)  # type: ignore[arg-type]
        assert y.shape == (2, 3, w.shape[0])
        assert torch.allclose(y, x @ w.T, rtol=1e-5, atol=1e-5)
    layer = CompressedLinear(encode_weight(w, store), store, 6, 4, torch.ones(4))  # type: ignore[arg-type]
    assert torch.equal(layer(torch.randn(3, 6)), torch.ones(3, 4))


def _compiled() -> tuple[ns.CompileResult, torch.Tensor]:
    torch.manual_seed(0)
    model = MLP().eval()
    x = torch.randn(8, 20)
    res = ns.compile(model, "policy p { prune on type(linear) { sparsity = 80% }\n"
                            "share_weights on type(linear) { method = cws, k = 8 } }", example_inputs=(x,))
    return res, x


@pytest.mark.parametrize("store", STORES)
def test_saved_model_loads_bit_identical(store: str, tmp_path: Path) -> None:
    res, x = _compiled()
    path = tmp_path / "m.nsq"
    figures = ns.save(res.graph, path, store=store)  # type: ignore[arg-type]
    assert os.path.getsize(path) > sum(f["bytes"] for f in figures.values())
    assert [p.name for p in tmp_path.iterdir()] == ["m.nsq"]  # no temporary file left
    loaded = ns.load(path)
    with torch.no_grad():
        assert torch.equal(loaded(x), res.model(x))
    if store in ("ham", "sham"):
        fast = ns.load(path, compressed=True)
        assert isinstance(fast.get_submodule("fc1"), CompressedLinear)
        with torch.no_grad():
            assert torch.allclose(fast(x), res.model(x), rtol=1e-5, atol=1e-6)
    # the graph itself round-trips: every param decoded equals the compiled graph's, bit for bit
    g, header = decode_model(path.read_bytes())
    assert header["store"] == store
    for node in res.graph.nodes():
        for k, w in node.params.items():
            assert torch.equal(g.node(node.id).params[k], w if isinstance(w, torch.Tensor) else w.dense())


def test_conv_graph_round_trip_and_psi_figures(tmp_path: Path) -> None:
    g = cnn()
    data, figures = encode_model(g, "ham")
    back, _ = decode_model(data)
    for node in g.nodes():
        for k, w in node.params.items():
            assert torch.equal(back.node(node.id).params[k], w)
    assert figures["conv1/weight"]["fp32_bytes"] == 8 * 3 * 3 * 3 * 4
    assert figures["conv1/bias"]["bytes"] == len(encode_weight(g.node("conv1").params["bias"], "dense"))


def test_save_and_load_errors(tmp_path: Path) -> None:
    res, _ = _compiled()
    path = tmp_path / "m.nsq"
    path.write_bytes(b"old")
    g = res.graph.copy()
    g.node("fc1").kind = "opaque"
    with pytest.raises(NetsqueezeError, match="node 'fc1' is opaque"):
        ns.save(g, path)
    assert path.read_bytes() == b"old"  # a failed save leaves the old file
    with pytest.raises(FileError, match="is not a netsqueeze compressed model"):
        ns.load(path)
    with pytest.raises(FileError, match="does not exist"):
        ns.load(tmp_path / "none.nsq")
    with pytest.raises(NetsqueezeError, match="unknown store 'zip'"):
        ns.save(res.graph, path, store="zip")  # type: ignore[arg-type]
    ns.save(res.graph, path)
    damaged = "is corrupt: its checksum does not match its bytes (damaged or truncated after it was written)"
    with pytest.raises(FileError, match=re.escape(damaged)):
        decode_model(path.read_bytes()[:-10])


def test_a_file_damaged_after_it_was_written_is_refused_and_version_1_files_still_load(tmp_path: Path) -> None:
    """One flipped bit in a dense file's weights loaded silently, 0.0127 off (the format had no checksum)."""
    import struct

    res, _ = _compiled()
    for store in ("dense", "csr", "ham", "sham"):
        data, _ = encode_model(res.graph, store)  # type: ignore[arg-type]
        for at in (len(data) - 14, len(data) // 2, 12):
            bad = bytearray(data)
            bad[at] ^= 0x40
            with pytest.raises(FileError, match=re.escape("model file is corrupt: its checksum does not match")):
                decode_model(bytes(bad))
        v1 = data[:4] + struct.pack("<H", 1) + data[6:-4]  # written before the checksum: none to check
        assert print_graph(decode_model(v1)[0], values=True) == print_graph(decode_model(data)[0], values=True)


def test_compile_store_option_measures_psi(tmp_path: Path) -> None:
    torch.manual_seed(0)
    model = MLP().eval()
    x = torch.randn(8, 20)
    res = ns.compile(model, "policy p { prune on type(linear) { sparsity = 90% }\n"
                            "share_weights on type(linear) { method = uq, k = 4 } }", example_inputs=(x,),
                     store="sham")
    assert res.stored is not None
    fp32 = sum(4 * w.numel() for n in res.graph.nodes() for w in n.params.values())
    assert res.report.storage["psi"] == pytest.approx(res.report.storage["weight_bytes"] / fp32)
    assert res.report.storage["psi"] < 0.25
    path = tmp_path / "c.nsq"
    res.save(path)
    assert path.read_bytes() == res.stored
    with torch.no_grad():
        assert torch.equal(ns.load(path)(x), res.model(x))
    with pytest.raises(NetsqueezeError, match="unknown store 'huffman'"):
        ns.compile(model, [], example_inputs=(x,), store="huffman")  # type: ignore[arg-type]
    assert math.isfinite(res.report.storage["psi"])
    assert isinstance(res.graph, Graph)


def test_code_lengths_are_optimal() -> None:
    from netsqueeze.backends.storage import code_lengths
    from netsqueeze.ir.weights import huffman_lengths

    rng = np.random.default_rng(0)
    for _ in range(40):
        c = rng.integers(1, 100, size=int(rng.integers(2, 40)))
        got = code_lengths(c)
        ref = huffman_lengths({i: int(x) for i, x in enumerate(c)})
        assert int((got * c).sum()) == sum(ref[i] * int(x) for i, x in enumerate(c))  # same total bits
        assert sum(2.0 ** -got) == pytest.approx(1.0)  # a complete prefix code


def _rebuilt(data: bytes, edit: object) -> bytes:
    """`data` (a model file) with its JSON header replaced by what `edit` makes of it."""
    import json
    import struct

    data = unsealed(data)
    version, hlen = struct.unpack("<HI", data[4:10])
    header = json.loads(data[10:10 + hlen])
    raw = json.dumps(edit(header)).encode()  # type: ignore[operator]
    return seal(data[:4] + struct.pack("<HI", version, len(raw)) + raw + data[10 + hlen:])


def test_a_corrupt_header_or_symbol_count_is_a_clear_error_not_a_crash(tmp_path: Path) -> None:
    res, _ = _compiled()
    data, _ = encode_model(res.graph, "ham")

    def entry(key: str, value: object) -> object:
        def edit(h: dict) -> dict:  # type: ignore[type-arg]
            h["weights"][0][key] = value
            return h
        return edit

    cases = [
        (lambda h: [1, 2], "has a corrupt header: it needs a 'graph' text and a 'weights' list"),
        (lambda h: {k: v for k, v in h.items() if k != "graph"}, "it needs a 'graph' text and a 'weights' list"),
        (entry("dtype", "complex64"), "has a corrupt header: weight entry 0 has no valid dtype"),
        (entry("shape", None), "has a corrupt header: weight entry 0 has no valid shape"),
        (entry("offset", -5), "has a corrupt header: weight entry 0 has no valid shape, offset or length"),
    ]
    for edit, message in cases:
        with pytest.raises(FileError, match=re.escape(message)):
            decode_model(_rebuilt(data, edit))
    # a symbol count past the stream's bits: every code takes a bit (it made the decoder allocate without end)
    import json
    import struct

    hlen = struct.unpack("<HI", data[4:10])[1]
    header = json.loads(data[10:10 + hlen])
    e = next(e for e in header["weights"] if e["store"] == "ham")
    at = 10 + hlen + e["offset"] + struct.calcsize("<IIB") + struct.calcsize("<IQ")
    bad = seal(unsealed(data)[:at] + struct.pack("<Q", 1 << 40) + unsealed(data)[at + 8:])  # a valid checksum
    with pytest.raises(NetsqueezeError, match=r"corrupt Huffman stream: 1099511627776 symbols in \d+ bits"):
        decode_model(bad)


@pytest.mark.parametrize("dtype", [torch.float16, torch.float64])
def test_compressed_load_keeps_other_dtypes_decoded(dtype: torch.dtype, tmp_path: Path) -> None:
    # the compressed-domain product reads float32 tables: it read fp16/fp64 streams as corrupt
    m = MLP().to(dtype).eval()
    x = torch.randn(4, 20, dtype=dtype)
    res = ns.compile(m, "policy p { fold_bn }", example_inputs=(x,))
    ns.save(res.graph, tmp_path / "m.nsq", store="ham")
    with torch.no_grad():
        assert torch.equal(ns.load(tmp_path / "m.nsq", compressed=True)(x), res.model(x))
