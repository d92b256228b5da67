"""The shipped tiny shapes SD + canny ControlNet: ``mmwb generate`` uses it by default, and it follows control."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

from mmwb.bench.generate import control_f1, shapes_examples
from mmwb.cli.main import main
from mmwb.models.diffusion.shapes_sd import DEFAULT_CONTROLNET, DEFAULT_MODEL, IMAGE_SIZE
from mmwb.pipelines.controlnet import ControlNetGenerator, GenerationParams

# Recorded for these 6 test-split scenes at 10 DDIM steps, guidance 7.5 (see the ControlNet's MODEL_CARD.md):
# edge F1 0.692 with control, 0.155 without; the thresholds leave room for other CPUs' rounding.
MIN_CONTROL_F1 = 0.55
MIN_MARGIN = 0.3


def test_generate_without_model_uses_the_shipped_default(tmp_path, capsys):
    example = shapes_examples(1)[0]
    example.image.save(tmp_path / "control.png")
    argv = ["generate", "--control-image", str(tmp_path / "control.png"), "--preprocess", "canny",
            "--prompt", example.prompt, "--steps", "4", "--out", str(tmp_path / "out"), "--json"]  # fmt: skip
    assert main(argv) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["model"] == {
        "model": str(DEFAULT_MODEL),
        "controlnets": [str(DEFAULT_CONTROLNET)],
        "config": None,
    }
    assert report["params"]["width"] == report["params"]["height"] == IMAGE_SIZE
    assert (tmp_path / "out" / "grid.png").is_file()


@pytest.mark.slow
def test_shipped_default_follows_the_control_edges():
    generator = ControlNetGenerator.from_pretrained(DEFAULT_MODEL, [DEFAULT_CONTROLNET], device="cpu")
    params = GenerationParams(prompt="", preprocess=["canny"], steps=10)
    scores = control_f1(generator, shapes_examples(6), params)
    assert scores["control"] >= MIN_CONTROL_F1, scores
    assert scores["control"] - scores["no_control"] >= MIN_MARGIN, scores


def test_controlnet_example_script_runs(tmp_path):
    script = Path(__file__).resolve().parents[1] / "pipelines" / "controlnet.py"
    args = [str(script), "--steps", "2", "--out", str(tmp_path)]
    done = subprocess.run([sys.executable, *args], capture_output=True, text=True, check=True, cwd=tmp_path)
    assert (tmp_path / "image.png").is_file() and (tmp_path / "condition.png").is_file()
    assert "(2 steps, seed" in done.stdout
