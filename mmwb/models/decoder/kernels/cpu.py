"""Small CPU kernels for decode steps, where eager PyTorch spends its time in memory stalls and dispatch.

At batch 1 a decode step multiplies one row by every weight, so its speed is how fast the weights stream from
memory, and with the caches cold from that streaming each of the step's ~1400 small aten ops costs 25-50 us
(2-9 us in a hot microbenchmark). So:
- ``linear``: few rows times a weight. This CPU's BLAS (MKL) reaches 7-10 GB/s on the 0.25-2 MB weights of a small
  decoder where a plain sum of the same bytes runs at 20 GB/s (its gemm packs the weight before using it once);
  the kernel reads a column-major (in, out) weight (the decoder's decode layout) front to back into an
  accumulator that stays in cache.
- one call each for what took many ops: ``rms_norm``; ``swiglu`` (a SwiGLU MLP) and ``experts_sum`` (one token's
  chosen experts, read in place from the stacked tensors); ``route`` (a top-k MoE router); ``latent_attention``
  (one MLA decode token per sequence on the latent cache, an fp32 or a bf16 model's) and ``gqa_attention`` (one
  batch-1 GQA decode token).
- int8 and int4 weights (mmwb.models.quantize): ``int8_linear`` / ``int4_linear`` (a few rows times a quantized
  weight) and ``int8_experts`` / ``int4_experts`` (one token's chosen experts), from ``quantized.c`` (AVX-512 VNNI;
  see its header).
- a whole batch-1 decode token in one call (``step.c``, driven by mmwb.models.decoder.decode_plan): the kernels
  above strung together in C, with no Python between them.

The C sources (``cpu.c``, ``quantized.c`` and ``step.c`` beside this module) are compiled into one library with
the machine's C compiler on first use (about 2 s, cached per source, compiler and CPU). Without a compiler or the
source files, or with ``MMWB_CPU_KERNELS=0`` (read once, at the first use in a process), ``linear`` and
``rms_norm`` are their torch equivalents and the others return None so that their callers run their torch code; the
same happens outside each kernel's case (more rows, another dtype (fp32; bf16 too for rms_norm, route,
latent_attention and the int8 and int4 kernels), autograd or autocast on, other strides, shapes that do not fit:
torch then raises its own error). What they bought was measured when they came in (`git log -p BENCHMARKS.md`,
"CPU decode kernels"); `mmwb bench decoder` measures it now.
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import logging
import os
import platform
import shutil
import subprocess
import tempfile
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F

DISABLE_ENV = "MMWB_CPU_KERNELS"
CACHE_ENV = "MMWB_CACHE"
COMPILE_TIMEOUT_S = 120
MAX_ROWS = 4  # rows of x handled per call; more rows is prefill, where BLAS wins
MAX_COLS = 4096  # output width whose accumulator still sits in cache; wider weights go to BLAS
# Rows of an rms_norm call: a decode step's heads; longer inputs go to torch's threaded kernel.
NORM_MAX_ROWS = 64
# rms_norm's, route's, latent_attention's and the int8 kernels' inputs: fp32, or a bf16 model's bf16
FP32_OR_BF16 = (torch.float32, torch.bfloat16)

logger = logging.getLogger(__name__)

# shipped as package data beside this binding, compiled into one library; quantized.c: products with int8 and int4
# weights; step.c: a whole decode token in one call (mmwb.models.decoder.decode_plan)
SOURCES = tuple(Path(__file__).with_name(name) for name in ("cpu.c", "quantized.c", "step.c"))

# Tried in order: the fastest build this compiler accepts. OpenMP's simd pragmas let the dot products vectorise
# (a float sum may then be reassociated, as BLAS does).
_FLAG_SETS = (
    ("-O3", "-march=native", "-fopenmp"),
    ("-O3", "-march=native", "-fopenmp-simd"),
    ("-O3",),
)


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """``F.linear(x, weight, bias)``; through the streaming kernel for at most MAX_ROWS rows of x when weight
    (out, in) is stored column-major (strides (1, >= out)) with out <= MAX_COLS."""
    out_features, in_features = weight.shape
    if (
        not applies(x, weight)
        or x.shape[-1] != in_features  # torch raises its shape error
        or x.numel() > MAX_ROWS * in_features
        or out_features > MAX_COLS
        or weight.stride(0) != 1
        or weight.stride(1) < out_features
        or not x.is_contiguous()
    ):
        return F.linear(x, weight, bias)
    y = x.new_empty((*x.shape[:-1], out_features))
    status = _kernels().rows_times_matrix(
        x.data_ptr(), in_features, weight.data_ptr(), weight.stride(1), y.data_ptr(),
        x.numel() // in_features, in_features, out_features, torch.get_num_threads(),
    )  # fmt: skip
    if status != 0:  # the threads' scratch could not be allocated
        return F.linear(x, weight, bias)
    return y if bias is None else y.add_(bias)


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """``weight * F.rms_norm(x, (C,), eps=eps)`` over the last dimension C, in one pass for a few fp32 rows, or bf16
    rows with a bf16 weight (rounded where torch's path rounds; equal to it up to the order of the sum of squares)."""
    if (
        not applies(x, weight, FP32_OR_BF16)
        or x.dtype != weight.dtype
        or weight.shape != x.shape[-1:]
        or x.numel() > NORM_MAX_ROWS * x.shape[-1]
        or not (x.is_contiguous() and weight.is_contiguous())
    ):
        return weight * F.rms_norm(x.float(), (x.shape[-1],), eps=eps).to(x.dtype)
    y = x.new_empty(x.shape)
    norm = _kernels().rms_norm_bf16 if x.dtype == torch.bfloat16 else _kernels().rms_norm
    norm(x.data_ptr(), weight.data_ptr(), y.data_ptr(), x.numel() // x.shape[-1], x.shape[-1], eps)
    return y


def swiglu(x: torch.Tensor, gate: torch.Tensor, up: torch.Tensor, down: torch.Tensor) -> torch.Tensor | None:
    """``F.linear(F.silu(F.linear(x, gate)) * F.linear(x, up), down)`` for a few rows of x in one call; weights
    (out, in) as for F.linear, stored column-major. None where the kernel does not apply (the caller then runs its
    torch code)."""
    inter, hidden = gate.shape
    if not (
        applies(x, down)
        and x.shape[-1] == hidden
        and gate.shape == up.shape
        and down.shape == (hidden, inter)
        and gate.stride() == up.stride() == (1, gate.stride(1))
        and down.stride() == (1, down.stride(1))
        and gate.stride(1) >= inter
        and down.stride(1) >= hidden
        and gate.dtype == up.dtype == torch.float32
    ):
        return None
    pointers = [gate.data_ptr()], [up.data_ptr()], [down.data_ptr()]
    return _swiglu_sum(x, inter, pointers, (gate.stride(1), down.stride(1)), [1.0])


def experts_sum(
    x: torch.Tensor, gate_up: torch.Tensor, down: torch.Tensor, experts: list[int], coefs: list[float]
) -> torch.Tensor | None:
    """sum_i coefs[i] * expert_e(x) over e = experts[i], for one token x (1, C), in one call, straight from the
    stacked SwiGLU experts gate_up (E, 2I, C) and down (E, C, I) in the decode layout (last two dimensions
    column-major): no per-expert views. None where the kernel does not apply."""
    experts_count, double_inter, hidden = gate_up.shape
    inter = double_inter // 2
    if not (
        applies(x, down)
        and x.shape[-1] == hidden
        and gate_up.dtype == torch.float32
        and down.shape == (experts_count, hidden, inter)
        and gate_up.stride()[1:] == (1, double_inter)
        and down.stride(1) == 1
        and down.stride(2) >= hidden
        and all(0 <= e < experts_count for e in experts)
    ):
        return None
    gate = [gate_up.data_ptr() + e * gate_up.stride(0) * 4 for e in experts]
    up = [p + inter * 4 for p in gate]  # the up half starts inter floats into each row
    pointers = gate, up, [down.data_ptr() + e * down.stride(0) * 4 for e in experts]
    return _swiglu_sum(x, inter, pointers, (double_inter, down.stride(2)), coefs)


def _swiglu_sum(
    x: torch.Tensor,
    inter: int,
    pointers: tuple[list[int], list[int], list[int]],
    strides: tuple[int, int],
    coefs: list[float],
) -> torch.Tensor | None:
    """The C call behind swiglu and experts_sum: fp32 weight addresses (gate, up, down per term), the row strides
    of gate/up and of down, one coefficient per term."""
    hidden = x.shape[-1]
    if not x.is_contiguous() or x.numel() > MAX_ROWS * hidden or max(2 * inter, hidden) > MAX_COLS:
        return None
    count = len(coefs)
    gate, up, down = ((ctypes.c_void_p * count)(*p) for p in pointers)
    y = x.new_empty(x.shape)
    status = _kernels().swiglu_sum(
        x.data_ptr(), x.numel() // hidden, hidden, inter, count, gate, up, strides[0], down, strides[1],
        (ctypes.c_float * count)(*coefs), y.data_ptr(), torch.get_num_threads(),
    )  # fmt: skip
    return y if status == 0 else None


def latent_attention(
    q: torch.Tensor,
    kv: torch.Tensor,
    norm_weight: torch.Tensor,
    eps: float,
    rope: tuple[torch.Tensor, torch.Tensor],
    cache: torch.Tensor,
    position: int,
    mask: torch.Tensor | None,
    kv_b_weight: torch.Tensor,
    dims: tuple[int, int, int, int],
    scale: float,
) -> torch.Tensor | None:
    """One decode token per sequence of MLA from its projections q (B, H * (dn + dr)) and kv (B, r + dr), in one
    call: rope, the latent's RMSNorm, the write to ``cache`` (B, 1, S, r + dr) at ``position``, and attention on
    the latent over the slots the boolean ``mask`` (B, 1, 1, position + 1) allows (None: all) with kv_b
    (H * (dn + dv), r) absorbed. dims = (H, dn, dr, dv). The cache and kv_b are both fp32 or both bf16 (a bf16
    model's: the output is then bf16). Returns (B, H * dv); None where the kernel does not apply (the caller then
    runs its torch code, nothing having been written)."""
    heads, nope_dim, rope_dim, v_dim = dims
    batch, rank = q.shape[0], kv_b_weight.shape[1]
    slots = cache.shape[2]
    row_major = kv_b_row_major(kv_b_weight)
    if (
        not applies(q, kv_b_weight, FP32_OR_BF16)
        or cache.dtype != kv_b_weight.dtype
        or not all(t.is_cpu for t in (kv, norm_weight, cache, *rope))
        or not cache.is_contiguous()
        or row_major is None
        or q.shape != (batch, heads * (nope_dim + rope_dim))
        or kv.shape != (batch, rank + rope_dim)
        or cache.shape != (batch, 1, slots, rank + rope_dim)
        or not 0 <= position < slots
        or rope[0].numel() != batch * rope_dim // 2
        or (mask is not None and (mask.dtype != torch.bool or mask.numel() != batch * (position + 1)))
    ):
        return None
    # the token's own vectors in fp32 (a few KB); the cache and kv_b are read in their dtype
    q, kv, norm_weight, cos, sin = (t.float().contiguous() for t in (q, kv, norm_weight, *rope))
    mask = None if mask is None else mask.contiguous()
    out = q.new_empty(batch, heads * v_dim)
    status = _kernels().latent_attention(
        q.data_ptr(), kv.data_ptr(), norm_weight.data_ptr(), eps, cos.data_ptr(), sin.data_ptr(),
        cache.data_ptr(), slots, position, None if mask is None else mask.data_ptr(), batch,
        kv_b_weight.data_ptr(), max(kv_b_weight.stride()), heads, nope_dim, rope_dim, v_dim, rank, scale,
        out.data_ptr(), cache.dtype == torch.bfloat16, row_major, torch.get_num_threads(),
    )  # fmt: skip
    return out.to(cache.dtype) if status == 0 else None


def kv_b_row_major(weight: torch.Tensor) -> bool | None:
    """kv_b (out, r): True row-major, False column-major (its rows, or columns, apart by at least their length),
    None another layout the kernel does not read."""
    out_features, rank = weight.shape
    if weight.stride(1) == 1 and weight.stride(0) >= rank and rank > 1:
        return True
    return False if weight.stride(0) == 1 and weight.stride(1) >= out_features else None


def gqa_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    rope: tuple[torch.Tensor, torch.Tensor],
    caches: tuple[torch.Tensor, torch.Tensor],
    position: int,
    scale: float,
) -> torch.Tensor | None:
    """One batch-1 decode token of grouped-query attention from q (H, D), k and v (H_kv, D) in one call: rope,
    the write of k and v to the (1, H_kv, S, D) caches at ``position``, attention over the filled cache. Returns
    (H, D); None where the kernel does not apply (nothing written then)."""
    key_cache, value_cache = caches
    cos, sin = rope
    heads, dim = q.shape
    kv_heads, slots = key_cache.shape[1], key_cache.shape[2]
    tensors = (q, k, v, cos, sin, key_cache, value_cache)
    if (
        not applies(q, key_cache)
        or not all(t.is_contiguous() and t.dtype == torch.float32 and t.is_cpu for t in tensors)
        or key_cache.shape != value_cache.shape
        or key_cache.shape[0] != 1
        or k.shape != (kv_heads, dim)
        or v.shape != (kv_heads, dim)
        or heads % kv_heads
        or not 0 <= position < slots
        or cos.numel() != dim // 2
    ):
        return None
    out = q.new_empty(heads, dim)
    status = _kernels().gqa_attention(
        q.data_ptr(), k.data_ptr(), v.data_ptr(), cos.data_ptr(), sin.data_ptr(), key_cache.data_ptr(),
        value_cache.data_ptr(), slots, position, heads, kv_heads, dim, scale, out.data_ptr(),
    )  # fmt: skip
    return out if status == 0 else None


def route(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    top_k: int,
    scoring: str,
    groups: tuple[int, int],
    norm: bool,
    scaling: float,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None:
    """A top-k MoE router for a few tokens x (N, C) in one call: logits (N, E), indices (N, k), weights (N, k),
    as mmwb.models.decoder.moe.Router computes them (x and weight fp32, or both bf16: logits and weights are fp32
    either way). groups = (n_group, topk_group). None where it does not apply."""
    experts = weight.shape[0]
    if (
        not applies(x, weight, FP32_OR_BF16)
        or x.dtype != weight.dtype
        or x.dim() != 2
        or x.shape[1] != weight.shape[1]
        or x.shape[0] > MAX_ROWS
        or not (x.is_contiguous() and weight.is_contiguous())
        or (bias is not None and not (bias.is_contiguous() and bias.dtype == torch.float32))
        or experts % groups[0]
    ):
        return None
    logits = x.new_empty(x.shape[0], experts, dtype=torch.float32)
    indices = torch.empty(x.shape[0], top_k, dtype=torch.long)
    weights = x.new_empty(x.shape[0], top_k, dtype=torch.float32)
    status = _kernels().route(
        x.data_ptr(), weight.data_ptr(), None if bias is None else bias.data_ptr(), x.shape[0], x.shape[1], experts,
        top_k, scoring == "sigmoid", *groups, norm, scaling, logits.data_ptr(), indices.data_ptr(), weights.data_ptr(),
        x.dtype == torch.bfloat16,
    )  # fmt: skip
    return (logits, indices, weights) if status == 0 else None


INT8_BLOCK = 128  # quantized.c's int8 products quantize the input in blocks of this many values
QUANTIZED_MAX_INPUTS = 16384
INT4_PANEL = 16  # output rows of a panel of quantized.c's int4 layout (mmwb.models.quantize.to_panels)
INT4_MAX_ROWS = 127  # rows of an int4_linear call (more is a prefill: a bf16 GEMM is faster)


def int8_linear(x: torch.Tensor, qweight: torch.Tensor, scale: torch.Tensor) -> torch.Tensor | None:
    """x (M, K) fp32 or bf16, M <= MAX_ROWS, times an int8 weight qweight (N, K) with row scales ``scale`` (N,)
    fp32 -> (M, N) in x's dtype, read straight from the int8 bytes (quantized.c: the input quantized to int8 in blocks
    of INT8_BLOCK, AVX-512 VNNI dot products). None where it does not apply (the caller runs torch's kernel)."""
    rows, inputs = x.shape
    if not (
        _vnni_applies(x, inputs, INT8_BLOCK)
        and rows <= MAX_ROWS
        and _int8_weight(qweight, scale, (qweight.shape[0], inputs))
    ):
        return None
    y = x.new_empty(rows, qweight.shape[0])
    status = _kernels().int8_rows(
        x.data_ptr(), x.dtype == torch.bfloat16, rows, inputs, qweight.data_ptr(), scale.data_ptr(),
        qweight.shape[0], y.data_ptr(), torch.get_num_threads(),
    )  # fmt: skip
    return y if status == 0 else None


def int8_experts(
    x: torch.Tensor,
    gate_up: list[tuple[torch.Tensor, torch.Tensor]],
    down: list[tuple[torch.Tensor, torch.Tensor]],
    coefs: list[float],
) -> torch.Tensor | None:
    """sum_i coefs[i] * down_i(silu(gate) * up), [gate; up] = gate_up_i(x), for one token x (1, C) fp32 or bf16,
    in one call; each weight an int8 (qweight, fp32 row scales) pair: gate_up_i (2I, C), down_i (C, I). None where
    it does not apply."""
    count = len(coefs)
    if not (count and len(gate_up) == len(down) == count):
        return None
    hidden, inter = x.shape[-1], down[0][0].shape[-1]
    if not (
        _vnni_applies(x, hidden, INT8_BLOCK)
        and x.shape[0] == 1
        and inter % INT8_BLOCK == 0
        and inter <= QUANTIZED_MAX_INPUTS
        and all(_int8_weight(q, s, (2 * inter, hidden)) for q, s in gate_up)
        and all(_int8_weight(q, s, (hidden, inter)) for q, s in down)
    ):
        return None
    return _experts_call(_kernels().int8_experts, x, (hidden, inter), gate_up, down, coefs)


def int4_linear(
    x: torch.Tensor, packed: torch.Tensor, table: torch.Tensor, group: int
) -> torch.Tensor | None:
    """x (M, K) fp32 or bf16, M <= INT4_MAX_ROWS, times an int4 weight in quantized.c's panels: ``packed`` (N, K / 2)
    uint8 and ``table`` (N / 16, K / group, 2, 16) bf16 scales and zeros -> (M, N) in x's dtype (the input quantized
    to int8 per group, AVX-512 VNNI dot products). None where it does not apply (the caller runs a bf16 GEMM)."""
    rows, inputs = x.shape
    if not (
        _vnni_applies(x, inputs, group)
        and rows <= INT4_MAX_ROWS
        and _int4_weight(packed, table, inputs, group)
    ):
        return None
    y = x.new_empty(rows, packed.shape[0])
    status = _kernels().int4_rows(
        x.data_ptr(), x.dtype == torch.bfloat16, rows, inputs, group, packed.data_ptr(), table.data_ptr(),
        packed.shape[0], y.data_ptr(), torch.get_num_threads(),
    )  # fmt: skip
    return y if status == 0 else None


def int4_experts(
    x: torch.Tensor,
    gate_up: list[tuple[torch.Tensor, torch.Tensor]],
    down: list[tuple[torch.Tensor, torch.Tensor]],
    coefs: list[float],
    group: int,
) -> torch.Tensor | None:
    """``int8_experts`` for int4 experts, each weight a (packed, table) pair in panels (``int4_linear``): one call
    a token, in two sweeps over all the chosen experts (their gate_up products, then their down products). None
    where it does not apply."""
    count = len(coefs)
    if not (count and len(gate_up) == len(down) == count):
        return None
    hidden, inter = x.shape[-1], down[0][0].shape[-1] * 2
    if not (
        _vnni_applies(x, hidden, group)
        and x.shape[0] == 1
        and inter % group == 0
        and inter <= QUANTIZED_MAX_INPUTS
        and all(_int4_weight(p, t, hidden, group) and p.shape[0] == 2 * inter for p, t in gate_up)
        and all(_int4_weight(p, t, inter, group) and p.shape[0] == hidden for p, t in down)
    ):
        return None
    return _experts_call(_kernels().int4_experts, x, (hidden, inter, group), gate_up, down, coefs)


def _experts_call(
    kernel: Callable[..., int],
    x: torch.Tensor,
    shape: tuple[int, ...],
    gate_up: list[tuple[torch.Tensor, torch.Tensor]],
    down: list[tuple[torch.Tensor, torch.Tensor]],
    coefs: list[float],
) -> torch.Tensor | None:
    """One call of a quantized experts kernel: x, its ``shape`` arguments, the count, then each column of the
    (weight, scales) pairs as an array of pointers, the coefficients, the output and the threads."""
    count = len(coefs)
    pointers = [
        (ctypes.c_void_p * count)(*(t.data_ptr() for t in column)) for column in (*zip(*gate_up), *zip(*down))
    ]
    y = x.new_empty(x.shape)
    status = kernel(
        x.data_ptr(), x.dtype == torch.bfloat16, *shape, count, *pointers, (ctypes.c_float * count)(*coefs),
        y.data_ptr(), torch.get_num_threads(),
    )  # fmt: skip
    return y if status == 0 else None


def quantized_operand_fits(
    mode: str, weight: torch.Tensor, scale: torch.Tensor, inputs: int, group: int
) -> bool:
    """Whether mmwb's kernels take an int8 (qweight, scale) or int4 (panels, table) weight of ``inputs`` inputs as
    int8_linear and int4_linear check it (with fp32 rows coming in)."""
    block = INT8_BLOCK if mode == "int8" else group
    if not (vnni() and block and inputs % block == 0 and inputs <= QUANTIZED_MAX_INPUTS):
        return False
    if mode == "int8":
        return _int8_weight(weight, scale, (weight.shape[0], inputs))
    return mode == "int4" and _int4_weight(weight, scale, inputs, group)


def decode_token_function() -> Callable[..., int] | None:
    """step.c's ``mmwb_decode_token`` (a whole decode token in one call), or None without the kernels."""
    kernels = _kernels()
    return None if kernels is None else kernels.decode_token


def vnni() -> bool:
    """Whether the quantized products of quantized.c are built (AVX-512 VNNI): mmwb.models.quantize lays out int4
    weights for them, else for torch's kernel."""
    kernels = _kernels()
    return kernels is not None and kernels.has_vnni


def _vnni_applies(x: torch.Tensor, inputs: int, block: int) -> bool:
    return (
        vnni()
        and x.is_cpu
        and x.dtype in FP32_OR_BF16
        and x.is_contiguous()
        and inputs % block == 0
        and inputs <= QUANTIZED_MAX_INPUTS
        and not (torch.is_grad_enabled() and x.requires_grad)
        and not torch.compiler.is_compiling()
    )


def _int8_weight(qweight: torch.Tensor, scale: torch.Tensor, shape: tuple[int, int]) -> bool:
    """An int8 (N, K) weight of ``shape`` and its (N,) fp32 scales, contiguous CPU tensors."""
    return (
        qweight.shape == shape
        and qweight.dtype == torch.int8
        and scale.shape == shape[:1]
        and scale.dtype == torch.float32
        and qweight.is_cpu
        and scale.is_cpu
        and qweight.is_contiguous()
        and scale.is_contiguous()
    )


def _int4_weight(packed: torch.Tensor, table: torch.Tensor, inputs: int, group: int) -> bool:
    """An int4 weight of ``inputs`` inputs in panels: packed (N, inputs / 2) uint8, table (N / 16, groups, 2, 16)
    bf16, contiguous CPU tensors."""
    rows = packed.shape[0]
    return (
        packed.shape == (rows, inputs // 2)
        and rows % INT4_PANEL == 0
        and packed.dtype == torch.uint8
        and table.shape == (rows // INT4_PANEL, inputs // group, 2, INT4_PANEL)
        and table.dtype == torch.bfloat16
        and packed.is_cpu
        and table.is_cpu
        and packed.is_contiguous()
        and table.is_contiguous()
    )


def applies(
    x: torch.Tensor, weight: torch.Tensor, dtypes: tuple[torch.dtype, ...] = (torch.float32,)
) -> bool:
    """Whether the kernels can take a product of x and weight: they are built, both are CPU tensors of one of
    ``dtypes`` (fp32; rms_norm, route and latent_attention: FP32_OR_BF16), autograd has nothing to record, and
    neither autocast nor torch.compile is on."""
    return (
        _kernels() is not None
        and x.is_cpu
        and weight.is_cpu
        and x.dtype in dtypes
        and weight.dtype in dtypes
        and not (torch.is_grad_enabled() and (x.requires_grad or weight.requires_grad))
        and not torch.is_autocast_enabled("cpu")
        and not torch.compiler.is_compiling()
    )


_I32, _I64, _F32, _PTR = ctypes.c_int, ctypes.c_int64, ctypes.c_float, ctypes.c_void_p
# C function (without its mmwb_ prefix) -> (return type, argument types), in the order of the C source.
_SIGNATURES = {
    "rows_times_matrix": (_I32, [_PTR, _I64, _PTR, _I64, _PTR, _I64, _I64, _I64, _I32]),
    "rms_norm": (None, [_PTR, _PTR, _PTR, _I64, _I64, _F32]),
    "rms_norm_bf16": (None, [_PTR, _PTR, _PTR, _I64, _I64, _F32]),
    "swiglu_sum": (_I32, [_PTR, _I64, _I64, _I64, _I64, _PTR, _PTR, _I64, _PTR, _I64, _PTR, _PTR, _I32]),
    "latent_attention": (
        _I32,
        [
            _PTR,
            _PTR,
            _PTR,
            _F32,
            _PTR,
            _PTR,
            _PTR,
            _I64,
            _I64,
            _PTR,
            _I64,
            _PTR,
            _I64,
            *[_I64] * 5,
            _F32,
            _PTR,
            _I32,
            _I32,
            _I32,
        ],
    ),
    "gqa_attention": (_I32, [_PTR, _PTR, _PTR, _PTR, _PTR, _PTR, _PTR, *[_I64] * 5, _F32, _PTR]),
    "route": (
        _I32,
        [_PTR, _PTR, _PTR, _I64, _I64, _I64, _I64, _I32, _I64, _I64, _I32, _F32, _PTR, _PTR, _PTR, _I32],
    ),
    "vnni_supported": (_I32, []),
    "int8_rows": (_I32, [_PTR, _I32, _I64, _I64, _PTR, _PTR, _I64, _PTR, _I32]),
    "int8_experts": (_I32, [_PTR, _I32, _I64, _I64, _I64, _PTR, _PTR, _PTR, _PTR, _PTR, _PTR, _I32]),
    "int4_rows": (_I32, [_PTR, _I32, _I64, _I64, _I64, _PTR, _PTR, _I64, _PTR, _I32]),
    "int4_experts": (_I32, [_PTR, _I32, _I64, _I64, _I64, _I64, _PTR, _PTR, _PTR, _PTR, _PTR, _PTR, _I32]),
    "decode_token": (_I32, [_PTR, _I64, _I64, _I64, _PTR, _I32]),
}


class _Kernels:
    """The compiled library's entry points, typed for ctypes (attributes named as in _SIGNATURES)."""

    def __init__(self, library: ctypes.CDLL) -> None:
        for name, (restype, argtypes) in _SIGNATURES.items():
            function = getattr(library, f"mmwb_{name}")
            function.restype, function.argtypes = restype, argtypes
            setattr(self, name, function)
        self.has_vnni = bool(self.vnni_supported())  # built with AVX-512 VNNI: the int8 and int4 products


@functools.cache
def _kernels() -> _Kernels | None:
    """The kernels, or None where they cannot be built (or are switched off with MMWB_CPU_KERNELS=0)."""
    if os.environ.get(DISABLE_ENV, "1") == "0":
        return None
    library = _build()
    return None if library is None else _Kernels(library)


def _build() -> ctypes.CDLL | None:
    compiler = os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc")
    if compiler is None or not all(source.is_file() for source in SOURCES):  # no compiler, or no package data
        return None
    for flags in _FLAG_SETS:
        target = _cache_dir() / f"cpu_kernels-{_build_key(compiler, flags)}.so"
        try:
            if target.exists() or _compile(compiler, flags, target):
                return ctypes.CDLL(str(target))
        except (OSError, subprocess.SubprocessError) as error:  # unwritable cache, hung compiler, bad library
            logger.debug("CPU kernels with %s %s: %s", compiler, " ".join(flags), error)
    logger.debug("CPU kernels unavailable: decoding runs on plain torch ops")
    return None


def _compile(compiler: str, flags: tuple[str, ...], target: Path) -> bool:
    """Compile to a temporary file beside ``target`` and rename it into place: readers never see half a file."""
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=target.parent) as work:
        built = Path(work) / target.name
        command = [compiler, *flags, "-shared", "-fPIC", *map(str, SOURCES), "-o", str(built), "-lm"]
        if subprocess.run(command, capture_output=True, timeout=COMPILE_TIMEOUT_S).returncode != 0:
            return False
        os.replace(built, target)
    return True


def _build_key(compiler: str, flags: tuple[str, ...]) -> str:
    """Source, compiler and flags, and the CPU (``-march=native`` code must not run on another one)."""
    cpu = platform.machine() + platform.processor()
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.exists():
        cpu += next((line for line in cpuinfo.read_text().splitlines() if line.startswith("flags")), "")
    text = "\n".join([*(source.read_text() for source in SOURCES), compiler, *flags, cpu])
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def _cache_dir() -> Path:
    if os.environ.get(CACHE_ENV):
        return Path(os.environ[CACHE_ENV]) / "kernels"
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "mmwb" / "kernels"
