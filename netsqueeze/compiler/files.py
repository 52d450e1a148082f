"""Files netsqueeze reads and writes: output paths checked before a compile starts, atomic writes,
and model files loaded without running code from them unless the user trusts the file.

Every output is written to a temporary file in the target directory, flushed to disk and renamed
over the target (`os.replace`): an interrupted or failed write leaves the previous file (or none),
never a truncated one.
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import tempfile
import warnings
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, Literal

from netsqueeze.errors import CaptureError, Diagnostic, FileError

OutputFormat = Literal["onnx", "pt", "pt2", "nsq"]
OUTPUT_FORMATS: dict[str, OutputFormat] = {".onnx": "onnx", ".pt": "pt", ".pth": "pt", ".pt2": "pt2", ".nsq": "nsq"}
TRUST_HINT = "if you trust this file, pass --trust-pickle (trust_pickle=True in the Python API)"


def output_format(path: str | os.PathLike[str]) -> OutputFormat:
    """The format an output path asks for, from its suffix; an unknown suffix is a `FileError`."""
    suffix = Path(path).suffix
    fmt = OUTPUT_FORMATS.get(suffix.lower())
    if fmt is None:
        shown = f"suffix '{suffix}'" if suffix else "no suffix"
        raise FileError(f"output '{path}' has {shown}: the suffix decides the format (use .onnx, .pt, .pth, .pt2 or .nsq)")
    return fmt


def model_source(model: str | os.PathLike[str]) -> Path:
    """The file behind a model argument: `file.py:factory` names `file.py`."""
    text = os.fspath(model)
    if ".py:" in text:
        text = text.rsplit(":", 1)[0]
    return Path(text)


def is_onnx_file(model: str | os.PathLike[str]) -> bool:
    """Whether a model argument names an ONNX file: its suffix is `.onnx`, in any case, as for `-o`."""
    return Path(os.fspath(model)).suffix.lower() == ".onnx"


def model_files(model: str | os.PathLike[str], role: str = "input model") -> list[tuple[str, Path]]:
    """Every file a model argument reads, as (role, path) pairs for `check_output_path`: the model's file and,
    for an ONNX model, each external-data file its tensors name (an output there would corrupt the model)."""
    src = model_source(model)
    out: list[tuple[str, Path]] = [(role, src)]
    if is_onnx_file(src):
        from netsqueeze.frontends.onnx.load import external_data_files

        out += [(f"{role}'s external data file", p) for p in external_data_files(src)]
    return out


def _same_file(a: Path, b: Path) -> bool:
    with contextlib.suppress(OSError):
        if a.exists() and b.exists():
            return os.path.samefile(a, b)  # also catches hard links
    with contextlib.suppress(OSError, RuntimeError):  # RuntimeError: a symbolic link that loops (Python 3.11)
        return a.resolve() == b.resolve()
    return False


def write_target(path: str | os.PathLike[str]) -> Path:
    """The file a write to `path` replaces. A symbolic link is written through: its target (every link followed;
    a link to no file yet names the file to create) is replaced atomically and the link itself is kept, as `cp`
    and editors do. A link that loops is a `FileError`."""
    p = Path(path)
    if not p.is_symlink():
        return p
    try:
        return p.resolve(strict=True)
    except FileNotFoundError:
        return p.resolve()
    except (OSError, RuntimeError):  # RuntimeError: Python 3.11's "Symlink loop"
        raise FileError(f"output '{p}' is a symbolic link that loops") from None


def check_output_path(out: str | os.PathLike[str], inputs: Sequence[tuple[str, str | os.PathLike[str]]] = (),
                      option: str = "-o") -> Path:
    """Checks, before any work is done, that `out` (given with command-line `option`) can be written and is none
    of `inputs` ((role, path) pairs such as ("input model", "m.py")). A symbolic link is checked as the file it
    points to (`write_target`: the write goes through the link). Returns `out` as a Path; raises `FileError`."""
    path = Path(out)
    target = write_target(path)
    # an ONNX model too big for one file is written with its weights in `<name>.data` beside it
    companion = target.with_name(target.name + ".data") if target.suffix.lower() == ".onnx" else None
    for role, src in inputs:
        if _same_file(path, Path(src)):
            raise FileError(f"refusing to overwrite the {role} '{src}': choose another {option} path")
        if companion is not None and _same_file(companion, Path(src)):
            raise FileError(f"refusing to overwrite the {role} '{src}': an ONNX output over 2 GB keeps its weights "
                            f"in '{companion.name}' beside it; choose another {option} path")
    shown = f"output '{path}' (a link to '{target}')" if target != path else f"output '{path}'"
    if target != path:
        want, have = OUTPUT_FORMATS.get(path.suffix.lower()), OUTPUT_FORMATS.get(target.suffix.lower())
        if want is not None and have is not None and want != have:
            raise FileError(f"{shown}: the link's suffix '{path.suffix}' and its target's '{target.suffix}' name "
                            f"different formats; choose another {option} path")
    if target.is_dir():
        raise FileError(f"{shown} is a directory")
    parent = target.parent
    if not parent.is_dir():
        for anc in (parent, *parent.parents):
            if anc.exists() and not anc.is_dir():
                raise FileError(f"{shown}: '{anc}' is a file, not a directory")
            if anc.is_dir():
                break
        raise FileError(f"{shown}: directory '{parent}' does not exist")
    try:
        fd, probe = tempfile.mkstemp(dir=parent, prefix=f".{target.name}.", suffix=".probe")
    except OSError as e:
        raise FileError(f"{shown}: directory '{parent}' is not writable ({e.strerror})") from None
    os.close(fd)
    os.unlink(probe)
    return path


def _new_file_mode(target: Path) -> int:
    with contextlib.suppress(OSError):
        return target.stat().st_mode & 0o7777
    mask = os.umask(0)
    os.umask(mask)
    return 0o666 & ~mask


def _fsync(path: Path, directory: bool = False) -> None:
    flags = os.O_RDONLY | (getattr(os, "O_DIRECTORY", 0) if directory else 0)
    try:
        fd = os.open(path, flags)
    except OSError:
        if directory:  # some platforms cannot open directories: the rename is still atomic
            return
        raise
    try:
        os.fsync(fd)
    except OSError:
        if not directory:
            raise
    finally:
        os.close(fd)


def atomic_write(path: str | os.PathLike[str], write: Callable[[Path], None]) -> None:
    """Calls `write(tmp)` on a fresh temporary file next to `path`, syncs it and renames it over `path`.
    On any failure or interrupt the temporary file is removed and `path` is left as it was."""
    target = write_target(path)
    tmp: Path | None = None
    try:
        fd, name = tempfile.mkstemp(dir=target.parent, prefix=f".{target.stem}.", suffix=f".tmp{target.suffix}")
        os.close(fd)
        tmp = Path(name)
        write(tmp)
        _fsync(tmp)
        os.chmod(tmp, _new_file_mode(target))
        os.replace(tmp, target)
        tmp = None
    except OSError as e:
        raise FileError(f"cannot write '{target}': {e.strerror or e}") from e
    finally:
        if tmp is not None:
            with contextlib.suppress(OSError):
                tmp.unlink()
    _fsync(target.parent, directory=True)


def write_bytes(path: str | os.PathLike[str], data: bytes) -> None:
    """Writes `data` to `path` atomically (`atomic_write`: a failed write leaves the old file)."""
    def write(tmp: Path) -> None:
        tmp.write_bytes(data)

    atomic_write(path, write)


def _atomic_write_onnx_external(model: Any, target: Path) -> None:
    """A model over 2 GB: its weights go to `<name>.data`; both files are written in a temporary
    directory next to the target (a symbolic link's target: `write_target`) and renamed into place, the data
    first."""
    from netsqueeze.backends.onnx import save_onnx

    target = write_target(target)
    tmpdir = Path(tempfile.mkdtemp(dir=target.parent, prefix=f".{target.name}."))
    try:
        save_onnx(model, tmpdir / target.name)
        data = tmpdir / (target.name + ".data")
        for f in (data, tmpdir / target.name):
            if f.exists():
                _fsync(f)
                os.chmod(f, _new_file_mode(target.parent / f.name))
        if data.exists():
            os.replace(data, target.parent / data.name)
        os.replace(tmpdir / target.name, target)
    except OSError as e:
        raise FileError(f"cannot write '{target}': {e.strerror or e}") from e
    finally:
        shutil.rmtree(tmpdir, ignore_errors=True)
    _fsync(target.parent, directory=True)


def save_model(model: Any, path: str | os.PathLike[str], example_inputs: tuple[Any, ...] | None = None,
               dynamic_shapes: Any = None) -> None:
    """Writes a compiled model atomically in the format `path`'s suffix names: an ONNX ModelProto to
    `.onnx`, a torch module to `.pt`/`.pth` (pickled) or `.pt2` (torch.export, traced on `example_inputs`,
    its dynamic dims `dynamic_shapes` as torch.export takes them: `pt2_dynamic_shapes`), the bytes of a
    compressed model file (`compile(store=...)`) to `.nsq`."""
    target = Path(path)
    fmt = output_format(target)
    if fmt == "nsq":  # the compressed model file's bytes (`CompileResult.stored`), read by `netsqueeze.load`
        write_bytes(target, model)
        return
    if fmt == "onnx":
        import onnx

        from netsqueeze.backends.onnx import TWO_GB

        if model.ByteSize() >= TWO_GB:
            _atomic_write_onnx_external(model, target)
        else:
            atomic_write(target, lambda p: onnx.save_model(model, str(p)))
        return
    import torch

    # through an open file: torch names the archive's top folder after a path it is given (here the temporary
    # one, random), after nothing ('archive/') for a file object, so the same model gives the same bytes
    def through_file(save: Callable[[Any], None]) -> Callable[[Path], None]:
        def write(p: Path) -> None:
            with open(p, "wb") as f:
                save(f)
        return write

    if fmt == "pt":
        atomic_write(target, through_file(lambda f: torch.save(model, f)))
        return
    try:
        program = torch.export.export(model, tuple(example_inputs or ()), dynamic_shapes=dynamic_shapes)
    except Exception as err:  # torch.export's own errors (a CSR buffer, a size it must specialise)
        first = (str(err).strip().splitlines() or [type(err).__name__])[0]
        raise FileError(Diagnostic(
            f"cannot write '{target}': torch.export could not export the compiled module"
            + (" with its dynamic dims" if dynamic_shapes else "") + f" ({type(err).__name__}: {first[:300]})",
            notes=("write .pt (the pickled module) or .onnx instead",))) from None
    atomic_write(target, through_file(lambda f: torch.export.save(program, f)))


def pt2_dynamic_shapes(graph: Any) -> tuple[dict[int, Any], ...] | None:
    """torch.export's `dynamic_shapes` for a compiled graph's inputs: every input axis that is a dynamic dim
    of the graph (one `torch.export.Dim` per name, shared by the inputs that use it); None when none is."""
    import torch

    from netsqueeze.ir.dims import expr_of, is_dynamic

    named: dict[str, Any] = {}
    out: list[dict[int, Any]] = []
    for nid in graph.inputs:
        axes = {}
        for axis, d in enumerate(graph.node(nid).meta[0].shape):
            if is_dynamic(d) and expr_of(d).is_Symbol:
                name = str(expr_of(d))
                axes[axis] = named.setdefault(name, torch.export.Dim(re.sub(r"\W", "_", name)))
        out.append(axes)
    return tuple(out) if named else None


# ---- loading model files ------------------------------------------------------------------------------
def load_pickled_module(path: Path, trust_pickle: bool = False) -> Any:
    """A `.pt`/`.pth` file: `torch.load(weights_only=True)` unless `trust_pickle`; a file that needs a
    full unpickle (any pickled nn.Module does) is refused, naming the file and the opt-in."""
    import torch

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # torch warns about pickle protocols of files it then refuses
            return torch.load(str(path), map_location="cpu", weights_only=not trust_pickle)
    except Exception as e:
        text = str(e)
        found = re.search(r"[Uu]nsupported(?: global:)? GLOBAL ([\w.]+)", text)
        if not trust_pickle and found:
            raise CaptureError(
                f"refusing to load '{path}': it is a full pickle (it names {found.group(1)}), and unpickling "
                f"can run arbitrary code; {TRUST_HINT}") from None
        unpickler = re.search(r"WeightsUnpickler error:\s*([^\n]+)", text)
        if unpickler:
            # a corrupt file, or a pickle the weights-only reader cannot read (another protocol, a plain pickle)
            raise CaptureError(f"cannot load '{path}': the weights-only reader cannot read it "
                               f"({unpickler.group(1).strip()}): not a torch file, or a full pickle"
                               + ("" if trust_pickle else f"; {TRUST_HINT}")) from None
        reason = text.strip().splitlines()[0] if text.strip() else ""
        raise CaptureError(f"cannot load '{path}': {type(e).__name__}: {reason}") from e


def load_exported_program(path: Path, trust_pickle: bool = False) -> Any:
    """A `.pt2` archive (torch.export.save): loading one unpickles, so it needs `trust_pickle`."""
    if not trust_pickle:
        raise CaptureError(
            f"refusing to load '{path}': torch.export.load unpickles parts of a .pt2 archive, which can run "
            f"arbitrary code; {TRUST_HINT}")
    import torch

    try:
        return torch.export.load(str(path))
    except Exception as e:
        reason = str(e).strip().splitlines()[0] if str(e).strip() else ""
        raise CaptureError(f"cannot load '{path}': {type(e).__name__}: {reason}") from e
