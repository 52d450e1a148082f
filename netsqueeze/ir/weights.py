"""Weights as typed values: dense tensors and the encoded forms (affine-quantized, sparse, codebook).

A node's `params` map names to a `Weight`: a dense `torch.Tensor`, or an `Encoded` value that knows
its logical shape and dtype, how to decode itself (`dense()`), its exact stored size (`nbytes()`), its
non-zeros (`nnz()`), and how to drop channels without decoding (`index_select`). Each form keeps
exactly the buffers it stores (`storage()`); decoding is written once, with torch ops only
(`decode(storage, static)`), so the torch backend's decode modules run the same code as `dense()`.

Forms:
- `Affine`: integer data (int4/uint4/int8/uint8/int16/int32) with a scale and optional zero point, per
  tensor, per axis or per block along an axis (ONNX `DequantizeLinear`, opset 21 block quantization).
- `Sparse`: values at flat positions, stored as COO (flat indices), CSR (rows = axis 0), or N:M
  structured (every group of M consecutive elements of a row holds N slots).
- `Codebook`: integer indices into a table of centroids (a `Centroids` object several weights may
  share), optionally with an entropy-coded (Huffman) payload whose size is counted exactly.
"""

from __future__ import annotations

import heapq
import math
from abc import ABC, abstractmethod
from collections import Counter
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, ClassVar, Union

import torch

from netsqueeze.errors import Diagnostic, VerifyError


class WeightFormError(VerifyError):
    """A weight operation the weight's form cannot do exactly (e.g. dropping part of a quantization block)."""


def _fail(msg: str) -> WeightFormError:
    return WeightFormError(Diagnostic(msg))


# ---- bit packing (little-endian within each byte, as ONNX packs int4) --------------------------------
def pack_bits(values: torch.Tensor, bits: int) -> torch.Tensor:
    """Packs non-negative integers < 2**bits into a uint8 tensor of ceil(n·bits/8) bytes."""
    v = values.reshape(-1).to(torch.int64)
    if bits == 8:
        return v.to(torch.uint8)
    if 8 % bits == 0:  # whole values per byte (int4: two): the same bytes as the bit stream below, faster
        k = 8 // bits
        v = torch.cat([v, v.new_zeros((-v.numel()) % k)]).reshape(-1, k)
        return (v << (bits * torch.arange(k, dtype=torch.int64))).sum(1).to(torch.uint8)
    shifts = torch.arange(bits, dtype=torch.int64)
    stream = ((v.unsqueeze(1) >> shifts) & 1).reshape(-1)
    pad = (-stream.numel()) % 8
    stream = torch.cat([stream, stream.new_zeros(pad)]).reshape(-1, 8)
    return (stream << torch.arange(8, dtype=torch.int64)).sum(1).to(torch.uint8)


def unpack_bits(packed: torch.Tensor, bits: int, n: int) -> torch.Tensor:
    """The inverse of `pack_bits`: the first `n` integers, as int64."""
    p = packed.reshape(-1).to(torch.int64)
    if bits == 8:
        return p[:n]
    if 8 % bits == 0:
        k = 8 // bits
        return ((p.unsqueeze(1) >> (bits * torch.arange(k, dtype=torch.int64))) & (2**bits - 1)).reshape(-1)[:n]
    stream = ((p.unsqueeze(1) >> torch.arange(8, dtype=torch.int64)) & 1).reshape(-1)[: n * bits]
    return (stream.reshape(n, bits) << torch.arange(bits, dtype=torch.int64)).sum(1)


def _index_dtype(limit: int) -> torch.dtype:
    """The smallest signed integer dtype that holds 0..limit."""
    for dt in (torch.int16, torch.int32):
        if limit <= torch.iinfo(dt).max:
            return dt
    return torch.int64


def _tbytes(t: torch.Tensor) -> int:
    return int(t.numel()) * t.element_size()


class Encoded(ABC):
    """A weight stored in a non-dense form. Looks like a tensor to shape inference (`shape`, `dim()`,
    `numel()`, `dtype`), but has no arithmetic: a pass that computes with it calls `dense()`."""

    form: ClassVar[str] = ""
    shape: tuple[int, ...]
    dtype: torch.dtype  # the logical (decoded) dtype

    # ---- what every form provides --------------------------------------------------------------
    @abstractmethod
    def storage(self) -> dict[str, torch.Tensor]:
        """The buffers this form stores, by name: exactly what `nbytes` counts (plus `extra_bytes`)."""

    @abstractmethod
    def static(self) -> dict[str, Any]:
        """The non-tensor facts `decode` needs (shape, axis, bits, ...)."""

    @staticmethod
    @abstractmethod
    def decode(storage: Mapping[str, torch.Tensor], static: Mapping[str, Any]) -> torch.Tensor:
        """The dense tensor, from `storage()` and `static()`; torch ops only (runs in emitted modules)."""

    @abstractmethod
    def index_select(self, axis: int, index: torch.Tensor) -> Encoded:
        """The weight with only positions `index` kept along `axis`, in the same form."""

    @abstractmethod
    def permute(self, perm: tuple[int, ...]) -> Encoded:
        """The weight with its axes permuted, in the same form."""

    @abstractmethod
    def describe(self) -> str:
        """A short human-readable form, e.g. 'int8 per-axis(0)' or 'csr'."""

    def tables(self) -> dict[int, tuple[str, int]]:
        """Tables that several weights may share, by identity: id → (description, bytes)."""
        return {}

    def extra_bytes(self) -> int:
        """Bytes counted beyond `storage()` (and beyond shared tables): 0 unless a form says otherwise."""
        return 0

    # ---- derived -------------------------------------------------------------------------------
    def dense(self) -> torch.Tensor:
        return self.decode(self.storage(), self.static())

    def nbytes(self, *, tables: bool = True) -> int:
        """Exact stored size in bytes; `tables=False` leaves out shared tables (counted once per graph)."""
        shared = sum(b for _, b in self.tables().values())
        own = sum(_tbytes(t) for t in self.storage().values()) + self.extra_bytes()
        # storage() includes the shared tables' tensors: remove them unless asked for
        return own if tables else own - shared

    def nnz(self) -> int:
        return int(torch.count_nonzero(self.dense()))

    def dim(self) -> int:
        return len(self.shape)

    def numel(self) -> int:
        return math.prod(self.shape)

    def element_size(self) -> int:
        return torch.empty((), dtype=self.dtype).element_size()

    def clone(self) -> Encoded:
        return self.index_select(0, torch.arange(self.shape[0])) if self.shape else self

    def _axis(self, axis: int) -> int:
        a = axis + len(self.shape) if axis < 0 else axis
        if not 0 <= a < len(self.shape):
            raise _fail(f"axis {axis} out of range for a rank-{len(self.shape)} weight")
        return a

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.describe()}, shape={list(self.shape)})"


Weight = Union[torch.Tensor, Encoded]  # noqa: UP007 (a runtime alias used in isinstance-free annotations)


# ---- affine quantization ---------------------------------------------------------------------------
_INT_RANGES = {("int", 4): (-8, 7), ("uint", 4): (0, 15), ("int", 8): (-128, 127), ("uint", 8): (0, 255),
               ("int", 16): (-32768, 32767), ("int", 32): (-(2**31), 2**31 - 1)}


def _spread(t: torch.Tensor, axis: int | None, block: int, shape: tuple[int, ...]) -> torch.Tensor:
    """Per-axis or per-block scales / zero points laid out to broadcast against a weight of `shape`."""
    if axis is None:
        return t
    if not block:
        view = [1] * len(shape)
        view[axis] = -1
        return t.reshape(view)
    return t.repeat_interleave(block, dim=axis).narrow(axis, 0, shape[axis])


@dataclass(eq=False)
class Affine(Encoded):
    """w = (q - zero_point) · scale. `axis` None = per tensor; else per axis, or per block of
    `block_size` consecutive positions along `axis` (scale then has the weight's rank, with
    ceil(shape[axis] / block_size) entries along `axis`, as ONNX DequantizeLinear)."""

    form: ClassVar[str] = "affine"
    q: torch.Tensor  # integer values, unpacked, logical shape
    scale: torch.Tensor
    zero_point: torch.Tensor | None = None
    axis: int | None = None
    block_size: int = 0
    bits: int = 8
    signed: bool = True
    dtype: torch.dtype = torch.float32
    shape: tuple[int, ...] = field(init=False)

    def __post_init__(self) -> None:
        # contiguous: a strided q (a permuted view) decodes to a strided weight, which kernels sum in another
        # order than the contiguous copy a save/load gives (1.5e-8 apart)
        self.q = self.q.contiguous()
        self.shape = tuple(int(d) for d in self.q.shape)
        if (self.kind, self.bits) not in _INT_RANGES:
            raise _fail(f"unsupported integer type {self.type_name}")
        lo, hi = _INT_RANGES[(self.kind, self.bits)]
        if self.q.numel() and (int(self.q.min()) < lo or int(self.q.max()) > hi):
            raise _fail(f"{self.type_name} data out of range [{lo}, {hi}]")
        if self.axis is not None:
            self.axis = self._axis(self.axis)
        want = self._scale_shape()
        if tuple(self.scale.shape) != want:
            raise _fail(f"scale of shape {list(self.scale.shape)} does not fit a {self.describe()} weight of "
                        f"shape {list(self.shape)} (expected {list(want)})")
        if self.zero_point is not None and tuple(self.zero_point.shape) != want:
            raise _fail(f"zero point of shape {list(self.zero_point.shape)} does not match the scale's {list(want)}")

    @property
    def kind(self) -> str:
        return "int" if self.signed else "uint"

    @property
    def type_name(self) -> str:
        return f"{self.kind}{self.bits}"

    def _scale_shape(self) -> tuple[int, ...]:
        if self.axis is None:
            return ()
        if not self.block_size:
            return (self.shape[self.axis],)
        s = list(self.shape)
        s[self.axis] = -(-s[self.axis] // self.block_size)
        return tuple(s)

    def storage(self) -> dict[str, torch.Tensor]:
        out = {"q": self._pack(self.q), "scale": self.scale}
        if self.zero_point is not None:
            out["zero_point"] = self._pack(self.zero_point)
        return out

    def _pack(self, t: torch.Tensor) -> torch.Tensor:
        if self.bits >= 8:
            return t.to({8: torch.int8 if self.signed else torch.uint8, 16: torch.int16, 32: torch.int32}[self.bits])
        lo = _INT_RANGES[(self.kind, self.bits)][0]
        return pack_bits(t.to(torch.int64) - lo if self.signed else t, self.bits)

    def static(self) -> dict[str, Any]:
        return {"shape": self.shape, "axis": self.axis, "block_size": self.block_size, "bits": self.bits,
                "signed": self.signed, "dtype": self.dtype, "zp_shape": tuple(self.scale.shape)}

    @staticmethod
    def unpack(packed: torch.Tensor, static: Mapping[str, Any], shape: tuple[int, ...]) -> torch.Tensor:
        bits, n = static["bits"], math.prod(shape)
        if bits >= 8:
            return packed.to(torch.int64).reshape(shape)
        v = unpack_bits(packed, bits, n)
        if static["signed"]:
            v = v + _INT_RANGES[("int", bits)][0]
        return v.reshape(shape)

    @staticmethod
    def decode(storage: Mapping[str, torch.Tensor], static: Mapping[str, Any]) -> torch.Tensor:
        shape, axis, block = static["shape"], static["axis"], static["block_size"]
        q = Affine.unpack(storage["q"], static, shape)
        zp = storage.get("zero_point")
        z = Affine.unpack(zp, static, static["zp_shape"]) if zp is not None else None
        s = storage["scale"].to(torch.float32)

        def expand(t: torch.Tensor) -> torch.Tensor:
            return _spread(t, axis, block, shape)

        x = q.to(torch.float32) if z is None else (q - expand(z)).to(torch.float32)
        return (x * expand(s)).to(static["dtype"])

    def index_select(self, axis: int, index: torch.Tensor) -> Affine:
        a = self._axis(axis)
        index = index.to(torch.int64)
        q = self.q.index_select(a, index)
        scale, zp = self.scale, self.zero_point
        if self.axis is not None and a == self.axis and not self.block_size:
            scale = scale.index_select(0, index)
            zp = None if zp is None else zp.index_select(0, index)
        elif self.axis is not None and a == self.axis:
            b = self.block_size
            blocks = index // b
            whole = index.numel() % b == 0 and bool(
                (index.reshape(-1, b) == blocks.reshape(-1, b)[:, :1] * b + torch.arange(b)).all()) \
                if index.numel() else True
            if not whole:
                raise _fail(f"cannot drop part of a quantization block: axis {a} is quantized in blocks of {b}; "
                            "keep whole blocks or quantize after removing channels")
            blocks = blocks.reshape(-1, b)[:, 0] if index.numel() else blocks
            scale = scale.index_select(a, blocks)
            zp = None if zp is None else zp.index_select(a, blocks)
        elif self.axis is not None and self.block_size:
            scale = scale.index_select(a, index)
            zp = None if zp is None else zp.index_select(a, index)
        return Affine(q.clone(), scale.clone(), None if zp is None else zp.clone(), self.axis, self.block_size,
                      self.bits, self.signed, self.dtype)

    def permute(self, perm: tuple[int, ...]) -> Affine:
        axis = None if self.axis is None else list(perm).index(self.axis)
        scale, zp = self.scale, self.zero_point
        if self.block_size:
            scale = scale.permute(perm)
            zp = None if zp is None else zp.permute(perm)
        return Affine(self.q.permute(perm).contiguous(), scale.contiguous(),
                      None if zp is None else zp.contiguous(), axis, self.block_size, self.bits, self.signed,
                      self.dtype)

    def describe(self) -> str:
        if self.axis is None:
            how = "per-tensor"
        elif self.block_size:
            how = f"block {self.block_size} on axis {self.axis}"
        else:
            how = f"per-axis({self.axis})"
        return f"{self.type_name} {how}" + ("" if self.zero_point is None else " asym")

    @staticmethod
    def quantize(w: torch.Tensor, *, bits: int = 8, signed: bool = True, axis: int | None = None,
                 block_size: int = 0, symmetric: bool = True) -> Affine:
        """Round-to-nearest min/max quantization of a dense weight (a helper for tests and passes)."""
        lo, hi = _INT_RANGES[("int" if signed else "uint", bits)]
        x = w.detach().to(torch.float32)
        if axis is None:
            xr = x.reshape(1, -1)
        elif not block_size:
            xr = x.movedim(axis, 0).reshape(x.shape[axis], -1)
        else:
            d = x.shape[axis]
            pad = (-d) % block_size
            xm = x.movedim(axis, -1)
            if pad:
                xm = torch.cat([xm, xm[..., -1:].expand(*xm.shape[:-1], pad)], -1)
            xr = xm.reshape(*xm.shape[:-1], -1, block_size)
        mn, mx = xr.amin(-1).clamp(max=0), xr.amax(-1).clamp(min=0)
        if symmetric:
            scale = torch.maximum(mx, -mn) / hi  # symmetric: ±max maps to ±hi (the range -hi..hi)
            zp = None
        else:
            scale = (mx - mn) / (hi - lo)
        scale = torch.where(scale > 0, scale, torch.ones_like(scale))
        if not symmetric:
            zp = torch.round(lo - mn / scale).clamp(lo, hi).to(torch.int64)
        if axis is not None and block_size:
            scale = scale.movedim(-1, axis)  # [..., nblocks] with the block axis back in place
            zp = None if zp is None else zp.movedim(-1, axis)
        elif axis is None:
            scale, zp = scale.reshape(()), None if zp is None else zp.reshape(())

        def expand(t: torch.Tensor) -> torch.Tensor:
            return _spread(t, axis, block_size, tuple(x.shape))

        q = torch.round(x / expand(scale)) + (0 if zp is None else expand(zp))
        q = q.clamp(lo, hi).to(torch.int64)
        dt = torch.int8 if (signed and bits <= 8) else torch.uint8 if bits <= 8 else torch.int32
        return Affine(q.to(dt), scale.contiguous(), None if zp is None else zp.to(dt).contiguous(), axis,
                      block_size, bits, signed, w.dtype)


# ONNX sparse initializers are COO only: the layout of each other sparse weight travels as model metadata
SPARSE_LAYOUT_KEY = "netsqueeze.sparse_layout:"


# ---- sparse ----------------------------------------------------------------------------------------
@dataclass(eq=False)
class Sparse(Encoded):
    """Non-zero values at sorted flat positions. `layout` decides what is stored:
    'coo' (values + flat indices), 'csr' (values + column indices + row pointers over a [shape[0], -1]
    view), 'nm' (N slots in every group of M consecutive elements of each row: values + slot positions
    in ceil(log2 M) bits)."""

    form: ClassVar[str] = "sparse"
    values: torch.Tensor  # 1-D
    indices: torch.Tensor  # 1-D int64 flat positions, strictly increasing
    shape: tuple[int, ...] = ()
    layout: str = "coo"
    n: int = 0
    m: int = 0
    dtype: torch.dtype = field(init=False)

    def __post_init__(self) -> None:
        self.shape = tuple(int(d) for d in self.shape)
        self.dtype = self.values.dtype
        if self.layout not in ("coo", "csr", "nm"):
            raise _fail(f"unknown sparse layout '{self.layout}' (expected coo, csr or nm)")
        if self.values.shape != self.indices.shape or self.values.dim() != 1:
            raise _fail("sparse values and indices must be 1-D and of one length")
        if self.layout == "nm":
            rows, cols = self._rows_cols()
            if not 0 < self.n <= self.m or cols % self.m:
                raise _fail(f"{self.n}:{self.m} sparsity needs 0 < N <= M and rows of a multiple of M elements "
                            f"(rows have {cols})")
            if self.values.numel() != rows * cols // self.m * self.n:
                raise _fail(f"{self.n}:{self.m} sparse weight must store exactly N slots per group of M")

    def _rows_cols(self) -> tuple[int, int]:
        rows = self.shape[0] if self.shape else 1
        return rows, (math.prod(self.shape) // rows if rows else 0)

    @staticmethod
    def from_dense(w: torch.Tensor, layout: str = "coo", n: int = 0, m: int = 0) -> Sparse:
        flat = w.detach().reshape(-1)
        if layout != "nm":
            idx = torch.nonzero(flat).reshape(-1)
            return Sparse(flat[idx].clone(), idx, tuple(w.shape), layout)
        rows = w.shape[0] if w.dim() else 1
        cols = flat.numel() // max(rows, 1)
        if not 0 < n <= m or cols % m:
            raise _fail(f"{n}:{m} sparsity needs 0 < N <= M and rows of a multiple of M elements (rows have {cols})")
        groups = flat.reshape(-1, m)
        if bool(((groups != 0).sum(1) > n).any()):
            raise _fail(f"the weight is not {n}:{m} sparse: a group of {m} holds more than {n} non-zeros")
        # per group: the non-zeros first (by position), then zeros, keep N slots, in position order
        order = torch.argsort((groups == 0).to(torch.int64) * m + torch.arange(m), dim=1, stable=True)[:, :n]
        slots = order.sort(1).values
        idx = (slots + torch.arange(groups.shape[0]).unsqueeze(1) * m).reshape(-1)
        return Sparse(flat[idx].clone(), idx, tuple(w.shape), "nm", n, m)

    def storage(self) -> dict[str, torch.Tensor]:
        numel = math.prod(self.shape)
        if self.layout == "coo":
            return {"values": self.values, "indices": self.indices.to(_index_dtype(max(numel - 1, 0)))}
        rows, cols = self._rows_cols()
        if self.layout == "csr":
            r = self.indices // max(cols, 1)
            crow = torch.zeros(rows + 1, dtype=torch.int64)
            crow[1:] = torch.bincount(r, minlength=rows).cumsum(0)
            return {"values": self.values, "col": (self.indices % max(cols, 1)).to(_index_dtype(max(cols - 1, 0))),
                    "crow": crow.to(_index_dtype(self.values.numel()))}
        pos = self.indices % self.m
        return {"values": self.values, "slots": pack_bits(pos, max(1, math.ceil(math.log2(self.m))))}

    def static(self) -> dict[str, Any]:
        return {"shape": self.shape, "layout": self.layout, "n": self.n, "m": self.m}

    @staticmethod
    def decode(storage: Mapping[str, torch.Tensor], static: Mapping[str, Any]) -> torch.Tensor:
        shape, layout = static["shape"], static["layout"]
        numel = math.prod(shape)
        values = storage["values"]
        rows = shape[0] if shape else 1
        cols = numel // rows if rows else 0
        if layout == "coo":
            idx = storage["indices"].to(torch.int64)
        elif layout == "csr":
            crow = storage["crow"].to(torch.int64)
            r = torch.repeat_interleave(torch.arange(rows), crow[1:] - crow[:-1])
            idx = r * cols + storage["col"].to(torch.int64)
        else:
            n, m = static["n"], static["m"]
            k = values.numel()
            pos = unpack_bits(storage["slots"], max(1, math.ceil(math.log2(m))), k)
            idx = torch.arange(k) // n * m + pos
        out = torch.zeros(numel, dtype=values.dtype)
        return out.index_put((idx,), values).reshape(shape)

    def nnz(self) -> int:
        return int(torch.count_nonzero(self.values))

    def index_select(self, axis: int, index: torch.Tensor) -> Sparse:
        d = self.dense().index_select(self._axis(axis), index.to(torch.int64))
        return Sparse.from_dense(d, self.layout, self.n, self.m) if self.layout == "nm" else \
            Sparse.from_dense(d, self.layout)

    def permute(self, perm: tuple[int, ...]) -> Sparse:
        return Sparse.from_dense(self.dense().permute(perm).contiguous(), self.layout, self.n, self.m)

    def describe(self) -> str:
        return f"{self.n}:{self.m}" if self.layout == "nm" else self.layout

    def layout_tag(self) -> str:
        """'coo', 'csr' or 'nm:N:M': what `SPARSE_LAYOUT_KEY` metadata records."""
        return f"nm:{self.n}:{self.m}" if self.layout == "nm" else self.layout


# ---- codebook ----------------------------------------------------------------------------------------
@dataclass(eq=False)
class Centroids:
    """A table of k shared values; several `Codebook` weights may point at one object (counted once)."""

    values: torch.Tensor  # [k]
    name: str = ""


def huffman_lengths(counts: Mapping[int, int]) -> dict[int, int]:
    """Code length per symbol of a Huffman code for these counts (one symbol: length 1)."""
    syms = sorted(s for s, c in counts.items() if c > 0)
    if len(syms) == 1:
        return {syms[0]: 1}
    heap: list[tuple[int, int, list[int]]] = [(counts[s], i, [s]) for i, s in enumerate(syms)]
    heapq.heapify(heap)
    lengths = dict.fromkeys(syms, 0)
    tie = len(heap)
    while len(heap) > 1:
        c1, _, a = heapq.heappop(heap)
        c2, _, b = heapq.heappop(heap)
        for s in a + b:
            lengths[s] += 1
        heapq.heappush(heap, (c1 + c2, tie, a + b))
        tie += 1
    return lengths


@dataclass(eq=False)
class Codebook(Encoded):
    """w = centroids[indices]. Indices are stored in ceil(log2 k) bits each, or, with `huffman`, as a
    Huffman-coded stream: payload bits Σ count·length plus a table of k code lengths (one byte each,
    a canonical code needs nothing else). Emitted models carry fixed-width indices (runtimes cannot
    decode Huffman); the coded size is the storage figure. Centroids may be vectors or kernels ([k, *tail],
    a kernel bank): the weight's shape is then indices.shape + tail."""

    form: ClassVar[str] = "codebook"
    indices: torch.Tensor  # integer, logical shape
    centroids: Centroids
    huffman: bool = False
    shape: tuple[int, ...] = field(init=False)
    dtype: torch.dtype = field(init=False)

    def __post_init__(self) -> None:
        tail = tuple(int(d) for d in self.centroids.values.shape[1:])  # a kernel bank's kernel shape
        self.shape = tuple(int(d) for d in self.indices.shape) + tail
        self.dtype = self.centroids.values.dtype
        k = self.k
        if self.indices.numel() and (int(self.indices.min()) < 0 or int(self.indices.max()) >= k):
            raise _fail(f"codebook indices out of range [0, {k})")

    @property
    def k(self) -> int:
        c = self.centroids.values
        return int(c.shape[0]) if c.dim() else 1

    @property
    def bits(self) -> int:
        return max(1, math.ceil(math.log2(max(self.k, 2))))

    def storage(self) -> dict[str, torch.Tensor]:
        return {"indices": pack_bits(self.indices, self.bits), "centroids": self.centroids.values}

    def static(self) -> dict[str, Any]:
        out: dict[str, Any] = {"shape": self.shape, "bits": self.bits}
        if self.indices.dim() != len(self.shape):
            out["index_shape"] = tuple(int(d) for d in self.indices.shape)
        return out

    @staticmethod
    def decode(storage: Mapping[str, torch.Tensor], static: Mapping[str, Any]) -> torch.Tensor:
        shape = static["shape"]
        idx = unpack_bits(storage["indices"], static["bits"], math.prod(static.get("index_shape", shape)))
        return storage["centroids"][idx].reshape(shape)

    def tables(self) -> dict[int, tuple[str, int]]:
        return {id(self.centroids): (f"codebook {self.centroids.name or id(self.centroids)}",
                                     _tbytes(self.centroids.values))}

    def extra_bytes(self) -> int:
        if not self.huffman:
            return 0
        counts = Counter(self.indices.reshape(-1).tolist())
        lengths = huffman_lengths(counts)
        payload_bits = sum(c * lengths[s] for s, c in counts.items())
        fixed = _tbytes(pack_bits(self.indices, self.bits))
        return math.ceil(payload_bits / 8) + self.k - fixed  # replaces the fixed-width payload

    def index_select(self, axis: int, index: torch.Tensor) -> Codebook:
        if self._axis(axis) >= self.indices.dim():
            raise _fail(f"cannot select along axis {axis}: it runs inside the shared kernels of a kernel bank")
        return Codebook(self.indices.index_select(self._axis(axis), index.to(torch.int64)).clone(), self.centroids,
                        self.huffman)

    def permute(self, perm: tuple[int, ...]) -> Codebook:
        if any(perm[a] != a for a in range(self.indices.dim(), len(perm))):
            raise _fail(f"cannot permute a kernel bank's kernel axes (permutation {list(perm)})")
        return Codebook(self.indices.permute(perm).contiguous(), self.centroids, self.huffman)

    def describe(self) -> str:
        return f"codebook k={self.k}" + (" huffman" if self.huffman else "")


# ---- functions over any weight -----------------------------------------------------------------------
FORMS: dict[str, type[Encoded]] = {c.form: c for c in (Affine, Sparse, Codebook)}
ENCODED_FORMS = frozenset(FORMS)  # for `Node.dense(name, accept=...)` where a decoded copy is what is wanted


def form_of(w: Weight) -> str:
    return "dense" if isinstance(w, torch.Tensor) else w.form


def dense(w: Weight) -> torch.Tensor:
    """The dense tensor of any weight (an explicit decode)."""
    return w if isinstance(w, torch.Tensor) else w.dense()


def nbytes(w: Weight, *, tables: bool = True) -> int:
    return _tbytes(w) if isinstance(w, torch.Tensor) else w.nbytes(tables=tables)


def nnz(w: Weight) -> int:
    return int(torch.count_nonzero(w)) if isinstance(w, torch.Tensor) else w.nnz()


def index_select(w: Weight, axis: int, index: torch.Tensor) -> Weight:
    if isinstance(w, torch.Tensor):
        return w.index_select(axis, index).contiguous()
    return w.index_select(axis, index)


def clone(w: Weight) -> Weight:
    return w.detach().clone() if isinstance(w, torch.Tensor) else w.clone()


def describe(w: Weight) -> str:
    return str(w.dtype).removeprefix("torch.") if isinstance(w, torch.Tensor) else w.describe()


def require_dense(w: Weight, *, node: str, param: str, accept: frozenset[str] = frozenset()) -> torch.Tensor:
    """The dense tensor of a weight a computation needs, or a located error when its form is not accepted:
    passes that do arithmetic on weights call this instead of decoding silently."""
    if isinstance(w, torch.Tensor):
        return w
    if w.form in accept:
        return w.dense()
    raise WeightFormError(Diagnostic(
        f"param '{param}' of node '{node}' is stored as {w.describe()} ({w.form}); this step needs a dense "
        "weight: run it before the pass that encoded the weight", node=node))


def graph_weight_bytes(weights: list[Weight]) -> int:
    """Total stored bytes of these weights, each shared table counted once."""
    total, seen = 0, {}
    for w in weights:
        total += nbytes(w, tables=False)
        if isinstance(w, Encoded):
            seen.update(w.tables())
    return total + sum(b for _, b in seen.values())
