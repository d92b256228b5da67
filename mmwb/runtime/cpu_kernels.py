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
  (one MLA decode token per sequence on the latent cache) and ``gqa_attention`` (one batch-1 GQA decode token).

The C source below is compiled with the machine's C compiler on first use (about 0.2 s, cached per source,
compiler and CPU). Without a compiler, or with ``MMWB_CPU_KERNELS=0`` (read once, at the first use in a
process), ``linear`` and ``rms_norm`` are their torch equivalents and the others return None so that their callers
run their torch code; the same happens outside each kernel's case (more rows, not fp32, autograd or autocast on,
other strides, shapes that do not fit: torch then raises its own error). BENCHMARKS.md ("CPU
decode kernels") has the measurements.
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

logger = logging.getLogger(__name__)

_SOURCE = r"""
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#ifdef _OPENMP
#include <omp.h>
#endif

/* acc[i, :n] = sum over k in [k0, k1) of x[i, k] * w[k, :n]; w's rows are contiguous, ldw floats apart. */
static void accumulate(const float *x, int64_t ldx, const float *w, int64_t ldw, float *acc,
                       int64_t m, int64_t k0, int64_t k1, int64_t n) {
    memset(acc, 0, sizeof(float) * m * n);
    for (int64_t k = k0; k < k1; k++) {
        const float *wk = w + k * ldw;
        for (int64_t i = 0; i < m; i++) {
            const float xk = x[i * ldx + k];
            float *a = acc + i * n;
            for (int64_t j = 0; j < n; j++) a[j] += xk * wk[j];
        }
    }
}

/* y (m, n) = x (m, k) @ w (k, n). Weights of at least 4 MB are split between threads in contiguous row ranges,
   whose partials are then summed in order; below that one core already streams as fast as this memory allows and
   a parallel region only adds its start-up (measured on a 2-core VM: 1 thread 11.2 ms per decode step, 2
   threads 11.7-13.1 ms). */
int mmwb_rows_times_matrix(const float *x, int64_t ldx, const float *w, int64_t ldw, float *y,
                           int64_t m, int64_t k, int64_t n, int threads) {
#ifdef _OPENMP
    if (threads > 1 && k >= 2 * threads && k * n >= (1 << 20)) {
        float *partial = malloc(sizeof(float) * threads * m * n);
        if (!partial) return 1;
        #pragma omp parallel num_threads(threads)
        {
            int t = omp_get_thread_num(), nt = omp_get_num_threads();
            accumulate(x, ldx, w, ldw, partial + t * m * n, m, k * t / nt, k * (t + 1) / nt, n);
            #pragma omp barrier
            #pragma omp for
            for (int64_t j = 0; j < m * n; j++) {
                float s = 0.0f;
                for (int u = 0; u < nt; u++) s += partial[u * m * n + j];
                y[j] = s;
            }
        }
        free(partial);
        return 0;
    }
#endif
    accumulate(x, ldx, w, ldw, y, m, 0, k, n);
    return 0;
}

/* y[i] = w * (x[i] / sqrt(mean(x[i]^2) + eps)) for each of the m contiguous rows of length n. */
void mmwb_rms_norm(const float *x, const float *w, float *y, int64_t m, int64_t n, float eps) {
    for (int64_t i = 0; i < m; i++) {
        const float *xi = x + i * n;
        float *yi = y + i * n, sum = 0.0f;
        #pragma omp simd reduction(+ : sum)
        for (int64_t j = 0; j < n; j++) sum += xi[j] * xi[j];
        const float r = 1.0f / sqrtf(sum / (float)n + eps);
        for (int64_t j = 0; j < n; j++) yi[j] = w[j] * (xi[j] * r);
    }
}

/* y (m, c) = sum over e of coef[e] * (silu(x gate_e) * (x up_e)) down_e: a SwiGLU MLP, or a token's chosen experts,
   in one call. gate_e, up_e: (c, inter) rows ld_in apart (one pass over both when up_e directly follows gate_e in
   each row, as in stacked experts); down_e: (inter, c) rows ld_down apart. */
int mmwb_swiglu_sum(const float *x, int64_t m, int64_t c, int64_t inter, int64_t count,
                    const float *const *gate, const float *const *up, int64_t ld_in,
                    const float *const *down, int64_t ld_down, const float *coef, float *y, int threads) {
    float *gu = malloc(sizeof(float) * m * (3 * inter + c));
    if (!gu) return 1;
    float *act = gu + 2 * m * inter, *d = act + m * inter;
    int status = 0;
    memset(y, 0, sizeof(float) * m * c);
    for (int64_t e = 0; e < count && !status; e++) {
        const int fused = up[e] == gate[e] + inter && ld_in == 2 * inter;
        /* gate of row i, column j at gu[i * gs + j]; up at gu[i * gs + uo + j] */
        const int64_t gs = fused ? 2 * inter : inter, uo = fused ? inter : m * inter;
        if (fused) {
            status = mmwb_rows_times_matrix(x, c, gate[e], ld_in, gu, m, c, 2 * inter, threads);
        } else {
            status = mmwb_rows_times_matrix(x, c, gate[e], ld_in, gu, m, c, inter, threads)
                  || mmwb_rows_times_matrix(x, c, up[e], ld_in, gu + m * inter, m, c, inter, threads);
        }
        for (int64_t i = 0; i < m; i++)
            for (int64_t j = 0; j < inter; j++) {
                const float g = gu[i * gs + j];
                act[i * inter + j] = g / (1.0f + expf(-g)) * gu[i * gs + uo + j];
            }
        status = status || mmwb_rows_times_matrix(act, inter, down[e], ld_down, d, m, inter, c, threads);
        for (int64_t j = 0; j < m * c && !status; j++) y[j] += coef[e] * d[j];
    }
    free(gu);
    return status;
}

/* Rotate the half-split pairs (x[j], x[j + d/2]) of x (d floats) by the angles whose cos/sin are given (d/2). */
static void rope(const float *x, const float *cos, const float *sin, int64_t d, float *y) {
    const int64_t h = d / 2;
    for (int64_t j = 0; j < h; j++) {
        y[j] = x[j] * cos[j] - x[j + h] * sin[j];
        y[j + h] = x[j + h] * cos[j] + x[j] * sin[j];
    }
}

/* Softmax over each of the `rows` rows of scores (seq wide), in place. */
static void softmax_rows(float *scores, int64_t rows, int64_t seq) {
    for (int64_t h = 0; h < rows; h++) {
        float *s = scores + h * seq, top = s[0], total = 0.0f;
        for (int64_t t = 1; t < seq; t++) top = s[t] > top ? s[t] : top;
        for (int64_t t = 0; t < seq; t++) total += (s[t] = expf(s[t] - top));
        for (int64_t t = 0; t < seq; t++) s[t] /= total;
    }
}

/* One decode token per sequence of multi-head latent attention (DeepSeek-V2/V3 MLA) on the latent cache.
   For each of the batch sequences b: q[b] (heads, dn + dr) and kv[b] (rank + dr) are its token's projections and
   cos[b], sin[b] (dr / 2) its rotary angles. Here: rope on both rope parts, RMSNorm on the latent, the latent row
   written to cache[b, pos] (cache (batch, slots, rank + dr)), then for each head
   out[b] (heads, dv) = softmax(scale * q . K) V over the slots mask[b] allows (mask (batch, pos + 1), 1 = attend;
   NULL: all), with the absorbed weights of kv_b (out, in) = (heads * (dn + dv), rank) stored column-major, rows
   ld_kvb apart: q_nope goes through the key half, the attended latent through the value half (each read once
   for the whole batch), so the cache is never expanded. */
int mmwb_latent_attention(const float *q, const float *kv, const float *norm_w, float eps, const float *cos,
                          const float *sin, float *cache, int64_t slots, int64_t pos, const uint8_t *mask,
                          int64_t batch, const float *wkvb, int64_t ld_kvb, int64_t heads, int64_t dn, int64_t dr,
                          int64_t dv, int64_t rank, float scale, float *out) {
    const int64_t width = rank + dr, seq = pos + 1, stride = dn + dv, qw = dn + dr, bh = batch * heads;
    float *query = malloc(sizeof(float) * bh * (width + seq + rank));
    if (!query) return 1;
    float *scores = query + bh * width, *attended = scores + bh * seq;
    for (int64_t b = 0; b < batch; b++) {
        const float *kvb = kv + b * width;
        float *row = cache + (b * slots + pos) * width;
        mmwb_rms_norm(kvb, norm_w, row, 1, rank, eps);
        const float *cb = cos + b * dr / 2, *sb = sin + b * dr / 2;
        rope(kvb + rank, cb, sb, dr, row + rank);
        for (int64_t h = 0; h < heads; h++)
            rope(q + (b * heads + h) * qw + dn, cb, sb, dr, query + (b * heads + h) * width + rank);
    }
    for (int64_t j = 0; j < rank; j++) {  /* query[b, h, :rank] = q_nope[b, h] W_uk[h] */
        const float *w = wkvb + j * ld_kvb;
        for (int64_t bh_i = 0; bh_i < bh; bh_i++) {
            const int64_t h = bh_i % heads;
            float acc = 0.0f;
            #pragma omp simd reduction(+ : acc)
            for (int64_t d = 0; d < dn; d++) acc += q[bh_i * qw + d] * w[h * stride + d];
            query[bh_i * width + j] = acc;
        }
    }
    for (int64_t b = 0; b < batch; b++)
        for (int64_t t = 0; t < seq; t++) {
            const float *k = cache + (b * slots + t) * width;
            const int allowed = mask == NULL || mask[b * seq + t];
            for (int64_t h = 0; h < heads; h++) {
                float acc = 0.0f;
                #pragma omp simd reduction(+ : acc)
                for (int64_t j = 0; j < width; j++) acc += query[(b * heads + h) * width + j] * k[j];
                scores[(b * heads + h) * seq + t] = allowed ? acc * scale : -INFINITY;
            }
        }
    softmax_rows(scores, bh, seq);
    memset(attended, 0, sizeof(float) * bh * rank);
    for (int64_t b = 0; b < batch; b++)
        for (int64_t t = 0; t < seq; t++) {
            const float *v = cache + (b * slots + t) * width;
            for (int64_t h = 0; h < heads; h++) {
                const float p = scores[(b * heads + h) * seq + t];
                float *a = attended + (b * heads + h) * rank;
                for (int64_t j = 0; j < rank; j++) a[j] += p * v[j];
            }
        }
    memset(out, 0, sizeof(float) * bh * dv);
    for (int64_t j = 0; j < rank; j++) {  /* out[b, h] = attended[b, h] W_uv[h]^T */
        const float *w = wkvb + j * ld_kvb;
        for (int64_t bh_i = 0; bh_i < bh; bh_i++) {
            const float a = attended[bh_i * rank + j];
            const float *wv = w + (bh_i % heads) * stride + dn;
            for (int64_t d = 0; d < dv; d++) out[bh_i * dv + d] += a * wv[d];
        }
    }
    free(query);
    return 0;
}

/* One decode token of grouped-query attention, batch 1: rope on q (heads, d) and k (kv_heads, d), k and v written
   to the caches (kv_heads, slots, d) at pos, then out (heads, d) = softmax(scale * q . K) V, each group of
   heads / kv_heads query heads reading its KV head once. */
int mmwb_gqa_attention(const float *q, const float *k, const float *v, const float *cos, const float *sin,
                       float *key_cache, float *value_cache, int64_t slots, int64_t pos, int64_t heads,
                       int64_t kv_heads, int64_t d, float scale, float *out) {
    const int64_t seq = pos + 1, group = heads / kv_heads;
    float *query = malloc(sizeof(float) * heads * (d + seq));
    if (!query) return 1;
    float *scores = query + heads * d;
    for (int64_t g = 0; g < kv_heads; g++) {
        rope(k + g * d, cos, sin, d, key_cache + (g * slots + pos) * d);
        memcpy(value_cache + (g * slots + pos) * d, v + g * d, sizeof(float) * d);
    }
    for (int64_t h = 0; h < heads; h++) rope(q + h * d, cos, sin, d, query + h * d);
    for (int64_t g = 0; g < kv_heads; g++)
        for (int64_t t = 0; t < seq; t++) {
            const float *key = key_cache + (g * slots + t) * d;
            for (int64_t h = g * group; h < (g + 1) * group; h++) {
                float acc = 0.0f;
                #pragma omp simd reduction(+ : acc)
                for (int64_t j = 0; j < d; j++) acc += query[h * d + j] * key[j];
                scores[h * seq + t] = acc * scale;
            }
        }
    softmax_rows(scores, heads, seq);
    memset(out, 0, sizeof(float) * heads * d);
    for (int64_t g = 0; g < kv_heads; g++)
        for (int64_t t = 0; t < seq; t++) {
            const float *value = value_cache + (g * slots + t) * d;
            for (int64_t h = g * group; h < (g + 1) * group; h++) {
                const float p = scores[h * seq + t];
                for (int64_t j = 0; j < d; j++) out[h * d + j] += p * value[j];
            }
        }
    free(query);
    return 0;
}

/* Index of the largest of the n values (values already taken are set to -INFINITY), the first on ties. */
static int64_t argmax(const float *left, int64_t n) {
    int64_t best = 0;
    for (int64_t j = 1; j < n; j++) best = left[j] > left[best] ? j : best;
    return best;
}

/* Top-k routing of m tokens over e experts (Mixtral, Qwen3-MoE, DeepSeek-V3 routers): logits = x W^T (W (e, c)
   row-major); scores = softmax or sigmoid of them; choice = scores + bias when bias is given, restricted to the
   topk_group best of n_group groups (a group's best two choices summed) when n_group > 1; the k best choices give
   indices, and weights are the scores there, normalised to sum 1 when norm, times scaling. */
int mmwb_route(const float *x, const float *w, const float *bias, int64_t m, int64_t c, int64_t e, int64_t k,
               int sigmoid, int64_t n_group, int64_t topk_group, int norm, float scaling, float *logits,
               int64_t *indices, float *weights) {
    float *scores = malloc(sizeof(float) * (3 * e + n_group));
    if (!scores) return 1;
    float *choice = scores + e, *left = choice + e, *group_score = left + e;
    const int64_t size = e / n_group;
    for (int64_t i = 0; i < m; i++) {
        float *li = logits + i * e;
        for (int64_t j = 0; j < e; j++) {
            float acc = 0.0f;
            #pragma omp simd reduction(+ : acc)
            for (int64_t d = 0; d < c; d++) acc += x[i * c + d] * w[j * c + d];
            li[j] = acc;
            scores[j] = sigmoid ? 1.0f / (1.0f + expf(-acc)) : acc;
        }
        if (!sigmoid) softmax_rows(scores, 1, e);
        for (int64_t j = 0; j < e; j++) choice[j] = bias ? scores[j] + bias[j] : scores[j];
        if (n_group > 1) {
            for (int64_t g = 0; g < n_group; g++) {
                memcpy(left, choice + g * size, sizeof(float) * size);
                const int64_t first = argmax(left, size);
                const float best = left[first];
                left[first] = -INFINITY;
                group_score[g] = best + left[argmax(left, size)];
            }
            memset(left, 0, sizeof(float) * n_group);  /* now: 1 for the groups kept */
            for (int64_t kept = 0; kept < topk_group; kept++) {
                const int64_t g = argmax(group_score, n_group);
                group_score[g] = -INFINITY;
                left[g] = 1.0f;
            }
            for (int64_t j = 0; j < e; j++) choice[j] = left[j / size] ? choice[j] : -INFINITY;
        }
        float chosen = 0.0f;
        for (int64_t slot = 0; slot < k; slot++) {
            const int64_t best = argmax(choice, e);
            choice[best] = -INFINITY;
            indices[i * k + slot] = best;
            chosen += weights[i * k + slot] = scores[best];
        }
        for (int64_t slot = 0; slot < k; slot++) {  /* in torch's order: normalise, then scale */
            float *weight = weights + i * k + slot;
            *weight = (norm ? *weight / (chosen + 1e-20f) : *weight) * scaling;
        }
    }
    free(scores);
    return 0;
}
"""

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
    """``weight * F.rms_norm(x, (C,), eps=eps)`` over the last dimension C, in one pass for a few fp32 rows."""
    if (
        not applies(x, weight)
        or weight.shape != x.shape[-1:]
        or x.numel() > NORM_MAX_ROWS * x.shape[-1]
        or not (x.is_contiguous() and weight.is_contiguous())
    ):
        return weight * F.rms_norm(x.float(), (x.shape[-1],), eps=eps).to(x.dtype)
    y = x.new_empty(x.shape)
    _kernels().rms_norm(
        x.data_ptr(), weight.data_ptr(), y.data_ptr(), x.numel() // x.shape[-1], x.shape[-1], eps
    )
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
    (H * (dn + dv), r) absorbed. dims = (H, dn, dr, dv). Returns (B, H * dv); None where the kernel does not apply
    (the caller then runs its torch code, nothing having been written)."""
    heads, nope_dim, rope_dim, v_dim = dims
    batch, rank = q.shape[0], kv_b_weight.shape[1]
    cos, sin = rope
    slots = cache.shape[2]
    tensors = (q, kv, norm_weight, cos, sin, cache)
    if (
        not applies(q, kv_b_weight)
        or not all(t.is_contiguous() and t.dtype == torch.float32 and t.is_cpu for t in tensors)
        or kv_b_weight.stride(0) != 1
        or q.shape != (batch, heads * (nope_dim + rope_dim))
        or kv.shape != (batch, rank + rope_dim)
        or cache.shape != (batch, 1, slots, rank + rope_dim)
        or not 0 <= position < slots
        or cos.numel() != batch * rope_dim // 2
        or (mask is not None and (mask.dtype != torch.bool or mask.numel() != batch * (position + 1)))
    ):
        return None
    mask = None if mask is None else mask.contiguous()
    out = q.new_empty(batch, heads * v_dim)
    status = _kernels().latent_attention(
        q.data_ptr(), kv.data_ptr(), norm_weight.data_ptr(), eps, cos.data_ptr(), sin.data_ptr(),
        cache.data_ptr(), slots, position, None if mask is None else mask.data_ptr(), batch,
        kv_b_weight.data_ptr(), kv_b_weight.stride(1), heads, nope_dim, rope_dim, v_dim, rank, scale, out.data_ptr(),
    )  # fmt: skip
    return out if status == 0 else None


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
    as mmwb.models.decoder.moe.Router computes them. groups = (n_group, topk_group). None where it does not apply."""
    experts = weight.shape[0]
    if (
        not applies(x, weight)
        or x.dim() != 2
        or x.shape[1] != weight.shape[1]
        or x.shape[0] > MAX_ROWS
        or not (x.is_contiguous() and weight.is_contiguous())
        or (bias is not None and not (bias.is_contiguous() and bias.dtype == torch.float32))
        or experts % groups[0]
    ):
        return None
    logits = x.new_empty(x.shape[0], experts)
    indices = torch.empty(x.shape[0], top_k, dtype=torch.long)
    weights = x.new_empty(x.shape[0], top_k)
    status = _kernels().route(
        x.data_ptr(), weight.data_ptr(), None if bias is None else bias.data_ptr(), x.shape[0], x.shape[1], experts,
        top_k, scoring == "sigmoid", *groups, norm, scaling, logits.data_ptr(), indices.data_ptr(), weights.data_ptr(),
    )  # fmt: skip
    return (logits, indices, weights) if status == 0 else None


def applies(x: torch.Tensor, weight: torch.Tensor) -> bool:
    """Whether the kernels can take a product of x and weight: they are built, both are fp32 CPU tensors, autograd
    has nothing to record, and neither autocast nor torch.compile is on."""
    return (
        _kernels() is not None
        and x.is_cpu
        and weight.is_cpu
        and x.dtype == torch.float32
        and weight.dtype == torch.float32
        and not (torch.is_grad_enabled() and (x.requires_grad or weight.requires_grad))
        and not torch.is_autocast_enabled("cpu")
        and not torch.compiler.is_compiling()
    )


_I32, _I64, _F32, _PTR = ctypes.c_int, ctypes.c_int64, ctypes.c_float, ctypes.c_void_p
# C function (without its mmwb_ prefix) -> (return type, argument types), in the order of the C source.
_SIGNATURES = {
    "rows_times_matrix": (_I32, [_PTR, _I64, _PTR, _I64, _PTR, _I64, _I64, _I64, _I32]),
    "rms_norm": (None, [_PTR, _PTR, _PTR, _I64, _I64, _F32]),
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
        ],
    ),
    "gqa_attention": (_I32, [_PTR, _PTR, _PTR, _PTR, _PTR, _PTR, _PTR, *[_I64] * 5, _F32, _PTR]),
    "route": (
        _I32,
        [_PTR, _PTR, _PTR, _I64, _I64, _I64, _I64, _I32, _I64, _I64, _I32, _F32, _PTR, _PTR, _PTR],
    ),
}


class _Kernels:
    """The compiled library's entry points, typed for ctypes (attributes named as in _SIGNATURES)."""

    def __init__(self, library: ctypes.CDLL) -> None:
        for name, (restype, argtypes) in _SIGNATURES.items():
            function = getattr(library, f"mmwb_{name}")
            function.restype, function.argtypes = restype, argtypes
            setattr(self, name, function)


@functools.cache
def _kernels() -> _Kernels | None:
    """The kernels, or None where they cannot be built (or are switched off with MMWB_CPU_KERNELS=0)."""
    if os.environ.get(DISABLE_ENV, "1") == "0":
        return None
    library = _build()
    return None if library is None else _Kernels(library)


def _build() -> ctypes.CDLL | None:
    compiler = os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc")
    if compiler is None:
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
        source, built = Path(work) / "cpu_kernels.c", Path(work) / target.name
        source.write_text(_SOURCE)
        command = [compiler, *flags, "-shared", "-fPIC", str(source), "-o", str(built), "-lm"]
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
    text = "\n".join([_SOURCE, compiler, *flags, cpu])
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def _cache_dir() -> Path:
    if os.environ.get(CACHE_ENV):
        return Path(os.environ[CACHE_ENV]) / "kernels"
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "mmwb" / "kernels"
