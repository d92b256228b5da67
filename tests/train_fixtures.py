"""Tiny tasks for the training-engine tests: a lazy regression dataset, an MLP and a two-expert MoE."""

from __future__ import annotations

import torch
from torch import nn
from torch.utils.data import Dataset

from mmwb.errors import MmwbInputError

IN_DIM = 4


class ToyRegression(Dataset):
    """``y = x @ w + 0.1 * noise``; each item is generated from its index, so nothing is held in memory."""

    def __init__(self, size: int = 64, seed: int = 0, bad: frozenset[int] = frozenset()) -> None:
        self.size = size
        self.seed = seed
        self.bad = bad
        self.weight = torch.linspace(-1.0, 1.0, IN_DIM)

    def __len__(self) -> int:
        return self.size

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        if index in self.bad:
            raise MmwbInputError(f"item-{index:03d}.png: not a readable image")
        g = torch.Generator().manual_seed(self.seed * 100_003 + index)
        x = torch.randn(IN_DIM, generator=g)
        y = x @ self.weight + 0.1 * torch.randn((), generator=g)
        return {"x": x, "y": y.reshape(1)}


class MLP(nn.Module):
    def __init__(self, hidden: int = 16, dropout: float = 0.0) -> None:
        super().__init__()
        self.net = nn.Sequential(
            nn.Linear(IN_DIM, hidden), nn.GELU(), nn.Dropout(dropout), nn.Linear(hidden, 1)
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


class TwoExpertMoE(nn.Module):
    """Routes a sample to expert 1 only when ``x[0] > 1.2`` (rare), and runs each expert on its own samples only,
    so many micro-batches leave expert 1 without a single token."""

    def __init__(self, hidden: int = 8) -> None:
        super().__init__()
        self.inp = nn.Linear(IN_DIM, hidden)
        self.experts = nn.ModuleList([nn.Linear(hidden, hidden) for _ in range(2)])
        self.out = nn.Linear(hidden, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.tanh(self.inp(x))  # (B, H)
        route = (x[:, 0] > 1.2).long()  # (B,)
        mixed = torch.zeros_like(h)
        for index, expert in enumerate(self.experts):
            chosen = route == index
            if chosen.any():
                mixed[chosen] = expert(h[chosen])
        return self.out(h + mixed)


def mse_loss(model: nn.Module, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, dict[str, float]]:
    pred = model(batch["x"])
    loss = torch.nn.functional.mse_loss(pred, batch["y"])
    return loss, {"mae": (pred - batch["y"]).abs().mean().detach()}
