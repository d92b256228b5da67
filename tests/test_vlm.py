"""VisionLanguageModel composition: placeholder widening, splice positions, labels, several and mixed-size images,
save/load, the pipeline and the caption/ask CLI errors."""

import pytest
import torch
from vlm_fixtures import WIDTH, images, tiny_vlm

import mmwb
from mmwb.cli.main import main
from mmwb.errors import MmwbInputError
from mmwb.models.decoder.generate import DEFAULT_MAX_NEW_TOKENS
from mmwb.models.decoder.model import IGNORE_INDEX
from mmwb.models.projectors import PixelShuffleMLP
from mmwb.models.vlm import VisionLanguageModel, load_any_vlm
from mmwb.models.vlm.model import expand_image_tokens
from mmwb.models.vlm.prompt import build_prompt, encode_prompts
from mmwb.pipelines.vlm import VLMPipeline


@pytest.fixture(scope="module")
def model() -> VisionLanguageModel:
    return tiny_vlm(lambda _tokenizer: PixelShuffleMLP(WIDTH, WIDTH))


def test_placeholders_widen_and_labels_are_masked():
    ids = torch.tensor([[9, 5, 1, 5, 2], [7, 7, 9, 5, 3]])
    mask = torch.tensor([[1, 1, 1, 1, 1], [0, 1, 1, 1, 1]])
    labels = ids.clone()
    new_ids, new_mask, new_labels = expand_image_tokens(ids, mask, labels, 5, [2, 3, 1])
    assert new_ids.tolist() == [[9, 5, 5, 1, 5, 5, 5, 2], [7, 7, 7, 7, 7, 9, 5, 3]]  # left pad kept
    assert new_mask.tolist() == [[1] * 8, [0, 0, 0, 0, 1, 1, 1, 1]]
    assert new_labels.tolist() == [
        [9, -100, -100, 1, -100, -100, -100, 2], [-100, -100, -100, -100, 7, 9, -100, 3]
    ]  # fmt: skip
    with pytest.raises(MmwbInputError, match="2 image tokens but 1 images"):
        expand_image_tokens(ids[:1], mask[:1], None, 5, [4])


def test_splice_positions_multi_image_and_mixed_sizes(model):
    tok = model.tokenizer
    prompts = [build_prompt("a red circle", "plain", n_images=2), build_prompt(None, "chat")]
    ids, mask = encode_prompts(tok, prompts)
    pics = images((16, 24), (8, 8), (40, 16))  # three sizes; row 0 holds the first two
    inputs = model.prepare_inputs(ids, mask, images=pics)
    grids = [(6, 4), (2, 2), (4, 10)]
    counts = [h * w // 4 for h, w in grids]
    is_image = inputs["input_ids"] == model.config.image_token_id
    assert is_image.sum(1).tolist() == [counts[0] + counts[1], counts[2]]
    with torch.no_grad():
        blocks = model.image_embeddings(model.encode_images(model.process_images(pics)))
        embeds = inputs["inputs_embeds"]
        row0 = is_image[0].nonzero().flatten()
        assert torch.equal(embeds[0, row0[: counts[0]]], blocks[0])
        assert torch.equal(embeds[0, row0[counts[0] :]], blocks[1])
        assert torch.equal(embeds[1, is_image[1]], blocks[2])
        # each row equals that row run alone: padding and the other row's images change nothing
        both = model(input_ids=ids, attention_mask=mask, images=pics).logits
        alone = model(input_ids=encode_prompts(tok, prompts[1:])[0], images=pics[2:]).logits
    assert (both[1, -alone.shape[1] :] - alone[0]).abs().max() <= 1e-4


def test_forward_from_cached_features_and_loss(model):
    ids, mask = encode_prompts(model.tokenizer, [build_prompt("a red circle", "plain")])
    labels = ids.clone()
    pics = images((16, 16))
    features = model.encode_images(model.process_images(pics))
    a = model(input_ids=ids, labels=labels, images=pics)
    b = model(input_ids=ids, labels=labels, vision_features=features)
    assert torch.equal(a.logits, b.logits) and torch.isfinite(a.loss)
    assert (a.labels[a.attention_mask.bool()] == IGNORE_INDEX).sum() == 4 + 0  # the 4 image positions


@pytest.mark.slow
def test_save_load_round_trip_and_generation(model, tmp_path):
    model.save_pretrained(tmp_path / "vlm")
    loaded = mmwb.from_pretrained(tmp_path / "vlm", device="cpu")
    ids, mask = encode_prompts(model.tokenizer, [build_prompt(None, "chat")] * 2)
    pics = images((16, 24), (8, 8))  # 6 and 1 image tokens
    with torch.no_grad():
        assert torch.equal(
            model(input_ids=ids, images=pics).logits, loaded(input_ids=ids, images=pics).logits
        )
    a = model.generate(ids, attention_mask=mask, images=pics, max_new_tokens=5, new_tokens_only=True)
    b = loaded.generate(ids, attention_mask=mask, images=pics, max_new_tokens=5, new_tokens_only=True)
    assert torch.equal(a, b) and a.shape[1] <= 5
    # unpadded prompts whose images widen them differently are left-padded for generation: each row as if alone
    for row in range(2):
        alone = loaded.generate(
            ids[row : row + 1], images=pics[row : row + 1], max_new_tokens=5, new_tokens_only=True
        )
        assert torch.equal(alone[0], a[row, : alone.shape[1]])
    with pytest.raises(MmwbInputError, match="does not fit the model's context of 512 tokens"):
        loaded.generate(ids, images=pics, max_new_tokens=600)
    # without max_new_tokens the check counts the default 32 that generation will make, not 0
    widened = loaded.prepare_inputs(ids[:1], images=pics[:1])["input_ids"].shape[1]
    filler = torch.full((1, 512 - DEFAULT_MAX_NEW_TOKENS + 4 - widened), int(ids[0, -1]))
    with pytest.raises(MmwbInputError, match="plus max_new_tokens=32 does not fit"):
        loaded.generate(torch.cat([ids[:1], filler], dim=1), images=pics[:1])
    texts = VLMPipeline(loaded, batch_size=2)(
        pics + pics[:1], prompt="what colour is the circle?", max_new_tokens=4
    )
    assert len(texts) == 3 and all(isinstance(t, str) for t in texts)


def test_pipeline_fails_only_the_image_the_model_refuses_and_streams_each_by_index(model, tmp_path):
    files = []
    for name, size in (
        ("a.png", (16, 16)),
        ("tiny.png", (2, 2)),
        ("b.png", (8, 12)),
    ):  # tiny: under one patch
        images(size)[0].save(tmp_path / name)
        files.append(tmp_path / name)
    pipeline = VLMPipeline(model, batch_size=3)
    results = pipeline.run(files, max_new_tokens=3)
    assert [r.error is None for r in results] == [True, False, True]
    assert results[1].error.startswith(f"{files[1]}: ") and "patch" in results[1].error
    alone = pipeline.run(files[2:], max_new_tokens=3)[0]
    assert results[2].text == alone.text  # answered in the retry exactly as alone
    streamed: dict[int, str] = {}
    results = pipeline.run(files, on_token=lambda i, text: streamed.update({i: streamed.get(i, "") + text}),
                           max_new_tokens=3)  # fmt: skip
    assert sorted(streamed) == [0, 2] and streamed[0].strip() == results[0].text
    with pytest.raises(MmwbInputError, match="tiny.png: "):
        pipeline(files[1], max_new_tokens=3)  # one image in: its error out
    with pytest.raises(MmwbInputError, match="batch size must be at least 1"):
        VLMPipeline(model, batch_size=0)


def test_cli_errors(model, tmp_path, capsys, caplog, monkeypatch):
    import mmwb.pipelines.vlm as pipeline_module

    monkeypatch.setattr(pipeline_module, "DEFAULT_MODEL", tmp_path / "missing")
    good = tmp_path / "good.png"
    images((16, 16))[0].save(good)
    assert main(["caption", str(good)]) == 2
    assert "the default model" in capsys.readouterr().err
    model.save_pretrained(tmp_path / "vlm")
    broken = tmp_path / "broken.png"
    broken.write_bytes(b"not a png")
    code = main(
        ["caption", str(good), str(broken), "--model", str(tmp_path / "vlm"), "--max-new-tokens", "3"]
    )
    out = capsys.readouterr()
    assert code == 2 and "broken.png" in caplog.text and "good.png" in out.out and "broken" not in out.out
    ask = ["ask", str(good), "what colour?", "--model", str(tmp_path / "vlm"), "--max-new-tokens", "2"]
    assert main(ask) == 0 and main([*ask, "--stream"]) == 0
    assert capsys.readouterr().out.count("good.png") == 2


@pytest.mark.slow
def test_trainers_parts_become_a_vlm_that_round_trips(tmp_path):
    from vlm_train_fixtures import make_setup

    from mmwb.train.vlm_setup import starting_vlm

    setup = make_setup(tmp_path, n=8)
    model = starting_vlm(None, setup["vision"], setup["decoder"]).eval()
    model.save_pretrained(tmp_path / "vlm")  # open_clip tower + mlp2x_gelu + mmwb decoder
    loaded = load_any_vlm(tmp_path / "vlm", device="cpu")
    ids, _ = encode_prompts(model.tokenizer, [build_prompt("a red circle", "chat")])
    pics = images((32, 32))
    with torch.no_grad():
        assert torch.equal(
            model(input_ids=ids, images=pics).logits, loaded(input_ids=ids, images=pics).logits
        )
