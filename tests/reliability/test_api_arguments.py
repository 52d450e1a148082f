"""The Python API's arguments, checked where the user passes them: wrong types and values are
`NetsqueezeError`s that say what was expected (they were bare TypeErrors, AttributeErrors, InternalErrors, or
were silently taken: `trust_pickle = "no"` unpickled), and `result.save` never overwrites the compile's inputs."""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from torch import nn

import netsqueeze as ns
from netsqueeze.errors import FileError
from tests.zoo import ZOO

POLICY = "policy p {\n  trim on fc1 { ratio = 50%, criterion = l2 }\n}\n"


@pytest.fixture(scope="module")
def mlp() -> tuple[nn.Module, torch.Tensor, torch.Tensor]:
    model, (x,) = ZOO["mlp"]()
    return model, x, torch.randn(64, x.shape[1], generator=torch.Generator().manual_seed(0))


@pytest.mark.parametrize(("kwargs", "error", "message"), [
    ({"seed": "a"}, ns.NetsqueezeError, "seed must be an integer from 0 to 2**62 - 1, got 'a'"),
    ({"seed": None}, ns.NetsqueezeError, "seed must be an integer from 0 to 2**62 - 1, got None"),
    ({"seed": 1.5}, ns.NetsqueezeError, "seed must be an integer from 0 to 2**62 - 1, got 1.5"),
    ({"seed": 2 ** 70}, ns.NetsqueezeError, f"seed must be an integer from 0 to 2**62 - 1, got {2 ** 70}"),
    ({"trust_pickle": "no"}, ns.NetsqueezeError, "trust_pickle must be True or False, got 'no'"),
    ({"labelled": "yes"}, ns.NetsqueezeError, "labelled must be True or False, got 'yes'"),
    ({"progress": 1}, ns.NetsqueezeError, "progress must be True, False or None (bars on a terminal only), got 1"),
    ({"log": 5}, ns.NetsqueezeError, "log is a int, not a function of a message"),
    ({"params": [1]}, ns.NetsqueezeError,
     "params is a list: give a dict of policy parameter names to values, e.g. {'ratio': '30%'}"),
    ({"input_shapes": [1]}, ns.InputMismatchError,
     "input_shapes is a list: give a dict of input names to their dims, e.g. {'x': [1, 3, 224, 224]}"),
])
def test_arguments_of_the_wrong_type_are_refused(mlp: tuple[nn.Module, torch.Tensor, torch.Tensor],
                                                 kwargs: dict[str, Any], error: type[Exception],
                                                 message: str) -> None:
    model, x, cal = mlp
    with pytest.raises(error) as e:
        ns.compile(model, POLICY, example_inputs=(x,), calibration=cal, **kwargs)
    assert e.value.diagnostics[0].message == message  # type: ignore[attr-defined]


def test_trust_pickle_must_be_a_bool_before_anything_is_unpickled(tmp_path: Path,
                                                                   mlp: tuple[nn.Module, torch.Tensor, torch.Tensor]
                                                                   ) -> None:
    model, x, _ = mlp
    torch.save(model, tmp_path / "full.pt")
    for call in (lambda: ns.compile(tmp_path / "full.pt", POLICY, example_inputs=(x,), trust_pickle="false"),
                 lambda: ns.import_model(tmp_path / "full.pt", (x,), trust_pickle="false")):
        with pytest.raises(ns.NetsqueezeError, match=re.escape("trust_pickle must be True or False, got 'false'")):
            call()


@pytest.mark.parametrize(("example", "message"), [
    (lambda x: x.to("meta"), "example input 0 is a meta tensor (a shape without data): give it real data"),
    (lambda x: x.to_sparse(), "example input 0 is a sparse_coo tensor: give it dense (tensor.to_dense())"),
    (lambda x: x[:0], "example input 0 has shape [0, 20]: no samples (dim 0 is 0)"),
])
def test_example_inputs_without_data(mlp: tuple[nn.Module, torch.Tensor, torch.Tensor], example: Any,
                                     message: str) -> None:
    model, x, _ = mlp
    with pytest.raises(ns.InputMismatchError) as e:
        ns.compile(model, POLICY, example_inputs=(example(x),))
    assert e.value.diagnostics[0].message == message


@pytest.mark.parametrize(("data", "message"), [
    (lambda c: c.to("meta"), "calibration data is a meta tensor (a shape without data): give it real data"),
    (lambda c: [c[:32].to("meta")], "calibration batch 0: input 'x' is a meta tensor (a shape without data): give it "
                                    "real data"),
    (lambda c: c.to_sparse(), "calibration data is a sparse_coo tensor: give it dense (tensor.to_dense())"),
])
def test_calibration_without_data(mlp: tuple[nn.Module, torch.Tensor, torch.Tensor], data: Any, message: str) -> None:
    model, x, cal = mlp
    with pytest.raises(ns.InputMismatchError) as e:
        ns.compile(model, POLICY, example_inputs=(x,), calibration=data(cal))
    assert e.value.diagnostics[0].message == message


class _TwoInputs(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.a, self.b, self.o = nn.Linear(20, 16), nn.Linear(10, 16), nn.Linear(16, 4)

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return self.o(torch.relu(self.a(x) + self.b(y)))


def test_a_calibration_batch_whose_inputs_differ_in_samples() -> None:
    """Two inputs sharing the dynamic batch, given 16 and 8 samples: an InternalError, with torch.fx's traceback on
    stderr."""
    x, y = torch.randn(4, 20), torch.randn(4, 10)
    policy = "policy p {\n  trim on a { ratio = 50%, criterion = l2 }\n}\n"
    with pytest.raises(ns.InputMismatchError) as e:
        ns.compile(_TwoInputs().eval(), policy, example_inputs=(x, y),
                   calibration=[(torch.randn(16, 20), torch.randn(8, 10))])
    assert e.value.diagnostics[0].message == ("calibration batch 0: the inputs have 16, 8 samples (x, y), but the "
                                              "model's inputs share their first dim 'batch'")
    ns.compile(_TwoInputs().eval(), policy, example_inputs=(x, y), calibration=[(torch.randn(16, 20),
                                                                                   torch.randn(16, 10))])


def test_an_empty_policy_string_and_a_pass_name_that_is_not_a_string(
        mlp: tuple[nn.Module, torch.Tensor, torch.Tensor]) -> None:
    model, x, _ = mlp
    with pytest.raises(ns.PolicyError) as e:
        ns.compile(model, " ", example_inputs=(x,))
    assert e.value.diagnostics[0].message == ("the policy is an empty string: give a policy file path, policy text "
                                              "or a list of passes")
    with pytest.raises(ns.NetsqueezeError, match=re.escape("a pass name is a string, got NoneType")):
        ns.get_pass(None)  # type: ignore[arg-type]


def test_save_never_overwrites_what_the_compile_read(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                     mlp: tuple[nn.Module, torch.Tensor, torch.Tensor]) -> None:
    """`result.save` wrote the compressed model over the policy, the calibration file and the model file alike."""
    model, x, cal = mlp
    monkeypatch.chdir(tmp_path)
    Path("p.sqz").write_text(POLICY)
    np.savez("cal.npz", x=cal.numpy())
    torch.save(model, "model.pt")
    res = ns.compile("model.pt", "p.sqz", example_inputs=(x,), calibration="cal.npz", store="sham",
                     trust_pickle=True)
    before = {p: Path(p).read_bytes() for p in ("p.sqz", "cal.npz", "model.pt")}
    for path in ("p.sqz", "cal.npz", "model.pt", "m.onnx"):
        with pytest.raises(FileError) as e:
            res.save(path)
        assert e.value.diagnostics[0].message == (f"'{path}': a compressed model file ends in .nsq (netsqueeze.load "
                                                  "reads it; other suffixes name other formats)")
    for bad in (None, 5):
        with pytest.raises(FileError) as e:
            res.save(bad)  # type: ignore[arg-type]
        assert e.value.diagnostics[0].message == (f"a compressed model file path is a str or os.PathLike, got "
                                                  f"{type(bad).__name__}")
    assert {p: Path(p).read_bytes() for p in before} == before
    res.save("small.nsq")
    assert torch.equal(ns.load("small.nsq")(x), res.model(x))
    with pytest.raises(ns.NetsqueezeError) as e:
        ns.save(res.model, "z.nsq")
    assert e.value.diagnostics[0].message == (f"netsqueeze.save writes a netsqueeze graph (a compile's result.graph), "
                                              f"got {type(res.model).__name__}; a compile's result.save(path) writes "
                                              "its model file")
    with pytest.raises(FileError, match=re.escape("a compressed model file path is a str or os.PathLike, got "
                                                     "bytes")):
        ns.load(b"small.nsq")  # type: ignore[arg-type]
    assert sorted(os.listdir(".")) == ["cal.npz", "model.pt", "p.sqz", "small.nsq"]


def test_save_refuses_an_input_with_the_nsq_suffix(tmp_path: Path,
                                                   mlp: tuple[nn.Module, torch.Tensor, torch.Tensor]) -> None:
    model, x, _ = mlp
    policy = tmp_path / "policy.nsq"
    policy.write_text(POLICY)
    res = ns.compile(model, policy, example_inputs=(x,), calibration=torch.randn(64, 20), store="dense")
    with pytest.raises(FileError) as e:
        res.save(policy)
    assert e.value.diagnostics[0].message == (f"refusing to overwrite the policy file '{policy}': choose another "
                                              "save path")
    assert policy.read_text() == POLICY


class _Raising:
    def __init__(self, first: torch.Tensor) -> None:
        self.first = first

    def __iter__(self) -> Any:
        yield self.first
        raise ValueError("boom in the user's iterator")


@pytest.mark.parametrize(("data", "kind", "start"), [
    (lambda c: _Raising(c[:16]), ns.UserCodeError,
     "pass 'trim' (<policy>:2) failed: the calibration iterator (producing item 1) raised ValueError"),
    (lambda c: [c[:16], c[16:32], torch.full((16, 20), float("inf"))], ns.NonFiniteError,
     "pass 'trim' (<policy>:2) failed: calibration batch 2: input 'x' contains Inf (320 of 320 values)"),
    (lambda c: [c[:16], torch.randn(16, 7)], ns.InputMismatchError,
     "pass 'trim' (<policy>:2) failed: calibration batch 1: input 'x' has shape [16, 7] but the model expects "
     "[N, 20]"),
])
def test_data_errors_met_while_a_pass_runs_keep_their_kind(mlp: tuple[nn.Module, torch.Tensor, torch.Tensor],
                                                           data: Any, kind: type[Exception], start: str) -> None:
    """A calibration iterator that raises, or a later batch with an Inf or the wrong shape, was a plain `PassError`
    blaming the pass, so `except UserCodeError` / `NonFiniteError` (what the README promises) missed it. It is now
    both, still located at the pass that was reading the data."""
    model, x, cal = mlp
    with pytest.raises(ns.PassError) as e:
        ns.compile(model, POLICY, example_inputs=(x,), calibration=data(cal))
    assert isinstance(e.value, kind)
    assert e.value.diagnostics[0].message.startswith(start)


@pytest.mark.parametrize(("decl", "message"), [
    ("input x: float32[4, 7]", "input 'x' is declared float32[4, 7] but the model's input 0 ('x') is float32[4, 20]"),
    ("input x: float64[4, 20]", "input 'x' is declared float64[4, 20] but the model's input 0 ('x') is "
                                "float32[4, 20]"),
    ("input x: float32[4, 20]\n  input y: float32[4, 20]", "the policy declares 2 input(s) but the model takes 1 (x)"),
])
def test_an_input_declaration_that_contradicts_the_model(mlp: tuple[nn.Module, torch.Tensor, torch.Tensor],
                                                         decl: str, message: str) -> None:
    """Beside example inputs, a declaration was ignored without a word, however wrong. Declarations stand in for
    example inputs, in order: a name need not be the forward argument's."""
    model, x, cal = mlp
    policy = f"policy p {{\n  {decl}\n  trim on fc1 {{ ratio = 50%, criterion = l2 }}\n}}\n"
    with pytest.raises(ns.PolicyError) as e:
        ns.compile(model, policy, example_inputs=(x,), calibration=cal)
    d = e.value.diagnostics[0]
    assert (d.message, d.span.line, d.span.col) == (message, 2, 3)  # type: ignore[union-attr]
    # the dynamic batch may differ from the declaration's, and the name from the forward argument's
    ns.compile(model, policy.replace(decl, "input q: float32[9, 20]"), example_inputs=(x,), calibration=cal)


def test_import_model_says_what_is_wrong(mlp: tuple[nn.Module, torch.Tensor, torch.Tensor]) -> None:
    """import_model(None) asked for example inputs, a dict of inputs was read by its keys ("example input 0 is a
    str"), and an ONNX model's example of the wrong size was blamed on an input_shapes never given."""
    from netsqueeze.backends.onnx import to_onnx

    model, x, _ = mlp
    with pytest.raises(ns.CaptureError) as e:
        ns.import_model(None)
    assert e.value.diagnostics[0].message == ("cannot capture a NoneType: expected an nn.Module, a torch.fx.GraphModule "
                                              "or a torch.export.ExportedProgram")
    with pytest.raises(ns.InputMismatchError) as e:
        ns.import_model(model, {"x": x})  # type: ignore[arg-type]
    assert e.value.diagnostics[0].message == "example_inputs is a dict; expected a tensor or a tuple of tensors"
    proto = to_onnx(ns.import_model(model, (x,)))
    with pytest.raises(ns.CaptureError) as e:
        ns.import_model(proto, (torch.randn(4, 7),))
    assert e.value.diagnostics[0].message == ("example input 0 ('x', shape [4, 7]) gives 7 for axis 1, which the "
                                              "model fixes at 20")
    with pytest.raises(ns.CaptureError) as e:
        ns.import_model(proto, input_shapes={"x": [4, 7]})
    assert e.value.diagnostics[0].message == "input_shapes['x'] gives 7 for axis 1, which the model fixes at 20"


def test_dynamic_shapes_for_an_onnx_model_and_a_model_in_training_mode(
        mlp: tuple[nn.Module, torch.Tensor, torch.Tensor]) -> None:
    """dynamic_shapes with an ONNX model was ignored, and a model in training mode compiled with eval semantics
    without a word."""
    from torch.export import Dim

    from netsqueeze.backends.onnx import to_onnx

    model, x, cal = mlp
    proto = to_onnx(ns.import_model(model, (x,)))
    with pytest.raises(ns.InputMismatchError) as e:
        ns.compile(proto, POLICY, example_inputs=(x,), dynamic_shapes={"x": {0: Dim("batch")}})
    model = nn.Sequential(nn.Linear(20, 32), nn.ReLU(), nn.Dropout(0.5), nn.Linear(32, 4))
    policy = "policy p {\n  trim on type(linear) { ratio = 50%, criterion = l2 }\n}\n"
    assert e.value.diagnostics[0].message == ("dynamic_shapes declares a torch model's dynamic dims: an ONNX model's "
                                              "open dims stay dynamic by themselves (input_shapes gives their sizes "
                                              "for analysis)")
    res = ns.compile(model, policy, example_inputs=(x,), calibration=cal)  # a new module is in training mode
    assert model.training
    assert ("the model was in training mode: it is compiled as in eval mode (BatchNorm's running statistics, no "
            "dropout), as the compressed model runs; the model you passed keeps its mode") in res.report.notes
    assert not any("training mode" in n for n in ns.compile(model.eval(), policy, example_inputs=(x,),
                                                             calibration=cal).report.notes)
