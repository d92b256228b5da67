"""A VLM with InstructBLIP's Q-Former as its projector: each image is summarised by learned queries that read the
prompt beside it (never the answer), the same in training and generation; save/load, explicit
``qformer_input_ids`` and a stage-1 alignment run with a new Q-Former."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

from mmwb.data.tokenizer import IMAGE
from mmwb.errors import MmwbInputError
from mmwb.models.decoder.model import IGNORE_INDEX
from mmwb.models.projectors import QFormer, QFormerSize, make_projector
from mmwb.models.vlm import VisionLanguageModel, load_any_vlm
from mmwb.models.vlm.prompt import build_prompt, encode_prompts

sys.path.insert(0, str(Path(__file__).resolve().parent))
from vlm_fixtures import WIDTH, images, tiny_vlm  # noqa: E402
from vlm_train_fixtures import make_setup, tiny_train  # noqa: E402

QUERIES = 4


@pytest.fixture(scope="module")
def model() -> VisionLanguageModel:
    size = QFormerSize(hidden_size=32, num_layers=2, num_heads=2, intermediate_size=48, num_queries=QUERIES)

    def qformer(tokenizer) -> QFormer:
        projector = make_projector("qformer", WIDTH, WIDTH, len(tokenizer), tokenizer.pad_token_id, size)
        torch.nn.init.normal_(
            projector.query_tokens, std=1.0
        )  # distinct queries (a new Q-Former starts at zero)
        return projector

    return tiny_vlm(qformer)


def _training_rows(model, question: str, answers: list[str]):
    """One right-padded training batch: the chat prompt with ``question``, then each answer (the labels)."""
    tok = model.tokenizer
    prompt = tok(build_prompt(question, "chat"), add_special_tokens=False)["input_ids"]
    rows = [prompt + tok(" " + a, add_special_tokens=False)["input_ids"] for a in answers]
    width = max(map(len, rows))
    ids = torch.full((len(rows), width), tok.pad_token_id)
    mask = torch.zeros_like(ids)
    labels = torch.full_like(ids, IGNORE_INDEX)
    for i, row in enumerate(rows):
        ids[i, : len(row)] = torch.tensor(row)
        mask[i, : len(row)] = 1
        labels[i, len(prompt) : len(row)] = torch.tensor(row[len(prompt) :])
    return ids, mask, labels, prompt


def _image_block(model, **inputs) -> torch.Tensor:
    """The spliced image embeddings of each row, ``(B, QUERIES, D)``."""
    out = model.prepare_inputs(**inputs)
    is_image = out["input_ids"] == model.config.image_token_id
    return out["inputs_embeds"][is_image].view(-1, QUERIES, out["inputs_embeds"].shape[-1])


@torch.no_grad()
def test_the_queries_read_the_question_and_never_the_answer(model):
    pics = images((16, 16), (16, 16))
    ids, mask, labels, prompt = _training_rows(model, "what colour is the circle?", ["red", "a blue square"])
    instr_ids, instr_mask = model.image_instructions(ids, mask, labels, images=2)
    expected = torch.tensor([t for t in prompt if t != model.config.image_token_id])
    for row in range(2):  # the prompt without its image placeholder, not the answer
        assert torch.equal(instr_ids[row][instr_mask[row].bool()], expected)
    same = _image_block(model, input_ids=ids, attention_mask=mask, labels=labels, images=pics[:1] * 2)
    assert torch.equal(same[0], same[1])  # different answers, same image: the same image tokens
    other_q, other_mask, other_labels, _ = _training_rows(model, "is there a red star?", ["red"])
    other = _image_block(
        model, input_ids=other_q, attention_mask=other_mask, labels=other_labels, images=pics[:1]
    )
    assert (other[0] - same[0]).abs().max() > 1e-3  # another question extracts something else


@torch.no_grad()
def test_generation_reads_the_prompt_it_was_trained_on(model):
    ids, mask, labels, _ = _training_rows(model, "what colour is the circle?", ["red"])
    pics = images((16, 24))
    logits = model(input_ids=ids, attention_mask=mask, labels=labels, images=pics).logits
    prompt_length = int((labels[0] == IGNORE_INDEX).sum()) + QUERIES - 1  # the widened prompt
    prompt_ids, prompt_mask = encode_prompts(
        model.tokenizer, [build_prompt("what colour is the circle?", "chat")]
    )
    first = model.generate(prompt_ids, attention_mask=prompt_mask, images=pics, max_new_tokens=1,
                           new_tokens_only=True, eos_token_id=None)  # fmt: skip
    assert int(first[0, 0]) == int(logits[0, prompt_length - 1].argmax())


@torch.no_grad()
def test_multi_image_rows_share_their_prompt_and_explicit_ids_are_used(model):
    prompts = [build_prompt("what colour is the circle?", "chat"), build_prompt(None, "chat")]
    prompts[0] = prompts[0].replace(IMAGE, IMAGE * 2)
    ids, mask = encode_prompts(model.tokenizer, prompts)
    pics = images((16, 16), (8, 12), (12, 8))
    instr_ids, instr_mask = model.image_instructions(ids, mask, None, images=3)
    assert torch.equal(instr_ids[0], instr_ids[1]) and not torch.equal(instr_mask[1], instr_mask[2])
    derived = model(input_ids=ids, attention_mask=mask, images=pics).logits
    given = model(input_ids=ids, attention_mask=mask, images=pics,
                  qformer_input_ids=instr_ids, qformer_attention_mask=instr_mask).logits  # fmt: skip
    assert torch.equal(derived, given)
    swapped = model(input_ids=ids, attention_mask=mask, images=pics,
                    qformer_input_ids=instr_ids.flip(0), qformer_attention_mask=instr_mask.flip(0)).logits  # fmt: skip
    assert not torch.allclose(derived, swapped)
    with pytest.raises(MmwbInputError, match="needs each image's instruction"):
        model.image_embeddings(model.encode_images(model.process_images(pics)))


def test_save_load_round_trip(model, tmp_path):
    model.save_pretrained(tmp_path / "vlm")
    loaded = load_any_vlm(tmp_path / "vlm", device="cpu")
    assert isinstance(loaded.projector, QFormer) and loaded.projector.config == model.projector.config
    ids, mask = encode_prompts(model.tokenizer, [build_prompt("what colour is the circle?", "chat")] * 2)
    pics = images((16, 24), (8, 8))
    with torch.no_grad():
        assert torch.equal(
            model(input_ids=ids, images=pics).logits, loaded(input_ids=ids, images=pics).logits
        )
    a = model.generate(ids, attention_mask=mask, images=pics, max_new_tokens=5, new_tokens_only=True)
    b = loaded.generate(ids, attention_mask=mask, images=pics, max_new_tokens=5, new_tokens_only=True)
    assert torch.equal(a, b)


@pytest.mark.slow
def test_alignment_trains_a_new_qformer_and_nothing_else(tmp_path):
    from mmwb.train.align import AlignConfig, HealthConfig, train_align
    from mmwb.train.image_features import FeatureCacheConfig
    from mmwb.train.vlm_setup import starting_vlm

    setup = make_setup(tmp_path, n=16)
    size = QFormerSize(hidden_size=32, num_layers=1, num_heads=2, intermediate_size=32, num_queries=QUERIES)
    config = AlignConfig(data_dir=setup["data"], vision_dir=setup["vision"], decoder_dir=setup["decoder"],
                         projector="qformer", qformer=size, out_dir=tmp_path / "model", max_length=32,
                         feature_cache=FeatureCacheConfig(root=tmp_path / "cache"),
                         health=HealthConfig(max_items=8, retrieval_group=4),
                         train=tiny_train(tmp_path / "run", max_steps=2))  # fmt: skip
    vlm = starting_vlm(None, setup["vision"], setup["decoder"], "qformer", qformer=size)
    frozen = {k: v.clone() for k, v in vlm.state_dict().items() if not k.startswith("projector.")}
    before = {k: v.clone() for k, v in vlm.projector.state_dict().items()}
    train_align(config, vlm)
    assert all(torch.equal(vlm.state_dict()[k], v) for k, v in frozen.items())
    changed = [k for k, v in vlm.projector.state_dict().items() if not torch.equal(v, before[k])]
    assert "query_tokens" in changed and len(changed) > len(before) // 2
    aligned = load_any_vlm(config.out_dir)
    assert isinstance(aligned.projector, QFormer) and aligned.projector.config.num_queries == QUERIES
    assert all(
        torch.equal(aligned.projector.state_dict()[k], v) for k, v in vlm.projector.state_dict().items()
    )
