"""The frozen-tower feature cache: hits, misses, invalidation by encoder and preprocessing, broken images."""

from __future__ import annotations

import shutil

import pytest
import torch
from PIL import Image
from torch import nn

from mmwb.data.feature_cache import FeatureCache, content_hash, describe_preprocessing, encoder_id, fill_cache
from mmwb.errors import MmwbInputError
from mmwb.models.vision.base import FixedSizeImageProcessor, PixelInputs, VisionFeatures, VisionTower
from mmwb.train.image_features import CachedFeatures

MEAN, STD = (0.5, 0.5, 0.5), (0.25, 0.25, 0.25)


class PatchTower(VisionTower):
    """A 4x4-patch linear tower that counts how many images it encoded."""

    def __init__(self, size: int = 16) -> None:
        super().__init__()
        self.embed = nn.Conv2d(3, 8, 4, stride=4)
        self.size = size
        self.hidden_size = 8
        self.encoded = 0

    def encode(self, inputs: PixelInputs) -> VisionFeatures:
        self.encoded += len(inputs.pixel_values)
        tokens = self.embed(inputs.pixel_values).flatten(2).transpose(1, 2)  # (B, N, C)
        grid = (self.size // 4, self.size // 4)
        return VisionFeatures(tokens, [tokens.shape[1]] * len(tokens), [grid] * len(tokens))

    def image_processor(self) -> FixedSizeImageProcessor:
        return FixedSizeImageProcessor(self.size, MEAN, STD, resize_mode="squash")


@pytest.fixture
def images(tmp_path):
    paths = []
    for i in range(3):
        path = tmp_path / "img" / f"{i}.png"
        path.parent.mkdir(exist_ok=True)
        Image.new("RGB", (20, 24), (40 * i, 100, 200 - 30 * i)).save(path)
        paths.append(path)
    return paths


def _cache(root, tower, processor=None, dtype=torch.float32):
    processor = processor or tower.image_processor()
    return FeatureCache(root, encoder_id(tower, dtype), describe_preprocessing(processor)), processor


def test_miss_then_hit_with_the_same_features(tmp_path, images):
    tower = PatchTower()
    cache, processor = _cache(tmp_path / "cache", tower)
    hashes = fill_cache(cache, images, tower, processor, batch_size=2, progress=False)
    assert (cache.misses, cache.hits, tower.encoded) == (3, 0, 3)
    again, _ = _cache(tmp_path / "cache", tower)  # a later run
    assert fill_cache(again, images, tower, processor, progress=False) == hashes
    assert (again.misses, again.hits, tower.encoded) == (0, 3, 3)  # nothing re-encoded
    from mmwb.data.io import load_image

    direct = tower.encode(processor([load_image(images[1])]))
    entry = CachedFeatures(again, hashes)(images[1])
    torch.testing.assert_close(entry["features"], direct.features[0].detach(), rtol=0, atol=0)
    assert entry["grid_hw"].tolist() == [4, 4]
    assert not list((tmp_path / "cache").rglob("*.tmp*"))  # atomic writes leave no temporaries


def test_key_is_the_content_not_the_name(tmp_path, images):
    copy = tmp_path / "renamed.png"
    shutil.copy(images[0], copy)
    assert content_hash(copy) == content_hash(images[0])
    tower = PatchTower()
    cache, processor = _cache(tmp_path / "cache", tower)
    fill_cache(cache, images, tower, processor, progress=False)
    fill_cache(cache, [copy], tower, processor, progress=False)
    assert tower.encoded == 3


@pytest.mark.parametrize("change", ["preprocessing", "encoder weights", "encoder dtype", "encoder settings"])
def test_changed_encoder_or_preprocessing_misses(tmp_path, images, change):
    tower = PatchTower()
    cache, processor = _cache(tmp_path / "cache", tower)
    fill_cache(cache, images, tower, processor, progress=False)
    if change == "preprocessing":
        processor = FixedSizeImageProcessor(16, MEAN, STD, resize_mode="crop")
        other, _ = _cache(tmp_path / "cache", tower, processor)
    elif change == "encoder weights":
        with torch.no_grad():
            tower.embed.bias.add_(1e-3)
        other, _ = _cache(tmp_path / "cache", tower)
    elif change == "encoder dtype":
        other, _ = _cache(tmp_path / "cache", tower, dtype=torch.bfloat16)
    else:  # the same weights keeping other tokens (say, with the CLS token)
        tower.feature_settings = lambda: {"drop_cls": False}
        other, _ = _cache(tmp_path / "cache", tower)
    assert other.folder != cache.folder
    fill_cache(other, images, tower, processor, progress=False)
    assert (other.misses, other.hits) == (3, 0)


def test_broken_and_missing_images_are_named_and_skipped(tmp_path, images, caplog):
    broken = tmp_path / "img" / "broken.png"
    broken.write_bytes(b"not a png at all")
    missing = tmp_path / "img" / "missing.png"
    tower = PatchTower()
    cache, processor = _cache(tmp_path / "cache", tower)
    hashes = fill_cache(cache, [*images, broken, missing], tower, processor, progress=False)
    assert hashes[broken] is None and hashes[missing] is None
    assert "broken.png" in caplog.text and "missing.png" in caplog.text
    loader = CachedFeatures(cache, hashes)
    for path in (broken, missing):
        with pytest.raises(MmwbInputError, match=path.name):
            loader(path)
    assert loader(images[2])["features"].shape == (16, 8)


def test_a_torn_entry_is_a_miss(tmp_path, images):
    tower = PatchTower()
    cache, processor = _cache(tmp_path / "cache", tower)
    hashes = fill_cache(cache, images, tower, processor, progress=False)
    cache.path(hashes[images[0]]).write_bytes(b"torn")
    assert cache.get(hashes[images[0]]) is None
    fill_cache(cache, images, tower, processor, progress=False)
    assert tower.encoded == 4  # recomputed by the next fill, the others reused


def test_entries_read_back_stay_in_memory_up_to_the_budget(tmp_path, images):
    tower = PatchTower()
    cache, processor = _cache(tmp_path / "cache", tower)
    hashes = fill_cache(cache, images, tower, processor, progress=False)
    entry_bytes = sum(t.numel() * t.element_size() for t in CachedFeatures(cache, hashes)(images[0]).values())
    loader = CachedFeatures(cache, hashes, memory_bytes=2 * entry_bytes)  # room for two of the three
    hits = cache.hits
    first = [loader(path) for path in images]
    again = [loader(path) for path in images]
    assert cache.hits - hits == 3 + 1  # the third image is read from disk again; the first two are not
    assert all(a is b for a, b in zip(first[:2], again[:2])) and again[2] is not first[2]
    assert all(torch.equal(a["features"], b["features"]) for a, b in zip(first, again))


def test_ranks_that_fill_one_after_the_other_still_cover_every_image(tmp_path, images):
    """Rank 1 may look for missing entries after rank 0 wrote its share: the split must not depend on that."""
    tower = PatchTower()
    cache, processor = _cache(tmp_path / "cache", tower)
    hashes = fill_cache(cache, images, tower, processor, rank=0, world_size=2, progress=False)
    assert (cache.hits, cache.misses) == (0, 2)  # images 0 and 2: rank 0's share
    late, _ = _cache(tmp_path / "cache", tower)
    fill_cache(late, images, tower, processor, rank=1, world_size=2, progress=False)
    assert (late.hits, late.misses) == (0, 1)
    assert all(cache.path(hashes[path]).is_file() for path in images)
