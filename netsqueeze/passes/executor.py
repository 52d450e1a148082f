"""Executors for independent solves (Net-Trim's per-neuron and per-layer problems): in-process, local
processes, or a Dask distributed cluster, all returning results in task order.

The compiler makes one from `compile(..., executor=...)` / `netsqueeze compile --executor` with
`make_executor` and hands it to passes as `PassContext.executor`. A task is a picklable module-level
function and its argument; results are identical whatever runs them, because every task does its
arithmetic on one thread (`net_trim_solvers.single_threaded`) from the same inputs.
"""

from __future__ import annotations

import contextlib
import os
import threading
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterator, Sequence
from typing import Any, TypeVar

from netsqueeze.errors import Diagnostic, NetsqueezeError

A = TypeVar("A")
R = TypeVar("R")
Progress = Callable[[int, int], None]

SPEC_HELP = ("'local' (in this process), 'processes' or 'processes:N' (N local worker processes), "
             "'dask://HOST:PORT' (an existing Dask scheduler) or 'dask://local' / 'dask://local:N' "
             "(a Dask LocalCluster of N worker processes)")


class Executor(ABC):
    """Runs `fn` over `tasks` and returns the results in task order."""

    name: str = ""

    @abstractmethod
    def map(self, fn: Callable[[A], R], tasks: Sequence[A], progress: Progress | None = None) -> list[R]:
        ...

    def close(self) -> None:  # noqa: B027 - executors without workers have nothing to release
        """Releases workers this executor started (a cluster it only connected to is left running)."""

    def __enter__(self) -> Executor:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class InProcess(Executor):
    """Every task in the calling process, one after another."""

    name = "local"

    def map(self, fn: Callable[[A], R], tasks: Sequence[A], progress: Progress | None = None) -> list[R]:
        out = []
        for i, t in enumerate(tasks):
            out.append(fn(t))
            if progress is not None:
                progress(i + 1, len(tasks))
        return out


_LAUNCH = threading.Lock()


def _from_main(fn: Callable[..., Any]) -> bool:
    """Whether `fn` (a function, a callable object, a partial) is defined in the script being run."""
    target = getattr(fn, "func", fn)
    return getattr(target, "__module__", type(target).__module__) in ("__main__", "__mp_main__")


@contextlib.contextmanager
def _workers_skip_main() -> Iterator[None]:
    """Worker processes started inside do not import the caller's `__main__`. A spawned worker imports the
    script that started it, to find what was defined there, and runs its top level again: a script without an
    `if __name__ == "__main__":` guard ran once more per worker (its compile too, whose own pool then failed with
    the 'bootstrapping phase' RuntimeError, and its side effects). netsqueeze's tasks live in netsqueeze, so its
    workers need none of it. Works by dropping the main module from `multiprocessing.spawn`'s preparation data,
    only while this process starts workers (under a lock)."""
    from multiprocessing import spawn

    original = spawn.get_preparation_data

    def prepare(name: str) -> dict[str, Any]:
        data = original(name)
        data.pop("init_main_from_path", None)
        data.pop("init_main_from_name", None)
        return data

    with _LAUNCH:
        spawn.get_preparation_data = prepare
        try:
            yield
        finally:
            spawn.get_preparation_data = original


class Processes(Executor):
    """A pool of local worker processes (spawned, so no thread state of the parent is inherited), started on
    the first map with more than one task and kept until `close`. A single task runs in this process. The workers
    do not run the caller's script (`_workers_skip_main`), unless a task's function is defined there."""

    name = "processes"

    def __init__(self, workers: int | None = None) -> None:
        self.workers = workers or os.cpu_count() or 1
        self._pool: Any = None
        self._with_main = False  # whether the pool's workers imported the caller's script

    def map(self, fn: Callable[[A], R], tasks: Sequence[A], progress: Progress | None = None) -> list[R]:
        if len(tasks) <= 1 or self.workers == 1:
            return InProcess().map(fn, tasks, progress)
        import multiprocessing
        from concurrent.futures import ProcessPoolExecutor, as_completed

        with_main = _from_main(fn)
        if self._pool is not None and self._with_main != with_main:
            self.close()
        if self._pool is None:
            self._pool = ProcessPoolExecutor(self.workers, mp_context=multiprocessing.get_context("spawn"))
            self._with_main = with_main
        # workers start as tasks are submitted
        with contextlib.nullcontext() if with_main else _workers_skip_main():
            futures = {self._pool.submit(fn, t): i for i, t in enumerate(tasks)}
        out: list[Any] = [None] * len(tasks)
        for done, f in enumerate(as_completed(futures), 1):
            out[futures[f]] = f.result()
            if progress is not None:
                progress(done, len(tasks))
        return out

    def close(self) -> None:
        if self._pool is not None:
            self._pool.shutdown()
            self._pool = None


class Dask(Executor):
    """Tasks on a Dask distributed cluster: an existing scheduler at `address` ("tcp://host:8786"), or,
    with `address=None`, a `LocalCluster` of `workers` workers started here (worker processes, or threads
    of this process with `processes=False`) and shut down by `close`."""

    name = "dask"

    def __init__(self, address: str | None = None, workers: int | None = None, processes: bool = True) -> None:
        self.address = address
        self.workers = workers or os.cpu_count() or 1
        self.processes = processes
        self._client: Any = None
        self._cluster: Any = None

    def client(self) -> Any:
        if self._client is None:
            try:
                from distributed import Client, LocalCluster
            except ImportError as e:  # pragma: no cover - a pinned dependency
                raise NetsqueezeError(Diagnostic(f"executor 'dask' needs the distributed package: {e}")) from None
            if self.address is None:
                self._cluster = LocalCluster(n_workers=self.workers, threads_per_worker=1,
                                             processes=self.processes, dashboard_address=None)
                self._client = Client(self._cluster)
            else:
                try:
                    self._client = Client(self.address, timeout="10s")
                except OSError as e:
                    raise NetsqueezeError(Diagnostic(
                        f"executor: cannot reach the Dask scheduler at {self.address}: {e}")) from None
        return self._client

    def map(self, fn: Callable[[A], R], tasks: Sequence[A], progress: Progress | None = None) -> list[R]:
        if not tasks:
            return []
        from distributed import as_completed

        client = self.client()
        futures = client.map(fn, list(tasks), pure=False)
        index = {f.key: i for i, f in enumerate(futures)}
        out: list[Any] = [None] * len(tasks)
        for done, f in enumerate(as_completed(futures), 1):
            out[index[f.key]] = f.result()
            if progress is not None:
                progress(done, len(tasks))
        return out

    def close(self) -> None:
        if self._client is not None:
            self._client.close()
            self._client = None
        if self._cluster is not None:
            self._cluster.close()
            self._cluster = None


def make_executor(spec: str | Executor | None) -> Executor:
    """The executor a spec names (see `SPEC_HELP`); None is 'processes'. An `Executor` is returned as is."""
    if isinstance(spec, Executor):
        return spec
    if spec is None:
        return Processes()
    if not isinstance(spec, str):
        raise NetsqueezeError(Diagnostic(f"executor must be a string or an Executor, got {type(spec).__name__}"))
    s = spec.strip()
    if s in ("local", "inprocess"):
        return InProcess()
    if s == "processes" or s.startswith("processes:"):
        n = _count(s.partition(":")[2], spec) if ":" in s else None
        return Processes(n)
    if s.startswith("dask://"):
        rest = s[len("dask://"):]
        if rest == "local" or rest.startswith("local:"):
            return Dask(None, _count(rest.partition(":")[2], spec) if ":" in rest else None)
        if not rest or ":" not in rest:
            raise NetsqueezeError(Diagnostic(f"executor '{spec}': a Dask scheduler is dask://HOST:PORT "
                                             "(e.g. dask://10.0.0.5:8786), or dask://local"))
        return Dask("tcp://" + rest)
    raise NetsqueezeError(Diagnostic(f"unknown executor '{spec}': use {SPEC_HELP}"))


def _count(text: str, spec: str) -> int:
    if not text.isdigit() or int(text) < 1:
        raise NetsqueezeError(Diagnostic(f"executor '{spec}': the worker count must be a positive integer, "
                                         f"got '{text}'"))
    return int(text)
