"""Sample-quality metrics for low-dimensional data."""

from __future__ import annotations

import torch

from mmwb.errors import MmwbInputError


def sliced_wasserstein(
    x: torch.Tensor,
    y: torch.Tensor,
    projections: int = 256,
    p: int = 2,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """Sliced Wasserstein-``p`` distance between two sample sets ``(N, D)`` and ``(M, D)``: a scalar.

    Along each random unit direction the 1-D distance is exact from the sorted projections (sets of
    different sizes are compared at ``min(N, M)`` interpolated quantile levels); the result averages over
    directions.
    """
    if x.ndim != 2 or y.ndim != 2 or x.shape[1] != y.shape[1]:
        raise MmwbInputError(
            f"sliced_wasserstein: need (N, D) and (M, D), got {tuple(x.shape)}, {tuple(y.shape)}"
        )
    gen_device = generator.device if generator is not None else x.device
    dirs = torch.randn(x.shape[1], projections, generator=generator, dtype=x.dtype, device=gen_device).to(
        x.device
    )
    dirs = dirs / dirs.norm(dim=0, keepdim=True)  # (D, P) unit columns
    px, py = (x @ dirs).sort(dim=0).values, (y.to(x) @ dirs).sort(dim=0).values  # (N, P), (M, P)
    if px.shape[0] != py.shape[0]:
        n = min(px.shape[0], py.shape[0])
        levels = (torch.arange(n, dtype=x.dtype, device=x.device) + 0.5) / n
        px, py = torch.quantile(px, levels, dim=0), torch.quantile(py, levels, dim=0)  # (n, P)
    return (px - py).abs().pow(p).mean().pow(1 / p)
