"""The tower's dense auxiliary loss: cross entropy per attribute, summed; shapes that do not fit are refused."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from mmwb.train.cell_loss import CellHead


def test_cell_loss_is_the_sum_of_each_attributes_cross_entropy():
    torch.manual_seed(0)
    head = CellHead(16, [7, 5, 3])
    tokens = torch.randn(2, 9, 16)
    labels = torch.stack([torch.randint(0, k, (2, 9)) for k in (7, 5, 3)], dim=-1)
    logits = head.linear(tokens)
    expected = (
        F.cross_entropy(logits[..., :7].reshape(-1, 7), labels[..., 0].reshape(-1))
        + F.cross_entropy(logits[..., 7:12].reshape(-1, 5), labels[..., 1].reshape(-1))
        + F.cross_entropy(logits[..., 12:].reshape(-1, 3), labels[..., 2].reshape(-1))
    )
    torch.testing.assert_close(head.loss(tokens, labels), expected)


def test_labels_that_do_not_fit_the_tokens_are_refused():
    head = CellHead(16, [7, 5, 3])
    with pytest.raises(ValueError, match="do not fit"):
        head.loss(torch.randn(2, 9, 16), torch.zeros(2, 4, 3, dtype=torch.long))
