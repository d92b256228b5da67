"""Write the sample photos and the tricky test images in this folder; deterministic, offline, safe to re-run.

    python assets/images/make_assets.py

The photos come from scikit-image's bundled data (see LICENSE.md). The files under tricky/ are tiny images whose
pixel values tests/test_io.py knows, one per awkward case load_image must handle or refuse.
"""

import io
import struct
import zlib
from pathlib import Path

import numpy as np
import skimage.data
from PIL import Image

HERE = Path(__file__).resolve().parent
PHOTOS = ("astronaut", "coffee", "chelsea", "rocket")
MAX_SIDE = 512
EXIF_ORIENTATION = 0x0112


def write_photos(out: Path) -> None:
    """scikit-image photos, long side at most MAX_SIDE, as JPEG quality 90 (small enough to commit)."""
    for name in PHOTOS:
        image = Image.fromarray(getattr(skimage.data, name)())
        scale = MAX_SIDE / max(image.size)
        if scale < 1:
            size = (round(image.width * scale), round(image.height * scale))
            image = image.resize(size, Image.Resampling.LANCZOS)
        image.save(out / f"{name}.jpg", quality=90, optimize=True)


def write_tricky(out: Path) -> None:
    out.mkdir(exist_ok=True)
    # One pixel per case: opaque red, fully transparent black, half-transparent blue, quarter-opaque green.
    rgba = np.array([[[255, 0, 0, 255], [0, 0, 0, 0], [0, 0, 255, 128], [0, 255, 0, 64]]], np.uint8)
    Image.fromarray(rgba).save(out / "rgba.png")
    la = np.array(
        [[[200, 255], [0, 0], [0, 128]]], np.uint8
    )  # opaque 200, transparent, half-transparent black
    Image.fromarray(la).save(out / "la.png")

    palette = Image.new("P", (3, 1))
    palette.putpalette([255, 0, 0, 0, 255, 0, 0, 0, 255])  # index 0 red, 1 green, 2 blue
    palette.putdata([0, 1, 2])
    palette.save(out / "palette_transparent.png", transparency=1)  # green is the transparent index

    Image.fromarray(np.array([[0, 37, 200, 255]], np.uint8)).save(out / "grayscale.png")
    Image.fromarray(np.array([[0, 1000, 32896, 65535]], np.uint16)).save(out / "gray16.png")  # mode I;16

    # Four 8x8 blocks (JPEG's block size, so each stays flat): cyan, magenta+yellow (red), black, nothing (white).
    cmyk = np.zeros((8, 32, 4), np.uint8)
    for index, ink in enumerate([(255, 0, 0, 0), (0, 255, 255, 0), (0, 0, 0, 255), (0, 0, 0, 0)]):
        cmyk[:, 8 * index : 8 * (index + 1)] = ink
    Image.frombytes("CMYK", (32, 8), cmyk.tobytes()).save(out / "cmyk.jpg", quality=95)

    # Stored 48 wide x 32 high, blue with a red 16x16 top-left block; orientation 6 = display rotated 90 deg clockwise.
    stored = np.zeros((32, 48, 3), np.uint8)
    stored[:] = (0, 0, 255)
    stored[:16, :16] = (255, 0, 0)
    exif = Image.Exif()
    exif[EXIF_ORIENTATION] = 6
    Image.fromarray(stored).save(out / "exif_rotated.jpg", quality=95, exif=exif)

    noise = np.random.default_rng(0).integers(0, 256, (64, 64, 3), dtype=np.uint8)
    jpeg = io.BytesIO()
    Image.fromarray(noise).save(jpeg, format="JPEG", quality=90)
    (out / "truncated.jpg").write_bytes(jpeg.getvalue()[: len(jpeg.getvalue()) // 2])

    png = bytearray(_encode_png(Image.fromarray(noise)))
    start = png.index(b"IDAT") + 10
    png[start : start + 200] = bytes(
        b ^ 0x5A for b in png[start : start + 200]
    )  # valid header, garbled pixels
    (out / "corrupt.png").write_bytes(bytes(png))

    (out / "bomb.png").write_bytes(_header_only_png(12000, 12000))  # 144M pixels > load_image's default limit
    (out / "not_an_image.txt").write_text("This is a text file, not an image.\n")
    (out / "empty.jpg").write_bytes(b"")


def _encode_png(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def _header_only_png(width: int, height: int) -> bytes:
    """A PNG whose header claims width x height greyscale pixels but whose data is a few bytes."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    header = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)  # 8-bit greyscale, no interlace
    return (
        b"\x89PNG\r\n\x1a\n"
        + chunk(b"IHDR", header)
        + chunk(b"IDAT", zlib.compress(b"\0" * 16))
        + chunk(b"IEND", b"")
    )


if __name__ == "__main__":
    write_photos(HERE)
    write_tricky(HERE / "tricky")
    print(f"wrote {len(PHOTOS)} photos and the tricky/ test images to {HERE}")
