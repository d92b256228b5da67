"""mmwb recipe tiny-shapes (the default VLM's recipe) end to end in its short form (--quick): LM pretraining, then
the conv tower, projector and whole decoder trained together; the model answers as its metrics say, and the same
seed gives the same model."""

import json
import sys
from pathlib import Path

import pytest
from safetensors.torch import load_file

import mmwb
from mmwb.models.vision.conv import ConvTower
from mmwb.train.recipes import run_recipe

sys.path.insert(0, str(Path(__file__).resolve().parent))
from vlm_train_fixtures import check_recipe_model_answers_as_recorded  # noqa: E402


@pytest.fixture(scope="module")
def quick_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("recipe") / "tiny"
    return out, run_recipe("tiny-shapes", out, quick=True, progress=False)


@pytest.mark.slow
def test_quick_recipe_runs_both_stages_into_a_conv_tower_vlm(quick_run):
    out, report = quick_run
    lm, vlm_stage = report["stages"]["stage1_lm"], report["stages"]["stage2_vlm"]
    assert lm["status"] == vlm_stage["status"] == "done"
    assert lm["metrics"]["steps"] == vlm_stage["metrics"]["steps"] == 3
    assert 1.0 < lm["metrics"]["val_perplexity"] < 1000.0
    assert (out / "stage1_lm" / "tokenizer.json").is_file()  # the LM stage fits its own tokenizer
    metrics = vlm_stage["metrics"]
    assert metrics["test_images"] == 16 and metrics["adapter"] is None  # full fine-tuning, nothing to merge
    for kind in ("colour", "shape", "count", "yesno"):
        assert 0.0 <= metrics[f"test_vqa_accuracy_{kind}"] <= 1.0
    vlm = mmwb.from_pretrained(out / "stage2_vlm")
    assert isinstance(vlm.vision_tower, ConvTower) and vlm.config.template == "chat"
    saved = load_file(out / "stage2_vlm" / "model.safetensors")
    heads = ("cell_head", "relation_head")  # the auxiliary heads stay in the run
    assert not any(head in key for key in saved for head in heads)
    logged = json.loads((out / "runs" / "stage2_vlm" / "metrics.jsonl").read_text().splitlines()[-1])
    assert all(logged[f"{part}_loss"] > 0 for part in ("cell", "grounding", "relation"))  # each one trained


@pytest.mark.slow
def test_the_recipes_model_answers_as_its_metrics_say(quick_run):
    out, report = quick_run
    check_recipe_model_answers_as_recorded(out, "stage2_vlm", report["stages"]["stage2_vlm"]["metrics"])


@pytest.mark.slow
def test_the_same_seed_gives_the_same_model(quick_run, tmp_path):
    out, _ = quick_run
    again = tmp_path / "again"
    run_recipe("tiny-shapes", again, quick=True, progress=False)
    for stage in ("stage1_lm", "stage2_vlm"):
        first, second = (
            load_file(out / stage / "model.safetensors"),
            load_file(again / stage / "model.safetensors"),
        )
        assert first.keys() == second.keys()
        assert all(first[k].equal(second[k]) for k in first), stage


@pytest.mark.slow
def test_the_optional_dpo_stage_tunes_the_stage2_model_on_its_own_pairs(quick_run):
    """``--dpo``: the finished stages are skipped, the pairs are made from the stage 2 model, then DPO runs."""
    from mmwb.data.preferences import read_preferences
    from mmwb.errors import MmwbConfigError

    out, _ = quick_run
    report = run_recipe("tiny-shapes", out, quick=True, progress=False, optional=("stage3_dpo",))
    assert report["stages"]["stage2_vlm"]["status"] == "skipped"
    dpo = report["stages"]["stage3_dpo"]
    assert dpo["status"] == "done" and dpo["metrics"]["steps"] == 3 and dpo["metrics"]["test_images"] == 8
    pairs = read_preferences(out / "preferences" / "preferences.jsonl")
    summary = json.loads((out / "preferences" / "summary.json").read_text())
    assert summary["pairs"] == len(pairs) and summary["images"] == 16
    assert mmwb.from_pretrained(out / "stage3_dpo").config.template == "chat"
    with pytest.raises(MmwbConfigError, match="no optional stage 'stage3_dpo'"):
        run_recipe("tiny-shapes-llava", out / "llava", quick=True, progress=False, optional=("stage3_dpo",))
