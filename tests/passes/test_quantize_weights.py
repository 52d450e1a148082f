"""quantize_weights: round-to-nearest against its closed form, exact block scales, GPTQ against RTN, the
ONNX Runtime and torch forms of int4 block weights, a transformer from a policy, determinism."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
import torch.nn.functional as F
from torch import nn

import netsqueeze as ns
from netsqueeze.backends.torch import to_torch
from netsqueeze.compiler.calibration import activation_stream, calibration_source
from netsqueeze.errors import PassError, PolicyError
from netsqueeze.ir.parser import parse_graph
from netsqueeze.ir.weights import Affine
from netsqueeze.passes.base import PassContext
from netsqueeze.passes.gptq import Grid, gptq, output_error, rtn
from netsqueeze.passes.quantize_weights import QuantizeWeights


def _linear_model(o: int, i: int, seed: int) -> nn.Sequential:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(i, o)).eval()


def _p(layer: nn.Module, name: str) -> torch.Tensor:
    t = getattr(layer, name)
    assert isinstance(t, torch.Tensor)
    return t.detach()


def _correlated(n: int, d: int, seed: int) -> torch.Tensor:
    """Inputs whose features are strongly correlated (a random mixing of a decaying spectrum)."""
    g = torch.Generator().manual_seed(seed)
    z = torch.randn(n, d, generator=g) * torch.logspace(0, -2, d)
    return z @ torch.randn(d, d, generator=g) / math.sqrt(d) + 0.1 * torch.randn(n, d, generator=g)


def _weight(r: ns.CompileResult, node: str = "0") -> Affine:
    w = r.graph.node(node).params["weight"]
    assert isinstance(w, Affine)
    return w


# ---- round to nearest -------------------------------------------------------------------------------
def test_rtn_int8_per_channel_is_the_closed_form() -> None:
    m = _linear_model(16, 40, 0)
    r = ns.compile(m, [QuantizeWeights()], example_inputs=(torch.randn(2, 40),))
    w = _p(m[0], "weight").double()
    scale = (w.abs().amax(1) / 127).float()
    q = torch.round(w / scale.double().unsqueeze(1)).clamp(-127, 127)
    a = _weight(r)
    assert (a.bits, a.signed, a.axis, a.block_size, a.zero_point) == (8, True, 0, 0, None)
    assert torch.equal(a.scale, scale)
    assert torch.equal(a.q.to(torch.int64), q.to(torch.int64))
    assert a.nbytes() == 16 * 40 + 16 * 4


def test_int4_block_scales_are_exact_per_block() -> None:
    m = _linear_model(8, 80, 1)  # 80 inputs: blocks of 32, 32 and a last one of 16
    r = ns.compile(m, [QuantizeWeights(bits=4)], example_inputs=(torch.randn(2, 80),))
    w = _p(m[0], "weight").double()
    a = _weight(r)
    assert (a.bits, a.axis, a.block_size, tuple(a.scale.shape)) == (4, 1, 32, (8, 3))
    for b, (lo, hi) in enumerate([(0, 32), (32, 64), (64, 80)]):
        s = (w[:, lo:hi].abs().amax(1) / 7).float()
        assert torch.equal(a.scale[:, b], s)
        q = torch.round(w[:, lo:hi] / s.double().unsqueeze(1)).clamp(-8, 7)
        assert torch.equal(a.q[:, lo:hi].to(torch.int64), q.to(torch.int64))
    assert a.nbytes() == 8 * 80 // 2 + 8 * 3 * 4


def test_uint4_asymmetric_blocks_have_zero_points() -> None:
    m = _linear_model(6, 64, 2)
    r = ns.compile(m, [QuantizeWeights(bits=4, block=64, symmetric=False)], example_inputs=(torch.randn(2, 64),))
    w = _p(m[0], "weight").double()
    a = _weight(r)
    assert a.zero_point is not None and (a.signed, a.block_size, tuple(a.scale.shape)) == (False, 64, (6, 1))
    mn, mx = w.amin(1).clamp(max=0), w.amax(1).clamp(min=0)
    s = ((mx - mn) / 15).float()
    zp = torch.round(-mn / s.double()).clamp(0, 15)
    assert torch.equal(a.scale[:, 0], s)
    assert torch.equal(a.zero_point[:, 0].to(torch.int64), zp.to(torch.int64))
    q = (torch.round(w / s.double().unsqueeze(1)) + zp.unsqueeze(1)).clamp(0, 15)
    assert torch.equal(a.q.to(torch.int64), q.to(torch.int64))
    # the decoded weight is within half a step of the original everywhere
    assert float(((a.dense().double() - w).abs() / s.double().unsqueeze(1)).max()) <= 0.5 + 1e-6


# ---- GPTQ -------------------------------------------------------------------------------------------
@pytest.mark.parametrize("bits,block,symmetric,act_order", [(8, 0, True, False), (4, 32, True, True),
                                                             (4, 16, False, False)])
def test_gptq_with_identity_gram_is_rtn(bits: int, block: int, symmetric: bool, act_order: bool) -> None:
    g = torch.Generator().manual_seed(3)
    w = torch.randn(12, 96, generator=g, dtype=torch.float64)
    groups = torch.arange(96) // block if block else torch.zeros(96, dtype=torch.int64)
    grid = Grid(bits, symmetric)
    a = rtn(w, groups, grid)
    b = gptq(w, torch.eye(96, dtype=torch.float64), groups, grid, act_order=act_order)
    assert torch.equal(a.q, b.q) and torch.equal(a.scale, b.scale) and torch.equal(a.zero_point, b.zero_point)


def test_gptq_dead_inputs_are_rounded_to_nearest() -> None:
    g = torch.Generator().manual_seed(4)
    w = torch.randn(5, 64, generator=g, dtype=torch.float64)
    x = _correlated(500, 64, 4).double()
    x[:, [3, 40]] = 0.0  # two inputs the calibration data never excites
    groups = torch.arange(64) // 32
    grid = Grid(4)
    a, b = rtn(w, groups, grid), gptq(w, 2 * x.T @ x, groups, grid)
    assert torch.equal(b.q[:, [3, 40]], a.q[:, [3, 40]])
    assert not torch.equal(b.q, a.q)


def test_gptq_layer_error_is_below_rtn_on_correlated_inputs() -> None:
    m = _linear_model(32, 128, 5)
    x = _correlated(2048, 128, 5)
    w = _p(m[0], "weight")
    errs = {}
    for method in ("rtn", "gptq"):
        r = ns.compile(m, [QuantizeWeights(bits=4, method=method)], example_inputs=(x[:2],), calibration=x)
        errs[method] = float(torch.linalg.norm(x @ (w - _weight(r).dense()).T) / torch.linalg.norm(x @ w.T))
    assert errs["gptq"] < 0.6 * errs["rtn"], errs


def test_gptq_sequential_measures_the_quantized_inputs() -> None:
    torch.manual_seed(6)
    m = nn.Sequential(nn.Linear(24, 64), nn.ReLU(), nn.Linear(64, 8)).eval()
    x = _correlated(512, 24, 6)
    got = {}
    for inputs in ("quantized", "original"):
        r = ns.compile(m, [QuantizeWeights(bits=4, method="gptq", inputs=inputs)], example_inputs=(x[:2],),
                       calibration=x)
        got[inputs] = (_weight(r, "0"), _weight(r, "2"))
    first = got["quantized"][0]
    assert torch.equal(first.q, got["original"][0].q)  # the first layer sees the same input either way
    for inputs, w1 in (("quantized", first.dense()), ("original", _p(m[0], "weight"))):
        h = F.relu(x @ w1.T + _p(m[0], "bias")).double()
        want = gptq(_p(m[2], "weight"), 2 * h.T @ h / h.shape[0], torch.arange(64) // 32, Grid(4))
        same = (got[inputs][1].q.to(torch.int64) == want.q.to(torch.int64)).double().mean()
        assert float(same) >= 0.99, (inputs, float(same))  # float summation order may flip a rare tie
    assert not torch.equal(got["quantized"][1].q, got["original"][1].q)


def test_gptq_conv_layout_and_error() -> None:
    torch.manual_seed(7)
    m = nn.Sequential(nn.Conv2d(48, 16, 3, padding=1, stride=2)).eval()
    g = torch.Generator().manual_seed(7)
    x = torch.randn(32, 8, 8, 8, generator=g).repeat(1, 6, 1, 1) + 0.2 * torch.randn(32, 48, 8, 8, generator=g)
    w = _p(m[0], "weight")
    rt = ns.compile(m, [QuantizeWeights(bits=4)], example_inputs=(x[:2],))
    ref = Affine.quantize(w, bits=4, axis=1, block_size=32)  # blocks of input channels, per kernel tap
    got = _weight(rt)
    assert torch.equal(got.q, ref.q) and torch.equal(got.scale, ref.scale) and got.scale.shape == (16, 2, 3, 3)  # 48 channels: 32 + 16
    errs = {}
    for method in ("rtn", "gptq"):
        r = ns.compile(m, [QuantizeWeights(bits=4, method=method)], example_inputs=(x[:2],), calibration=x)
        y = F.conv2d(x, _weight(r).dense(), stride=2, padding=1)
        y0 = F.conv2d(x, w, stride=2, padding=1)
        errs[method] = float(torch.linalg.norm(y - y0) / torch.linalg.norm(y0))
    assert errs["gptq"] < 0.8 * errs["rtn"], errs


def test_matmul_with_a_constant_weight() -> None:
    graph = parse_graph("""
graph mm (x) -> (out) {
  %x = input() {shape=(4, 5, 64)}
  %w = constant() <value = f32[64, 10] randn(seed=3)>
  %mm = matmul(%x, %w)
  %out = output(%mm)
}""")
    x = _correlated(400, 64, 8).reshape(80, 5, 64)
    w = graph.node("w").dense("value").clone()
    ctx = PassContext(stream_fn=activation_stream(calibration_source(x, batch_size=16)))
    res = QuantizeWeights(bits=4, method="gptq").run(graph, ctx)
    a = graph.node("w").params["value"]
    assert isinstance(a, Affine) and (a.shape, a.axis, a.block_size) == ((64, 10), 0, 32)
    assert res.touched == {"mm", "w"} and res.metrics["weights"] == 1.0
    rows = x.reshape(-1, 64).double()
    h = 2 * rows.T @ rows / rows.shape[0]
    assert res.metrics["output_error_mean"] == pytest.approx(output_error(w.t(), a.dense().t(), h), rel=1e-5)
    assert output_error(w.t(), a.dense().t(), h) < output_error(w.t(), Affine.quantize(w, bits=4, axis=0,
                                                                  block_size=32).dense().t(), h)


# ---- emission, policies, determinism ----------------------------------------------------------------
class Block(nn.Module):
    def __init__(self, d: int, heads: int) -> None:
        super().__init__()
        self.heads = heads
        self.ln1, self.ln2 = nn.LayerNorm(d), nn.LayerNorm(d)
        self.qkv = nn.ModuleList(nn.Linear(d, d) for _ in range(3))
        self.o = nn.Linear(d, d)
        self.fc1, self.fc2 = nn.Linear(d, 4 * d), nn.Linear(4 * d, d)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t, d = x.shape
        y = self.ln1(x)
        q, k, v = (p(y).view(b, t, self.heads, d // self.heads).transpose(1, 2) for p in self.qkv)
        a = F.scaled_dot_product_attention(q, k, v, is_causal=True).transpose(1, 2).reshape(b, t, d)
        x = x + self.o(a)
        return x + self.fc2(F.gelu(self.fc1(self.ln2(x))))


class TinyLM(nn.Module):
    def __init__(self, vocab: int = 64, d: int = 64, seq: int = 8) -> None:
        super().__init__()
        self.emb = nn.Embedding(vocab, d)
        self.pos = nn.Parameter(torch.randn(seq, d) * 0.1)
        self.blocks = nn.Sequential(Block(d, 4), Block(d, 4))
        self.ln = nn.LayerNorm(d)
        self.head = nn.Linear(d, vocab, bias=False)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.head(self.ln(self.blocks(self.emb(tokens) + self.pos)))


POLICY = "policy lm {\n  quantize_weights on type(linear) { bits = 4, block = 32, method = gptq }\n}"


@pytest.fixture(scope="module")
def lm() -> tuple[nn.Module, torch.Tensor, ns.CompileResult, nn.Module]:
    """The tiny LM, its tokens, the policy compiled for ONNX, and the torch backend's module of the same
    compiled graph (shared: compiles are slow)."""
    torch.manual_seed(9)
    g = torch.Generator().manual_seed(9)
    model, tokens = TinyLM().eval(), torch.randint(0, 64, (48, 8), generator=g)
    r_onnx = ns.compile(model, POLICY, example_inputs=(tokens[:4],), calibration=tokens[:32], target="onnx")
    return model, tokens, r_onnx, to_torch(r_onnx.graph)


def _ort(model: onnx.ModelProto, **config: str) -> ort.InferenceSession:
    so = ort.SessionOptions()
    so.intra_op_num_threads = 1
    for k, v in config.items():
        so.add_session_config_entry(k, v)
    return ort.InferenceSession(model.SerializeToString(), so, providers=["CPUExecutionProvider"])


def test_transformer_policy_int4_gptq_in_ort_and_torch(lm: tuple[nn.Module, torch.Tensor, ns.CompileResult,
                                                                 nn.Module]) -> None:
    model, tokens, r_onnx, torch_model = lm
    linears = [n for n in r_onnx.graph.nodes() if n.kind == "linear"]
    assert len(linears) == 13
    for n in linears:
        w = n.params["weight"]
        assert isinstance(w, Affine) and (w.bits, w.signed, w.axis, w.block_size) == (4, True, 1, 32), n.id
    assert sum(n.op_type == "DequantizeLinear" for n in r_onnx.model.graph.node) == 13
    assert r_onnx.model.opset_import[0].version == 21
    test = tokens[32:36]
    y_torch = torch_model(test).detach()
    scale = float(y_torch.abs().max())
    # the same integers and scales decoded by two runtimes, fp32 arithmetic: only summation order differs
    # (MatMulNBits at accuracy level 0 computes in fp32)
    sess = _ort(r_onnx.model, **{"session.qdq_matmulnbits_accuracy_level": "0"})
    y_ort = torch.from_numpy(sess.run(None, {sess.get_inputs()[0].name: test.numpy()})[0])
    assert float((y_ort - y_torch).abs().max()) <= 1e-5 * scale
    # ORT's default (accuracy level 4) quantizes MatMulNBits' activations to int8 per block: measured
    # 0.7% of the output range here
    sess = _ort(r_onnx.model)
    y_def = torch.from_numpy(sess.run(None, {sess.get_inputs()[0].name: test.numpy()})[0])
    assert 1e-5 * scale < float((y_def - y_torch).abs().max()) <= 0.03 * scale
    # int4 weights stay close to the fp32 model on held-out tokens (a loose sanity bound)
    y0 = model(test).detach()
    assert float(torch.linalg.norm(y_torch - y0) / torch.linalg.norm(y0)) < 0.15


def test_ort_fuses_int4_blocks_into_matmulnbits(tmp_path: Path, lm: tuple[nn.Module, torch.Tensor, ns.CompileResult,
                                                                          nn.Module]) -> None:
    """ONNX Runtime 1.31 runs DequantizeLinear(int4, block on the input axis) -> MatMul as MatMulNBits."""
    so = ort.SessionOptions()
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED
    so.optimized_model_filepath = str(tmp_path / "opt.onnx")
    ort.InferenceSession(lm[2].model.SerializeToString(), so, providers=["CPUExecutionProvider"])
    ops = [n.op_type for n in onnx.load(so.optimized_model_filepath).graph.node]
    assert ops.count("MatMulNBits") == 13 and "DequantizeLinear" not in ops


def test_rank2_gemm_int4_runs_in_ort_like_torch() -> None:
    torch.manual_seed(10)
    m = nn.Sequential(nn.Linear(64, 32), nn.ReLU(), nn.Linear(32, 5)).eval()
    x = torch.randn(8, 64)
    pol = "policy p { quantize_weights { bits = 4, block = 32, symmetric = false } }"
    r_onnx = ns.compile(m, pol, example_inputs=(x,), target="onnx")
    r_torch = ns.compile(m, pol, example_inputs=(x,), target="torch")
    sess = ort.InferenceSession(r_onnx.model.SerializeToString(), providers=["CPUExecutionProvider"])
    y_ort = sess.run(None, {sess.get_inputs()[0].name: x.numpy()})[0]
    np.testing.assert_allclose(y_ort, r_torch.model(x).detach().numpy(), rtol=1e-5, atol=1e-5)


def test_policy_options_are_checked() -> None:
    m = _linear_model(4, 8, 11)
    x = torch.randn(2, 8)
    with pytest.raises(PolicyError, match=r"option 'bits' of pass 'quantize_weights' must be one of 4, 8, got '3'"):
        ns.compile(m, "policy p { quantize_weights { bits = 3 } }", example_inputs=(x,))
    with pytest.raises(PolicyError, match=r"option 'block' of pass 'quantize_weights' must be one of 0, 32, 64, "
                                          r"128, got '48'"):
        ns.compile(m, "policy p { quantize_weights { block = 48 } }", example_inputs=(x,))
    with pytest.raises(PolicyError, match=r"option 'method' of pass 'quantize_weights' must be one of 'rtn', "
                                          r"'gptq', got the name 'gptqq' \(did you mean 'gptq'\?\)"):
        ns.compile(m, "policy p { quantize_weights { method = gptqq } }", example_inputs=(x,))
    with pytest.raises(PassError, match="this pass needs calibration data"):
        ns.compile(m, "policy p { quantize_weights { method = gptq } }", example_inputs=(x,))
    with pytest.raises(PassError, match=r"no selected node has a weight it quantizes"):
        ns.compile(nn.Sequential(nn.ReLU()).eval(), "policy p { quantize_weights }", example_inputs=(x,))


def test_gptq_on_grouped_conv_is_a_located_error() -> None:
    conv = nn.Conv2d(8, 8, 3, groups=8)
    m = nn.Sequential(conv).eval()
    x = torch.randn(4, 8, 6, 6)
    with pytest.raises(PassError, match=r"gptq on conv '0' needs groups = 1 and a 1-d or 2-d kernel \(it has "
                                        r"groups = 8, a 2-d kernel\); select it for method = rtn instead"):
        ns.compile(m, [QuantizeWeights(method="gptq")], example_inputs=(x,), calibration=x)
    r = ns.compile(m, [QuantizeWeights(method="rtn")], example_inputs=(x,))
    assert torch.equal(_weight(r).q, Affine.quantize(conv.weight, axis=0).q)


def test_same_inputs_same_bytes(lm: tuple[nn.Module, torch.Tensor, ns.CompileResult, nn.Module]) -> None:
    model, tokens, r_onnx, _ = lm
    again = ns.compile(model, POLICY, example_inputs=(tokens[:4],), calibration=tokens[:32], target="onnx")
    assert again.model.SerializeToString() == r_onnx.model.SerializeToString()


def test_a_saved_and_loaded_int8_conv_model_gives_the_compiled_models_bits(tmp_path: Path) -> None:
    # quantize_weights laid conv codes out tap-major and kept the permuted view: the compiled conv ran on a
    # strided weight and summed in another order than the loaded contiguous copy (1.5e-8 apart)
    import netsqueeze as ns

    torch.manual_seed(0)
    m = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 8, 3, padding=1), nn.ReLU(),
                      nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 4)).eval()
    x, cal = torch.randn(4, 3, 8, 8), torch.randn(16, 3, 8, 8)
    r = ns.compile(m, "policy p { quantize_weights }", example_inputs=(x,), calibration=cal, store="ham")
    w = r.graph.node(next(n.id for n in r.graph.nodes() if n.kind == "conv")).params["weight"]
    assert w.q.is_contiguous()
    r.save(tmp_path / "m.nsq")
    with torch.no_grad():
        assert torch.equal(ns.load(tmp_path / "m.nsq")(x), r.model(x))


@pytest.mark.parametrize("options, col, message", [
    ("bits = 8, damp = 5%", 48, "option 'damp' applies to method = gptq, not rtn"),
    ("bits = 8, method = rtn, act_order = true", 62, "option 'act_order' applies to method = gptq, not rtn"),
    ("bits = 8, inputs = original", 48, "option 'inputs' applies to method = gptq, not rtn"),
])
def test_gptq_options_with_rtn_are_errors_at_the_option(options: str, col: int, message: str, tmp_path: Path) -> None:
    """GPTQ's options did nothing under round-to-nearest (the default method): an error the check finds."""
    from netsqueeze.compiler.plan import check_file

    path = tmp_path / "p.sqz"
    path.write_text(f"policy p {{\n  quantize_weights on type(linear) {{ {options} }}\n}}\n")
    assert [d.format().splitlines()[0] for d in check_file(path)] == [
        f"{path}:2:{col}: error: pass 'quantize_weights': {message}"]
    gptq = options.replace("method = rtn", "method = gptq") + ("" if "method" in options else ", method = gptq")
    path.write_text(f"policy p {{\n  quantize_weights on type(linear) {{ {gptq} }}\n}}\n")
    assert check_file(path) == []
