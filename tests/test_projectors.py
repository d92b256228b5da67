"""Projectors against transformers' LLaVA, Kimi-K2.5 and InstructBLIP modules on the same weights."""

import pytest
import torch
from transformers import (
    InstructBlipQFormerConfig,
    InstructBlipQFormerModel,
    Kimi_K25Config,
    Kimi_K25Model,
    LlavaConfig,
    LlavaModel,
)

from mmwb.errors import MmwbInputError
from mmwb.models.projectors import PROJECTORS, MLP2xGelu, PixelShuffleMLP
from mmwb.models.projectors.qformer import QFormer, QFormerConfig, state_from_transformers
from mmwb.models.vision import VisionFeatures


def randomize(module: torch.nn.Module) -> torch.nn.Module:
    with torch.no_grad():
        for param in module.parameters():
            param.add_(0.1 * torch.randn_like(param))
    return module.eval()


def test_registry_names():
    assert PROJECTORS["mlp2x_gelu"] is MLP2xGelu and PROJECTORS["pixel_shuffle_mlp"] is PixelShuffleMLP
    assert PROJECTORS["qformer"] is QFormer


def test_mlp2x_gelu_matches_llava_projector():
    config = LlavaConfig(
        vision_config={"model_type": "clip_vision_model", "hidden_size": 24},
        text_config={"model_type": "llama", "hidden_size": 40, "num_attention_heads": 4},
    )
    reference = randomize(LlavaModel(config).multi_modal_projector)
    ours = MLP2xGelu(24, 40)
    ours.load_state_dict(reference.state_dict())
    features = torch.randn(2, 9, 24)
    with torch.no_grad():
        out = ours(VisionFeatures(features, [9, 9], [(3, 3), (3, 3)]))
        assert out.features.shape == (2, 9, 40) and out.token_counts == [9, 9]
        assert (out.features - reference(features)).abs().max() <= 1e-5


def test_pixel_shuffle_matches_kimi_projector_on_packed_grids():
    """Through transformers' public ``Kimi_K25Model.get_image_features``: its tower's patch features (before the
    2x2 merge) in, its projected image tokens out, so the merge order and the MLP are both checked."""
    config = Kimi_K25Config(
        vision_config={
            "hidden_size": 16, "intermediate_size": 24, "num_hidden_layers": 1, "num_attention_heads": 2,
            "patch_size": 2, "pos_emb_height": 6, "pos_emb_width": 6,
        },
        text_config={"model_type": "deepseek_v3", "hidden_size": 20, "vocab_size": 8, "num_hidden_layers": 1},
        projection_hidden_size=16,
    )  # fmt: skip
    torch.manual_seed(0)
    reference = randomize(Kimi_K25Model(config))
    ours = PixelShuffleMLP(16, 20)
    ours.load_state_dict(reference.mm_projector.state_dict())
    grids = [(2, 4), (6, 2), (4, 4)]
    pixels = torch.randn(sum(h * w for h, w in grids), 3, 2, 2)
    grid_thw = torch.tensor([[1, h, w] for h, w in grids])
    with torch.no_grad():
        hf = reference.get_image_features(pixels, image_grid_thw=grid_thw)
        expected = torch.cat(hf.pooler_output)  # (9, 20): 2 + 3 + 4 merged tokens
        out = ours(VisionFeatures(hf.last_hidden_state, [h * w for h, w in grids], grids))
    assert out.features.shape == expected.shape == (9, 20)
    assert out.token_counts == [2, 3, 4] and out.grid_hw == [(1, 2), (3, 1), (2, 2)]
    assert (out.features - expected).abs().max() <= 1e-5


def test_pixel_shuffle_on_dense_batch_and_odd_grid():
    ours = PixelShuffleMLP(8, 12)
    dense = torch.randn(3, 16, 8)
    with torch.no_grad():
        out = ours(VisionFeatures(dense, [16] * 3, [(4, 4)] * 3))
        one = ours(VisionFeatures(dense[1], [16], [(4, 4)]))
    assert out.features.shape == (3, 4, 12) and torch.allclose(out.features[1], one.features, atol=1e-6)
    with pytest.raises(MmwbInputError, match="a 3x4 patch grid cannot be merged in 2x2 blocks"):
        ours(VisionFeatures(torch.randn(12, 8), [12], [(3, 4)]))
    with pytest.raises(
        MmwbInputError, match=r"gives \[17, 17\] tokens for grids \[\(4, 4\), \(4, 4\)\]: keep only"
    ):
        ours(
            VisionFeatures(torch.randn(2, 17, 8), [17] * 2, [(4, 4)] * 2)
        )  # CLS kept: every block would shift


@pytest.fixture(scope="module")
def qformer_pair():
    hf_config = InstructBlipQFormerConfig(
        vocab_size=50, hidden_size=32, num_hidden_layers=3, num_attention_heads=4, intermediate_size=48,
        max_position_embeddings=16, cross_attention_frequency=2, encoder_hidden_size=24,
    )  # fmt: skip
    torch.manual_seed(0)
    reference = randomize(InstructBlipQFormerModel(hf_config))
    query_tokens = torch.randn(1, 5, 32)
    projection = randomize(torch.nn.Linear(32, 40))
    state = {f"qformer.{k}": v for k, v in reference.state_dict().items()}
    state |= {
        "query_tokens": query_tokens,
        **{f"language_projection.{k}": v for k, v in projection.state_dict().items()},
    }
    config = QFormerConfig(
        vision_dim=24, out_dim=40, hidden_size=32, num_layers=3, num_heads=4, intermediate_size=48,
        cross_attention_frequency=2, num_queries=5, vocab_size=50, max_positions=16,
    )  # fmt: skip
    ours = QFormer(config).eval()
    ours.load_state_dict(state_from_transformers(state), strict=True)
    return reference, query_tokens, projection, ours


def test_qformer_matches_instructblip_qformer_with_padded_instructions(qformer_pair):
    reference, query_tokens, projection, ours = qformer_pair
    image = torch.randn(2, 7, 24)
    ids = torch.randint(1, 50, (2, 6))
    mask = torch.tensor([[1, 1, 1, 1, 1, 1], [1, 1, 1, 0, 0, 0]])
    with torch.no_grad():
        hidden = reference(
            input_ids=ids,
            attention_mask=torch.cat([torch.ones(2, 5, dtype=torch.long), mask], dim=1),
            query_embeds=query_tokens.expand(2, -1, -1),
            encoder_hidden_states=image,
        ).last_hidden_state
        expected = projection(hidden[:, :5])
        out = ours(VisionFeatures(image, [7, 7], [(1, 7)] * 2), ids, mask)
    assert out.features.shape == (2, 5, 40) and out.token_counts == [5, 5]
    assert (out.features - expected).abs().max() <= 1e-5


def test_qformer_packed_images_equal_one_by_one(qformer_pair):
    *_, ours = qformer_pair
    first, second = torch.randn(4, 24), torch.randn(9, 24)
    ids = torch.randint(1, 50, (2, 3))
    with torch.no_grad():
        packed = ours(VisionFeatures(torch.cat([first, second]), [4, 9], [(2, 2), (3, 3)]), ids)
        alone = ours(VisionFeatures(second[None], [9], [(3, 3)]), ids[1:])
    assert torch.allclose(packed.features[1], alone.features[0], atol=1e-5)
