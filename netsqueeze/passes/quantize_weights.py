"""`quantize_weights`: weight-only quantization (int8 per output channel, int4/uint4 in blocks) by
round-to-nearest or GPTQ, for linear layers, matmuls with a constant weight and convolutions."""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, ClassVar, Literal

import torch

from netsqueeze.errors import Diagnostic, PassError
from netsqueeze.ir.graph import Graph, Value
from netsqueeze.ir.ops import attr
from netsqueeze.ir.weights import Affine, nbytes
from netsqueeze.passes.base import PassContext, PassResult, TransformPass
from netsqueeze.passes.collectors import conv_patches
from netsqueeze.passes.gptq import Grid, Quantized, gptq, output_error, rtn
from netsqueeze.passes.registry import register_pass
from netsqueeze.passes.squeeze_math import gram


@dataclass(eq=False)
class _Target:
    """One weight to quantize, seen as a matrix [out, columns] whose columns are what the layer contracts
    with its input (a conv's columns are (kernel tap, input channel), tap-major, so a block of input
    channels at one tap is a run of consecutive columns)."""

    node: str  # the node whose input the Gram is measured on
    holder: str  # the node whose param holds the weight (the node itself, or a matmul's constant)
    param: str
    matrix: torch.Tensor  # [out, columns]
    groups: torch.Tensor  # scale group of each column
    build: Callable[[Quantized], Affine]  # the encoded weight in the param's own layout
    value: Value  # the input value the Gram is measured on
    rows: Callable[[torch.Tensor], torch.Tensor]  # input batch -> [samples, columns]
    gram: torch.Tensor | None = None
    count: int = 0


@register_pass
@dataclass(frozen=True)
class QuantizeWeights(TransformPass):
    """Weight-only quantization: weights are stored as integers with scales (`Affine`), activations stay
    in floating point. Emitted to ONNX as an integer initializer + `DequantizeLinear` (opset 21 for 4 bits
    and blocks; ONNX Runtime fuses a 4-bit block weight feeding MatMul into its `MatMulNBits` kernel),
    to torch as decode modules holding the integer buffers.

    Applies to the selected `linear` nodes, `matmul` nodes whose second operand is a rank-2 constant read by
    nothing else, and `conv` nodes. Grids: `bits = 8` (default) keeps one scale per output channel;
    `block = 32 | 64 | 128` gives each run of that many input positions (input features; a conv's input
    channels at one kernel tap) of each output channel its own scale, as ONNX block quantization
    (DequantizeLinear `block_size`); `bits = 4` defaults to blocks of 32. `symmetric = true`: signed
    integers, scale max|w| / (2^(bits-1) − 1), no zero point; `false`: unsigned integers with a zero point
    per scale ([min(w, 0), max(w, 0)] onto 0..2^bits − 1).

    `method = rtn` rounds each weight to its nearest grid point (no calibration data needed). `method = gptq`
    (Frantar et al., "GPTQ", ICLR 2023) streams each layer's input Gram H = 2·X·Xᵀ over the calibration data
    (batch by batch, never holding activations) and quantizes column by column, moving each column's
    rounding error onto the columns not yet quantized through the Cholesky factor of H⁻¹ (lazy blocks of
    128 columns; `damp` × mean(diag H) added to the diagonal; `act_order` takes columns by decreasing
    H_ii). With `inputs = quantized` (the paper's sequential mode) layers are quantized in dependency
    order and each layer's Gram is measured on the graph whose earlier layers are already quantized;
    layers that read no selected layer's output (q, k and v of one block) share one pass over the data.
    `inputs = original` measures every Gram on the unquantized graph in one pass. Inputs that are zero on
    all calibration data are rounded to nearest and left out of the error propagation. GPTQ on a conv needs
    groups = 1 and a 1-d or 2-d kernel.

    Needs (gptq): calibration data. Guarantees: every selected weight of those kinds is `Affine` with the
    stated grid; biases stay in floating point; shapes do not change; the same inputs give the same bytes
    (no random choice is made). The note gives the bytes before and after, and for gptq the Gram-weighted
    output error ‖(W − Ŵ)·X‖² / ‖W·X‖² per layer (mean and worst).
    """

    name: ClassVar[str] = "quantize_weights"
    preserves: ClassVar[frozenset[str] | None] = frozenset({"shape_inference"})
    bits: Literal[4, 8] = field(default=8, metadata={"doc": "integer width: 8 or 4"})
    block: Literal[0, 32, 64, 128] | None = field(
        default=None, metadata={"doc": "input positions per scale; 0: one scale per output channel; "
                                       "none: 0 for 8 bits, 32 for 4 bits"})
    symmetric: bool = field(default=True, metadata={"doc": "signed without zero point (true) or unsigned "
                                                           "with a zero point (false)"})
    method: Literal["rtn", "gptq"] = field(default="rtn", metadata={"doc": "round to nearest or GPTQ"})
    damp: float = field(default=0.01, metadata={"min": 0.0, "max": 1.0, "unit": "ratio",
                                                "doc": "GPTQ dampening, a fraction of the Gram's mean diagonal"})
    act_order: bool = field(default=False, metadata={"doc": "GPTQ: columns by decreasing input energy"})
    inputs: Literal["quantized", "original"] = field(
        default="quantized", metadata={"doc": "GPTQ: measure each layer's Gram with the earlier layers "
                                              "quantized (sequential) or on the original graph"})

    @classmethod
    def option_conflicts(cls, given: Mapping[str, Any]) -> list[tuple[str, str]]:
        """GPTQ's options written with `method = rtn` (the default), which rounds each weight alone: at the option."""
        method = cls.with_defaults(given)["method"]
        return [(k, f"option '{k}' applies to method = gptq, not {method}") for k in ("damp", "act_order", "inputs")
                if k in given and method != "gptq"]

    @property
    def block_size(self) -> int:
        return (32 if self.bits == 4 else 0) if self.block is None else self.block

    def run(self, graph: Graph, ctx: PassContext) -> PassResult:
        grid = Grid(self.bits, self.symmetric)
        result = PassResult()
        targets = self._targets(graph, ctx, result)
        if not targets:
            raise PassError(Diagnostic(
                "no selected node has a weight it quantizes (linear, conv, or matmul whose "
                "second operand is a constant)"))
        before = sum(nbytes(graph.node(t.holder).params[t.param]) for t in targets)
        errors: dict[str, float] = {}
        if self.method == "rtn":
            for t in targets:
                self._store(graph, t, rtn(t.matrix, t.groups, grid))
        else:
            remaining = list(targets)
            upstream = self._upstream(graph, {t.node for t in targets})
            while remaining:
                ids = {t.node for t in remaining}
                stage = remaining if self.inputs == "original" else \
                    [t for t in remaining if not upstream[t.node] & ids]
                self._collect(graph, ctx, stage)
                for t in stage:
                    errors[t.node] = self._solve(graph, t, grid)
                    t.gram = None  # solved: its memory goes back before the next stage streams
                remaining = [t for t in remaining if t not in stage]
        for t in targets:
            result.touched.update({t.node, t.holder})
        after = sum(nbytes(graph.node(t.holder).params[t.param]) for t in targets)
        grid_txt = f"{'int' if self.symmetric else 'uint'}{self.bits} " + \
            (f"block {self.block_size}" if self.block_size else "per output channel")
        note = f"{len(targets)} weights to {grid_txt} ({self.method}): {before} -> {after} bytes"
        result.metrics.update({"weights": float(len(targets)), "bytes_before": float(before),
                               "bytes_after": float(after)})
        if errors:
            worst = max(errors, key=lambda k: errors[k])
            mean = sum(errors.values()) / len(errors)
            note += f"; output error mean {mean:.3%}, worst {errors[worst]:.3%} ('{worst}')"
            result.metrics.update({"output_error_mean": mean, "output_error_max": errors[worst]})
        result.notes.append(note)
        result.changed = True
        return result

    # ---- which weights, and how each is seen as a matrix -------------------------------------------------
    def _targets(self, graph: Graph, ctx: PassContext, result: PassResult) -> list[_Target]:
        out = []
        for node in graph.nodes():
            if not ctx.is_selected(node.id):
                continue
            if node.kind == "linear":
                out.append(self._linear(graph, node.id, node.id, "weight", node.dense("weight"), transposed=False))
            elif node.kind == "matmul":
                (a, _), (b, _) = graph.operands(node.id)
                const = graph.node(b)
                if const.kind != "constant" or graph.node(a).kind == "constant" or const.params["value"].dim() != 2:
                    continue
                if len(graph.users(b)) != 1:
                    result.notes.append(f"'{node.id}': its weight '{b}' is also read by other nodes; left as is")
                    continue
                out.append(self._linear(graph, node.id, b, "value", const.dense("value").t(), transposed=True))
            elif node.kind == "conv":
                out.append(self._conv(graph, node.id))
        return out

    def _groups_along(self, n: int) -> torch.Tensor:
        b = self.block_size
        return torch.arange(n) // b if b else torch.zeros(n, dtype=torch.int64)

    def _affine(self, q: torch.Tensor, scale: torch.Tensor, zp: torch.Tensor, axis: int,
                dtype: torch.dtype) -> Affine:
        """An `Affine` from integer-valued q and per-output (or per-block) scale/zero point."""
        dt = torch.int8 if self.symmetric else torch.uint8
        return Affine(q.to(torch.int64).to(dt), scale.float().contiguous(),
                      None if self.symmetric else zp.to(torch.int64).to(dt).contiguous(),
                      axis, self.block_size, self.bits, self.symmetric, dtype)

    def _linear(self, graph: Graph, nid: str, holder: str, param: str, w: torch.Tensor,
                transposed: bool) -> _Target:
        cols = w.shape[1]
        dtype = w.dtype

        def build(qz: Quantized) -> Affine:
            if self.block_size:
                a = self._affine(qz.q, qz.scale, qz.zero_point, 1, dtype)
            else:
                a = self._affine(qz.q, qz.scale[:, 0], qz.zero_point[:, 0], 0, dtype)
            return a.permute((1, 0)) if transposed else a

        return _Target(nid, holder, param, w.detach().double(), self._groups_along(cols), build,
                       graph.operands(nid)[0], lambda x: x.reshape(-1, cols))

    def _conv(self, graph: Graph, nid: str) -> _Target:
        node = graph.node(nid)
        w = node.dense("weight")
        o, i, k = w.shape[0], w.shape[1], math.prod(w.shape[2:])
        b = self.block_size
        nb = -(-i // b) if b else 1
        # tap-major columns: column t·I + c is input channel c at kernel tap t
        matrix = w.detach().double().reshape(o, i, k).permute(0, 2, 1).reshape(o, k * i)
        groups = (torch.arange(k).repeat_interleave(i) * nb + torch.arange(i).repeat(k) // b) if b \
            else torch.zeros(k * i, dtype=torch.int64)
        taps = tuple(w.shape[2:])

        def build(qz: Quantized) -> Affine:
            q = qz.q.reshape(o, k, i).permute(0, 2, 1).reshape(o, i, *taps)
            if not b:
                return self._affine(q, qz.scale[:, 0], qz.zero_point[:, 0], 0, w.dtype)

            def lay(t: torch.Tensor) -> torch.Tensor:
                return t.reshape(o, k, nb).permute(0, 2, 1).reshape(o, nb, *taps)

            return self._affine(q, lay(qz.scale), lay(qz.zero_point), 1, w.dtype)

        def rows(x: torch.Tensor) -> torch.Tensor:
            return conv_patches(node.attrs, taps, x)[:, torch.arange(i * k).reshape(i, k).t().reshape(-1)]

        if self.method == "gptq" and (attr(node, "groups") != 1 or len(taps) not in (1, 2)):
            raise PassError(Diagnostic(
                f"gptq on conv '{nid}' needs groups = 1 and a 1-d or 2-d kernel (it has "
                f"groups = {attr(node, 'groups')}, a {len(taps)}-d kernel); select it for method = rtn instead",
                node=nid))
        return _Target(nid, nid, "weight", matrix, groups, build, graph.operands(nid)[0], rows)

    # ---- GPTQ ------------------------------------------------------------------------------------------
    @staticmethod
    def _upstream(graph: Graph, ids: set[str]) -> dict[str, frozenset[str]]:
        """For each node, the target nodes whose outputs reach it."""
        up: dict[str, frozenset[str]] = {}
        for nid in graph.topo_order():
            s: set[str] = set()
            for p in graph.producers(nid):
                s |= up[p]
                if p in ids:
                    s.add(p)
            up[nid] = frozenset(s)
        return up

    @staticmethod
    def _collect(graph: Graph, ctx: PassContext, stage: list[_Target]) -> None:
        values = list(dict.fromkeys(t.value for t in stage))
        for t in stage:
            t.gram = torch.zeros(t.matrix.shape[1], t.matrix.shape[1], dtype=torch.float64)
            t.count = 0
        for batch in ctx.stream(graph, values):
            acts = dict(zip(values, batch))
            for t in stage:
                x = t.rows(acts[t.value].detach()).double()
                assert t.gram is not None
                t.gram += gram(x)
                t.count += x.shape[0]

    def _solve(self, graph: Graph, t: _Target, grid: Grid) -> float:
        if t.gram is None or t.count == 0:
            raise PassError(Diagnostic(f"no calibration rows reached '{t.node}'", node=t.node))
        h = t.gram * (2.0 / t.count)
        try:
            qz = gptq(t.matrix, h, t.groups, grid, damp=self.damp, act_order=self.act_order)
        except ValueError as e:
            raise PassError(Diagnostic(f"'{t.node}': {e} (option 'damp' is {self.damp})",
                                       node=t.node)) from None
        self._store(graph, t, qz)
        return output_error(t.matrix, qz.dequantized(t.groups), h)

    @staticmethod
    def _store(graph: Graph, t: _Target, qz: Quantized) -> None:
        graph.node(t.holder).params[t.param] = t.build(qz)
