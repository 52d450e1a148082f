"""How squeeze_fold's search allocates channels on the ResNet-style model under a FLOPs budget: its default
`search = fast` (reconstruction errors weighted by a measured output sensitivity per group) against `search =
measured` (a measured output-error curve per group), with channel counts rounded to 8 (the squeeze benchmark's
bounds) and unrounded, one-shot, beside the allocation
trim's measured-loss search picks (`trim { criterion = activation }` after `fold_bn`, 512 calibration images, as
benchmarks/trim.py) with squeeze_fold's own channel choice and fold at those counts.

    .venv/bin/python benchmarks/squeeze_allocation.py [--targets 2,3,5]   → benchmarks/results/squeeze-allocation.md

Same model, calibration images (2,048, `benchmarks/squeeze.py`'s subset) and test set as benchmarks/squeeze.py;
torch with 1 thread; compile seconds on a 2-core machine (noisy).
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager, nullcontext
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.common import RESULTS, accuracy, fashion_mnist, markdown_table, trained
from benchmarks.squeeze import flops_params, run_ns
from netsqueeze.passes import squeeze_fold as sf_module

TRIM_CALIB = 512


def trim_counts(model: torch.nn.Module, calib: torch.Tensor, target: float) -> dict[str, int]:
    """Kept output channels per conv (by module name) of trim's allocation at this FLOPs target."""
    res, _, _ = run_ns(model, ["fold_bn", "trim { criterion = activation }"], calib, {"flops": 1.0 / target}, 1)
    return {n: m.out_channels for n, m in res.model.named_modules() if isinstance(m, torch.nn.Conv2d)}


@contextmanager
def with_counts(counts: dict[str, int]) -> Iterator[None]:
    """squeeze_fold's search returns `counts` (by a group's first producer) instead of its own inside."""
    orig = sf_module.SqueezeFold._search_counts

    def fixed(self: Any, graph: Any, groups: Any, ranks: Any, plans: Any, ctx: Any) -> Any:
        _, line = orig(self, graph, groups, ranks, plans, ctx)
        return {g: counts.get(groups[g].producers[0], groups[g].size) for g in ranks}, line + " (counts replaced)"

    sf_module.SqueezeFold._search_counts = fixed  # type: ignore[method-assign]
    try:
        yield
    finally:
        sf_module.SqueezeFold._search_counts = orig  # type: ignore[method-assign]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--targets", default="2,3,5", help="x fewer FLOPs, comma-separated")
    args = ap.parse_args()
    torch.set_num_threads(1)
    t_start = time.perf_counter()
    data = fashion_mnist()
    perm = torch.randperm(len(data["train_x"]), generator=torch.Generator().manual_seed(0))
    calib, trim_calib = data["train_x"][perm[:2048]], data["train_x"][perm[:TRIM_CALIB]]
    test = (data["test_x"], data["test_y"])
    model = trained("resnet", data)
    f0, _ = flops_params(model)
    top0 = accuracy(model, *test)
    rows: list[list[str]] = []
    for target in (float(t) for t in args.targets.split(",")):
        runs: list[tuple[str, int, str, dict[str, int] | None]] = [
            ("squeeze_fold (search = fast, the default)", 8, "fast", None),
            ("squeeze_fold, search = measured", 8, "measured", None),
            ("squeeze_fold (search = fast, the default)", 1, "fast", None),
            ("squeeze_fold, search = measured", 1, "measured", None),
            ("squeeze_fold at trim's counts (activation, measured-loss allocation)", 1, "fast",
             trim_counts(model, trim_calib, target)),
        ]
        for label, round_to, search, counts in runs:
            t0 = time.perf_counter()
            # at trim's counts the budget only has to let them through
            budget = 1.0 / target if counts is None else 0.999
            with with_counts(counts) if counts is not None else nullcontext():
                res, secs, _ = run_ns(model, [f"squeeze_fold {{ search = {search} }}", "fold_bn"], calib,
                                      {"flops": budget}, round_to)
            f, _ = flops_params(res.model)
            top = accuracy(res.model, *test)
            rows.append([f"{target:g}x", label, str(round_to), f"{f0 / f:.2f}x", f"{top:.2%}",
                         f"{(top0 - top) * 100:+.2f}", f"{secs:.0f}"])
            print(" | ".join(rows[-1]), f"({time.perf_counter() - t0:.0f} s)", file=sys.stderr, flush=True)
    table = markdown_table(["FLOPs target", "allocation", "round_to", "FLOPs red.", "top-1", "drop (pts)",
                            "compile s"], rows)
    text = (f"# squeeze_fold's channel allocation on the ResNet-style model (Fashion-MNIST, one-shot)\n\n"
            f"Command: `.venv/bin/python benchmarks/squeeze_allocation.py --targets {args.targets}` "
            f"({(time.perf_counter() - t_start) / 60:.1f} min). Original top-1 {top0:.2%}; 2,048 calibration "
            f"images (squeeze.py's subset), 10,000 test images; `squeeze_fold` then `fold_bn` under "
            f"`budget flops <= X%` and `bounds {{ round_to = N }}`. `search = fast` (the default) weights each "
            f"group's reconstruction error by its measured output sensitivity; `search = measured` measures "
            f"every group's output-error curve (up to 16 counts each, within 24 model passes). trim's counts: "
            f"`fold_bn` + `trim {{ criterion = activation }}` on {TRIM_CALIB} images picks the kept count per "
            f"group; squeeze_fold then chooses and folds that many channels (its search replaced; compile s is "
            f"squeeze_fold's alone, trim's run not counted).\n\n"
            f"{table}\n")
    out = RESULTS / "squeeze-allocation.md"
    out.write_text(text)
    print(text)
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
