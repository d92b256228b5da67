"""Train a tiny MoE decoder with mmwb's engine, sharded or not; the FSDP tests run this under ``accelerate launch``.

Writes ``<out>/rank<r>.json`` from every process: rank, world size, final step, whether the model was sharded, the
bytes of parameters/gradients/optimizer state this rank held, each micro-batch's tokens per expert (to show an
expert that got no tokens on one rank), and the greedy tokens the trained model continues a fixed prompt with.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch
from torch.distributed.tensor import DTensor
from torch.utils.data import Dataset

from mmwb.data.io import write_json
from mmwb.errors import MmwbInputError
from mmwb.models.decoder import DecoderConfig, DecoderForCausalLM
from mmwb.models.decoder.save import MODEL_TYPE
from mmwb.runtime import seed_everything
from mmwb.train import TrainConfig, train

VOCAB, LENGTH = 48, 12
PROMPT = [1, 5, 9, 3]


def tiny_moe() -> DecoderForCausalLM:
    """Two MoE layers of 8 experts, top-1 (plus one shared): with 2-4 sequences per micro-batch some expert often
    gets no token on one rank."""
    config = DecoderConfig(
        vocab_size=VOCAB,
        hidden_size=32,
        num_layers=2,
        num_heads=4,
        num_kv_heads=2,
        head_dim=8,
        intermediate_size=64,
        moe_intermediate_size=16,
        n_routed_experts=8,
        n_shared_experts=1,
        num_experts_per_tok=1,
        max_position_embeddings=64,
    )
    return DecoderForCausalLM(config)


class Sequences(Dataset):
    """Random token sequences; the items in ``bad`` cannot be read (the engine skips them)."""

    def __init__(self, n: int, bad: set[int]) -> None:
        g = torch.Generator().manual_seed(7)
        self.rows = [torch.randint(2, VOCAB, (LENGTH,), generator=g) for _ in range(n)]
        self.bad = bad

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, index: int) -> torch.Tensor:
        if index in self.bad:
            raise MmwbInputError(f"sequence {index}: unreadable")
        return self.rows[index]


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--sharding", default="none")
    parser.add_argument("--precision", default="fp32")
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--grad-accum", type=int, default=1)
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument("--save-every", type=int, default=0)
    parser.add_argument("--resume", default=None)
    parser.add_argument("--step-sleep", type=float, default=0.0)
    parser.add_argument("--bad", type=int, nargs="*", default=[], help="indices of unreadable items")
    args = parser.parse_args()

    torch.set_num_threads(1)  # same float reductions in every process
    seed_everything(0)
    model = tiny_moe()
    counts: list[list[int]] = []
    resharded: list[bool] = []

    def loss_fn(model: torch.nn.Module, batch: torch.Tensor) -> torch.Tensor:
        out = model(batch, labels=batch)
        counts.append(out.expert_counts.tolist())  # (MoE layers, E)
        # between forward and backward: full sharding has put a layer's shards back, grad_op keeps it gathered
        resharded.append(isinstance(model.model.layers[0].input_layernorm.weight, DTensor))
        return out.loss

    tokens: list[int] = []

    def final_tokens(model: torch.nn.Module) -> dict[str, float]:
        """Greedy continuation of PROMPT without a cache: every rank runs the same full forwards, as sharding needs."""
        ids = torch.tensor([PROMPT])
        for _ in range(6):
            ids = torch.cat([ids, model(ids).logits[:, -1:].argmax(-1)], dim=1)
        tokens[:] = ids[0].tolist()
        return {"generated": 6.0}

    config = TrainConfig(
        out_dir=args.out,
        max_steps=args.steps,
        batch_size=args.batch_size,
        grad_accum=args.grad_accum,
        lr=2e-3,
        weight_decay=0.01,
        warmup_steps=1,
        save_every=args.save_every,
        keep_last=0,
        device="cpu",
        resume=args.resume,
        precision=args.precision,
        sharding=args.sharding,
        progress=False,
    )
    result = train(
        model,
        loss_fn,
        Sequences(32, set(args.bad)),
        config,
        collate_fn=torch.stack,
        shardable=True,
        on_save=lambda folder: write_json(  # the checkpoint becomes a model folder mmwb.from_pretrained reads
            folder / "config.json",
            {"model_type": MODEL_TYPE, "dtype": "float32", "decoder": model.config.to_dict()},
        ),
        on_step=lambda step, record: time.sleep(args.step_sleep),
        eval_fn=final_tokens,  # run at the end, while the processes still form a group (train() ends it)
    )
    info = {
        "rank": result.rank,
        "world_size": result.world_size,
        "step": result.step,
        "sharded": result.sharded,
        "state_bytes": result.state_bytes,
        "expert_counts": counts,
        "resharded": resharded,
        "tokens": tokens,
    }
    (args.out / f"rank{result.rank}.json").write_text(json.dumps(info))


if __name__ == "__main__":
    main()
