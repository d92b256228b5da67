"""The prompt format of mmwb's VLMs, written once for generation and for training.

``plain`` (stage-1 captioning): ``<|bos|><image>`` then the caption. ``chat`` (instruction tuning):
``<|bos|><|user|><image>question<|assistant|>`` then a space and the answer, then ``<eos>``; later turns
``<|user|>question<|assistant|> answer<eos>``. ``chat_question_first`` puts the first question before the image
(``<|bos|><|user|>question<image><|assistant|>``): every image token of a causal decoder then sees the question,
so each can check its own cell against it ("is this the red circle?") before the answer looks for a match; with
the image first, the answer position alone must find a conjunction of attributes among 64 tokens. ``instructblip``
is InstructBLIP's: the image's query tokens, then the start token and the instruction (a caption asks
``INSTRUCTBLIP_CAPTION``), the answer straight after it, as its processor and LAVIS's training write them. One
``<image>`` per image; the model widens it. ``user_text`` and ``answer_text`` are the only places that know this
layout: generation tokenizes ``build_prompt`` (the first user turn), training (``make_encoder``) tokenizes every
turn the same way and labels the answers. The space matters with a byte-level BPE: ``" triangle"`` is one word
token, as in the language model's pretraining text ("question answer"), where a bare ``"triangle"`` splits into rare
pieces (``t ri angle``).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from transformers import PreTrainedTokenizerBase

from mmwb.data.captions import ImageTextRecord, Turn
from mmwb.data.tokenizer import ASSISTANT, BOS, IMAGE, USER
from mmwb.errors import MmwbInputError
from mmwb.models.decoder.model import IGNORE_INDEX

TEMPLATES = ("plain", "chat", "chat_question_first", "instructblip")
DEFAULT_CAPTION_QUESTION = "describe the image"
INSTRUCTBLIP_CAPTION = "A short image caption:"  # one of the InstructBLIP paper's captioning instructions
_UNDELIMITED = ("plain", "instructblip")  # templates without user/assistant tokens
ANSWER_PREFIX = " "  # between <|assistant|> and the answer (chat template)


def caption_question(template: str) -> str:
    """The instruction that asks for a caption in ``template``."""
    return INSTRUCTBLIP_CAPTION if template == "instructblip" else DEFAULT_CAPTION_QUESTION


def user_text(
    question: str | None,
    template: str,
    first: bool = True,
    n_images: int = 1,
    image: str = IMAGE,
    bos: str = BOS,
) -> str:
    """A user turn as text, up to where the model starts writing; the first turn carries the start token and the
    image placeholders. ``question=None`` asks for a caption (``""`` is a turn without text, as in caption
    records)."""
    if template not in TEMPLATES:
        raise MmwbInputError(f"template {template!r} is not one of {TEMPLATES}")
    images = image * n_images
    if template == "plain":
        return (f"{bos}{images}" if first else "") + (question or "")
    if template == "instructblip":
        return (f"{images}{bos}" if first else "") + (question or caption_question(template))
    text = caption_question(template) if question is None else question
    if not first:
        return f"{USER}{text}{ASSISTANT}"
    if template == "chat_question_first":
        return f"{bos}{USER}{text}{images}{ASSISTANT}"
    return f"{bos}{USER}{images}{text}{ASSISTANT}"


def answer_text(answer: str, template: str) -> str:
    """What the model writes after a user turn (the tokenizer's end token follows it)."""
    return answer if template in _UNDELIMITED else ANSWER_PREFIX + answer


def build_prompt(
    question: str | None, template: str = "chat", n_images: int = 1, image: str = IMAGE, bos: str = BOS
) -> str:
    """The generation prompt: the first user turn. ``image`` and ``bos`` are the placeholder and start tokens as
    text: mmwb's by default, an imported model's own (``model_tokens``) for its tokenizer."""
    return user_text(question or None, template, True, n_images, image, bos)  # "" asks for a caption too


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


def make_encoder(
    tokenizer: PreTrainedTokenizerBase,
    template: str,
    max_length: int,
    image: str = IMAGE,
    bos: str = BOS,
    conversation: bool = False,
) -> Callable[[ImageTextRecord], dict[str, torch.Tensor]]:
    """``record -> {"input_ids", "labels"}`` (1-D long tensors) for training, cut at ``max_length``: every turn
    tokenized as generation tokenizes its prompt, labels on the answers and their end token only. ``plain`` reads
    the record's caption (its whole conversation with ``conversation``, e.g. a DPO pair's question to an imported
    LLaVA); the other templates its whole conversation. ``image`` and ``bos`` as in ``build_prompt`` (an imported
    model's own, from ``model_tokens``)."""
    needed = (bos, image) if template in _UNDELIMITED else (bos, image, USER, ASSISTANT)
    for token in filter(None, needed):  # a missing special token would silently become text
        token_id = tokenizer.convert_tokens_to_ids(token)
        if token_id is None or token_id == tokenizer.unk_token_id:
            raise MmwbInputError(
                f"the tokenizer has no {token!r} token; use a tokenizer with mmwb's special tokens"
            )

    def ids(text: str) -> list[int]:
        return tokenizer(text, add_special_tokens=False).input_ids if text else []

    def encode(record: ImageTextRecord) -> dict[str, torch.Tensor]:
        whole = conversation or template != "plain"  # stage 1 (plain) learns the caption alone
        turns = record.turns if whole else (Turn("user", ""), Turn("assistant", record.caption))
        pieces: list[tuple[list[int], bool]] = []  # (ids, trained on)
        for turn in turns:
            # a conversation that opens with an answer gets an empty question
            if turn.role == "user" or not pieces:
                question = turn.text if turn.role == "user" else ""
                pieces.append((ids(user_text(question, template, not pieces, 1, image, bos)), False))
            if turn.role == "assistant":
                pieces.append(([*ids(answer_text(turn.text, template)), tokenizer.eos_token_id], True))
        flat = [i for piece, _ in pieces for i in piece][:max_length]
        labels = [i if trained else IGNORE_INDEX for piece, trained in pieces for i in piece][:max_length]
        return {"input_ids": torch.tensor(flat), "labels": torch.tensor(labels)}

    return encode
