"""Pass base classes, the `PassContext` a pass sees, and per-pass results.

A pass is a frozen dataclass: its fields are its options (typed, with defaults), so the
policy checker validates a policy's arguments against them and custom passes get checking
for free. Passes never import the compiler or backends: calibration activations, the
selected nodes and logging come through `PassContext`.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, ClassVar, Generic, Protocol, TypeVar

import torch

from netsqueeze.errors import Diagnostic, NetsqueezeError, NonFiniteError
from netsqueeze.ir.graph import Graph, Value
from netsqueeze.passes.executor import Executor

T = TypeVar("T")

# the most model passes over the calibration data one search's output-error measurements may cost
MEASURE_PASSES = 8.0


# the largest float32 whose square is finite
_SQUARE_LIMIT = math.sqrt(torch.finfo(torch.float32).max)


def check_squarable(t: torch.Tensor, node: str, what: str) -> None:
    """A NonFiniteError naming `node` unless activations `t`, which a pass is about to sum the squares of
    (second moments, normal equations), are finite and small enough to square in float32: data far off the
    model's scale (finite inputs at 1e30) made a solver fail with a LAPACK assert."""
    top = float(t.detach().abs().amax()) if t.is_floating_point() and t.numel() else 0.0
    if not top <= _SQUARE_LIMIT:  # NaN fails it too
        raise NonFiniteError(Diagnostic(
            f"the {what} of '{node}' on the calibration data reach {top:.3g}: past float32's square root, the "
            "sums of their squares this pass needs overflow", node=node,
            notes=("the data is far off the model's scale: check its preprocessing",)))


# how a user gives calibration data, for the errors of passes that need it
GIVE_CALIBRATION = "pass calibration=... to compile() (netsqueeze compile: --calib FILE)"


@dataclass
class PassResult:
    """What a transform did: whether it changed the graph, which nodes it touched, notes for the report."""

    changed: bool = False
    touched: set[str] = field(default_factory=set)
    removed: set[str] = field(default_factory=set)
    notes: list[str] = field(default_factory=list)
    metrics: dict[str, float] = field(default_factory=dict)


# A source of calibration activations: given tapped values, yields one list of tensors per batch.
ActivationStream = Callable[[Graph, Sequence[Value]], Iterator[list[torch.Tensor]]]
# A part of a graph run on its own (`PassContext.segment`): the values at `fetch` from the values at `feeds`.
Segment = Callable[[Sequence[torch.Tensor]], list[torch.Tensor]]
# Tensors a candidate graph computes on the leading calibration batches: (values, one tensor list per batch).
Feeds = tuple[Sequence[Value], Sequence[Sequence[torch.Tensor]]]


def class_scores(shape: Sequence[int]) -> bool:
    """Whether an output of this shape is read as class scores by the `top1_change` fidelity metric: rank 2
    ([batch, classes]) or rank 3 ([batch, tokens, vocabulary]) with more than one entry on the last axis."""
    return len(shape) in (2, 3) and int(shape[-1]) > 1


class Trainable(Protocol):
    """A graph run differentiably in torch (`PassContext.trainable`): `fn(params, inputs)` gives the outputs
    with `params[(node id, param name)]` (dense tensors that take gradients) in place of those params."""

    def addressable(self) -> frozenset[tuple[str, str]]: ...

    def __call__(self, params: Mapping[tuple[str, str], torch.Tensor],
                 inputs: Sequence[torch.Tensor]) -> list[torch.Tensor]: ...


class NoBar:
    """The progress bar of a context without one: every call does nothing."""

    def update(self, n: int = 1) -> None:
        pass

    def set_postfix(self, *args: Any, **kwargs: Any) -> None:
        pass

    def close(self) -> None:
        pass


@dataclass
class PassContext:
    """Everything a pass may use besides the graph.

    - `selected`: node ids the policy's `on SELECTOR` picked for this invocation (None = every node).
    - `stream(graph, values)`: streams calibration activations at `values`, one batch at a time.
    - `analyses`: the analysis cache, managed by the pass manager.
    - `budget`: global targets from the policy (e.g. {"flops": 0.5, "params": 0.25}), ratios of the original.
    - `bounds`: the policy's per-layer bounds (`bounds_for`); structural passes combine them with their
      own options through `passes.allocation`.
    - `seed`: the policy's `calibrate seed`, else `compile(seed=)`. Every random choice of a pass is
      drawn from a `torch.Generator` seeded from it (never the global RNG), so one seed repeats a
      compile bit for bit.
    - `guard`: the policy's fidelity limit as (metric, limit), e.g. ("output_error", 0.02) or
      ("top1_drop", 0.01). `fidelity(graph, metric)` measures a candidate graph against `original`
      (the compiler runs it on the calibration data, or through the user's `eval_fn` for top-1), so a
      search pass can test candidates without importing a backend.
    - `batches()` and `segment(graph, feeds, fetch)`: the calibration input batches, and a part of a graph
      emitted on its own, for passes that run a graph layer by layer over the data (squeeze_fold's
      cascade) instead of streaming the whole model once per question.
    """

    selected: frozenset[str] | None = None
    stream_fn: ActivationStream | None = None
    budget: dict[str, float] = field(default_factory=dict)
    bounds: dict[str, Any] = field(default_factory=dict)
    seed: int = 0
    log: Callable[[str], None] = field(default=lambda msg: None)
    analyses: dict[str, Any] = field(default_factory=dict)
    # original graph before the pipeline (read-only), for budgets relative to the original
    original: Graph | None = None
    guard: tuple[str, float] | None = None
    fidelity_fn: Callable[..., float | None] | None = None  # (graph, metric[, batches])
    # the torch backend's differentiable run of a graph, and the labels of the calibration batches (a labelled
    # .npz's `labels` array, batched as the stream), for passes that train (recover); installed by the compiler
    trainable_fn: Callable[[Graph], Trainable] | None = None
    labels_fn: Callable[[], Iterator[torch.Tensor]] | None = None
    # runs independent solves (`passes.executor`): from compile(executor=...); None lets a pass use its default
    executor: Executor | None = None
    # progress bars: (description, total or None, unit) -> a bar with update(n) and close(); the compiler's
    # bars honour compile(progress=) / --quiet; None: no bars
    progress_fn: Callable[[str, int | None, str], Any] | None = None
    batches_fn: Callable[[], Iterator[tuple[torch.Tensor, ...]]] | None = None
    segment_fn: Callable[[Graph, Sequence[Value], Sequence[Value]], Segment] | None = None
    # `outputs_sink`: graph -> where its outputs on calibration batch i go when it computes the original's
    # function (the compiler keeps them for its output-error measurements), else None
    sink_fn: Callable[[Graph], Callable[[int, list[torch.Tensor]], None] | None] | None = None
    # (graph, its outputs on every calibration batch): a pass that computed them on its last run over the data hands
    # them on; the compiler's output-error measurement reads them when the compiled graph is still that graph
    # (`CompileReport.calibration_passes` then counts no run of it); None outside `compile`
    result_fn: Callable[[Graph, list[list[torch.Tensor]]], None] | None = None
    # (batches_fn, its batch sizes): read once per calibration source (`batch_sizes`)
    _sizes: tuple[Any, list[int]] | None = field(default=None, init=False, repr=False, compare=False)

    def batches(self) -> Iterator[tuple[torch.Tensor, ...]]:
        """The calibration batches (the graph's inputs, one tuple per batch)."""
        if self.batches_fn is None:
            raise NetsqueezeError(Diagnostic(f"this pass needs calibration data: {GIVE_CALIBRATION}"))
        return self.batches_fn()

    def batch_sizes(self) -> list[int]:
        """The samples in each calibration batch (empty without calibration data), read from `batches()` once."""
        if self.batches_fn is None:
            return []
        if self._sizes is None or self._sizes[0] is not self.batches_fn:
            self._sizes = (self.batches_fn, [int(b[0].shape[0]) for b in self.batches()])
        return self._sizes[1]

    def segment(self, graph: Graph, feeds: Sequence[Value], fetch: Sequence[Value]) -> Segment | None:
        """`graph`'s nodes between `feeds` and `fetch` as one function of the feeds' tensors (no gradient
        unless the caller enables it), or None when the compiler cannot provide one."""
        return None if self.segment_fn is None else self.segment_fn(graph, feeds, fetch)

    def outputs_sink(self, graph: Graph) -> Callable[[int, list[torch.Tensor]], None] | None:
        """Where a pass that runs `graph` whole over the calibration batches through `segment` hands its outputs
        on batch i (detached) when `graph` computes what the original does (unchanged, or rewritten by `exact`
        passes only): the compiler then need not run the original again for the output error it reports. None
        when it does not, or outside `compile` (`stream` hands them on by itself)."""
        return None if self.sink_fn is None else self.sink_fn(graph)

    def progress(self, desc: str, total: int | None, unit: str) -> Any:
        """A progress bar (update(n), close(), set_postfix(...)) from the compiler, or a silent one."""
        return NoBar() if self.progress_fn is None else self.progress_fn(desc, total, unit)

    def is_selected(self, node_id: str) -> bool:
        return self.selected is None or node_id in self.selected

    def stream(self, graph: Graph, values: Sequence[Value]) -> Iterator[list[torch.Tensor]]:
        if self.stream_fn is None:
            raise NetsqueezeError(Diagnostic(f"this pass needs calibration data: {GIVE_CALIBRATION}"))
        return self.stream_fn(graph, values)

    def trainable(self, graph: Graph) -> Trainable:
        if self.trainable_fn is None:
            raise NetsqueezeError(Diagnostic("this pass trains weights and needs the torch backend: run it through "
                                             "compile()"))
        return self.trainable_fn(graph)

    def labels(self) -> Iterator[torch.Tensor] | None:
        """The calibration labels, one tensor per batch in the order `stream` yields batches; None without."""
        return None if self.labels_fn is None else self.labels_fn()

    def guard_check(self, graph: Graph) -> tuple[bool, float] | None:
        """(met, reached) of the policy's guard on candidate `graph`; None when the policy sets no guard
        or the compiler cannot measure it (no calibration data; no eval_fn for top-1)."""
        if self.guard is None:
            return None
        metric, limit = self.guard
        value = self.fidelity(graph, metric)
        return None if value is None else (value <= limit + 1e-12, value)

    def fidelity(self, graph: Graph, metric: str = "output_error", batches: int | None = None,
                 feeds: Feeds | None = None) -> float | None:
        """`metric` ("output_error": relative L2 error of the outputs on the calibration data;
        "top1_change": the share of its class predictions that differ from the original's there, None for a
        model without [batch, classes] or [batch, tokens, vocabulary] outputs; "top1_drop": through the user's
        eval_fn) of candidate `graph` against `original`, or None when the compiler cannot measure it.
        `batches`: the output error or top-1 change on the first that many calibration batches only (a cheaper
        estimate; the top-1 drop ignores it). `feeds`: (values, their tensors per measured batch) that `graph`
        computes on those batches (`passes.frontier.Prefixes`): the candidate runs from them, not from the inputs
        (not for the top-1 drop)."""
        if self.fidelity_fn is None:
            return None
        if feeds is not None:
            return self.fidelity_fn(graph, metric, batches, feeds)
        return self.fidelity_fn(graph, metric) if batches is None else self.fidelity_fn(graph, metric, batches)

    def measure_batches(self, measurements: int, passes: float) -> tuple[int | None, int]:
        """(batches, samples): how many leading calibration batches each of `measurements` output-error
        measurements may run over so that together they cost at most `passes` model passes over the
        calibration data (None: all of them), at least one batch; and how many samples those batches hold.
        Keeps a search's measurements a bounded share of the compile whatever the number of groups."""
        sizes = self.batch_sizes()
        if not sizes or measurements <= passes:
            return None, sum(sizes)
        n = max(1, int(passes * len(sizes) / measurements))
        return (None, sum(sizes)) if n >= len(sizes) else (n, sum(sizes[:n]))

    def analysis(self, cls: type[AnalysisPass[T]], graph: Graph, **options: Any) -> T:
        """The cached result of analysis `cls` on `graph`, computed on first use."""
        inst = cls(**options)
        key = f"{cls.name}:{inst!r}"
        if key not in self.analyses:
            self.analyses[key] = inst.compute(graph, self)
        return self.analyses[key]  # type: ignore[no-any-return]

    def invalidate(self, preserved: frozenset[str] | None) -> None:
        """Drops cached analyses except those whose pass name is in `preserved` (None keeps all)."""
        if preserved is None:
            return
        for k in list(self.analyses):
            if k.split(":", 1)[0] not in preserved:
                del self.analyses[k]

    def bounds_for(self, node_ids: Sequence[str]) -> dict[str, Any]:
        """The policy's per-layer bounds for a channel group produced by `node_ids`: global `bounds`
        merged with every `bounds on SELECTOR` entry of those nodes, the most restrictive winning
        (largest min_channels, round_to and align, smallest max_ratio). `allocation.group_bounds` merges a
        pass's own min_channels/round_to options by the same rule."""
        entries = [{k: v for k, v in self.bounds.items() if k != "per_node"}]
        per_node = self.bounds.get("per_node", {})
        entries += [per_node[n] for n in node_ids if n in per_node]
        out: dict[str, Any] = {}
        for e in entries:
            for k, v in e.items():
                if k == "max_ratio":
                    out[k] = min(out.get(k, v), v)
                elif k in ("min_channels", "round_to", "align"):
                    out[k] = max(out.get(k, v), v)
                else:
                    out.setdefault(k, v)
        return out

    def with_selection(self, selected: frozenset[str] | None) -> PassContext:
        return dataclasses.replace(self, selected=selected)


# The check of option values (`dsl.schema.check_options`: the policy checker's types, choices and ranges,
# worded the same). Passes cannot import dsl, so the compiler installs it; `import netsqueeze` does.
_OPTION_CHECK: list[Callable[[Pass], None]] = []


def install_option_check(check: Callable[[Pass], None]) -> None:
    """Sets the routine `Pass.__post_init__` validates every new pass instance with."""
    _OPTION_CHECK[:] = [check]


@dataclass(frozen=True)
class Pass:
    """Base of every pass. Subclasses are frozen dataclasses with a ClassVar `name` and a docstring.

    Options are checked when an instance is made, from a policy or from Python
    (`SqueezeFold(method="nope")`), by the one routine the policy checker uses: a bad value is a
    `NetsqueezeError` naming the pass and the option. A subclass's own `__post_init__` may call
    `super().__post_init__()` before its extra checks.
    """

    name: ClassVar[str] = ""
    # Names of analyses this pass keeps valid; None means "all" (analyses and read-only passes).
    preserves: ClassVar[frozenset[str] | None] = frozenset()
    # True for a rewrite that keeps the function the graph computes, floating-point rounding apart (fold_bn,
    # dead_code, equalize): the compiler then reads the original's outputs, for the output error it reports,
    # from a run of the rewritten graph that a later pass makes anyway (`run_pipeline`'s `on_exact`)
    exact: ClassVar[bool] = False

    def __post_init__(self) -> None:
        for check in _OPTION_CHECK:
            check(self)

    def run(self, graph: Graph, ctx: PassContext) -> PassResult:
        raise NotImplementedError

    @classmethod
    def options(cls) -> list[dataclasses.Field[Any]]:
        return [f for f in dataclasses.fields(cls) if f.init]

    @classmethod
    def option_defaults(cls) -> dict[str, Any]:
        """Each option's default value (options without a default left out)."""
        out: dict[str, Any] = {}
        for f in cls.options():
            if f.default is not dataclasses.MISSING:
                out[f.name] = f.default
            elif f.default_factory is not dataclasses.MISSING:
                out[f.name] = f.default_factory()
        return out

    @classmethod
    def with_defaults(cls, given: Mapping[str, Any]) -> dict[str, Any]:
        """Every option's value: `given`, the rest at their defaults."""
        return {**cls.option_defaults(), **given}

    def option_values(self) -> dict[str, Any]:
        """This instance's value of every option (what `option_conflicts` checks when a pass built from Python
        runs)."""
        return {f.name: getattr(self, f.name) for f in self.options()}

    @classmethod
    def option_conflicts(cls, given: Mapping[str, Any]) -> list[tuple[str, str]]:
        """The combinations of options this pass cannot run with that the options alone show, as (option, message)
        pairs: the policy checker reports each at check time (`netsqueeze check`, `explain`, before a compile runs
        anything), located at that option when the policy sets it, else at the pass name, as
        "pass 'NAME': MESSAGE". `given` holds the options the policy sets, each a valid value of its type; the
        others take their defaults (`with_defaults(given)`), so a pass can also refuse an option that is set but does
        nothing under the others (`trim`'s `activation_stat` without `criterion = activation`) while its default
        stays silent. Nothing here may depend on the model, the data or the compile's arguments: those are the
        pass's to check when it runs. None by default."""
        return []


@dataclass(frozen=True)
class AnalysisPass(Pass, Generic[T]):
    """A pass that computes a cached result and never changes the graph."""

    preserves: ClassVar[frozenset[str] | None] = None

    def compute(self, graph: Graph, ctx: PassContext) -> T:
        raise NotImplementedError

    def run(self, graph: Graph, ctx: PassContext) -> PassResult:
        key = f"{self.name}:{self!r}"
        ctx.analyses[key] = self.compute(graph, ctx)
        return PassResult(changed=False)


@dataclass(frozen=True)
class TransformPass(Pass):
    """A pass that rewrites the graph in place and reports what it changed."""
