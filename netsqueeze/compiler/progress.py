"""Progress bars (tqdm, on stderr) for what a compile waits on: calibration streaming and search candidates.

On only when asked (`compile(progress=True)`) or, by default, when stderr is a terminal; `--quiet` turns them
off. Bars never write to stdout, so a report printed there stays clean.
"""

from __future__ import annotations

import sys
from collections.abc import Callable, Iterator, Sequence
from typing import Any, TextIO

from tqdm import tqdm

from netsqueeze.ir.graph import Graph, Value
from netsqueeze.passes.base import ActivationStream


def enabled(progress: bool | None, stream: TextIO | None = None) -> bool:
    """`progress` as given, or (None) whether the stream (stderr) is a terminal."""
    if progress is not None:
        return bool(progress)
    s = stream if stream is not None else sys.stderr
    isatty = getattr(s, "isatty", None)
    return bool(isatty()) if callable(isatty) else False


class Progress:
    """Makes the bars of one compile; all of them are no-ops when disabled."""

    def __init__(self, on: bool, log: Callable[[str], None] | None = None, file: TextIO | None = None) -> None:
        self.on = on
        self.log = log or (lambda msg: None)
        self.file = file if file is not None else sys.stderr
        self.bars_made = 0
        self._search: Any = None
        self.candidates = 0

    def bar(self, desc: str, total: int | None, unit: str) -> Any:
        if self.on:
            self.bars_made += 1
        return tqdm(total=total, desc=desc, unit=unit, leave=False, file=self.file, disable=not self.on,
                    dynamic_ncols=True)

    def stream(self, fn: ActivationStream, batches: int | None) -> ActivationStream:
        """`fn` with a bar over the calibration batches of each full pass a pass makes over the data."""

        def streamed(graph: Graph, values: Sequence[Value]) -> Iterator[list[Any]]:
            bar = self.bar(f"calibration ({len(values)} tapped values)", batches, "batch")
            try:
                for item in fn(graph, values):
                    bar.update(1)
                    yield item
            finally:
                bar.close()

        return streamed

    def fidelity(self, fn: Callable[..., float | None]) -> Callable[..., float | None]:
        """`fn` with a running count of the candidates searches measure, each also logged."""

        def measured(graph: Graph, metric: str, *rest: Any) -> float | None:
            if self._search is None:
                self._search = self.bar("search", None, " candidates")
            value = fn(graph, metric, *rest)
            self._search.update(1)
            self.candidates += 1
            if value is not None:
                self.log(f"search candidate {self.candidates}: {metric.replace('_', ' ')} {value:.4g}")
            return value

        return measured

    def close(self) -> None:
        if self._search is not None:
            self._search.close()
            self._search = None
