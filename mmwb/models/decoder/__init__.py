"""MoE causal-LM decoder (DeepSeek-V3/Moonlight, Qwen3-MoE, Mixtral) with a static KV cache."""

from mmwb.models.decoder.cache import DecoderCache, cache_bytes_per_token
from mmwb.models.decoder.checkpoint import load_decoder
from mmwb.models.decoder.config import DecoderConfig
from mmwb.models.decoder.generate import GenerationConfig, generate, stream
from mmwb.models.decoder.model import DecoderForCausalLM, DecoderOutput
from mmwb.models.decoder.moe import update_expert_bias

__all__ = [
    "DecoderCache",
    "DecoderConfig",
    "DecoderForCausalLM",
    "DecoderOutput",
    "GenerationConfig",
    "cache_bytes_per_token",
    "generate",
    "load_decoder",
    "stream",
    "update_expert_bias",
]
