"""kimi_k25 and llava checkpoints through mmwb.from_pretrained against transformers on the same random weights."""

import json
import re

import pytest
import torch
from safetensors.torch import save_file
from test_vision_moonvit import packed_inputs, tiny_config, to_original_layout
from transformers import (
    CLIPVisionConfig,
    Kimi_K25ForConditionalGeneration,
    LlamaConfig,
    LlavaConfig,
    LlavaForConditionalGeneration,
)

import mmwb
from mmwb.errors import MmwbCheckpointError, MmwbConfigError
from mmwb.models.vlm import VisionLanguageModel

GRIDS = [(4, 6), (2, 10), (8, 4)]  # non-square, mixed sizes in one packed batch
IMAGE_ID = 60


def _perturb(model):
    with torch.no_grad():
        for param in model.parameters():  # non-trivial norms and biases, so every tensor matters
            param.add_(0.1 * torch.randn_like(param))
    return model.eval()


@pytest.fixture(scope="module")
def kimi(tmp_path_factory):
    torch.manual_seed(0)
    config = tiny_config()
    config.image_token_id = IMAGE_ID
    reference = _perturb(Kimi_K25ForConditionalGeneration(config))
    path = tmp_path_factory.mktemp("kimi_original")
    reference.config.save_pretrained(path)
    save_file(
        to_original_layout(reference.state_dict()), path / "model.safetensors", metadata={"format": "pt"}
    )
    loaded = Kimi_K25ForConditionalGeneration.from_pretrained(path).eval()
    for key, value in reference.state_dict().items():  # transformers reads the layout back identically
        assert torch.equal(value, loaded.state_dict()[key]), key
    return reference, path


def _kimi_prompts():
    """Two rows: the first holds images 0 and 1, the second image 2; prompts already widened (transformers')."""
    counts = [h * w // 4 for h, w in GRIDS]
    g = torch.Generator().manual_seed(3)
    text = lambda n: torch.randint(1, 50, (n,), generator=g).tolist()  # noqa: E731
    rows = [
        text(3) + [IMAGE_ID] * counts[0] + text(2) + [IMAGE_ID] * counts[1] + text(2),
        text(4) + [IMAGE_ID] * counts[2] + text(3),
    ]
    width = max(map(len, rows))
    ids = torch.tensor([[0] * (width - len(r)) + r for r in rows])  # left-padded
    mask = torch.tensor([[0] * (width - len(r)) + [1] * len(r) for r in rows])
    return ids, mask


@pytest.mark.slow
def test_kimi_k25_logits_and_greedy_match_transformers(kimi):
    reference, path = kimi
    model = mmwb.from_pretrained(path, device="cpu", dtype=torch.float32)
    assert isinstance(model, VisionLanguageModel)
    pixels, grid_hw = packed_inputs(GRIDS)
    grid_thw = torch.cat([torch.ones(len(GRIDS), 1, dtype=torch.long), grid_hw], dim=1)
    ids, mask = _kimi_prompts()
    inputs = dict(input_ids=ids, attention_mask=mask, pixel_values=pixels, image_grid_thw=grid_thw)
    with torch.no_grad():
        expected = reference(**inputs).logits
        got = model(**inputs).logits
    real = mask.bool()
    assert (got[real] - expected[real]).abs().max() <= 1e-4
    hf = reference.generate(**inputs, max_new_tokens=6, do_sample=False, pad_token_id=0)
    ours = model.generate(**inputs, max_new_tokens=6, do_sample=False, pad_token_id=0)
    assert torch.equal(hf, ours)


def test_kimi_one_placeholder_per_image_equals_widened_prompt(kimi):
    _, path = kimi
    model = mmwb.from_pretrained(path, device="cpu", dtype=torch.float32)
    pixels, grid_hw = packed_inputs(GRIDS[:1])
    counts = GRIDS[0][0] * GRIDS[0][1] // 4
    short = torch.tensor([[5, 6, IMAGE_ID, 7]])
    wide = torch.tensor([[5, 6] + [IMAGE_ID] * counts + [7]])
    with torch.no_grad():
        a = model(input_ids=short, pixel_values=pixels, grid_hw=grid_hw).logits
        b = model(input_ids=wide, pixel_values=pixels, grid_hw=grid_hw).logits
    assert a.shape == b.shape and torch.allclose(a, b, atol=1e-6)


def to_kimi_vl_layout(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """transformers' kimi_k25 tensors -> a Kimi-VL folder as Moonshot publishes it: the tower as in Moonshot's
    kimi_k25 files (wqkv with q/k rows rope-interleaved again), ``multi_modal_projector.linear_1/2``,
    ``language_model.*`` text with one matrix per expert."""
    out = {}
    for key, tensor in to_original_layout(state).items():
        if key.startswith("mm_projector."):
            name = (
                key.removeprefix("mm_projector.").replace("proj.0", "linear_1").replace("proj.2", "linear_2")
            )
            out["multi_modal_projector." + name] = tensor
        elif match := re.fullmatch(r"(.+\.mlp\.experts)\.(gate_up_proj|down_proj)", key):
            prefix, kind = match.groups()
            for j, expert in enumerate(tensor):
                if kind == "down_proj":
                    out[f"{prefix}.{j}.down_proj.weight"] = expert.clone()
                else:
                    gate, up = expert.chunk(2)
                    out[f"{prefix}.{j}.gate_proj.weight"] = gate.clone()
                    out[f"{prefix}.{j}.up_proj.weight"] = up.clone()
        else:
            out[key] = tensor
    return out


@pytest.fixture(scope="module")
def kimi_vl(tmp_path_factory):
    """A random transformers kimi_k25 (with an MoE layer) and the same weights written as a kimi_vl folder."""
    torch.manual_seed(1)
    config = tiny_config()
    config.image_token_id = IMAGE_ID
    config.text_config.num_hidden_layers = 2  # the second is MoE: per-expert matrices in the folder
    reference = _perturb(Kimi_K25ForConditionalGeneration(config))
    path = tmp_path_factory.mktemp("kimi_vl")
    vision = config.vision_config
    text = {**config.text_config.to_dict(), "topk_method": "noaux_tc", "scoring_func": "sigmoid"}
    kimi_vl_config = {
        "model_type": "kimi_vl",
        "architectures": ["KimiVLForConditionalGeneration"],
        "media_placeholder_token_id": IMAGE_ID,
        "text_config": text,
        "vision_config": {
            "model_type": "moonvit", "patch_size": vision.patch_size, "init_pos_emb_height": vision.pos_emb_height,
            "init_pos_emb_width": vision.pos_emb_width, "num_attention_heads": vision.num_attention_heads,
            "num_hidden_layers": vision.num_hidden_layers, "hidden_size": vision.hidden_size,
            "intermediate_size": vision.intermediate_size, "merge_kernel_size": list(vision.merge_kernel_size),
        },
    }  # fmt: skip
    (path / "config.json").write_text(json.dumps(kimi_vl_config))
    tensors = to_kimi_vl_layout(reference.state_dict())
    assert "language_model.model.layers.1.mlp.experts.1.up_proj.weight" in tensors
    assert "multi_modal_projector.linear_2.weight" in tensors
    save_file(tensors, path / "model.safetensors", metadata={"format": "pt"})
    return reference, path


@pytest.mark.parametrize("grid", GRIDS)
def test_kimi_vl_folder_matches_transformers_kimi_k25(kimi_vl, grid):
    """Single images (what Kimi-VL and transformers' kimi_k25 compute alike): logits and greedy tokens equal."""
    reference, path = kimi_vl
    model = mmwb.from_pretrained(path, device="cpu", dtype=torch.float32)
    assert isinstance(model, VisionLanguageModel) and model.config.source == "kimi_vl"
    pixels, grid_hw = packed_inputs([grid])
    grid_thw = torch.cat([torch.ones(1, 1, dtype=torch.long), grid_hw], dim=1)
    ids = torch.tensor([[5, 9] + [IMAGE_ID] * (grid[0] * grid[1] // 4) + [7, 3, 11]])
    inputs = dict(input_ids=ids, pixel_values=pixels, image_grid_thw=grid_thw)
    with torch.no_grad():
        expected, got = reference(**inputs).logits, model(**inputs).logits
    assert (got - expected).abs().max() <= 1e-4
    hf = reference.generate(**inputs, max_new_tokens=6, do_sample=False, pad_token_id=0)
    ours = model.generate(**inputs, max_new_tokens=6, do_sample=False, pad_token_id=0)
    assert torch.equal(hf, ours)


def test_kimi_vl_folder_loads_quantized_and_refuses_what_it_cannot_read(kimi_vl, tmp_path):
    reference, path = kimi_vl
    model = mmwb.from_pretrained(path, quantize="int8")
    kinds = {type(m).__name__ for m in model.modules()}
    assert {"QuantizedLinear", "QuantizedExperts"} <= kinds and "Experts" not in kinds
    broken = tmp_path / "broken"
    broken.mkdir()
    config = json.loads((path / "config.json").read_text())
    (broken / "model.safetensors").symlink_to(path / "model.safetensors")
    del config["media_placeholder_token_id"]
    (broken / "config.json").write_text(json.dumps(config))
    with pytest.raises(MmwbCheckpointError, match="media_placeholder_token_id"):
        mmwb.from_pretrained(broken)
    config = {**json.loads((path / "config.json").read_text())}
    config["text_config"] = {**config["text_config"], "topk_method": "group_limited_greedy"}
    (broken / "config.json").write_text(json.dumps(config))
    with pytest.raises(MmwbConfigError, match="topk_method 'group_limited_greedy'"):
        mmwb.from_pretrained(broken)


def _llava_config(text: LlamaConfig) -> LlavaConfig:
    """A LLaVA of a tiny CLIP tower and ``text``."""
    vision = CLIPVisionConfig(
        hidden_size=32, intermediate_size=48, num_hidden_layers=3, num_attention_heads=2, image_size=16,
        patch_size=4, projection_dim=16,
    )  # fmt: skip
    return LlavaConfig(vision_config=vision, text_config=text, image_token_id=IMAGE_ID)


@pytest.fixture(scope="module")
def llava(tmp_path_factory):
    torch.manual_seed(0)
    text = LlamaConfig(
        vocab_size=80, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=128,
    )  # fmt: skip
    reference = _perturb(LlavaForConditionalGeneration(_llava_config(text)))
    path = tmp_path_factory.mktemp("llava")
    reference.save_pretrained(path)
    return reference, path


def test_llava_logits_and_greedy_match_transformers(llava):
    reference, path = llava
    model = mmwb.from_pretrained(path, device="cpu", dtype=torch.float32)
    g = torch.Generator().manual_seed(1)
    pixels = torch.randn(2, 3, 16, 16, generator=g)
    text = lambda n: torch.randint(1, 50, (n,), generator=g).tolist()  # noqa: E731
    ids = torch.tensor([text(2) + [IMAGE_ID] * 16 + text(3), text(2) + [IMAGE_ID] * 16 + text(3)])
    inputs = dict(input_ids=ids, pixel_values=pixels)
    with torch.no_grad():
        expected = reference(**inputs).logits
        got = model(**inputs).logits
    assert (got - expected).abs().max() <= 1e-4
    hf = reference.generate(**inputs, max_new_tokens=6, do_sample=False, pad_token_id=0)
    ours = model.generate(**inputs, max_new_tokens=6, do_sample=False, pad_token_id=0)
    assert torch.equal(hf, ours)


def test_pipeline_prompts_an_imported_llava_with_its_own_tokens(llava, tmp_path):
    """The caption pipeline writes the model's start and placeholder tokens (LLaVA: ``<s>``, ``<image>`` at
    image_token_id), not mmwb's ``<|bos|>``: with mmwb's, a foreign tokenizer found no image token at all."""
    import shutil

    from PIL import Image
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    from mmwb.pipelines.vlm import VLMPipeline

    reference, path = llava
    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2, **{f"w{i}": i for i in range(3, 80)}, "<image>": IMAGE_ID}
    del vocab[f"w{IMAGE_ID}"]
    core = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    core.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=core, bos_token="<s>", eos_token="</s>", unk_token="<unk>"
    )
    tokenizer.add_special_tokens({"additional_special_tokens": ["<image>"]})
    folder = tmp_path / "llava"
    shutil.copytree(path, folder)
    tokenizer.save_pretrained(folder)
    model = mmwb.from_pretrained(folder, device="cpu", dtype=torch.float32)
    image = Image.new("RGB", (16, 16), (200, 40, 40))
    result = VLMPipeline(model).run([image], max_new_tokens=3)[0]
    assert result.error is None and result.tokens > 0
    pixels = model.vision_tower.image_processor()([image]).pixel_values
    ids = torch.tensor(
        [[1] + [IMAGE_ID] * 16]
    )  # <s> and the 16 patch tokens, as transformers' processor writes
    hf = reference.generate(
        input_ids=ids, pixel_values=pixels, max_new_tokens=3, do_sample=False, pad_token_id=0
    )
    assert result.text == tokenizer.decode(hf[0, ids.shape[1] :], skip_special_tokens=True).strip()


def test_llava_published_layout_and_broken_folders(llava, tmp_path):
    """Hub llava-1.5 checkpoints (transformers 4) nest the tower under ``vision_tower.vision_model.``; a folder
    without its text_config, or with a truncated weights file, is one checkpoint error naming what is wrong."""
    import json
    import shutil

    from safetensors.torch import load_file

    from mmwb.errors import MmwbCheckpointError

    reference, path = llava
    published = tmp_path / "published"
    shutil.copytree(path, published)
    state = load_file(path / "model.safetensors")
    renamed = {k.replace("vision_tower.", "vision_tower.vision_model.", 1): v for k, v in state.items()}
    assert any(k.startswith("vision_tower.vision_model.") for k in renamed)
    save_file(renamed, published / "model.safetensors", metadata={"format": "pt"})
    model = mmwb.from_pretrained(published, device="cpu", dtype=torch.float32)
    ids = torch.tensor([[1, 2] + [IMAGE_ID] * 16 + [3]])
    pixels = torch.randn(1, 3, 16, 16, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        assert (
            model(input_ids=ids, pixel_values=pixels).logits
            - reference(input_ids=ids, pixel_values=pixels).logits
        ).abs().max() <= 1e-4
    config = json.loads((published / "config.json").read_text())
    (published / "config.json").write_text(
        json.dumps({k: v for k, v in config.items() if k != "text_config"})
    )
    with pytest.raises(MmwbCheckpointError, match="config.json: no text_config section"):
        mmwb.from_pretrained(published, device="cpu")
    (published / "config.json").write_text(json.dumps(config))
    weights = published / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:100])
    with pytest.raises(MmwbCheckpointError, match="model.safetensors: not a readable safetensors file"):
        mmwb.from_pretrained(published, device="cpu")


@pytest.mark.parametrize("family", ["llava", "kimi"])
def test_imported_checkpoints_run_weight_only_int8(family, request):
    """transformers' text model (LLaVA) and mmwb's MoE decoder + MoonViT (Kimi) quantized on load: every linear
    layer is int8 and the logits stay those of the float model (int8 per channel moves them by well under 1 %)."""
    from mmwb.models.quantize import QuantizedLinear

    _, path = request.getfixturevalue(family)
    float_model = mmwb.from_pretrained(path, device="cpu", dtype=torch.float32)
    model = mmwb.from_pretrained(path, quantize="int8")
    assert not any(type(m) is torch.nn.Linear for m in model.modules())
    assert any(isinstance(m, QuantizedLinear) for m in model.language_model.modules())
    if family == "llava":
        g = torch.Generator().manual_seed(1)
        ids = torch.tensor([[5, 6] + [IMAGE_ID] * 16 + [7, 8]])
        inputs = dict(input_ids=ids, pixel_values=torch.randn(1, 3, 16, 16, generator=g))
    else:
        pixels, grid_hw = packed_inputs(GRIDS[:1])
        inputs = dict(input_ids=torch.tensor([[5, 6, IMAGE_ID, 7]]), pixel_values=pixels, grid_hw=grid_hw)
    with torch.no_grad():
        expected, got = float_model(**inputs).logits, model(**inputs).logits
        tokens = model.generate(**inputs, max_new_tokens=4, do_sample=False, pad_token_id=0)
    cosine = torch.nn.functional.cosine_similarity(got.flatten(), expected.flatten(), dim=0)
    assert (
        cosine > 0.99 and tokens.shape[1] >= inputs["input_ids"].shape[1] + 4
    )  # Kimi widens its placeholder


@pytest.mark.parametrize("tied", [False, True])
def test_llava_text_model_quantized_while_loading_equals_quantizing_the_loaded_model(llava, tied, tmp_path):
    """transformers' text model is built with its parameters on the meta device and each linear layer read
    straight into int8 (a head tied to the embeddings from them): the same bytes as loading the float model,
    then quantizing it."""
    from mmwb.models.quantize import QuantizedLinear, quantize_model

    reference_model, path = llava
    if tied:
        config = reference_model.config.to_dict()
        config["text_config"]["tie_word_embeddings"] = config["tie_word_embeddings"] = True
        torch.manual_seed(2)
        _perturb(LlavaForConditionalGeneration(LlavaConfig(**config))).save_pretrained(tmp_path)
        path = tmp_path
    streamed = mmwb.from_pretrained(path, quantize="int8")
    reference = quantize_model(mmwb.from_pretrained(path, device="cpu"), "int8")
    expected, got = reference.state_dict(), streamed.state_dict()
    assert expected.keys() == got.keys() and all(torch.equal(expected[k], got[k]) for k in expected)
    assert isinstance(streamed.language_model.model.lm_head, QuantizedLinear)
    assert not any(p.device.type == "meta" for p in streamed.parameters())


@pytest.mark.slow
def test_llava_quantized_while_loading_never_holds_the_float_text_model(tmp_path):
    """Peak private memory of a fresh process loading a LLaVA whose Llama text model is 258 MB in fp32, int8: the
    final model plus about one float tensor (the embeddings, which stay float), where loading the float model
    first peaks above the whole float size."""
    from decoder_fixtures import measure_load

    torch.manual_seed(0)
    text = LlamaConfig(
        vocab_size=16000, hidden_size=768, intermediate_size=2048, num_hidden_layers=6, num_attention_heads=12,
        num_key_value_heads=12, max_position_embeddings=128,
    )  # fmt: skip
    model = LlavaForConditionalGeneration(_llava_config(text))
    float_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    largest = max(p.numel() * p.element_size() for p in model.parameters())  # embeddings / head, 49 MB
    model.save_pretrained(tmp_path)
    del model

    peak, final = measure_load(tmp_path, "int8", "streamed")
    float_peak, float_final = measure_load(tmp_path, "int8", "float_first")
    mb = 2**20
    print(
        f"\nLLaVA int8: float {float_bytes / mb:.0f} MB; streamed peak {peak / mb:.0f} MB, final {final / mb:.0f}"
        f" MB; float first: peak {float_peak / mb:.0f} MB, final {float_final / mb:.0f} MB"
    )
    assert final < 0.5 * float_bytes and final <= float_final + mb  # int8 linears, float embeddings
    assert peak - final <= largest + 24 * mb  # about one float tensor being read
    assert float_peak > float_bytes > 1.5 * peak  # what streaming avoids: the whole float model
