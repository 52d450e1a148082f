"""The one diagnostic type of netsqueeze and the exceptions that carry diagnostics.

Every error a user can cause (a policy mistake, an unsupported operator, a model/input
mismatch, an infeasible budget or solve) is a `NetsqueezeError` holding one or more
`Diagnostic`s, each naming its place: a `file:line:col` span or an IR node id.
"""

from __future__ import annotations

import unicodedata
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from difflib import get_close_matches
from typing import Literal

Severity = Literal["error", "warning", "note"]


@dataclass(frozen=True)
class SourceSpan:
    """A range in a source file; lines and columns are 1-based, `end_col` is exclusive."""

    file: str
    line: int
    col: int
    end_line: int | None = None
    end_col: int | None = None
    text: str | None = None  # full source text, used to show the offending line

    def __str__(self) -> str:
        return f"{self.file}:{self.line}:{self.col}"

    def source_line(self) -> str | None:
        if self.text is None:
            return None
        lines = self.text.splitlines()
        return lines[self.line - 1] if 0 < self.line <= len(lines) else None


@dataclass(frozen=True)
class Diagnostic:
    """A message with a severity and a place: a source span, a node id, or both."""

    message: str
    severity: Severity = "error"
    span: SourceSpan | None = None
    node: str | None = None
    notes: tuple[str, ...] = field(default=())

    def format(self) -> str:
        where = str(self.span) if self.span is not None else (f"node '{self.node}'" if self.node else "")
        if self.span is None and where and self.message.startswith(where):
            where = ""  # the message names its node first: once is enough
        head = f"{where}: {self.severity}: {self.message}" if where else f"{self.severity}: {self.message}"
        if self.span is not None and self.node:
            head += f" (node '{self.node}')"
        out = [head]
        line = self.span.source_line() if self.span is not None else None
        if line is not None and self.span is not None:
            shown, cols = _display(line)
            out.append(f"  {shown}")

            def column(i: int) -> int:  # where character i starts on screen; one column each past the line's end
                return cols[i] if i < len(cols) else cols[-1] + i - len(line)

            first = max(self.span.col, 1) - 1
            width = 1
            if self.span.end_col is not None and (self.span.end_line in (None, self.span.line)):
                width = max(1, column(max(self.span.end_col - 1, first)) - column(first))
            out.append("  " + " " * column(first) + "^" + "~" * (width - 1))
        out.extend(f"  note: {n}" for n in self.notes)
        return "\n".join(out)

    def __str__(self) -> str:
        return self.format()


TAB_WIDTH = 8  # a tab in a source line moves to the next multiple of 8 columns, as on a terminal


def _display(line: str) -> tuple[str, list[int]]:
    """`line` as a diagnostic shows it, its tabs expanded to spaces (so the caret line below it, all spaces, lines
    up whatever the terminal's tab stops), and the column at which each character starts (one entry more: the end).
    East Asian wide characters take two columns, combining marks none."""
    cols = [0]
    shown = []
    for ch in line:
        at = cols[-1]
        if ch == "\t":
            step = TAB_WIDTH - at % TAB_WIDTH
            shown.append(" " * step)
        else:
            step = 0 if unicodedata.combining(ch) else 2 if unicodedata.east_asian_width(ch) in ("W", "F") else 1
            shown.append(ch)
        cols.append(at + step)
    return "".join(shown), cols


class NetsqueezeError(Exception):
    """Base of every error netsqueeze raises for something the user wrote or fed in."""

    def __init__(self, diagnostics: Diagnostic | str | Sequence[Diagnostic], *, node: str | None = None):
        if isinstance(diagnostics, str):
            diagnostics = [Diagnostic(diagnostics, node=node)]
        elif isinstance(diagnostics, Diagnostic):
            diagnostics = [diagnostics]
        self.diagnostics: tuple[Diagnostic, ...] = tuple(diagnostics)
        super().__init__("\n".join(d.format() for d in self.diagnostics))

    @property
    def message(self) -> str:
        return self.diagnostics[0].message if self.diagnostics else ""


class PolicyError(NetsqueezeError):
    """A policy file or text that does not parse or does not check."""


class UsageError(NetsqueezeError):
    """A command-line option given a value it does not take (`--batch 1,x`, `--threads 0`); exit code 2."""


class CaptureError(NetsqueezeError):
    """A model the frontend cannot capture or import."""


class InputMismatchError(NetsqueezeError):
    """Example inputs or calibration data that do not fit the model."""


class UnsupportedOpError(NetsqueezeError):
    """An operator a route cannot handle (e.g. an opaque ONNX op emitted to torch)."""


class VerifyError(NetsqueezeError):
    """A graph that fails `Graph.verify()`: structure, shapes or params inconsistent."""


class PassError(NetsqueezeError):
    """A pass that failed inside a pipeline; names the pass and the passes before it."""


class BudgetError(NetsqueezeError):
    """A budget or guard the passes cannot meet; states what was reached."""


class PassBudgetError(PassError, BudgetError):
    """A budget or guard that a pass inside the pipeline found it cannot meet: catchable as either."""


class SolverError(NetsqueezeError):
    """An optimisation problem that is infeasible or that the solver could not solve."""


class FileError(NetsqueezeError):
    """A file netsqueeze cannot write or must not touch: a bad output path or format, an output that would
    overwrite an input."""


class UserCodeError(NetsqueezeError):
    """User code netsqueeze called (a model factory, `example_inputs()`, `calibration()`, a calibration
    iterator, `eval_fn`) that raised or returned something unusable; the user's traceback is a note."""


class NonFiniteError(NetsqueezeError):
    """A NaN or Inf where a finite number is needed: input data, a measured fidelity, an `eval_fn` result."""


class PassUserCodeError(PassError, UserCodeError):
    """User code (a calibration iterator, `eval_fn`) that failed while a pass ran: catchable as either."""


class PassNonFiniteError(PassError, NonFiniteError):
    """A NaN or Inf (in the calibration data, or an activation a pass must square) met while a pass ran."""


class PassInputMismatchError(PassError, InputMismatchError):
    """Calibration data that does not fit the model, met while a pass ran (a later batch): catchable as either."""


# what a pass's error is re-raised as inside a pipeline: the kind of error it was, and located at the pass
PASS_ERRORS: tuple[tuple[type[NetsqueezeError], type[PassError]], ...] = (
    (BudgetError, PassBudgetError), (UserCodeError, PassUserCodeError), (NonFiniteError, PassNonFiniteError),
    (InputMismatchError, PassInputMismatchError))


class InternalError(NetsqueezeError):
    """An unexpected exception inside netsqueeze: a bug to report; names the stage, pass or node where known."""


def percent(x: float) -> str:
    """`x` as a percentage: two decimals, or three significant digits under 0.01%, so a guard written as
    0.001% reads as written, not as 0.00%."""
    if x != 0 and abs(x) < 1e-4 and x == x:
        return f"{x * 100:.3g}%"
    return f"{x:.2%}"


def did_you_mean(word: str, choices: Iterable[str], n: int = 3) -> str:
    """' (did you mean 'x'?)' for the closest choices, or '' when nothing is close."""
    close = get_close_matches(word, sorted(set(choices)), n=n, cutoff=0.6)
    if not close:
        return ""
    return " (did you mean " + " or ".join(f"'{c}'" for c in close) + "?)"
