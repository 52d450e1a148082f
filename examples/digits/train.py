"""Trains the demo's digits CNN and writes `digits_cnn.pt` (run once; the checkpoint is committed).

    .venv/bin/python examples/digits/train.py
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))
from model import CHECKPOINT, DigitsCNN, test_split, train_split


def main() -> None:
    torch.manual_seed(0)
    torch.set_num_threads(1)
    x, y = train_split()
    model = DigitsCNN()
    opt = torch.optim.Adam(model.parameters(), lr=2e-3, weight_decay=1e-4)
    g = torch.Generator().manual_seed(0)
    for epoch in range(20):
        model.train()
        order = torch.randperm(len(y), generator=g)
        for i in range(0, len(y), 64):
            idx = order[i:i + 64]
            loss = nn.functional.cross_entropy(model(x[idx] + 0.05 * torch.randn(x[idx].shape, generator=g)), y[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
        model.eval()
        xt, yt = test_split()
        with torch.no_grad():
            acc = (model(xt).argmax(1) == yt).float().mean().item()
        print(f"epoch {epoch + 1}: loss {loss.item():.3f}, held-out top-1 {acc:.4f}")
    torch.save(model.state_dict(), CHECKPOINT)
    print(f"wrote {CHECKPOINT} ({CHECKPOINT.stat().st_size:,} bytes)")


if __name__ == "__main__":
    main()
