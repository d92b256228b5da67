"""mmwb recipe tiny-shapes-llava: all four stages end to end (--quick), loadable outputs, metrics, resumption;
the recipe machinery (skipping, resuming, overrides, data step) with it."""

import json
import shutil
import sys
from pathlib import Path

import open_clip
import pytest
import torch

import mmwb
from mmwb.cli.main import main
from mmwb.data.shapes import Shape, make_example, read_index
from mmwb.data.tokenizer import load_tokenizer
from mmwb.errors import MmwbConfigError
from mmwb.models.decoder import load_decoder
from mmwb.models.vision import PixelInputs
from mmwb.models.vision.base import rgb_uint8
from mmwb.models.vision.open_clip import OpenClipTower
from mmwb.train.clip import contrastive_loss, swapped_twins, zero_shot_predict, zero_shot_scores
from mmwb.train.lm import LMStageConfig, encode_texts, perplexity, stage_texts
from mmwb.train.recipes import CONFIG_ROOT, Stage, StageNotAvailableError, for_stage, make_data, run_recipe

sys.path.insert(0, str(Path(__file__).resolve().parent))
from vlm_train_fixtures import check_recipe_model_answers_as_recorded  # noqa: E402


class OneHotClip:
    """A CLIP stand-in: a text's embedding is the one-hot of the class it names, an image is its own feature."""

    def encode_text(self, tokens, normalize=False):
        return torch.nn.functional.one_hot(tokens[:, 0], 2).float()

    def encode_image(self, images, normalize=False):
        return torch.nn.functional.normalize(images, dim=-1)


def class_id_tokenizer(texts):
    return torch.tensor([[0 if "circle" in t else 1] for t in texts])


def test_zero_shot_predict_picks_the_nearest_class_embedding():
    images = torch.tensor([[1.0, 0.1], [0.2, 1.0], [1.0, 0.0], [0.0, 3.0]])
    predicted = zero_shot_predict(
        OneHotClip(), class_id_tokenizer, images, ["circle", "square"], batch_size=3
    )
    assert predicted.tolist() == [0, 1, 0, 1]


def test_zero_shot_scores_on_a_hand_made_case():
    truth = [Shape("circle", "red", "small", 0.2, 0.3)] * 4
    predicted = [
        Shape("circle", "red", "small", 0.5, 0.5),  # all right (position plays no part)
        Shape("star", "red", "small", 0.5, 0.5),
        Shape("circle", "blue", "small", 0.5, 0.5),
        Shape("square", "red", "large", 0.5, 0.5),
    ]
    assert zero_shot_scores(predicted, truth) == {
        "zero_shot_shape_acc": 2 / 4,
        "zero_shot_colour_acc": 3 / 4,
        "zero_shot_size_acc": 3 / 4,
        "zero_shot_caption_acc": 1 / 4,
    }


class DotClip(torch.nn.Module):
    """A CLIP stand-in whose features are its inputs' first entries: the loss depends only on the pairs."""

    def forward(self, images, tokens):
        return images.flatten(1)[:, :4], tokens[:, :4].float(), torch.tensor(1.0)


def test_grouped_items_are_one_batch_of_their_members():
    pixels, tokens = torch.randint(0, 256, (3, 2, 3, 4, 4), dtype=torch.uint8), torch.randint(0, 9, (3, 2, 5))
    grouped, _ = contrastive_loss(DotClip(), [pixels, tokens])
    flat, _ = contrastive_loss(DotClip(), [pixels.flatten(0, 1), tokens.flatten(0, 1)])
    torch.testing.assert_close(grouped, flat)
    fewer, _ = contrastive_loss(DotClip(), [pixels[:, 0], tokens[:, 0]])
    assert not torch.isclose(grouped, fewer)  # the twins really are in the batch


def test_swapped_twins_are_drawn_on_the_images_backgrounds():
    examples = [make_example(0, "train", i) for i in range(8)]
    pixels, records = torch.stack([rgb_uint8(image) for image, _ in examples]), [r for _, r in examples]
    twins, captions = swapped_twins(pixels, records, seed=0)
    assert twins.shape == pixels.shape and twins.dtype == torch.uint8
    assert all(twin != record["caption"] for twin, record in zip(captions, records))
    corners = (twins[..., :3, :3].float() - pixels[..., :3, :3].float()).abs().mean()
    assert corners < 8  # the original's background, up to the faint noise
    assert (twins.float() - pixels.float()).abs().amax(dim=(1, 2, 3)).min() > 100  # the objects changed


@pytest.fixture(scope="module")
def quick_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("recipe") / "tiny"
    return out, run_recipe("tiny-shapes-llava", out, quick=True, progress=False)


@pytest.mark.slow
def test_quick_recipe_runs_all_four_stages_with_their_metrics(quick_run):
    out, report = quick_run
    clip, lm = report["stages"]["stage1_clip"], report["stages"]["stage2_lm"]
    assert clip["status"] == lm["status"] == "done" and report["data"]["splits"] == {
        "train": 48,
        "val": 16,
        "test": 16,
    }
    for key in (
        "test_zero_shot_shape_acc",
        "test_zero_shot_colour_acc",
        "test_zero_shot_caption_acc",
        "test_binding_acc",
    ):
        assert 0.0 <= clip["metrics"][key] <= 1.0
    assert clip["metrics"]["steps"] == lm["metrics"]["steps"] == 3
    assert json.loads((out / "stage1_clip" / "metrics.json").read_text()) == clip["metrics"]
    assert 1.0 < lm["metrics"]["val_perplexity"] < 1000.0
    assert (out / "runs" / "stage1_clip" / "metrics.jsonl").is_file()
    align, instruct = report["stages"]["stage3_align"], report["stages"]["stage4_instruct"]
    assert align["metrics"]["steps"] == instruct["metrics"]["steps"] == 3
    assert align["metrics"]["test_images"] == instruct["metrics"]["test_images"] == 16
    assert (
        0.0 <= align["metrics"]["test_caption_exact_match"] <= 1.0
        and align["metrics"]["test_caption_cider"] >= 0
    )
    for key in ("test_vqa_accuracy", "test_vqa_accuracy_colour", "test_caption_exact_match"):
        assert 0.0 <= instruct["metrics"][key] <= 1.0
    assert (out / "feature_cache").is_dir()  # stages 3 and 4 share the tower features under OUT


@pytest.mark.slow
def test_the_recipes_model_answers_as_its_metrics_say(quick_run):
    out, report = quick_run
    assert mmwb.from_pretrained(out / "stage4_instruct").config.template == "chat"
    check_recipe_model_answers_as_recorded(
        out, "stage4_instruct", report["stages"]["stage4_instruct"]["metrics"]
    )


@pytest.mark.slow
def test_stage_outputs_load_with_open_clip_the_tower_and_the_decoder(quick_run):
    out, report = quick_run
    folder = out / "stage1_clip"
    tokenizer = open_clip.get_tokenizer(
        f"local-dir:{folder}"
    )  # open_clip finds the BPE tokenizer in the folder
    bpe = load_tokenizer(folder)
    assert tokenizer("a small red circle")[0, -1].item() == bpe("a small red circle").input_ids[-1]
    clip = open_clip.create_model(f"local-dir:{folder}")
    assert clip.token_embedding.num_embeddings == len(bpe)
    tower = OpenClipTower.from_name(f"local-dir:{folder}")
    pixels = tower.image_processor()([read_image(out, 0)]).pixel_values
    assert tower.encode(PixelInputs(pixels)).features.shape == (1, 64, 64)  # 8x8 patches, no CLS, width 64

    decoder = load_decoder(out / "stage2_lm")
    lm_tokenizer = load_tokenizer(out / "stage2_lm")
    rows = encode_texts(
        lm_tokenizer, stage_texts(out / "data", "val", LMStageConfig())
    )  # one document per image
    assert perplexity(decoder.eval(), lm_tokenizer, rows) == pytest.approx(
        report["stages"]["stage2_lm"]["metrics"]["val_perplexity"], rel=1e-4
    )


def read_image(out, index):
    from mmwb.data.io import load_image

    return load_image(out / "data" / read_index(out / "data", "test")[index]["image"])


@pytest.mark.slow
def test_rerun_skips_finished_stages_and_resumes_an_unpublished_one(quick_run, capsys):
    out, report = quick_run
    assert main(["recipe", "tiny-shapes-llava", "--quick", "--out", str(out), "--json"]) == 0
    again = json.loads(capsys.readouterr().out)
    assert again["data"]["status"] == "skipped"
    assert {s["status"] for s in again["stages"].values()} == {"skipped"}
    assert again["stages"]["stage1_clip"]["metrics"] == report["stages"]["stage1_clip"]["metrics"]

    # a stage killed after its last checkpoint but before publishing its folder resumes there: same model
    shutil.rmtree(out / "stage2_lm")
    resumed = run_recipe("tiny-shapes-llava", out, quick=True, stages=2, progress=False)
    assert resumed["stages"]["stage2_lm"]["status"] == "done"
    assert resumed["stages"]["stage2_lm"]["metrics"]["val_perplexity"] == pytest.approx(
        report["stages"]["stage2_lm"]["metrics"]["val_perplexity"], rel=1e-5
    )


def test_a_quick_folder_is_not_mixed_with_a_full_run(tmp_path):
    (tmp_path / "recipe.json").write_text(json.dumps({"recipe": "tiny-shapes", "quick": True}))
    with pytest.raises(MmwbConfigError, match="recipe.json: this folder holds a run of"):
        run_recipe("tiny-shapes", tmp_path, quick=False)


def test_a_stage_whose_module_is_missing_says_so():
    stage = Stage("stage9_future", "mmwb.train.not_here:Config", "mmwb.train.not_here:run")
    with pytest.raises(
        StageNotAvailableError, match="stage9_future not available yet: there is no mmwb.train.not_here"
    ):
        stage.load()


def test_overrides_reach_every_stage_or_the_one_they_name():
    overrides = ("train.lr=1e-3", "stage2_lm.train.max_steps=5", "stage1_clip.model.text_layers=1")
    names = {"stage1_clip", "stage2_lm"}
    assert for_stage(overrides, "stage2_lm", names) == ("train.lr=1e-3", "train.max_steps=5")
    assert for_stage(overrides, "stage1_clip", names) == ("train.lr=1e-3", "model.text_layers=1")


def test_data_overrides_set_the_data_step_after_quick(tmp_path):
    report = make_data(tmp_path, CONFIG_ROOT / "tiny-shapes", True, None, False, ("n=5", "n_eval=2"))
    assert report["splits"] == {"train": 5, "val": 2, "test": 2}
    assert len((tmp_path / "train.jsonl").read_text().splitlines()) == 5
