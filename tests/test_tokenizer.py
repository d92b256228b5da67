"""BPE tokenizers trained offline: round trips, special tokens kept whole, save and load through transformers."""

import subprocess
import sys

import pytest

from mmwb.data.shapes import iter_split
from mmwb.data.tokenizer import IMAGE, PAD, SPECIAL_TOKENS, load_tokenizer, train_bpe_tokenizer
from mmwb.errors import MmwbInputError


@pytest.fixture(scope="module")
def corpus():
    texts = []
    for _, record in iter_split(0, "train", 200):
        texts.append(record["caption"])
        texts += [f"{qa['question']} {qa['answer']}" for qa in record["qa"]]
    return texts


def test_round_trip_and_compression(corpus):
    tok = train_bpe_tokenizer(corpus, vocab_size=400)
    text = "a large red circle left of a small blue triangle"
    ids = tok(text).input_ids
    assert tok.decode(ids) == text
    assert len(ids) <= 12  # frequent words become single tokens
    assert len(tok) <= 400


def test_special_tokens_are_single_ids_and_padding_is_left(corpus):
    tok = train_bpe_tokenizer(corpus, vocab_size=400)
    assert tok.convert_tokens_to_ids(list(SPECIAL_TOKENS)) == list(range(len(SPECIAL_TOKENS)))
    ids = tok(f"{IMAGE}{IMAGE} what colour is the star?").input_ids
    assert ids[:2] == [tok.convert_tokens_to_ids(IMAGE)] * 2
    batch = tok(["a star", "a large red circle"], padding=True)
    assert batch.input_ids[0][0] == tok.convert_tokens_to_ids(PAD) and batch.attention_mask[0][0] == 0


def test_save_and_load_locally(corpus, tmp_path):
    tok = train_bpe_tokenizer(corpus, vocab_size=400)
    tok.save_pretrained(tmp_path)
    loaded = load_tokenizer(tmp_path)
    text = "is there a green star? no"
    assert loaded(text).input_ids == tok(text).input_ids and loaded.padding_side == "left"
    with pytest.raises(MmwbInputError, match="tokenizer folder not found"):
        load_tokenizer(tmp_path / "missing")


def test_loading_from_an_mmwb_model_folder_is_quiet():
    # a fresh process: transformers' log handler writes to the stderr it first saw, which pytest cannot capture
    from mmwb.pipelines.vlm import DEFAULT_MODEL

    code = (
        "from mmwb.data.tokenizer import IMAGE, load_tokenizer; "
        f"t = load_tokenizer({str(DEFAULT_MODEL)!r}); print(t.convert_tokens_to_ids(IMAGE) != t.unk_token_id)"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert done.stdout.strip() == "True"  # the folder's config.json says model_type mmwb_vlm
    assert "model of type" not in done.stderr
