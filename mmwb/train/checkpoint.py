"""Checkpoint folders that are complete or absent: written under a temporary name, then renamed in one step.

A checkpoint is ``<root>/step-00000120/`` holding ``model.safetensors`` (+ ``ema.safetensors``),
``trainer_state.pt`` (optimizer, scheduler, step, data position: tensors and plain Python values only, so it loads
with ``torch.load(weights_only=True)``) and one ``rng-rank<r>.pt`` per process. A run killed while saving leaves
only a ``*.tmp`` folder, which is never taken for a checkpoint and is cleared by the next save.
"""

from __future__ import annotations

import os
import random
import re
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import torch

from mmwb.errors import MmwbCheckpointError

STATE_FILE = "trainer_state.pt"
MODEL_FILE = "model.safetensors"
EMA_FILE = "ema.safetensors"
_NAME = re.compile(r"^step-(\d{8})$")


def checkpoint_path(root: Path, step: int) -> Path:
    return root / f"step-{step:08d}"


def staging_path(final: Path) -> Path:
    return final.with_name(final.name + ".tmp")


def rng_path(checkpoint: Path, rank: int) -> Path:
    return checkpoint / f"rng-rank{rank}.pt"


def list_checkpoints(root: Path) -> list[Path]:
    """Complete checkpoints under ``root``, oldest first."""
    if not root.is_dir():
        return []
    found = [p for p in root.iterdir() if p.is_dir() and _NAME.match(p.name) and (p / STATE_FILE).is_file()]
    return sorted(found, key=lambda p: p.name)


def find_checkpoint(root: Path, resume: str) -> Path:
    """``"latest"`` (the newest complete checkpoint under ``root``) or the path of one checkpoint folder."""
    if resume == "latest":
        found = list_checkpoints(root)
        if not found:
            raise MmwbCheckpointError(f"--resume latest: no checkpoint under {root}")
        return found[-1]
    path = Path(resume)
    if not (path / STATE_FILE).is_file():
        raise MmwbCheckpointError(f"--resume {resume}: not a checkpoint folder (no {STATE_FILE} in it)")
    return path


def begin(final: Path) -> Path:
    """A fresh, empty staging folder for ``final`` (a stale one from a killed save is removed)."""
    staging = staging_path(final)
    if staging.exists():
        shutil.rmtree(staging)
    staging.mkdir(parents=True)
    return staging


def publish(staging: Path, final: Path) -> None:
    """Make the staged folder visible under its final name with one rename (after an fsync of its files)."""
    for file in staging.rglob("*"):  # model folders (a diffusers pipeline) have subfolders
        if file.is_file() and not file.is_symlink():
            with file.open("rb") as f:
                os.fsync(f.fileno())
    if final.exists():  # re-saving a step (a run resumed from an older checkpoint): swap the old one out
        old = final.with_name(final.name + ".old")
        shutil.rmtree(old, ignore_errors=True)
        os.rename(final, old)
        os.rename(staging, final)
        shutil.rmtree(old)
    else:
        os.rename(staging, final)
    _fsync_dir(final.parent)


def save_model_folder(model: Any, folder: Path) -> Path:
    """``model.save_pretrained`` (an mmwb VLM, a diffusers model or pipeline) into a staging folder published
    whole: a killed run never leaves half a model."""
    staging = begin(Path(folder))
    model.save_pretrained(staging)
    publish(staging, Path(folder))
    return Path(folder)


def recover(root: Path) -> list[Path]:
    """Tidy what a run killed while saving left under ``root``: a checkpoint swapped out (``.old``) whose
    replacement never arrived comes back; staging folders (``.tmp``) go. Returns the staging folders removed."""
    if not root.is_dir():
        return []
    for old in root.glob("step-*.old"):
        final = old.with_suffix("")
        if final.exists():
            shutil.rmtree(old)
        else:
            os.rename(old, final)
    stale = list(root.glob("step-*.tmp"))
    for path in stale:
        shutil.rmtree(path)
    return stale


def set_aside_after(root: Path, step: int) -> list[Path]:
    """Rename the checkpoints newer than ``step`` to ``step-N.abandoned`` (a run resumed from an older checkpoint
    branches off there): ``latest`` and ``prune`` no longer see them, and nothing is deleted."""
    moved = []
    for path in list_checkpoints(root):
        if int(_NAME.match(path.name).group(1)) > step:
            target, n = path.with_name(path.name + ".abandoned"), 1
            while target.exists():
                n += 1
                target = path.with_name(f"{path.name}.abandoned-{n}")
            os.rename(path, target)
            moved.append(target)
    return moved


def prune(root: Path, keep_last: int) -> list[Path]:
    """Delete all but the newest ``keep_last`` checkpoints; returns what was deleted."""
    doomed = list_checkpoints(root)[:-keep_last] if keep_last > 0 else []
    for path in doomed:
        shutil.rmtree(path)
    return doomed


def save_state(obj: dict[str, Any], path: Path) -> None:
    torch.save(obj, path)


def load_state(path: Path) -> dict[str, Any]:
    """Load a state file with ``weights_only=True``: no pickled code can run."""
    if not path.is_file():
        raise MmwbCheckpointError(f"{path}: missing from the checkpoint")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # a torn or foreign file: say which one
        raise MmwbCheckpointError(f"{path}: cannot be read as a trainer state ({err})") from err


def rng_state() -> dict[str, Any]:
    """Every global RNG this process draws from, as tensors and plain values (``weights_only``-loadable)."""
    _, key, pos, has_gauss, gauss = np.random.get_state()
    state: dict[str, Any] = {
        "python": random.getstate(),
        "numpy": {
            "key": torch.from_numpy(key.astype(np.int64)),
            "pos": pos,
            "has_gauss": has_gauss,
            "gauss": gauss,
        },
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    random.setstate(_as_tuples(state["python"]))
    np_state = state["numpy"]
    key = np_state["key"].numpy().astype(np.uint32)
    np.random.set_state(("MT19937", key, np_state["pos"], np_state["has_gauss"], np_state["gauss"]))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _as_tuples(value: Any) -> Any:
    """``random.setstate`` wants the nested tuples back (a round trip may hand lists)."""
    return tuple(_as_tuples(v) for v in value) if isinstance(value, list | tuple) else value


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
