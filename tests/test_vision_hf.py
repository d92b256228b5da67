"""transformers CLIP / SigLIP towers: the chosen layer equals transformers' own hidden states."""

import json

import pytest
import torch
from PIL import Image
from transformers import (
    CLIPImageProcessor,
    CLIPVisionConfig,
    CLIPVisionModel,
    SiglipImageProcessor,
    SiglipVisionConfig,
    SiglipVisionModel,
)

from mmwb.errors import MmwbCheckpointError, MmwbConfigError
from mmwb.models.vision import FixedSizeImageProcessor, PixelInputs
from mmwb.models.vision.hf import HFVisionTower, vision_model_from_config

SIZES = dict(
    hidden_size=32,
    intermediate_size=37,
    num_hidden_layers=3,
    num_attention_heads=2,
    image_size=32,
    patch_size=8,
)


@pytest.fixture(scope="module", params=["clip", "siglip"])
def checkpoint(request, tmp_path_factory):
    config_class, model_class = {
        "clip": (CLIPVisionConfig, CLIPVisionModel),
        "siglip": (SiglipVisionConfig, SiglipVisionModel),
    }[request.param]
    torch.manual_seed(0)
    reference = model_class(config_class(**SIZES)).eval()
    with torch.no_grad():
        for param in reference.parameters():
            param.add_(0.05 * torch.randn_like(param))
    path = tmp_path_factory.mktemp(request.param)
    reference.save_pretrained(path)
    return request.param, path, reference


@pytest.mark.parametrize("select_layer", [-2, -1, 1])
def test_selected_layer_matches_transformers(checkpoint, select_layer):
    family, path, reference = checkpoint
    images = torch.randn(2, 3, 32, 32)
    tower = HFVisionTower.from_pretrained(path, select_layer=select_layer)
    with torch.no_grad():
        expected = reference(pixel_values=images, output_hidden_states=True).hidden_states[select_layer]
        features = tower.encode(PixelInputs(images))
    if family == "clip":
        expected = expected[:, 1:]  # LLaVA drops CLS
    assert features.features.shape == (2, 16, 32) and features.token_counts == [16, 16]
    assert features.grid_hw == [(4, 4), (4, 4)]
    assert (features.features - expected).abs().max() <= 1e-5


def test_keeping_cls_and_final_norm(checkpoint):
    family, path, reference = checkpoint
    images = torch.randn(1, 3, 32, 32)
    tower = HFVisionTower.from_pretrained(path, select_layer=-1, drop_cls=False, final_norm=True)
    with torch.no_grad():
        hidden = reference(pixel_values=images, output_hidden_states=True).hidden_states[-1]
        expected = reference.post_layernorm(hidden)
        features = tower.encode(PixelInputs(images)).features
    assert features.shape[1] == (17 if family == "clip" else 16)
    assert (features - expected).abs().max() <= 1e-5


def test_preprocessor_config_sets_mean_and_std(checkpoint, tmp_path):
    _, path, reference = checkpoint
    reference.save_pretrained(tmp_path)
    (tmp_path / "preprocessor_config.json").write_text(
        json.dumps({"image_mean": [0.1, 0.2, 0.3], "image_std": [1, 2, 3]})
    )
    processor = HFVisionTower.from_pretrained(tmp_path).image_processor()
    assert processor.mean == (0.1, 0.2, 0.3) and processor.std == (1, 2, 3) and processor.size == 32


def test_bad_checkpoints_and_layers_are_named(checkpoint, tmp_path):
    _, path, _ = checkpoint
    with pytest.raises(MmwbCheckpointError, match="has no config.json"):
        HFVisionTower.from_pretrained(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "bert"}))
    with pytest.raises(MmwbCheckpointError, match="model_type 'bert'"):
        HFVisionTower.from_pretrained(tmp_path)
    with pytest.raises(MmwbConfigError, match="select_layer=7"):
        HFVisionTower.from_pretrained(path, select_layer=7)


def random_images(sizes):
    generator = torch.Generator().manual_seed(1)
    return [
        Image.fromarray(torch.randint(0, 256, (h, w, 3), generator=generator, dtype=torch.uint8).numpy())
        for h, w in sizes
    ]


def llava_expand2square(image: Image.Image, fill: tuple[int, ...]) -> Image.Image:
    """LLaVA-1.5's own padding: paste the image centred on a square of the mean colour."""
    side = max(image.size)
    canvas = Image.new(image.mode, (side, side), fill)
    canvas.paste(image, ((side - image.width) // 2, (side - image.height) // 2))
    return canvas


def test_processors_match_transformers_processors():
    images = random_images([(40, 80), (50, 37)])
    clip = CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32})
    mean, std = tuple(clip.image_mean), tuple(clip.image_std)
    ours = FixedSizeImageProcessor(32, mean, std, "crop")(images).pixel_values
    assert (ours - clip(images, return_tensors="pt")["pixel_values"]).abs().max() <= 1e-5
    siglip = SiglipImageProcessor(size={"height": 32, "width": 32})
    ours = FixedSizeImageProcessor(32, tuple(siglip.image_mean), tuple(siglip.image_std), "squash")(images)
    assert (ours.pixel_values - siglip(images, return_tensors="pt")["pixel_values"]).abs().max() <= 1e-5
    # LLaVA pads with tuple(int(x * 255) for x in image_processor.image_mean) (llava/mm_utils.py)
    padded = [llava_expand2square(image, tuple(int(255 * m) for m in mean)) for image in images]
    ours = FixedSizeImageProcessor(32, mean, std, "pad")(images).pixel_values
    assert (ours - clip(padded, return_tensors="pt")["pixel_values"]).abs().max() <= 1e-5


def test_a_vision_config_of_another_family_is_named():
    with pytest.raises(
        MmwbCheckpointError, match="cfg.json: vision model_type 'siglip2_vision_model' is not one of"
    ):
        vision_model_from_config({"model_type": "siglip2_vision_model", "hidden_size": 32}, "cfg.json")
