"""load_image, expand_image_sources, save_image_grid and atomic_write_path against files whose pixels we know."""

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from mmwb.data.io import atomic_write_path, expand_image_sources, load_image, save_image_grid
from mmwb.errors import MmwbInputError

IMAGES = Path(__file__).resolve().parents[1] / "assets" / "images"
TRICKY = IMAGES / "tricky"
WHITE, BLACK = (255, 255, 255), (0, 0, 0)


def pixels(image: Image.Image) -> np.ndarray:
    assert image.mode == "RGB"
    return np.asarray(image).astype(int)


def test_photos_load_as_rgb_within_512():
    for name in ("astronaut", "coffee", "chelsea", "rocket"):
        image = load_image(IMAGES / f"{name}.jpg")
        assert image.mode == "RGB" and max(image.size) <= 512 and min(image.size) > 256


def test_rgba_composites_over_background():
    white = pixels(load_image(TRICKY / "rgba.png"))[0]
    black = pixels(load_image(TRICKY / "rgba.png", background=BLACK))[0]
    assert white[0].tolist() == [255, 0, 0]  # opaque stays
    assert white[1].tolist() == [255, 255, 255] and black[1].tolist() == [0, 0, 0]  # alpha 0 -> background
    np.testing.assert_allclose(white[2], [127, 127, 255], atol=1)  # alpha 128 blends blue with white
    np.testing.assert_allclose(black[2], [0, 0, 128], atol=1)
    np.testing.assert_allclose(black[3], [0, 64, 0], atol=1)


def test_la_composites_over_background():
    row = pixels(load_image(TRICKY / "la.png", background=(10, 20, 30)))[0]
    assert row[0].tolist() == [200, 200, 200]
    assert row[1].tolist() == [10, 20, 30]
    np.testing.assert_allclose(row[2], [5, 10, 15], atol=1)


def test_palette_transparency_index_becomes_background():
    row = pixels(load_image(TRICKY / "palette_transparent.png", background=(1, 2, 3)))[0]
    assert row.tolist() == [[255, 0, 0], [1, 2, 3], [0, 0, 255]]


def test_grayscale_and_bilevel():
    assert pixels(load_image(TRICKY / "grayscale.png"))[0, :, 0].tolist() == [0, 37, 200, 255]
    assert pixels(load_image(TRICKY / "grayscale.png")).std(axis=2).max() == 0  # R == G == B
    bilevel = Image.fromarray(np.array([[True, False]]))
    assert bilevel.mode == "1"
    assert pixels(load_image(bilevel))[0].tolist() == [[255, 255, 255], [0, 0, 0]]


def test_16_bit_greyscale_is_scaled_not_clipped():
    with Image.open(TRICKY / "gray16.png") as raw:
        assert raw.mode == "I;16"
    assert pixels(load_image(TRICKY / "gray16.png"))[0, :, 0].tolist() == [0, 4, 128, 255]
    big_endian = Image.frombytes("I;16B", (2, 1), bytes([0xFF, 0xFF, 0x80, 0x80]))
    assert pixels(load_image(big_endian))[0, :, 0].tolist() == [255, 128]


def test_32_bit_int_and_float_modes():
    sixteen_bit_as_i = Image.fromarray(
        np.array([[0, 65535]], np.int32)
    )  # how Pillow hands out some 16-bit data
    assert sixteen_bit_as_i.mode == "I"
    assert pixels(load_image(sixteen_bit_as_i))[0, :, 0].tolist() == [0, 255]
    wide = Image.fromarray(np.array([[-100, 0, 100_000]], np.int32))  # outside 16 bits: stretched min..max
    assert pixels(load_image(wide))[0, :, 0].tolist() == [0, 0, 255]
    unit = Image.fromarray(np.array([[0.0, 0.5, 1.0]], np.float32))
    assert unit.mode == "F"
    assert pixels(load_image(unit))[0, :, 0].tolist() == [0, 128, 255]


def test_cmyk_jpeg_converts_to_expected_rgb():
    with Image.open(TRICKY / "cmyk.jpg") as raw:
        assert raw.mode == "CMYK"
    centres = pixels(load_image(TRICKY / "cmyk.jpg"))[4, 4::8]  # the middle of each 8x8 block
    np.testing.assert_allclose(centres, [[0, 255, 255], [255, 0, 0], [0, 0, 0], [255, 255, 255]], atol=12)


def test_ycbcr_converts():
    rgb = Image.new("RGB", (2, 2), (200, 30, 60))
    np.testing.assert_allclose(pixels(load_image(rgb.convert("YCbCr")))[0, 0], [200, 30, 60], atol=3)


def test_exif_orientation_is_applied():
    with Image.open(TRICKY / "exif_rotated.jpg") as raw:
        assert raw.size == (48, 32)
    image = load_image(TRICKY / "exif_rotated.jpg")
    assert image.size == (32, 48)
    # Orientation 6 turns the stored image 90 degrees clockwise: its red top-left block lands top-right.
    np.testing.assert_allclose(pixels(image)[4, 27], [255, 0, 0], atol=8)
    np.testing.assert_allclose(pixels(image)[4, 4], [0, 0, 255], atol=8)
    np.testing.assert_allclose(pixels(image)[43, 27], [0, 0, 255], atol=8)


@pytest.mark.parametrize(
    ("name", "reason"),
    [
        ("missing.png", "no such file"),
        ("empty.jpg", "empty"),
        ("truncated.jpg", "truncated"),
        ("corrupt.png", "cannot decode"),
        ("not_an_image.txt", "not an image"),
        ("bomb.png", "max_pixels"),
    ],
)
def test_bad_files_raise_input_error_naming_the_file(name, reason):
    with pytest.raises(MmwbInputError, match=reason) as info:
        load_image(TRICKY / name)
    assert name in str(info.value)


def test_directory_is_refused():
    with pytest.raises(MmwbInputError, match="directory") as info:
        load_image(TRICKY)
    assert "tricky" in str(info.value)


def test_bomb_guard_checks_the_header_before_decoding():
    # corrupt.png has a valid 64x64 header over garbage: a size refusal (not a decode error) proves no decoding ran.
    with pytest.raises(MmwbInputError, match="max_pixels=4095"):
        load_image(TRICKY / "corrupt.png", max_pixels=64 * 64 - 1)
    assert load_image(TRICKY / "grayscale.png", max_pixels=4).size == (4, 1)


def test_bomb_past_pillows_own_limit_is_an_input_error(tmp_path):
    bomb = TRICKY / "bomb.png"
    huge = tmp_path / "huge.png"  # 20000^2 = 4e8 pixels: Pillow refuses at open, we translate
    huge.write_bytes(
        bomb.read_bytes().replace((12000).to_bytes(4, "big") * 2, (20000).to_bytes(4, "big") * 2)
    )
    with pytest.raises(MmwbInputError, match="huge.png"):
        load_image(huge, max_pixels=10**12)


def test_arrays_and_tensors_load():
    rgb = np.zeros((2, 3, 3), np.uint8)
    rgb[0, 0] = (10, 20, 30)
    assert load_image(rgb).size == (3, 2) and pixels(load_image(rgb))[0, 0].tolist() == [10, 20, 30]
    assert pixels(load_image(np.full((2, 2), 65535, np.uint16)))[0, 0].tolist() == [255, 255, 255]
    assert pixels(load_image(np.full((2, 2, 1), 0.5)))[0, 0].tolist() == [128, 128, 128]
    rgba = np.zeros((1, 1, 4), np.float32)  # transparent -> background
    assert pixels(load_image(rgba, background=(7, 8, 9)))[0, 0].tolist() == [7, 8, 9]

    chw = torch.zeros(3, 2, 5)
    chw[0, 1, 4] = 1.0  # red at row 1, column 4
    image = load_image(chw)
    assert image.size == (5, 2) and pixels(image)[1, 4].tolist() == [255, 0, 0]
    assert pixels(load_image(chw.to(torch.bfloat16)))[1, 4].tolist() == [255, 0, 0]
    assert pixels(load_image(torch.full((3, 2, 2), 200, dtype=torch.uint8)))[0, 0].tolist() == [200, 200, 200]


@pytest.mark.parametrize(
    ("source", "message"),
    [
        (np.full((2, 2, 3), 1.5, np.float32), r"\[0, 1\]"),
        (torch.zeros(5, 4, 4), r"tensor of shape \(5, 4, 4\)"),
        (np.zeros((2, 2), np.int64), "dtype int64"),
        (np.zeros((0, 3, 3), np.uint8), "no pixels"),
        (12, "int"),
    ],
)
def test_bad_arrays_raise_input_error(source, message):
    with pytest.raises(MmwbInputError, match=message):
        load_image(source)


def test_result_is_independent_of_the_source():
    source = Image.new("RGB", (2, 2), (1, 2, 3))
    image = load_image(source)
    source.putpixel((0, 0), (9, 9, 9))
    assert image.getpixel((0, 0)) == (1, 2, 3)


def test_expand_image_sources(tmp_path):
    for name in ("b.png", "a.jpg", "c.JPEG", "notes.txt", ".hidden.png"):
        (tmp_path / name).write_bytes(b"x")
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "d.png").write_bytes(b"x")
    (tmp_path / "docs").mkdir()
    (tmp_path / "docs" / "readme.txt").write_bytes(b"x")

    assert expand_image_sources([str(tmp_path)]) == [tmp_path / n for n in ("a.jpg", "b.png", "c.JPEG")]
    named = tmp_path / "notes.txt"
    assert expand_image_sources([str(named)]) == [named]  # a file named outright is kept, image or not
    assert expand_image_sources([str(tmp_path / "*.png"), str(tmp_path / "b.png")]) == [tmp_path / "b.png"]
    assert expand_image_sources([str(tmp_path / "**" / "*.png")]) == [
        tmp_path / "b.png",
        tmp_path / "sub" / "d.png",
    ]
    assert len(expand_image_sources([str(IMAGES)])) == 4  # the photos, not tricky/ or the script
    for spec, reason in [
        ("nope.png", "no such file"),
        ("*.nothing", "matches no files"),
        ("docs", "no image"),
    ]:
        with pytest.raises(MmwbInputError, match=reason) as info:
            expand_image_sources([str(tmp_path / spec)])
        assert spec in str(info.value)


def test_grid_size_and_png(tmp_path):
    images = [Image.new("RGB", (40, 30), (255, 0, 0)), np.zeros((10, 20, 3), np.uint8), torch.ones(3, 30, 40)]
    plain = save_image_grid(images, tmp_path / "plain.png", ncols=2)
    with Image.open(plain) as grid:
        assert grid.format == "PNG" and grid.size == (2 * 40, 2 * 30)
        assert grid.getpixel((20, 15)) == (255, 0, 0)  # first cell
        assert grid.getpixel((60, 15)) == (0, 0, 0)  # second image, fitted to 40x20 and centred vertically

    labels = ["red", "black " * 20, "white"]
    labelled = save_image_grid(
        images, tmp_path / "out" / "labelled.png", labels=labels, ncols=3, cell_size=64
    )
    with Image.open(labelled) as grid:
        assert grid.width == 3 * 64 and grid.height > 64 + 2 * 12  # the long label wrapped onto several lines
        caption = np.asarray(grid.convert("L"))[64:, 64:128]
        assert caption.min() < 100  # dark text under the second cell
    assert sorted(p.name for p in tmp_path.rglob("*")) == ["labelled.png", "out", "plain.png"]


def test_grid_refuses_mismatched_labels(tmp_path):
    with pytest.raises(MmwbInputError, match="2 labels for 1 images"):
        save_image_grid([np.zeros((2, 2), np.uint8)], tmp_path / "g.png", labels=["a", "b"])


def test_atomic_write_replaces_and_cleans_up(tmp_path):
    target = tmp_path / "data.bin"
    target.write_bytes(b"old")
    with atomic_write_path(target) as tmp:
        assert tmp.parent == tmp_path and tmp.suffix == ".bin" and tmp != target
        tmp.write_bytes(b"new")
        assert target.read_bytes() == b"old"  # nothing visible until the block ends
    assert target.read_bytes() == b"new"
    assert [p.name for p in tmp_path.iterdir()] == ["data.bin"]


def test_atomic_write_keeps_target_when_writer_raises(tmp_path):
    target = tmp_path / "data.bin"
    target.write_bytes(b"old")
    with pytest.raises(RuntimeError, match="writer failed"), atomic_write_path(target) as tmp:
        tmp.write_bytes(b"half")
        raise RuntimeError("writer failed")
    assert target.read_bytes() == b"old"
    assert [p.name for p in tmp_path.iterdir()] == ["data.bin"]
