"""The shipped tiny-shapes VLM: the default of caption/ask, and still as good as its model card says."""

import json

import pytest

from mmwb.cli.main import main
from mmwb.data.shapes import make_example, write_dataset
from mmwb.pipelines.vlm import DEFAULT_MODEL, load_default_or
from mmwb.pipelines.vlm_eval import EvaluationConfig, evaluate_vlm

RECORDED = json.loads((DEFAULT_MODEL / "metrics.json").read_text())
SAMPLE = RECORDED["fixed_sample"]  # the first N test images of the recipe's data seed, scored when it shipped


def test_caption_and_ask_use_the_shipped_model_by_default(tmp_path, capsys):
    image = tmp_path / "scene.png"
    example, record = make_example(SAMPLE["seed"], "test", 0)
    example.save(image)
    assert main(["caption", str(image), "--json"]) == 0
    captioned = json.loads(capsys.readouterr().out)
    assert captioned["model"] == str(DEFAULT_MODEL)
    assert main(["ask", str(image), record["qa"][0]["question"], "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["results"][0]["text"]


@pytest.mark.slow
def test_shipped_model_reaches_its_recorded_metrics_on_a_fixed_test_sample(tmp_path):
    write_dataset(
        tmp_path, 0, seed=SAMPLE["seed"], size=SAMPLE["size"], n_eval=SAMPLE["images"], progress=False
    )
    config = EvaluationConfig(max_items=SAMPLE["images"])
    metrics, _ = evaluate_vlm(load_default_or(None, device="cpu"), tmp_path, config, progress=False)
    for key in ("test_caption_exact_match", "test_vqa_accuracy"):
        assert metrics[key] >= SAMPLE[key] - 0.02, (key, metrics[key], SAMPLE[key])
