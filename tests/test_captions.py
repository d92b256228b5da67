"""Image-text records (LLaVA JSON, caption JSONL, shapes QA), their token labels, and lazily read images."""

from __future__ import annotations

import json

import pytest
import torch
from PIL import Image

from mmwb.data.captions import ImageTextDataset, Turn, read_records, split_turns
from mmwb.data.tokenizer import ASSISTANT, train_bpe_tokenizer
from mmwb.errors import MmwbInputError
from mmwb.models.vlm.prompt import make_encoder
from mmwb.train.data import BadItem, SkipBadItems, skip_bad_items
from mmwb.train.multimodal import IGNORE_INDEX, collate, drop_image_tokens

LLAVA = [
    {
        "id": "0",
        "image": "a.png",
        "conversations": [
            {"from": "human", "value": "<image>\nwhat colour is the square?"},
            {"from": "gpt", "value": "red"},
            {"from": "human", "value": "how many shapes?"},
            {"from": "gpt", "value": "two"},
        ],
    }
]


@pytest.fixture(scope="module")
def tokenizer():
    return train_bpe_tokenizer(["what colour is the square? red how many shapes? two a red square"] * 4, 300)


def test_llava_json_and_caption_jsonl(tmp_path):
    (tmp_path / "llava.json").write_text(json.dumps(LLAVA))
    record = read_records(tmp_path / "llava.json")[0]
    assert record.image == "a.png"
    assert record.turns[0] == Turn(
        "user", "what colour is the square?"
    )  # the placeholder is the format's job
    assert record.caption == "red"
    lines = [{"image": "b.png", "caption": "a red square", "qa": [{"question": "q?", "answer": "a"}]}]
    (tmp_path / "c.jsonl").write_text("\n".join(json.dumps(x) for x in lines) + "\n")
    assert read_records(tmp_path / "c.jsonl")[0].caption == "a red square"
    assert [t.text for t in read_records(tmp_path / "c.jsonl", prefer="qa")[0].turns] == ["q?", "a"]


def test_bad_records_name_the_file_and_record(tmp_path):
    (tmp_path / "x.jsonl").write_text(
        json.dumps({"image": "a.png", "caption": "ok"}) + "\n" + json.dumps({"img": 1})
    )
    with pytest.raises(MmwbInputError, match=r"x.jsonl:2: a record needs an 'image'"):
        read_records(tmp_path / "x.jsonl")
    (tmp_path / "y.json").write_text(
        json.dumps([{"image": "a.png", "conversations": [{"from": "human", "value": "hi"}]}])
    )
    with pytest.raises(MmwbInputError, match=r"y.json\[0\]: the conversation has no assistant"):
        read_records(tmp_path / "y.json")


def test_plain_format_labels_only_the_caption(tokenizer, tmp_path):
    (tmp_path / "llava.json").write_text(json.dumps(LLAVA))
    record = read_records(tmp_path / "llava.json")[0]
    item = make_encoder(tokenizer, "plain", 64)(record)
    ids, labels = item["input_ids"].tolist(), item["labels"].tolist()
    assert ids[:2] == [tokenizer.bos_token_id, tokenizer.convert_tokens_to_ids("<image>")]
    trained = [i for i, label in zip(ids, labels) if label != IGNORE_INDEX]
    assert tokenizer.decode(trained) == "red<|eos|>"
    assert all(label in (IGNORE_INDEX, i) for i, label in zip(ids, labels))


def test_chat_format_labels_only_assistant_turns(tokenizer, tmp_path):
    (tmp_path / "llava.json").write_text(json.dumps(LLAVA))
    item = make_encoder(tokenizer, "chat", 64)(read_records(tmp_path / "llava.json")[0])
    ids, labels = item["input_ids"], item["labels"]
    assert tokenizer.decode(ids) == (
        "<|bos|><|user|><image>what colour is the square?<|assistant|> red<|eos|>"
        "<|user|>how many shapes?<|assistant|> two<|eos|>"
    )
    assert tokenizer.decode(ids[labels != IGNORE_INDEX]) == " red<|eos|> two<|eos|>"
    # the answer is one word token, as in "... square? red" (no bare-word splitting into rare pieces)
    assert len(tokenizer(" red", add_special_tokens=False).input_ids) == 1
    assistant = tokenizer.convert_tokens_to_ids(ASSISTANT)
    assert labels[ids == assistant].eq(IGNORE_INDEX).all()


def test_text_only_baseline_drops_the_image_token(tokenizer, tmp_path):
    (tmp_path / "llava.json").write_text(json.dumps(LLAVA))
    short = make_encoder(tokenizer, "plain", 64)(read_records(tmp_path / "llava.json")[0])
    long = make_encoder(tokenizer, "chat", 64)(read_records(tmp_path / "llava.json")[0])
    batch = collate([short | {"features": torch.ones(3, 4)}, long | {"features": torch.ones(3, 4)}], 0)
    image = tokenizer.convert_tokens_to_ids("<image>")
    ids, mask, labels = drop_image_tokens(batch["input_ids"], batch["attention_mask"], batch["labels"], image)
    assert mask.sum(1).tolist() == [len(short["input_ids"]) - 1, len(long["input_ids"]) - 1]
    assert not (ids == image).any()
    assert ids[0, : mask[0].sum()].tolist() == [i for i in short["input_ids"].tolist() if i != image]
    assert labels[1, : mask[1].sum()].tolist() == long["labels"][long["input_ids"] != image].tolist()
    assert batch["features"].shape == (2, 3, 4) and batch["token_counts"].tolist() == [3, 3]


def test_images_are_read_per_item_and_broken_ones_are_skipped_by_name(tmp_path):
    Image.new("RGB", (8, 8), "red").save(tmp_path / "good.png")
    (tmp_path / "broken.png").write_bytes(b"\x89PNG garbage")
    lines = [{"image": name, "caption": "x"} for name in ("good.png", "broken.png", "missing.png")]
    (tmp_path / "d.jsonl").write_text("\n".join(json.dumps(x) for x in lines))
    opened = []

    def load(path):
        from mmwb.data.io import load_image

        opened.append(path.name)
        return {"pixel_values": torch.as_tensor(list(load_image(path).getpixel((0, 0))))[None]}

    dataset = SkipBadItems(ImageTextDataset(read_records(tmp_path / "d.jsonl"), tmp_path, load, lambda r: {}))
    assert opened == []  # nothing decoded up front
    items = [dataset[i] for i in range(3)]
    assert opened == ["good.png", "broken.png", "missing.png"]
    assert [type(item) for item in items[1:]] == [BadItem, BadItem]
    batch = skip_bad_items()(items)
    assert batch.data["pixel_values"].tolist() == [[[255, 0, 0]]]
    assert len(batch.skipped) == 2
    assert "broken.png" in batch.skipped[0] and "missing.png" in batch.skipped[1]


def test_split_turns_gives_every_question_the_first_position(tmp_path):
    (tmp_path / "llava.json").write_text(json.dumps(LLAVA))
    records = split_turns(read_records(tmp_path / "llava.json"))
    assert [[(t.role, t.text) for t in r.turns] for r in records] == [
        [("user", "what colour is the square?"), ("assistant", "red")],
        [("user", "how many shapes?"), ("assistant", "two")],
    ]
    assert {r.image for r in records} == {"a.png"}


@pytest.mark.parametrize("template", ["plain", "chat"])
def test_training_sequences_start_with_the_generation_prompt(tokenizer, tmp_path, template):
    """Training and generation share one prompt format: a training sequence's first unlabelled stretch is exactly
    the ids generation prompts the model with, so a trained model is asked the way it learned."""
    from mmwb.models.vlm.prompt import build_prompt, encode_prompts

    (tmp_path / "llava.json").write_text(json.dumps(LLAVA))
    record = read_records(tmp_path / "llava.json")[0]
    item = make_encoder(tokenizer, template, 64)(record)
    question = None if template == "plain" else record.turns[0].text
    prompt, _ = encode_prompts(tokenizer, [build_prompt(question, template)])
    first_label = int((item["labels"] != IGNORE_INDEX).nonzero()[0])
    assert item["input_ids"][: len(prompt[0])].tolist() == prompt[0].tolist()
    assert len(prompt[0]) == first_label


def test_an_empty_question_asks_for_a_caption_as_none_does():
    from mmwb.models.vlm.prompt import build_prompt

    for template in ("plain", "chat"):
        assert build_prompt("", template) == build_prompt(None, template)
    assert build_prompt(None, "chat") == "<|bos|><|user|><image>describe the image<|assistant|>"


def test_draw_questions_gives_each_image_its_caption_and_random_questions_equally(tmp_path):
    from mmwb.data.captions import draw_questions

    (tmp_path / "llava.json").write_text(json.dumps(LLAVA * 3))
    conversations = read_records(tmp_path / "llava.json")  # 3 images, 2 question-answer pairs each
    caption = read_records(tmp_path / "llava.json")[0]
    caption = type(caption)(
        caption.image, (Turn("user", "describe the image"), Turn("assistant", "a red square"))
    )
    drawn = draw_questions([*conversations, caption], draws=4, seed=0)
    assert len(drawn) == 4 * 4 and all(len(r.turns) == 2 for r in drawn)
    assert drawn[12:] == [caption] * 4  # a one-turn record: repeated
    pairs = {(r.turns[0].text, r.turns[1].text) for r in drawn[:12]}
    assert pairs == {("what colour is the square?", "red"), ("how many shapes?", "two")}  # drawn from both
    assert draw_questions(conversations, 4, seed=0) == drawn[:12]  # seeded: the same records again
    assert draw_questions(conversations, 4, seed=1) != drawn[:12]


def test_question_weights_draw_the_named_types_more_often_and_zero_never(tmp_path):
    from mmwb.data.captions import draw_questions
    from mmwb.data.shapes import write_dataset

    write_dataset(tmp_path, 40, seed=0, size=32, n_eval=0, progress=False)
    records = read_records(tmp_path / "train.jsonl", prefer="qa")
    kinds = {t.kind for r in records for t in r.turns if t.role == "user"}
    assert kinds == {"count", "colour", "shape", "position", "yesno"}  # the shapes QA types reach the turns

    def share(weights):
        drawn = draw_questions(records, draws=20, seed=0, weights=weights)
        return sum(r.turns[0].kind == "position" for r in drawn) / len(drawn)

    assert share({"position": 0.0}) == 0.0
    assert share({"position": 8.0}) > 2 * share(None) > 0
    with pytest.raises(MmwbInputError, match="question weights"):
        draw_questions(records, 2, seed=0, weights={"position": -1.0})


def test_several_questions_per_record_are_different_pairs_of_the_same_image(tmp_path):
    from mmwb.data.captions import draw_questions, split_turns
    from mmwb.data.shapes import write_dataset

    write_dataset(tmp_path, 40, seed=0, size=32, n_eval=0, progress=False)
    records = read_records(tmp_path / "train.jsonl", prefer="qa")
    drawn = draw_questions(records, draws=3, seed=0, weights={"position": 4.0}, per_record=3)
    assert len(drawn) == 3 * len(records)
    for i, record in enumerate(records):
        own = {(p.turns[0], p.turns[1]) for p in split_turns([record])}
        for got in drawn[3 * i : 3 * i + 3]:
            pairs = [(p.turns[0], p.turns[1]) for p in split_turns([got])]
            assert got.image == record.image and len(got.turns) == 2 * len(pairs)
            assert len(set(pairs)) == len(pairs) == min(3, len(own)) and set(pairs) <= own
    assert draw_questions(records, 3, seed=0, weights={"position": 4.0}, per_record=3) == drawn
    never = draw_questions(records, 3, seed=0, weights={"position": 0.0}, per_record=3)
    assert not any(t.kind == "position" for r in never for t in r.turns)
    with pytest.raises(MmwbInputError, match="at least 1"):
        draw_questions(records, 2, seed=0, per_record=0)


def test_question_first_template_puts_the_image_after_the_first_question_only():
    from mmwb.models.vlm.prompt import build_prompt

    assert build_prompt("what colour is the circle?", "chat_question_first") == (
        "<|bos|><|user|>what colour is the circle?<image><|assistant|>"
    )
    assert (
        build_prompt(None, "chat_question_first") == "<|bos|><|user|>describe the image<image><|assistant|>"
    )
    tokenizer = train_bpe_tokenizer(["what colour is the circle? red", "how many shapes? two"], 300)
    record = read_records_from([("what colour is the circle?", "red"), ("how many shapes?", "two")])
    item = make_encoder(tokenizer, "chat_question_first", 64)(record)
    text = tokenizer.decode(item["input_ids"])
    assert text == (
        "<|bos|><|user|>what colour is the circle?<image><|assistant|> red<|eos|>"
        "<|user|>how many shapes?<|assistant|> two<|eos|>"
    )
    trained = tokenizer.decode(item["input_ids"][item["labels"] != -100])
    assert trained == " red<|eos|> two<|eos|>"


def read_records_from(pairs):
    from mmwb.data.captions import ImageTextRecord

    turns = tuple(Turn(role, text) for q, a in pairs for role, text in (("user", q), ("assistant", a)))
    return ImageTextRecord("x.png", turns)
