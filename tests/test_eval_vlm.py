"""``mmwb eval vlm``: the scores the recipe and the model card use, as a verb, checked against their definition."""

import json

import pytest

from mmwb.cli.main import main
from mmwb.data.shapes import read_index, write_dataset
from mmwb.pipelines.vlm import load_default_or
from mmwb.pipelines.vlm_eval import EvaluationConfig, evaluate_vlm, normalize


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp("eval_shapes")
    write_dataset(root, 0, seed=11, size=64, n_eval=24, progress=False)
    return root


def test_eval_vlm_json_matches_the_evaluation_it_reports(data, capsys):
    assert main(["eval", "vlm", "--data", str(data), "--max-items", "20", "--device", "cpu", "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    metrics, rows = evaluate_vlm(load_default_or(None, device="cpu"), data, EvaluationConfig(max_items=20),
                                 progress=False)  # fmt: skip
    assert report["n_images"] == metrics["test_images"] == 20
    assert report["caption_exact_match"] == pytest.approx(metrics["test_caption_exact_match"])
    assert report["cider"] == pytest.approx(metrics["test_caption_cider"])
    assert report["vqa_accuracy"] == pytest.approx(metrics["test_vqa_accuracy"])
    kinds = {
        key.removeprefix("test_vqa_accuracy_") for key in metrics if key.startswith("test_vqa_accuracy_")
    }
    assert set(report["vqa_by_type"]) == kinds and "position" in kinds
    for kind, accuracy in report["vqa_by_type"].items():
        assert accuracy == pytest.approx(metrics[f"test_vqa_accuracy_{kind}"])
    records = read_index(data, "test")[:20]
    assert report["n_questions"] == sum(len(r["qa"]) for r in records)
    asked = [qa for row in rows for qa in row["qa"]]  # recounted from the predictions themselves
    hits = [normalize(qa["prediction"]) == normalize(qa["answer"]) for qa in asked]
    assert report["vqa_accuracy"] == pytest.approx(sum(hits) / len(hits))
    for n, accuracy in report["caption_exact_match_by_objects"].items():
        hits = [normalize(row["caption"]) == normalize(row["reference"])
                for row, record in zip(rows, records) if len(record["objects"]) == int(n)]  # fmt: skip
        assert accuracy == pytest.approx(sum(hits) / len(hits))


def test_eval_vlm_bad_input_is_one_line(data, tmp_path, capsys):
    assert main(["eval", "vlm", "--data", str(tmp_path / "none")]) == 2
    assert "none/test.jsonl: no such index" in capsys.readouterr().err
    assert main(["eval", "vlm", "--data", str(data), "--max-items", "0"]) == 2
    assert "--max-items must be >= 1, got 0" in capsys.readouterr().err
