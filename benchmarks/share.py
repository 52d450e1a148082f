"""Pruning, weight sharing, kernel sharing and HAM/sHAM storage on Fashion-MNIST (issue 15).

    nice -n 5 .venv/bin/python benchmarks/share.py [--quick] [--recover] [--targets STEPS [--only-targets]]

Models: the VGG-style model of benchmarks/common.py (cached, two FC layers 1152→256→10) and a
MobileNet-style model with depthwise convs defined here (trained once for 2 epochs, cached). Every row is
one-shot from the trained model after `fold_bn`: no fine-tuning. Rows: `prune` on the FC layers (global
magnitude), `share_weights` (CWS, PWS, UQ, ECSQ, per layer; CWS per layer type) on every conv and FC
layer, and prune + CWS / PWS; then `share_kernels` on depthwise vs regular convs, and, side by side, ONNX
Runtime int8 QDQ (`quantize_static`, MinMax, per channel) and netsqueeze's own `quantize` pass on the same
VGG model.

Columns: top-1 on the 10,000 test images (2,000 with --quick) and its drop in points; ψ (compressed
bytes / fp32 bytes, measured from the bytes `netsqueeze.backends.storage` writes, tables and headers
included) of the FC weight matrices in sHAM and HAM, and of the whole model (every param: conv and FC
weights in the named format, biases as raw fp32) in sHAM; the time of one FC1 product at batch 64
(medians of 20, DotsHAM of 3): DotsHAM on the sHAM bytes (decode included) vs dense `torch` matmul vs `scipy.sparse` CSR at
the same sparsity, one thread each.

--recover: every row (kernel-sharing rows included) also gets its top-1 after label-free `recover { steps =
300, loss = kl }` on 4,096 training images (`recover_hook`), every compression decision kept.
--targets STEPS: the paper's pipeline toward the issue's targets, one `netsqueeze.compile` per plan
(TARGET_PLANS): pruning raised in stages, each followed by `recover` with the training labels (STEPS steps
of 64 images), then CWS and a shorter `recover`; --only-targets skips everything else.
The table and notes go to benchmarks/results/share.md (share-quick.md with --quick), rewritten after every
row.
"""

from __future__ import annotations

import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
# run as a script, this folder comes first on sys.path: a benchmark module named like a standard module
# (select, ...) would shadow it; the benchmarks are imported as the `benchmarks` package instead
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != ROOT / "benchmarks"]
sys.path.insert(0, str(ROOT))

import argparse  # noqa: E402
import platform  # noqa: E402
import time  # noqa: E402
from collections.abc import Callable  # noqa: E402

import scipy.sparse  # noqa: E402
import torch  # noqa: E402
from torch import nn  # noqa: E402

import netsqueeze as ns  # noqa: E402
from benchmarks.common import (  # noqa: E402
    CACHE,
    RESULTS,
    accuracy,
    fashion_mnist,
    markdown_table,
    median_ms,
    train,
    trained,
)
from netsqueeze.backends.ham_linear import dot_compressed  # noqa: E402
from netsqueeze.backends.storage import encode_weight  # noqa: E402
from netsqueeze.backends.torch import to_torch  # noqa: E402
from netsqueeze.compiler.calibration import activation_stream, calibration_source  # noqa: E402
from netsqueeze.compiler.pipeline import Step, run_pipeline  # noqa: E402
from netsqueeze.ir.graph import Graph  # noqa: E402
from netsqueeze.ir.weights import dense as dense_of  # noqa: E402
from netsqueeze.passes.base import PassContext  # noqa: E402
from netsqueeze.passes.fold_bn import FoldBN  # noqa: E402
from netsqueeze.passes.prune import Prune  # noqa: E402
from netsqueeze.passes.registry import all_passes  # noqa: E402
from netsqueeze.passes.share_kernels import ShareKernels  # noqa: E402
from netsqueeze.passes.share_weights import ShareWeights  # noqa: E402


class DepthwiseNet(nn.Module):
    """A MobileNet-style CNN: a 3x3 stem, three depthwise-separable blocks (3x3 depthwise + 1x1
    pointwise, BN and ReLU after each), global average pooling and two FC layers."""

    def __init__(self, w: int = 32, classes: int = 10) -> None:
        super().__init__()

        def cbr(i: int, o: int, k: int, s: int, g: int) -> list[nn.Module]:
            return [nn.Conv2d(i, o, k, s, k // 2, groups=g, bias=False), nn.BatchNorm2d(o), nn.ReLU()]

        self.features = nn.Sequential(
            *cbr(1, w, 3, 1, 1),
            *cbr(w, w, 3, 2, w), *cbr(w, 2 * w, 1, 1, 1),
            *cbr(2 * w, 2 * w, 3, 2, 2 * w), *cbr(2 * w, 4 * w, 1, 1, 1),
            *cbr(4 * w, 4 * w, 3, 1, 4 * w), *cbr(4 * w, 4 * w, 1, 1, 1),
        )
        self.classifier = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4 * w, 128), nn.ReLU(),
                                        nn.Linear(128, classes))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.features(x))


def trained_depthwise(data: dict[str, torch.Tensor], epochs: int = 2) -> nn.Module:
    """The depthwise model, trained once (a few minutes on one thread) and cached under benchmarks/cache/."""
    path = CACHE / f"depthwise_e{epochs}.pt"
    model = DepthwiseNet()
    if path.exists():
        model.load_state_dict(torch.load(path, weights_only=True))
        return model.eval()
    t0 = time.perf_counter()
    train(model, data, epochs)
    CACHE.mkdir(parents=True, exist_ok=True)
    torch.save(model.state_dict(), path)
    print(f"trained depthwise in {time.perf_counter() - t0:.0f} s", file=sys.stderr)
    return model.eval()


# ---- the recover hook: every row again after label-free `recover` ------------------------------------------
RECOVER = {"on": False, "steps": 300}


def recover_hook(graph: Graph, original: Graph, calib: torch.Tensor) -> Graph | None:
    """The compressed graph after label-free `recover` on `calib` (distillation from `original`), or None
    when --recover is not given or the pass is not in the tree. Every compression decision stays fixed."""
    passes = all_passes()
    if not RECOVER["on"] or "recover" not in passes:
        return None
    g = graph.copy()
    from netsqueeze.backends.trainable import trainable

    ctx = PassContext(stream_fn=activation_stream(calibration_source(calib, batch_size=64)), original=original,
                      trainable_fn=trainable)
    run_pipeline(g, [passes["recover"](steps=RECOVER["steps"], loss="kl", progress=False)],  # type: ignore[call-arg]
                 ctx)
    return g


# ---- measurements ------------------------------------------------------------------------------------------
def _w(graph: Graph, nid: str) -> torch.Tensor:
    return dense_of(graph.node(nid).params["weight"]).detach()


def psi_of(graph: Graph, ids: list[str], store: str, weights_only: bool = True) -> float:
    """ψ of the given nodes' params (weights only, or every param) in `store` (vectors stay raw fp32)."""
    got = fp32 = 0
    for nid in ids:
        for k, w in graph.node(nid).params.items():
            if weights_only and k != "weight":
                continue
            t = dense_of(w).detach()
            fmt = store if t.dim() >= 2 else "dense"
            got += len(encode_weight(t, fmt))  # type: ignore[arg-type]
            fp32 += 4 * t.numel()
    return got / max(1, fp32)


def dot_times(w: torch.Tensor, batch: int = 64, runs: int = 20) -> tuple[float, float, float]:
    """(DotsHAM, dense torch, scipy CSR) milliseconds of x @ Wᵀ at `batch`, medians."""
    x = torch.randn(batch, w.shape[1], generator=torch.Generator().manual_seed(0))
    blob = encode_weight(w, "sham")
    csr = scipy.sparse.csr_matrix(w.numpy())
    xn = x.numpy()
    got = dot_compressed(x, blob, "sham")
    assert torch.allclose(got, x @ w.T, rtol=1e-4, atol=1e-4), "DotsHAM differs from the dense product"
    return (median_ms(lambda: dot_compressed(x, blob, "sham"), 3, 0), median_ms(lambda: x @ w.T, runs),
            median_ms(lambda: (csr @ xn.T).T, runs))


HEADER = ["model", "method", "top-1", "drop (pt)", "top-1 +recover", "ψ FC sHAM", "ψ FC HAM", "ψ model sHAM",
          "FC1 nnz", "DotsHAM ms", "dense ms", "scipy CSR ms"]


class Bench:
    def __init__(self, quick: bool) -> None:
        self.quick = quick
        self.data = fashion_mnist()
        n = 2000 if quick else 10_000
        self.x, self.y = self.data["test_x"][:n], self.data["test_y"][:n]
        gen = torch.Generator().manual_seed(0)
        self.calib = self.data["train_x"][torch.randperm(len(self.data["train_x"]), generator=gen)[:4096]]
        self.rows: list[list[str]] = []
        self.kernel_rows: list[list[str]] = []
        self.peer_rows: list[list[str]] = []
        self.target_rows: list[list[str]] = []
        self.target_policies: list[str] = []
        self.out = RESULTS / ("share-quick.md" if quick else "share.md")

    def top1(self, graph: Graph) -> float:
        return accuracy(to_torch(graph), self.x, self.y)

    def model_rows(self, name: str, model: nn.Module) -> None:
        g0 = ns.import_model(model, (self.data["test_x"][:2],))
        run_pipeline(g0, [FoldBN()], PassContext())
        fc = [n.id for n in g0.nodes() if n.kind == "linear"]
        layers = [n.id for n in g0.nodes() if n.kind in ("linear", "conv")]
        everything = [n.id for n in g0.nodes() if n.params]
        fcs, alls = frozenset(fc), frozenset(layers)
        base = self.top1(g0)

        def row(label: str, steps: list[Step]) -> None:
            t0 = time.perf_counter()
            g = g0.copy()
            run_pipeline(g, steps, PassContext(seed=0))
            acc = self.top1(g)
            rec = recover_hook(g, g0, self.calib)
            rec_txt = "—" if rec is None else f"{self.top1(rec):.2%}"
            w1 = _w(g, fc[0])
            dh, dd, ds = dot_times(w1)
            r = [name, label, f"{acc:.2%}", f"{(base - acc) * 100:+.2f}", rec_txt,
                 f"{psi_of(g, fc, 'sham'):.4f}", f"{psi_of(g, fc, 'ham'):.4f}",
                 f"{psi_of(g, everything, 'sham', weights_only=False):.4f}", f"{int((w1 != 0).sum()):,}",
                 f"{dh:.2f}", f"{dd:.3f}", f"{ds:.3f}"]
            print(" | ".join(r), f"({time.perf_counter() - t0:.0f} s)", file=sys.stderr)
            self.rows.append(r)
            self.write()

        row("fp32 (fold_bn only)", [])
        for s in (0.90, 0.97, 0.99):
            row(f"Pr FC {s:.0%}", [Step(Prune(sparsity=s, scope="global"), fcs)])
        for m in ("cws", "pws", "uq", "ecsq"):
            row(f"{m.upper()} k=32, all layers", [Step(ShareWeights(method=m, k=32), alls)])  # type: ignore[arg-type]
        row("CWS k=8, all layers", [Step(ShareWeights(k=8), alls)])
        row("CWS k=32 per layer type, all layers", [Step(ShareWeights(k=32, scope="type"), alls)])
        for s, m in ((0.90, "cws"), (0.97, "cws"), (0.99, "cws"), (0.97, "pws")):
            row(f"Pr FC {s:.0%} + {m.upper()} k=32 all layers",
                [Step(Prune(sparsity=s, scope="global"), fcs),
                 Step(ShareWeights(method=m, k=32), alls)])  # type: ignore[arg-type]
        row("Pr FC 97% + convs 50% + CWS k=32", [Step(Prune(sparsity=0.97, scope="global"), fcs),
                                                  Step(Prune(sparsity=0.5), alls - fcs),
                                                  Step(ShareWeights(k=32), alls)])
        self.kernels(name, g0, base)

    def kernels(self, name: str, g0: Graph, base: float) -> None:
        for convs, ks in (("depthwise", (4, 8, 16)), ("all", (16, 64))):
            for k in ks:
                g = g0.copy()
                run = run_pipeline(g, [ShareKernels(k=k, convs=convs)], PassContext(seed=0))  # type: ignore[arg-type]
                res = run.records[0].result
                if not res.changed:
                    continue
                acc = self.top1(g)
                rec = recover_hook(g, g0, self.calib)
                b0, b1 = res.metrics["bytes_before"], res.metrics["bytes_after"]
                what = "depthwise convs" if convs == "depthwise" else "every conv with k×k kernels"
                r = [name, what, str(k), f"{int(res.metrics['layers'])}", f"{acc:.2%}", f"{(base - acc) * 100:+.2f}",
                     "—" if rec is None else f"{self.top1(rec):.2%}", f"{int(b0):,} → {int(b1):,}", f"{b0 / max(1, b1):.1f}x", f"{res.metrics['weight_rel_error']:.3f}"]
                print(" | ".join(r), file=sys.stderr)
                self.kernel_rows.append(r)
                self.write()

    def peers(self, model: nn.Module) -> None:
        """ORT int8 QDQ and netsqueeze's `quantize` on the same VGG model (ψ = ONNX bytes / fp32 ONNX bytes)."""
        try:
            from benchmarks.quantize import ns_onnx, ort_static, ort_top1
        except Exception as e:  # the quantization benchmark is another part of the project
            print(f"peers skipped: {type(e).__name__}: {e}", file=sys.stderr)
            return
        calib = self.calib[:512]
        fp32 = ns_onnx(model, "  fold_bn", calib)
        fb = len(fp32.SerializeToString())
        cases: list[tuple[str, Callable[[], object]]] = [
            ("fp32 ONNX", lambda: fp32),
            ("ONNX Runtime quantize_static int8 QDQ (MinMax, per channel)", lambda: ort_static(fp32, calib, "MinMax")),
            ("netsqueeze quantize (int8 QDQ)", lambda: ns_onnx(model, "  fold_bn\n  quantize", calib)),
        ]
        for label, build in cases:
            try:
                blob = build().SerializeToString()  # type: ignore[attr-defined]
            except Exception as e:
                print(f"{label}: failed: {type(e).__name__}: {e}", file=sys.stderr)
                continue
            acc = ort_top1(blob, self.x, self.y)
            self.peer_rows.append(["vgg", label, f"{acc:.2%}", f"{len(blob):,}", f"{len(blob) / fb:.4f}"])
            self.write()

    def targets(self, model: nn.Module, steps: int) -> None:
        """The paper's pipeline toward the issue's two targets: magnitude pruning raised in stages, each stage
        followed by `recover` with the training labels (`loss = kl` + cross-entropy: the paper retrains with
        labels), then CWS and one more `recover`; the whole compile is one policy, run by `netsqueeze.compile`
        on the 60,000 labelled training images, stored in sHAM (ψ from the bytes of `result.stored`'s weights,
        as the rows above)."""
        train = list(zip(self.data["train_x"].split(64), self.data["train_y"].split(64)))
        epoch = len(train)
        g0 = ns.import_model(model, (self.data["test_x"][:2],))
        run_pipeline(g0, [FoldBN()], PassContext())
        base = self.top1(g0)
        for label, stages, k in TARGET_PLANS:
            lines = ["policy compact {", f"  calibrate samples {len(self.data['train_x'])}, batch 64",
                     "  store { format = sham }", "  fold_bn"]
            for fc, conv in stages:
                lines.append(f"  prune on type(linear) {{ sparsity = {fc:g}%, scope = global }}")
                if conv:
                    lines.append(f"  prune on type(conv) {{ sparsity = {conv:g}% }}")
                lines.append(f"  recover {{ steps = {steps}, loss = kl, progress = false }}")
            lines += [f"  share_weights {{ method = cws, k = {k} }}",
                      f"  recover {{ steps = {steps // 2}, loss = kl, progress = false }}", "}"]
            policy = "\n".join(lines)
            t0 = time.perf_counter()
            res = ns.compile(model, policy, example_inputs=(self.data["test_x"][:2],), calibration=train,
                             labelled=True, seed=0)
            g = res.graph
            fc_ids = [n.id for n in g.nodes() if n.kind == "linear"]
            every = [n.id for n in g.nodes() if n.params]
            acc = self.top1(g)
            recover_steps = steps * len(stages) + steps // 2
            r = [label, f"{acc:.2%}", f"{(base - acc) * 100:+.2f}", f"{psi_of(g, fc_ids, 'sham'):.4f}",
                 f"{psi_of(g, every, 'sham', weights_only=False):.4f}",
                 f"{res.report.storage.get('psi', float('nan')):.4f}",
                 f"{recover_steps:,} ({recover_steps / epoch:.1f} epochs)", f"{time.perf_counter() - t0:.0f}"]
            print(" | ".join(r), file=sys.stderr)
            self.target_rows.append(r)
            self.target_policies.append(policy)
            self.write()

    def write(self) -> None:
        text = [
            "# Pruning, weight sharing and HAM/sHAM storage (benchmarks/share.py)", "",
            f"Fashion-MNIST, top-1 on {len(self.x):,} test images, one-shot after `fold_bn` (no fine-tuning). "
            "ψ = bytes written by `netsqueeze.backends.storage` / fp32 bytes (decoding tables and headers "
            "included): FC = the FC weight matrices; model = every param (conv and FC weights in sHAM, "
            "biases raw). Times: one FC1 product x @ Wᵀ at batch 64, medians of 20 (DotsHAM: of 3), one thread, "
            f"{platform.processor() or platform.machine()}, 2 cores that other jobs may share (times are noisy). DotsHAM decodes the sHAM stream on every call. "
            f"\"top-1 +recover\": the same compressed model after `recover {{ steps = {RECOVER['steps']}, loss = kl }}`, "
            "label-free, on 4,096 training images (about 4.7 passes over them in batches of 64; every compression "
            "decision kept, so ψ is unchanged; — = not run: without --recover).", "",
            markdown_table(HEADER, self.rows), "",
            "## share_kernels: depthwise vs regular convolutions", "",
            markdown_table(["model", "convs", "k", "layers", "top-1", "drop (pt)", "top-1 +recover",
                            "bytes of those layers",
                            "smaller", "weight rel. error"], self.kernel_rows), "",
            "## Side by side: int8 quantization of the same VGG model (ONNX Runtime)", "",
            markdown_table(["model", "method", "top-1", "ONNX bytes", "bytes / fp32 ONNX"], self.peer_rows), "",
        ]
        if self.target_rows:
            text += [
                "## Toward the targets: staged pruning with `recover` (labels), then CWS (VGG)", "",
                "Each row is one `netsqueeze.compile` of the policy below it on the 60,000 labelled training "
                "images (batch 64): prune FC (global) and convs (per layer) in stages, `recover { loss = kl }` "
                "with the labels after each, then `share_weights { method = cws }` and a shorter `recover`. "
                "ψ model (file) = `result.report.storage['psi']`: the sHAM model file's bytes / fp32 bytes. "
                "Targets: ψ FC ≤ 0.01 at ≤ 0.5 point; whole model ψ ≤ 0.0333 (30×) at ≤ 1 point.", "",
                markdown_table(["plan", "top-1", "drop (pt)", "ψ FC sHAM", "ψ model sHAM", "ψ model (file)",
                                "recover steps", "compile s"], self.target_rows), "",
            ]
            for row, policy in zip(self.target_rows, self.target_policies):
                text += [f"{row[0]}:", "", "```", policy, "```", ""]
        RESULTS.mkdir(parents=True, exist_ok=True)
        self.out.write_text("\n".join(text))


# (label, [(FC sparsity %, conv sparsity % or 0), ...] one stage each, CWS k)
TARGET_PLANS: list[tuple[str, list[tuple[float, float]], int]] = [
    ("FC 90→95→98%, convs kept dense, CWS k=32", [(90, 0), (95, 0), (98, 0)], 32),
    ("FC 90→95→98%, convs 50→75→85%, CWS k=32", [(90, 50), (95, 75), (98, 85)], 32),
]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true", help="2,000 test images")
    ap.add_argument("--recover", action="store_true", help="also run recover_hook (the `recover` pass) per row")
    ap.add_argument("--targets", type=int, default=0, metavar="STEPS",
                    help="also run the staged prune + recover + CWS policies, STEPS recover steps per stage")
    ap.add_argument("--only-targets", action="store_true", help="run only the --targets section")
    args = ap.parse_args()
    RECOVER["on"] = args.recover
    torch.set_num_threads(1)
    b = Bench(args.quick)
    vgg = trained("vgg", b.data)
    if not args.only_targets:
        b.model_rows("vgg", vgg)
        b.model_rows("depthwise", trained_depthwise(b.data))
        b.peers(vgg)
    if args.targets:
        b.targets(vgg, args.targets)
    print(b.out.read_text())


if __name__ == "__main__":
    main()
