"""Streaming statistics over calibration batches: running moments and reservoir samples.

Structural passes feed them one batch at a time from `PassContext.stream`, so memory never holds all activations.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def channel_rows(t: torch.Tensor, axis: int, spatial_mean: bool = False) -> torch.Tensor:
    """[rows, positions] view of `t` with `axis` last; with `spatial_mean`, axes after `axis` are averaged first.

    Conv maps [N, C, H, W] on axis 1 give N·H·W rows, or N rows with `spatial_mean` (H×W averaged).
    """
    axis = axis % t.dim()
    if spatial_mean and t.dim() > axis + 1:
        t = t.mean(dim=tuple(range(axis + 1, t.dim())))
    return t.movedim(axis, -1).reshape(-1, t.shape[axis]).double()


def _padded_2d(attrs: dict[str, object], taps: tuple[int, ...], x: torch.Tensor
               ) -> tuple[torch.Tensor, tuple[int, ...], list[int], list[int]]:
    """A conv input zero-padded as the conv pads it, as 2-d (a 1-d conv's input gets a unit height): the padded
    input, the kernel taps, stride and dilation, each with two spatial entries."""
    d = len(taps)
    stride = list(attrs.get("stride", [1] * d))  # type: ignore[call-overload]
    dil = list(attrs.get("dilation", [1] * d))  # type: ignore[call-overload]
    pad = list(attrs.get("padding", [0] * 2 * d))  # type: ignore[call-overload]
    kt: tuple[int, ...] = taps
    if d == 1:
        x, kt, stride, dil, pad = x.unsqueeze(2), (1, taps[0]), [1, *stride], [1, *dil], [0, pad[0], 0, pad[1]]
    return F.pad(x, (pad[1], pad[3], pad[0], pad[2])), kt, stride, dil


def conv_patches(attrs: dict[str, object], taps: tuple[int, ...], x: torch.Tensor) -> torch.Tensor:
    """A conv input [N, C, *spatial] (1-d or 2-d kernel `taps`, the conv node's stride/dilation/padding
    attrs) as im2col rows [N·positions, C·taps], in (channel, tap) order."""
    x, kt, stride, dil = _padded_2d(attrs, taps, x)
    cols = F.unfold(x, kt, dilation=tuple(dil), stride=tuple(stride))  # [N, C·taps, positions]
    return cols.transpose(1, 2).reshape(-1, cols.shape[1])


def conv_patches_at(attrs: dict[str, object], taps: tuple[int, ...], x: torch.Tensor, pick: torch.Tensor,
                    tap_major: bool = False) -> torch.Tensor:
    """`conv_patches` rows at the output positions `pick` [N, k] only (flat indices into each sample's output
    positions): [N·k, C·taps], in (channel, tap) order, without unrolling the other positions; in (tap, channel)
    order with `tap_major`, the order they are gathered in (one copy fewer)."""
    x, kt, stride, dil = _padded_2d(attrs, taps, x)
    n, c, _, w = x.shape
    out_w = (w - dil[1] * (kt[1] - 1) - 1) // stride[1] + 1
    ky, kx = torch.meshgrid(torch.arange(kt[0]), torch.arange(kt[1]), indexing="ij")
    rows = (pick // out_w)[..., None] * stride[0] + ky.reshape(-1) * dil[0]  # [N, k, taps]
    cols = (pick % out_w)[..., None] * stride[1] + kx.reshape(-1) * dil[1]
    got = x.permute(0, 2, 3, 1)[torch.arange(n)[:, None, None], rows, cols]  # [N, k, taps, C]
    return (got if tap_major else got.movedim(-1, -2)).reshape(-1, c * kt[0] * kt[1])


class Moments:
    """Running count, mean, mean |x| and variance per column (float64 sums)."""

    def __init__(self) -> None:
        self.n = 0
        self.sum: torch.Tensor | None = None
        self.sum_sq: torch.Tensor | None = None
        self.sum_abs: torch.Tensor | None = None

    def update(self, rows: torch.Tensor) -> None:
        rows = rows.double()
        s, q, a = rows.sum(0), (rows * rows).sum(0), rows.abs().sum(0)
        if self.sum is None or self.sum_sq is None or self.sum_abs is None:
            self.sum, self.sum_sq, self.sum_abs = s, q, a
        else:
            self.sum += s
            self.sum_sq += q
            self.sum_abs += a
        self.n += rows.shape[0]

    def _need(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        if self.sum is None or self.sum_sq is None or self.sum_abs is None or self.n == 0:
            raise ValueError("no calibration rows were collected")
        return self.sum, self.sum_sq, self.sum_abs

    @property
    def mean(self) -> torch.Tensor:
        return self._need()[0] / self.n

    @property
    def mean_abs(self) -> torch.Tensor:
        return self._need()[2] / self.n

    @property
    def var(self) -> torch.Tensor:
        s, q, _ = self._need()
        return (q / self.n - (s / self.n) ** 2).clamp_min(0.0)


class Reservoir:
    """A uniform sample of at most `capacity` rows from a stream (Vitter's algorithm R), drawn from a
    generator seeded by `seed` (passes give `PassContext.seed`, never the global RNG)."""

    def __init__(self, capacity: int, seed: int) -> None:
        self.capacity = capacity
        self.seen = 0
        self.rows: torch.Tensor | None = None
        self.gen = torch.Generator().manual_seed(seed)

    def update(self, rows: torch.Tensor) -> None:
        rows = rows.detach().double()
        if self.rows is None:
            self.rows = torch.empty(0, rows.shape[1], dtype=torch.float64)
        fill = min(max(0, self.capacity - self.rows.shape[0]), rows.shape[0])
        if fill:
            self.rows = torch.cat([self.rows, rows[:fill]])
            self.seen += fill
        rest = rows[fill:]
        if rest.shape[0]:
            # algorithm R, vectorised: row i of the rest replaces slot j ~ U[0, seen + i] when j < capacity
            seen = self.seen + torch.arange(1, rest.shape[0] + 1, dtype=torch.float64)
            j = (torch.rand(rest.shape[0], generator=self.gen, dtype=torch.float64) * seen).long()
            for i in torch.nonzero(j < self.capacity).flatten().tolist():  # in order: later rows win
                self.rows[int(j[i])] = rest[i]
            self.seen += rest.shape[0]

    def sample(self) -> torch.Tensor:
        if self.rows is None:
            raise ValueError("no calibration rows were collected")
        return self.rows
