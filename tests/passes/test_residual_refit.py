"""The layer refit of a layer that feeds a residual add fits the sum (`passes.refit.residual_skip`): its target is
its own pass-start output plus what the skip path lost, checked against least squares computed here."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

import netsqueeze as ns
from netsqueeze.passes.refit import residual_skip, residual_targets
from netsqueeze.passes.squeeze_fold import SqueezeFold
from tests.passes.test_layer_refit import _matches_one, _ridge_solutions


class ResMLP(nn.Module):
    """stem → two residual blocks (relu(h + b(relu(a(h))))) → head, 32 wide."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.stem = nn.Linear(16, 32)
        self.a1, self.b1, self.a2, self.b2 = (nn.Linear(32, 32) for _ in range(4))
        self.head = nn.Linear(32, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.relu(self.stem(x))
        h = torch.relu(h + self.b1(torch.relu(self.a1(h))))
        h = torch.relu(h + self.b2(torch.relu(self.a2(h))))
        return self.head(h)


def _compile(model: nn.Module, x: torch.Tensor, on: bool) -> ns.CompileResult:
    with residual_targets(on):
        return ns.compile(model, [SqueezeFold(ratio=0.5)], example_inputs=(x[:2],), calibration=x, progress=False)


def _streams(p: dict[str, tuple[torch.Tensor, torch.Tensor]], x: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """(the stream after the first block, the second block's last layer's input) as weights `p` compute them."""
    h = torch.relu(F.linear(x, *p["stem"]))
    h = torch.relu(h + F.linear(torch.relu(F.linear(h, *p["a1"])), *p["b1"]))
    return h, torch.relu(F.linear(h, *p["a2"]))


def test_the_last_layer_of_a_residual_branch_fits_the_sum_with_the_skip_paths_drift() -> None:
    model = ResMLP().eval()
    x = torch.randn(2048, 16, generator=torch.Generator().manual_seed(1))
    orig = {n: (getattr(model, n).weight.detach(), getattr(model, n).bias.detach()) for n in ("stem", "a1", "b1", "a2", "b2")}
    with torch.no_grad():
        h_ref, in_ref = _streams(orig, x)
        y_ref = F.linear(in_ref, *orig["b2"])
    errors = {}
    for on in (True, False):
        res = _compile(model, x, on)
        p = {n: (res.graph.node(n).params["weight"], res.graph.node(n).params["bias"]) for n in orig}
        assert [tuple(w.shape) for w, _ in p.values()] == [(16, 16), (16, 16), (16, 16), (16, 16), (16, 16)]
        # the stem is only sliced (its input is the data): its rows are the stream's kept channels
        out = [next(j for j in range(32) if torch.equal(orig["stem"][0][j], row)) for row in p["stem"][0]]
        with torch.no_grad():
            h_now, in_now = _streams(p, x)
            target = y_ref[:, out] + (h_ref[:, out] - h_now if on else 0.0)
            got = torch.cat([p["b2"][0].T.double(), p["b2"][1].double()[None]])
            assert _matches_one(got, _ridge_solutions(in_now, target))
            # what the second add computes against the original's, at the kept channels
            errors[on] = float((h_now + F.linear(in_now, *p["b2"]) - (h_ref + y_ref)[:, out]).norm())
    # least squares to the sum: less error at the add than the fit to the layer's own output (8.50 against 8.57)
    assert errors[True] < errors[False]


class Block(nn.Module):
    """A ResNet basic block with a downsampling conv: conv1 → bn1 → relu → conv2 → bn2, plus bn(conv(x))."""

    def __init__(self, bias_add: bool = False) -> None:
        super().__init__()
        self.conv1, self.conv2 = nn.Conv2d(4, 8, 3, padding=1), nn.Conv2d(8, 8, 3, padding=1)
        self.bn1, self.bn2 = nn.BatchNorm2d(8), nn.BatchNorm2d(8)
        self.down, self.bn_down = nn.Conv2d(4, 8, 1), nn.BatchNorm2d(8)
        self.bias_add = bias_add
        self.const = nn.Parameter(torch.randn(8, 1, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        branch = self.bn2(self.conv2(torch.relu(self.bn1(self.conv1(x)))))
        if self.bias_add:
            return torch.relu(branch + self.const)
        return torch.relu(branch + self.bn_down(self.down(x)))


def test_residual_skip_finds_the_add_through_one_norm_and_only_a_final_skip_path() -> None:
    torch.manual_seed(0)
    block = Block().eval()
    with torch.no_grad():
        block.bn2.weight.copy_(torch.linspace(0.5, 2.0, 8))
        block.bn2.running_var.copy_(torch.full((8,), 3.0))
    graph = ns.import_model(block, (torch.randn(2, 4, 6, 6),))
    topo = graph.topo_order()
    pos = {n: i for i, n in enumerate(topo)}
    assert pos["conv2"] < pos["down"]  # torch.export's order: the branch, then the downsampling path
    # conv2's skip is computed after it: not final when conv2 is refit
    assert residual_skip(graph, "conv2", pos) is None
    # the downsampling conv, through its norm, has the branch's sum as its skip, and the norm's scale
    skip = residual_skip(graph, "down", pos)
    assert skip is not None and skip[0] == ("bn2", 0)
    assert skip[1] is not None
    torch.testing.assert_close(skip[1], block.bn_down.weight.detach() / torch.sqrt(torch.ones(8) + 1e-5))
    # conv1 feeds a norm and then a relu, not an add
    assert residual_skip(graph, "conv1", pos) is None
    # a broadcast constant is not a skip path
    graph = ns.import_model(Block(bias_add=True).eval(), (torch.randn(2, 4, 6, 6),))
    pos = {n: i for i, n in enumerate(graph.topo_order())}
    assert residual_skip(graph, "conv2", pos) is None


class DropoutBlock(nn.Module):
    """A transformer-style residual: h + dropout(out(relu(inner(h)))), the dropout an identity in eval mode."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.stem, self.inner, self.out = nn.Linear(6, 8), nn.Linear(8, 16), nn.Linear(16, 8)
        self.drop = nn.Dropout(0.1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.stem(x)
        return h + self.drop(self.out(torch.relu(self.inner(h))))


def test_residual_skip_looks_through_an_identity_before_the_add() -> None:
    # BERT, ViT and GPT-2 put a dropout between a block's output projection and its residual add: in eval mode an
    # identity, which the residual target looks through (it stopped there, and those projections fitted their own
    # output alone)
    graph = ns.import_model(DropoutBlock().eval(), (torch.randn(2, 6),))
    pos = {n: i for i, n in enumerate(graph.topo_order())}
    [(reader, _)] = graph.value_users(("out", 0))
    assert graph.node(reader).kind == "identity"
    assert residual_skip(graph, "out", pos) == (("stem", 0), None)
    assert residual_skip(graph, "inner", pos) is None
