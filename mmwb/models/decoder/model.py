"""The decoder: embeddings, pre-norm layers (GQA or MLA attention; dense or MoE feed-forward), LM head.

Module and parameter names follow transformers' DeepSeek-V3/Qwen3-MoE layout, so checkpoint import is mostly a
rename. `forward` is the training/scoring entry; `step` is the cached inference entry generation drives.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from mmwb.errors import MmwbInputError
from mmwb.models.decoder.attention import GroupedQueryAttention
from mmwb.models.decoder.cache import DecoderCache, KVCache, LatentCache, cache_bytes_per_token
from mmwb.models.decoder.config import DecoderConfig
from mmwb.models.decoder.decode_plan import plan_decode
from mmwb.models.decoder.embedding import TokenEmbedding
from mmwb.models.decoder.generate import generate
from mmwb.models.decoder.linear import Linear
from mmwb.models.decoder.mask import attention_mask_for, last_query_rows, positions_from_mask
from mmwb.models.decoder.mla import MultiHeadLatentAttention
from mmwb.models.decoder.mlp import SwiGLU
from mmwb.models.decoder.moe import Experts, MoEBlock, Router, Routing, load_balancing_loss, router_z_loss
from mmwb.models.decoder.norm import RMSNorm
from mmwb.models.decoder.rope import RotaryEmbedding
from mmwb.models.decoder.save import save_decoder

IGNORE_INDEX = -100


@dataclass
class DecoderOutput:
    """Like transformers' MoeCausalLMOutput: loss includes the weighted router losses when labels are given."""

    logits: torch.Tensor
    loss: torch.Tensor | None = None
    lm_loss: torch.Tensor | None = None
    aux_loss: torch.Tensor | None = None
    z_loss: torch.Tensor | None = None
    expert_counts: torch.Tensor | None = None  # (num MoE layers, E) token-expert assignments of this pass


class DecoderLayer(nn.Module):
    def __init__(self, cfg: DecoderConfig, index: int) -> None:
        super().__init__()
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.self_attn = (
            MultiHeadLatentAttention(cfg) if cfg.attention == "mla" else GroupedQueryAttention(cfg)
        )
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.mlp = (
            MoEBlock(cfg) if cfg.is_moe_layer(index) else SwiGLU(cfg.hidden_size, cfg.intermediate_size)
        )

    def forward(
        self,
        h: torch.Tensor,
        rope: tuple[torch.Tensor, torch.Tensor],
        mask: torch.Tensor | None,
        cache: KVCache | LatentCache | None,
        position: int,
        queries: int = 0,
    ) -> tuple[torch.Tensor, Routing | None]:
        """``queries`` > 0: the outputs of the last ``queries`` positions only (the model's last layer, when only
        their logits are wanted: the other positions are needed there just for their keys and values)."""
        attended = self.self_attn(self.input_layernorm(h), rope, mask, cache, position, queries)
        h = (h[:, -queries:] if queries else h) + attended
        out = self.mlp(self.post_attention_layernorm(h))
        routing = None
        if isinstance(out, tuple):
            out, routing = out
        return h + out, routing


class DecoderModel(nn.Module):
    def __init__(self, cfg: DecoderConfig) -> None:
        super().__init__()
        self.embed_tokens = TokenEmbedding(cfg.vocab_size, cfg.hidden_size)
        self.layers = nn.ModuleList(DecoderLayer(cfg, i) for i in range(cfg.num_layers))
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.rotary_emb = RotaryEmbedding(cfg)


class DecoderForCausalLM(nn.Module):
    """MoE causal LM implementing mmwb's StepModel protocol (allocate_cache / step / reorder_cache)."""

    _no_split_modules = ["DecoderLayer"]  # gathered as one unit by sharded training (transformers convention)

    def __init__(self, config: DecoderConfig) -> None:
        super().__init__()
        self.config = config
        self.model = DecoderModel(config)
        self.lm_head = Linear(config.hidden_size, config.vocab_size, bias=False)
        if config.tie_word_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight
        self.gradient_checkpointing = False
        self.init_weights()
        self.use_decode_layout()

    @torch.no_grad()
    def init_weights(self, std: float | None = None) -> None:
        """Random init for training from scratch (the config's ``init``; N(0, ``std``) when given), unit norms,
        zero biases.

        "normal" draws every matrix from N(0, ``initializer_range``), GPT-2's 0.02 by default: about
        0.55 / sqrt(width) at width 768 but 0.23 / sqrt(width) at width 128, where the attention logits (q . k, a
        product of two such matrices) start ~6x flatter than with PyTorch's own init. "fan_in" draws each matrix
        from U(+-1 / sqrt(fan_in)) as nn.Linear does (the embedding table like a tied LM head: fan_in = width).
        Issue 19, a 4 x 128 decoder after 300 steps on shapes captions and questions: validation perplexity 2.01
        with "normal", 1.81 with "fan_in" (the tiny-shapes model card has the runs)."""
        for module in self.modules():
            if isinstance(module, nn.Linear | nn.Embedding):
                self._init_matrix(module.weight, std)
                if getattr(module, "bias", None) is not None:
                    module.bias.zero_()
            elif isinstance(module, Experts):
                self._init_matrix(module.gate_up_proj, std)
                self._init_matrix(module.down_proj, std)
            elif isinstance(module, Router):
                self._init_matrix(module.weight, std)
                if module.e_score_correction_bias is not None:
                    module.e_score_correction_bias.zero_()
            elif isinstance(module, RMSNorm):
                module.weight.fill_(1.0)

    def _init_matrix(self, weight: torch.Tensor, std: float | None) -> None:
        """``weight (..., out, in)`` in place, by the config's scheme (N(0, ``std``) when given)."""
        if std is None and self.config.init == "fan_in":
            bound = weight.shape[-1] ** -0.5
            weight.uniform_(-bound, bound)
        else:
            weight.normal_(0.0, self.config.initializer_range if std is None else std)

    @torch.no_grad()
    def use_decode_layout(self) -> DecoderForCausalLM:
        """Store the projection weights column-major on CPU: same shapes, values and names, transposed strides.

        A decode step multiplies one row per sequence by every weight. CPU BLAS streams a weight kept (in, out) in
        memory up to twice as fast as nn.Linear's (out, in) for such products, and prefill and training run as
        fast either way (measured when it came in: `git log -p BENCHMARKS.md`, "decode layout"). New decoders
        start so, and checkpoint loading allocates its CPU tensors with these strides; checkpoints are unchanged
        (every saver writes contiguous copies). A tied LM head stays an embedding table, row-major."""
        if self.device.type not in ("cpu", "meta"):  # meta: the strides checkpoint loading allocates
            return self
        tied = self.lm_head.weight is self.model.embed_tokens.weight
        for module in self.modules():
            if isinstance(module, nn.Linear) and not (tied and module is self.lm_head):
                module.weight.data = _column_major(module.weight.data)
            elif isinstance(module, Experts):
                module.gate_up_proj.data = _column_major(module.gate_up_proj.data)
                module.down_proj.data = _column_major(module.down_proj.data)
        return self

    def reset_rope(self, device: torch.device) -> None:
        """Recompute the RoPE frequencies (non-persistent; needed after building on the meta device)."""
        self.model.rotary_emb = RotaryEmbedding(self.config, device=device)

    def gradient_checkpointing_enable(self) -> None:
        self.gradient_checkpointing = True

    def gradient_checkpointing_disable(self) -> None:
        self.gradient_checkpointing = False

    @property
    def device(self) -> torch.device:
        return self.model.norm.weight.device  # never quantized (mmwb.models.quantize), unlike the tables

    @property
    def dtype(self) -> torch.dtype:
        return self.model.norm.weight.dtype

    def routers(self) -> list[Router]:
        return [m for m in self.modules() if isinstance(m, Router)]

    def forward(
        self,
        input_ids: torch.Tensor | None = None,
        inputs_embeds: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.Tensor | None = None,
        labels: torch.Tensor | None = None,
        logits_to_keep: int = 0,
    ) -> DecoderOutput:
        """logits_to_keep > 0 computes logits for the last positions only (a full vocab row costs as much as a
        layer); 0 keeps all, as transformers does."""
        if labels is not None and logits_to_keep:
            raise MmwbInputError("labels need logits for every position; leave logits_to_keep at 0")
        hidden, routings = self._hidden(
            input_ids, inputs_embeds, attention_mask, position_ids, None, 0, logits_to_keep
        )
        logits = self.lm_head(hidden[:, -logits_to_keep:])
        out = DecoderOutput(logits=logits)
        if routings:
            out.expert_counts = torch.stack([r.counts for r in routings]).detach()
        if labels is not None:
            out.lm_loss = out.loss = causal_lm_loss(logits, labels)
            if routings:
                out.aux_loss = load_balancing_loss(routings, self.config.n_routed_experts, attention_mask)
                out.z_loss = router_z_loss(routings, attention_mask)
                out.loss = out.lm_loss + self.config.router_aux_loss_coef * out.aux_loss
                out.loss = out.loss + self.config.router_z_loss_coef * out.z_loss
        return out

    def _hidden(
        self,
        input_ids: torch.Tensor | None,
        inputs_embeds: torch.Tensor | None,
        attention_mask: torch.Tensor | None,
        position_ids: torch.Tensor | None,
        cache: DecoderCache | None,
        cache_position: int,
        keep: int = 0,
    ) -> tuple[torch.Tensor, list[Routing]]:
        """Final hidden states (B, T, C), or (B, keep, C) for the last ``keep`` positions when keep > 0."""
        if (input_ids is None) == (inputs_embeds is None):
            raise MmwbInputError("pass exactly one of input_ids and inputs_embeds")
        h = self.model.embed_tokens(input_ids) if inputs_embeds is None else inputs_embeds
        length = h.shape[1]
        if position_ids is None:
            position_ids = positions_from_mask(attention_mask, h.shape[0], length, cache_position, h.device)
        rope = self.model.rotary_emb(position_ids, h.dtype)
        if cache_position == 0 and attention_mask is not None and bool(attention_mask.all()):
            attention_mask = None  # nothing padded: plain causal SDPA skips the masked half of the scores
        mask = attention_mask_for(attention_mask, length, cache_position, h.device)
        routings = []
        last = len(self.model.layers) - 1
        for i, layer in enumerate(self.model.layers):
            layer_cache = cache.layers[i] if cache is not None else None
            queries = keep if i == last and 0 < keep < length else 0
            if queries:
                mask = last_query_rows(mask, queries, cache_position + length, h.device)
            if self.gradient_checkpointing and self.training and torch.is_grad_enabled():
                h, routing = checkpoint(
                    layer, h, rope, mask, layer_cache, cache_position, queries, use_reentrant=False
                )
            else:
                h, routing = layer(h, rope, mask, layer_cache, cache_position, queries)
            if routing is not None:
                routings.append(routing)
        return self.model.norm(h), routings

    # --- StepModel protocol (driven by mmwb.models.decoder.generate) ---

    def allocate_cache(
        self, batch_size: int, max_length: int, dtype: torch.dtype | None = None
    ) -> DecoderCache:
        """Preallocate every layer's cache for max_length tokens on the model's device (and dtype)."""
        limit = self.config.max_position_embeddings
        if self.config.rope_type == "dynamic" and max_length > limit:
            raise MmwbInputError(
                f"{max_length} positions: this model's dynamic NTK RoPE is only implemented up to "
                f"max_position_embeddings={limit} (where it equals plain RoPE)"
            )
        return DecoderCache.allocate(self.config, batch_size, max_length, self.device, dtype or self.dtype)

    @torch.no_grad()
    def step(
        self,
        input_ids: torch.Tensor | None,
        *,
        cache: DecoderCache,
        cache_position: int,
        position_ids: torch.Tensor,
        attention_mask: torch.Tensor | None,
        inputs_embeds: torch.Tensor | None = None,
        logits_to_keep: int = 0,
    ) -> torch.Tensor:
        """Run T new tokens at cache slots [cache_position, cache_position + T); returns fp32 logits (B, T, V).

        logits_to_keep=1 returns (B, 1, V) for the last token only: what a prefill needs, at 1/T of the LM-head cost.
        """
        length = (input_ids if input_ids is not None else inputs_embeds).shape[1]
        if cache_position + length > cache.max_length:
            raise MmwbInputError(
                f"cache holds {cache.max_length} tokens, step needs {cache_position + length}; allocate a longer one"
            )
        one_token = input_ids is not None and inputs_embeds is None and input_ids.shape == (1, 1)
        if one_token and attention_mask is None and position_ids is not None and cache_position >= 0:
            logits = self._decode_in_one_call(input_ids, cache, cache_position, position_ids)
            if logits is not None:
                return logits
        hidden, _ = self._hidden(
            input_ids, inputs_embeds, attention_mask, position_ids, cache, cache_position, logits_to_keep
        )
        return self.lm_head(hidden[:, -logits_to_keep:]).float()

    def _decode_in_one_call(
        self, input_ids: torch.Tensor, cache: DecoderCache, slot: int, position_ids: torch.Tensor
    ) -> torch.Tensor | None:
        """A batch-1 decode token through the C kernels in one call (mmwb.models.decoder.decode_plan), planned at
        the cache's first decode step; None where that does not apply (the modules run it: under autocast they
        compute in its dtype, under torch.compile they are traced)."""
        if torch.is_autocast_enabled("cpu") or torch.compiler.is_compiling():
            return None
        if cache.decode_plan is None or (cache.decode_plan and not cache.decode_plan.made_for(self)):
            cache.decode_plan = plan_decode(self, cache) or False
        if not cache.decode_plan or not input_ids.is_cpu:
            return None
        return cache.decode_plan.run(int(input_ids), slot, int(position_ids))

    def reorder_cache(self, cache: DecoderCache, beam_idx: torch.Tensor) -> DecoderCache:
        return cache.reorder(beam_idx)

    def cache_bytes_per_token(self, dtype: torch.dtype | None = None) -> int:
        """KV-cache bytes one token costs across all layers (MLA: kv_lora_rank + rope dims per layer)."""
        return cache_bytes_per_token(self.config, dtype or self.dtype)

    def generate(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None, **kwargs: Any):
        return generate(self, input_ids, attention_mask=attention_mask, **kwargs)

    def save_pretrained(self, path, max_shard_bytes: int | None = None) -> None:
        """mmwb's decoder folder, which ``mmwb.from_pretrained`` (``load_decoder``) reads back."""
        save_decoder(self, path, max_shard_bytes=max_shard_bytes)


def _column_major(weight: torch.Tensor) -> torch.Tensor:
    """The same (..., out, in) tensor stored with its last two dimensions transposed in memory."""
    return weight.transpose(-1, -2).contiguous().transpose(-1, -2)


def causal_lm_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Next-token cross entropy in fp32, mean over labels that are not IGNORE_INDEX."""
    shifted = F.pad(labels, (0, 1), value=IGNORE_INDEX)[:, 1:]  # (B, T): label of the next token
    return F.cross_entropy(
        logits.float().reshape(-1, logits.shape[-1]), shifted.reshape(-1), ignore_index=IGNORE_INDEX
    )
