"""Measured latency: models timed side by side in one process, median and p90 of repeated runs after warm-up.

Timing candidates against the original in interleaved rounds (A, B, A, B, ...) keeps their ratio stable on a
noisy machine: a slow spell hits every model of a round alike. Runtimes: ONNX Runtime (CPU execution
provider) and torch eager.

ONNX Runtime sessions are timed with their worker threads sleeping between parallel sections
(`session.intra_op.allow_spinning = 0`), not busy-waiting as they do by default. Timed in turns in one process,
the busy-waiting threads of the session that has just run take the cores from the next one, and the faster model
loses the most: on the 2-core benchmark machine, 2 threads, batch 64 (`benchmarks/results/ort-spinning.md`), the
benchmark ResNet squeezed to 2x fewer FLOPs ran 11.77 ms in turns with the original busy-waiting and 7.78 ms
sleeping, against 7.90 / 7.79 ms alone in its process, while the original ran 11.94 / 11.91 ms in turns. With the
threads sleeping, the in-turns times of every model there were within 7% of its time alone; alone, busy-waiting
was faster for some models and slower for others (the VGG squeezed 2x: 11.74 against 9.54 ms; 5x: 3.58 against
4.03 ms), with no consistent sign on that noisy machine.
"""

from __future__ import annotations

import contextlib
import statistics
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass
from typing import Any, Literal

import torch

from netsqueeze.errors import NetsqueezeError
from netsqueeze.ir.graph import Graph

Runtime = Literal["ort", "torch"]
RUNTIMES: tuple[Runtime, ...] = ("ort", "torch")


@dataclass(frozen=True)
class Latency:
    """One model's time per call: median and 90th percentile over `rounds` rounds, in milliseconds."""

    runtime: str
    batch: int
    threads: int
    median_ms: float
    p90_ms: float
    rounds: int

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@contextlib.contextmanager
def torch_threads(n: int) -> Iterator[None]:
    old = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(old)


def ort_session_options(threads: int, spinning: bool = False) -> Any:
    """ONNX Runtime session options for timing: `threads` intra-op threads, one inter-op thread, warnings off, and
    the worker threads sleeping between parallel sections unless `spinning` (ONNX Runtime's default; see the module
    docstring for why timing turns it off)."""
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.intra_op_num_threads = threads
    so.inter_op_num_threads = 1
    so.log_severity_level = 3
    if not spinning:
        so.add_session_config_entry("session.intra_op.allow_spinning", "0")
    return so


def _ort_runner(model: Any, inputs: Sequence[torch.Tensor], threads: int) -> Callable[[], Any]:
    import onnxruntime as ort

    so = ort_session_options(threads)
    data = model if isinstance(model, (str, bytes)) else model.SerializeToString()
    sess = ort.InferenceSession(data, so, providers=["CPUExecutionProvider"])
    names = [i.name for i in sess.get_inputs()]
    if len(names) != len(inputs):
        raise NetsqueezeError(f"the ONNX model takes {len(names)} inputs, {len(inputs)} given")
    feed = {n: t.detach().cpu().numpy() for n, t in zip(names, inputs)}
    return lambda: sess.run(None, feed)


def _torch_runner(model: Any, inputs: Sequence[torch.Tensor]) -> Callable[[], Any]:
    if not isinstance(model, torch.nn.Module):
        raise NetsqueezeError(f"runtime 'torch' times an nn.Module, got a {type(model).__name__}")
    model.eval()
    args = tuple(inputs)

    def run() -> Any:
        with torch.inference_mode():
            return model(*args)

    return run


def runner(model: Any, inputs: Sequence[torch.Tensor], runtime: Runtime, threads: int = 1) -> Callable[[], Any]:
    """A no-argument function that runs `model` once on `inputs` in `runtime`. `model`: an IR `Graph` (emitted
    for the runtime), an nn.Module (torch), or an ONNX ModelProto, its bytes or a path (ort)."""
    if runtime not in RUNTIMES:
        raise NetsqueezeError(f"unknown runtime '{runtime}' (use {' or '.join(RUNTIMES)})")
    if isinstance(model, Graph):
        if runtime == "ort":
            from netsqueeze.backends.onnx import to_onnx

            model = to_onnx(model)
        else:
            from netsqueeze.backends.torch import to_torch

            model = to_torch(model)
    if runtime == "ort":
        if isinstance(model, torch.nn.Module):
            raise NetsqueezeError("runtime 'ort' times an ONNX model; emit the graph with to_onnx first")
        return _ort_runner(model, inputs, threads)
    return _torch_runner(model, inputs)


def _percentile(xs: Sequence[float], q: float) -> float:
    s = sorted(xs)
    pos = q * (len(s) - 1)
    lo = int(pos)
    hi = min(lo + 1, len(s) - 1)
    return s[lo] + (s[hi] - s[lo]) * (pos - lo)


def measure(models: Sequence[Any], inputs: Sequence[torch.Tensor], *, runtime: Runtime = "ort", threads: int = 1,
            warmup: int = 3, rounds: int = 15, min_round_s: float = 0.002) -> list[Latency]:
    """Latency of each of `models` on the same `inputs`, timed side by side in interleaved rounds.

    Each round runs every model a fixed number of calls (enough that the slowest model's block lasts
    `min_round_s`, fixed after warm-up), so timer resolution does not matter for fast models.
    """
    if threads < 1 or rounds < 1 or warmup < 0:
        raise NetsqueezeError(f"threads and rounds must be >= 1 and warmup >= 0 (got {threads}, {rounds}, {warmup})")
    batch = int(inputs[0].shape[0]) if inputs and inputs[0].dim() else 1
    with torch_threads(threads):
        fns = [runner(m, inputs, runtime, threads) for m in models]
        for fn in fns:
            for _ in range(max(1, warmup)):
                fn()
        single = []
        for fn in fns:
            t = time.perf_counter()
            fn()
            single.append(time.perf_counter() - t)
        calls = max(1, min(1000, int(min_round_s / max(max(single), 1e-7))))
        samples: list[list[float]] = [[] for _ in fns]
        for r in range(rounds):
            # alternate the order so no model always runs right after another's caches were warmed
            order = list(range(len(fns))) if r % 2 == 0 else list(reversed(range(len(fns))))
            for i in order:
                fn = fns[i]
                t = time.perf_counter()
                for _ in range(calls):
                    fn()
                samples[i].append((time.perf_counter() - t) / calls * 1000.0)
    return [Latency(runtime, batch, threads, statistics.median(s), _percentile(s, 0.9), rounds) for s in samples]
