"""Attention supervision: the named objects of each question, its answer's query position, the attention a head
pays to their cells (against a from-scratch computation), and a loss that training lowers."""

from __future__ import annotations

import re

import numpy as np
import pytest
import torch

from mmwb.data.captions import ImageTextRecord, Turn
from mmwb.data.shapes import (
    Shape,
    caption_words,
    make_example,
    naming_ends,
    object_cells,
    practice_questions,
    sample_scene,
)
from mmwb.errors import MmwbConfigError, MmwbInputError
from mmwb.models.decoder.config import DecoderConfig
from mmwb.models.decoder.model import IGNORE_INDEX, DecoderForCausalLM
from mmwb.models.decoder.rope import apply_rope
from mmwb.models.vlm.prompt import caption_question, user_text
from mmwb.train.grounding import (
    NO_POSITION,
    AttentionTap,
    GroundingConfig,
    answer_query_positions,
    collate_grounding,
    grounding_loss,
    with_grounding,
)


def _named(question: str, obj: dict) -> bool:
    return (
        f"{obj['colour']} {obj['shape']}" in question
        or f" {obj['shape']}?" in question
        or (f" {obj['colour']} object" in question)
    )


def test_questions_name_the_objects_they_refer_to_in_order():
    seen = set()
    for index in range(300):
        _, record = make_example(0, "train", index, practice=True)
        objects = record["objects"]
        for qa in record["qa"]:
            refers = qa.get("refers", [])
            seen.add((qa["type"], len(refers)))
            assert all(_named(qa["question"], objects[i]) for i in refers), qa
            if qa["type"] == "position":  # A then B, as the question names them
                a, b = (f"{objects[i]['colour']} {objects[i]['shape']}" for i in refers)
                assert qa["question"].index(a) < qa["question"].index(b, len("is the " + a))
            if qa["type"] == "yesno":
                assert (qa["answer"] == "yes") == bool(refers)
    assert {("colour", 1), ("shape", 1), ("position", 2), ("yesno", 1), ("yesno", 0), ("count", 0)} <= seen


def test_practice_position_questions_refer_to_both_objects():
    rng = np.random.default_rng(0)
    found = 0
    while found < 20:
        scene = sample_scene(rng)
        for qa in practice_questions(scene, rng):
            if qa["type"] == "position":
                found += 1
                first, second = (scene.objects[i] for i in qa["refers"])
                assert qa["question"].startswith(f"is the {first.colour} {first.shape} ")
                assert qa["question"].endswith(f"the {second.colour} {second.shape}?")


def test_object_cells_cover_the_disc_of_each_object():
    objects = [
        {"shape": "circle", "colour": "red", "size": "large", "x": 0.25, "y": 0.75},
        {"shape": "square", "colour": "blue", "size": "small", "x": 0.8, "y": 0.2},
    ]
    cells = object_cells(objects, 8).reshape(2, 8, 8)  # (object, row, col)
    assert cells[0, 6, 2] and not cells[0, 1, 6] and cells[1, 1, 6] and not cells[1, 6, 2]
    assert object_cells([], 8).shape == (0, 64)


def test_answer_query_positions_are_the_tokens_before_each_answer():
    labels = torch.tensor([IGNORE_INDEX] * 5 + [7, 8] + [IGNORE_INDEX] * 3 + [9] + [IGNORE_INDEX])
    assert answer_query_positions(labels) == [4, 9]


def test_naming_words_are_found_in_order():
    red, blue = (Shape("circle", c, "small", 0.5, 0.5) for c in ("red", "blue"))
    question = "is the red circle left of the blue circle?"
    assert [question[:e] for e in naming_ends(question, [red, blue])] == [
        "is the red circle",
        "is the red circle left of the blue circle",
    ]
    for question, obj, named in (
        ("what shape is the blue object?", blue, "what shape is the blue"),
        ("what colour is the circle?", red, "what colour is the circle"),
    ):
        assert [question[:e] for e in naming_ends(question, [obj])] == [named]
    twins = "is there a red circle?"  # two red circles: one word names both
    assert naming_ends(twins, [red, red]) == [len("is there a red circle")] * 2
    with pytest.raises(ValueError, match="does not name the blue circle"):
        naming_ends("is there a red square?", [blue])


class _WordTokenizer:
    """Splits on spaces, keeping each word's leading space, and on "?": one token per piece, like the BPE."""

    def __call__(self, text, add_special_tokens=False):
        pieces = re.findall(r"<[^>]+>| ?[a-z]+|[?,]", text)
        return type("Encoding", (), {"input_ids": list(range(len(pieces)))})


def _encoder(tokenizer, max_length=None):
    def encode(record):  # as make_encoder: each user turn's text, then " answer" and an end token
        ids, labels = [], []
        for n, turn in enumerate(record.turns):
            text = user_text(turn.text, "chat", n == 0) if turn.role == "user" else " " + turn.text + "<e>"
            count = len(tokenizer(text).input_ids)
            ids += [5] * count
            labels += [IGNORE_INDEX] * count if turn.role == "user" else [5] * count
        return {"input_ids": torch.tensor(ids[:max_length]), "labels": torch.tensor(labels[:max_length])}

    return encode


def test_each_naming_word_gets_its_position_and_the_cells_of_its_object():
    cells = {"a.png": np.eye(3, 6, dtype=bool)}  # three objects, six cells
    tokenizer = _WordTokenizer()
    encode = _encoder(tokenizer)
    q1, q2 = "what colour is the circle?", "is the red circle left of the blue star?"
    record = ImageTextRecord(
        "a.png",
        (Turn("user", q1, refers=(2,), anchors=(25,)), Turn("assistant", "red"),
         Turn("user", q2, refers=(1, 0), anchors=(17, 39)), Turn("assistant", "no"),
         Turn("user", "how many shapes are there?"), Turn("assistant", "three")),
    )  # fmt: skip
    item = with_grounding(encode, cells, tokenizer, "chat", "<image>", "<|bos|>")(record)
    # [<|bos|> <|user|> <image> what colour is the circle ? <|assistant|>] = 0..9, " red" "<e>" = 10, 11,
    # [<|user|> is the red circle left of the blue star ? <|assistant|>] = 12..23
    assert item["ground_pos"].tolist() == [7, 9, 16, 23, 21, 23]  # words (role 0), answers (role r + 1)
    assert item["ground_role"].tolist() == [0, 1, 0, 1, 0, 2]
    rows = cells["a.png"]
    assert item["ground_cells"].tolist() == [rows[i].tolist() for i in (2, 2, 1, 1, 0, 0)]
    twins = ImageTextRecord("a.png", (Turn("user", "is there a red star?", refers=(0, 2), anchors=(19, 19)),
                                      Turn("assistant", "yes")))  # fmt: skip
    both = with_grounding(encode, cells, tokenizer, "chat", "<image>", "<|bos|>")(twins)
    assert both["ground_pos"].tolist() == [7, 9, 9] and both["ground_role"].tolist() == [0, 1, 2]
    assert both["ground_cells"][0].tolist() == [1, 0, 1, 0, 0, 0]  # one word names both
    short = {key: value[:1] for key, value in item.items() if key.startswith("ground_")}
    batch = collate_grounding([item, {**item, **short}])
    assert batch["ground_pos"].tolist() == [[7, 9, 16, 23, 21, 23], [7] + [NO_POSITION] * 5]
    assert batch["ground_role"][1].tolist() == [0] * 6
    assert batch["ground_cells"].shape == (2, 6, 6) and not batch["ground_cells"][1, 1:].any()


def test_each_caption_word_is_predicted_looking_at_the_object_it_describes():
    cells = {"a.png": np.eye(2, 6, dtype=bool)}
    tokenizer = _WordTokenizer()
    caption = "a small red circle, a large blue star"
    question = Turn("user", caption_question("chat"), kind="caption")
    record = ImageTextRecord("a.png", (question, Turn("assistant", caption)))
    grounded = {"template": "chat", "image": "<image>", "bos": "<|bos|>", "captions": True}
    item = with_grounding(_encoder(tokenizer), cells, tokenizer, **grounded)(record)
    end = answer_query_positions(item["labels"])[0]
    # answer tokens " a" " small" " red" " circle" "," " a" " large" ...: each word is predicted one position before
    assert item["ground_pos"].tolist() == [end + k for k in (0, 1, 2, 3, 5, 6, 7, 8)]
    assert item["ground_role"].tolist() == [1] * 8  # the first answer head's look
    rows = cells["a.png"].tolist()
    assert item["ground_cells"].tolist() == [rows[0]] * 4 + [rows[1]] * 4
    cut = with_grounding(_encoder(tokenizer, end + 7), cells, tokenizer, **grounded)(record)
    assert cut["ground_pos"].tolist() == [end + k for k in (0, 1, 2, 3, 5, 6)]  # what max_length kept
    three = {"a.png": np.eye(3, 6, dtype=bool)}
    with pytest.raises(MmwbInputError, match="names 2 objects, its image lists 3"):
        with_grounding(_encoder(tokenizer), three, tokenizer, **grounded)(record)
    plain = with_grounding(_encoder(tokenizer), cells, tokenizer, **(grounded | {"captions": False}))(record)
    assert plain["ground_pos"].shape == (0,)  # captions are grounded only when asked


def test_caption_words_follow_the_objects_of_every_generated_caption():
    for index in range(200):
        _, record = make_example(0, "train", index)
        caption, words = record["caption"], caption_words(record["caption"])
        assert len(words) == len(record["objects"])
        for starts, obj in zip(words, record["objects"], strict=True):
            said = [caption[start:].split()[0].rstrip(",") for start in starts]
            assert said == ["a", obj["size"], obj["colour"], obj["shape"]]


def _decoder(qk_norm: bool = False) -> DecoderForCausalLM:
    torch.manual_seed(0)
    config = DecoderConfig(vocab_size=40, hidden_size=32, num_layers=2, num_heads=4, num_kv_heads=2, head_dim=8,
                           intermediate_size=48, qk_norm=qk_norm, init="fan_in")  # fmt: skip
    model = DecoderForCausalLM(config)
    model.init_weights()
    return model


@pytest.mark.parametrize("qk_norm", [False, True])
def test_attention_probabilities_match_a_full_computation(qk_norm):
    model = _decoder(qk_norm)
    attention = model.model.layers[1].self_attn
    with AttentionTap(model, [(1, 0)]) as tap:
        model(torch.randint(0, 40, (3, 12)))
    x, rope = tap.inputs[1]
    queries = torch.tensor([[3, 11], [0, 5], [7, 7]])
    probs = attention.probabilities(x, rope, queries)  # (B, H, K, T)
    b, t = x.shape[:2]
    q = attention.q_proj(x).view(b, t, 4, 8)
    k = attention.k_proj(x).view(b, t, 2, 8)
    if qk_norm:
        q, k = attention.q_norm(q), attention.k_norm(k)
    q = apply_rope(q.transpose(1, 2), *rope)
    k = apply_rope(k.transpose(1, 2), *rope).repeat_interleave(2, dim=1)
    scores = (q @ k.transpose(-1, -2)) * attention.scale
    full = scores.masked_fill(~torch.ones(t, t, dtype=torch.bool).tril(), float("-inf")).softmax(-1)
    expected = torch.stack([full[i, :, queries[i]] for i in range(b)])
    torch.testing.assert_close(probs, expected)
    assert torch.allclose(probs.sum(-1), torch.ones(3, 4, 2))
    assert (probs[0, :, 0, 4:] == 0).all()  # causal: query 3 sees keys 0..3


def test_grounding_loss_is_minus_log_attention_mass_and_training_raises_the_mass():
    model = _decoder()
    config = GroundingConfig(heads=[(1, 0)], answer_heads=[(0, 3)])
    image_start, image_tokens = torch.tensor([1, 1]), 4  # [bos, 4 image tokens, text...] after widening
    positions = torch.tensor([[3, NO_POSITION], [4, 2]])  # before widening: 3 -> 6, 4 -> 7, 2 -> 5
    roles = torch.tensor([[0, 0], [0, 1]])  # row 1's second entry: the answer head's
    cells = torch.zeros(2, 2, 4, dtype=torch.bool)
    cells[0, 0, 1] = True  # row 0: its word looks at image token 1 (sequence position 2)
    cells[1, 0, 3] = cells[1, 0, 0] = True
    cells[1, 1, 2] = True
    cells[0, 1, 0] = True  # under padding: ignored
    ids = torch.randint(0, 40, (2, 10))
    with AttentionTap(model, [(1, 0), (0, 3)]) as tap:
        model(ids)
    loss = grounding_loss(tap, config, image_start, image_tokens, positions, roles, cells)
    at = torch.tensor([[6, 7], [7, 5]])
    p1 = model.model.layers[1].self_attn.probabilities(*tap.inputs[1], at)[:, 0]  # (B, M, T)
    p0 = model.model.layers[0].self_attn.probabilities(*tap.inputs[0], at)[:, 3]
    expected = -torch.log(torch.stack([p1[0, 0, 2], p1[1, 0, 4] + p1[1, 0, 1], p0[1, 1, 3]])).mean()
    torch.testing.assert_close(loss, expected)
    # a word before the image cannot look at it: not supervised
    before = torch.tensor([[3, 2], [4, 1]])
    assert grounding_loss(tap, config, torch.tensor([5, 5]), image_tokens, before, roles, cells).item() == 0.0
    nothing = torch.zeros((2, 0), dtype=torch.long)  # a batch in which no question names an object
    assert (
        grounding_loss(tap, config, image_start, image_tokens, nothing, nothing, cells[:, :0]).item() == 0.0
    )
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    for _ in range(30):
        with AttentionTap(model, [(1, 0), (0, 3)]) as tap:
            model(ids)
        step = grounding_loss(tap, config, image_start, image_tokens, positions, roles, cells)
        optimizer.zero_grad()
        step.backward()
        optimizer.step()
    assert step.item() < 0.2 * loss.item()


def test_bad_grounding_settings_are_refused():
    model = _decoder()
    with pytest.raises(MmwbConfigError, match="layer 2 of a 2-layer decoder"):
        AttentionTap(model, [(2, 0)])
    with pytest.raises(MmwbConfigError, match="head 4 of a 4-head layer 1"):
        AttentionTap(model, [(1, 4)])
    with pytest.raises(MmwbConfigError, match="lists of \\[layer, head\\] pairs"):
        GroundingConfig(heads=[(1,)])
    with pytest.raises(MmwbConfigError, match="lists of \\[layer, head\\] pairs"):
        GroundingConfig(heads=[], answer_heads=[])
    with pytest.raises(MmwbConfigError, match="weight must be >= 0"):
        GroundingConfig(weight=-1.0)
    with pytest.raises(MmwbConfigError, match="captions supervises the first of answer_heads"):
        GroundingConfig(captions=True)
