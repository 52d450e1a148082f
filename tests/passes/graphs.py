"""Hand-built IR graphs and a small reference interpreter for the structural-pass tests.

Graphs whose weights matter to a test (which channels a pass removes, which BatchNorm folds) are clearer
as IR text: `golden/*.in.ir`, read with `load_ir` (the text form: `netsqueeze/ir/parser.py`). The builders
below stay for the tests that need only a shape-correct graph with random weights.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from pathlib import Path

import torch
import torch.nn.functional as F

from netsqueeze.ir.graph import Graph, Value
from netsqueeze.ir.parser import parse_graph
from netsqueeze.ir.weights import dense
from netsqueeze.passes.base import PassContext
from netsqueeze.passes.dependency import ChannelGroup

GOLDEN = Path(__file__).parent / "golden"


def load_ir(name: str) -> Graph:
    """The graph of `golden/NAME` (errors name the file as `golden/NAME:line:col`)."""
    return parse_graph((GOLDEN / name).read_text(), file=f"golden/{name}")


def _t(*shape: int, scale: float = 0.3) -> torch.Tensor:
    return torch.randn(*shape) * scale


def conv(g: Graph, id: str, x: Value | str, cin: int, cout: int, k: int = 3, groups: int = 1,
         bias: bool = True) -> str:
    params = {"weight": _t(cout, cin // groups, k, k)}
    if bias:
        params["bias"] = _t(cout)
    p = k // 2
    return g.add_node(id, "conv", [x], attrs={"stride": (1, 1), "padding": (p, p, p, p), "dilation": (1, 1),
                                              "groups": groups}, params=params)


def bn(g: Graph, id: str, x: str, c: int) -> str:
    return g.add_node(id, "batch_norm", [x], attrs={"eps": 1e-5}, params={
        "running_mean": _t(c), "running_var": torch.rand(c) + 0.5, "weight": torch.rand(c) + 0.5, "bias": _t(c)})


def linear(g: Graph, id: str, x: str, fin: int, fout: int) -> str:
    return g.add_node(id, "linear", [x], params={"weight": _t(fout, fin), "bias": _t(fout)})


def mlp() -> Graph:
    torch.manual_seed(0)
    g = Graph("mlp")
    x = g.add_node("x", "input", attrs={"shape": (4, 10)})
    h = g.add_node("relu1", "relu", [linear(g, "fc1", x, 10, 16)])
    h = g.add_node("relu2", "relu", [linear(g, "fc2", h, 16, 12)])
    g.add_node("out", "output", [linear(g, "fc3", h, 12, 3)])
    g.infer_shapes()
    return g


def cnn() -> Graph:
    """conv-bn-relu ×2 with a residual add, concat, depthwise conv, flatten→linear."""
    torch.manual_seed(0)
    g = Graph("cnn")
    x = g.add_node("x", "input", attrs={"shape": (2, 3, 8, 8)})
    a = g.add_node("relu1", "relu", [bn(g, "bn1", conv(g, "conv1", x, 3, 8), 8)])
    b = g.add_node("relu2", "relu", [bn(g, "bn2", conv(g, "conv2", a, 8, 8), 8)])
    r = g.add_node("add", "add", [a, b])
    c = conv(g, "conv3", r, 8, 6, k=1)
    cat = g.add_node("cat", "concat", [r, c], attrs={"axis": 1})
    dw = g.add_node("relu3", "relu", [conv(g, "dw", cat, 14, 14, groups=14)])
    gc = conv(g, "gconv", dw, 14, 8, k=1, groups=2)
    p = g.add_node("pool", "max_pool", [gc], attrs={"kernel": (2, 2), "stride": (2, 2)})
    f = g.add_node("flat", "flatten", [p], attrs={"start_dim": 1})
    g.add_node("out", "output", [linear(g, "fc", f, 8 * 16, 5)])
    g.infer_shapes()
    return g


def attention() -> Graph:
    torch.manual_seed(0)
    e, h, dh = 8, 2, 4
    g = Graph("attn")
    x = g.add_node("x", "input", attrs={"shape": (2, 5, e)})
    a = g.add_node("attn", "attention", [x, x, x], attrs={"num_heads": h, "embed_dim": e, "head_dim": dh,
                                                          "batch_first": True},
                   params={"in_proj_weight": _t(3 * h * dh, e), "in_proj_bias": _t(3 * h * dh),
                           "out_proj_weight": _t(e, h * dh), "out_proj_bias": _t(e)})
    f = g.add_node("fc1", "linear", [a], params={"weight": _t(12, e), "bias": _t(12)})
    f = g.add_node("gelu", "gelu", [f])
    g.add_node("out", "output", [linear(g, "fc2", f, 12, e)])
    g.infer_shapes()
    return g


# ---- a reference interpreter (the torch backend is another engineer's; tests must not wait for it) ----
def _attention(node_attrs: dict, p: dict[str, torch.Tensor], q: torch.Tensor, k: torch.Tensor,
               v: torch.Tensor) -> torch.Tensor:
    h, dh = node_attrs["num_heads"], node_attrs["head_dim"]
    w, b = p["in_proj_weight"], p.get("in_proj_bias")
    qkv = [F.linear(t, w[i * h * dh:(i + 1) * h * dh], None if b is None else b[i * h * dh:(i + 1) * h * dh])
           for i, t in enumerate((q, k, v))]
    n, lq = q.shape[0], q.shape[1]
    qh, kh, vh = (t.reshape(n, t.shape[1], h, dh).transpose(1, 2) for t in qkv)
    att = torch.softmax(qh @ kh.transpose(-1, -2) / dh ** 0.5, -1) @ vh
    return F.linear(att.transpose(1, 2).reshape(n, lq, h * dh), p["out_proj_weight"], p.get("out_proj_bias"))


def run(graph: Graph, inputs: Sequence[torch.Tensor], extra: Sequence[Value] = ()) -> list[torch.Tensor]:
    env: dict[Value, torch.Tensor] = {}
    for nid, t in zip(graph.inputs, inputs):
        env[(nid, 0)] = t
    for node in graph.nodes():
        if node.kind == "input":
            continue
        xs = [env[v] for v in graph.operands(node.id)]
        a, k = node.attrs, node.kind
        p = {name: dense(w) for name, w in node.params.items()}  # encoded weights run decoded
        if k == "output":
            y: torch.Tensor | list[torch.Tensor] = xs[0]
        elif k == "conv":
            pad = a["padding"]
            y = F.conv2d(xs[0], p["weight"], p.get("bias"), a["stride"], (pad[0], pad[1]), a["dilation"],
                         a["groups"])
        elif k == "linear":
            y = F.linear(xs[0], p["weight"], p.get("bias"))
        elif k == "batch_norm":
            y = F.batch_norm(xs[0], p["running_mean"], p["running_var"], p.get("weight"), p.get("bias"),
                             False, 0.0, a["eps"])
        elif k == "layer_norm":
            y = F.layer_norm(xs[0], a["normalized_shape"], p.get("weight"), p.get("bias"), a.get("eps", 1e-5))
        elif k in ("relu", "gelu", "sigmoid", "hardswish"):
            y = getattr(F, k)(xs[0])
        elif k in ("add", "mul", "sub"):
            y = getattr(torch, k)(xs[0], xs[1])
        elif k == "concat":
            y = torch.cat(xs, a["axis"])
        elif k == "split":
            y = list(torch.split(xs[0], list(a["sizes"]), a["axis"]))
        elif k == "slice":
            idx = [slice(None)] * xs[0].dim()
            idx[a["axis"]] = slice(a["start"], a["end"], a.get("step", 1))
            y = xs[0][tuple(idx)]
        elif k == "gather":
            y = xs[0].index_select(a["axis"], torch.tensor(list(a["indices"])))
        elif k == "max_pool":
            y = F.max_pool2d(xs[0], a["kernel"], a["stride"])
        elif k == "adaptive_avg_pool":
            y = F.adaptive_avg_pool2d(xs[0], a["output_size"])
        elif k == "flatten":
            y = torch.flatten(xs[0], a.get("start_dim", 1), a.get("end_dim", -1))
        elif k == "reshape":
            shape = [xs[0].shape[i] if d == 0 else d for i, d in enumerate(a["shape"])]
            y = xs[0].reshape(shape)
        elif k == "transpose":
            y = xs[0].permute(*a["perm"])
        elif k == "mean":
            y = xs[0].mean(dim=tuple(a["axes"]), keepdim=a.get("keepdim", False))
        elif k == "attention":
            y = _attention(a, p, xs[0], xs[1], xs[2])
        elif k == "constant":
            y = p["value"]
        else:
            raise NotImplementedError(k)
        outs = y if isinstance(y, list) else [y]
        for i, t in enumerate(outs):
            env[(node.id, i)] = t
    return [env[v] for v in graph.output_values()] + [env[v] for v in extra]


def input_batches(graph: Graph, n: int = 4, seed: int = 1) -> list[list[torch.Tensor]]:
    gen = torch.Generator().manual_seed(seed)
    return [[torch.randn(*graph.node(i).attrs["shape"], generator=gen) for i in graph.inputs] for _ in range(n)]


def stream_ctx(batches: list[list[torch.Tensor]],
               runner: Callable[[Graph, Sequence[torch.Tensor], Sequence[Value]], list[torch.Tensor]] | None = None,
               **kw: object) -> PassContext:
    """A PassContext whose calibration stream runs `runner` (default: the reference interpreter)."""
    fn = runner or run

    def stream(graph: Graph, values: Sequence[Value]) -> Iterator[list[torch.Tensor]]:
        for b in batches:
            outs = fn(graph, b, values)
            yield outs[len(outs) - len(values):]

    return PassContext(stream_fn=stream, **kw)  # type: ignore[arg-type]


def zero_channels(graph: Graph, group: ChannelGroup, drop: Sequence[int]) -> None:
    """Zeroes what creates the `drop` channels of `group` (producer weights, biases, norm affine params)."""
    for m in group.members:
        if m.param is None or m.role == "consumer" or m.param in ("running_mean", "running_var"):
            continue
        t = graph.node(m.node).dense(m.param)
        pos = torch.tensor([p for c in drop for p in m.index[c]], dtype=torch.long)
        t.index_fill_(m.axis, pos, 0.0)


def relu_mlp(depth: int, inputs: int = 16, width: int = 32, outputs: int = 4) -> torch.nn.Module:
    """`depth` linear+ReLU layers of `width` and a linear head (seeded): `depth` prunable groups in a chain."""
    torch.manual_seed(0)
    layers: list[torch.nn.Module] = []
    for i in range(depth):
        layers += [torch.nn.Linear(inputs if i == 0 else width, width), torch.nn.ReLU()]
    return torch.nn.Sequential(*layers, torch.nn.Linear(width, outputs)).eval()
