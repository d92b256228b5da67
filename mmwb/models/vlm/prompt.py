"""Prompt templates of mmwb's VLMs, the same token layout the trainers use (mmwb.train.multimodal).

``plain`` (stage-1 captioning): ``<|bos|><image>`` then the caption. ``chat`` (instruction tuning):
``<|bos|><|user|><image>question<|assistant|>`` then a space and the answer. One ``<image>`` per image; the model
widens it. The space matters with a byte-level BPE: ``" triangle"`` is one word token, as in the language model's
pretraining text ("question answer"), where a bare ``"triangle"`` splits into rare pieces (``t ri angle``).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from mmwb.data.tokenizer import ASSISTANT, BOS, IMAGE, USER
from mmwb.errors import MmwbInputError

TEMPLATES = ("plain", "chat")
DEFAULT_CAPTION_QUESTION = "describe the image"
ANSWER_PREFIX = " "  # between <|assistant|> and the answer (chat template)


def build_prompt(
    question: str | None, template: str = "chat", n_images: int = 1, image: str = IMAGE, bos: str = BOS
) -> str:
    """The prompt text up to where the model starts writing; ``question=None`` asks for a caption. ``image`` and
    ``bos`` are the placeholder and start tokens as text: mmwb's by default, an imported model's own
    (``model_tokens``) for its tokenizer."""
    if template not in TEMPLATES:
        raise MmwbInputError(f"template {template!r} is not one of {TEMPLATES}")
    images = image * n_images
    if template == "plain":
        return f"{bos}{images}" + (question or "")
    return f"{bos}{USER}{images}{question or DEFAULT_CAPTION_QUESTION}{ASSISTANT}"


def model_tokens(tokenizer, image_token_id: int) -> dict[str, str]:
    """``build_prompt``'s ``image`` and ``bos`` for a model's tokenizer: an imported Kimi or LLaVA tokenizer has
    its own placeholder (Kimi's media token, LLaVA's ``<image>``) and start token (``<s>``), not mmwb's."""
    return {"image": tokenizer.convert_ids_to_tokens(image_token_id), "bos": tokenizer.bos_token or ""}


def encode_prompts(tokenizer, prompts: Sequence[str]) -> tuple[torch.Tensor, torch.Tensor]:
    """Left-padded ``(B, T)`` ids and mask (decoder-only generation appends on the right)."""
    rows = [tokenizer(p, add_special_tokens=False).input_ids for p in prompts]
    width = max(map(len, rows))
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    ids = torch.tensor([[pad] * (width - len(r)) + r for r in rows])
    mask = torch.tensor([[0] * (width - len(r)) + [1] * len(r) for r in rows])
    return ids, mask
