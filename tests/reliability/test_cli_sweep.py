"""The command line's own reliability: files it must not overwrite (an ONNX model's external data, a link's target),
option values that are usage errors (exit 2) naming the option, `bench`'s `--batch` and `--data` checks, the caret
under a line with tabs, and an interrupt before the command starts. Every case asserts the exit code and the message
exactly, and that no file was written or changed."""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

import netsqueeze.compiler.bench as bench_module
from netsqueeze.cli import main
from netsqueeze.compiler.bench import parse_batches
from netsqueeze.errors import Diagnostic, SourceSpan, UsageError

ROOT = Path(__file__).resolve().parents[2]


def tiny_onnx(path: Path, batch: str | int = "N", external: str | None = None) -> None:
    """y = x @ W: x [batch, 4] -> y [batch, 3] class scores; W in the file or in `external` beside it."""
    w = numpy_helper.from_array(np.arange(12, dtype=np.float32).reshape(4, 3) / 10, "W")
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [batch, 4])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, [batch, 3])
    g = helper.make_graph([helper.make_node("MatMul", ["x", "W"], ["y"], name="mm")], "tiny", [x], [y], [w])
    model = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    if external is None:
        onnx.save_model(model, str(path))
    else:
        onnx.save_model(model, str(path), save_as_external_data=True, all_tensors_to_one_file=True,
                        location=external, size_threshold=0)


def snapshot(d: Path) -> dict[str, str]:
    """Every file and link under `d` with its content's hash (a link: where it points)."""
    out = {}
    for p in sorted(d.rglob("*")):
        rel = str(p.relative_to(d))
        if p.is_symlink():
            out[rel] = "-> " + os.readlink(p)
        elif p.is_file():
            out[rel] = hashlib.sha256(p.read_bytes()).hexdigest()
    return out


@pytest.fixture
def ws(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.chdir(tmp_path)
    tiny_onnx(tmp_path / "m.onnx")
    return tmp_path


def run(argv: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, str]:
    code = main(argv)
    return code, capsys.readouterr().err.strip()


# ---- 1. an ONNX model's external-data files are inputs ----------------------------------------------------------
def test_outputs_never_overwrite_the_external_data_of_the_input_model(ws: Path,
                                                                     capsys: pytest.CaptureFixture[str]) -> None:
    tiny_onnx(ws / "ext.onnx", external="weights.pt")
    (ws / "alias.pt").symlink_to("weights.pt")
    os.link(ws / "weights.pt", ws / "hard.pt")
    before = snapshot(ws)
    refused = "error: refusing to overwrite the input model's external data file 'weights.pt': choose another {} path"
    for argv, option in [
        (["compile", "ext.onnx", "-o", "weights.pt"], "-o"),
        (["compile", "ext.onnx", "-o", "alias.pt"], "-o"),
        (["compile", "ext.onnx", "-o", "hard.pt"], "-o"),
        (["compile", "ext.onnx", "-o", "out.onnx", "--report", "weights.pt"], "--report"),
        (["compile", "ext.onnx", "-o", "out.onnx", "--report-json", "weights.pt"], "--report-json"),
    ]:
        assert run(argv, capsys) == (1, refused.format(option)), argv
    assert run(["bench", "m.onnx", "ext.onnx", "--json", "weights.pt"], capsys) == (
        1, "error: refusing to overwrite the model's external data file 'weights.pt': choose another --json path")
    assert snapshot(ws) == before
    # an ONNX output over 2 GB keeps its weights in '<name>.data' beside it: that name may not be an input either
    tiny_onnx(ws / "ext2.onnx", external="small.onnx.data")
    before = snapshot(ws)
    assert run(["compile", "ext2.onnx", "-o", "small.onnx"], capsys) == (
        1, "error: refusing to overwrite the input model's external data file 'small.onnx.data': an ONNX output over "
           "2 GB keeps its weights in 'small.onnx.data' beside it; choose another -o path")
    assert snapshot(ws) == before
    (ws / "hard.pt").unlink()  # ONNX refuses external data with several hard links
    assert main(["compile", "ext.onnx", "-o", "out.onnx", "-q"]) == 0  # elsewhere, the model compiles


# ---- 4 and 14. --batch -------------------------------------------------------------------------------------------
@pytest.mark.parametrize("text, message", [
    ("99999999999999999999", "--batch '99999999999999999999': batch size 99999999999999999999 is too large "
                             "(at most 2147483647)"),
    ("1,,4", "--batch '1,,4': item 2 is empty; give batch sizes separated by commas (1,64)"),
    ("1,", "--batch '1,': item 2 is empty; give batch sizes separated by commas (1,64)"),
    ("", "--batch '': item 1 is empty; give batch sizes separated by commas (1,64)"),
    ("1,4,4", "--batch '1,4,4' gives batch size 4 twice"),
    ("1,0", "--batch expects positive integers separated by commas (1,64), got '1,0'"),
    ("1.5", "--batch expects positive integers separated by commas (1,64), got '1.5'"),
])
def test_batch_lists_that_are_usage_errors(text: str, message: str) -> None:
    with pytest.raises(UsageError) as e:
        parse_batches(text)
    assert e.value.message == message


def test_bench_batch_too_large_is_a_usage_error_not_an_internal_one(ws: Path, capsys: pytest.CaptureFixture[str],
                                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    before = snapshot(ws)
    assert run(["bench", "m.onnx", "--rounds", "1", "--batch", "99999999999999999999"], capsys) == (
        2, "error: --batch '99999999999999999999': batch size 99999999999999999999 is too large (at most 2147483647)")
    assert run(["bench", "m.onnx", "--rounds", "1", "--batch", "1,,4,4"], capsys) == (
        2, "error: --batch '1,,4,4': item 2 is empty; give batch sizes separated by commas (1,64)")
    # a batch whose inputs cannot fit in memory: x is [batch, 4] float32, 16 bytes a sample
    monkeypatch.setattr(bench_module, "_memory_bytes", lambda: 2**30)
    assert run(["bench", "m.onnx", "--rounds", "1", "--batch", "2147483647"], capsys) == (
        2, "error: --batch 2147483647: the inputs of 'm.onnx' at batch 2147483647 take 32.0 GiB, more than this "
           "machine's 1.0 GiB of memory")
    assert snapshot(ws) == before


# ---- 5. options the output format ignores ------------------------------------------------------------------------
NSQ = ("does not apply to the output 'n.nsq': a compressed model file (.nsq) holds the weights in its store format "
       "(the policy's `store`, else sHAM); {} applies to .onnx, .pt and .pt2 outputs")


@pytest.mark.parametrize("argv, message", [
    (["-o", "n.nsq", "--precision", "fp16"], "--precision fp16 " + NSQ.format("--precision")),
    (["-o", "n.nsq", "--sparse", "csr"], "--sparse csr " + NSQ.format("--sparse")),
    (["-o", "n.nsq", "--sparse", "dense"], "--sparse dense " + NSQ.format("--sparse")),
    (["-o", "s.onnx", "--sparse", "csr"], "--sparse csr does not apply to the output 's.onnx': csr makes torch linear "
                                          "layers keep a torch.sparse_csr weight (.pt, .pt2); an ONNX model keeps "
                                          "sparse weights as sparse_initializer (the default) or dense (--sparse dense)"),
], ids=["nsq-fp16", "nsq-csr", "nsq-dense", "onnx-csr"])
def test_options_the_output_format_would_ignore_are_usage_errors(argv: list[str], message: str, ws: Path,
                                                                 capsys: pytest.CaptureFixture[str]) -> None:
    before = snapshot(ws)
    assert run(["compile", "m.onnx", *argv], capsys) == (2, f"error: {message}")
    assert snapshot(ws) == before


# ---- 7. messages that name the right thing -----------------------------------------------------------------------
def test_a_missing_external_data_file_is_named(ws: Path, capsys: pytest.CaptureFixture[str]) -> None:
    tiny_onnx(ws / "ext.onnx", external="ext.onnx.data")
    (ws / "ext.onnx.data").unlink()
    assert run(["inspect", "ext.onnx"], capsys) == (
        3, "error: cannot read ONNX model 'ext.onnx': the external data file 'ext.onnx.data' it references "
           "(tensor 'W') does not exist")
    (ws / "ext.onnx.data").mkdir()
    assert run(["inspect", "ext.onnx"], capsys) == (
        3, "error: cannot read ONNX model 'ext.onnx': the external data file 'ext.onnx.data' it references "
           "(tensor 'W') is not a regular file")


def test_bench_data_errors_name_the_data_file(ws: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert run(["bench", "m.onnx", "--rounds", "1", "--data", "nope.npz"], capsys) == (
        1, "error: --data file 'nope.npz' does not exist")
    np.savez(ws / "lab.npz", x=np.zeros((4, 4), np.float32), labels=np.zeros(3, np.int64))
    assert run(["bench", "m.onnx", "--rounds", "1", "--data", "lab.npz"], capsys) == (
        1, "error: --data file 'lab.npz': array 'labels' has 3 rows but the inputs have 4 samples")


# ---- 8. bad option values exit 2 and name the option -------------------------------------------------------------
@pytest.mark.parametrize("argv, message", [
    (["compile", "m.onnx", "-o", "o.onnx", "--executor", "bogus"],
     "--executor: unknown executor 'bogus': use 'local' (in this process), 'processes' or 'processes:N' (N local "
     "worker processes), 'dask://HOST:PORT' (an existing Dask scheduler) or 'dask://local' / 'dask://local:N' (a Dask "
     "LocalCluster of N worker processes)"),
    (["compile", "m.onnx", "-o", "o.onnx", "--input-shape", "foo=4,4"],
     "--input-shape foo=4,4: the model has no input 'foo' (its inputs: 'x')"),
    (["compile", "m.onnx", "-o", "o.onnx", "--input-shape", "x=4,4,1"],
     "--input-shape x=4,4,1 has rank 3 but the model input has rank 2"),
    (["compile", "m.onnx", "-o", "o.onnx", "--input-shape", "x=4,5"],
     "--input-shape x=4,5 gives 5 for axis 1, which the model fixes at 4"),
    (["inspect", "m.onnx", "--input-shape", "foo=4,4"],
     "--input-shape foo=4,4: the model has no input 'foo' (its inputs: 'x')"),
    (["compile", "net.py", "-o", "o.onnx", "--input-shape", "x=4,4"],
     "--input-shape sizes an ONNX model's inputs; 'net.py' is a torch model, whose input sizes come from its example "
     "inputs"),
    (["check", "p.sqz", "--input-shape", "x=4,4"], "--input-shape sizes the inputs of a model: give the model with "
                                                   "--model"),
    (["compile", "m.onnx", "-o", "o.onnx", "--target", "torch"],
     "--target torch does not match the output 'o.onnx': its suffix '.onnx' writes an ONNX model"),
    (["compile", "m.onnx", "-o", "o.pt", "--target", "onnx"],
     "--target onnx does not match the output 'o.pt': its suffix '.pt' writes a torch model"),
], ids=["executor", "shape-name", "shape-rank", "shape-fixed-dim", "inspect-shape-name", "shape-torch-model",
        "shape-without-model", "target-onnx-suffix", "target-pt-suffix"])
def test_bad_option_values_are_usage_errors_naming_the_option(argv: list[str], message: str, ws: Path,
                                                              capsys: pytest.CaptureFixture[str]) -> None:
    (ws / "net.py").write_text("import torch\n\n\ndef build():\n    return torch.nn.Linear(4, 3).eval(), "
                               "(torch.randn(2, 4),)\n")
    (ws / "p.sqz").write_text("policy p {\n  fold_bn\n}\n")
    before = snapshot(ws)
    assert run(argv, capsys) == (2, f"error: {message}")
    assert snapshot(ws) == before


# ---- 9. labels that are no class index ---------------------------------------------------------------------------
@pytest.mark.parametrize("labels, message", [
    (np.array([0, 1, 2.5, 1]), "array 'labels' holds 2.5 at row 2, which is not a class index (a whole number "
                               "from 0)"),
    (np.array([0, -1, 2, 1]), "array 'labels' holds -1 at row 1, which is not a class index (a whole number from 0)"),
    (np.array([0, 1, np.nan, 1]), "array 'labels' holds nan at row 2, which is not a class index (a whole number "
                                  "from 0)"),
    (np.array([0, 1, 7, 3]), "array 'labels' holds 7 at row 2, but 'm.onnx' outputs 3 class scores (class indices "
                             "0 to 2)"),
    (np.eye(4, 3), "array 'labels' has shape [4, 3]: top-1 needs one class index per sample, shape [4]"),
], ids=["fraction", "negative", "nan", "past-the-classes", "one-hot"])
def test_bench_refuses_labels_that_are_no_class_index(labels: np.ndarray, message: str, ws: Path,
                                                      capsys: pytest.CaptureFixture[str]) -> None:
    np.savez(ws / "d.npz", x=np.random.RandomState(0).randn(4, 4).astype(np.float32), labels=labels)
    assert run(["bench", "m.onnx", "--rounds", "1", "--data", "d.npz"], capsys) == (
        1, f"error: --data file 'd.npz': {message}")


def test_bench_takes_whole_number_labels_of_any_dtype(ws: Path, capsys: pytest.CaptureFixture[str]) -> None:
    x = np.random.RandomState(0).randn(4, 4).astype(np.float32)
    right = (x @ (np.arange(12, dtype=np.float32).reshape(4, 3) / 10)).argmax(1)
    np.savez(ws / "d.npz", x=x, labels=right.astype(np.float64)[:, None])  # [N, 1] float labels: whole numbers
    assert main(["bench", "m.onnx", "--rounds", "1", "--data", "d.npz", "--json", "b.json"]) == 0
    import json

    row = json.loads((ws / "b.json").read_text())["models"][0]
    assert (row["top1"], row["agreement"]) == (1.0, 1.0)


# ---- 10. the caret under a line with tabs ------------------------------------------------------------------------
def test_the_caret_lines_up_under_a_line_with_tabs() -> None:
    text = "policy p {\n\t\ttrim {\tration = 25% }\n}\n"
    d = Diagnostic("unknown option 'ration'", span=SourceSpan("t.sqz", 2, 10, 2, 16, text))
    lines = d.format().splitlines()
    assert lines[1:] == ["                  trim {  ration = 25% }",
                         "                          ^~~~~~"]
    assert lines[2].index("^") == lines[1].index("ration")
    # a tab inside the span widens the underline by the columns it takes; wide characters take two
    d = Diagnostic("x", span=SourceSpan("t.sqz", 1, 3, 1, 6, "名前\ta = 1"))
    assert d.format().splitlines()[1:] == ["  名前    a = 1", "      ^~~~~~"]


def test_check_prints_the_caret_under_the_option_with_tabs(ws: Path, capsys: pytest.CaptureFixture[str]) -> None:
    (ws / "tab.sqz").write_text("policy p {\n\t\ttrim {\tration = 25% }\n}\n")
    assert main(["check", "tab.sqz"]) == 2
    err = capsys.readouterr().err.splitlines()
    assert err[1:3] == ["                  trim {  ration = 25% }",
                        "                          ^~~~~~"]


# ---- 11. Ctrl-C before the command starts ------------------------------------------------------------------------
def test_an_interrupt_while_parsing_the_arguments_is_reported_as_one(capsys: pytest.CaptureFixture[str],
                                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    import netsqueeze.cli as cli

    def interrupted() -> None:
        raise KeyboardInterrupt

    monkeypatch.setattr(cli, "build_parser", interrupted)
    try:
        code = main(["inspect", "m.onnx"])
    except KeyboardInterrupt:  # caught here: escaping, it would stop the test session
        pytest.fail("the interrupt escaped main()")
    assert (code, capsys.readouterr().err.strip()) == (130, "interrupted")


INTERRUPT_ON_IMPORT = """\
import sys


class Interrupt:  # Ctrl-C while torch is being imported, the longest part of the start-up
    def find_spec(self, name, path=None, target=None):
        if name == "torch":
            raise KeyboardInterrupt
        return None


sys.meta_path.insert(0, Interrupt())
from netsqueeze_entry import main  # as the netsqueeze console script starts
sys.exit(main(["inspect", "m.onnx"]))
"""


def test_the_command_starts_from_the_entry_that_guards_the_imports() -> None:
    from importlib.metadata import entry_points

    assert [e.value for e in entry_points(group="console_scripts", name="netsqueeze")] == ["netsqueeze_entry:main"]


def test_an_interrupt_during_the_imports_prints_interrupted_not_a_traceback(ws: Path) -> None:
    p = subprocess.run([sys.executable, "-c", INTERRUPT_ON_IMPORT], capture_output=True, text=True, cwd=ws,
                       env={**os.environ, "PYTHONPATH": str(ROOT)}, timeout=120)
    assert (p.returncode, p.stderr) == (130, "interrupted\n")


# ---- 12. -o naming a symbolic link -------------------------------------------------------------------------------
def test_an_output_that_is_a_link_is_written_through_it(ws: Path, capsys: pytest.CaptureFixture[str]) -> None:
    (ws / "releases").mkdir()
    (ws / "releases" / "v1.onnx").write_bytes(b"old")
    (ws / "latest.onnx").symlink_to(Path("releases") / "v1.onnx")
    assert main(["compile", "m.onnx", "-o", "latest.onnx", "-q"]) == 0
    assert os.readlink(ws / "latest.onnx") == str(Path("releases") / "v1.onnx")  # the link is kept
    written = onnx.load(str(ws / "releases" / "v1.onnx"))  # and its target replaced by the compiled model
    onnx.checker.check_model(written)
    assert [o.name for o in written.graph.output] == ["y"]
    assert sorted(p.name for p in (ws / "releases").iterdir()) == ["v1.onnx"]  # no temporary file left
    # a link to no file yet creates the file it names
    (ws / "next.onnx").symlink_to(Path("releases") / "v2.onnx")
    assert main(["compile", "m.onnx", "-o", "next.onnx", "-q"]) == 0
    assert (ws / "next.onnx").is_symlink() and (ws / "releases" / "v2.onnx").is_file()
    capsys.readouterr()


def test_an_output_link_to_an_input_a_loop_or_another_format_is_refused(ws: Path,
                                                                       capsys: pytest.CaptureFixture[str]) -> None:
    (ws / "to_model.onnx").symlink_to("m.onnx")
    (ws / "loop.onnx").symlink_to("loop.onnx")
    (ws / "v1.pt").write_bytes(b"old")
    (ws / "to_pt.onnx").symlink_to("v1.pt")
    (ws / "to_nowhere.onnx").symlink_to(Path("missing") / "v1.onnx")
    before = snapshot(ws)
    assert run(["compile", "m.onnx", "-o", "to_model.onnx"], capsys) == (
        1, "error: refusing to overwrite the input model 'm.onnx': choose another -o path")
    assert run(["compile", "m.onnx", "-o", "loop.onnx"], capsys) == (
        1, "error: output 'loop.onnx' is a symbolic link that loops")
    assert run(["compile", "m.onnx", "-o", "to_pt.onnx"], capsys) == (
        1, f"error: output 'to_pt.onnx' (a link to '{ws.resolve() / 'v1.pt'}'): the link's suffix '.onnx' and its "
           "target's '.pt' name different formats; choose another -o path")
    assert run(["compile", "m.onnx", "-o", "to_nowhere.onnx"], capsys) == (
        1, f"error: output 'to_nowhere.onnx' (a link to '{ws.resolve() / 'missing' / 'v1.onnx'}'): directory "
           f"'{ws.resolve() / 'missing'}' does not exist")
    assert snapshot(ws) == before


# ---- 14. the .onnx suffix in any case ----------------------------------------------------------------------------
def test_an_upper_case_onnx_output_is_an_onnx_model(ws: Path) -> None:
    assert main(["compile", "m.onnx", "-o", "OUT.ONNX", "-q"]) == 0
    onnx.checker.check_model(onnx.load(str(ws / "OUT.ONNX")))


def test_an_upper_case_onnx_model_is_read_as_one(ws: Path, capsys: pytest.CaptureFixture[str]) -> None:
    tiny_onnx(ws / "IN.ONNX")
    assert main(["inspect", "IN.ONNX"]) == 0
    assert main(["bench", "IN.ONNX", "--rounds", "1"]) == 0
    assert main(["compile", "IN.ONNX", "-o", "out.onnx", "-q"]) == 0
