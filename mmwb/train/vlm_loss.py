"""The VLM trainers' loss: next-token cross entropy on the labelled tokens (captions, assistant turns), one mean
per sequence, with the image features spliced in (or left out, for the text-only baseline)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from accelerate.utils import send_to_device

from mmwb.models.decoder.model import IGNORE_INDEX
from mmwb.models.vision.base import VisionFeatures
from mmwb.models.vlm import VisionLanguageModel
from mmwb.train.image_features import batch_features
from mmwb.train.multimodal import drop_image_tokens


def token_losses(
    vlm: VisionLanguageModel,
    batch: dict[str, torch.Tensor],
    with_images: bool = True,
    features: VisionFeatures | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Next-token cross entropy ``(B, T')`` over the positions from the first labelled one on, and which of them are
    labelled (``(B, T')`` bool). ``with_images=False`` is the text-only baseline: the same sequences with their
    ``<image>`` token removed. ``features``: the tower's output for the batch when the caller computed it already
    (by default it is read from the batch's cache entries or computed from its pixels)."""
    ids, mask, labels = batch["input_ids"], batch["attention_mask"], batch["labels"]
    if with_images:
        features = features if features is not None else batch_features(vlm, batch)
        inputs = vlm.prepare_inputs(ids, mask, labels, vision_features=features)
    else:
        inputs = vlm.prepare_inputs(*drop_image_tokens(ids, mask, labels, vlm.config.image_token_id))
    targets = F.pad(inputs["labels"], (0, 1), value=IGNORE_INDEX)[:, 1:]  # (B, T): the next token's label
    # the LM head runs only from the first position any row has a target at: not over the image tokens
    labelled = (targets != IGNORE_INDEX).any(0).nonzero()
    start = int(labelled[0]) if len(labelled) else targets.shape[1] - 1
    out = vlm.language_model(
        inputs_embeds=inputs["inputs_embeds"],
        attention_mask=inputs["attention_mask"],
        logits_to_keep=targets.shape[1] - start,
    )
    logits, targets = out.logits.float(), targets[:, start:]  # (B, T - start, V), (B, T - start)
    loss = F.cross_entropy(logits.transpose(1, 2), targets, ignore_index=IGNORE_INDEX, reduction="none")
    return loss, targets != IGNORE_INDEX


def sequence_losses(
    vlm: VisionLanguageModel,
    batch: dict[str, torch.Tensor],
    with_images: bool = True,
    features: VisionFeatures | None = None,
) -> torch.Tensor:
    """(B,) mean next-token cross entropy over each sequence's labelled tokens (0 for a sequence with none)."""
    loss, labelled = token_losses(vlm, batch, with_images, features)
    return loss.sum(1) / labelled.sum(1).clamp(min=1)


def multimodal_loss(
    vlm: VisionLanguageModel,
    batch: dict[str, torch.Tensor],
    average: str = "sequence",
    features: VisionFeatures | None = None,
) -> torch.Tensor:
    """The training loss on labelled tokens (captions or assistant turns).

    ``sequence`` (default): the mean over sequences of their mean token loss. Every sequence weighs the same
    whatever its length, so a batch split over processes (each averaging its own sequences, DDP averaging the
    processes) gives the same gradient as one process holding it all. ``token``: the mean over all labelled tokens
    of the batch, so a 20-token caption weighs ten times a 2-token answer (under DDP each process then weighs its
    own tokens by its own count)."""
    if average == "token":
        loss, labelled = token_losses(vlm, batch, features=features)
        return loss.sum() / labelled.sum().clamp(min=1)
    return sequence_losses(vlm, batch, features=features).mean()


@torch.no_grad()
def caption_losses(
    vlm: VisionLanguageModel, batch: dict[str, torch.Tensor], with_images: bool
) -> torch.Tensor:
    """(B,) per-sequence losses of ``vlm`` on a batch (moved to the projector's device)."""
    batch = send_to_device(batch, next(vlm.projector.parameters()).device)
    return sequence_losses(vlm, batch, with_images)
