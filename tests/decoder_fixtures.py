"""Tiny random transformers MoE checkpoints shared by the decoder tests (built in seconds, saved to tmp_path)."""

from __future__ import annotations

import torch
from transformers import (
    DeepseekV3Config,
    DeepseekV3ForCausalLM,
    MixtralConfig,
    MixtralForCausalLM,
    Qwen3MoeConfig,
    Qwen3MoeForCausalLM,
)

VOCAB = 97


def deepseek_v3(**overrides):
    kwargs = dict(
        vocab_size=VOCAB,
        hidden_size=64,
        intermediate_size=96,
        moe_intermediate_size=32,
        num_hidden_layers=3,
        num_attention_heads=4,
        num_key_value_heads=4,
        n_routed_experts=8,
        n_shared_experts=1,
        num_experts_per_tok=2,
        n_group=1,
        topk_group=1,
        first_k_dense_replace=1,
        q_lora_rank=24,
        kv_lora_rank=16,
        qk_rope_head_dim=8,
        qk_nope_head_dim=16,
        v_head_dim=12,
        routed_scaling_factor=2.5,
        max_position_embeddings=256,
        tie_word_embeddings=False,
    )
    kwargs.update(overrides)
    return DeepseekV3ForCausalLM(DeepseekV3Config(**kwargs))


def qwen3_moe(**overrides):
    kwargs = dict(
        vocab_size=VOCAB,
        hidden_size=64,
        intermediate_size=96,
        moe_intermediate_size=32,
        num_hidden_layers=3,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=16,
        num_experts=8,
        num_experts_per_tok=2,
        norm_topk_prob=True,
        decoder_sparse_step=1,
        mlp_only_layers=[0],
        max_position_embeddings=256,
    )
    kwargs.update(overrides)
    return Qwen3MoeForCausalLM(Qwen3MoeConfig(**kwargs))


def mixtral(**overrides):
    kwargs = dict(
        vocab_size=VOCAB,
        hidden_size=64,
        intermediate_size=32,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=1,
        num_local_experts=4,
        num_experts_per_tok=2,
        max_position_embeddings=256,
    )
    kwargs.update(overrides)
    return MixtralForCausalLM(MixtralConfig(**kwargs))


def randomize(model: torch.nn.Module, generator_seed: int = 0) -> torch.nn.Module:
    """Give every parameter and the DeepSeek selection bias visibly non-trivial random values (fp32)."""
    gen = torch.Generator().manual_seed(generator_seed)
    with torch.no_grad():
        for name, tensor in list(model.named_parameters()) + list(model.named_buffers()):
            if "inv_freq" in name:
                continue
            if name.endswith("norm.weight") or "layernorm" in name:
                tensor.copy_(1.0 + 0.1 * torch.randn(tensor.shape, generator=gen))
            elif "e_score_correction_bias" in name:
                tensor.copy_(0.05 * torch.randn(tensor.shape, generator=gen))
            else:
                tensor.copy_(0.08 * torch.randn(tensor.shape, generator=gen))
    return model.eval()
