"""Language-model pretraining of a small mmwb MoE decoder on the shapes text (stage 2 of tiny-shapes).

The decoder learns the words and grammar of captions and QA pairs before it ever sees an image, so the later
stages only have to ground them. Each caption and each "question answer" line is one sequence,
``<|bos|> text <|eos|>``, with a given tokenizer or a BPE fitted here on the training text. The metric is the
validation perplexity (per token, over every predicted token including the end of text).
"""

from __future__ import annotations

import dataclasses
import math
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from transformers import PreTrainedTokenizerBase

from mmwb.data.shapes import SPLITS, read_index, record_document, record_texts
from mmwb.data.tokenizer import load_tokenizer, train_bpe_tokenizer
from mmwb.models.decoder import DecoderConfig, DecoderForCausalLM
from mmwb.models.decoder.model import IGNORE_INDEX
from mmwb.runtime import seed_everything
from mmwb.train import checkpoint as ckpt
from mmwb.train.config import TrainConfig
from mmwb.train.engine import train
from mmwb.train.recipes import publish_stage


@dataclass
class LMStageConfig:
    """One LM run: shapes text and a tokenizer folder in, a decoder folder (``save_pretrained`` + tokenizer) out.

    ``model`` is a full ``DecoderConfig``; its vocabulary size and special token ids are taken from the tokenizer.
    """

    data_dir: Path = Path("data/shapes")
    # a tokenizer folder, or None: fit a BPE of vocab_size on the training text
    tokenizer_dir: Path | None = None
    vocab_size: int = 512
    out_dir: Path = Path("runs/tiny-shapes/stage1_lm")  # the model folder; the engine's run is train.out_dir
    eval_batch_size: int = 256
    # each image's caption and QA pairs as one text (mmwb.data.shapes.record_document), not one text per line:
    # only then must the model look back over many tokens, the skill that later reads the image tokens
    documents: bool = True
    model: DecoderConfig = field(default_factory=DecoderConfig)
    train: TrainConfig = field(default_factory=TrainConfig)


def encode_texts(tokenizer: PreTrainedTokenizerBase, texts: Sequence[str]) -> list[list[int]]:
    """``[bos, *text, eos]`` ids per text."""
    ids = tokenizer(list(texts), add_special_tokens=False).input_ids
    return [[tokenizer.bos_token_id, *row, tokenizer.eos_token_id] for row in ids]


def collate_lm(tokenizer: PreTrainedTokenizerBase, rows: Sequence[list[int]]) -> dict[str, torch.Tensor]:
    """Pad (on the tokenizer's side) to the longest row; padding is masked out and never a label."""
    batch = tokenizer.pad({"input_ids": list(rows)}, return_tensors="pt")
    labels = batch["input_ids"].masked_fill(batch["attention_mask"] == 0, IGNORE_INDEX)
    return {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"], "labels": labels}


def lm_loss(model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, dict[str, Any]]:
    """The decoder's own loss (LM cross entropy + router losses at the config's coefficients)."""
    out = model(**batch)
    return out.loss, {"lm_loss": out.lm_loss.detach()}


@torch.no_grad()
def perplexity(
    model: DecoderForCausalLM,
    tokenizer: PreTrainedTokenizerBase,
    rows: Sequence[list[int]],
    batch_size: int = 256,
) -> float:
    """exp of the mean next-token cross entropy over every label token of ``rows``."""
    total, count = 0.0, 0
    for start in range(0, len(rows), batch_size):
        batch = {
            k: v.to(model.device) for k, v in collate_lm(tokenizer, rows[start : start + batch_size]).items()
        }
        tokens = int((batch["labels"][:, 1:] != IGNORE_INDEX).sum())  # labels the shifted loss averages over
        total += model(**batch).lm_loss.item() * tokens
        count += tokens
    return math.exp(total / count)


def decoder_config(config: DecoderConfig, tokenizer: PreTrainedTokenizerBase) -> DecoderConfig:
    """``config`` with the tokenizer's vocabulary size and special token ids."""
    return dataclasses.replace(
        config,
        vocab_size=len(tokenizer),
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
    )


def stage_texts(data_dir: Path, split: str, config: LMStageConfig) -> list[str]:
    """The split's training texts: one document per record, or one text per caption and QA line."""
    records = read_index(data_dir, split)
    if not config.documents:
        return [t for r in records for t in record_texts(r)]
    rng = np.random.default_rng([config.train.seed, SPLITS.index(split)])
    return [record_document(r, rng) for r in records]


def run_lm_stage(config: LMStageConfig) -> dict[str, Any]:
    """Train the decoder, measure validation perplexity, publish the model folder whole; returns the metrics."""
    started = time.perf_counter()
    if config.tokenizer_dir is not None:
        tokenizer = load_tokenizer(config.tokenizer_dir)
    else:
        lines = (t for r in read_index(Path(config.data_dir), "train") for t in record_texts(r))
        tokenizer = train_bpe_tokenizer(lines, config.vocab_size)
    rows = {
        split: encode_texts(tokenizer, stage_texts(Path(config.data_dir), split, config))
        for split in ("train", "val")
    }
    seed_everything(config.train.seed)
    model = DecoderForCausalLM(decoder_config(config.model, tokenizer))
    result = train(
        model,
        lm_loss,
        rows["train"],
        config.train,
        collate_fn=lambda items: collate_lm(tokenizer, items),
        eval_fn=lambda evaluated: {
            "val_perplexity": perplexity(evaluated, tokenizer, rows["val"], config.eval_batch_size)
        },
    )
    model.eval()
    metrics = {
        "stage": "lm",
        "steps": result.step,
        "last_loss": result.last_loss,
        "parameters": sum(p.numel() for p in model.parameters()),
        "train_sequences": len(rows["train"]),
        "val_perplexity": perplexity(model, tokenizer, rows["val"], config.eval_batch_size),
    }
    staging = ckpt.begin(Path(config.out_dir))
    model.save_pretrained(staging)
    tokenizer.save_pretrained(staging)
    metrics["seconds"] = time.perf_counter() - started
    publish_stage(staging, Path(config.out_dir), metrics)
    return metrics
