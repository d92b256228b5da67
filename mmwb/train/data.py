"""Exactly resumable, rank-sharded sampling, and batches that survive broken items.

Every epoch has one global order (a permutation seeded by ``seed + epoch``). Step ``s`` of the epoch consumes
``order[s * G:(s + 1) * G]`` with ``G = batch_size * grad_accum * world_size``; each micro-batch of it is cut into
one slice per rank. So a run's samples depend only on the seed and the global batch, not on how many processes
share it, and a position (epoch, sample offset) saved in a checkpoint restarts the stream exactly there.
A trailing remainder smaller than ``G`` is dropped each epoch (the next epoch's shuffle covers it).
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch.utils.data import Dataset, default_collate

from mmwb.errors import MmwbConfigError, MmwbInputError

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class DataPosition:
    """Where the stream stands: ``sample`` indexes the epoch's global order (a multiple of the micro-batch)."""

    epoch: int = 0
    sample: int = 0


class ResumableBatchSampler:
    """Yields this rank's index lists from ``position`` to the end of the epoch; use as ``batch_sampler``."""

    def __init__(
        self,
        num_items: int,
        batch_size: int,
        grad_accum: int = 1,
        world_size: int = 1,
        rank: int = 0,
        seed: int = 0,
        shuffle: bool = True,
    ) -> None:
        self.num_items = num_items
        self.batch_size = batch_size
        self.world_size = world_size
        self.rank = rank
        self.seed = seed
        self.shuffle = shuffle
        self.micro_samples = batch_size * world_size  # samples of one micro-batch over all ranks
        self.step_samples = self.micro_samples * grad_accum
        self.steps_per_epoch = num_items // self.step_samples
        if self.steps_per_epoch == 0:
            raise MmwbConfigError(
                f"the dataset has {num_items} items, fewer than one step's global batch of {self.step_samples} "
                f"(batch_size {batch_size} x grad_accum {grad_accum} x {world_size} processes)"
            )
        self.position = DataPosition()

    def set_position(self, position: DataPosition) -> None:
        if position.sample % self.micro_samples:
            raise MmwbConfigError(
                f"cannot resume at sample {position.sample} of epoch {position.epoch}: it is not a multiple of "
                f"this run's micro-batch over all processes ({self.micro_samples}); keep the global batch"
            )
        self.position = position

    def order(self, epoch: int) -> torch.Tensor:
        if not self.shuffle:
            return torch.arange(self.num_items)
        return torch.randperm(self.num_items, generator=torch.Generator().manual_seed(self.seed + epoch))

    def __iter__(self) -> Iterator[list[int]]:
        order = self.order(self.position.epoch)
        end = self.steps_per_epoch * self.step_samples
        for start in range(self.position.sample, end, self.micro_samples):
            first = start + self.rank * self.batch_size
            yield order[first : first + self.batch_size].tolist()

    def __len__(self) -> int:
        return (self.steps_per_epoch * self.step_samples - self.position.sample) // self.micro_samples


@dataclass(frozen=True)
class BadItem:
    """Stands in for an item whose loading raised ``MmwbInputError``; ``reason`` names the file."""

    index: int
    reason: str


class SkipBadItems(Dataset):
    """Wraps a map-style dataset so an unreadable item becomes a ``BadItem`` instead of killing the worker."""

    def __init__(self, dataset: Dataset) -> None:
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)  # type: ignore[arg-type]

    def __getitem__(self, index: int) -> Any:
        try:
            return self.dataset[index]
        except MmwbInputError as err:
            return BadItem(index, str(err))


@dataclass(frozen=True)
class CollatedBatch:
    """A collated batch (``None`` when every item was bad) and the reasons its bad items were dropped."""

    data: Any
    skipped: tuple[str, ...]


def skip_bad_items(
    collate_fn: Callable[[list[Any]], Any] | None = None,
) -> Callable[[Sequence[Any]], CollatedBatch]:
    """Wrap ``collate_fn`` so ``BadItem`` markers are dropped before collation and reported beside the batch.

    The names travel with the batch (rather than a counter here) because collation may run in worker processes;
    the trainer logs and counts them in the main process.
    """
    collate = collate_fn or default_collate

    def wrapped(items: Sequence[Any]) -> CollatedBatch:
        good = [item for item in items if not isinstance(item, BadItem)]
        skipped = tuple(f"item {item.index}: {item.reason}" for item in items if isinstance(item, BadItem))
        return CollatedBatch(collate(good) if good else None, skipped)

    return wrapped
