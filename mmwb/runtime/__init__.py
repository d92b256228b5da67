"""The runtime every mmwb model, pipeline and trainer shares: device, precision, seeding, timing, configs."""

from mmwb.runtime.device import available_devices, resolve_device, synchronize
from mmwb.runtime.precision import Precision, resolve_precision, supported_precisions
from mmwb.runtime.seeding import make_generator, seed_everything
from mmwb.runtime.timing import PeakMemory, Timer, median_time, rate, track_peak_memory

__all__ = [
    "PeakMemory",
    "Precision",
    "Timer",
    "available_devices",
    "make_generator",
    "median_time",
    "rate",
    "resolve_device",
    "resolve_precision",
    "seed_everything",
    "supported_precisions",
    "synchronize",
    "track_peak_memory",
]
