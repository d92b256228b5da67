"""Run ``mmwb train align`` logic from a YAML config + overrides; the resume and DDP tests run this in subprocesses.

Writes ``<train.out_dir>/rank<r>.json`` (rank, world size, final step) from every process. ``--step-sleep`` slows
each step so a test can kill the run between two checkpoints.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from mmwb.runtime.config import load_config
from mmwb.train import engine
from mmwb.train.align import AlignConfig, train_align


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--config", type=Path, required=True)
    parser.add_argument("--step-sleep", type=float, default=0.0)
    parser.add_argument("overrides", nargs="*")
    args = parser.parse_args()
    torch.set_num_threads(1)  # same float reductions in every process
    after_step = engine.Trainer._after_step

    def slow_after_step(self, progress, record):
        after_step(self, progress, record)
        time.sleep(args.step_sleep)

    engine.Trainer._after_step = slow_after_step
    config = load_config(AlignConfig, args.config, args.overrides)
    result, _ = train_align(config)
    info = {"rank": result.rank, "world_size": result.world_size, "step": result.step}
    (Path(config.train.out_dir) / f"rank{result.rank}.json").write_text(json.dumps(info))


if __name__ == "__main__":
    main()
