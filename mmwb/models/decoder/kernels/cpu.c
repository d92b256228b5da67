/* mmwb's CPU decode kernels: the C half of mmwb/models/decoder/kernels/cpu.py, which compiles this file with the
 * machine's C compiler on first use and calls it through ctypes (that module's docstring says what each kernel
 * does and when it applies). */
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

static inline float widen(uint16_t h) {
    const uint32_t bits = (uint32_t)h << 16;
    float f;
    memcpy(&f, &bits, sizeof f);
    return f;
}

static inline uint16_t narrow(float f) { /* to bf16, rounded to nearest even as torch's cast */
    uint32_t bits;
    memcpy(&bits, &f, sizeof bits);
    return (uint16_t)((bits + 0x7fff + ((bits >> 16) & 1)) >> 16);
}

/* mmwb_rms_norm for bf16 rows and weight, rounded where a bf16 model's torch ops round: the normalised row is
   computed in fp32 and rounded to bf16, then times the weight and rounded again (w * rms_norm(x.float()).bf16());
   the sum of squares goes in another order than torch's, so a few elements of wide rows differ by an ulp. */
void mmwb_rms_norm_bf16(const uint16_t *x, const uint16_t *w, uint16_t *y, int64_t m, int64_t n, float eps) {
    for (int64_t i = 0; i < m; i++) {
        const uint16_t *xi = x + i * n;
        uint16_t *yi = y + i * n;
        float sum = 0.0f;
        #pragma omp simd reduction(+ : sum)
        for (int64_t j = 0; j < n; j++) sum += widen(xi[j]) * widen(xi[j]);
        const float r = 1.0f / sqrtf(sum / (float)n + eps);
        #pragma omp simd
        for (int64_t j = 0; j < n; j++) yi[j] = narrow(widen(w[j]) * widen(narrow(widen(xi[j]) * r)));
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

/* n values of a float or bf16 array from offset on, as floats: the array itself when it is fp32, else widened
   into scratch (bf16 is the top half of a float's bits). */
static const float *as_float(const void *a, int64_t offset, int64_t n, int bf16, float *scratch) {
    if (!bf16) return (const float *)a + offset;
    const uint16_t *src = (const uint16_t *)a + offset;
    uint32_t *dst = (uint32_t *)scratch;
    #pragma omp simd
    for (int64_t i = 0; i < n; i++) dst[i] = (uint32_t)src[i] << 16;
    return scratch;
}

/* n floats into dst as floats, or as bf16 (rounded to nearest even, as torch's cast) when bf16 is set; quantized.c
   stores its outputs with it too. */
void mmwb_store_floats(const float *x, void *dst, int64_t n, int bf16) {
    if (!bf16) {
        memcpy(dst, x, sizeof(float) * n);
        return;
    }
    for (int64_t j = 0; j < n; j++) ((uint16_t *)dst)[j] = narrow(x[j]);
}

static float dot(const float *a, const float *b, int64_t n) {
    float acc = 0.0f;
    #pragma omp simd reduction(+ : acc)
    for (int64_t i = 0; i < n; i++) acc += a[i] * b[i];
    return acc;
}

static void axpy(float *y, float a, const float *x, int64_t n) {
    #pragma omp simd
    for (int64_t i = 0; i < n; i++) y[i] += a * x[i];
}

/* y[:n] += a[0] w[0, :n] + ... + a[3] w[3, :n] for four bf16 rows ld apart, and out[r] = x[:n] . w[r, :n] for
   four: each pass over y (x) serves four rows, widened in registers (AVX-512 where the compiler has it). */
#if defined(__AVX512F__)
#include <immintrin.h>

static inline __m512 widen16(const uint16_t *p) {
    const __m256i h = _mm256_loadu_si256((const __m256i *)p);
    return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16));
}

static void axpy4_bf16(float *y, const float *a, const uint16_t *w, int64_t ld, int64_t n) {
    const __m512 a0 = _mm512_set1_ps(a[0]), a1 = _mm512_set1_ps(a[1]);
    const __m512 a2 = _mm512_set1_ps(a[2]), a3 = _mm512_set1_ps(a[3]);
    int64_t i = 0;
    for (; i + 16 <= n; i += 16) {
        if (i % 32 == 0) /* the next four rows, a cache line each (a prefetch past the buffer's end never faults) */
            for (int r = 4; r < 8; r++) _mm_prefetch((const char *)(w + r * ld + i), _MM_HINT_T0);
        __m512 acc = _mm512_loadu_ps(y + i);
        acc = _mm512_fmadd_ps(a0, widen16(w + i), acc);
        acc = _mm512_fmadd_ps(a1, widen16(w + ld + i), acc);
        acc = _mm512_fmadd_ps(a2, widen16(w + 2 * ld + i), acc);
        acc = _mm512_fmadd_ps(a3, widen16(w + 3 * ld + i), acc);
        _mm512_storeu_ps(y + i, acc);
    }
    for (; i < n; i++)
        y[i] += a[0] * widen(w[i]) + a[1] * widen(w[ld + i]) + a[2] * widen(w[2 * ld + i]) + a[3] * widen(w[3 * ld + i]);
}

static void dot4_bf16(const float *x, const uint16_t *w, int64_t ld, int64_t n, float *out) {
    __m512 s0 = _mm512_setzero_ps(), s1 = _mm512_setzero_ps(), s2 = _mm512_setzero_ps(), s3 = _mm512_setzero_ps();
    int64_t i = 0;
    for (; i + 16 <= n; i += 16) {
        if (i % 32 == 0)
            for (int r = 4; r < 8; r++) _mm_prefetch((const char *)(w + r * ld + i), _MM_HINT_T0);
        const __m512 xv = _mm512_loadu_ps(x + i);
        s0 = _mm512_fmadd_ps(xv, widen16(w + i), s0);
        s1 = _mm512_fmadd_ps(xv, widen16(w + ld + i), s1);
        s2 = _mm512_fmadd_ps(xv, widen16(w + 2 * ld + i), s2);
        s3 = _mm512_fmadd_ps(xv, widen16(w + 3 * ld + i), s3);
    }
    float sums[4] = {_mm512_reduce_add_ps(s0), _mm512_reduce_add_ps(s1), _mm512_reduce_add_ps(s2),
                     _mm512_reduce_add_ps(s3)};
    for (; i < n; i++)
        for (int r = 0; r < 4; r++) sums[r] += x[i] * widen(w[r * ld + i]);
    memcpy(out, sums, sizeof sums);
}
#else
static void axpy4_bf16(float *y, const float *a, const uint16_t *w, int64_t ld, int64_t n) {
    #pragma omp simd
    for (int64_t i = 0; i < n; i++)
        y[i] += a[0] * widen(w[i]) + a[1] * widen(w[ld + i]) + a[2] * widen(w[2 * ld + i]) + a[3] * widen(w[3 * ld + i]);
}

static void dot4_bf16(const float *x, const uint16_t *w, int64_t ld, int64_t n, float *out) {
    for (int r = 0; r < 4; r++) {
        float acc = 0.0f;
        #pragma omp simd reduction(+ : acc)
        for (int64_t i = 0; i < n; i++) acc += x[i] * widen(w[r * ld + i]);
        out[r] = acc;
    }
}
#endif

/* One decode token per sequence of multi-head latent attention (DeepSeek-V2/V3 MLA) on the latent cache.
   For each of the batch sequences b: q[b] (heads, dn + dr) and kv[b] (rank + dr) are its token's projections and
   cos[b], sin[b] (dr / 2) its rotary angles. Here: rope on both rope parts, RMSNorm on the latent, the latent row
   written to cache[b, pos] (cache (batch, slots, rank + dr)), then for each head
   out[b] (heads, dv) = softmax(scale * q . K) V over the slots mask[b] allows (mask (batch, pos + 1), 1 = attend;
   NULL: all), with the absorbed weights of kv_b (out, in) = (heads * (dn + dv), rank): q_nope goes through the key
   half, the attended latent through the value half (each read once for the whole batch), so the cache is never
   expanded. kv_b is stored column-major (the fp32 decode layout), its columns ld_kvb apart, or row_major (a
   quantized kv_b's dequantized copy: each head's rows read front to back, twice as fast from memory here),
   rows ld_kvb apart. The cache and kv_b are fp32, or bf16 when bf16 is set (a bf16 model's), widened to fp32 as
   they are read (a row-major bf16 kv_b four rows a pass, axpy4_bf16 / dot4_bf16); everything else is fp32. The
   threads split kv_b's rows, the heads, and the slots. */
int mmwb_latent_attention(const float *q, const float *kv, const float *norm_w, float eps, const float *cos,
                          const float *sin, void *cache, int64_t slots, int64_t pos, const uint8_t *mask,
                          int64_t batch, const void *wkvb, int64_t ld_kvb, int64_t heads, int64_t dn, int64_t dr,
                          int64_t dv, int64_t rank, float scale, float *out, int bf16, int row_major,
                          int threads) {
    const int64_t width = rank + dr, seq = pos + 1, stride = dn + dv, qw = dn + dr, bh = batch * heads;
    const int64_t wide = heads * stride > width ? heads * stride : width; /* the longest row read */
    if (threads < 1) threads = 1;
    float *query = malloc(sizeof(float) * (bh * (width + seq + rank) + width + threads * wide));
    if (!query) return 1;
    float *scores = query + bh * width, *attended = scores + bh * seq, *latent = attended + bh * rank;
    float *scratch = latent + width; /* one row of wide floats a thread */
    const size_t item = bf16 ? 2 : 4;
    for (int64_t b = 0; b < batch; b++) {
        const float *kvb = kv + b * width;
        mmwb_rms_norm(kvb, norm_w, latent, 1, rank, eps);
        const float *cb = cos + b * dr / 2, *sb = sin + b * dr / 2;
        rope(kvb + rank, cb, sb, dr, latent + rank);
        mmwb_store_floats(latent, (char *)cache + (b * slots + pos) * width * item, width, bf16);
        for (int64_t h = 0; h < heads; h++)
            rope(q + (b * heads + h) * qw + dn, cb, sb, dr, query + (b * heads + h) * width + rank);
    }
    memset(attended, 0, sizeof(float) * bh * rank);
    memset(out, 0, sizeof(float) * bh * dv);
    if (row_major)
        for (int64_t i = 0; i < bh; i++) memset(query + i * width, 0, sizeof(float) * rank);
    #pragma omp parallel num_threads(threads)
    {
        float *row = scratch;
#ifdef _OPENMP
        row += omp_get_thread_num() * wide;
#endif
        if (row_major) { /* query[b, h, :rank] = q_nope[b, h] W_uk[h]: each head's rows streamed once */
            #pragma omp for schedule(static)
            for (int64_t h = 0; h < heads; h++) {
                int64_t d = 0;
                if (bf16) /* four rows a pass, widened in registers */
                    for (; d + 4 <= dn; d += 4)
                        for (int64_t b = 0; b < batch; b++)
                            axpy4_bf16(query + (b * heads + h) * width, q + (b * heads + h) * qw + d,
                                       (const uint16_t *)wkvb + (h * stride + d) * ld_kvb, ld_kvb, rank);
                for (; d < dn; d++) {
                    const float *w = as_float(wkvb, (h * stride + d) * ld_kvb, rank, bf16, row);
                    for (int64_t b = 0; b < batch; b++)
                        axpy(query + (b * heads + h) * width, q[(b * heads + h) * qw + d], w, rank);
                }
            }
        } else {
            #pragma omp for schedule(static)
            for (int64_t j = 0; j < rank; j++) {
                const float *w = as_float(wkvb, j * ld_kvb, heads * stride, bf16, row);
                for (int64_t i = 0; i < bh; i++)
                    query[i * width + j] = dot(q + i * qw, w + (i % heads) * stride, dn);
            }
        }
        #pragma omp for schedule(static) collapse(2)
        for (int64_t b = 0; b < batch; b++)
            for (int64_t t = 0; t < seq; t++) {
                const float *k = as_float(cache, (b * slots + t) * width, width, bf16, row);
                const int allowed = mask == NULL || mask[b * seq + t];
                for (int64_t h = 0; h < heads; h++) {
                    const int64_t i = b * heads + h;
                    scores[i * seq + t] = allowed ? dot(query + i * width, k, width) * scale : -INFINITY;
                }
            }
        #pragma omp single
        softmax_rows(scores, bh, seq);
        /* attended[b, h] = sum over t of p[b, h, t] latent[b, t]. The threads split the heads, each reading the
           whole cache (from L2 after the scores pass): splitting the slots into partial sums measured 1.2-1.4x
           slower at 100-1000 slots (the partials of 16 heads x 512 fill L1). */
        #pragma omp for schedule(static)
        for (int64_t h = 0; h < heads; h++)
            for (int64_t b = 0; b < batch; b++)
                for (int64_t t = 0; t < seq; t++) {
                    const int64_t i = b * heads + h;
                    const float *v = as_float(cache, (b * slots + t) * width, rank, bf16, row);
                    axpy(attended + i * rank, scores[i * seq + t], v, rank);
                }
        #pragma omp for schedule(static)
        for (int64_t h = 0; h < heads; h++) { /* out[b, h] = attended[b, h] W_uv[h]^T */
            if (row_major) {
                int64_t e = 0;
                if (bf16)
                    for (; e + 4 <= dv; e += 4)
                        for (int64_t b = 0; b < batch; b++) {
                            const int64_t i = b * heads + h;
                            dot4_bf16(attended + i * rank, (const uint16_t *)wkvb + (h * stride + dn + e) * ld_kvb,
                                      ld_kvb, rank, out + i * dv + e);
                        }
                for (; e < dv; e++) {
                    const float *w = as_float(wkvb, (h * stride + dn + e) * ld_kvb, rank, bf16, row);
                    for (int64_t b = 0; b < batch; b++) {
                        const int64_t i = b * heads + h;
                        out[i * dv + e] = dot(attended + i * rank, w, rank);
                    }
                }
            } else
                for (int64_t j = 0; j < rank; j++) {
                    const float *w = as_float(wkvb, j * ld_kvb + h * stride + dn, dv, bf16, row);
                    for (int64_t b = 0; b < batch; b++)
                        axpy(out + (b * heads + h) * dv, attended[(b * heads + h) * rank + j], w, dv);
                }
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
   indices, and weights are the scores there, normalised to sum 1 when norm, times scaling. x and W are fp32, or
   both bf16 when bf16 is set (a bf16 model's: widened to fp32, where its logits are computed as well). */
int mmwb_route(const void *x, const void *w, const float *bias, int64_t m, int64_t c, int64_t e, int64_t k,
               int sigmoid, int64_t n_group, int64_t topk_group, int norm, float scaling, float *logits,
               int64_t *indices, float *weights, int bf16) {
    float *scores = malloc(sizeof(float) * (3 * e + n_group + 2 * c));
    if (!scores) return 1;
    float *choice = scores + e, *left = choice + e, *group_score = left + e;
    float *x_row = group_score + n_group, *w_row = x_row + c; /* scratch for widened bf16 rows */
    const int64_t size = e / n_group;
    for (int64_t i = 0; i < m; i++) {
        float *li = logits + i * e;
        const float *xi = as_float(x, i * c, c, bf16, x_row);
        for (int64_t j = 0; j < e; j++) {
            const float *wj = as_float(w, j * c, c, bf16, w_row);
            float acc = 0.0f;
            #pragma omp simd reduction(+ : acc)
            for (int64_t d = 0; d < c; d++) acc += xi[d] * wj[d];
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
