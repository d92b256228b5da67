"""``mmwb train instruct``: stage 2, LoRA on the decoder plus the projector, loss on the assistant turns."""

from __future__ import annotations

import argparse
from typing import Any

HELP = (
    "Instruction-tune a VLM (stage 2): peft LoRA on the decoder's attention, shared-expert and routed-expert "
    "weights, the projector fully trained, the tower frozen (features cached as in stage 1), loss on assistant "
    "turns only. Checkpoints hold only the trained tensors; the run ends with TRAIN_OUT_DIR/adapter and the "
    "merged VLM in out_dir ('mmwb export --merge-lora' merges an adapter again)."
)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from mmwb.cli.train_align import add_arguments as add_vlm_arguments

    add_vlm_arguments(parser, "instruct_*")


def run(args: argparse.Namespace) -> dict[str, Any]:
    import dataclasses

    from mmwb.cli.train_align import load_vlm_train_config
    from mmwb.runtime.config import to_dict
    from mmwb.train.instruct import InstructConfig, train_instruct

    config = load_vlm_train_config(InstructConfig, args)
    result, adapter = train_instruct(config)
    if not args.json:
        print(
            f"trained {result.step} steps (last loss {result.last_loss:.4g}, {result.skipped_items} items skipped); "
            + (
                f"adapter in {adapter}, merged VLM in {config.out_dir}"
                if adapter
                else f"VLM in {config.out_dir}"
            )
        )
    paths = {"adapter": str(adapter) if adapter else None, "model": str(config.out_dir)}
    return {**paths, "config": to_dict(config), **dataclasses.asdict(result)}
