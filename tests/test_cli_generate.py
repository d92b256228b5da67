"""``mmwb generate`` on a tiny random model: outputs written, and ``--from run.json`` repeats the same pixels."""

import argparse
import json

import numpy as np
import pytest
from PIL import Image

from mmwb.cli import generate
from mmwb.cli.main import common_flags
from mmwb.errors import MmwbCheckpointError, MmwbConfigError, MmwbInputError
from mmwb.pipelines.controlnet import GenerationResult, read_record
from mmwb.testing.tiny_sd import save_tiny_controlnet_sd


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    root = tmp_path_factory.mktemp("tiny_cli")
    model, controlnets = save_tiny_controlnet_sd(root, n_controlnets=2)
    square = np.zeros((48, 40), np.uint8)  # mode L, another size than the output: both are converted
    square[12:36, 10:30] = 255
    Image.fromarray(square).save(root / "square.png")
    return model, controlnets, root / "square.png"


def parse(*argv):
    parser = argparse.ArgumentParser(parents=[common_flags()])
    generate.add_arguments(parser)
    return parser.parse_args([str(arg) for arg in argv])


def pixels(path):
    return np.asarray(Image.open(path))


def test_generate_writes_images_grid_and_sidecar_and_repeats_from_it(tiny, tmp_path):
    model, controlnets, square = tiny
    first = generate.run(
        parse(
            "--model",
            model,
            "--controlnet",
            *controlnets,
            "--control-image",
            square,
            "--preprocess",
            "canny",
            "none",
            "--prompt",
            "a white square",
            "--steps",
            "2",
            "--num-images",
            "2",
            "--width",
            "32",
            "--height",
            "32",
            "--scheduler",
            "dpmpp_2m",
            "--cn-scale",
            "0.8",
            "1.2",
            "--guess-mode",
            "--seed",
            "3",
            "--out",
            tmp_path / "a",
            "--json",
        )  # fmt: skip
    )
    assert [pixels(p).shape for p in first["images"]] == [(32, 32, 3)] * 2
    assert [pixels(p).shape for p in first["conditions"]] == [(32, 32, 3)] * 2
    grid_height, grid_width, _ = pixels(first["grid"]).shape
    assert grid_width == 4 * 32 and grid_height > 32  # one row: 2 conditions | 2 images, labels below
    sidecar = json.loads((tmp_path / "a" / "run.json").read_text())
    assert sidecar["params"]["cn_scale"] == [0.8, 1.2] and sidecar["params"]["preprocess"] == [
        "canny",
        "none",
    ]
    assert sidecar["params"]["seed"] == 3 and sidecar["params"]["guess_mode"] is True
    assert sidecar["runtime"] == {"device": "cpu", "dtype": "fp32", "memory": sidecar["runtime"]["memory"]}
    assert sidecar["outputs"]["images"] == first["images"]

    again = generate.run(parse("--from", tmp_path / "a" / "run.json", "--out", tmp_path / "b", "--json"))
    for ours, theirs in zip(first["images"], again["images"], strict=True):
        assert np.array_equal(pixels(ours), pixels(theirs))
    assert again["params"] == first["params"]

    reseeded = generate.run(
        parse("--from", tmp_path / "a" / "run.json", "--seed", "4", "--out", tmp_path / "c", "--json")
    )
    assert reseeded["params"]["seed"] == 4
    assert not np.array_equal(pixels(first["images"][0]), pixels(reseeded["images"][0]))


def test_record_round_trips_through_json(tiny, tmp_path):
    model, controlnets, square = tiny
    args = parse("--model", model, "--controlnet", controlnets[0], "--control-image", square, "--prompt", "p",
                 "--canny-thresholds", "10", "20", "--guidance-end", "0.5", "--vae-tiling")  # fmt: skip
    source, runtime, params = generate.resolve_request(args)
    assert (
        params.conditions.low_threshold == 10 and params.guidance_end == [0.5] and runtime.memory.vae_tiling
    )
    record = GenerationResult([], [], params, source, runtime).record()
    assert read_record(json.loads(json.dumps(record))) == (source, runtime, params)


def test_missing_arguments_and_bad_records_are_named(tiny, tmp_path):
    model, controlnets, square = tiny
    with pytest.raises(MmwbInputError, match="--prompt is needed"):
        generate.run(parse("--control-image", square))
    with pytest.raises(MmwbInputError, match="needs its --controlnet"):
        generate.run(parse("--model", model, "--prompt", "p", "--control-image", square))
    (tmp_path / "bad.json").write_text('{"params": {}}')
    with pytest.raises(MmwbInputError, match="not an mmwb generate record .missing model, runtime"):
        generate.run(parse("--from", tmp_path / "bad.json"))
    with pytest.raises(MmwbInputError, match="run record not found"):
        generate.run(parse("--from", tmp_path / "none.json"))
    base = (
        "--model",
        model,
        "--controlnet",
        controlnets[0],
        "--prompt",
        "p",
        "--out",
        tmp_path / "o",
        "--json",
    )
    with pytest.raises(MmwbInputError, match="missing.png: control image not found"):
        generate.run(parse(*base, "--control-image", tmp_path / "missing.png"))
    (tmp_path / "junk.png").write_bytes(b"not a png")
    with pytest.raises(MmwbInputError, match="junk.png: not an image"):
        generate.run(parse(*base, "--control-image", tmp_path / "junk.png"))
    with pytest.raises(MmwbInputError, match="size 30x32: width and height must be multiples of 8"):
        generate.run(parse(*base, "--control-image", square, "--width", "30", "--height", "32"))
    with pytest.raises(MmwbInputError, match="--cn-scale: got 2 values for 1 ControlNet"):
        generate.run(parse(*base, "--control-image", square, "--cn-scale", "1", "2"))
    with pytest.raises(MmwbCheckpointError, match="nowhere: model not found"):
        generate.run(parse(*base[:1], tmp_path / "nowhere", *base[2:], "--control-image", square))


def test_non_finite_numbers_are_refused_before_any_work(tiny, tmp_path, capsys):
    """``--guidance-scale nan`` used to run, write NaN images and leave its output folder behind."""
    from mmwb.cli.main import main
    from mmwb.pipelines.controlnet import ControlNetGenerator, GenerationParams

    model, controlnets, square = tiny
    out = tmp_path / "o"
    base = ["generate", "--model", model, "--controlnet", controlnets[0], "--prompt", "p",
            "--control-image", square, "--out", out]  # fmt: skip
    for flag, value in (("--guidance-scale", "nan"), ("--cn-scale", "inf"), ("--guidance-end", "-inf")):
        with pytest.raises(SystemExit) as stop:
            main([str(a) for a in base] + [f"{flag}={value}"])
        assert stop.value.code == 2
        assert f"argument {flag}: must be a finite number, got '{value}'" in capsys.readouterr().err
    assert not out.exists()
    record = {"model": {"model": str(model), "controlnets": [str(controlnets[0])]}, "runtime": {},
              "params": {"prompt": "p", "guidance_scale": float("nan")}}  # fmt: skip
    (tmp_path / "nan.json").write_text(json.dumps(record))  # Python's json writes and reads NaN
    with pytest.raises(MmwbConfigError, match="params.guidance_scale must be a finite number, got nan"):
        read_record(json.loads((tmp_path / "nan.json").read_text()))
    generator = ControlNetGenerator.from_pretrained(model, [controlnets[0]], device="cpu")
    params = GenerationParams(prompt="p", guidance_end=[float("inf")], steps=1)
    with pytest.raises(MmwbInputError, match=r"guidance_end must be finite, got \[inf\]"):
        generator.generate(params, control_images=[Image.open(square)], progress=False)
