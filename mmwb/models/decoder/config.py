"""One hyperparameter dataclass for every decoder family mmwb runs, plus the reader for transformers configs."""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from typing import Any

from mmwb.errors import MmwbConfigError

ROPE_TYPES = ("default", "linear", "ntk", "dynamic", "yarn")
SCORING_FUNCS = ("softmax", "sigmoid")
INITS = ("normal", "fan_in")


@dataclass
class DecoderConfig:
    """Hyperparameters of a pre-norm decoder with GQA or MLA attention and dense or MoE feed-forward layers."""

    vocab_size: int = 32000
    hidden_size: int = 512
    num_layers: int = 8
    num_heads: int = 8
    rms_norm_eps: float = 1e-6
    tie_word_embeddings: bool = False
    max_position_embeddings: int = 4096
    # Attention: "gqa" covers MHA (num_kv_heads == num_heads), GQA and MQA (num_kv_heads == 1); "mla" is DeepSeek's.
    attention: str = "gqa"
    num_kv_heads: int = 8
    head_dim: int = 64
    attention_bias: bool = False
    qk_norm: bool = False  # Qwen3: RMSNorm over each head of q and k before RoPE
    q_lora_rank: int | None = None
    kv_lora_rank: int = 0
    qk_nope_head_dim: int = 0
    qk_rope_head_dim: int = 0
    v_head_dim: int = 0
    # Cached steps with at most this many new tokens take the decode path (MLA absorbed, heads folded).
    decode_max_tokens: int = 8
    # RoPE and its context-extension variants.
    rope_theta: float = 10000.0
    rope_type: str = "default"
    rope_factor: float = 1.0
    rope_original_max_position_embeddings: int | None = None
    rope_beta_fast: float = 32.0
    rope_beta_slow: float = 1.0
    rope_mscale: float = 0.0
    rope_mscale_all_dim: float = 0.0
    rope_attention_factor: float | None = None
    rope_truncate: bool = True
    # Feed-forward: dense SwiGLU layers and MoE layers.
    intermediate_size: int = 1408
    moe_intermediate_size: int = 256
    n_routed_experts: int = 0  # 0: every layer is dense
    n_shared_experts: int = 0
    num_experts_per_tok: int = 2
    scoring_func: str = "softmax"
    norm_topk_prob: bool = True
    routed_scaling_factor: float = 1.0
    n_group: int = 1
    topk_group: int = 1
    expert_bias: bool = False  # DeepSeek-V3 e_score_correction_bias (aux-loss-free balancing)
    first_k_dense_replace: int = 0
    moe_layer_freq: int = 1
    mlp_only_layers: list[int] = field(default_factory=list)
    # Training-time router losses (added to the LM loss when labels are given).
    router_aux_loss_coef: float = 0.0
    router_z_loss_coef: float = 0.0
    pad_token_id: int | None = None
    bos_token_id: int | None = None
    eos_token_id: int | list[int] | None = None
    # Init of a decoder trained from scratch (DecoderForCausalLM.init_weights): "normal", every matrix and the
    # embedding table N(0, initializer_range) (GPT-2, transformers); "fan_in", U(+-1 / sqrt(fan_in)) as PyTorch's
    # nn.Linear starts, from which a narrow decoder learns faster (issue 19: perplexity 2.01 -> 1.81 in 300 steps)
    init: str = "normal"
    initializer_range: float = 0.02

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:
        """Reject impossible combinations early, naming the offending key."""
        checks = [
            (self.attention in ("gqa", "mla"), "attention", "must be 'gqa' or 'mla'"),
            (self.rope_type in ROPE_TYPES, "rope_type", f"must be one of {ROPE_TYPES}"),
            (self.scoring_func in SCORING_FUNCS, "scoring_func", f"must be one of {SCORING_FUNCS}"),
            (self.hidden_size > 0 and self.num_layers > 0, "hidden_size/num_layers", "must be positive"),
            (self.init in INITS, "init", f"must be one of {INITS}"),
            (self.initializer_range > 0, "initializer_range", "must be positive"),
        ]
        if self.attention == "gqa":
            checks.append(
                (
                    self.num_kv_heads > 0 and self.num_heads % self.num_kv_heads == 0,
                    "num_kv_heads",
                    "must divide num_heads",
                )
            )
        else:
            checks.append((self.kv_lora_rank > 0, "kv_lora_rank", "must be > 0 for MLA"))
            checks.append((self.qk_rope_head_dim % 2 == 0, "qk_rope_head_dim", "must be even"))
        if self.n_routed_experts:
            checks.append(
                (
                    0 < self.num_experts_per_tok <= self.n_routed_experts,
                    "num_experts_per_tok",
                    "must be in 1..E",
                )
            )
            per_group = self.n_routed_experts // max(self.n_group, 1)
            checks += [
                (self.n_group >= 1, "n_group", "must be >= 1"),
                (
                    self.n_routed_experts % max(self.n_group, 1) == 0,
                    "n_group",
                    "must divide n_routed_experts",
                ),
                # a group is scored by its best two experts
                (self.n_group == 1 or per_group >= 2, "n_group", "must leave at least 2 experts per group"),
                (1 <= self.topk_group <= self.n_group, "topk_group", "must be in 1..n_group"),
                (
                    self.n_group == 1 or self.topk_group * per_group >= self.num_experts_per_tok,
                    "topk_group",
                    "must keep groups holding at least num_experts_per_tok experts",
                ),
            ]
        for ok, key, why in checks:
            if not ok:
                raise MmwbConfigError(f"decoder config: {key}={getattr(self, key.split('/')[0])!r} {why}")

    @property
    def rope_dim(self) -> int:
        """Number of rotated dimensions per head."""
        return self.qk_rope_head_dim if self.attention == "mla" else self.head_dim

    @property
    def softmax_scale(self) -> float:
        """Attention scale; YaRN with mscale_all_dim (DeepSeek) also sharpens it by mscale(factor)^2."""
        qk_dim = self.qk_nope_head_dim + self.qk_rope_head_dim if self.attention == "mla" else self.head_dim
        scale = qk_dim**-0.5
        if self.rope_type == "yarn" and self.rope_mscale_all_dim:
            m = yarn_mscale(self.rope_factor, self.rope_mscale_all_dim)
            scale = scale * m * m
        return scale

    def is_moe_layer(self, index: int) -> bool:
        """DeepSeek's dense first layers and Qwen's sparse step / mlp_only_layers in one rule."""
        return (
            self.n_routed_experts > 0
            and index >= self.first_k_dense_replace
            and index not in self.mlp_only_layers
            and (index + 1) % self.moe_layer_freq == 0
        )

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> DecoderConfig:
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise MmwbConfigError(f"decoder config: unknown keys {unknown}")
        return cls(**data)

    @classmethod
    def from_hf_config(cls, hf: dict[str, Any]) -> DecoderConfig:
        """Translate a transformers config.json dict (deepseek_v3, kimi_k2, qwen3_moe, mixtral)."""
        model_type = hf.get("model_type")
        readers = {
            "deepseek_v3": _deepseek_v3,
            "kimi_k2": _deepseek_v3,
            "qwen3_moe": _qwen3_moe,
            "mixtral": _mixtral,
        }
        if model_type not in readers:
            raise MmwbConfigError(f"config.json: model_type {model_type!r} is not one of {sorted(readers)}")
        if hf.get("quantization_config"):
            raise MmwbConfigError(
                "config.json: quantized checkpoints (quantization_config) are not supported"
            )
        common = {
            "vocab_size": hf["vocab_size"],
            "hidden_size": hf["hidden_size"],
            "num_layers": hf["num_hidden_layers"],
            "num_heads": hf["num_attention_heads"],
            "rms_norm_eps": hf.get("rms_norm_eps", 1e-6),
            "tie_word_embeddings": hf.get("tie_word_embeddings", False),
            "max_position_embeddings": hf.get("max_position_embeddings", 4096),
            "intermediate_size": hf.get("intermediate_size", 0),
            "num_experts_per_tok": hf.get("num_experts_per_tok", 2),
            "router_aux_loss_coef": hf.get("router_aux_loss_coef", 0.0)
            if hf.get("output_router_logits")
            else 0.0,
            "pad_token_id": hf.get("pad_token_id"),
            "bos_token_id": hf.get("bos_token_id"),
            "eos_token_id": hf.get("eos_token_id"),
        }
        return cls(**common, **_rope(hf), **readers[model_type](hf))


def yarn_mscale(scale: float, mscale: float = 1.0) -> float:
    """YaRN's attention temperature correction 0.1 * m * ln(s) + 1 (identity for s <= 1)."""
    return 1.0 if scale <= 1 else 0.1 * mscale * math.log(scale) + 1.0


def _rope(hf: dict[str, Any]) -> dict[str, Any]:
    """Read both the transformers-5 `rope_parameters` and the older `rope_theta` + `rope_scaling` layouts."""
    params = dict(hf.get("rope_parameters") or hf.get("rope_scaling") or {})
    theta = params.get("rope_theta", hf.get("rope_theta", 10000.0))
    rope_type = params.get("rope_type", params.get("type", "default"))
    if rope_type not in ROPE_TYPES:
        raise MmwbConfigError(f"config.json: rope_type {rope_type!r} is not one of {ROPE_TYPES}")
    out: dict[str, Any] = {"rope_theta": float(theta), "rope_type": rope_type}
    if rope_type == "default":
        return out
    original = params.get("original_max_position_embeddings")
    factor = params.get("factor")
    if factor is None and original:
        factor = hf.get("max_position_embeddings", original) / original
    out.update(
        rope_factor=float(factor if factor is not None else 1.0),
        rope_original_max_position_embeddings=original,
        rope_beta_fast=float(params.get("beta_fast") or 32.0),
        rope_beta_slow=float(params.get("beta_slow") or 1.0),
        rope_mscale=float(params.get("mscale") or 0.0),
        rope_mscale_all_dim=float(params.get("mscale_all_dim") or 0.0),
        rope_attention_factor=params.get("attention_factor"),
        rope_truncate=bool(params.get("truncate", True)),
    )
    if rope_type == "yarn" and original is None:
        raise MmwbConfigError("config.json: YaRN rope needs original_max_position_embeddings")
    return out


def _deepseek_v3(hf: dict[str, Any]) -> dict[str, Any]:
    """Routing as the config's ``topk_method`` says: ``noaux_tc`` (DeepSeek-V3, transformers' deepseek_v3, Kimi):
    scores plus a selection bias, top-2-sum groups; ``greedy`` (Moonshot's remote code offers it): plain top-k of
    the scores, no bias, no groups. ``scoring_func`` picks sigmoid or softmax scores."""
    method = hf.get("topk_method", "noaux_tc")
    if method not in ("noaux_tc", "greedy"):
        raise MmwbConfigError(f"config.json: topk_method {method!r} is not supported (noaux_tc, greedy)")
    greedy = method == "greedy"
    return {
        "attention": "mla",
        "num_kv_heads": hf["num_attention_heads"],
        "head_dim": hf["qk_rope_head_dim"],
        "attention_bias": hf.get("attention_bias", False),
        "q_lora_rank": hf.get("q_lora_rank"),
        "kv_lora_rank": hf["kv_lora_rank"],
        "qk_nope_head_dim": hf["qk_nope_head_dim"],
        "qk_rope_head_dim": hf["qk_rope_head_dim"],
        "v_head_dim": hf["v_head_dim"],
        "moe_intermediate_size": hf["moe_intermediate_size"],
        "n_routed_experts": hf.get("n_routed_experts") or 0,
        "n_shared_experts": hf.get("n_shared_experts") or 0,
        "scoring_func": hf.get("scoring_func", "sigmoid"),
        "norm_topk_prob": hf.get("norm_topk_prob", True),
        "routed_scaling_factor": hf.get("routed_scaling_factor", 1.0),
        "n_group": 1 if greedy else hf.get("n_group") or 1,
        "topk_group": 1 if greedy else hf.get("topk_group") or 1,
        "expert_bias": not greedy,
        "first_k_dense_replace": hf.get("first_k_dense_replace", 0),
    }


def _qwen3_moe(hf: dict[str, Any]) -> dict[str, Any]:
    if hf.get("use_sliding_window"):
        raise MmwbConfigError("config.json: use_sliding_window=true is not supported")
    heads = hf["num_attention_heads"]
    return {
        "num_kv_heads": hf.get("num_key_value_heads", heads),
        "head_dim": hf.get("head_dim") or hf["hidden_size"] // heads,
        "attention_bias": hf.get("attention_bias", False),
        "qk_norm": True,
        "moe_intermediate_size": hf["moe_intermediate_size"],
        "n_routed_experts": hf.get("num_experts") or hf.get("num_local_experts") or 0,
        "norm_topk_prob": hf.get("norm_topk_prob", False),
        "moe_layer_freq": hf.get("decoder_sparse_step", 1),
        "mlp_only_layers": list(hf.get("mlp_only_layers") or []),
    }


def _mixtral(hf: dict[str, Any]) -> dict[str, Any]:
    window = hf.get("sliding_window")
    if window is not None and window < hf.get("max_position_embeddings", 0):
        raise MmwbConfigError(f"config.json: sliding_window={window} is not supported")
    heads = hf["num_attention_heads"]
    return {
        "num_kv_heads": hf.get("num_key_value_heads", heads),
        "head_dim": hf.get("head_dim") or hf["hidden_size"] // heads,
        "moe_intermediate_size": hf["intermediate_size"],
        "n_routed_experts": hf.get("num_local_experts", 8),
        "norm_topk_prob": True,
    }
