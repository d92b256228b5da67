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


_MEASURE_LOAD = """
import sys, psutil, torch
import mmwb
from mmwb.models.decoder import DecoderConfig, DecoderForCausalLM
from mmwb.models.quantize import quantize_model
from mmwb.runtime import track_peak_memory

with torch.device("meta"):  # one-off imports and lazy torch initialisation are not part of the measurement
    DecoderForCausalLM(DecoderConfig())
torch.ops.aten._weight_int8pack_mm
import mmwb.models.vlm.import_hf  # the VLM loaders and transformers' model classes they read (70 MB of imports)
from transformers import CLIPVisionModel, LlamaForCausalLM, LlavaForConditionalGeneration
path, mode, how = sys.argv[1:]
info = psutil.Process().memory_info()
baseline = info.rss - info.shared
with track_peak_memory(torch.device("cpu"), interval_s=0.0005) as memory:
    if mode == "none":
        model = mmwb.from_pretrained(path, device="cpu")
    elif how == "streamed":
        model = mmwb.from_pretrained(path, quantize=mode)
    else:
        model = quantize_model(mmwb.from_pretrained(path, device="cpu"), mode)
print(memory.peak_anonymous_bytes - baseline, memory.final_anonymous_bytes - baseline)
"""


def measure_load(path, mode: str | None = None, how: str = "streamed") -> tuple[int, int]:
    """Private memory (RSS less file-backed pages: a mapped checkpoint's pages are page cache, not a copy) that a
    fresh process adds at the peak of loading ``path`` and at its end: a float load (``mode`` None), or int8/int4
    quantized while loading (``how`` "streamed") or after a float load ("float_first")."""
    import subprocess
    import sys

    script = [sys.executable, "-c", _MEASURE_LOAD, str(path), mode or "none", how]
    out = subprocess.run(script, capture_output=True, text=True, check=True).stdout
    peak, final = map(int, out.split())
    return peak, final
