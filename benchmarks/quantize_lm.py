"""Weight-only quantization of a small byte-level transformer language model: perplexity, bytes, latency.

    nice -n 5 .venv/bin/python benchmarks/quantize_lm.py [--steps N] [--eval-windows N]

Trains (once, cached under benchmarks/cache/) a 4-layer byte-level transformer on Python's standard-library
sources (Debian's /usr/lib/python3.X/*.py for the running X, else this interpreter's own; files in name order,
every tenth file held out), then compiles it with `quantize_weights` (int8 per output channel and int4 in blocks of 32, each by
round-to-nearest and by GPTQ on 128 calibration windows of the training text) and reports, per model:
held-out perplexity (torch decode of the stored integers, exact fp32 arithmetic; and ONNX Runtime as it runs by
default), model bytes (the ONNX file) and ONNX Runtime CPU latency (2 threads, medians over rounds that interleave
the models, batch 1 and 64 at sequence length 128). A latency probe adds batch 1 at sequence lengths 128 and 1
(one position, the weight-streaming regime of token-by-token generation) for the trained model and for the same
architecture at d = 512 (untrained; latency does not depend on the weights' values). Prints the table and writes
benchmarks/results/quantize_lm.md.

`run_lm()` returns the table rows (under `LM_HEADER`) for a caller that builds a larger table.
"""

from __future__ import annotations

import sys
from pathlib import Path

# Run as a script, this folder would be sys.path[0], where a benchmark named like a standard module (select.py)
# shadows it; the repository root takes its place, before any other import.
if __name__ == "__main__":  # imported (by benchmarks/quantize.py), the importer's path stays as it is
    _HERE = Path(__file__).resolve().parent
    sys.path[:] = [str(_HERE.parent), *(p for p in sys.path if Path(p or ".").resolve() != _HERE)]

import argparse
import math
import statistics
import sysconfig
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

import netsqueeze as ns
from benchmarks.common import CACHE, RESULTS, markdown_table, median_ms

SEQ = 128
VOCAB = 256
STEPS = 800  # under 5 minutes with one thread on this (shared, 2-core) machine
BATCH = 16
CALIB = 128  # calibration windows (GPTQ Grams)
TARGET = 0.05  # int4 GPTQ perplexity within 5% of fp32

LM_HEADER = ["model", "weights", "ppl (torch)", "ppl (ORT)", "ppl vs fp32", "bytes", "smaller", "ORT b1 ms",
             "ORT b64 ms", "faster b64", "compile s"]
ACCURACY = "session.qdq_matmulnbits_accuracy_level"  # ORT session config: 0/1 fp32 compute, 4 (default) int8
ROUNDS = 15  # latency: medians over rounds that interleave the models (b1: 3 runs a round, b64: 1)

# (label, policy body) of each quantized model; the policy quantizes every linear layer, the head included
CONFIGS: list[tuple[str, str]] = [
    ("int8 RTN", "quantize_weights on type(linear) { bits = 8, method = rtn }"),
    ("int8 GPTQ", "quantize_weights on type(linear) { bits = 8, method = gptq }"),
    ("int4 RTN", "quantize_weights on type(linear) { bits = 4, block = 32, method = rtn }"),
    ("int4 GPTQ", "quantize_weights on type(linear) { bits = 4, block = 32, method = gptq }"),
    ("int4 GPTQ act_order", "quantize_weights on type(linear) { bits = 4, block = 32, method = gptq, "
                            "act_order = true }"),
]


# ---- data ---------------------------------------------------------------------------------------------------
def corpus() -> tuple[torch.Tensor, torch.Tensor, str]:
    """(train bytes, held-out bytes, source): the standard library's .py files in name order, every tenth
    file held out."""
    debian = Path(f"/usr/lib/python3.{sys.version_info.minor}")
    src = debian if debian.is_dir() else Path(sysconfig.get_paths()["stdlib"])
    files = sorted(src.glob("*.py"))
    if len(files) < 20:
        raise SystemExit(f"expected Python's standard-library sources in {src}")
    train = b"".join(f.read_bytes() for i, f in enumerate(files) if i % 10 != 9)
    test = b"".join(f.read_bytes() for i, f in enumerate(files) if i % 10 == 9)

    def as_tensor(b: bytes) -> torch.Tensor:
        return torch.from_numpy(np.frombuffer(b, dtype=np.uint8).astype(np.int64))

    return as_tensor(train), as_tensor(test), f"{src}/*.py ({len(files)} files)"


def windows(data: torch.Tensor, n: int, seed: int) -> torch.Tensor:
    """`n` random windows of SEQ + 1 bytes (seeded)."""
    g = torch.Generator().manual_seed(seed)
    start = torch.randint(0, data.numel() - SEQ - 1, (n,), generator=g)
    return torch.stack([data[s : s + SEQ + 1] for s in start.tolist()])


# ---- model --------------------------------------------------------------------------------------------------
class Block(nn.Module):
    def __init__(self, d: int, heads: int) -> None:
        super().__init__()
        self.heads = heads
        self.ln1, self.ln2 = nn.LayerNorm(d), nn.LayerNorm(d)
        self.q, self.k, self.v, self.o = nn.Linear(d, d), nn.Linear(d, d), nn.Linear(d, d), nn.Linear(d, d)
        self.fc1, self.fc2 = nn.Linear(d, 4 * d), nn.Linear(4 * d, d)

    def forward(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        b, t, d = x.shape
        y = self.ln1(x)
        q = self.q(y).view(b, t, self.heads, d // self.heads).transpose(1, 2)
        k = self.k(y).view(b, t, self.heads, d // self.heads).transpose(1, 2)
        v = self.v(y).view(b, t, self.heads, d // self.heads).transpose(1, 2)
        # causal attention written out (torch.export keeps scaled_dot_product_attention opaque with a dynamic batch)
        att = torch.softmax(q @ k.transpose(-2, -1) * (d // self.heads) ** -0.5 + mask[:t, :t], dim=-1)
        a = (att @ v).transpose(1, 2).reshape(b, t, d)
        x = x + self.o(a)
        return x + self.fc2(F.gelu(self.fc1(self.ln2(x))))


class ByteLM(nn.Module):
    """A GPT-style byte-level language model: learned positions, pre-norm blocks, untied head."""

    def __init__(self, d: int = 128, layers: int = 4, heads: int = 4) -> None:
        super().__init__()
        self.emb = nn.Embedding(VOCAB, d)
        self.pos = nn.Parameter(torch.randn(SEQ, d) * 0.02)
        self.blocks = nn.ModuleList(Block(d, heads) for _ in range(layers))
        self.ln = nn.LayerNorm(d)
        self.head = nn.Linear(d, VOCAB, bias=False)
        self.register_buffer("mask", torch.full((SEQ, SEQ), -1e9).triu(1), persistent=False)  # causal, shared
        self.mask: torch.Tensor

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        x = self.emb(tokens) + self.pos[: tokens.shape[1]]
        for block in self.blocks:
            x = block(x, self.mask)
        return self.head(self.ln(x))


def trained_lm(train: torch.Tensor, steps: int, log: Callable[[str], None]) -> ByteLM:
    """The LM after `steps` AdamW steps of BATCH windows (cached by step count)."""
    CACHE.mkdir(parents=True, exist_ok=True)
    path = CACHE / f"byte_lm_s{steps}.pt"
    torch.manual_seed(0)
    model = ByteLM()
    if path.exists():
        model.load_state_dict(torch.load(path, weights_only=True))
        return model.eval()
    opt = torch.optim.AdamW(model.parameters(), lr=2e-3, weight_decay=0.01, betas=(0.9, 0.95))
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=2e-3, total_steps=steps, pct_start=0.1)
    g = torch.Generator().manual_seed(1)
    model.train()
    t0 = time.perf_counter()
    for step in range(steps):
        start = torch.randint(0, train.numel() - SEQ - 1, (BATCH,), generator=g)
        w = torch.stack([train[s : s + SEQ + 1] for s in start.tolist()])
        loss = F.cross_entropy(model(w[:, :-1]).reshape(-1, VOCAB), w[:, 1:].reshape(-1))
        opt.zero_grad()
        loss.backward()
        nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        if step % 250 == 0 or step == steps - 1:
            log(f"step {step}: loss {loss.item():.3f} ({time.perf_counter() - t0:.0f} s)")
    torch.save(model.state_dict(), path)
    log(f"trained the LM in {time.perf_counter() - t0:.0f} s")
    return model.eval()


# ---- measurements -------------------------------------------------------------------------------------------
def perplexity(logits_of: Callable[[torch.Tensor], torch.Tensor], test: torch.Tensor, n: int) -> float:
    """exp(mean cross-entropy) over the next-byte predictions of the first `n` non-overlapping windows."""
    w = test[: n * (SEQ + 1)].reshape(n, SEQ + 1)
    total, count = 0.0, 0
    for i in range(0, n, 64):
        chunk = w[i : i + 64]
        logits = logits_of(chunk[:, :-1])
        total += float(F.cross_entropy(logits.reshape(-1, VOCAB).double(), chunk[:, 1:].reshape(-1), reduction="sum"))
        count += chunk[:, 1:].numel()
    return math.exp(total / count)


def ort_session(onnx_bytes: bytes, config: dict[str, str] | None = None) -> Callable[[torch.Tensor], torch.Tensor]:
    """An ONNX Runtime CPU session with its default graph optimizations (and session `config` entries), 2 threads."""
    import onnxruntime as ort

    so = ort.SessionOptions()
    for k, v in (config or {}).items():
        so.add_session_config_entry(k, v)
    so.intra_op_num_threads = 2
    so.inter_op_num_threads = 1
    sess = ort.InferenceSession(onnx_bytes, so, providers=["CPUExecutionProvider"])
    name = sess.get_inputs()[0].name
    return lambda t: torch.from_numpy(sess.run(None, {name: t.numpy()})[0])


def latency(run: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor, runs: int) -> float:
    return median_ms(lambda: run(x), runs=runs, warmup=1)


def executed_ops(onnx_bytes: bytes) -> str:
    """The weight-consuming ops ONNX Runtime runs after its graph optimizations (e.g. 'MatMulNBits x25')."""
    import tempfile

    import onnx
    import onnxruntime as ort

    with tempfile.TemporaryDirectory() as tmp:
        so = ort.SessionOptions()
        so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED
        so.optimized_model_filepath = str(Path(tmp) / "opt.onnx")
        ort.InferenceSession(onnx_bytes, so, providers=["CPUExecutionProvider"])
        ops = [n.op_type for n in onnx.load(so.optimized_model_filepath).graph.node]
    kinds = ("MatMulNBits", "DequantizeLinear", "MatMul", "Gemm", "FusedMatMul", "MatMulIntegerToFloat")
    return ", ".join(f"{k} x{ops.count(k)}" for k in kinds if ops.count(k))


@dataclass
class _Measured:
    label: str
    weights: str
    ppl_torch: float
    ppl_ort: float
    size: int
    compile_s: float
    ops: str
    run: Callable[[torch.Tensor], torch.Tensor]
    ms: dict[int, list[float]] = field(default_factory=lambda: {1: [], 64: []})


def run_lm(steps: int = STEPS, eval_windows: int = 256, log: Callable[[str], None] | None = None
           ) -> list[list[str]]:
    """Trains (cached) and measures the LM; returns the table rows under `LM_HEADER`."""
    say = log or (lambda m: print(m, file=sys.stderr))
    torch.set_num_threads(1)
    train, test, source = corpus()
    say(f"corpus: {source}: {train.numel()} training bytes, {test.numel()} held-out bytes")
    model = trained_lm(train, steps, say)
    calib = windows(train, CALIB, seed=2)[:, :-1]
    example = calib[:2]  # batch 2: torch.export specialises a size-1 dim
    dyn = {"tokens": {0: torch.export.Dim("batch", min=1, max=1024)}}
    inputs = {1: windows(test, 1, seed=3)[:, :-1], 64: windows(test, 64, seed=3)[:, :-1]}

    measured: list[_Measured] = []
    for label, body in [("fp32", ""), *CONFIGS]:
        t0 = time.perf_counter()
        policy = f"policy lm {{\n  {body}\n}}"
        kwargs = {"example_inputs": (example,), "calibration": calib, "dynamic_shapes": dyn, "seed": 0}
        r_onnx = ns.compile(model, policy, target="onnx", **kwargs)  # type: ignore[arg-type]
        compile_s = time.perf_counter() - t0
        r_torch = ns.compile(model, policy, target="torch", **kwargs)  # type: ignore[arg-type]
        data = r_onnx.model.SerializeToString()
        with torch.no_grad():
            ppl_t = perplexity(r_torch.model, test, eval_windows)
        run = ort_session(data)
        m = _Measured(label, body.split("{")[1].strip(" }").replace("method = ", "") if body else "fp32",
                      ppl_t, perplexity(run, test, eval_windows), len(data), compile_s, executed_ops(data), run)
        say(f"{label}: ppl torch {m.ppl_torch:.4f}, ORT {m.ppl_ort:.4f}, {m.size} bytes, compile {compile_s:.0f} s; "
            f"ORT runs {m.ops}")
        measured.append(m)
        if label == "int4 GPTQ":  # the same model, ORT's MatMulNBits computing in fp32 (its default: int8 activations)
            exact = ort_session(data, {ACCURACY: "0"})
            measured.append(_Measured(f"{label}, ORT {ACCURACY} = 0", m.weights, m.ppl_torch,
                                      perplexity(exact, test, eval_windows), m.size, compile_s, m.ops, exact))
    # latency rounds interleave the models, so a change of load on the machine reaches all of them alike
    for _ in range(ROUNDS):
        for m in measured:
            for b, x in inputs.items():
                m.ms[b].append(latency(m.run, x, runs=3 if b == 1 else 1))
    base = measured[0]
    rows = []
    for m in measured:
        b1, b64 = statistics.median(m.ms[1]), statistics.median(m.ms[64])
        rows.append([f"LM {m.label}", m.weights, f"{m.ppl_torch:.4f}", f"{m.ppl_ort:.4f}",
                     f"{m.ppl_torch / base.ppl_torch - 1:+.2%}", f"{m.size:,}", f"{base.size / m.size:.2f}x",
                     f"{b1:.2f}", f"{b64:.1f}", f"{statistics.median(base.ms[64]) / b64:.2f}x", f"{m.compile_s:.0f}"])
    by = {m.label: m for m in measured}
    if "int4 GPTQ" in by and "int4 RTN" in by:
        g, r = by["int4 GPTQ"].ppl_torch / base.ppl_torch - 1, by["int4 RTN"].ppl_torch / base.ppl_torch - 1
        verdict = "met" if g <= TARGET and g < r else "missed"
        say(f"target (int4 GPTQ perplexity within {TARGET:.0%} of fp32 and below RTN's): {verdict}: "
            f"GPTQ {g:+.2%}, RTN {r:+.2%} vs fp32")
    say("ONNX Runtime executes: " + "; ".join(f"{m.label}: {m.ops}" for m in measured))
    say(width_probe(model, inputs[64], "the trained LM (d = 128)"))
    torch.manual_seed(0)
    say(width_probe(ByteLM(d=512, heads=8).eval(), inputs[64], "the same architecture at d = 512 (untrained)"))
    return rows


def width_probe(model: nn.Module, tokens: torch.Tensor, label: str) -> str:
    """Latency only, batch 1, at sequence lengths 128 and 1 (one position: the weight-streaming regime of
    token-by-token generation, without a KV cache): `model` in fp32 against int4 RTN blocks of 32 (the weights'
    values do not change the kernels ONNX Runtime runs)."""
    runs = {}
    for seq in (SEQ, 1):
        for name, body in (("fp32", ""), ("int4", "quantize_weights on type(linear) { bits = 4, block = 32 }")):
            x = tokens[:2, :seq]
            r = ns.compile(model, f"policy p {{ {body} }}", example_inputs=(x,), target="onnx",
                           dynamic_shapes={"tokens": {0: torch.export.Dim("batch", min=1, max=1024)}})
            runs[(name, seq)] = (ort_session(r.model.SerializeToString()), len(r.model.SerializeToString()), x[:1])
    ms: dict[tuple[str, int], list[float]] = {k: [] for k in runs}
    for _ in range(5):
        for k, (run, _, x) in runs.items():
            ms[k].append(latency(run, x, runs=20 if k[1] == 1 else 2))
    med = {k: statistics.median(v) for k, v in ms.items()}
    return (f"{label}: fp32 {runs[('fp32', SEQ)][1]:,} bytes, int4 block 32 {runs[('int4', SEQ)][1]:,} bytes; ORT batch 1, "
            + ", ".join(f"sequence {seq}: fp32 {med[('fp32', seq)]:.3f} ms, int4 {med[('int4', seq)]:.3f} ms "
                        f"({med[('fp32', seq)] / med[('int4', seq)]:.2f}x as fast)" for seq in (SEQ, 1)))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--steps", type=int, default=STEPS, help="training steps (the cache is per step count)")
    ap.add_argument("--eval-windows", type=int, default=256, help="held-out windows of 128 bytes for perplexity")
    args = ap.parse_args()
    notes: list[str] = []

    def log(msg: str) -> None:
        print(msg, file=sys.stderr)
        notes.append(msg)

    rows = run_lm(args.steps, args.eval_windows, log)
    table = markdown_table(LM_HEADER, rows)
    text = ("# Weight-only quantization of a byte-level transformer LM\n\n"
            f"`python benchmarks/quantize_lm.py --steps {args.steps} --eval-windows {args.eval_windows}`; "
            "perplexity on held-out standard-library sources (lower is better), ONNX Runtime "
            f"{_ort_version()} CPU, 2 threads, sequence length {SEQ}.\n\n{table}\n\n"
            + "\n".join(f"- {n}" for n in notes) + "\n")
    print(table)
    RESULTS.mkdir(parents=True, exist_ok=True)
    out = RESULTS / "quantize_lm.md"
    tmp = out.with_suffix(".md.tmp")
    tmp.write_text(text)
    tmp.replace(out)


def _ort_version() -> str:
    import onnxruntime as ort

    return str(ort.__version__)


if __name__ == "__main__":
    main()
