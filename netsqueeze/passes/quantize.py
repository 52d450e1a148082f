"""`quantize`: static post-training int8 quantization of weights and activations (QDQ form).

Weights of conv, conv_transpose and linear become `Affine` int8 weights (per output channel, symmetric
by default); the activations entering and leaving them become `quantize` → `dequantize` pairs whose
ranges come from streamed observers over the calibration data (`passes.observers`). The backends
emit the pairs as ONNX QuantizeLinear/DequantizeLinear, or as torch code that rounds and clamps the
same way, so a torch module and its ONNX model compute the same values.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any, ClassVar, Literal

import torch
import torch.nn.functional as F

from netsqueeze.errors import Diagnostic, NetsqueezeError, NonFiniteError
from netsqueeze.ir.graph import Graph, Node, Value
from netsqueeze.ir.ops import attr, spec
from netsqueeze.ir.weights import ENCODED_FORMS, Affine
from netsqueeze.passes.allocation import bisect_int
from netsqueeze.passes.base import PassContext, PassResult, TransformPass
from netsqueeze.passes.observers import Method, QType, RangeObserver, qparams
from netsqueeze.passes.registry import register_pass

# ops whose inputs (and output) carry quantized tensors
COMPUTE = frozenset({"conv", "conv_transpose", "linear", "matmul"})
# ops the runtimes run on int8 with their own input and output ranges (QLinearAdd, QLinearConcat, QLinearAveragePool)
RANGED = frozenset({"add", "concat", "avg_pool", "adaptive_avg_pool", "mean"})
# ops that move or select values: their output reuses the input's grid, so DQ → op → Q is an int8 op
SAME_GRID = frozenset({"max_pool", "reshape", "flatten", "transpose", "squeeze", "unsqueeze", "relu"})
# activations folded into the op before them: the op's output is quantized after them (ReLU → Q fusion)
FOLDED = frozenset({"relu", "clip"})


@dataclass
class Layout:
    """Where the Q/DQ pairs go for one set of quantized nodes: tensors with their own range, tensors
    that reuse another's grid, and the nodes whose weights become int8."""

    ranged: list[Value]
    same: dict[Value, Value]  # output value -> the value whose grid it reuses
    weighted: list[str]


def _is_float(graph: Graph, v: Value) -> bool:
    return graph.meta_of(v).dtype.startswith(("float", "bfloat"))


def _produced_by_dq(graph: Graph, v: Value) -> bool:
    return graph.node(v[0]).kind in ("dequantize", "quantize")


def _folded_output(graph: Graph, v: Value) -> Value:
    """The value after a ReLU/clip that is the only reader of `v` (the runtimes fuse it into the Q)."""
    users = [(d, p) for d, p, o in graph.users(v[0]) if o == v[1]]
    if len(users) == 1 and graph.node(users[0][0]).kind in FOLDED:
        return (users[0][0], 0)
    return v


def _activation_ports(node: Node) -> tuple[int, ...]:
    return (0, 1) if node.kind == "matmul" else (0,)


def layout(graph: Graph, nodes: Iterable[str]) -> Layout:
    """The tensors to quantize when `nodes` (compute and carrier ops) run in int8."""
    chosen = set(nodes)
    order: dict[Value, None] = {}
    same: dict[Value, Value] = {}
    weighted: list[str] = []

    def add(v: Value) -> None:
        if _is_float(graph, v) and not _produced_by_dq(graph, v):
            order.setdefault(v, None)

    for nid in graph.topo_order():
        if nid not in chosen:
            continue
        node = graph.node(nid)
        operands = graph.operands(nid)
        if node.kind in COMPUTE:
            for port in _activation_ports(node):
                add(operands[port])
            add(_folded_output(graph, (nid, 0)))
            if node.kind != "matmul" and not isinstance(node.params.get("weight"), Affine):
                weighted.append(nid)
        elif node.kind in RANGED:
            for v in operands:
                add(v)
            add(_folded_output(graph, (nid, 0)))
        elif node.kind in SAME_GRID and operands and (operands[0] in order or operands[0] in same):
            out = (nid, 0)
            if out not in order and _is_float(graph, out):
                same[out] = operands[0]
    ranged = [v for v in order if v not in same]
    return Layout(ranged, same, weighted)


def _out_axis(node: Node) -> int:
    return spec(node.kind).bias["weight"][1] if "weight" in spec(node.kind).bias else 0


def layer_forward(node: Node, x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """The output of a conv or linear node without its bias, for input `x` and `weight`."""
    if node.kind == "linear":
        return F.linear(x, weight)
    a = node.attrs
    dims = weight.dim() - 2
    pads = list(a.get("padding", [0] * 2 * dims))
    begins, ends = pads[:dims], pads[dims:]
    if begins != ends:
        x = F.pad(x, [p for i in reversed(range(dims)) for p in (begins[i], ends[i])])
        begins = [0] * dims
    fn = {1: F.conv1d, 2: F.conv2d, 3: F.conv3d}[dims]
    return fn(x, weight, None, list(a["stride"]), begins, list(a["dilation"]), int(attr(node, "groups")))  # type: ignore[operator]


@dataclass
class Calibration:
    """What one pass over the calibration data measured: a range per tensor and a mean output shift per
    weighted node (bias correction)."""

    ranges: dict[Value, tuple[float, float]]
    shifts: dict[str, torch.Tensor]


@register_pass
@dataclass(frozen=True)
class Quantize(TransformPass):
    """Static post-training quantization to int8 in QDQ form, for ONNX Runtime and TensorRT.

    Needs calibration data. Selected nodes (`ctx.selected`) are the ops that run in int8: conv,
    conv_transpose, linear, matmul, and the carriers between them (add, concat, pooling, reshape,
    flatten, transpose, relu). Their weights become int8 (`weight_granularity` per output channel or
    per tensor, symmetric or not) and the float tensors entering and leaving them get a
    quantize → dequantize pair. A ReLU/clip that is the only reader of a quantized op's output is
    quantized after it (ONNX Runtime fuses Conv → ReLU → Q into one integer kernel). Reshape-like ops
    and max pooling reuse their input's grid, so they run on int8 unchanged. Biases of conv and 2-D
    linear layers whose input is quantized become int32 with scale = input scale × weight scale, as
    ONNX Runtime's QLinearConv/QGemm and TensorRT read them. A tensor already quantized (by an earlier
    `quantize` statement) is reused, so per-node settings are separate statements with selectors.

    Activation ranges (`calibrate`): minmax, percentile (`percentile`), entropy (KL, TensorRT's
    calibrator) or mse, observed on the graph before this pass's Q/DQ pairs (a model output keeps its
    min/max range whatever the method: clipped logits would tie the top classes); `activations` int8 or
    uint8, asymmetric unless `activation_symmetric` (TensorRT wants symmetric int8).

    Bias correction (Nagel et al., ICCV 2019, empirical form): the mean output shift that weight
    quantization causes, E[f(x; W_q) − f(x; W)] per output channel over the calibration data, is
    subtracted from the bias.

    Mixed precision: under a policy guard, when the fully quantized graph misses it, each layer's
    sensitivity is measured (the guard's metric with only that layer quantized) and the most sensitive
    layers stay in float — the fewest that meet the guard; the result notes list them with their
    measured sensitivities.
    """

    name: ClassVar[str] = "quantize"
    weight_granularity: Literal["per_channel", "per_tensor"] = "per_channel"
    weight_symmetric: bool = True
    activations: QType = "uint8"
    activation_symmetric: bool = False
    calibrate: Method = "minmax"
    percentile: float = field(default=99.99, metadata={"min": 50.0, "max": 100.0})
    bins: int = field(default=2048, metadata={"min": 256, "max": 65536})
    bias_correction: bool = True
    mixed_precision: bool = True

    @classmethod
    def option_conflicts(cls, given: Mapping[str, Any]) -> list[tuple[str, str]]:
        """An observer option written with a `calibrate` method that does not read it, at the option: `percentile`
        is read by `percentile` alone, `bins` (the histogram's) by `percentile`, `entropy` and `mse`."""
        method = cls.with_defaults(given)["calibrate"]
        out = []
        if "percentile" in given and method != "percentile":
            out.append(("percentile", f"option 'percentile' applies to calibrate = percentile, not {method}"))
        if "bins" in given and method == "minmax":
            out.append(("bins", "option 'bins' applies to calibrate = percentile, entropy or mse (a histogram), not "
                                "minmax"))
        return out

    def run(self, graph: Graph, ctx: PassContext) -> PassResult:
        chosen = [n.id for n in graph.nodes() if ctx.is_selected(n.id) and n.kind in COMPUTE | RANGED | SAME_GRID]
        compute = [n for n in chosen if graph.node(n).kind in COMPUTE]
        if not compute:
            return PassResult(notes=["quantize: no conv, conv_transpose, linear or matmul selected"])
        full = layout(graph, chosen)
        cal = self._calibrate(graph, ctx, full)
        notes: list[str] = []
        candidate = self._apply(graph.copy(), chosen, cal)
        kept_float: list[str] = []
        check = ctx.guard_check(candidate) if self.mixed_precision else None
        if check is not None and not check[0]:
            candidate, kept_float, more = self._mixed(graph, ctx, chosen, compute, cal, check[1])
            notes.extend(more)
        graph.assign(candidate)
        graph.infer_shapes()
        result = PassResult(changed=True, touched=set(chosen) - set(kept_float), notes=notes)
        n_pairs = len(graph.by_kind("quantize"))
        result.metrics.update({"quantized_layers": float(len(compute) - len(kept_float)),
                               "float_layers": float(len(kept_float)), "qdq_pairs": float(n_pairs)})
        return result

    # ---- calibration ----
    def _observer(self, graph: Graph, v: Value) -> RangeObserver:
        # a model output keeps its whole observed range: clipped logits tie the top classes
        output = any(graph.node(d).kind == "output" for d, _, o in graph.users(v[0]) if o == v[1])
        return RangeObserver("minmax" if output else self.calibrate, symmetric=self.activation_symmetric,
                             percentile=self.percentile, bins=self.bins, qtype=self.activations)

    def _calibrate(self, graph: Graph, ctx: PassContext, lay: Layout) -> Calibration:
        # every tensor that some sub-layout may range on its own: the same-grid outputs too
        values = list(dict.fromkeys([*lay.ranged, *lay.same]))
        obs = {v: self._observer(graph, v) for v in values}
        corrected = [n for n in lay.weighted if self.bias_correction and graph.node(n).kind in ("conv", "linear")]
        inputs = {n: graph.operands(n)[0] for n in corrected}
        deltas = {n: self._weight_error(graph.node(n)) for n in corrected}
        taps = list(dict.fromkeys([*values, *inputs.values()]))
        pos = {v: i for i, v in enumerate(taps)}
        sums: dict[str, torch.Tensor] = {}
        counts: dict[str, int] = {}
        batches = 0
        for batch in ctx.stream(graph, taps):
            batches += 1
            for v in values:
                t = batch[pos[v]]
                if t.is_floating_point() and not bool(torch.isfinite(t).all()):
                    raise NonFiniteError(Diagnostic(
                        f"quantize: calibration batch {batches - 1} gives non-finite values (NaN or Inf) at the output "
                        f"of this node: its range, and so its grid, is undefined", node=v[0]))
                obs[v].update(t)
            for n in corrected:
                node = graph.node(n)
                y = layer_forward(node, batch[pos[inputs[n]]].to(torch.float64), deltas[n])
                axis = 1 if node.kind != "linear" else y.dim() - 1
                s = y.movedim(axis, -1).reshape(-1, y.shape[axis])
                sums[n] = sums.get(n, torch.zeros(y.shape[axis], dtype=torch.float64)) + s.sum(0)
                counts[n] = counts.get(n, 0) + s.shape[0]
        if batches == 0:
            raise NetsqueezeError(Diagnostic("quantize: the calibration data yielded no batch"))
        if any(o.needs_histogram for o in obs.values()):
            for batch in ctx.stream(graph, values):
                for i, v in enumerate(values):
                    obs[v].update_histogram(batch[i])
        ranges = {}
        for v, o in obs.items():
            try:
                ranges[v] = o.range()
            except ValueError:
                raise NetsqueezeError(Diagnostic(
                    f"quantize: no calibration values reached output {v[1]} of '{v[0]}'", node=v[0])) from None
        shifts = {n: sums[n] / max(1, counts[n]) for n in sums}
        return Calibration(ranges, shifts)

    def _weight(self, node: Node) -> Affine:
        w = node.dense("weight", accept=ENCODED_FORMS)
        axis = _out_axis(node) if self.weight_granularity == "per_channel" else None
        return Affine.quantize(w, bits=8, signed=True, axis=axis, symmetric=self.weight_symmetric)

    def _weight_error(self, node: Node) -> torch.Tensor:
        w = node.dense("weight", accept=ENCODED_FORMS)
        return (self._weight(node).dense().to(torch.float64) - w.to(torch.float64))

    # ---- rewriting ----
    def _apply(self, graph: Graph, nodes: Iterable[str], cal: Calibration) -> Graph:
        lay = layout(graph, nodes)
        grids: dict[Value, tuple[float, int]] = {}
        for v in lay.ranged:
            grids[v] = qparams(*cal.ranges[v], self.activations, symmetric=self.activation_symmetric)
        for v, src in lay.same.items():
            grids[v] = grids[src]
        for nid in lay.weighted:
            node = graph.node(nid)
            wq = self._weight(node)
            if nid in cal.shifts:
                b = node.dense("bias", accept=ENCODED_FORMS).to(torch.float64) if "bias" in node.params \
                    else torch.zeros(wq.shape[_out_axis(node)], dtype=torch.float64)
                node.params["bias"] = (b - cal.shifts[nid]).to(torch.float32)
            node.params["weight"] = wq
            x = graph.operands(nid)[0]
            rank2 = node.kind == "linear" and len(graph.meta_of(x).shape) == 2
            if "bias" in node.params and x in grids and (node.kind == "conv" or rank2):
                bias = node.dense("bias", accept=ENCODED_FORMS)
                wq = _room_for_bias(wq, bias, grids[x][0])
                node.params["weight"] = wq
                node.params["bias"] = _int32_bias(bias, grids[x][0], wq)
        for v in [*lay.ranged, *lay.same]:
            _insert_pair(graph, v, *grids[v], self.activations)
        graph.infer_shapes()
        return graph

    def _mixed(self, graph: Graph, ctx: PassContext, chosen: list[str], compute: list[str], cal: Calibration,
               reached: float) -> tuple[Graph, list[str], list[str]]:
        assert ctx.guard is not None
        metric, limit = ctx.guard
        sens: dict[str, float] = {}
        for n in compute:  # sensitivity: the guard's metric with only this layer quantized
            value = ctx.fidelity(self._apply(graph.copy(), [n], cal), metric)
            sens[n] = float("inf") if value is None else value
        ranked = sorted(compute, key=lambda n: (-sens[n], n))

        def build(k: int) -> Graph:
            keep = set(ranked[:k])
            return self._apply(graph.copy(), [n for n in chosen if n not in keep], cal)

        def ok(k: int) -> bool:
            check = ctx.guard_check(build(k))
            return check is not None and check[0]

        # the fewest most-sensitive layers in float that meet the guard: ok(0) failed, all in float is the original
        k = bisect_int(len(compute), 0, ok)
        kept = ranked[:k]
        shown = ", ".join(f"{n} ({metric} {sens[n]:.4g} alone)" for n in kept)
        notes = [f"quantize: fully quantized, {metric} is {reached:.4g}, over the guard's {limit:g}; "
                 f"{len(kept)} of {len(compute)} layers stay in float (most sensitive first): {shown}"]
        if k == len(compute):
            notes.append("quantize: only the unquantized model meets the guard; nothing is quantized")
            return graph.copy(), list(compute), notes
        return build(k), kept, notes


def _int32_bias(b: torch.Tensor, x_scale: float, w: Affine) -> Affine:
    """The bias as int32 on the grid input scale × weight scale (what integer kernels add to the int32
    accumulator); `_room_for_bias` made the grid coarse enough for it."""
    ws = w.scale.to(torch.float64).reshape(-1)
    if ws.numel() == 1:
        ws = ws.expand(b.shape[0])
    scale = (ws * x_scale).to(torch.float32)
    scale = torch.where(scale > 0, scale, torch.ones_like(scale))
    q = torch.round(b.to(torch.float64) / scale.to(torch.float64)).clamp(-(2**31), 2**31 - 1)
    return Affine(q.to(torch.int32), scale.contiguous(), None, 0, 0, 32, True, b.dtype)


def _room_for_bias(w: Affine, b: torch.Tensor, x_scale: float) -> Affine:
    """`w` with its scale raised where the int32 bias grid (input scale × weight scale) is too fine for the bias
    (a large bias over tiny weights: 0.5 over weights of 1e-9), as ONNX Runtime's quantizer does; the weights of
    such a channel are requantized on the coarser grid (they are tiny beside it). Runtimes that fuse the QDQ
    pattern requantize a float bias themselves, clamped: keeping it float is no way out. `w` is per tensor or
    per output channel (axis 0), as `Quantize._weight` makes it."""
    need = b.detach().to(torch.float64).abs() / (x_scale * (2**31 - 1)) * (1 + 1e-6)
    old = w.scale.to(torch.float64)
    new = torch.maximum(old, need.max()) if old.dim() == 0 else torch.maximum(old, need)
    if bool((new == old).all()):
        return w
    shape = (-1,) + (1,) * (len(w.shape) - 1) if old.dim() else ()
    dense = w.dense().to(torch.float64)
    zp = 0 if w.zero_point is None else w.zero_point.to(torch.float64).reshape(shape)
    lo, hi = -(2 ** (w.bits - 1)) if w.signed else 0, 2 ** (w.bits - 1) - 1 if w.signed else 2**w.bits - 1
    q = (torch.round(dense / new.reshape(shape)) + zp).clamp(lo, hi).to(w.q.dtype)
    return Affine(q, new.to(w.scale.dtype), w.zero_point, w.axis, 0, w.bits, w.signed, w.dtype)


def _insert_pair(graph: Graph, v: Value, scale: float, zp: int, qtype: QType) -> None:
    users = [(d, p) for d, p, o in graph.users(v[0]) if o == v[1]]
    dt = torch.int8 if qtype == "int8" else torch.uint8
    base = v[0] if v[1] == 0 else f"{v[0]}.out{v[1]}"

    def params() -> dict[str, torch.Tensor]:
        return {"scale": torch.tensor(scale, dtype=torch.float32), "zero_point": torch.tensor(zp, dtype=dt)}

    q = graph.add_node(f"{base}.quantize", "quantize", [v], attrs={"axis": 1}, params=params(), unique=True)
    dq = graph.add_node(f"{base}.dequantize", "dequantize", [(q, 0)], attrs={"axis": 1}, params=params(),
                        unique=True)
    for d, p in users:
        graph.set_operand(d, p, (dq, 0))
