"""Caption / VQA evaluation: exact match, CIDEr-D, per-type VQA accuracy, and per-image prompts in the pipeline."""

import json

import pytest
from PIL import Image
from test_vlm import model  # noqa: F401 - the random tiny VLM fixture

from mmwb.data.captions import read_records
from mmwb.data.shapes import read_index, write_dataset
from mmwb.errors import MmwbInputError
from mmwb.pipelines.vlm import VLMPipeline
from mmwb.pipelines.vlm_eval import EvaluationConfig, caption_scores, evaluate_vlm, normalize, vqa_scores

REFS = ["a large red circle left of a small blue triangle", "a small green star", "a small yellow square above a large purple circle"]  # fmt: skip


def test_normalize_ignores_case_spacing_and_a_final_stop():
    assert normalize("  A Red  circle. ") == "a red circle" and normalize(None) == ""


def test_perfect_captions_score_exact_match_one_and_cider_ten():
    scores = caption_scores([r.upper() + "." for r in REFS], REFS)
    assert scores["caption_exact_match"] == 1.0
    assert scores["caption_cider"] == pytest.approx(10.0)  # CIDEr-D's maximum for captions of >= 4 words


def test_wrong_captions_lose_exact_match_and_cider_in_order():
    one_word_off = ["a large red circle left of a small blue star", *REFS[1:]]
    unrelated = ["a small purple star"] * 3
    partial, bad = caption_scores(one_word_off, REFS), caption_scores(unrelated, REFS)
    assert partial["caption_exact_match"] == pytest.approx(2 / 3) and bad["caption_exact_match"] == 0.0
    assert 10.0 > partial["caption_cider"] > bad["caption_cider"] >= 0.0


def test_vqa_accuracy_overall_and_per_question_type():
    scores = vqa_scores(
        ["Red", "two", "no", None], ["red", "three", "no", "yes"], ["colour", "count", "yesno", "yesno"]
    )
    assert scores == {
        "vqa_accuracy": 0.5,
        "vqa_accuracy_colour": 1.0,
        "vqa_accuracy_count": 0.0,
        "vqa_accuracy_yesno": 0.5,
    }


def test_pipeline_takes_one_prompt_per_image_and_matches_single_calls(model):  # noqa: F811
    pictures = [Image.new("RGB", (16, 16), c) for c in ("red", "blue", "green")]
    pipeline = VLMPipeline(model, batch_size=2)
    prompts = ["what colour is the circle?", None, "yes"]
    batched = pipeline(pictures, prompts, max_new_tokens=4)
    assert batched == [pipeline(p, q, max_new_tokens=4) for p, q in zip(pictures, prompts)]
    with pytest.raises(MmwbInputError, match="2 prompts for 3 images"):
        pipeline(pictures, prompts[:2])


def test_evaluate_scores_the_models_own_answers(model, tmp_path):  # noqa: F811
    write_dataset(tmp_path, 4, seed=0, size=32, n_eval=3, progress=False)
    metrics, rows = evaluate_vlm(
        model, tmp_path, EvaluationConfig(max_items=2, max_new_tokens=4), progress=False
    )
    records = read_index(tmp_path, "test")[:2]
    assert [r["reference"] for r in rows] == [r["caption"] for r in records] and metrics["test_images"] == 2
    predictions = [qa["prediction"] for row in rows for qa in row["qa"]]
    answers = [qa["answer"] for r in records for qa in r["qa"]]
    assert metrics["test_vqa_accuracy"] == pytest.approx(
        sum(normalize(p) == a for p, a in zip(predictions, answers)) / len(answers)
    )
    assert (
        metrics["test_caption_exact_match"]
        == caption_scores([r["caption"] for r in rows], [r["reference"] for r in rows])["caption_exact_match"]
    )


def test_shapes_records_can_add_a_caption_turn(tmp_path):
    path = tmp_path / "train.jsonl"
    item = {
        "image": "a.png",
        "caption": "a red circle",
        "qa": [{"question": "how many shapes?", "answer": "one"}],
    }
    path.write_text(json.dumps(item) + "\n")
    assert len(read_records(path, "qa")) == 1
    qa, caption = read_records(path, "qa", caption_question="describe the image")
    assert [t.text for t in qa.turns] == ["how many shapes?", "one"]
    assert [(t.role, t.text) for t in caption.turns] == [
        ("user", "describe the image"),
        ("assistant", "a red circle"),
    ]
    assert caption.turns[0].kind == "caption"  # what caption grounding (mmwb.train.grounding) looks for
