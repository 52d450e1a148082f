"""Weight-only quantization of a small byte-level transformer language model: perplexity, bytes, latency.

    nice -n 5 .venv/bin/python benchmarks/quantize_lm.py [--steps N] [--eval-windows N]

Trains (once, cached under benchmarks/cache/) a 4-layer byte-level transformer on Python's standard-library
sources (Debian's /usr/lib/python3.X/*.py for the running X, else this interpreter's own; files in name order,
every tenth file held out), then compiles it with `quantize_weights` (int8 per output channel and int4 in blocks of 32, each by
round-to-nearest and by GPTQ on 128 calibration windows of the training text) and reports, per model:
held-out perplexity (torch decode of the stored integers, exact fp32 arithmetic; and ONNX Runtime as it runs by
default), model bytes (the ONNX file) and ONNX Runtime CPU latency (2 threads, median of 30 runs, batch 1 and
64 at sequence length 128). Prints the table and writes benchmarks/results/quantize_lm.md.

`run_lm()` returns the table rows (under `LM_HEADER`) for a caller that builds a larger table.
"""

from __future__ import annotations

import argparse
import math
import sys
import sysconfig
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import netsqueeze as ns
from benchmarks.common import CACHE, RESULTS, markdown_table, median_ms

SEQ = 128
VOCAB = 256
STEPS = 800  # under 5 minutes with one thread on this (shared, 2-core) machine
BATCH = 16
CALIB = 128  # calibration windows (GPTQ Grams)
TARGET = 0.05  # int4 GPTQ perplexity within 5% of fp32

LM_HEADER = ["model", "weights", "ppl (torch)", "ppl (ORT)", "vs fp32", "bytes", "ratio", "ORT b1 ms",
             "ORT b64 ms", "speed-up b64"]

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
        self.register_buffer("mask", torch.full((SEQ, SEQ), -1e9).triu(1), persistent=False)
        self.mask: torch.Tensor

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t, d = x.shape
        y = self.ln1(x)
        q = self.q(y).view(b, t, self.heads, d // self.heads).transpose(1, 2)
        k = self.k(y).view(b, t, self.heads, d // self.heads).transpose(1, 2)
        v = self.v(y).view(b, t, self.heads, d // self.heads).transpose(1, 2)
        # causal attention written out (torch.export keeps scaled_dot_product_attention opaque with a dynamic batch)
        att = torch.softmax(q @ k.transpose(-2, -1) * (d // self.heads) ** -0.5 + self.mask[:t, :t], dim=-1)
        a = (att @ v).transpose(1, 2).reshape(b, t, d)
        x = x + self.o(a)
        return x + self.fc2(F.gelu(self.fc1(self.ln2(x))))


class ByteLM(nn.Module):
    """A GPT-style byte-level language model: learned positions, pre-norm blocks, untied head."""

    def __init__(self, d: int = 128, layers: int = 4, heads: int = 4) -> None:
        super().__init__()
        self.emb = nn.Embedding(VOCAB, d)
        self.pos = nn.Parameter(torch.randn(SEQ, d) * 0.02)
        self.blocks = nn.Sequential(*(Block(d, heads) for _ in range(layers)))
        self.ln = nn.LayerNorm(d)
        self.head = nn.Linear(d, VOCAB, bias=False)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.head(self.ln(self.blocks(self.emb(tokens) + self.pos)))


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


def ort_session(onnx_bytes: bytes) -> Callable[[torch.Tensor], torch.Tensor]:
    """An ONNX Runtime CPU session with its default graph optimizations, 2 threads."""
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.intra_op_num_threads = 2
    so.inter_op_num_threads = 1
    sess = ort.InferenceSession(onnx_bytes, so, providers=["CPUExecutionProvider"])
    name = sess.get_inputs()[0].name
    return lambda t: torch.from_numpy(sess.run(None, {name: t.numpy()})[0])


def latency(run: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor) -> float:
    return median_ms(lambda: run(x), runs=30)


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
    x1 = windows(test, 1, seed=3)[:, :-1]
    x64 = windows(test, 64, seed=3)[:, :-1]

    measured: list[tuple[str, str, float, float, int, float, float, str]] = []
    runs: list[tuple[str, str]] = [("fp32", ""), *CONFIGS]
    for label, body in runs:
        t0 = time.perf_counter()
        policy = f"policy lm {{\n  {body}\n}}"
        kwargs = {"example_inputs": (example,), "calibration": calib, "dynamic_shapes": dyn, "seed": 0}
        r_onnx = ns.compile(model, policy, target="onnx", **kwargs)  # type: ignore[arg-type]
        r_torch = ns.compile(model, policy, target="torch", **kwargs)  # type: ignore[arg-type]
        compile_s = time.perf_counter() - t0
        data = r_onnx.model.SerializeToString()
        with torch.no_grad():
            ppl_t = perplexity(r_torch.model, test, eval_windows)
        run = ort_session(data)
        ppl_o = perplexity(run, test, eval_windows)
        lat1, lat64 = (latency(run, x) for x in (x1, x64))
        ops = executed_ops(data)
        weights = body.split("{")[1].rstrip(" }").replace("method = ", "") if body else "fp32"
        say(f"{label}: ppl torch {ppl_t:.4f}, ORT {ppl_o:.4f}, {len(data)} bytes, ORT {lat1:.2f} / {lat64:.1f} ms, "
            f"compile {compile_s:.0f} s; ORT runs {ops}")
        measured.append((label, weights, ppl_t, ppl_o, len(data), lat1, lat64, ops))

    base = measured[0]
    rows = []
    for label, weights, ppl_t, ppl_o, size, lat1, lat64, _ in measured:
        rows.append([f"LM {label}", weights, f"{ppl_t:.4f}", f"{ppl_o:.4f}", f"{ppl_t / base[2] - 1:+.2%}",
                     f"{size:,}", f"{base[4] / size:.2f}x", f"{lat1:.2f}", f"{lat64:.1f}", f"{base[6] / lat64:.2f}x"])
    by = {m[0]: m for m in measured}
    if "int4 GPTQ" in by and "int4 RTN" in by:
        g, r = by["int4 GPTQ"][2], by["int4 RTN"][2]
        verdict = "met" if g / base[2] - 1 <= TARGET and g < r else "missed"
        say(f"target (int4 GPTQ ppl within {TARGET:.0%} of fp32 and below RTN): {verdict}: "
            f"{g / base[2] - 1:+.2%} vs fp32, RTN {r / base[2] - 1:+.2%}")
    say("ONNX Runtime executes: " + "; ".join(f"{m[0]}: {m[7]}" for m in measured))
    return rows


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
