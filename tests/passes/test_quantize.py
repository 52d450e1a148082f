"""`quantize` and `equalize`: observers against closed forms, bias correction, exact equalization, QDQ
placement that ONNX Runtime fuses and TensorRT accepts, torch = ORT, selectors, mixed precision, determinism."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from torch import nn

import netsqueeze as ns
from netsqueeze.backends.onnx import to_onnx
from netsqueeze.backends.torch import to_torch
from netsqueeze.errors import NetsqueezeError
from netsqueeze.frontends.onnx import from_onnx
from netsqueeze.ir.weights import Affine
from netsqueeze.passes.base import PassContext
from netsqueeze.passes.observers import RangeObserver, kl_threshold, qparams
from netsqueeze.passes.quantize import Quantize, layer_forward
from tests.frontends.onnx_models import LIGHT_MODELS, input_shapes, light_path, randomized
from tests.passes.graphs import cnn
from tests.zoo import ZOO


def _observe(method: str, data: torch.Tensor, batches: int = 4, **kw: object) -> tuple[float, float]:
    o = RangeObserver(method, **kw)  # type: ignore[arg-type]
    chunks = data.chunk(batches)
    for c in chunks:
        o.update(c)
    if o.needs_histogram:
        for c in chunks:
            o.update_histogram(c)
    return o.range()


# ---- observers ----
def test_minmax_is_the_streamed_extremes_with_zero_inside() -> None:
    x = torch.tensor([0.5, 2.0, 3.0, 1.0])
    assert _observe("minmax", x, batches=2) == (0.0, 3.0)
    y = torch.tensor([-1.5, -0.25, 0.75, 0.5])
    assert _observe("minmax", y, batches=2) == (-1.5, 0.75)
    assert _observe("minmax", y, batches=2, symmetric=True) == (-1.5, 1.5)


def test_percentile_matches_the_quantile_of_uniform_data() -> None:
    x = torch.linspace(-1.0, 1.0, 200_001)
    lo, hi = _observe("percentile", x, percentile=99.0, bins=2000)
    assert abs(hi - 0.98) < 2e-3 and abs(lo + 0.98) < 2e-3  # the 1st and 99th percentiles of U[-1, 1]
    lo, hi = _observe("percentile", x, percentile=99.0, bins=2000, symmetric=True)
    assert abs(hi - 0.99) < 2e-3 and lo == -hi  # the 99th percentile of |x| ~ U[0, 1]


def test_entropy_keeps_a_flat_range_and_clips_a_lone_outlier() -> None:
    flat = torch.linspace(0.0, 1.0, 100_000)
    assert _observe("entropy", flat)[1] > 0.95
    g = torch.Generator().manual_seed(0)
    peaked = torch.cat([torch.randn(200_000, generator=g).abs(), torch.tensor([50.0])])
    lo, hi = _observe("entropy", peaked)
    assert lo == 0.0 and 2.0 < hi < 10.0  # far below the outlier, above the bulk of |N(0, 1)|


def test_kl_threshold_is_the_full_range_when_the_histogram_has_fewer_bins_than_levels() -> None:
    assert kl_threshold(np.ones(100), np.linspace(0, 3, 101), levels=128) == 3.0


def test_mse_keeps_uniform_data_and_clips_heavy_tails() -> None:
    u = torch.linspace(-1.0, 1.0, 100_001)
    lo, hi = _observe("mse", u)
    assert hi >= 0.97 and lo <= -0.97
    g = torch.Generator().manual_seed(0)
    tailed = torch.cat([torch.randn(1_000_000, generator=g), torch.tensor([-30.0, 30.0])])
    lo, hi = _observe("mse", tailed)
    assert 2.0 < hi < 15.0 and -15.0 < lo < -2.0  # the two outliers are clipped, the bulk is kept


def test_histogram_streams_like_one_batch() -> None:
    g = torch.Generator().manual_seed(1)
    x = torch.randn(10_000, generator=g)
    assert _observe("percentile", x, batches=1, percentile=99.9) == _observe("percentile", x, batches=7,
                                                                               percentile=99.9)


def test_qparams_closed_forms() -> None:
    scale, zp = qparams(-1.0, 3.0, "uint8", symmetric=False)
    assert scale == pytest.approx(4.0 / 255, rel=1e-7) and zp == 64  # round(0 + 1 / (4/255)) = round(63.75)
    scale, zp = qparams(-1.0, 3.0, "int8", symmetric=True)
    assert scale == pytest.approx(3.0 / 127, rel=1e-7) and zp == 0
    scale, zp = qparams(0.0, 2.55, "int8", symmetric=False)
    assert zp == -128 and scale == pytest.approx(0.01, rel=1e-6)  # ReLU outputs: zero is the lowest code
    assert qparams(0.0, 0.0, "uint8", symmetric=False) == (1.0, 0)


# ---- bias correction ----
def _dense_graph() -> ns.ir.Graph:  # type: ignore[name-defined]
    g = cnn()
    from netsqueeze.passes.fold_bn import FoldBN

    FoldBN().run(g, PassContext())
    g.infer_shapes()
    return g


def _ctx(g: object, n: int = 3, **kw: object) -> PassContext:
    gen = torch.Generator().manual_seed(5)
    batches = [[torch.randn(2, 3, 8, 8, generator=gen) * 2 + 0.5] for _ in range(n)]

    def stream(graph, values):  # type: ignore[no-untyped-def]
        module = to_torch(graph, extra_outputs=list(values))
        for b in batches:
            with torch.no_grad():
                outs = module(*b)
            yield list(outs[len(graph.outputs):])

    return PassContext(stream_fn=stream, **kw)  # type: ignore[arg-type]


def _mean_shift(orig, new, node_id: str, ctx: PassContext) -> torch.Tensor:  # type: ignore[no-untyped-def]
    """Mean over the calibration data of (quantized-weight layer − original layer) per output channel,
    both on the original graph's inputs to that layer."""
    o, n = orig.node(node_id), new.node(node_id)
    x_val = orig.operands(node_id)[0]
    total, count = 0.0, 0
    for (x,) in ctx.stream(orig, [x_val]):
        x = x.double()
        y0 = layer_forward(o, x, o.dense("weight").double()) + o.dense("bias").double().reshape(1, -1, 1, 1)
        y1 = layer_forward(n, x, n.params["weight"].dense().double()) \
            + n.params["bias"].dense().double().reshape(1, -1, 1, 1)
        d = (y1 - y0).transpose(0, 1).reshape(y0.shape[1], -1)
        total = total + d.sum(1)
        count += d.shape[1]
    return total / count  # type: ignore[return-value]


def test_bias_correction_removes_the_mean_shift() -> None:
    orig = _dense_graph()
    shifts = {}
    for corrected in (False, True):
        g = orig.copy()
        ctx = _ctx(g)
        Quantize(bias_correction=corrected, weight_granularity="per_tensor").run(g, ctx)
        shifts[corrected] = _mean_shift(orig, g, "dw", ctx).abs().max().item()
    # what remains is the int32 rounding of the corrected bias (scale = x scale × w scale)
    assert shifts[False] > 1e-3 and shifts[True] < 0.02 * shifts[False]


# ---- equalize ----
class _DW(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.pw1 = nn.Conv2d(4, 16, 1)
        self.dw = nn.Conv2d(16, 16, 3, padding=1, groups=16)
        self.pw2 = nn.Conv2d(16, 8, 1)
        self.fc1 = nn.Linear(8 * 6 * 6, 12)
        self.fc2 = nn.Linear(12, 3)
        with torch.no_grad():  # per-channel ranges that differ by 1000×
            self.dw.weight.mul_(torch.logspace(-2, 1, 16).reshape(16, 1, 1, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.relu(self.dw(torch.relu(self.pw1(x))))
        x = torch.relu(self.pw2(x)).flatten(1)
        return self.fc2(torch.relu(self.fc1(x)))


def test_equalize_is_exact_and_equalizes_ranges() -> None:
    torch.manual_seed(0)
    m = _DW().eval()
    x = torch.randn(5, 4, 6, 6)
    res = ns.compile(m, "policy e { input x: float32[5, 4, 6, 6]\n equalize }", example_inputs=(x,))
    g = res.graph
    with torch.no_grad():
        ref, out = m(x), res.model(x)
    assert (out - ref).abs().max().item() <= 1e-5 * max(1.0, ref.abs().max().item())
    r_dw_out = g.node("dw").params["weight"].abs().reshape(16, -1).amax(1)
    r_pw2_in = g.node("pw2").params["weight"].abs().transpose(0, 1).reshape(16, -1).amax(1)
    assert torch.allclose(r_dw_out, r_pw2_in, rtol=1e-4)
    r_pw1_out = g.node("pw1").params["weight"].abs().reshape(16, -1).amax(1)
    r_dw_in = g.node("dw").params["weight"].abs().reshape(16, -1).amax(1)
    spread_before = m.dw.weight.abs().reshape(16, -1).amax(1)
    # the sweep balances the chain pw1 → dw → pw2; the depthwise ranges are far closer together
    assert (r_dw_in.max() / r_dw_in.min()) < 0.1 * (spread_before.max() / spread_before.min())
    assert r_pw1_out.shape == (16,)
    assert res.report.passes[0].result.metrics["pairs"] == 3.0  # pw1-dw, dw-pw2, fc1-fc2


# ---- end to end: placement, runtimes, equality ----
def _compile(model: nn.Module, x: torch.Tensor, body: str, target: str = "onnx", **kw: object) -> ns.CompileResult:
    shape = ", ".join(str(d) for d in x.shape)
    pol = f"policy q {{ input x: float32[{shape}]\n {body} }}"
    return ns.compile(model, pol, example_inputs=(x,), calibration=[x], target=target, **kw)  # type: ignore[arg-type]


def _ort(model: onnx.ModelProto, *xs: np.ndarray) -> np.ndarray:
    s = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    return s.run(None, {i.name: x for i, x in zip(s.get_inputs(), xs)})[0]


def _optimized_ops(model: onnx.ModelProto, tmp_path) -> list[str]:  # type: ignore[no-untyped-def]
    so = ort.SessionOptions()
    so.optimized_model_filepath = str(tmp_path / "opt.onnx")
    so.log_severity_level = 3
    ort.InferenceSession(model.SerializeToString(), so, providers=["CPUExecutionProvider"])
    return [n.op_type for n in onnx.load(str(tmp_path / "opt.onnx")).graph.node]


class _Res(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.c1 = nn.Conv2d(3, 16, 3, padding=1)
        self.c2 = nn.Conv2d(16, 16, 3, padding=1)
        self.c3 = nn.Conv2d(16, 32, 1)
        self.fc = nn.Linear(32, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        a = torch.relu(self.c1(x))
        b = torch.relu(self.c2(a))
        c = torch.relu(self.c3(a + b))
        return self.fc(nn.functional.adaptive_avg_pool2d(c, 1).flatten(1))


def test_onnx_runtime_fuses_every_conv_and_the_residual_add(tmp_path) -> None:  # type: ignore[no-untyped-def]
    torch.manual_seed(0)
    m, x = _Res().eval(), torch.randn(8, 3, 8, 8)
    res = _compile(m, x, "quantize")
    ops = _optimized_ops(res.model, tmp_path)
    assert ops.count("QLinearConv") == 3 and ops.count("QLinearAdd") == 1
    assert "Conv" not in ops and "Add" not in ops


def test_tensorrt_rules_symmetric_int8(tmp_path) -> None:  # type: ignore[no-untyped-def]
    torch.manual_seed(0)
    m, x = _Res().eval(), torch.randn(8, 3, 8, 8)
    model = _compile(m, x, "quantize { activations = int8, activation_symmetric = true }").model
    inits = {i.name: onnx.numpy_helper.to_array(i) for i in model.graph.initializer}
    consts = {n.output[0]: onnx.numpy_helper.to_array(n.attribute[0].t) for n in model.graph.node
              if n.op_type == "Constant"}
    vals = {**inits, **consts}
    producer = {o: n for n in model.graph.node for o in n.output}
    for n in model.graph.node:
        if n.op_type in ("QuantizeLinear", "DequantizeLinear") and len(n.input) > 2 and n.input[2] in vals:
            zp = vals[n.input[2]]
            assert zp.dtype in (np.int8, np.int32) and not zp.any(), f"{n.name}: zero point must be 0 (symmetric)"
        if n.op_type in ("Conv", "Gemm", "MatMul"):
            for i in n.input[:2]:
                assert producer[i].op_type == "DequantizeLinear", f"{n.name}: input {i} is not dequantized"
            w_dq = producer[n.input[1]]
            axis = {a.name: a.i for a in w_dq.attribute}.get("axis", 1)
            scale = vals[w_dq.input[1]]
            assert scale.ndim == 1 and axis == 0, f"{n.name}: weights must be per output channel"
        if n.op_type == "Add":
            assert all(producer[i].op_type == "DequantizeLinear" for i in n.input), f"{n.name}: residual add"


def test_torch_equals_onnx_runtime_within_one_step() -> None:
    torch.manual_seed(0)
    m, x = _Res().eval(), torch.randn(8, 3, 8, 8)
    onnx_model = _compile(m, x, "quantize").model
    res = _compile(m, x, "quantize", target="torch")
    with torch.no_grad():
        y_torch = res.model(x).numpy()
    y_ort = _ort(onnx_model, x.numpy())
    step = res.graph.node("fc.quantize").params["scale"].item()  # the output's grid
    assert np.abs(y_torch - y_ort).max() <= step * (1 + 1e-4)
    sd = res.model.state_dict()
    assert any(v.dtype == torch.int8 for v in sd.values())  # int8 data in the state_dict


@pytest.mark.parametrize("name", [n for n in ZOO if n != "unknown_op"])
def test_every_zoo_model_quantizes_and_runs_in_torch_and_ort(name: str) -> None:
    model, inputs = ZOO[name]()
    names = ["x"] if len(inputs) == 1 else [f"x{i}" for i in range(len(inputs))]
    decl = "\n ".join(f"input {n}: {str(t.dtype).removeprefix('torch.')}[{', '.join(map(str, t.shape))}]"
                      for n, t in zip(names, inputs))
    pol = f"policy q {{ {decl}\n fold_bn\n quantize }}"
    res = ns.compile(model, pol, example_inputs=inputs, calibration=[inputs], target="torch")
    res.graph.verify()
    assert res.graph.by_kind("quantize"), name
    assert any(isinstance(w, Affine) for n in res.graph.nodes() for w in n.params.values())
    onnx_model = to_onnx(res.graph)
    with torch.no_grad():
        y_torch = res.model(*inputs)
        ref = model(*inputs)
    y_torch = y_torch[0] if isinstance(y_torch, (tuple, list)) else y_torch
    ref = ref[0] if isinstance(ref, (tuple, list)) else ref
    y_ort = _ort(onnx_model, *[t.numpy() for t in inputs])
    out = res.graph.operands(res.graph.outputs[0])[0]
    node = res.graph.node(out[0])
    step = node.params["scale"].item() if node.kind == "dequantize" else 0.0
    # one output grid step, or float rounding where the output is not itself quantized
    tol = step * (1 + 1e-4) + 1e-4 * max(1.0, float(np.abs(y_ort).max()))
    assert np.abs(y_torch.numpy() - y_ort).max() <= tol, name
    # int8 stays close to fp32 on these random models
    rel = float((y_torch - ref).norm() / ref.norm())
    assert rel < 0.15, (name, rel)


def test_selectors_choose_per_node_settings() -> None:
    torch.manual_seed(0)
    m, x = _Res().eval(), torch.randn(8, 3, 8, 8)
    body = ("quantize on type(conv) except first(type(conv)) { activations = uint8, calibrate = entropy }\n"
            " quantize on type(linear) { activations = int8, activation_symmetric = true }")
    res = _compile(m, x, body, target="torch")
    g = res.graph
    assert isinstance(g.node("c1").params["weight"], torch.Tensor)  # the first conv stays float
    assert isinstance(g.node("c2").params["weight"], Affine) and isinstance(g.node("fc").params["weight"], Affine)
    fc_in = g.node(g.operands("fc")[0][0])
    assert fc_in.kind == "dequantize" and fc_in.params["zero_point"].dtype == torch.int8
    assert int(fc_in.params["zero_point"]) == 0
    c2_in = g.node(g.operands("c2")[0][0])
    assert c2_in.params["zero_point"].dtype == torch.uint8


def test_option_errors_are_located() -> None:
    m, x = _Res().eval(), torch.randn(2, 3, 8, 8)
    with pytest.raises(NetsqueezeError) as e:
        _compile(m, x, "quantize { calibrate = kl }")
    text = str(e.value)
    assert "<policy>:2:" in text and "calibrate" in text and "'entropy'" in text, text
    with pytest.raises(NetsqueezeError) as e2:
        Quantize(percentile=20.0)
    assert "percentile" in str(e2.value)


def test_needs_calibration_data() -> None:
    g = _dense_graph()
    with pytest.raises(NetsqueezeError, match="needs calibration data"):
        Quantize().run(g, PassContext())


def test_mixed_precision_stops_at_a_model_that_meets_the_guard() -> None:
    torch.manual_seed(0)
    m, x = _Res().eval(), torch.randn(8, 3, 8, 8)
    with torch.no_grad():  # one layer made very sensitive: outlier weights blow up its per-tensor grid
        m.c2.weight[0, 0, 0, 0] = 40.0
    full = _compile(m, x, "quantize { weight_granularity = per_tensor, bias_correction = false }")
    err = full.report.fidelity["output_error"]
    limit = err / 2
    res = _compile(m, x, f"guard output error <= {limit:.6f}\n"
                         " quantize { weight_granularity = per_tensor, bias_correction = false }")
    got = res.report.fidelity["output_error"]
    assert got <= limit
    notes = " ".join(res.report.passes[-1].result.notes)
    assert "stay in float" in notes and "c2" in notes
    floats = [n.id for n in res.graph.by_kind("conv", "linear") if isinstance(n.params["weight"], torch.Tensor)]
    assert "c2" in floats and len(floats) < 4


def test_same_bytes_twice() -> None:
    torch.manual_seed(0)
    m, x = _Res().eval(), torch.randn(8, 3, 8, 8)
    a = _compile(m, x, "equalize\n quantize { calibrate = percentile }").model.SerializeToString()
    b = _compile(m, x, "equalize\n quantize { calibrate = percentile }").model.SerializeToString()
    assert a == b


@pytest.mark.slow
@pytest.mark.parametrize("name", [n for n in LIGHT_MODELS if n not in ("bvlc_alexnet", "vgg19", "zfnet512")])
def test_every_onnx_light_model_quantizes_and_torch_equals_ort(name: str) -> None:
    model = randomized(light_path(name))
    g = from_onnx(model)
    x = torch.from_numpy(np.random.default_rng(1).standard_normal(input_shapes(model)[0], dtype=np.float32))

    def stream(graph, values):  # type: ignore[no-untyped-def]
        module = to_torch(graph, extra_outputs=list(values))
        with torch.no_grad():
            outs = module(x)
        yield list(outs[len(graph.outputs):])

    Quantize().run(g, PassContext(stream_fn=stream))
    g.verify()
    assert g.by_kind("quantize"), name
    with torch.no_grad():
        y_torch = to_torch(g)(x)
    y_torch = (y_torch[0] if isinstance(y_torch, (tuple, list)) else y_torch).numpy()
    y_ort = _ort(to_onnx(g), x.numpy())
    out = g.node(g.operands(g.outputs[0])[0][0])
    if out.kind == "dequantize":  # one grid step of the output
        tol = out.params["scale"].item() * (1 + 1e-4)
    else:  # a softmax of quantized logits: one logit step moves a probability by at most a factor e^(2·step)
        assert out.kind == "softmax", name
        dq = g.node(g.operands(out.id)[0][0])
        tol = (np.exp(2 * dq.params["scale"].item()) - 1) * float(np.abs(y_ort).max())
    assert np.abs(y_torch - y_ort).max() <= tol + 1e-6, name


def test_a_bias_too_large_for_the_int32_grid_raises_its_channels_weight_scale() -> None:
    # weights of 1e-9 under a bias of 0.5: on the grid input scale × weight scale (~1e-13) the bias is ~5e12,
    # past int32. Clamped, the channel gave 0 in torch and in ONNX Runtime (whose QDQ fusion requantizes a
    # float bias itself); its weight scale is raised instead, as ONNX Runtime's quantizer does.
    torch.manual_seed(0)
    m = nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 8)).eval()
    with torch.no_grad():
        m[2].weight[3] = 1e-9 * torch.randn(32)
        m[2].bias[3] = 0.5
    x = torch.randn(128, 16)
    for target in ("torch", "onnx"):
        r = ns.compile(m, "policy p { quantize }", example_inputs=(x[:4],), calibration=x, target=target)
        if target == "torch":
            with torch.no_grad():
                out = r.model(x)
        else:
            s = ort.InferenceSession(r.model.SerializeToString(), providers=["CPUExecutionProvider"])
            out = torch.from_numpy(s.run(None, {s.get_inputs()[0].name: x.numpy()})[0])
        assert abs(float(out[:, 3].mean()) - 0.5) < 0.005  # 0.5 within a step of the output's uint8 grid (was 0)
        assert r.report.fidelity["output_error"] < 0.02
    node = r.graph.node(next(n.id for n in r.graph.nodes() if n.kind == "linear" and n.params["weight"].shape[0] == 8))
    w, b = node.params["weight"], node.params["bias"]
    assert isinstance(w, Affine) and isinstance(b, Affine) and int(b.q.abs().max()) <= 2**31 - 1
    assert float(w.scale[3]) > 1e-8 > float(w.scale[3 - 1]) * 1e-6  # raised for channel 3 only


def test_a_quantized_model_emitted_at_fp16_runs_in_half_precision() -> None:
    # dequantize produced float32 whatever the module's precision: the next conv met a half bias and failed
    torch.manual_seed(0)
    m = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 4, 3)).eval()
    x, cal = torch.randn(2, 3, 8, 8), torch.randn(8, 3, 8, 8)
    full = ns.compile(m, "policy p { quantize }", example_inputs=(x,), calibration=cal, target="torch")
    half = ns.compile(m, "policy p { quantize }", example_inputs=(x,), calibration=cal, target="torch",
                      precision="fp16")
    with torch.no_grad():
        y16, y32 = half.model(x.half()), full.model(x)
    assert y16.dtype == torch.float16
    assert float((y16.float() - y32).norm() / y32.norm()) < 2e-2  # half rounding moves a few values a grid step


@pytest.mark.parametrize("calibrate", ["minmax", "entropy"])
def test_a_non_finite_activation_is_an_error_naming_its_node(calibrate: str) -> None:
    # the output is finite (clamped) but relu's is +inf: minmax gave it a scale of 1.0 silently, entropy crashed
    class M(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.fc1, self.fc2 = nn.Linear(8, 16), nn.Linear(16, 4)
            with torch.no_grad():
                self.fc1.weight[0] = 1e38

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.fc2(torch.clamp(torch.relu(self.fc1(x)), max=1.0))

    torch.manual_seed(0)
    x = torch.randn(64, 8)
    with pytest.raises(NetsqueezeError) as err:
        ns.compile(M().eval(), f"policy p {{ quantize {{ calibrate = {calibrate} }} }}", example_inputs=(x[:2],),
                   calibration=x)
    assert str(err.value).splitlines()[0].endswith(
        "quantize: calibration batch 0 gives non-finite values (NaN or Inf) at the output of this node: its range, "
        "and so its grid, is undefined (node 'relu')")


@pytest.mark.parametrize("options, col, message", [
    ("percentile = 99.9", 14, "option 'percentile' applies to calibrate = percentile, not minmax"),
    ("calibrate = entropy, percentile = 99.9", 35,
     "option 'percentile' applies to calibrate = percentile, not entropy"),
    ("bins = 4096", 14, "option 'bins' applies to calibrate = percentile, entropy or mse (a histogram), not minmax"),
])
def test_observer_options_another_method_ignores_are_errors(options: str, col: int, message: str,
                                                            tmp_path: Path) -> None:
    """An observer option the `calibrate` method does not read did nothing: an error the check finds."""
    from netsqueeze.compiler.plan import check_file

    path = tmp_path / "p.sqz"
    path.write_text(f"policy p {{\n  quantize {{ {options} }}\n}}\n")
    assert [d.format().splitlines()[0] for d in check_file(path)] == [
        f"{path}:2:{col}: error: pass 'quantize': {message}"]
    path.write_text("policy p {\n  quantize { calibrate = percentile, percentile = 99.9, bins = 4096 }\n}\n")
    assert check_file(path) == []
    path.write_text("policy p {\n  quantize { calibrate = mse, bins = 4096 }\n}\n")
    assert check_file(path) == []
