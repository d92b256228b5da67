"""Training: the shared engine (accelerate), its config, data order, checkpoints, EMA, schedules and metrics; the
DPO family's loss."""

from mmwb.train.config import ParamGroupConfig, TrainConfig
from mmwb.train.data import (
    BadItem,
    CollatedBatch,
    DataPosition,
    ResumableBatchSampler,
    SkipBadItems,
    skip_bad_items,
)
from mmwb.train.dpo_loss import dpo_loss
from mmwb.train.engine import (
    Trainer,
    TrainingDivergedError,
    TrainResult,
    load_run_weights,
    param_groups,
    train,
)

__all__ = [
    "BadItem",
    "CollatedBatch",
    "DataPosition",
    "ParamGroupConfig",
    "ResumableBatchSampler",
    "SkipBadItems",
    "TrainConfig",
    "TrainResult",
    "Trainer",
    "TrainingDivergedError",
    "dpo_loss",
    "load_run_weights",
    "param_groups",
    "skip_bad_items",
    "train",
]
