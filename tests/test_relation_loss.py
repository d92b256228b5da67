"""Relation targets: the two facts of a position question decide its answer, they land on the answer's query
position, and the head's loss is the binary cross entropy of a linear read of the stream entering its layer."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from mmwb.data.captions import ImageTextRecord, Turn
from mmwb.data.shapes import asked_relation, make_example
from mmwb.errors import MmwbConfigError, MmwbInputError
from mmwb.models.decoder.config import DecoderConfig
from mmwb.models.decoder.model import IGNORE_INDEX, DecoderForCausalLM
from mmwb.train.grounding import NO_POSITION
from mmwb.train.relation_loss import (
    RelationHead,
    RelationLossConfig,
    collate_relations,
    relation_facts,
    with_relations,
)


def test_the_two_facts_agree_exactly_when_the_answer_is_yes():
    counted = {True: 0, False: 0}
    for index in range(400):
        _, record = make_example(0, "train", index, practice=True)
        centres = np.array([[o["x"], o["y"]] for o in record["objects"]])
        for qa in record["qa"]:
            facts = relation_facts(qa["question"], tuple(qa.get("refers", ())), centres)
            assert (facts is not None) == (qa["type"] == "position"), qa
            if facts is not None:
                forward, before = facts
                assert (forward == before) == (qa["answer"] == "yes"), qa
                counted[forward] += 1
    assert min(counted.values()) > 20  # both directions asked, in two- and three-object scenes


def test_asked_relation_reads_axis_and_direction():
    assert asked_relation("is the red circle left of the blue star?") == (0, True)
    assert asked_relation("is the red circle right of the blue star?") == (0, False)
    assert asked_relation("is the red circle above the blue star?") == (1, True)
    assert asked_relation("is the red circle below the blue star?") == (1, False)
    assert asked_relation("what colour is the circle?") is None
    centres = np.array([[0.2, 0.9], [0.7, 0.1]])  # object 0 left of and below object 1
    assert relation_facts("is the a b above the c d?", (0, 1), centres) == (True, False)
    assert relation_facts("is the a b right of the c d?", (1, 0), centres) == (False, False)
    assert relation_facts("is there a red star?", (0,), centres) is None


def _encode(record):  # three tokens a user turn, two an answer
    ids, labels = [], []
    for turn in record.turns:
        user = turn.role == "user"
        ids += [5] * (3 if user else 2)
        labels += [IGNORE_INDEX] * 3 if user else [5, 5]
    return {"input_ids": torch.tensor(ids), "labels": torch.tensor(labels)}


def test_targets_sit_where_position_answers_are_predicted():
    centres = {"a.png": np.array([[0.8, 0.5], [0.2, 0.5]])}  # object 1 left of object 0
    record = ImageTextRecord(
        "a.png",
        (Turn("user", "how many shapes are there?"), Turn("assistant", "two"),
         Turn("user", "is the red star left of the blue circle?", refers=(0, 1)), Turn("assistant", "no"),
         Turn("user", "is the blue circle left of the red star?", refers=(1, 0)), Turn("assistant", "yes")),
    )  # fmt: skip
    item = with_relations(_encode, centres)(record)
    assert item["relation_pos"].tolist() == [7, 12]  # the last token of the 2nd and 3rd user turns
    assert item["relation_facts"].tolist() == [[1.0, 0.0], [1.0, 1.0]]
    plain = with_relations(_encode, centres)(ImageTextRecord("a.png", record.turns[:2]))
    assert plain["relation_pos"].shape == (0,) and plain["relation_facts"].shape == (0, 2)
    batch = collate_relations([item, plain])
    assert batch["relation_pos"].tolist() == [[7, 12], [NO_POSITION, NO_POSITION]]
    assert batch["relation_facts"].shape == (2, 2, 2) and not batch["relation_facts"][1].any()
    neither = collate_relations([plain, plain])  # a batch without position questions
    assert neither["relation_pos"].shape == (2, 0) and neither["relation_facts"].shape == (2, 0, 2)
    with pytest.raises(MmwbInputError, match="b.png: no objects listed"):
        with_relations(_encode, centres)(ImageTextRecord("b.png", record.turns))


def _decoder() -> DecoderForCausalLM:
    torch.manual_seed(0)
    config = DecoderConfig(vocab_size=40, hidden_size=32, num_layers=3, num_heads=4, num_kv_heads=2, head_dim=8,
                           intermediate_size=48, init="fan_in")  # fmt: skip
    model = DecoderForCausalLM(config)
    model.init_weights()
    return model


def test_relation_loss_reads_the_layer_input_and_training_lowers_it():
    model = _decoder()
    head = RelationHead(model, layer=2)
    entering = {}
    model.model.layers[2].register_forward_pre_hook(lambda _, args: entering.__setitem__("h", args[0]))
    ids = torch.randint(0, 40, (2, 10))
    image_start, image_tokens = torch.tensor([1, 1]), 4  # [bos, 4 image tokens, text ...] after widening
    positions = torch.tensor([[3, NO_POSITION], [4, 5]])  # before widening: 3 -> 6, 4 -> 7, 5 -> 8
    facts = torch.tensor([[[1.0, 0.0], [1.0, 1.0]], [[0.0, 0.0], [0.0, 1.0]]])
    with head.watching(model):
        model(ids)
    loss = head.loss(image_start, image_tokens, positions, facts)
    stream = entering["h"]
    logits = head.linear(torch.stack([stream[0, 6], stream[1, 7], stream[1, 8]]))
    expected = F.binary_cross_entropy_with_logits(logits, torch.tensor([[1.0, 0.0], [0.0, 0.0], [0.0, 1.0]]))
    torch.testing.assert_close(loss, expected)
    assert (
        len(model.model.layers[2]._forward_pre_hooks) == 1
    )  # the test's own hook: watching let go of its own
    for none in (
        torch.full((2, 2), NO_POSITION),
        torch.zeros((2, 0), dtype=torch.long),
    ):  # no position question
        empty = head.loss(image_start, image_tokens, none, facts[:, : none.shape[1]])
        assert empty.item() == 0.0 and empty.requires_grad  # still a term of the head, as DDP needs
    optimizer = torch.optim.AdamW([*model.parameters(), *head.parameters()], lr=1e-2)
    for _ in range(40):
        with head.watching(model):
            model(ids)
        step = head.loss(image_start, image_tokens, positions, facts)
        optimizer.zero_grad()
        step.backward()
        optimizer.step()
    assert step.item() < 0.2 * loss.item()


def test_bad_relation_settings_are_refused():
    with pytest.raises(MmwbConfigError, match="layer must be >= 1"):
        RelationLossConfig(layer=0)
    with pytest.raises(MmwbConfigError, match="weight must be >= 0"):
        RelationLossConfig(weight=-0.5)
    with pytest.raises(MmwbConfigError, match="layer 3 of a 3-layer decoder"):
        RelationHead(_decoder(), layer=3)
