"""Pictures of score models (matplotlib's object API, no global state): sample grids, 2-D samples over the data
density with the score field, and quality-vs-NFE curves."""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from matplotlib.figure import Figure

from mmwb.data.io import atomic_write_path
from mmwb.models.sde.sdes import ScoreFn


def _save(fig: Figure, path: str | Path) -> Path:
    with atomic_write_path(path) as tmp:
        fig.savefig(tmp)
    return Path(path)


def image_grid(images: torch.Tensor, path: str | Path, title: str = "", ncols: int | None = None) -> Path:
    """Grey images ``(B, 1, H, W)`` in ``[0, 1]`` tiled into one PNG (one pixel line between tiles)."""
    batch, _, h, w = images.shape
    ncols = ncols or math.ceil(math.sqrt(batch))
    nrows = math.ceil(batch / ncols)
    canvas = torch.ones(nrows * (h + 1) - 1, ncols * (w + 1) - 1)
    for i, image in enumerate(images[:, 0].cpu()):
        r, c = divmod(i, ncols)
        canvas[r * (h + 1) : r * (h + 1) + h, c * (w + 1) : c * (w + 1) + w] = image
    fig = Figure(figsize=(0.6 * ncols + 0.4, 0.6 * nrows + 0.6), dpi=100)
    ax = fig.add_subplot()
    ax.imshow(canvas.numpy(), cmap="gray_r", vmin=0, vmax=1, interpolation="nearest")
    ax.set_axis_off()
    ax.set_title(title, fontsize=9)
    fig.tight_layout()
    return _save(fig, path)


def scatter_over_density(
    samples: torch.Tensor,
    data: torch.Tensor,
    path: str | Path,
    title: str = "",
    score_fn: ScoreFn | None = None,
    t: float = 0.05,
    lim: float = 4.5,
) -> Path:
    """2-D samples (dots) over a histogram of the data density; with ``score_fn``, its field at time ``t``."""
    fig = Figure(figsize=(5, 5), dpi=100)
    ax = fig.add_subplot()
    data_np = data.cpu().numpy()
    ax.hist2d(data_np[:, 0], data_np[:, 1], bins=120, range=[[-lim, lim], [-lim, lim]], cmap="Blues")
    pts = samples.cpu().numpy()
    ax.scatter(pts[:, 0], pts[:, 1], s=2, c="tab:red", alpha=0.6, label="samples")
    if score_fn is not None:
        grid = torch.linspace(-lim, lim, 21)
        xy = torch.cartesian_prod(grid, grid)  # (441, 2)
        with torch.no_grad():
            field = score_fn(xy, torch.full((xy.shape[0],), t))
        field = field / field.norm(dim=1, keepdim=True).clamp_min(1e-6)  # directions only
        ax.quiver(xy[:, 0], xy[:, 1], field[:, 0], field[:, 1], color="0.3", alpha=0.6, width=0.003)
    ax.set_xlim(-lim, lim)
    ax.set_ylim(-lim, lim)
    ax.set_aspect("equal")
    ax.set_title(title, fontsize=9)
    fig.tight_layout()
    return _save(fig, path)


def quality_vs_nfe(
    rows: Sequence[dict[str, Any]],
    metric: str,
    path: str | Path,
    title: str = "",
    reference: float | None = None,
) -> Path:
    """One line per sampler of ``row[metric]`` against ``row["nfe"]`` (log x); ``reference`` as a dashed line."""
    fig = Figure(figsize=(6, 4), dpi=100)
    ax = fig.add_subplot()
    for sampler in dict.fromkeys(row["sampler"] for row in rows):
        points = sorted((row["nfe"], row[metric]) for row in rows if row["sampler"] == sampler)
        ax.plot(*zip(*points), marker="o", label=sampler)
    if reference is not None:
        ax.axhline(reference, color="0.4", linestyle="--", label="reference")
    ax.set_xscale("log")
    if all(row[metric] > 0 for row in rows):
        ax.set_yscale("log")
    ax.set_xlabel("score evaluations (NFE)")
    ax.set_ylabel(metric)
    ax.set_title(title, fontsize=9)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    return _save(fig, path)
