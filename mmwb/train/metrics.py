"""Training metrics as JSON lines (one record per logged step) and a PNG of the loss curves."""

from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Any

from matplotlib.figure import Figure  # a bare Figure renders with Agg: no pyplot, no display, no global state


class MetricsLog:
    """Appends records to ``path``; ``truncate_after(step)`` drops records a killed run wrote past its checkpoint,
    so a resumed run's log holds every step exactly once."""

    def __init__(self, path: Path) -> None:
        self.path = path
        path.parent.mkdir(parents=True, exist_ok=True)

    def write(self, record: dict[str, Any]) -> None:
        with self.path.open("a", encoding="utf-8") as f:
            f.write(json.dumps(record, allow_nan=True) + "\n")

    def truncate_after(self, step: int) -> None:
        kept = [r for r in read_jsonl(self.path) if r.get("step", 0) <= step]
        tmp = self.path.with_name(self.path.name + ".tmp")
        tmp.write_text("".join(json.dumps(r) + "\n" for r in kept), encoding="utf-8")
        os.replace(tmp, self.path)


def read_jsonl(path: Path) -> list[dict[str, Any]]:
    """The records of a metrics file; a torn last line (the process was killed mid-write) is ignored."""
    if not path.is_file():
        return []
    records = []
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return records


def plot_loss_curves(records: list[dict[str, Any]], path: Path) -> Path:
    """Every ``*loss*`` series against its step, log-scaled when all values are positive."""
    series: dict[str, tuple[list[int], list[float]]] = {}
    for record in records:
        for key, value in record.items():
            if "loss" in key and isinstance(value, int | float) and math.isfinite(value):
                steps, values = series.setdefault(key, ([], []))
                steps.append(record["step"])
                values.append(value)
    fig = Figure(figsize=(7, 4), dpi=100)
    ax = fig.add_subplot()
    for key, (steps, values) in sorted(series.items()):
        ax.plot(steps, values, label=key, marker="o" if len(steps) < 30 else None)
    if series and all(v > 0 for _, values in series.values() for v in values):
        ax.set_yscale("log")
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    ax.grid(alpha=0.3)
    if series:
        ax.legend()
    fig.tight_layout()
    fig.savefig(path)
    return path
