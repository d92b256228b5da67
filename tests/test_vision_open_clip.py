"""open_clip towers: features equal to what open_clip's own encode_image computes on the same weights."""

import json

import open_clip
import pytest
import torch
from PIL import Image
from safetensors.torch import save_file

from mmwb.errors import MmwbCheckpointError, MmwbConfigError
from mmwb.models.vision import PixelInputs
from mmwb.models.vision.open_clip import OpenClipTower

TINY = {
    "embed_dim": 16,
    "vision_cfg": {"image_size": 32, "layers": 3, "width": 32, "head_width": 16, "patch_size": 8},
    "text_cfg": {"context_length": 8, "vocab_size": 64, "width": 16, "heads": 2, "layers": 1},
}
PREPROCESS = {"mean": [0.4, 0.5, 0.6], "std": [0.2, 0.25, 0.3]}


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    """A local-dir open_clip checkpoint with random weights, and the open_clip model that made them."""
    path = tmp_path_factory.mktemp("open_clip_tiny")
    (path / "open_clip_config.json").write_text(json.dumps({"model_cfg": TINY, "preprocess_cfg": PREPROCESS}))
    torch.manual_seed(0)
    reference = open_clip.create_model(f"local-dir:{path}").eval()
    save_file(reference.state_dict(), path / "open_clip_model.safetensors")
    return path, reference


def encode_image_with_block_outputs(reference, images):
    """open_clip's encode_image path, recording every block's output on the way."""
    outputs = []
    hooks = [
        block.register_forward_hook(lambda _m, _i, out: outputs.append(out))
        for block in reference.visual.transformer.resblocks
    ]
    reference.visual.output_tokens = True
    try:
        with torch.no_grad():
            _pooled, tokens = reference.encode_image(images)
    finally:
        reference.visual.output_tokens = False
        for hook in hooks:
            hook.remove()
    return tokens, outputs


def test_last_layer_with_final_norm_equals_encode_image_tokens(checkpoint):
    path, reference = checkpoint
    images = torch.randn(2, 3, 32, 32)
    tower = OpenClipTower.from_name(f"local-dir:{path}", select_layer=-1, final_norm=True)
    expected, _ = encode_image_with_block_outputs(reference, images)
    with torch.no_grad():
        features = tower.encode(PixelInputs(images))
    assert features.features.shape == (2, 16, 32) and features.token_counts == [16, 16]
    assert features.grid_hw == [(4, 4), (4, 4)]
    assert (features.features - expected).abs().max() <= 1e-5


def test_penultimate_layer_with_and_without_cls(checkpoint):
    path, reference = checkpoint
    images = torch.randn(3, 3, 32, 32)
    _, blocks = encode_image_with_block_outputs(reference, images)
    llava = OpenClipTower.from_name(f"local-dir:{path}", select_layer=-2)
    with_cls = OpenClipTower.from_name(f"local-dir:{path}", select_layer=-2, drop_cls=False)
    assert len(llava.visual.transformer.resblocks) == 2  # the last block is pruned, not computed
    with torch.no_grad():
        no_cls_features = llava.encode(PixelInputs(images)).features
        cls_features = with_cls.encode(PixelInputs(images)).features
    assert no_cls_features.shape == (3, 16, 32) and cls_features.shape == (3, 17, 32)
    assert (no_cls_features - blocks[-2][:, 1:]).abs().max() <= 1e-5
    assert (cls_features - blocks[-2]).abs().max() <= 1e-5


def test_model_name_with_local_weights_file(checkpoint, tmp_path):
    path, reference = checkpoint
    (tmp_path / "mmwb-tiny-vit.json").write_text(json.dumps(TINY))
    open_clip.add_model_config(tmp_path / "mmwb-tiny-vit.json")
    tower = OpenClipTower.from_name(
        "mmwb-tiny-vit", pretrained=path / "open_clip_model.safetensors", select_layer=-1, final_norm=True
    )
    images = torch.randn(1, 3, 32, 32)
    expected, _ = encode_image_with_block_outputs(reference, images)
    with torch.no_grad():
        assert (tower.encode(PixelInputs(images)).features - expected).abs().max() <= 1e-5


def test_image_processor_uses_the_checkpoint_mean_and_std(checkpoint):
    path, _ = checkpoint
    processor = OpenClipTower.from_name(f"local-dir:{path}").image_processor()
    inputs = processor([Image.new("RGB", (50, 40), (102, 127, 153))])  # exactly the mean colour
    assert inputs.pixel_values.shape == (1, 3, 32, 32)
    assert inputs.pixel_values.abs().max() <= 0.02


def test_uncached_tag_and_bad_layer_are_refused(checkpoint, tmp_path):
    path, _ = checkpoint
    with pytest.raises(MmwbCheckpointError, match="not in the local HF cache"):
        OpenClipTower.from_name("ViT-B-32", pretrained="laion2b_s34b_b79k", cache_dir=tmp_path)
    with pytest.raises(MmwbConfigError, match="select_layer=-5 is outside a tower with 3 layers"):
        OpenClipTower.from_name(f"local-dir:{path}", select_layer=-5)
    with pytest.raises(MmwbConfigError, match="does not download"):
        OpenClipTower.from_name("hf-hub:timm/ViT-B-16-SigLIP")
