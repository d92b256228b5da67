"""Byte-level BPE tokenizers trained with the ``tokenizers`` library and used through transformers.

mmwb's small models are trained from scratch, so they get a vocabulary fitted to their text; wrapping it as a
``PreTrainedTokenizerFast`` means the same code path serves mmwb's tokenizers and real checkpoints' ones.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import AutoTokenizer, PretrainedConfig, PreTrainedTokenizerBase, PreTrainedTokenizerFast

from mmwb.errors import MmwbInputError

PAD, BOS, EOS, IMAGE = "<|pad|>", "<|bos|>", "<|eos|>", "<image>"
USER, ASSISTANT = "<|user|>", "<|assistant|>"
SPECIAL_TOKENS = (PAD, BOS, EOS, IMAGE, USER, ASSISTANT)


def train_bpe_tokenizer(texts: Iterable[str], vocab_size: int = 512) -> PreTrainedTokenizerFast:
    """Fit a byte-level BPE on ``texts`` with mmwb's special tokens (padding, turns, ``<image>``)."""
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=list(SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(texts, trainer=trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=tokenizer,
        pad_token=PAD,
        bos_token=BOS,
        eos_token=EOS,
        extra_special_tokens={"image_token": IMAGE, "user_token": USER, "assistant_token": ASSISTANT},
        padding_side="left",  # decoder-only generation pads on the left
    )


def load_tokenizer(path: str | Path) -> PreTrainedTokenizerBase:
    """A tokenizer from a local folder; never downloads and never runs repository code."""
    path = Path(path)
    if not path.is_dir():
        raise MmwbInputError(f"{path}: tokenizer folder not found")
    try:
        return AutoTokenizer.from_pretrained(
            path, local_files_only=True, trust_remote_code=False, **_skip_own_config(path)
        )
    except (OSError, ValueError) as err:
        raise MmwbInputError(f"{path}: cannot load a tokenizer from this folder ({err})") from err


def folder_tokenizer(path: Path) -> PreTrainedTokenizerBase | None:
    """The tokenizer saved in a model folder, or None when the folder has none."""
    has = any((Path(path) / name).is_file() for name in ("tokenizer.json", "tokenizer_config.json"))
    return load_tokenizer(path) if has else None


def _skip_own_config(path: Path) -> dict[str, Any]:
    """An empty config for folders holding an mmwb model, whose config.json transformers cannot read.

    Without it AutoTokenizer parses mmwb's config.json as a transformers one and warns on every load.
    """
    config = path / "config.json"
    if not config.is_file():
        return {}
    try:
        model_type = json.loads(config.read_text()).get("model_type", "")
    except (json.JSONDecodeError, AttributeError):
        return {}
    return {"config": PretrainedConfig()} if str(model_type).startswith("mmwb_") else {}
