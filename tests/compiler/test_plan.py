"""Policy resolution: schemas from pass dataclasses, option conversion, specificity, overrides,
parameter overrides, check_file, and the example policies resolved on zoo models."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import ClassVar, Literal

import pytest

from netsqueeze.compiler.plan import Guard, check_file, explain, resolve, schema_from_pass
from netsqueeze.dsl import TypeDesc, parse_policy
from netsqueeze.errors import PolicyError
from netsqueeze.passes.base import TransformPass
from netsqueeze.passes.registry import all_passes
from netsqueeze.passes.trim import Trim
from tests.dsl.tiny import tiny_cnn

ROOT = Path(__file__).resolve().parents[2]


@dataclass(frozen=True)
class Kitchen(TransformPass):
    """Every option type the checker knows."""

    name: ClassVar[str] = "kitchen"
    count: int = field(default=1, metadata={"unit": "count", "min": 0})
    ratio: float = field(default=0.5, metadata={"min": 0, "max": 1, "unit": "ratio", "doc": "share kept"})
    timeout: float = field(default=1.0, metadata={"unit": "duration"})
    flag: bool = False
    label: str = "x"
    mode: Literal["a", "b"] = "a"
    sizes: tuple[int, ...] = ()
    pair: tuple[int, str] = (1, "a")
    maybe: float | None = None
    names: list[str] = field(default_factory=list)


def _passes() -> dict[str, type]:
    return {**all_passes(), "kitchen": Kitchen}


def test_schema_from_pass() -> None:
    s = schema_from_pass(Kitchen)
    assert s.name == "kitchen" and s.doc == "Every option type the checker knows."
    opts = {o.name: o for o in s.options}
    assert opts["count"].type == TypeDesc("int") and opts["count"].unit == "count"
    assert (opts["ratio"].min, opts["ratio"].max, opts["ratio"].unit, opts["ratio"].doc) == (0, 1, "ratio", "share kept")
    assert opts["mode"].type == TypeDesc("literal", choices=("a", "b"))
    assert opts["sizes"].type == TypeDesc("tuple", args=(TypeDesc("int"),))
    assert opts["pair"].type == TypeDesc("tuple", args=(TypeDesc("int"), TypeDesc("str")), variadic=False)
    assert opts["maybe"].type == TypeDesc("optional", args=(TypeDesc("float"),))
    assert opts["names"].type == TypeDesc("list", args=(TypeDesc("str"),)) and opts["names"].default == []
    assert not any(o.required for o in s.options)


def test_option_conversion() -> None:
    text = """policy p {
      kitchen on all { count = 4.5M, ratio = 25%, timeout = 12ms, flag = true, label = int8 per_channel,
                       mode = b, sizes = [1, 2K], pair = [3, "z"], maybe = none, names = [a, "b c"] }
    }"""
    step = resolve(parse_policy(text), tiny_cnn(), _passes()).steps[0]
    k = step.instance
    assert isinstance(k, Kitchen)
    assert k.count == 4_500_000 and isinstance(k.count, int)
    assert k.ratio == 0.25 and k.timeout == pytest.approx(0.012) and k.flag is True
    assert k.label == "int8 per_channel" and k.mode == "b"
    assert k.sizes == (1, 2000) and k.pair == (3, "z") and k.maybe is None and k.names == ["a", "b c"]


def test_plan_fields() -> None:
    text = """policy p {
      input x: float32[1, 3, 8, 8]
      calibrate samples 2K, batch 16
      budget params <= 25%, flops <= 0.5
      bounds { min_channels = 8, max_ratio = 75% }
      guard top1 drop <= 1%
      fold_bn
      trim on type(linear) { ratio = 10% }
    }"""
    plan = resolve(parse_policy(text, "p.sqz"), tiny_cnn(), _passes())
    assert plan.budget == {"params": 0.25, "flops": 0.5}
    assert plan.bounds == {"min_channels": 8, "max_ratio": 0.75}
    assert plan.guard == Guard("top1_drop", 0.01)
    assert plan.calibration == {"samples": 2000, "batch": 16}
    assert [(i.name, i.dtype, i.shape) for i in plan.inputs] == [("x", "float32", (1, 3, 8, 8))]
    assert [s.pass_name for s in plan.steps] == ["fold_bn", "trim"]
    assert plan.steps[0].selected is None and plan.steps[1].selected == frozenset({"fc1", "fc2"})
    assert plan.steps[1].source_line.strip() == "trim on type(linear) { ratio = 10% }"
    assert plan.steps[1].span.line == 8
    assert len(plan.policy_hash) == 64 and plan.to_text() == resolve(
        parse_policy(text, "p.sqz"), tiny_cnn(), _passes()).to_text()


def test_specificity_and_source_order() -> None:
    text = """policy p {
      trim { ratio = 10% }
      trim on type(conv) { ratio = 20% }
      trim on type(conv) where groups > 1 { ratio = 30% }
      trim on layer1.* { ratio = 40% }
      trim on layer1.conv2 { ratio = 50% }
      trim on type(conv) { ratio = 20% }
      dead_code
      trim on stem.conv { ratio = 60% }
    }"""
    plan = resolve(parse_policy(text), tiny_cnn(), _passes())
    owner = {}
    for i, s in enumerate(plan.steps[:6]):
        for n in s.selected or ():
            owner[n] = (i, s.instance.ratio)  # type: ignore[attr-defined]
    assert owner["fc1"] == (0, 0.1) and owner["layer2.conv1"] == (1, 0.2) and owner["stem.conv"] == (1, 0.2)
    assert owner["layer2.dw"] == (2, 0.3) and owner["layer1.conv1"] == (3, 0.4) and owner["layer1.conv2"] == (4, 0.5)
    assert plan.steps[5].selected == frozenset()  # identical options, equal specificity: the first owns them
    assert plan.steps[7].selected == frozenset({"stem.conv"})  # not adjacent: a separate run
    assert "over" in explain(plan, tiny_cnn()).split("layer1.conv2 (conv)")[1].splitlines()[1]


def test_param_overrides() -> None:
    text = "param r = 25%\npolicy p { trim on type(conv) { ratio = r } }"
    plan = resolve(parse_policy(text, params={"r": "40%"}), tiny_cnn(), _passes())
    assert plan.steps[0].instance.ratio == 0.4  # type: ignore[attr-defined]
    assert parse_policy(text, params={"r": "40%"}).hash() != parse_policy(text).hash()
    with pytest.raises(PolicyError) as e:
        parse_policy(text, params={"ratio": "40%"})
    assert str(e.value) == "<--set>:1:1: error: unknown parameter 'ratio' (declared: r)\n  ratio=40%\n  ^~~~~"
    with pytest.raises(PolicyError) as e:
        parse_policy(text, params={"r": "40%%"})
    assert str(e.value).startswith("<--set>:1:6: error: unexpected character '%'")


def test_check_file(tmp_path: Path) -> None:
    bad = tmp_path / "bad.sqz"
    bad.write_text("policy p {\n  trm\n  trim { ration = 1 }\n}\n")
    diags = check_file(bad, passes=_passes())
    assert [d.message for d in diags] == [
        "unknown pass 'trm' (did you mean 'trim'?)",
        "unknown option 'ration' for pass 'trim' (did you mean 'ratio' or 'criterion' or 'allocation'?)",
    ]
    assert check_file(ROOT / "examples" / "vgg_edge.sqz") == []  # the real registry
    assert check_file(tmp_path / "missing.sqz", passes=_passes())[0].message.startswith("cannot read policy")


def test_pass_rejecting_options() -> None:
    @dataclass(frozen=True)
    class Picky(Trim):
        name: ClassVar[str] = "picky"

        def __post_init__(self) -> None:
            if self.ratio > 0.9:
                raise ValueError("ratio above 90% leaves nothing")

    with pytest.raises(PolicyError, match="pass 'picky' rejected its options: ratio above 90% leaves nothing"):
        resolve(parse_policy("policy p { picky { ratio = 95% } }"), tiny_cnn(), {**_passes(), "picky": Picky})


@pytest.mark.parametrize(("example", "model", "expected"), [
    ("vgg_edge", "vgg", {"trim": {"features.3", "features.7", "features.10", "features.14"},
                         "squeeze_fold": {"features.0", "features.3", "features.14", "classifier.1"}}),
    ("resnet_trim", "resnet", {"trim": {"layer1.0.conv1", "layer3.0.conv1", "layer2.0.downsample.0", "conv1",
                                        "layer1.0.conv2"}}),
    ("transformer_ffn", "transformer", {"squeeze_fold": {"layers.0.ff1", "layers.1.ff1"}}),
])
def test_examples_resolve_on_zoo_models(example: str, model: str, expected: dict[str, set[str]]) -> None:
    """The examples against the real passes (they are compiled for real in test_examples.py)."""
    from netsqueeze.frontends.fx import from_torch
    from netsqueeze.passes.registry import all_passes
    from tests.zoo import ZOO

    m, x = ZOO[model]()
    graph = from_torch(m, x)
    plan = resolve(parse_policy((ROOT / "examples" / f"{example}.sqz").read_text(), f"{example}.sqz"), graph,
                   all_passes())
    selected: dict[str, set[str]] = {}
    for s in plan.steps:
        selected.setdefault(s.pass_name, set()).update(s.selected or ())
    for name, nodes in expected.items():
        assert nodes <= selected[name], (name, sorted(selected[name]))
    assert explain(plan, graph).startswith(f"policy {plan.policy_name} (sha256 ")
