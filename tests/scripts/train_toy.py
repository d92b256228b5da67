"""Train a toy task with mmwb's engine; the resume and DDP tests run this in subprocesses.

Writes ``<out>/rank<r>.json`` (rank, world size, final step) from every process, so a test can see how many
processes really trained.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # tests/, for train_fixtures

from train_fixtures import MLP, ToyRegression, TwoExpertMoE, mse_loss  # noqa: E402

from mmwb.runtime import seed_everything  # noqa: E402
from mmwb.train import TrainConfig, train  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--model", choices=["mlp", "moe"], default="mlp")
    parser.add_argument("--items", type=int, default=64)
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--grad-accum", type=int, default=1)
    parser.add_argument("--save-every", type=int, default=0)
    parser.add_argument("--resume", default=None)
    parser.add_argument("--no-touch", action="store_true", help="leave unused experts without gradients")
    parser.add_argument("--step-sleep", type=float, default=0.0, help="seconds to wait after each step")
    args = parser.parse_args()

    torch.set_num_threads(1)  # same float reductions in every process
    seed_everything(0)
    model = MLP(dropout=0.2) if args.model == "mlp" else TwoExpertMoE()
    config = TrainConfig(
        out_dir=args.out,
        epochs=args.epochs,
        batch_size=args.batch_size,
        grad_accum=args.grad_accum,
        lr=3e-2,
        weight_decay=0.01,
        warmup_steps=2,
        save_every=args.save_every,
        keep_last=2,
        ema_decay=0.9,
        device="cpu",
        resume=args.resume,
        touch_all_params=not args.no_touch,
        progress=False,
    )
    result = train(
        model,
        mse_loss,
        ToyRegression(args.items),
        config,
        on_step=lambda step, record: time.sleep(args.step_sleep),
    )
    rank = result.rank
    info = {"rank": rank, "world_size": result.world_size, "step": result.step, "loss": result.last_loss}
    (args.out / f"rank{rank}.json").write_text(json.dumps(info))


if __name__ == "__main__":
    main()
