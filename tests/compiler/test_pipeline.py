"""Pass manager, registry and analysis cache."""

from dataclasses import dataclass
from typing import ClassVar

import pytest
import torch

from netsqueeze.compiler.calibration import PassCount
from netsqueeze.compiler.pipeline import Step, run_pipeline
from netsqueeze.errors import NetsqueezeError, PassError
from netsqueeze.ir import Graph
from netsqueeze.passes import AnalysisPass, PassContext, PassResult, TransformPass, get_pass, register_pass
from netsqueeze.passes.dead_code import DeadCode
from netsqueeze.passes.registry import unregister_pass


def mlp() -> Graph:
    g = Graph("mlp")
    g.add_node("x", "input", attrs={"shape": (2, 4)})
    g.add_node("fc1", "linear", ["x"], params={"weight": torch.randn(8, 4), "bias": torch.zeros(8)})
    g.add_node("act", "relu", ["fc1"])
    g.add_node("fc2", "linear", ["act"], params={"weight": torch.randn(3, 8)})
    g.add_node("out", "output", ["fc2"])
    g.infer_shapes()
    return g


@dataclass(frozen=True)
class Explode(TransformPass):
    """Raises inside run()."""

    name: ClassVar[str] = "explode"

    def run(self, graph: Graph, ctx: PassContext) -> PassResult:
        raise ValueError("boom")


@dataclass(frozen=True)
class BreakShapes(TransformPass):
    """Changes a weight without propagating shapes: the verifier must catch it."""

    name: ClassVar[str] = "break_shapes"

    def run(self, graph: Graph, ctx: PassContext) -> PassResult:
        graph.node("fc2").params["weight"] = torch.randn(3, 5)
        return PassResult(changed=True)


def test_failure_names_the_pass_and_its_predecessors() -> None:
    with pytest.raises(PassError) as e:
        run_pipeline(mlp(), [DeadCode(), Step(Explode(), where="p.sqz:4")], PassContext())
    assert str(e.value) == ("error: pass 'explode' (p.sqz:4) failed: ValueError: boom\n"
                            "  note: passes run before it: dead_code")


def test_verify_runs_after_every_pass() -> None:
    with pytest.raises(PassError) as e:
        run_pipeline(mlp(), [BreakShapes()], PassContext())
    assert e.value.diagnostics[0].node == "fc2"
    assert e.value.message == "pass 'break_shapes' failed: linear 'fc2': input has 8 features but weight expects 5"


def test_records_time_and_changes() -> None:
    g = mlp()
    g.add_node("dangling", "relu", ["x"])
    g.infer_shapes()
    run = run_pipeline(g, [DeadCode()], PassContext())
    (rec,) = run.records
    assert rec.name == "dead_code" and rec.seconds >= 0
    assert rec.changed_nodes() == ["dangling"]
    assert rec.result.removed == {"dangling"}


calls: list[int] = []


@dataclass(frozen=True)
class CountNodes(AnalysisPass[int]):
    """Counts nodes; counts its own invocations so caching is observable."""

    name: ClassVar[str] = "count_nodes"

    def compute(self, graph: Graph, ctx: PassContext) -> int:
        calls.append(1)
        return len(graph)


def test_analysis_cache_and_invalidation() -> None:
    calls.clear()
    g = mlp()
    ctx = PassContext()
    assert ctx.analysis(CountNodes, g) == 5
    assert ctx.analysis(CountNodes, g) == 5
    assert len(calls) == 1
    g.add_node("dangling", "relu", ["x"])
    g.infer_shapes()
    run_pipeline(g, [DeadCode()], ctx)  # changed the graph, does not preserve count_nodes
    assert ctx.analysis(CountNodes, g) == 5 and len(calls) == 2


def test_registry_duplicates_and_lookup() -> None:
    @dataclass(frozen=True)
    class Mine(TransformPass):
        name: ClassVar[str] = "mine_test_pass"

    register_pass(Mine)
    try:
        assert get_pass("mine_test_pass") is Mine

        @dataclass(frozen=True)
        class Other(TransformPass):
            name: ClassVar[str] = "mine_test_pass"

        with pytest.raises(NetsqueezeError, match="duplicate pass name 'mine_test_pass'"):
            register_pass(Other)
    finally:
        unregister_pass("mine_test_pass")
    with pytest.raises(NetsqueezeError, match=r"unknown pass 'fold_bm' \(did you mean 'fold_bn'\?\)"):
        get_pass("fold_bm")


def test_register_rejects_non_frozen() -> None:
    class Loose(TransformPass):  # subclass without @dataclass(frozen=True): options would be invisible
        name: ClassVar[str] = "loose"

    with pytest.raises(NetsqueezeError, match="must be a frozen dataclass"):
        register_pass(Loose)


def test_whole_calibration_passes_read_whole() -> None:
    """The pass count adds shares of the model per batch in floats: ten runs of a tenth of the model over each of
    3 batches are 1 pass, not 0.9999999999999999 (the report printed 3.000000000000001)."""
    count = PassCount(lambda: iter([(torch.zeros(1),)] * 3))
    for _ in range(30):
        count.add(0.1)
    assert count.units != 3.0 and count.passes == 1.0
