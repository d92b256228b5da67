"""Edge F1 against hand-made edge maps, and the shapes CLIP tokenizer trained offline."""

import numpy as np
import pytest
from PIL import Image
from transformers import CLIPTokenizer

from mmwb.data.shapes import iter_split
from mmwb.models.diffusion.metrics import control_edges, edge_f1, image_edge_f1
from mmwb.models.diffusion.shapes_sd import train_clip_tokenizer


def square_outline(offset=0, size=32):
    edges = np.zeros((size, size), bool)
    lo, hi = 8 + offset, 20 + offset
    edges[lo, lo:hi] = edges[hi, lo:hi] = edges[lo:hi, lo] = edges[lo:hi, hi] = True
    return edges


def test_edge_f1_tolerates_one_pixel_and_not_more():
    reference = square_outline()
    assert edge_f1(reference, reference)["f1"] == 1.0
    assert edge_f1(square_outline(1), reference, tolerance=1.5)["f1"] == 1.0  # a diagonal pixel away
    assert edge_f1(square_outline(1), reference, tolerance=0)["f1"] < 0.2
    assert edge_f1(square_outline(6), reference)["f1"] < 0.3
    half = reference.copy()
    half[:, 14:] = False
    scores = edge_f1(half, reference)
    assert scores["precision"] == 1.0 and 0.3 < scores["recall"] < 0.7
    assert edge_f1(np.zeros_like(reference), reference)["f1"] == 0.0
    with pytest.raises(ValueError, match="differ in shape"):
        edge_f1(reference, reference[:-1])


def test_image_edge_f1_of_a_picture_against_its_own_canny_map_is_one():
    picture = np.full((32, 32, 3), 230, np.uint8)
    picture[8:20, 8:20] = (200, 20, 20)
    image = Image.fromarray(picture)
    condition = Image.fromarray((square_outline() * 255).astype(np.uint8))
    assert control_edges(condition).sum() == square_outline().sum()
    assert image_edge_f1(image, condition) > 0.9
    assert image_edge_f1(Image.fromarray(np.full((32, 32, 3), 230, np.uint8)), condition) == 0.0


def test_shapes_clip_tokenizer_has_one_token_per_word_and_round_trips(tmp_path):
    captions = [record["caption"] for _, record in iter_split(0, "train", 200)]
    tokenizer = train_clip_tokenizer(captions)
    ids = tokenizer("a large red circle left of a small blue star").input_ids
    assert len(ids) == 10 + 2  # ten words plus start and end markers
    assert tokenizer.decode(ids, skip_special_tokens=True) == "a large red circle left of a small blue star"
    assert tokenizer.decode(tokenizer("A Zebra!").input_ids, skip_special_tokens=True) == "a zebra !"
    tokenizer.save_pretrained(tmp_path)
    assert CLIPTokenizer.from_pretrained(tmp_path)(captions[0]).input_ids == tokenizer(captions[0]).input_ids
