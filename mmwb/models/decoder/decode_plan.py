"""A decoder and its cache as one C structure, so that a batch-1 decode token runs in one call (kernels/step.c).

At bench-small's widths a token's weights stream through mmwb's kernels in ~1.3 ms, and the modules around them
(Python, torch dispatch, ~600 small ops a token) took ~2 ms more: no weight format could beat that (issue 20).
``plan_decode`` reads the model once per generation (the cache's lifetime) into nested ctypes structures: each
linear layer's weight as an address and a format (fp32 in the decode layout or row-major, int8, int4 panels),
each layer's norms, router and caches. ``DecodePlan.run`` then hands one token to ``mmwb_decode_token``, which calls
the same C kernels the modules call, in the same order.

It applies to fp32 models on the CPU with mmwb's kernels built, at batch 1 with no padding, with every module of
a kind it knows (no adapter, no hook) and every quantized weight in a form mmwb's kernels read; anything else
gets None and runs through the modules. The plan holds references to every tensor it points into, so memory
stays valid; what changes in the model while the cache is in use is not seen (weights updated in place are:
their addresses stay): replaced weights or layers, a hook registered between two tokens. generate makes a cache
for each generation.
"""

from __future__ import annotations

import ctypes
import weakref
from dataclasses import dataclass

import torch
from torch import nn

from mmwb.models.decoder.attention import GroupedQueryAttention
from mmwb.models.decoder.cache import DecoderCache, KVCache, LatentCache
from mmwb.models.decoder.embedding import TokenEmbedding
from mmwb.models.decoder.kernels import cpu
from mmwb.models.decoder.linear import Linear
from mmwb.models.decoder.mla import MultiHeadLatentAttention
from mmwb.models.decoder.mlp import SwiGLU
from mmwb.models.decoder.moe import Experts, MoEBlock, Router
from mmwb.models.decoder.norm import RMSNorm

# step.c's formats: fp32 (out, in) column-major (the decode layout) or row-major, int8 rows, int4 panels
FP32_COLUMNS, FP32_ROWS, INT8, INT4 = 0, 1, 2, 3
_MODES = {"int8": INT8, "int4": INT4}
MAX_EXPERTS_A_TOKEN = 64  # step.c's: routed experts a token may choose
_I64, _F32, _PTR = ctypes.c_int64, ctypes.c_float, ctypes.c_void_p


@dataclass(frozen=True)
class Operand:
    """A quantized weight as mmwb's kernels read it (what quantized layers' ``kernel_operand`` returns): ``mode``
    int8 (``weight`` (N, K) int8, ``scale`` (N,) fp32) or int4 (``weight`` panels (N, K / 2) uint8, ``scale`` the
    bf16 table, ``group`` inputs a group)."""

    mode: str
    weight: torch.Tensor
    scale: torch.Tensor
    group: int = 0


class _Matrix(ctypes.Structure):
    _fields_ = [(n, _I64) for n in ("format", "inputs", "out", "ld", "group")] + [
        ("weight", _PTR),
        ("scale", _PTR),
        ("bias", _PTR),
    ]


class _Mlp(ctypes.Structure):
    _fields_ = [("inter", _I64), ("gate", _Matrix), ("up", _Matrix), ("down", _Matrix)]


class _Attention(ctypes.Structure):
    _fields_ = [
        *[(n, _I64) for n in ("mla", "heads", "kv_heads", "head_dim", "nope", "rope", "value", "rank")],
        *[(n, _I64) for n in ("kv_b_ld", "kv_b_row_major", "slots")],
        ("scale", _F32),
        *[(n, _Matrix) for n in ("q", "k", "v", "o", "q_a")],
        *[(n, _PTR) for n in ("q_norm", "k_norm", "q_a_norm", "kv_norm", "kv_b", "key_cache", "value_cache")],
    ]


class _FeedForward(ctypes.Structure):
    _fields_ = [
        *[(n, _I64) for n in ("experts", "top_k", "sigmoid", "n_group", "topk_group", "norm")],
        ("scaling", _F32),
        ("router", _PTR),
        ("router_bias", _PTR),
        *[(n, _I64) for n in ("format", "inter", "group", "ld_in", "ld_down")],
        *[(n, _PTR) for n in ("gate_up", "gate_up_scale", "down", "down_scale")],
        ("mlp", _Mlp),
    ]


class _Layer(ctypes.Structure):
    _fields_ = [("input_norm", _PTR), ("post_norm", _PTR), ("attention", _Attention), ("ff", _FeedForward)]


class _Decoder(ctypes.Structure):
    _fields_ = [
        *[(n, _I64) for n in ("layers", "hidden", "rope_half")],
        ("eps", _F32),
        ("rope_factor", _F32),
        ("inv_freq", _PTR),
        ("norm", _PTR),
        ("embed", _Matrix),
        ("lm_head", _Matrix),
        ("layer", ctypes.POINTER(_Layer)),
    ]


class DecodePlan:
    """One model and cache in step.c's structures, with every tensor and array they point into."""

    def __init__(self, model: nn.Module, decoder: _Decoder, keep: list[object]) -> None:
        # the model it was made from (not kept alive): a cache handed to another model is planned again
        self._model = weakref.ref(model)
        self._decoder, self._keep = decoder, keep
        self._call = cpu.decode_token_function()

    def made_for(self, model: nn.Module) -> bool:
        return self._model() is model

    def run(self, token: int, slot: int, position: int) -> torch.Tensor | None:
        """fp32 logits (1, 1, V) of ``token`` at RoPE ``position``, its keys and values written at cache ``slot``;
        None where a kernel declined (the caller runs the modules, which write the same slots)."""
        logits = torch.empty(1, 1, self._decoder.lm_head.out, dtype=torch.float32, device="cpu")
        status = self._call(
            ctypes.byref(self._decoder), token, slot, position, logits.data_ptr(), torch.get_num_threads()
        )
        return logits if status == 0 else None


class _Declined(Exception):
    """Something of the model or cache that step.c does not run (the modules then do)."""


def plan_decode(model: nn.Module, cache: DecoderCache) -> DecodePlan | None:
    """An mmwb ``DecoderForCausalLM`` and ``cache`` as one plan, or None where the one-call step does not apply
    (see the module's docstring)."""
    if cpu.decode_token_function() is None or model.dtype != torch.float32 or model.device.type != "cpu":
        return None
    if cache.batch_size != 1 or _has_hooks(model):
        return None
    try:
        return _Builder(model, cache).build()
    except _Declined:
        return None


def _has_hooks(model: nn.Module) -> bool:
    """Forward hooks anywhere (a tap reading a layer's input, an adapter's): the modules must run."""
    module_hooks = torch.nn.modules.module
    if getattr(module_hooks, "_global_forward_hooks", None) or getattr(
        module_hooks, "_global_forward_pre_hooks", None
    ):
        return True
    return any(m._forward_hooks or m._forward_pre_hooks for m in model.modules())


class _Builder:
    """Fills the structures, keeping what they point into; raises _Declined at the first thing it cannot take."""

    def __init__(self, model: nn.Module, cache: DecoderCache) -> None:
        self.model, self.cache, self.cfg = model, cache, model.config
        self.keep: list[object] = []

    def build(self) -> DecodePlan:
        cfg, inner = self.cfg, self.model.model
        rope = inner.rotary_emb
        layers = (_Layer * len(inner.layers))(
            *(self._layer(layer, entry) for layer, entry in zip(inner.layers, self.cache.layers, strict=True))
        )
        self.keep.append(layers)
        decoder = _Decoder(
            layers=len(inner.layers),
            hidden=cfg.hidden_size,
            rope_half=rope.inv_freq.numel(),
            eps=cfg.rms_norm_eps,
            rope_factor=rope.attention_factor,
            inv_freq=self._address(rope.inv_freq),
            norm=self._norm(inner.norm),
            embed=self._embedding(inner.embed_tokens),
            lm_head=self._matrix(self.model.lm_head),
            layer=layers,
        )
        return DecodePlan(self.model, decoder, self.keep)

    # --- pieces ---

    def _address(self, tensor: torch.Tensor | None, dtype: torch.dtype = torch.float32) -> int | None:
        """A contiguous CPU tensor's address (kept alive by the plan); None stays None."""
        if tensor is None:
            return None
        if tensor.dtype != dtype or not tensor.is_cpu or not tensor.is_contiguous():
            raise _Declined
        self.keep.append(tensor)
        return tensor.data_ptr()

    def _norm(self, norm: nn.Module | None) -> int | None:
        if norm is None:
            return None
        if type(norm) is not RMSNorm or norm.eps != self.cfg.rms_norm_eps:
            raise _Declined
        return self._address(norm.weight)

    def _matrix(self, module: nn.Module) -> _Matrix:
        """A linear layer: mmwb's fp32 Linear in either layout, or a quantized layer's kernel operand."""
        if type(module) is Linear:
            weight = module.weight
            out_features, in_features = weight.shape
            if weight.dtype != torch.float32 or not weight.is_cpu:
                raise _Declined
            if weight.stride(0) == 1 and weight.stride(1) >= out_features:
                layout, ld = FP32_COLUMNS, weight.stride(1)
            elif weight.stride(1) == 1 and weight.stride(0) >= in_features:
                layout, ld = FP32_ROWS, weight.stride(0)
            else:
                raise _Declined
            self.keep.append(weight)
            return _Matrix(
                layout, in_features, out_features, ld, 0, weight.data_ptr(), None, self._bias(module)
            )
        operand = self._operand(module)
        rows, inputs = operand.weight.shape[0], module.in_features
        return _Matrix(
            _MODES[operand.mode], inputs, rows, inputs, operand.group,
            self._address(operand.weight, operand.weight.dtype), self._address(operand.scale, operand.scale.dtype),
            self._bias(module),
        )  # fmt: skip

    def _operand(self, module: nn.Module) -> Operand:
        """A quantized layer's weight, where mmwb's kernels read it (else the layer runs torch's kernel)."""
        operand = module.kernel_operand() if hasattr(module, "kernel_operand") else None
        if operand is None or not cpu.quantized_operand_fits(
            operand.mode, operand.weight, operand.scale, module.in_features, operand.group
        ):
            raise _Declined
        return operand

    def _bias(self, module: nn.Module) -> int | None:
        return self._address(module.bias.detach()) if module.bias is not None else None

    def _embedding(self, table: nn.Module) -> _Matrix:
        """The token table as rows: fp32, or int8 rows with their scales (a quantized model's)."""
        if type(table) is TokenEmbedding:
            rows, width = table.weight.shape
            return _Matrix(FP32_ROWS, width, rows, width, 0, self._address(table.weight.detach()), None, None)
        operand = table.kernel_operand() if hasattr(table, "kernel_operand") else None
        if operand is None or operand.mode != "int8" or getattr(table, "dtype", None) != torch.float32:
            raise _Declined
        rows, width = operand.weight.shape
        weight = self._address(operand.weight, torch.int8)
        return _Matrix(INT8, width, rows, width, 0, weight, self._address(operand.scale), None)

    def _mlp(self, module: nn.Module | None) -> _Mlp:
        if module is None:
            return _Mlp()
        if type(module) is not SwiGLU:
            raise _Declined
        parts = (module.gate_proj, module.up_proj, module.down_proj)
        return _Mlp(module.gate_proj.out_features, *(self._matrix(m) for m in parts))

    def _layer(self, layer: nn.Module, entry: KVCache | LatentCache) -> _Layer:
        return _Layer(
            input_norm=self._norm(layer.input_layernorm),
            post_norm=self._norm(layer.post_attention_layernorm),
            attention=self._attention(layer.self_attn, entry),
            ff=self._feed_forward(layer.mlp),
        )

    def _attention(self, attn: nn.Module, entry: KVCache | LatentCache) -> _Attention:
        slots = self.cache.max_length
        if type(attn) is GroupedQueryAttention and isinstance(entry, KVCache):
            return _Attention(
                mla=0, heads=attn.num_heads, kv_heads=attn.num_kv_heads, head_dim=attn.head_dim, slots=slots,
                scale=attn.scale, q=self._matrix(attn.q_proj), k=self._matrix(attn.k_proj),
                v=self._matrix(attn.v_proj), o=self._matrix(attn.o_proj), q_norm=self._norm(attn.q_norm),
                k_norm=self._norm(attn.k_norm), key_cache=self._address(entry.key),
                value_cache=self._address(entry.value),
            )  # fmt: skip
        if type(attn) is not MultiHeadLatentAttention or not isinstance(entry, LatentCache):
            raise _Declined
        kv_b = attn._kv_b_weight()
        row_major = cpu.kv_b_row_major(kv_b)
        if row_major is None or kv_b.dtype != torch.float32:
            raise _Declined
        self.keep.append(kv_b)
        low_rank = hasattr(attn, "q_a_proj")
        return _Attention(
            mla=1, heads=attn.num_heads, nope=attn.nope_dim, rope=attn.rope_dim, value=attn.v_dim,
            rank=attn.kv_rank, kv_b_ld=max(kv_b.stride()), kv_b_row_major=row_major, slots=slots, scale=attn.scale,
            q=self._matrix(attn.q_b_proj if low_rank else attn.q_proj), k=self._matrix(attn.kv_a_proj_with_mqa),
            o=self._matrix(attn.o_proj), q_a=self._matrix(attn.q_a_proj) if low_rank else _Matrix(),
            q_a_norm=self._norm(attn.q_a_layernorm) if low_rank else None, kv_norm=self._norm(attn.kv_a_layernorm),
            kv_b=kv_b.data_ptr(), key_cache=self._address(entry.latent),
        )  # fmt: skip

    def _feed_forward(self, module: nn.Module) -> _FeedForward:
        if type(module) is SwiGLU:
            return _FeedForward(experts=0, mlp=self._mlp(module))
        if type(module) is not MoEBlock or type(module.gate) is not Router:
            raise _Declined
        router = module.gate
        if router.num_experts % router.n_group or router.top_k > MAX_EXPERTS_A_TOKEN:
            raise _Declined
        ff = _FeedForward(
            experts=router.num_experts, top_k=router.top_k, sigmoid=router.scoring == "sigmoid",
            n_group=router.n_group, topk_group=router.topk_group, norm=router.norm_topk_prob,
            scaling=router.scaling, router=self._address(router.weight.detach()),
            router_bias=self._address(router.e_score_correction_bias), mlp=self._mlp(module.shared_experts),
        )  # fmt: skip
        self._experts(module.experts, ff)
        return ff

    def _experts(self, experts: nn.Module, ff: _FeedForward) -> None:
        """The routed experts' per-expert addresses: fp32 slices of the stacked tensors, or quantized operands."""
        count = ff.experts  # the router's: step.c indexes the arrays below with its choices
        if type(experts) is Experts:
            gate_up, down = experts.gate_up_proj.detach(), experts.down_proj.detach()
            double_inter, hidden = gate_up.shape[1:]
            if (
                gate_up.shape[0] != count
                or down.shape[0] != count
                or gate_up.dtype != torch.float32
                or down.dtype != torch.float32
                or gate_up.stride()[1:] != (1, double_inter)
                or down.stride(1) != 1
                or down.stride(2) < hidden
            ):
                raise _Declined
            self.keep += [gate_up, down]
            columns = [
                [gate_up.data_ptr() + e * gate_up.stride(0) * 4 for e in range(count)],
                [None] * count,
                [down.data_ptr() + e * down.stride(0) * 4 for e in range(count)],
                [None] * count,
            ]
            ff.format, ff.inter = FP32_COLUMNS, double_inter // 2
            ff.ld_in, ff.ld_down = double_inter, down.stride(2)
        else:
            pairs = experts.kernel_operands() if hasattr(experts, "kernel_operands") else None
            if pairs is None or not len(pairs[0]) == len(pairs[1]) == count:
                raise _Declined
            gate_up, down = ([self._operand(layer) for layer in layers] for layers in pairs)
            if len({(o.mode, o.group) for o in gate_up + down}) != 1:  # one call reads them all alike
                raise _Declined
            columns = [
                [self._address(o.weight, o.weight.dtype) for o in gate_up],
                [self._address(o.scale, o.scale.dtype) for o in gate_up],
                [self._address(o.weight, o.weight.dtype) for o in down],
                [self._address(o.scale, o.scale.dtype) for o in down],
            ]
            ff.format, ff.inter, ff.group = _MODES[gate_up[0].mode], pairs[1][0].in_features, gate_up[0].group
        for name, column in zip(("gate_up", "gate_up_scale", "down", "down_scale"), columns, strict=True):
            array = (_PTR * count)(*column)
            self.keep.append(array)
            setattr(ff, name, ctypes.cast(array, _PTR))
