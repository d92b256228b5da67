"""ControlNet conditions: bring a control image to the generation size and mode, then run its preprocessor.

Each preprocessor is one small function from an RGB uint8 array to an RGB uint8 array, registered by name; edge
maps are white on black, as the canny/scribble/lineart ControlNets were trained on. Maps the user already made
(segmentation, depth, pose) pass through unchanged apart from size and mode. The image is fitted to the size
first and preprocessed second, so edges are drawn at the resolution the ControlNet sees.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal

import cv2
import numpy as np
from PIL import Image, ImageOps

from mmwb.data.io import composite_rgb
from mmwb.errors import MmwbInputError

log = logging.getLogger(__name__)

ResizeMode = Literal["crop", "pad", "resize"]
RESIZE_MODES: tuple[str, ...] = ("crop", "pad", "resize")


@dataclass(frozen=True)
class ConditionOptions:
    """Knobs of the edge preprocessors; recorded in the sidecar so a rerun draws the same edges."""

    low_threshold: int = 100  # Canny hysteresis thresholds on 0-255 gradients (OpenCV's usual pair)
    high_threshold: int = 200
    stroke_width: int = 3  # scribble: pixels of dilation, mimicking hand-drawn strokes


def canny(rgb: np.ndarray, options: ConditionOptions) -> np.ndarray:
    """Canny edges of the grey image, white on black."""
    gray = cv2.cvtColor(rgb, cv2.COLOR_RGB2GRAY)
    return _gray_to_rgb(cv2.Canny(gray, options.low_threshold, options.high_threshold))


def scribble(rgb: np.ndarray, options: ConditionOptions) -> np.ndarray:
    """Canny edges thickened into strokes: the scribble ControlNet expects coarse, sketch-like lines."""
    gray = cv2.cvtColor(rgb, cv2.COLOR_RGB2GRAY)
    edges = cv2.Canny(gray, options.low_threshold, options.high_threshold)
    kernel = np.ones((options.stroke_width, options.stroke_width), np.uint8)
    return _gray_to_rgb(cv2.dilate(edges, kernel))


def lineart(rgb: np.ndarray, options: ConditionOptions) -> np.ndarray:
    """Thresholded gradient magnitude: contours of every strength above Otsu's threshold, white on black."""
    gray = cv2.GaussianBlur(cv2.cvtColor(rgb, cv2.COLOR_RGB2GRAY), (3, 3), 0)
    magnitude = cv2.magnitude(
        cv2.Sobel(gray, cv2.CV_32F, 1, 0, ksize=3), cv2.Sobel(gray, cv2.CV_32F, 0, 1, ksize=3)
    )
    magnitude = cv2.normalize(magnitude, None, 0, 255, cv2.NORM_MINMAX).astype(np.uint8)
    _, lines = cv2.threshold(magnitude, 0, 255, cv2.THRESH_BINARY | cv2.THRESH_OTSU)
    return _gray_to_rgb(lines)


def passthrough(rgb: np.ndarray, options: ConditionOptions) -> np.ndarray:
    """A map the user made already (segmentation, depth, pose): used as it is."""
    return rgb


def _gray_to_rgb(gray: np.ndarray) -> np.ndarray:
    return np.repeat(gray[:, :, None], 3, axis=2)  # (H, W) -> (H, W, 3)


@dataclass(frozen=True)
class Preprocessor:
    fn: Callable[[np.ndarray, ConditionOptions], np.ndarray]
    # label maps must not be blended into colours that name no class, so segmentation resizes by nearest pixel
    resample: Image.Resampling = Image.Resampling.BICUBIC


PREPROCESSORS: dict[str, Preprocessor] = {
    "canny": Preprocessor(canny),
    "scribble": Preprocessor(scribble),
    "lineart": Preprocessor(lineart),
    "seg": Preprocessor(passthrough, Image.Resampling.NEAREST),  # a segmentation map the user made
    "depth": Preprocessor(passthrough),  # a depth map the user made
    "pose": Preprocessor(passthrough),  # a pose skeleton image the user made
    "none": Preprocessor(passthrough),  # the control image as it is
}


def check_preprocessor_name(name: str) -> str:
    """Return ``name`` if it is a registered preprocessor, else raise an error listing the registered ones."""
    if name not in PREPROCESSORS:
        raise MmwbInputError(f"unknown preprocessor {name!r}; choose one of {', '.join(PREPROCESSORS)}")
    return name


def check_resize_mode(mode: str) -> str:
    if mode not in RESIZE_MODES:
        raise MmwbInputError(f"unknown resize mode {mode!r}; choose one of {', '.join(RESIZE_MODES)}")
    return mode


def default_size(image_size: tuple[int, int], native: int, multiple: int = 8) -> tuple[int, int]:
    """(width, height) with the shorter side at the model's native resolution and the control image's aspect.

    Both sides are rounded down to ``multiple`` (SD needs sizes divisible by 8), never below ``multiple``.
    """
    width, height = image_size
    scale = native / min(width, height)
    return tuple(max(multiple, round(side * scale) // multiple * multiple) for side in (width, height))  # type: ignore[return-value]


def fit_image(
    image: Image.Image,
    size: tuple[int, int],
    mode: str,
    resample: Image.Resampling = Image.Resampling.BICUBIC,
) -> Image.Image:
    """Fit ``image`` to ``size`` (width, height).

    ``crop`` scales to cover and cuts the centre (nothing stretched, borders lost), ``pad`` scales to fit and
    pads with black (nothing lost), ``resize`` stretches to the size.
    """
    if image.size == tuple(size):
        return image
    if check_resize_mode(mode) == "crop":
        return ImageOps.fit(image, size, method=resample)
    if mode == "pad":
        return ImageOps.pad(image, size, method=resample, color=(0, 0, 0))
    return image.resize(size, resample)


def to_rgb(image: Image.Image, label: str) -> Image.Image:
    """``image`` as 8-bit RGB, saying so when it was not; 16-bit and float maps (depth) are min-max scaled, and
    transparent pixels composited over white, as the training data loader does."""
    if image.mode == "RGB":
        return image
    log.info("%s: mode %s converted to RGB", label, image.mode)
    if image.mode in ("I", "I;16", "I;16B", "I;16L", "F"):
        values = np.asarray(image, dtype=np.float64)
        span = values.max() - values.min()
        scaled = (values - values.min()) / span * 255 if span > 0 else np.zeros_like(values)
        return Image.fromarray(_gray_to_rgb(scaled.round().astype(np.uint8)))
    return composite_rgb(image)


def prepare_condition(
    image: Image.Image,
    preprocess: str,
    size: tuple[int, int],
    resize: str = "crop",
    options: ConditionOptions | None = None,
    label: str = "control image",
) -> Image.Image:
    """The condition a ControlNet receives: ``image`` in RGB, fitted to ``size`` (width, height), preprocessed."""
    preprocessor = PREPROCESSORS[check_preprocessor_name(preprocess)]
    rgb = to_rgb(image, label)
    if rgb.size != tuple(size):
        log.info("%s: %dx%d fitted to %dx%d by %s", label, *rgb.size, *size, resize)
    fitted = fit_image(rgb, size, resize, preprocessor.resample)
    return Image.fromarray(preprocessor.fn(np.asarray(fitted), options or ConditionOptions()))
