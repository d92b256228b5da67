"""The convolutional tower: one token per cell of its last feature map, row by row, with 2-D positions."""

import pytest
import torch
from PIL import Image

from mmwb.errors import MmwbConfigError
from mmwb.models.vision.base import PixelInputs
from mmwb.models.vision.conv import ConvTower, ConvTowerConfig
from mmwb.models.vlm.parts import build_tower, tower_spec


def test_tokens_are_the_grid_row_by_row_plus_row_and_column_embeddings():
    torch.manual_seed(0)
    tower = ConvTower(ConvTowerConfig()).eval()  # 64 px, strides 2, 2, 2, 1: an 8x8 grid of 128 channels
    pixels = tower.image_processor()([Image.new("RGB", (80, 50), (200, 30, 30)), Image.new("RGB", (64, 64))])
    assert pixels.pixel_values.shape == (2, 3, 64, 64)
    with torch.no_grad():
        out = tower.encode(pixels)
        maps = tower.stages(pixels.pixel_values)  # (2, 128, 8, 8)
    assert out.features.shape == (2, 64, 128) and out.token_counts == [64, 64] and out.grid_hw == [(8, 8)] * 2
    for row, col in ((0, 0), (0, 7), (3, 5), (7, 0)):
        expected = maps[:, :, row, col] + tower.row_embed[row] + tower.col_embed[col]
        assert torch.allclose(out.features[:, row * 8 + col], expected)


def test_coordinates_add_a_linear_map_of_each_cell_centre():
    torch.manual_seed(0)
    tower = ConvTower(ConvTowerConfig(coordinates=True)).eval()
    pixels = PixelInputs(torch.randn(2, 3, 64, 64))
    with torch.no_grad():
        out = tower.encode(pixels).features  # (2, 64, 128)
        maps = tower.stages(pixels.pixel_values)
    w = tower.coord_embed  # (128, 2): x, y
    for row, col in ((0, 0), (0, 7), (3, 5), (7, 0)):
        x, y = (col + 0.5) / 8 * 2 - 1, (row + 0.5) / 8 * 2 - 1  # centres in [-1, 1]
        expected = (
            maps[:, :, row, col] + tower.row_embed[row] + tower.col_embed[col] + x * w[:, 0] + y * w[:, 1]
        )
        assert torch.allclose(out[:, row * 8 + col], expected, atol=1e-6)
    # a folder saved before the option existed (no "coordinates" key, no coord_embed tensor) still loads
    old = {
        "type": "conv",
        "config": {"image_size": 64, "channels": [32, 64, 96, 128], "strides": [2, 2, 2, 1]},
    }
    plain = build_tower(old)
    assert plain.coord_embed is None and "coord_embed" not in plain.state_dict()


def test_spec_round_trip_and_bad_configs():
    tower = ConvTower(ConvTowerConfig(image_size=32, channels=(8, 16), strides=(2, 2)))
    spec = tower_spec(tower)
    assert spec == {"type": "conv", "config": {"image_size": 32, "channels": (8, 16), "strides": (2, 2),
                                               "mean": (0.5, 0.5, 0.5), "std": (0.5, 0.5, 0.5),
                                               "coordinates": False}}  # fmt: skip
    rebuilt = build_tower(spec)
    rebuilt.load_state_dict(tower.state_dict())
    pixels = PixelInputs(torch.randn(1, 3, 32, 32))
    assert torch.equal(rebuilt.eval().encode(pixels).features, tower.eval().encode(pixels).features)
    with pytest.raises(MmwbConfigError, match="2 channel counts for 3 strides"):
        ConvTowerConfig(channels=(8, 16), strides=(2, 2, 2))
    with pytest.raises(MmwbConfigError, match="image_size 36 is not a multiple of the total stride 8"):
        ConvTowerConfig(image_size=36, channels=(8, 8, 8), strides=(2, 2, 2))
