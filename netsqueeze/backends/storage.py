"""Compressed weight storage: HAM and sHAM (Huffman-coded matrices, Marinò et al., ICPR 2020), CSR and dense
encodings of single weights, and the netsqueeze compressed model file (graph + weights container).

Everything here is exact: `decode(encode(w))` gives `w` bit for bit, and a weight's size is the length of
the bytes written (headers and decoding tables included), so ψ = bytes / fp32 bytes is measured, not
estimated. Encoding and decoding are vectorised numpy (no per-symbol Python loop):

- a canonical Huffman code is written by setting, for every code bit position j, bit j of every symbol
  whose code is longer than j;
- decoding finds, for every bit position p of the stream, the code that would start there (canonical
  codes of length l are the integers [first_l, first_l + count_l), so l passes over the stream suffice),
  then the positions where codes actually start are the orbit of 0 under p → p + length(p), found by
  pointer doubling (log2(symbols) gathers). numba is not available here; this keeps the work in numpy
  kernels at O(bits · (max code length + log symbols)).

Formats of one weight, viewed as a matrix [shape[0], -1] (a linear weight [out, in]: row j is output j):

- `ham`: every entry (zeros included) is a symbol of the weight's distinct values; the symbols, row by row,
  are Huffman coded and the bit stream is packed into B-bit words (B = 32, the last word zero-padded).
  Stored: header, the table (distinct values as raw bits, one code length byte each), the words.
- `sham`: per row (the paper's CSC of the [in, out] matrix: one column per output) only the non-zeros:
  their symbols Huffman coded as in HAM; their column indices as Huffman-coded gaps (index minus the
  previous non-zero's index in the row, minus one); the row bounds as Huffman-coded per-row counts.
  Each of the three streams has its own table and words.
- `csr`: values (raw), column indices and row pointers in the smallest unsigned type that holds them.
- `dense`: the raw values.
"""

from __future__ import annotations

import io
import json
import math
import struct
import zlib
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Literal

import numpy as np
import torch

from netsqueeze.errors import Diagnostic, FileError, NetsqueezeError
from netsqueeze.ir.graph import Graph
from netsqueeze.ir.weights import dense as dense_of

Store = Literal["ham", "sham", "csr", "dense"]
STORES: tuple[str, ...] = ("ham", "sham", "csr", "dense")
WORD_BITS = 32  # B: the payload is packed in B-bit words
MAGIC = b"NSQZ"
VERSION = 2  # 2: a CRC-32 of the whole file closes it (1: none)
_DTYPES = {"float32": (torch.float32, np.float32), "float16": (torch.float16, np.float16),
           "float64": (torch.float64, np.float64), "bfloat16": (torch.bfloat16, np.uint16),
           "int64": (torch.int64, np.int64), "int32": (torch.int32, np.int32), "int16": (torch.int16, np.int16),
           "int8": (torch.int8, np.int8), "uint8": (torch.uint8, np.uint8), "bool": (torch.bool, np.bool_)}
_RAW = {1: np.uint8, 2: np.uint16, 4: np.uint32, 8: np.uint64}  # value bit patterns by item size


class StorageError(NetsqueezeError):
    """A weight or a model file that cannot be encoded or decoded (wrong format, truncated, corrupt)."""


def _fail(msg: str) -> StorageError:
    return StorageError(Diagnostic(msg))


# ---- canonical Huffman streams ---------------------------------------------------------------------------
@dataclass(frozen=True)
class Code:
    """A canonical Huffman code over symbols 0..n-1 (lengths[s] = 0: symbol unused)."""

    lengths: np.ndarray  # uint8 [n]

    def canonical(self) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        """(codes per symbol, symbols in code order, first code per length, count per length)."""
        lens = self.lengths.astype(np.int64)
        maxl = int(lens.max()) if lens.size else 0
        order = np.lexsort((np.arange(lens.size), lens))
        order = order[lens[order] > 0]
        count = np.bincount(lens[order], minlength=maxl + 1).astype(np.int64)
        first = np.zeros(maxl + 2, dtype=np.int64)
        code = 0
        for ln in range(1, maxl + 1):
            code = (code + count[ln - 1]) << 1 if ln > 1 else 0
            first[ln] = code
        codes = np.zeros(lens.size, dtype=np.int64)
        # within a length, codes count up in symbol order
        rank = np.zeros(lens.size, dtype=np.int64)
        for ln in range(1, maxl + 1):
            syms = order[lens[order] == ln]
            rank[syms] = np.arange(syms.size)
            codes[syms] = first[ln] + rank[syms]
        return codes, order, first, count


def code_lengths(counts: np.ndarray) -> np.ndarray:
    """Huffman code lengths for positive counts (one symbol: length 1), by the two-queue method on the
    sorted counts (O(n) after the sort; ties merge leaves first)."""
    n = counts.size
    if n == 1:
        return np.ones(1, dtype=np.int64)
    order = np.argsort(counts, kind="stable")
    leaf = counts[order].tolist()
    inner: list[int] = []
    parent = [0] * (2 * n - 1)  # nodes: leaves 0..n-1 in sorted order, then merges n..2n-2
    i = j = 0
    for t in range(n - 1):
        pair = []
        for _ in range(2):
            if i < n and (j >= t or leaf[i] <= inner[j]):
                pair.append((leaf[i], i))
                i += 1
            else:
                pair.append((inner[j], n + j))
                j += 1
        inner.append(pair[0][0] + pair[1][0])
        parent[pair[0][1]] = parent[pair[1][1]] = n + t
    depth = [0] * (2 * n - 1)
    for node in range(2 * n - 3, -1, -1):  # parents come after their children
        depth[node] = depth[parent[node]] + 1
    out = np.empty(n, dtype=np.int64)
    out[order] = depth[:n]
    return out


def huffman_code(symbols: np.ndarray, n: int) -> Code:
    """The Huffman code (canonical form) of a symbol sequence over 0..n-1."""
    counts = np.bincount(symbols, minlength=n)
    lengths = np.zeros(n, dtype=np.uint8)
    used = np.flatnonzero(counts)
    if used.size:
        ln = code_lengths(counts[used])
        if int(ln.max()) > 57:
            raise _fail(f"a Huffman code of {int(ln.max())} bits is longer than the decoder's 57-bit window")
        lengths[used] = ln
    return Code(lengths)


def encode_stream(symbols: np.ndarray, code: Code) -> tuple[bytes, int]:
    """The symbols' codes concatenated MSB first and packed into B-bit words: (bytes, bit count)."""
    codes, _, _, _ = code.canonical()
    lens = code.lengths.astype(np.int64)[symbols]
    vals = codes[symbols]
    nbits = int(lens.sum())
    start = np.cumsum(lens) - lens
    bits = np.zeros(nbits + (-nbits) % WORD_BITS, dtype=np.uint8)
    for j in range(int(lens.max()) if lens.size else 0):
        m = lens > j
        bits[start[m] + j] = (vals[m] >> (lens[m] - 1 - j)) & 1
    return np.packbits(bits).tobytes(), nbits


def decode_stream(data: bytes, nbits: int, nsym: int, code: Code) -> np.ndarray:
    """The first `nsym` symbols of a stream written by `encode_stream` (vectorised: see the module doc)."""
    if nsym == 0:
        return np.zeros(0, dtype=np.int64)
    _, order, first, count = code.canonical()
    maxl = int(code.lengths.max())
    bits = np.unpackbits(np.frombuffer(data, dtype=np.uint8))[:nbits].astype(np.int64)
    bits = np.concatenate([bits, np.zeros(maxl, dtype=np.int64)])
    v = np.zeros(nbits, dtype=np.int64)
    sym = np.full(nbits, -1, dtype=np.int64)
    length = np.zeros(nbits, dtype=np.int64)
    index = 0
    for ln in range(1, maxl + 1):
        v = (v << 1) | bits[ln - 1:ln - 1 + nbits]
        if count[ln]:
            hit = (length == 0) & (v >= first[ln]) & (v < first[ln] + count[ln])
            sym[hit] = order[index + v[hit] - first[ln]]
            length[hit] = ln
        index += int(count[ln])
    # code starts: the orbit of 0 under p -> p + length(p), by pointer doubling
    jump = np.append(np.arange(nbits) + np.maximum(length, 1), nbits).clip(max=nbits)
    pos = np.zeros(1, dtype=np.int64)
    while pos.size < nsym:
        pos = np.concatenate([pos, jump[pos]])
        jump = jump[jump]
    pos = pos[:nsym]
    if pos[-1] >= nbits or (sym[pos] < 0).any():
        raise _fail("corrupt Huffman stream: it ends before its last symbol or holds an invalid code")
    return sym[pos]


class _Writer:
    def __init__(self) -> None:
        self.buf = io.BytesIO()

    def u(self, fmt: str, *v: int) -> None:
        self.buf.write(struct.pack("<" + fmt, *v))

    def raw(self, b: bytes) -> None:
        self.buf.write(b)

    def stream(self, symbols: np.ndarray, table: np.ndarray, sym_bytes: int) -> None:
        """A coded stream: symbol table (values as `sym_bytes`-byte raw bits), code lengths, bit count, words."""
        code = huffman_code(symbols, table.size)
        data, nbits = encode_stream(symbols, code)
        self.u("IQQ", table.size, nbits, symbols.size)
        self.raw(table.astype(_RAW[sym_bytes]).tobytes())
        self.raw(code.lengths.tobytes())
        self.raw(data)


class _Reader:
    def __init__(self, data: bytes, what: str) -> None:
        self.data, self.pos, self.what = data, 0, what

    def take(self, n: int) -> bytes:
        if self.pos + n > len(self.data):
            raise _fail(f"{self.what} is truncated ({len(self.data)} bytes, needs more than {self.pos + n})")
        out = self.data[self.pos:self.pos + n]
        self.pos += n
        return out

    def u(self, fmt: str) -> tuple[int, ...]:
        return struct.unpack("<" + fmt, self.take(struct.calcsize("<" + fmt)))

    def stream(self, sym_bytes: int) -> tuple[np.ndarray, np.ndarray]:
        """(table, decoded symbols) of a stream written by `_Writer.stream`."""
        k, nbits, nsym = self.u("IQQ")
        if nsym > nbits:  # every code is at least one bit long
            raise _fail(f"{self.what}: corrupt Huffman stream: {nsym} symbols in {nbits} bits")
        table = np.frombuffer(self.take(k * sym_bytes), dtype=_RAW[sym_bytes])
        lengths = np.frombuffer(self.take(k), dtype=np.uint8)
        words = self.take((nbits + (-nbits) % WORD_BITS) // 8)
        return table, decode_stream(words, nbits, nsym, Code(lengths.copy()))


# ---- one weight ------------------------------------------------------------------------------------------
def _matrix(t: torch.Tensor) -> np.ndarray:
    """The weight as a [shape[0], -1] matrix of raw value bits (exact: equal floats are equal bits)."""
    a = t.detach().contiguous().cpu()
    if a.dtype == torch.bfloat16:
        a = a.view(torch.int16)
    arr = a.numpy()
    rows = arr.shape[0] if arr.ndim else 1
    return arr.reshape(rows, -1).view(_RAW[arr.itemsize])


def encode_weight(w: torch.Tensor, store: Store) -> bytes:
    """The bytes of one weight in `store` format (decoded by `decode_weight` with its shape and dtype)."""
    if store not in STORES:
        raise _fail(f"unknown store '{store}' (use {', '.join(STORES)})")
    m = _matrix(w)
    sz = m.itemsize
    out = _Writer()
    rows, cols = m.shape
    out.u("IIB", rows, cols, WORD_BITS)
    if store == "dense":
        out.raw(m.tobytes())
    elif store == "ham":
        table, sym = np.unique(m.reshape(-1), return_inverse=True)
        out.stream(sym.reshape(-1), table, sz)
    else:
        nz = m != 0  # all-zero bits: +0.0 (a -0.0 is kept as a value, so decoding is bit-exact)
        r, c = np.nonzero(nz)  # row-major: by row, then column
        counts = np.bincount(r, minlength=rows)
        vals = m[r, c]
        if store == "csr":
            cdt = _uint_for(cols)
            pdt = _uint_for(int(counts.sum()))
            out.u("Q", int(counts.sum()))
            out.raw(vals.tobytes())
            out.raw(c.astype(cdt).tobytes())
            out.raw(np.concatenate([[0], np.cumsum(counts)]).astype(pdt).tobytes())
        else:
            table, sym = np.unique(vals, return_inverse=True)
            out.stream(sym.reshape(-1), table, sz)
            starts = np.concatenate([[0], np.cumsum(counts)[:-1]])
            prev = np.full(c.size, -1, dtype=np.int64)
            if c.size:
                prev[1:] = c[:-1]
                prev[starts[counts > 0]] = -1
            gaps = c - prev - 1
            gtab, gsym = np.unique(gaps, return_inverse=True)
            out.stream(gsym.reshape(-1), gtab, 4)
            ctab, csym = np.unique(counts, return_inverse=True)
            out.stream(csym.reshape(-1), ctab, 4)
    return out.buf.getvalue()


def _uint_for(limit: int) -> type[np.unsignedinteger]:
    for dt in (np.uint8, np.uint16, np.uint32):
        if limit <= np.iinfo(dt).max:
            return dt
    return np.uint64


def decode_weight(data: bytes, store: Store, shape: tuple[int, ...], dtype: torch.dtype,
                  what: str = "weight") -> torch.Tensor:
    """The tensor `encode_weight` wrote, exactly."""
    if store not in STORES:
        raise _fail(f"{what}: unknown store '{store}' (use {', '.join(STORES)})")
    rd = _Reader(data, what)
    rows, cols, _ = rd.u("IIB")
    if rows * cols != math.prod(shape) or (shape and rows != shape[0]):
        raise _fail(f"{what}: stored as a {rows}x{cols} matrix, which does not hold shape {list(shape)}")
    np_dt = _DTYPES[str(dtype).removeprefix("torch.")][1]
    sz = np.dtype(np_dt).itemsize
    raw = _RAW[sz]
    if store == "dense":
        m = np.frombuffer(rd.take(rows * cols * sz), dtype=raw).copy()
    elif store == "ham":
        table, sym = rd.stream(sz)
        m = table[sym] if sym.size == rows * cols else _bad(what, "holds the wrong number of entries")
    else:
        if store == "csr":
            (nnz,) = rd.u("Q")
            cdt, pdt = _uint_for(cols), _uint_for(nnz)
            vals = np.frombuffer(rd.take(nnz * sz), dtype=raw)
            c = np.frombuffer(rd.take(nnz * np.dtype(cdt).itemsize), dtype=cdt).astype(np.int64)
            ptr = np.frombuffer(rd.take((rows + 1) * np.dtype(pdt).itemsize), dtype=pdt).astype(np.int64)
            counts = np.diff(ptr)
            if counts.size != rows or (counts < 0).any() or int(ptr[-1]) != nnz:
                raise _fail(f"{what}: corrupt csr data (row pointers do not match the non-zeros)")
        else:
            table, sym = rd.stream(sz)
            vals = table[sym]
            gtab, gsym = rd.stream(4)
            ctab, csym = rd.stream(4)
            counts = ctab.astype(np.int64)[csym]
            gaps = gtab.astype(np.int64)[gsym]
            if counts.size != rows or int(counts.sum()) != vals.size or gaps.size != vals.size:
                raise _fail(f"{what}: corrupt sham data (row counts do not match the non-zeros)")
            c = _columns_from_gaps(gaps, counts)
        r = np.repeat(np.arange(rows), counts)
        m = np.zeros((rows, cols), dtype=raw)
        if c.size and (c.max() >= cols or c.min() < 0):
            raise _fail(f"{what}: corrupt {store} data (a column index is out of range)")
        m[r, c] = vals
    if rd.pos != len(data):
        raise _fail(f"{what}: {len(data) - rd.pos} bytes left over after the {store} data")
    t = torch.from_numpy(np.ascontiguousarray(m).reshape(-1).view(np_dt).copy())
    if dtype == torch.bfloat16:
        t = t.view(torch.bfloat16)
    return t.to(dtype).reshape(shape)


def _bad(what: str, why: str) -> np.ndarray:
    raise _fail(f"{what}: {why}")


def _columns_from_gaps(gaps: np.ndarray, counts: np.ndarray) -> np.ndarray:
    """Column indices from per-row gaps: a running sum of gap + 1 that restarts at every row."""
    steps = gaps + 1
    total = np.cumsum(steps)
    starts = np.concatenate([[0], np.cumsum(counts)[:-1]])[counts > 0]
    base = np.zeros(gaps.size, dtype=np.int64)
    base[starts] = np.concatenate([[0], total[starts[1:] - 1]]) if starts.size else base[starts]
    return total - np.maximum.accumulate(base) - 1


def psi(w: torch.Tensor, store: Store) -> float:
    """ψ = bytes of the weight in `store` format / bytes of its fp32 form (exact, tables included)."""
    return len(encode_weight(w, store)) / (4 * max(1, w.numel()))


def huffman_bound_bits(symbols: np.ndarray) -> tuple[float, float]:
    """(N·H, N·(H + 1)): the bounds any Huffman payload of these symbols lies within (H: empirical entropy
    in bits)."""
    counts = np.bincount(symbols)
    p = counts[counts > 0] / symbols.size
    h = float(-(p * np.log2(p)).sum())
    return symbols.size * h, symbols.size * (h + 1)


def ham_size_bound(rows: int, cols: int, k: int, item: int = 4) -> int:
    """An upper bound on HAM bytes of a [rows, cols] weight with k distinct values (zero included):
    Huffman spends at most 1 + log2 k bits a symbol; plus one B-bit word of padding, the table (k values
    and k lengths) and the headers."""
    n = rows * cols
    bits = n * (1 + math.log2(max(k, 1))) if k > 1 else n
    return math.ceil(bits / WORD_BITS) * WORD_BITS // 8 + 4 + k * (item + 1) + 9 + 20


def sham_size_bound(rows: int, cols: int, nnz: int, k: int, item: int = 4) -> int:
    """An upper bound on sHAM bytes: non-zero symbols at ≤ 1 + log2 k bits, column gaps at ≤ 1 + log2 g
    bits (g ≤ cols distinct gaps), row counts at ≤ 1 + log2(cols + 1) bits, each stream with a padding
    word, its table and header."""
    def stream(n: int, alphabet: int, sym_bytes: int) -> int:
        a = max(1, min(alphabet, n) if n else 1)
        bits = n * (1 + math.log2(a)) if a > 1 else n
        return math.ceil(bits / WORD_BITS) * WORD_BITS // 8 + 20 + a * (sym_bytes + 1)
    return 9 + stream(nnz, k, item) + stream(nnz, cols, 4) + stream(rows, cols + 1, 4)


# ---- the compressed model file ---------------------------------------------------------------------------
def weight_store(w: torch.Tensor, store: Store) -> Store:
    """The format a param is written in: `store` for conv/linear-style weights (2-D or more, floating),
    `dense` for vectors, scalars and integer buffers."""
    return store if w.dim() >= 2 and w.dtype.is_floating_point else "dense"


def encode_model(graph: Graph, store: Store) -> tuple[bytes, dict[str, dict[str, float]]]:
    """The compressed model file of `graph`: its structure (the IR text form with every param left as a
    `zeros` generator of its shape) and every param, decoded, in its `weight_store` format. Returns the
    bytes and, per param ('node/param'), its format, bytes and fp32 bytes."""
    from netsqueeze.ir.printer import number_strings, print_graph

    if store not in STORES:
        raise _fail(f"unknown store '{store}' (use {', '.join(STORES)})")
    for n in graph.nodes():
        if n.kind == "opaque":
            raise StorageError(Diagnostic(f"node '{n.id}' is opaque (a {n.origin.op_type or 'foreign'} call): the "
                                          "compressed model file holds only netsqueeze ops; emit it with "
                                          "to_torch / to_onnx instead", node=n.id))
    skeleton = graph.copy()
    entries: list[dict[str, object]] = []
    blobs: list[bytes] = []
    marks: list[tuple[str, str]] = []
    figures: dict[str, dict[str, float]] = {}
    offset = 0
    for node in skeleton.nodes():
        for k in sorted(node.params):
            w = dense_of(graph.node(node.id).params[k]).detach()
            fmt = weight_store(w, store)
            data = encode_weight(w, fmt)
            ph = torch.zeros(1, dtype=w.dtype)
            dt = str(w.dtype).removeprefix("torch.")
            marks.append((f" = {dt}[1] [{number_strings(ph)[0]}]", f" = {dt}[{', '.join(map(str, w.shape))}] zeros"))
            node.params[k] = ph
            entries.append({"node": node.id, "param": k, "store": fmt, "shape": list(w.shape), "dtype": dt,
                            "offset": offset, "length": len(data)})
            figures[f"{node.id}/{k}"] = {"bytes": float(len(data)), "fp32_bytes": float(4 * w.numel()),
                                         "store": float(STORES.index(fmt))}
            blobs.append(data)
            offset += len(data)
    # the printer writes nodes in graph order and params sorted by name, as this loop visited them:
    # each placeholder is the next occurrence of its text after the previous one
    text = print_graph(skeleton, values=True)
    parts, at = [], 0
    for mark, real in marks:
        found = text.find(mark, at)
        if found < 0:
            raise _fail("internal error: a param placeholder is missing from the graph text")
        parts += [text[at:found], real]
        at = found + len(mark)
    text = "".join(parts) + text[at:]
    header = json.dumps({"store": store, "graph": text, "weights": entries}, sort_keys=True).encode()
    return seal(MAGIC + struct.pack("<HI", VERSION, len(header)) + header + b"".join(blobs)), figures


def seal(body: bytes) -> bytes:
    """A model file's bytes: `body` closed by its CRC-32, which `decode_model` checks."""
    return body + struct.pack("<I", zlib.crc32(body))


def unsealed(data: bytes, what: str = "model file") -> bytes:
    """A model file's bytes up to its checksum, checked (a version 1 file has none): a file damaged after it was
    written is a FileError, not weights that load wrong."""
    if data[:4] != MAGIC:
        raise FileError(f"{what} is not a netsqueeze compressed model (no '{MAGIC.decode()}' header)")
    if len(data) < 10:
        raise FileError(f"{what} is truncated")
    version = struct.unpack("<H", data[4:6])[0]
    if version not in (1, VERSION):
        raise FileError(f"{what} is format version {version}; this netsqueeze reads versions 1 and {VERSION}")
    if version == 1:
        return data
    if len(data) < 14 or struct.unpack("<I", data[-4:])[0] != zlib.crc32(data[:-4]):
        raise FileError(f"{what} is corrupt: its checksum does not match its bytes (damaged or truncated after it "
                        "was written)")
    return data[:-4]


def decode_model(data: bytes, what: str = "model file") -> tuple[Graph, dict[str, object]]:
    """The graph of a compressed model file, every param decoded to a dense tensor, and the file's header."""
    from netsqueeze.ir.parser import parse_graph

    data = unsealed(data, what)
    hlen = struct.unpack("<I", data[6:10])[0]
    try:
        header = json.loads(data[10:10 + hlen].decode())
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise FileError(f"{what} has a corrupt header: {err}") from None
    base = 10 + hlen
    _check_header(header, what)
    graph = parse_graph(header["graph"], file=what)
    for e in header["weights"]:
        lo, hi = base + int(e["offset"]), base + int(e["offset"]) + int(e["length"])
        if hi > len(data):
            raise FileError(f"{what} is truncated: param '{e['param']}' of node '{e['node']}' runs past its end")
        dt = _DTYPES[e["dtype"]][0]
        t = decode_weight(data[lo:hi], e["store"], tuple(e["shape"]), dt,
                          f"param '{e['param']}' of node '{e['node']}' in {what}")
        graph.node(e["node"]).params[e["param"]] = t
    return graph, header


def _check_header(header: object, what: str) -> None:
    """The header's fields `decode_model` reads, with their types: a corrupt or hand-made file is a FileError
    naming the field, not a KeyError."""
    if not isinstance(header, dict) or not isinstance(header.get("graph"), str) or \
            not isinstance(header.get("weights"), list):
        raise FileError(f"{what} has a corrupt header: it needs a 'graph' text and a 'weights' list")
    want = {"node": str, "param": str, "store": str, "dtype": str, "offset": int, "length": int, "shape": list}
    for i, e in enumerate(header["weights"]):
        bad = [k for k, t in want.items() if not isinstance(e, dict) or not isinstance(e.get(k), t)]
        if not bad and e["dtype"] not in _DTYPES:
            bad = ["dtype"]
        if not bad and (any(not isinstance(d, int) or d < 0 for d in e["shape"]) or e["offset"] < 0 or e["length"] < 0):
            bad = ["shape, offset or length"]
        if bad:
            raise FileError(f"{what} has a corrupt header: weight entry {i} has no valid {bad[0]}")


def stored_matrices(data: bytes) -> Mapping[str, tuple[str, bytes, tuple[int, ...]]]:
    """Per 'node/param' of a compressed model file: (store, encoded bytes, shape) — what a module that
    computes on the compressed form reads."""
    data = unsealed(data)
    _, hlen = struct.unpack("<HI", data[4:10])
    header = json.loads(data[10:10 + hlen].decode())
    base = 10 + hlen
    return {f"{e['node']}/{e['param']}": (e["store"], data[base + e["offset"]:base + e["offset"] + e["length"]],
                                          tuple(e["shape"])) for e in header["weights"]}


# ---- the compressed-domain dot product (DotHAM / DotsHAM) -----------------------------------------------
def compressed_entries(data: bytes, store: Store, what: str = "weight"
                       ) -> tuple[int, int, np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """The non-zero entries of a HAM/sHAM weight read from its stream: (rows, cols, row, column, symbol,
    symbol table as float64), row-major; entries whose symbol is zero are skipped (HAM codes zeros too)."""
    if store not in ("ham", "sham"):
        raise _fail(f"{what}: the compressed dot product reads ham or sham data, not '{store}'")
    rd = _Reader(data, what)
    rows, cols, _ = rd.u("IIB")
    table, sym = rd.stream(4)
    values = table.view(np.float32).astype(np.float64)
    if store == "ham":
        flat = np.flatnonzero(values[sym] != 0)
        return rows, cols, flat // max(cols, 1), flat % max(cols, 1), sym[flat], values
    gtab, gsym = rd.stream(4)
    ctab, csym = rd.stream(4)
    counts = ctab.astype(np.int64)[csym]
    c = _columns_from_gaps(gtab.astype(np.int64)[gsym], counts)
    return rows, cols, np.repeat(np.arange(rows), counts), c, sym, values
