"""trim's refit cascade before and after it ran layer by layer (`netsqueeze/passes/frontier.py`): the rows two
`benchmarks/trim.py` result tables share, side by side (top-1, compile seconds, full calibration passes).

    .venv/bin/python -m benchmarks.trim_frontier [--before results/trim-frontier-before.md]
        [--after results/trim.md] [--points "flops 2x,flops 3x"]

`--before`: a `benchmarks/trim.py` table from the code before the change (a checkout of the commit before it,
e.g. `git worktree add /tmp/trim_before <commit>`, run with `--points flops:2,flops:3 --out
trim-frontier-before`, copied here); `--after`: one from the current code. Torch-Pruning rows are left out (no
trim compile in them). Writes benchmarks/results/trim-frontier.md.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.common import RESULTS, markdown_table

KEY = ("model", "budget", "method")
WANT = ("top-1 one-shot", "compile s", "calib. passes")


def read_table(path: Path) -> tuple[str, dict[tuple[str, ...], dict[str, str]]]:
    """(the file's command line paragraph, rows by (model, budget, method)) of a benchmarks/trim.py table."""
    lines = path.read_text().splitlines()
    command = next((ln for ln in lines if ln.startswith("Command:")), "")
    start = next(i for i, ln in enumerate(lines) if ln.startswith("| model |"))
    header = [c.strip() for c in lines[start].strip("|").split("|")]
    rows: dict[tuple[str, ...], dict[str, str]] = {}
    for ln in lines[start + 2:]:
        if not ln.startswith("|"):
            break
        cells = dict(zip(header, (c.strip() for c in ln.strip("|").split("|"))))
        rows[tuple(cells[k] for k in KEY)] = cells
    return command, rows


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--before", default=str(RESULTS / "trim-frontier-before.md"))
    ap.add_argument("--after", default=str(RESULTS / "trim.md"))
    ap.add_argument("--points", default="flops 2x,flops 3x", help="budget cells to compare")
    args = ap.parse_args()
    cmd_before, before = read_table(Path(args.before))
    cmd_after, after = read_table(Path(args.after))
    points = args.points.split(",")
    rows = []
    for key, b in before.items():
        a = after.get(key)
        if a is None or key[1] not in points or not key[2].startswith("trim"):
            continue
        rows.append([*key, *(f"{b[w]} → {a[w]}" for w in WANT)])
    header = [*KEY, "top-1 one-shot (before → after)", "compile s", "calib. passes"]
    text = "\n\n".join([
        "# trim's refit cascade layer by layer (passes/frontier.py): before → after",
        "Two runs of `benchmarks/trim.py`, the code before the change (a git worktree of the commit before it) and "
        "after; the rows both have at these budgets. Same models, calibration images (512), test images (10,000) "
        "and seeds; compile times are wall-clock seconds on 2 cores shared with other jobs (noisy).",
        f"Before: {Path(args.before).name}. {cmd_before}",
        f"After: {Path(args.after).name}. {cmd_after}",
        markdown_table(header, rows),
    ]) + "\n"
    print(text)
    out = RESULTS / "trim-frontier.md"
    out.write_text(text)
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
