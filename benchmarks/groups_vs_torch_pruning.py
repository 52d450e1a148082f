"""Channel-group discovery: netsqueeze's `dependency` analysis vs Torch-Pruning's DependencyGraph on the zoo.

Run: .venv/bin/python benchmarks/groups_vs_torch_pruning.py  → writes benchmarks/results/groups.md
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch
import torch_pruning as tp
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from netsqueeze.frontends.fx import from_torch
from netsqueeze.passes.dependency import find_groups
from tests.zoo import ZOO


def ours(model: nn.Module, x: tuple[torch.Tensor, ...]) -> tuple[list[str], list[str]]:
    groups = find_groups(from_torch(model, x))
    free = [f"{'+'.join(g.producers) or '-'} ({g.size})" for g in groups.prunable()]
    frozen = [f"{'+'.join(g.producers) or '-'} ({g.size}): {g.frozen}" for g in groups if g.frozen]
    return free, frozen


def theirs(model: nn.Module, x: tuple[torch.Tensor, ...]) -> list[str]:
    last = [m for m in model.modules() if isinstance(m, nn.Linear)][-1:]
    dg = tp.DependencyGraph().build_dependency(model, example_inputs=x)
    out = []
    for group in dg.get_all_groups(ignored_layers=last, root_module_types=[nn.Conv2d, nn.Linear,
                                                                          nn.MultiheadAttention]):
        roots = sorted({str(dep.target.name).split(" ")[0] for dep, _ in group
                        if "out_channels" in getattr(dep.handler, "__name__", "")
                        and not str(dep.target.name).startswith("_")})
        size = len(group[0][1])
        out.append(f"{'+'.join(roots) or '-'} ({size})")
    return out


NOTES = {
    "transformer": "We freeze the residual/embedding width (LayerNorm normalises over it, so removing channels "
                   "changes every output; attention embed_dim is kept) and prune whole heads; Torch-Pruning "
                   "prunes the embedding dim through LayerNorm (approximate) and, by default, head dims.",
    "unknown_op": "Opaque ops (cumsum, erfinv) freeze the channels they touch; Torch-Pruning treats unknown "
                  "elementwise-looking ops as pass-through.",
    "mobilenetv2": "Depthwise convs join their input group in both tools.",
    "densenet": "Concat inputs keep separate groups with offset index maps in both tools.",
}


def _size(label: str) -> int:
    return int(label.rsplit("(", 1)[1].split(")")[0]) if "(" in label else -1


def main() -> None:
    lines = ["# Channel groups: netsqueeze `dependency` vs Torch-Pruning DependencyGraph", "",
             "Prunable groups named by their producers (size). Torch-Pruning: `get_all_groups` with the last "
             "Linear ignored (the output, which we freeze as 'reaches graph output').", ""]
    for name, make in ZOO.items():
        model, x = make()
        free, frozen = ours(model, x)
        try:
            tpg = theirs(model, x)
        except Exception as e:  # a peer failure is a result, not a crash
            tpg = [f"error: {type(e).__name__}: {str(e)[:100]}"]
        lines += [f"## {name}", "", f"netsqueeze: {len(free)} prunable, {len(frozen)} frozen; "
                  f"Torch-Pruning: {len(tpg)} groups", "", "| netsqueeze | Torch-Pruning |", "|---|---|"]
        for i in range(max(len(free), len(tpg))):
            lines.append(f"| {free[i] if i < len(free) else ''} | {tpg[i] if i < len(tpg) else ''} |")
        lines += ["", "Frozen (netsqueeze):", ""] + [f"- {f}" for f in frozen]
        same = sorted(_size(g) for g in free) == sorted(_size(g) for g in tpg)
        note = "none: the same number of prunable groups with the same sizes" if same else \
            NOTES.get(name, "UNEXPLAINED (the group lists differ and no note explains why)")
        lines += ["", f"Differences: {note}", ""]
    out = Path(__file__).parent / "results" / "groups.md"
    out.write_text("\n".join(lines) + "\n")
    print(out.read_text())


if __name__ == "__main__":
    main()
