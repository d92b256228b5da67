"""mmwb's decoder against transformers on the same tiny random checkpoints (fp32): logits, loss, gradients."""

from __future__ import annotations

import pytest
import torch
from decoder_fixtures import VOCAB, deepseek_v3, mixtral, qwen3_moe, randomize

from mmwb.models.loading import from_pretrained

YARN = {
    "rope_type": "yarn",
    "factor": 4.0,
    "original_max_position_embeddings": 64,
    "beta_fast": 32,
    "beta_slow": 1,
    "mscale": 0.707,
    "mscale_all_dim": 0.707,
    "rope_theta": 10000.0,
}

VARIANTS = {
    "deepseek_v3-mla-q_lora": lambda: deepseek_v3(),
    "deepseek_v3-mla-no-q_lora": lambda: deepseek_v3(q_lora_rank=None),
    "deepseek_v3-group-limited": lambda: deepseek_v3(n_group=4, topk_group=2),
    "deepseek_v3-yarn": lambda: deepseek_v3(rope_parameters=YARN, max_position_embeddings=256),
    "deepseek_v3-no-interleave": lambda: deepseek_v3(rope_interleave=False),
    "qwen3_moe-gqa": lambda: qwen3_moe(),
    "qwen3_moe-linear-rope": lambda: qwen3_moe(
        rope_parameters={"rope_type": "linear", "factor": 2.0, "rope_theta": 1e4}
    ),
    "qwen3_moe-yarn": lambda: qwen3_moe(
        rope_parameters={
            "rope_type": "yarn",
            "factor": 4.0,
            "original_max_position_embeddings": 64,
            "rope_theta": 1e4,
        }
    ),
    "mixtral-mqa": lambda: mixtral(),
    "mixtral-mha-tied": lambda: mixtral(num_key_value_heads=4, tie_word_embeddings=True),
}


def _pair(tmp_path, variant):
    reference = randomize(VARIANTS[variant]())
    reference.save_pretrained(tmp_path)
    return reference, from_pretrained(tmp_path)


@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_logits_match_transformers(tmp_path, variant):
    reference, model = _pair(tmp_path, variant)
    ids = torch.randint(0, VOCAB, (2, 11))
    with torch.no_grad():
        expected = reference(input_ids=ids).logits
        got = model(input_ids=ids).logits
    diff = (got - expected).abs().max().item()
    print(f"{variant}: logits max-abs-diff {diff:.2e}")
    assert diff <= 1e-4


@pytest.mark.parametrize("variant", ["deepseek_v3-mla-q_lora", "qwen3_moe-gqa", "mixtral-mqa"])
def test_left_padded_batch_matches_transformers(tmp_path, variant):
    reference, model = _pair(tmp_path, variant)
    ids = torch.randint(0, VOCAB, (2, 9))
    mask = torch.ones_like(ids)
    mask[0, :3] = 0
    positions = (mask.cumsum(-1) - 1).clamp(min=0)
    with torch.no_grad():
        expected = reference(input_ids=ids, attention_mask=mask, position_ids=positions).logits
        got = model(input_ids=ids, attention_mask=mask).logits  # positions derived from the mask
    real = mask.bool()
    diff = (got[real] - expected[real]).abs().max().item()
    print(f"{variant} left-padded: logits max-abs-diff {diff:.2e}")
    assert diff <= 1e-4


@pytest.mark.parametrize("variant", ["deepseek_v3-mla-q_lora", "qwen3_moe-gqa", "mixtral-mqa"])
def test_training_step_loss_and_grads_match(tmp_path, variant):
    reference, model = _pair(tmp_path, variant)
    reference.train()
    model.train()
    ids = torch.randint(0, VOCAB, (2, 10))
    labels = ids.clone()
    labels[:, :2] = -100
    expected = reference(input_ids=ids, labels=labels)
    got = model(input_ids=ids, labels=labels)
    assert abs(got.lm_loss.item() - expected.loss.item()) <= 1e-5
    expected.loss.backward()
    got.lm_loss.backward()
    ours = dict(model.named_parameters())
    theirs = dict(reference.named_parameters())
    checked = 0
    for name in (
        "model.embed_tokens.weight",
        "lm_head.weight",
        "model.layers.1.self_attn.o_proj.weight",
        "model.layers.1.mlp.gate.weight",
        "model.layers.1.post_attention_layernorm.weight",
    ):
        if name in theirs and theirs[name].grad is not None:
            diff = (ours[name].grad - theirs[name].grad).abs().max().item()
            assert diff <= 1e-5, f"{name}: grad diff {diff}"
            checked += 1
    # stacked experts: compare to transformers' fused expert parameters
    ref_experts = reference.model.layers[1].mlp.experts
    our_experts = model.model.layers[1].mlp.experts
    assert (our_experts.down_proj.grad - ref_experts.down_proj.grad).abs().max() <= 1e-5
    assert (our_experts.gate_up_proj.grad - ref_experts.gate_up_proj.grad).abs().max() <= 1e-5
    assert checked >= 4


def test_router_aux_loss_matches_transformers(tmp_path):
    """Switch aux loss equals the ``aux_loss`` transformers' model returns for the same routing and padding."""
    reference, model = _pair(tmp_path, "qwen3_moe-gqa")
    ids = torch.randint(0, VOCAB, (2, 10))
    mask = torch.ones_like(ids)
    mask[1, :4] = 0
    with torch.no_grad():
        expected = reference(input_ids=ids, attention_mask=mask, output_router_logits=True)
        got = model(input_ids=ids, attention_mask=mask, labels=ids)
    assert abs(got.aux_loss.item() - expected.aux_loss.item()) <= 1e-5


def test_ntk_rope_matches_transformers_dynamic_ntk_base():
    """Static NTK-aware scaling with alpha equals transformers' dynamic NTK at the length where its alpha is that."""
    from transformers import Qwen3MoeConfig
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    from mmwb.models.decoder import DecoderConfig
    from mmwb.models.decoder.rope import rope_frequencies

    hf = Qwen3MoeConfig(
        head_dim=16,
        max_position_embeddings=64,
        rope_parameters={"rope_type": "dynamic", "factor": 3.0, "rope_theta": 1e4},
    )
    # transformers: base * (factor * L / max - (factor - 1)) ** (d / (d - 2)); at L = 2 * max that is alpha = 4
    want, _ = ROPE_INIT_FUNCTIONS["dynamic"](hf, seq_len=128)
    ours, scale = rope_frequencies(
        DecoderConfig(head_dim=16, rope_type="ntk", rope_factor=4.0, rope_theta=1e4)
    )
    assert scale == 1.0
    assert torch.allclose(ours, want, rtol=1e-6)
