"""Condition preprocessors, the resize/crop policy, mode conversion and the messages for unknown names."""

import logging

import numpy as np
import pytest
from PIL import Image

from mmwb.data.conditions import (
    PREPROCESSORS,
    ConditionOptions,
    default_size,
    fit_image,
    prepare_condition,
    to_rgb,
)
from mmwb.errors import MmwbInputError
from mmwb.models.diffusion.schedulers import check_scheduler_name, make_scheduler


def square_image(size=64, lo=16, hi=48):
    """A white square on black covering rows/columns lo..hi-1."""
    array = np.zeros((size, size, 3), np.uint8)
    array[lo:hi, lo:hi] = 255
    return Image.fromarray(array)


def test_canny_edges_lie_on_the_square_border():
    edges = np.asarray(prepare_condition(square_image(), "canny", (64, 64)))
    assert edges.shape == (64, 64, 3) and set(np.unique(edges)) == {0, 255}
    ys, xs = np.nonzero(edges[:, :, 0])
    assert ys.min() in (15, 16) and ys.max() in (47, 48) and xs.min() in (15, 16) and xs.max() in (47, 48)
    on_border = (np.minimum(np.abs(ys - 16), np.abs(ys - 47)) <= 1) | (
        np.minimum(np.abs(xs - 16), np.abs(xs - 47)) <= 1
    )
    assert on_border.all()  # no edge inside the square or in the background
    assert edges[32, 32, 0] == 0 and edges[5, 5, 0] == 0


def test_canny_thresholds_are_used():
    # a 20-level step: its 3x3 Sobel gradient (about 4 x 20 = 80) stays under the default thresholds 100/200
    faint = Image.fromarray((np.asarray(square_image()) * (20 / 255)).astype(np.uint8))
    assert np.asarray(prepare_condition(faint, "canny", (64, 64))).max() == 0
    low = ConditionOptions(low_threshold=20, high_threshold=40)
    assert np.asarray(prepare_condition(faint, "canny", (64, 64), options=low)).max() == 255


def test_scribble_is_thicker_than_canny_and_lineart_traces_the_border():
    canny = np.asarray(prepare_condition(square_image(), "canny", (64, 64)))[:, :, 0] > 0
    scribble = np.asarray(prepare_condition(square_image(), "scribble", (64, 64)))[:, :, 0] > 0
    lineart = np.asarray(prepare_condition(square_image(), "lineart", (64, 64)))[:, :, 0] > 0
    assert scribble.sum() > 2 * canny.sum() and scribble[canny].all()
    assert lineart[16, 32] or lineart[15, 32]  # top border
    assert not lineart[32, 32] and not lineart[4, 4]


@pytest.mark.parametrize("name", ["seg", "depth", "pose", "none"])
def test_supplied_maps_pass_through_at_the_right_size(name):
    image = square_image()
    assert np.array_equal(np.asarray(prepare_condition(image, name, (64, 64))), np.asarray(image))


def test_segmentation_is_resized_without_new_colours():
    colours = np.array([[255, 0, 0], [0, 255, 0], [0, 0, 255], [255, 255, 0]], np.uint8)
    labels = np.random.default_rng(0).integers(0, 4, (16, 16))
    seg = Image.fromarray(colours[labels])
    resized = np.asarray(prepare_condition(seg, "seg", (40, 24)))
    assert resized.shape == (24, 40, 3)
    assert {tuple(c) for c in resized.reshape(-1, 3)} <= {tuple(c) for c in colours}


def test_crop_keeps_the_centre_and_pad_keeps_everything():
    wide = np.zeros((32, 64, 3), np.uint8)
    wide[:, :16] = 255  # a white band on the left quarter
    image = Image.fromarray(wide)
    cropped = np.asarray(fit_image(image, (32, 32), "crop"))
    padded = np.asarray(fit_image(image, (32, 32), "pad"))
    stretched = np.asarray(fit_image(image, (32, 32), "resize"))
    assert cropped.shape == padded.shape == stretched.shape == (32, 32, 3)
    assert cropped.max() == 0  # the centre 32 columns hold no part of the band
    assert padded[:8].max() == 0 and padded[8:24, :7].min() == 255  # letterboxed, band kept
    assert stretched[:, :7].min() == 255 and stretched[:, 9:].max() == 0


def test_default_size_keeps_aspect_at_native_resolution():
    assert default_size((640, 480), native=512) == (680, 512)
    assert default_size((480, 640), native=512) == (512, 680)
    assert default_size((100, 100), native=64) == (64, 64)
    assert all(side % 8 == 0 for side in default_size((333, 517), native=512))


def test_mode_and_size_conversion_are_logged(caplog):
    gray = Image.fromarray(np.full((20, 30), 128, np.uint8))  # mode L
    with caplog.at_level(logging.INFO, logger="mmwb"):
        condition = prepare_condition(gray, "none", (16, 16), label="control image 0")
    assert condition.mode == "RGB" and condition.size == (16, 16)
    assert "control image 0: mode L converted to RGB" in caplog.text
    assert "control image 0: 30x20 fitted to 16x16 by crop" in caplog.text


def test_sixteen_bit_depth_is_scaled_to_eight_bits():
    depth = Image.fromarray(np.array([[0, 1000], [2000, 4000]], np.uint16))
    rgb = np.asarray(to_rgb(depth, "depth"))
    assert rgb.shape == (2, 2, 3)
    assert rgb[0, 0, 0] == 0 and rgb[1, 1, 0] == 255 and 60 <= rgb[0, 1, 0] <= 66


def test_transparent_control_pixels_are_white_as_in_training():
    """An RGBA map's transparent pixels become white, as the training loader (mmwb.data.io) makes them; dropping
    alpha would turn them black, which a canny or scribble ControlNet reads as content."""
    rgba = np.zeros((2, 2, 4), np.uint8)
    rgba[0, 0] = (255, 0, 0, 255)  # one opaque red pixel, the rest fully transparent black
    rgb = np.asarray(to_rgb(Image.fromarray(rgba), "scribble"))
    assert rgb[0, 0].tolist() == [255, 0, 0] and rgb[1, 1].tolist() == [255, 255, 255]


def test_rgb_input_is_not_converted(caplog):
    with caplog.at_level(logging.INFO, logger="mmwb"):
        prepare_condition(square_image(), "canny", (64, 64))
    assert caplog.text == ""


def test_unknown_preprocessor_lists_the_known_ones():
    with pytest.raises(MmwbInputError, match="unknown preprocessor 'sobel'; choose one of canny, scribble"):
        prepare_condition(square_image(), "sobel", (64, 64))
    assert {"canny", "scribble", "lineart", "seg", "depth", "pose", "none"} <= set(PREPROCESSORS)


def test_unknown_resize_mode_and_scheduler_are_named():
    with pytest.raises(MmwbInputError, match="unknown resize mode 'zoom'; choose one of crop, pad, resize"):
        fit_image(square_image(), (32, 32), "zoom")
    with pytest.raises(MmwbInputError, match="unknown scheduler 'plms'; choose one of ddim, euler, euler_a"):
        make_scheduler("plms", {})
    assert check_scheduler_name("unipc") == "unipc"
