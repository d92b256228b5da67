"""MoonViT against transformers' Kimi_K25VisionModel on the same weights, read from Moonshot's original layout."""

import json

import pytest
import torch
from PIL import Image
from safetensors.torch import save_file
from transformers import Kimi_K25Config, Kimi_K25ForConditionalGeneration, Kimi_K25ImageProcessor

from mmwb.errors import MmwbCheckpointError, MmwbInputError
from mmwb.models.vision import MoonViT, MoonViTImageProcessor, PixelInputs
from mmwb.models.vision.kimi_checkpoint import (
    build_kimi_vision,
    moonvit_config_from_dict,
    read_kimi_vision,
    split_kimi_state,
)

HEADS = 2
PATCH = 4
# several non-square grids, one equal to the 6x6 position table (no interpolation), one wider than it
GRIDS = [(4, 6), (6, 6), (2, 10), (8, 4)]


def tiny_config() -> Kimi_K25Config:
    text = dict(
        model_type="deepseek_v3", vocab_size=64, hidden_size=32, intermediate_size=64, moe_intermediate_size=16,
        num_hidden_layers=1, first_k_dense_replace=1, num_attention_heads=2, num_key_value_heads=2,
        q_lora_rank=None, kv_lora_rank=16, qk_nope_head_dim=8, qk_rope_head_dim=8, v_head_dim=8,
        n_routed_experts=2, num_experts_per_tok=1, n_shared_experts=1, n_group=1, topk_group=1,
    )  # fmt: skip
    vision = dict(
        patch_size=PATCH, pos_emb_height=6, pos_emb_width=6, num_attention_heads=HEADS, num_hidden_layers=2,
        hidden_size=32, intermediate_size=48,
    )  # fmt: skip
    return Kimi_K25Config(
        text_config=text, vision_config=vision, projection_hidden_size=32, tie_word_embeddings=False
    )


def _interleave_rope_rows(tensor: torch.Tensor, num_heads: int) -> torch.Tensor:
    """Rotate-half rows (transformers) -> Moonshot's interleaved complex-pair rows, by explicit index arithmetic."""
    head_dim = tensor.shape[0] // num_heads
    half = head_dim // 2
    source = [
        h * head_dim + part * half + pair for h in range(num_heads) for pair in range(half) for part in (0, 1)
    ]
    return tensor[source]


def to_original_layout(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """transformers' in-memory names -> Moonshot's published layout (what kimi_k25's conversion_mapping reads)."""
    block_renames = {
        "norm1": "norm0",
        "norm2": "norm1",
        "mlp.fc1": "mlp.fc0",
        "mlp.fc2": "mlp.fc1",
        "attn.proj": "wo",
    }
    out, qkv = {}, {}
    for key, tensor in state.items():
        tensor = tensor.detach().clone().contiguous()
        if key.startswith("model.language_model."):
            out["language_model.model." + key.removeprefix("model.language_model.")] = tensor
        elif key == "lm_head.weight":
            out["language_model.lm_head.weight"] = tensor
        elif key.startswith("model.mm_projector."):
            name = (
                key.removeprefix("model.mm_projector.")
                .replace("in_proj", "proj.0")
                .replace("out_proj", "proj.2")
            )
            out["mm_projector." + name] = tensor
        elif key.startswith("model.vision_tower.layers."):
            layer, name = key.removeprefix("model.vision_tower.layers.").split(".", 1)
            if name.startswith(("attn.q_proj", "attn.k_proj", "attn.v_proj")):
                qkv.setdefault((layer, name.rsplit(".", 1)[1]), {})[name[5]] = tensor
                continue
            for old, new in block_renames.items():
                if name.startswith(old + "."):
                    name = new + name[len(old) :]
                    break
            out[f"vision_tower.encoder.blocks.{layer}.{name}"] = tensor
        elif (
            key == "model.vision_tower.final_layernorm.weight"
            or key == "model.vision_tower.final_layernorm.bias"
        ):
            out["vision_tower.encoder." + key.removeprefix("model.vision_tower.")] = tensor
        elif key == "model.vision_tower.patch_embed.pos_emb.position_embeddings":
            out["vision_tower.patch_embed.pos_emb.weight"] = tensor
        else:
            out[key.removeprefix("model.")] = tensor
    for (layer, kind), parts in qkv.items():
        fused = torch.cat(
            [_interleave_rope_rows(parts["q"], HEADS), _interleave_rope_rows(parts["k"], HEADS), parts["v"]]
        )
        out[f"vision_tower.encoder.blocks.{layer}.wqkv.{kind}"] = fused
    return out


@pytest.fixture(scope="module")
def reference() -> Kimi_K25ForConditionalGeneration:
    torch.manual_seed(0)
    model = Kimi_K25ForConditionalGeneration(tiny_config()).eval()
    with torch.no_grad():
        for param in model.parameters():  # non-trivial norms and biases, so every tensor matters
            param.add_(0.1 * torch.randn_like(param))
    return model


@pytest.fixture(scope="module")
def original_checkpoint(reference, tmp_path_factory):
    """Original-layout checkpoint written by hand; transformers must load it back to the very same tensors."""
    path = tmp_path_factory.mktemp("kimi_original")
    reference.config.save_pretrained(path)
    save_file(
        to_original_layout(reference.state_dict()), path / "model.safetensors", metadata={"format": "pt"}
    )
    loaded = Kimi_K25ForConditionalGeneration.from_pretrained(path).eval()
    expected, got = reference.state_dict(), loaded.state_dict()
    assert expected.keys() == got.keys()
    for key in expected:
        assert torch.equal(expected[key], got[key]), key
    return path


def packed_inputs(grids, seed=0):
    generator = torch.Generator().manual_seed(seed)
    total = sum(h * w for h, w in grids)
    pixels = torch.randn(total, 3, PATCH, PATCH, generator=generator)
    return pixels, torch.tensor([[h, w] for h, w in grids])


def reference_tower(reference, pixels, grid_hw):
    grid_thw = torch.cat([torch.ones(len(grid_hw), 1, dtype=torch.long), grid_hw], dim=1)
    with torch.no_grad():
        return reference.model.vision_tower(pixels, grid_thw=grid_thw), grid_thw


def test_original_layout_matches_kimi_vision_model(reference, original_checkpoint):
    tower, projector = build_kimi_vision(
        read_kimi_vision(original_checkpoint), torch.device("cpu"), torch.float32
    )
    pixels, grid_hw = packed_inputs(GRIDS)
    expected, grid_thw = reference_tower(reference, pixels, grid_hw)
    with torch.no_grad():
        features = tower.encode(PixelInputs(pixels, grid_hw))
        tokens = projector(features)
        expected_tokens = reference.model.get_image_features(pixels, grid_thw).pooler_output
    # no padding: the packed sequence is exactly the images' patches
    assert features.features.shape == (sum(h * w for h, w in GRIDS), 32)
    assert features.token_counts == [h * w for h, w in GRIDS]
    assert (features.features - expected.last_hidden_state).abs().max() <= 1e-4
    assert tokens.token_counts == [h * w // 4 for h, w in GRIDS]
    assert (tokens.features - torch.cat(expected_tokens)).abs().max() <= 1e-4


def test_transformers_names_load_the_same_tower(reference):
    tower_state, projector_state = split_kimi_state(reference.state_dict(), HEADS)
    original = to_original_layout(reference.state_dict())
    original_tower, original_projector = split_kimi_state(original, HEADS)
    assert tower_state.keys() == original_tower.keys() and projector_state.keys() == original_projector.keys()
    for key in tower_state:
        assert torch.equal(tower_state[key], original_tower[key]), key


def test_images_do_not_attend_to_each_other(original_checkpoint):
    tower, _ = build_kimi_vision(read_kimi_vision(original_checkpoint), torch.device("cpu"), torch.float32)
    pixels, grid_hw = packed_inputs(GRIDS)
    changed = pixels.clone()
    changed[24:] = torch.randn_like(changed[24:])  # every image but the first (4x6 = 24 patches)
    with torch.no_grad():
        a = tower.encode(PixelInputs(pixels, grid_hw)).per_image()
        b = tower.encode(PixelInputs(changed, grid_hw)).per_image()
        alone = tower.encode(PixelInputs(pixels[:24], grid_hw[:1])).features
    assert torch.allclose(a[0], b[0], atol=1e-6) and torch.allclose(a[0], alone, atol=1e-5)
    assert not torch.allclose(a[1], b[1])


def test_image_processor_keeps_aspect_and_matches_kimi_processor(original_checkpoint):
    tower, _ = build_kimi_vision(read_kimi_vision(original_checkpoint), torch.device("cpu"), torch.float32)
    generator = torch.Generator().manual_seed(1)
    images = [
        Image.fromarray(torch.randint(0, 256, (h, w, 3), generator=generator, dtype=torch.uint8).numpy())
        for h, w in [(16, 24), (13, 40), (8, 8)]
    ]
    inputs = tower.image_processor()(images)
    assert inputs.grid_hw.tolist() == [[4, 6], [4, 10], [2, 2]]  # 13 rows pad up to whole 2x2 blocks of 4 px
    hf = Kimi_K25ImageProcessor(patch_size=PATCH, merge_size=2)(images, return_tensors="pt")
    assert hf["image_grid_thw"][:, 1:].tolist() == inputs.grid_hw.tolist()
    assert (hf["pixel_values"] - inputs.pixel_values).abs().max() <= 1e-5
    # a budget of 16 patches shrinks a 40x80 image, keeping its 1:2 aspect, before padding to 2x2 blocks
    processor = MoonViTImageProcessor(PATCH, (2, 2), (0.5,) * 3, (0.5,) * 3, max_patches=16)
    small = processor(images[2:] + [images[1].resize((80, 40))])
    hf = Kimi_K25ImageProcessor(patch_size=PATCH, merge_size=2, max_patches=16)(
        images[2:] + [images[1].resize((80, 40))], return_tensors="pt"
    )
    assert small.grid_hw.tolist() == hf["image_grid_thw"][:, 1:].tolist() == [[2, 2], [4, 6]]
    assert (hf["pixel_values"] - small.pixel_values).abs().max() <= 1e-5


def test_image_smaller_than_a_patch_is_rejected(original_checkpoint):
    tower, _ = build_kimi_vision(read_kimi_vision(original_checkpoint), torch.device("cpu"), torch.float32)
    with pytest.raises(MmwbInputError, match=r"image 1 is 3x20 pixels, smaller than one 4x4 patch"):
        tower.image_processor()([Image.new("RGB", (8, 8)), Image.new("RGB", (3, 20))])


def test_wrong_patch_count_and_missing_tower_are_named():
    tower = MoonViT(moonvit_config_from_dict(tiny_config().to_dict()))
    with pytest.raises(MmwbInputError, match="grid_hw"):
        tower.encode(PixelInputs(torch.zeros(5, 3, PATCH, PATCH), torch.tensor([[2, 2]])))
    with pytest.raises(MmwbCheckpointError, match="no vision_tower tensors"):
        split_kimi_state({"language_model.lm_head.weight": torch.zeros(1)}, HEADS)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="the FlashAttention varlen path needs CUDA")
def test_cuda_varlen_path_matches_the_masked_path(original_checkpoint):
    tower, _ = build_kimi_vision(read_kimi_vision(original_checkpoint), torch.device("cpu"), torch.float32)
    pixels, grid_hw = packed_inputs(GRIDS)
    with torch.no_grad():
        expected = tower.encode(PixelInputs(pixels, grid_hw)).features
        tower = tower.to(device="cuda", dtype=torch.bfloat16)
        got = tower.encode(PixelInputs(pixels, grid_hw).to(torch.device("cuda"), torch.bfloat16)).features
    assert (got.float().cpu() - expected).abs().max() <= 0.1


def test_moonshot_config_names_give_the_same_config():
    moonshot = {
        "vision_config": {
            "patch_size": PATCH, "init_pos_emb_height": 6, "init_pos_emb_width": 6, "vt_num_attention_heads": HEADS,
            "vt_num_hidden_layers": 2, "vt_hidden_size": 32, "vt_intermediate_size": 48, "merge_kernel_size": [2, 2],
        }
    }  # fmt: skip
    assert moonvit_config_from_dict(moonshot) == moonvit_config_from_dict(tiny_config().to_dict())


def test_sharded_checkpoint_reads_the_same_tensors(original_checkpoint, tmp_path):
    from safetensors.torch import load_file

    tensors = load_file(original_checkpoint / "model.safetensors")
    keys = sorted(tensors)
    shards = {"a.safetensors": keys[::2], "b.safetensors": keys[1::2]}
    for file, names in shards.items():
        save_file({name: tensors[name] for name in names}, tmp_path / file)
    weight_map = {name: file for file, names in shards.items() for name in names}
    (tmp_path / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    (tmp_path / "config.json").write_text((original_checkpoint / "config.json").read_text())
    whole, sharded = read_kimi_vision(original_checkpoint), read_kimi_vision(tmp_path)
    assert whole.tower_state.keys() == sharded.tower_state.keys() and len(whole.tower_state) == 29
    assert all(torch.equal(whole.tower_state[k], sharded.tower_state[k]) for k in whole.tower_state)
    assert whole.projector_state.keys() == sharded.projector_state.keys() == {
        "pre_norm.weight", "pre_norm.bias", "in_proj.weight", "in_proj.bias", "out_proj.weight", "out_proj.bias",
    }  # fmt: skip
