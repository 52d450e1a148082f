"""Shared benchmark plumbing: Fashion-MNIST from Debian's dataset-fashion-mnist, the two benchmark
models, cached training, evaluation and latency measurement (torch and ONNX Runtime, CPU)."""

from __future__ import annotations

import gzip
import shutil
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
from torch import nn

ROOT = Path(__file__).resolve().parent
CACHE = ROOT / "cache"
RESULTS = ROOT / "results"
DATA_DIR = Path("/usr/share/datasets/fashion-mnist")
FILES = {
    "train_x": "train-images-idx3-ubyte.gz", "train_y": "train-labels-idx1-ubyte.gz",
    "test_x": "t10k-images-idx3-ubyte.gz", "test_y": "t10k-labels-idx1-ubyte.gz",
}
MEAN, STD = 0.2860, 0.3530


def ensure_dataset() -> Path:
    """Returns the IDX folder, installing the Debian package when we are root and it is missing."""
    if all((DATA_DIR / f).exists() for f in FILES.values()):
        return DATA_DIR
    if shutil.which("apt-get") and hasattr(__import__("os"), "geteuid") and __import__("os").geteuid() == 0:
        print("installing Debian package dataset-fashion-mnist ...", file=sys.stderr)
        subprocess.run(["apt-get", "update", "-qq"], check=False)
        subprocess.run(["apt-get", "install", "-y", "-qq", "dataset-fashion-mnist"], check=False)
    if not all((DATA_DIR / f).exists() for f in FILES.values()):
        sys.exit("Fashion-MNIST is missing: install it with `sudo apt-get install dataset-fashion-mnist` "
                 f"(expected the IDX files in {DATA_DIR})")
    return DATA_DIR


def _idx(path: Path) -> np.ndarray:
    with gzip.open(path, "rb") as f:
        data = f.read()
    ndim = data[3]
    dims = [int.from_bytes(data[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndim)]
    return np.frombuffer(data, dtype=np.uint8, offset=4 + 4 * ndim).reshape(dims)


def fashion_mnist() -> dict[str, torch.Tensor]:
    """Full Fashion-MNIST: 60,000 train and 10,000 test images, normalised, as [N, 1, 28, 28] float32."""
    d = ensure_dataset()
    out: dict[str, torch.Tensor] = {}
    for key, name in FILES.items():
        arr = _idx(d / name)
        if key.endswith("_x"):
            out[key] = ((torch.from_numpy(arr.copy()).float() / 255.0 - MEAN) / STD).unsqueeze(1)
        else:
            out[key] = torch.from_numpy(arr.astype(np.int64))
    return out


class VGGStyle(nn.Module):
    """VGG-style CNN: 3 stages of two 3x3 conv+BN+ReLU, max-pool, then two FC layers."""

    def __init__(self, w: int = 32, classes: int = 10) -> None:
        super().__init__()

        def blk(i: int, o: int) -> list[nn.Module]:
            return [nn.Conv2d(i, o, 3, padding=1, bias=False), nn.BatchNorm2d(o), nn.ReLU()]

        self.features = nn.Sequential(
            *blk(1, w), *blk(w, w), nn.MaxPool2d(2),
            *blk(w, 2 * w), *blk(2 * w, 2 * w), nn.MaxPool2d(2),
            *blk(2 * w, 4 * w), *blk(4 * w, 4 * w), nn.MaxPool2d(2),
        )
        self.classifier = nn.Sequential(nn.Flatten(), nn.Linear(4 * w * 3 * 3, 256), nn.ReLU(), nn.Linear(256, classes))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.features(x))


class BasicBlock(nn.Module):
    def __init__(self, i: int, o: int, stride: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(i, o, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(o)
        self.relu = nn.ReLU()
        self.conv2 = nn.Conv2d(o, o, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(o)
        self.downsample = (
            nn.Sequential(nn.Conv2d(i, o, 1, stride, bias=False), nn.BatchNorm2d(o)) if stride != 1 or i != o else None
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        idt = x if self.downsample is None else self.downsample(x)
        return self.relu(self.bn2(self.conv2(self.relu(self.bn1(self.conv1(x))))) + idt)


class ResNetStyle(nn.Module):
    """ResNet-style CNN: stem, three stages of two basic blocks (1x1 downsample shortcuts), GAP, FC."""

    def __init__(self, w: int = 16, classes: int = 10) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(1, w, 3, 1, 1, bias=False), nn.BatchNorm2d(w), nn.ReLU())
        self.layer1 = nn.Sequential(BasicBlock(w, w, 1), BasicBlock(w, w, 1))
        self.layer2 = nn.Sequential(BasicBlock(w, 2 * w, 2), BasicBlock(2 * w, 2 * w, 1))
        self.layer3 = nn.Sequential(BasicBlock(2 * w, 4 * w, 2), BasicBlock(4 * w, 4 * w, 1))
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(4 * w, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.layer3(self.layer2(self.layer1(self.stem(x))))
        return self.fc(torch.flatten(self.pool(x), 1))


MODELS: dict[str, Callable[[], nn.Module]] = {"vgg": VGGStyle, "resnet": ResNetStyle}


def train(model: nn.Module, data: dict[str, torch.Tensor], epochs: int, lr: float = 2e-3, seed: int = 0,
          batch: int = 128) -> nn.Module:
    torch.manual_seed(seed)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=5e-4)
    x, y = data["train_x"], data["train_y"]
    steps = epochs * ((len(x) + batch - 1) // batch)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=steps)
    model.train()
    for _ in range(epochs):
        perm = torch.randperm(len(x))
        for i in range(0, len(x), batch):
            idx = perm[i : i + batch]
            xb = x[idx]
            # light augmentation: random horizontal flips
            flip = torch.rand(len(idx)) < 0.5
            xb = torch.where(flip[:, None, None, None], xb.flip(-1), xb)
            loss = nn.functional.cross_entropy(model(xb), y[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
            sched.step()
    return model.eval()


TRAIN_THREADS = 1  # training's torch threads: a matmul's last bits depend on the thread count


def trained(name: str, data: dict[str, torch.Tensor], epochs: int = 3,
            models: dict[str, Callable[[], nn.Module]] | None = None, prefix: str = "", seed: int = 0) -> nn.Module:
    """The benchmark model `name` (of `models`, default the shared ones), trained once and cached under
    benchmarks/cache/ as `{prefix}{name}_e{epochs}_s{seed}.pt`. The same model whichever script trains it first:
    its initial weights come from `seed` (not from what the calling process drew before), and it trains on
    `TRAIN_THREADS` threads whatever the caller's setting (same torch build and CPU kind assumed)."""
    CACHE.mkdir(parents=True, exist_ok=True)
    path = CACHE / f"{prefix}{name}_e{epochs}_s{seed}.pt"
    torch.manual_seed(seed)
    model = (models or MODELS)[name]()
    if path.exists():
        model.load_state_dict(torch.load(path, weights_only=True))
        return model.eval()
    t0 = time.perf_counter()
    threads = torch.get_num_threads()
    torch.set_num_threads(TRAIN_THREADS)
    try:
        train(model, data, epochs, seed=seed)
    finally:
        torch.set_num_threads(threads)
    torch.save(model.state_dict(), path)
    print(f"trained {name} in {time.perf_counter() - t0:.0f} s", file=sys.stderr)
    return model.eval()


@torch.no_grad()
def accuracy(model: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor, y: torch.Tensor, batch: int = 1000) -> float:
    correct = 0
    for i in range(0, len(x), batch):
        correct += int((model(x[i : i + batch]).argmax(1) == y[i : i + batch]).sum())
    return correct / len(x)


def fine_tune(model: nn.Module, data: dict[str, torch.Tensor], epochs: int = 1, lr: float = 5e-4) -> nn.Module:
    return train(model, data, epochs, lr=lr)


def median_ms(fn: Callable[[], object], runs: int = 50, warmup: int = 5) -> float:
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(runs):
        t0 = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t0) * 1000)
    return statistics.median(times)


def torch_latency(model: nn.Module, batch: int, runs: int = 50) -> float:
    torch.set_num_threads(2)
    x = torch.randn(batch, 1, 28, 28)
    with torch.no_grad():
        return median_ms(lambda: model(x), runs)


def ort_latency(onnx_bytes: bytes, batch: int, runs: int = 50, spinning: bool = True) -> float:
    """Median ONNX Runtime CPU latency (ms), 2 threads; `spinning=False`: the worker threads sleep between parallel
    sections instead of busy-waiting (ONNX Runtime's default)."""
    import onnxruntime as ort

    from netsqueeze.compiler.latency import ort_session_options

    so = ort_session_options(2, spinning)
    sess = ort.InferenceSession(onnx_bytes, so, providers=["CPUExecutionProvider"])
    name = sess.get_inputs()[0].name
    x = np.random.default_rng(0).standard_normal((batch, 1, 28, 28), dtype=np.float32)
    return median_ms(lambda: sess.run(None, {name: x}), runs)


def markdown_table(header: list[str], rows: list[list[str]]) -> str:
    out = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    out += ["| " + " | ".join(r) + " |" for r in rows]
    return "\n".join(out)


def write_result(name: str, text: str) -> Path:
    """Prints a benchmark's `text` and writes it to benchmarks/results/`name` atomically (a temporary file renamed
    over it: an interrupted run leaves the previous results whole)."""
    print(text)
    RESULTS.mkdir(parents=True, exist_ok=True)
    out = RESULTS / name
    tmp = out.with_suffix(".tmp")
    tmp.write_text(text)
    tmp.replace(out)
    print(f"wrote {out}")
    return out


def recover_step(steps: int, label_weight: float = 0.0) -> str:
    """The policy step the benchmarks recover with: distillation (KL) from the original on the calibration images,
    at the learning rate README advises after a refit (the default 1e-3 suits collapsed models)."""
    return f"recover {{ loss = kl, lr = 0.0003, steps = {steps}, label_weight = {label_weight:g} }}"
