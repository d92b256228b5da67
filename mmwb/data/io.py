"""Images in and out: one loader, one way to expand CLI image arguments, one grid writer, one atomic write.

Every image mmwb reads goes through ``load_image`` so that EXIF orientation, mode conversion and the size guard are
the same in the CLI, the pipelines and training, and so that every bad file is an ``MmwbInputError`` naming it.
"""

from __future__ import annotations

import glob
import json
import math
import os
import secrets
import warnings
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFont, ImageOps, UnidentifiedImageError

from mmwb.errors import MmwbInputError

# Generous enough for any photo or scan (two 8192^2 frames' worth) yet far from what exhausts memory when decoded.
DEFAULT_MAX_PIXELS = 8192 * 8192 * 2
IMAGE_EXTENSIONS = frozenset({".bmp", ".gif", ".jpeg", ".jpg", ".png", ".tif", ".tiff", ".webp"})
ImageSource = str | os.PathLike | Image.Image | np.ndarray | torch.Tensor
RGB = tuple[int, int, int]

_WIDE_MODES = frozenset({"I", "I;16", "I;16B", "I;16L", "I;16N", "F"})
_UINT16_MAX = 65535


def load_image(
    source: ImageSource, *, background: RGB = (255, 255, 255), max_pixels: int = DEFAULT_MAX_PIXELS
) -> Image.Image:
    """Any image source -> a fully loaded RGB PIL image, upright as its EXIF says.

    Transparent pixels are composited over ``background`` (dropping alpha would turn them black, which a model then
    reads as content). Images with more than ``max_pixels`` pixels are refused from their header, before decoding.
    Arrays are (H, W) or (H, W, C) and tensors (C, H, W) or (H, W), with C in 1..4, as uint8, uint16 or float in
    [0, 1].
    """
    if isinstance(source, (str, os.PathLike)):
        return composite_rgb(read_image_file(Path(source), max_pixels), background)
    if isinstance(source, Image.Image):
        name = getattr(source, "filename", "") or "PIL image"  # images from Image.open remember their file
        return composite_rgb(_decode(source, name, max_pixels), background)
    if isinstance(source, torch.Tensor):
        name = f"tensor of shape {tuple(source.shape)}"
        source = _tensor_to_array(source)
    elif isinstance(source, np.ndarray):
        name = f"array of shape {source.shape}"
    else:
        raise MmwbInputError(
            f"cannot load an image from a {type(source).__name__}; "
            "expected a path, a PIL image, a numpy array or a torch tensor"
        )
    image = _array_to_image(source, name)
    _check_pixels(image.size, name, max_pixels)
    return composite_rgb(image, background)


def read_image_file(path: Path, max_pixels: int = DEFAULT_MAX_PIXELS) -> Image.Image:
    """Open ``path`` (only its header is read), check its size, then decode it, in its own mode and upright as its
    EXIF says; every failure is one MmwbInputError naming the file."""
    if not path.exists():
        raise MmwbInputError(f"{path}: no such file")
    if path.is_dir():
        raise MmwbInputError(f"{path}: is a directory, not an image file")
    if path.stat().st_size == 0:
        raise MmwbInputError(f"{path}: empty file")
    try:
        with warnings.catch_warnings():
            # max_pixels is the policy; Pillow's global bomb warning would only repeat it less precisely.
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            image = Image.open(path)
    except UnidentifiedImageError as exc:
        raise MmwbInputError(f"{path}: not an image (no image format Pillow reads recognises it)") from exc
    except Image.DecompressionBombError as exc:
        raise MmwbInputError(f"{path}: too many pixels: {exc}") from exc
    except OSError as exc:
        raise MmwbInputError(f"{path}: cannot read: {exc}") from exc
    with image:
        return _decode(image, str(path), max_pixels)


def _decode(image: Image.Image, name: str, max_pixels: int) -> Image.Image:
    """Size check on the header, then decode and apply EXIF orientation (a copy, so the caller's file may close)."""
    _check_pixels(image.size, name, max_pixels)
    try:
        image.load()
        return ImageOps.exif_transpose(image)
    except (
        Exception
    ) as exc:  # Pillow's plugins raise OSError, SyntaxError, ValueError, struct.error ... on bad bytes
        raise MmwbInputError(f"{name}: cannot decode image: {exc}") from exc


def _check_pixels(size: tuple[int, int], name: str, max_pixels: int) -> None:
    width, height = size
    if width * height == 0:
        raise MmwbInputError(f"{name}: image has no pixels ({width}x{height})")
    if width * height > max_pixels:
        raise MmwbInputError(
            f"{name}: {width}x{height} = {width * height} pixels is more than max_pixels={max_pixels}; "
            "refusing to decode it (raise max_pixels if the image is trusted)"
        )


def composite_rgb(image: Image.Image, background: RGB = (255, 255, 255)) -> Image.Image:
    """Any Pillow mode -> RGB, compositing alpha (or a transparent colour/palette index) over ``background``."""
    if image.mode in _WIDE_MODES:
        image = _wide_to_l(image)
    if image.mode == "La":
        image = image.convert("LA")  # Pillow has no direct route from premultiplied L to RGBA
    bands = image.getbands()
    if "A" in bands or "a" in bands or "transparency" in image.info:
        canvas = Image.new("RGBA", image.size, (*background, 255))
        return Image.alpha_composite(canvas, image.convert("RGBA")).convert("RGB")
    return image if image.mode == "RGB" else image.convert("RGB")


def _wide_to_l(image: Image.Image) -> Image.Image:
    """16/32-bit integer or float greyscale -> 8 bit by scaling its value range (Pillow's own convert clips at 255)."""
    values = np.nan_to_num(np.asarray(image, dtype=np.float32))
    low, high = _value_range(image.mode, values)
    scaled = (values - low) * (255 / (high - low)) if high > low else np.zeros_like(values)
    return Image.fromarray(np.clip(np.rint(scaled), 0, 255).astype(np.uint8))


def _value_range(mode: str, values: np.ndarray) -> tuple[float, float]:
    """The range that maps to 0..255: the format's own where it has one, else the image's observed min..max."""
    if mode.startswith("I;16"):
        return 0.0, float(_UINT16_MAX)
    # Pillow hands out much 16-bit data (e.g. from TIFF) as "I"; float images ("F") are usually in [0, 1].
    nominal_high = float(_UINT16_MAX) if mode == "I" else 1.0
    low, high = float(values.min()), float(values.max())
    if low >= 0 and high <= nominal_high:
        return 0.0, nominal_high
    return low, high


def _tensor_to_array(tensor: torch.Tensor) -> np.ndarray:
    """(C, H, W) or (H, W) tensor on any device -> (H, W, C) or (H, W) numpy array."""
    tensor = tensor.detach().cpu()
    if tensor.ndim == 3:
        tensor = tensor.permute(1, 2, 0)  # (C, H, W) -> (H, W, C)
    if tensor.is_floating_point():
        tensor = tensor.float()  # bfloat16 has no numpy dtype
    return tensor.numpy()


def _array_to_image(array: np.ndarray, name: str) -> Image.Image:
    """(H, W) or (H, W, C) array, C in 1..4 (L, LA, RGB, RGBA) -> PIL image, values scaled to uint8."""
    if array.ndim == 3 and array.shape[2] == 1:
        array = array[:, :, 0]
    if array.ndim != 2 and not (array.ndim == 3 and array.shape[2] in (2, 3, 4)):
        raise MmwbInputError(f"{name}: expected (H, W) or (H, W, C) with C in 1..4 (tensors: (C, H, W))")
    return Image.fromarray(np.ascontiguousarray(_to_uint8(array, name)))


def _to_uint8(array: np.ndarray, name: str) -> np.ndarray:
    if array.dtype == np.uint8:
        return array
    if array.dtype == np.bool_:
        return array.astype(np.uint8) * 255
    if array.dtype == np.uint16:
        return np.rint(array * (255 / _UINT16_MAX)).astype(np.uint8)
    if np.issubdtype(array.dtype, np.floating):
        if not np.isfinite(array).all() or array.min() < 0 or array.max() > 1:
            raise MmwbInputError(
                f"{name}: float values must be finite and in [0, 1], got min {array.min()} max {array.max()}"
            )
        return np.rint(array * 255).astype(np.uint8)
    raise MmwbInputError(
        f"{name}: unsupported dtype {array.dtype}; use uint8, uint16, bool or float in [0, 1]"
    )


def expand_image_sources(specs: Sequence[str]) -> list[Path]:
    """CLI image arguments -> files: a file as given, a directory's images (by extension, sorted), a glob's matches.

    Directories are not searched recursively and hidden files are skipped; a path found twice is kept once.
    """
    found: dict[Path, None] = {}
    for spec in specs:
        for path in _expand_one(spec):
            found.setdefault(path)
    return list(found)


def _expand_one(spec: str) -> list[Path]:
    path = Path(spec).expanduser()
    if path.is_file():
        return [path]
    if path.is_dir():
        images = sorted(
            p
            for p in path.iterdir()
            if p.is_file() and not p.name.startswith(".") and p.suffix.lower() in IMAGE_EXTENSIONS
        )
        if not images:
            raise MmwbInputError(
                f"{spec}: directory has no image files ({', '.join(sorted(IMAGE_EXTENSIONS))})"
            )
        return images
    if any(char in spec for char in "*?["):
        matches = sorted(
            Path(m) for m in glob.glob(os.path.expanduser(spec), recursive=True) if os.path.isfile(m)
        )
        if not matches:
            raise MmwbInputError(f"{spec}: pattern matches no files")
        return matches
    raise MmwbInputError(f"{spec}: no such file or directory")


@contextmanager
def atomic_write_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path next to ``path``; once the writer has created that file, it replaces ``path`` at once.

    Readers never see a half-written file and a writer that raises leaves the old ``path`` untouched. The temporary
    name keeps the suffix, so writers that pick a format from it (PIL, matplotlib) still work.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.stem}.{secrets.token_hex(6)}.tmp{path.suffix}")
    try:
        yield tmp
        with open(tmp, "rb") as written:
            os.fsync(written.fileno())  # the data must be on disk before the rename makes it the real file
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def write_json(path: str | os.PathLike, data: Any) -> None:
    """``path`` as indented JSON (non-JSON values as their str), written atomically."""
    with atomic_write_path(path) as tmp:
        tmp.write_text(json.dumps(data, indent=2, default=str) + "\n", encoding="utf-8")


def save_image_grid(
    images: Sequence[ImageSource],
    path: str | os.PathLike,
    labels: Sequence[str] | None = None,
    ncols: int | None = None,
    cell_size: int | tuple[int, int] | None = None,
) -> Path:
    """Tile images (each fitted into its cell) into one PNG with each label wrapped underneath; returns ``path``.

    ``cell_size`` defaults to the largest width and height among the images; ``ncols`` to a near-square grid.
    """
    if not images:
        raise MmwbInputError(f"{path}: no images to put in the grid")
    if labels is not None and len(labels) != len(images):
        raise MmwbInputError(f"{path}: {len(labels)} labels for {len(images)} images")
    if ncols is not None and ncols < 1:
        raise MmwbInputError(f"{path}: ncols must be at least 1, got {ncols}")
    tiles = [load_image(image) for image in images]
    cell_w, cell_h = _cell_size(cell_size, tiles, path)
    ncols = min(ncols or math.ceil(math.sqrt(len(tiles))), len(tiles))
    nrows = math.ceil(len(tiles) / ncols)

    pad = 4
    font = ImageFont.load_default(size=max(10, cell_w // 28))
    line_h = font.getbbox("Ag")[3] + 2
    captions = [_wrap(label, font, cell_w - 2 * pad) for label in labels] if labels else []
    caption_h = max(len(lines) for lines in captions) * line_h + 2 * pad if captions else 0

    grid = Image.new("RGB", (ncols * cell_w, nrows * (cell_h + caption_h)), "white")
    draw = ImageDraw.Draw(grid)
    for index, tile in enumerate(tiles):
        row, col = divmod(index, ncols)
        x, y = col * cell_w, row * (cell_h + caption_h)
        fitted = ImageOps.contain(tile, (cell_w, cell_h), method=Image.Resampling.BICUBIC)
        grid.paste(fitted, (x + (cell_w - fitted.width) // 2, y + (cell_h - fitted.height) // 2))
        for line_no, line in enumerate(captions[index] if captions else []):
            draw.text((x + pad, y + cell_h + pad + line_no * line_h), line, fill="black", font=font)
    with atomic_write_path(path) as tmp:
        grid.save(tmp, format="PNG")
    return Path(path)


def _cell_size(
    cell_size: int | tuple[int, int] | None, tiles: list[Image.Image], path: str | os.PathLike
) -> tuple[int, int]:
    if cell_size is None:
        return max(t.width for t in tiles), max(t.height for t in tiles)
    width, height = (cell_size, cell_size) if isinstance(cell_size, int) else cell_size
    if width < 1 or height < 1:
        raise MmwbInputError(f"{path}: cell_size must be positive, got {cell_size}")
    return width, height


def _wrap(text: str, font: ImageFont.FreeTypeFont | ImageFont.ImageFont, width: int) -> list[str]:
    """Greedy word wrap measured in pixels; a word wider than the cell is cut where it overflows."""
    lines = []
    for paragraph in text.splitlines() or [""]:
        line = ""
        for word in paragraph.split():
            candidate = f"{line} {word}" if line else word
            if font.getlength(candidate) <= width:
                line = candidate
                continue
            if line:
                lines.append(line)
            while len(word) > 1 and font.getlength(word) > width:
                cut = max(1, max(k for k in range(len(word) + 1) if font.getlength(word[:k]) <= width))
                lines.append(word[:cut])
                word = word[cut:]
            line = word
        lines.append(line)
    return lines
