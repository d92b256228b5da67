"""Wall-clock timing that synchronises the device, peak-memory tracking, and throughput figures."""

from __future__ import annotations

import statistics
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field

import psutil
import torch

from mmwb.runtime.device import synchronize
from mmwb.runtime.memory import return_freed_memory


@dataclass
class Timer:
    """``with Timer(device) as t: ...`` then ``t.seconds``; queued device work is waited for at both ends."""

    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    seconds: float = 0.0

    def __enter__(self) -> Timer:
        synchronize(self.device)
        self._start = time.perf_counter()
        return self

    def __exit__(self, *exc: object) -> None:
        synchronize(self.device)
        self.seconds = time.perf_counter() - self._start


def median_time(fn: Callable[[], object], device: torch.device, repeats: int = 5, warmup: int = 1) -> float:
    """Median seconds of ``fn()`` over ``repeats`` runs after ``warmup`` untimed runs (the benchmark protocol)."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        with Timer(device) as timer:
            fn()
        times.append(timer.seconds)
    return statistics.median(times)


def rate(count: float, seconds: float) -> float:
    """Items per second (tokens/s, images/s); 0 when nothing was timed."""
    return count / seconds if seconds > 0 else 0.0


@dataclass
class PeakMemory:
    """Result of :func:`track_peak_memory`: the peak over the block and the level before it, in bytes. On CPU
    also the level at the block's end and the anonymous part (RSS less file-backed pages: a memory-mapped file
    read through is page cache, not memory the process holds) at its peak and end."""

    source: str
    baseline_bytes: int = 0
    peak_bytes: int = 0
    final_bytes: int = 0
    peak_anonymous_bytes: int | None = None
    final_anonymous_bytes: int | None = None

    @property
    def added_bytes(self) -> int:
        """Memory the block needed on top of what was already held."""
        return max(0, self.peak_bytes - self.baseline_bytes)


@contextmanager
def track_peak_memory(device: torch.device, interval_s: float = 0.002) -> Iterator[PeakMemory]:
    """Peak memory while the block runs: the CUDA allocator's peak on GPUs, else the process RSS sampled by a thread."""
    if device.type == "cuda":
        synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        result = PeakMemory("cuda-allocator", baseline_bytes=torch.cuda.memory_allocated(device))
        yield result
        synchronize(device)
        result.peak_bytes = torch.cuda.max_memory_allocated(device)
        result.final_bytes = torch.cuda.memory_allocated(device)
        return
    return_freed_memory()  # heap pages freed earlier but kept would absorb the block's allocations unseen
    process = psutil.Process()
    result = PeakMemory("process-rss", baseline_bytes=process.memory_info().rss)
    result.peak_bytes, result.peak_anonymous_bytes = result.baseline_bytes, 0
    stop = threading.Event()

    def sample() -> tuple[int, int]:
        info = process.memory_info()
        result.peak_bytes = max(result.peak_bytes, info.rss)
        result.peak_anonymous_bytes = max(result.peak_anonymous_bytes, info.rss - info.shared)
        return info.rss, info.rss - info.shared

    def sample_until_stopped() -> None:
        while not stop.is_set():
            sample()
            stop.wait(interval_s)

    thread = threading.Thread(target=sample_until_stopped, daemon=True)
    thread.start()
    try:
        yield result
    finally:
        stop.set()
        thread.join()
        result.final_bytes, result.final_anonymous_bytes = sample()
