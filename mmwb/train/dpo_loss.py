"""The DPO family's losses on sequence log-probabilities, with trl's definitions (``DPOTrainer``, trl 1.x).

``logits = (policy_chosen - reference_chosen) - (policy_rejected - reference_rejected)``, the implicit reward
margin over ``beta``; per pair:
- ``sigmoid`` (DPO): ``-log sigmoid(beta * logits)``; with ``label_smoothing`` ``e`` the conservative DPO of the
  paper's appendix, ``-(1 - e) log sigmoid(beta * logits) - e log sigmoid(-beta * logits)`` (preferences flipped
  with probability ``e``; trl 0.x's sigmoid loss);
- ``ipo``: ``(logits - 1 / (2 beta))^2``, on per-token *average* log-probabilities as trl computes it (pass those);
- ``hinge`` (SLiC): ``relu(1 - beta * logits)``.
Rewards are ``beta * (policy - reference)`` log-probabilities, detached.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from mmwb.errors import MmwbConfigError

LOSS_TYPES = ("sigmoid", "ipo", "hinge")


def dpo_loss(
    policy_chosen_logps: torch.Tensor,
    policy_rejected_logps: torch.Tensor,
    ref_chosen_logps: torch.Tensor,
    ref_rejected_logps: torch.Tensor,
    beta: float = 0.1,
    loss_type: str = "sigmoid",
    label_smoothing: float = 0.0,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(losses, chosen_rewards, rejected_rewards)``, each ``(P,)`` for ``P`` pairs of ``(P,)`` log-probs."""
    if loss_type not in LOSS_TYPES:
        raise MmwbConfigError(f"loss_type {loss_type!r} is not one of {LOSS_TYPES}")
    if beta <= 0:
        raise MmwbConfigError(f"beta must be positive, not {beta}")
    if not 0.0 <= label_smoothing < 0.5:
        raise MmwbConfigError(f"label_smoothing must be in [0, 0.5), not {label_smoothing}")
    if label_smoothing and loss_type != "sigmoid":
        raise MmwbConfigError("label_smoothing (conservative DPO) applies to loss_type sigmoid only")
    chosen_ratio = policy_chosen_logps - ref_chosen_logps
    rejected_ratio = policy_rejected_logps - ref_rejected_logps
    logits = chosen_ratio - rejected_ratio
    if loss_type == "sigmoid":
        losses = -F.logsigmoid(beta * logits) * (1 - label_smoothing)
        if label_smoothing:
            losses = losses - F.logsigmoid(-beta * logits) * label_smoothing
    elif loss_type == "ipo":
        losses = (logits - 1 / (2 * beta)) ** 2
    else:
        losses = torch.relu(1 - beta * logits)
    return losses, beta * chosen_ratio.detach(), beta * rejected_ratio.detach()
