/* Batch-1 products with int8 weights (mmwb.models.quantize's int8 layers): compiled with cpu.c into one library,
 * called through the bindings in cpu.py (int8_linear, int8_experts).
 *
 * A weight is (n, k) int8, row-major, one fp32 scale per output row: w[o, i] ~ q[o, i] * scale[o]. The input row
 * is quantized to int8 in blocks of INT8_BLOCK inputs (one fp32 scale a block; llama.cpp's Q8 activations use 32 or
 * 256: one outlier flattens the rest of its block; every block costs a conversion and a multiply-add a row), so
 * that each 64 bytes of weight take one AVX-512 VNNI instruction (u8 x s8 dot products of four, summed into 16
 * int32 lanes) instead of widening every byte to float. VNNI wants one unsigned operand: the weight's bytes are
 * flipped to unsigned (q + 128, an xor of the sign bit) and the 128 * sum(x) this adds is taken off once a row.
 * A row's sum is then exact in integers within a block, and in fp32 across blocks.
 *
 * An input holding a NaN or an infinity returns 1: the caller runs torch's kernel, which carries them through.
 * Without AVX-512 VNNI (another CPU, or a compiler without it) mmwb_int8_supported() is 0 and the caller runs
 * torch's kernel. */
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <math.h>
#ifdef _OPENMP
#include <omp.h>
#endif

#define INT8_BLOCK 128 /* inputs per activation scale: k must be a multiple of it */
#define MAX_K 16384    /* widest input */
#define PREFETCH_ROWS 4 /* rows ahead that a pass asks the memory for */
#define MAX_ROWS 4      /* input rows of mmwb_int8_rows (cpu.py's MAX_ROWS) */

void mmwb_store_floats(const float *x, void *dst, int64_t n, int bf16); /* cpu.c */

#if defined(__AVX512F__) && defined(__AVX512BW__) && defined(__AVX512VNNI__)
#include <immintrin.h>

/* The input row as int8 blocks: xq (k), one scale per block (sx), and the row's correction 128 * sum_b sx_b *
   sum(xq_b) for the flipped weight bytes. x is fp32, or bf16 when bf16 is set. */
typedef struct {
    int8_t xq[MAX_K];
    float sx[MAX_K / INT8_BLOCK];
    float offset;
} QuantizedRow;

static inline __m512 load16(const void *x, int bf16, int64_t i) {
    if (!bf16) return _mm512_loadu_ps((const float *)x + i);
    __m256i h = _mm256_loadu_si256((const __m256i *)((const uint16_t *)x + i));
    return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16));
}

/* 0, or 1 when x holds a NaN or an infinity (the caller then runs torch's kernel, which carries them through). */
static int quantize_row(const void *x, int bf16, int64_t k, QuantizedRow *row) {
    row->offset = 0.0f;
    for (int64_t b = 0; b < k / INT8_BLOCK; b++) {
        const int64_t start = b * INT8_BLOCK;
        __m512 m = _mm512_setzero_ps();
        __mmask16 nan = 0;
        for (int i = 0; i < INT8_BLOCK; i += 16) {
            const __m512 v = load16(x, bf16, start + i);
            nan |= _mm512_cmp_ps_mask(v, v, _CMP_UNORD_Q);
            m = _mm512_max_ps(m, _mm512_abs_ps(v));
        }
        const float amax = _mm512_reduce_max_ps(m);
        if (nan || !isfinite(amax)) return 1;
        /* a block below 1e-30 is taken as zeros (its 1 / scale would overflow) */
        const float scale = amax > 1e-30f ? amax / 127.0f : 1.0f;
        const __m512 inv = _mm512_set1_ps(amax > 1e-30f ? 1.0f / scale : 0.0f);
        int32_t sum = 0;
        for (int i = 0; i < INT8_BLOCK; i += 16) {
            __m512i q = _mm512_cvtps_epi32(_mm512_mul_ps(load16(x, bf16, start + i), inv)); /* round to nearest */
            sum += _mm512_reduce_add_epi32(q);
            _mm_storeu_si128((__m128i *)(row->xq + start + i), _mm512_cvtsepi32_epi8(q));
        }
        row->sx[b] = scale;
        row->offset += 128.0f * scale * (float)sum;
    }
    return 0;
}

/* y[i, o] = scale[o] * (w[o] . x_i) for the m input rows and the weight rows o in [r0, r1) (y rows ldy apart), four
   weight rows a pass so that each block of x is loaded once for four weight rows and four accumulators hide the
   instructions' latency; a pass's 4 rows come from memory for the first input row and from cache for the others. */
static void rows_dot(const int8_t *w, const float *scale, int64_t k, const QuantizedRow *rows, int64_t m, float *y,
                     int64_t ldy, int64_t r0, int64_t r1) {
    const __m512i flip = _mm512_set1_epi8((char)0x80);
    const int64_t blocks = k / INT8_BLOCK;
    for (int64_t r = r0; r < r1; r += 4) {
        const int64_t n = r1 - r < 4 ? r1 - r : 4;
        const int8_t *wr[4];
        for (int u = 0; u < 4; u++) wr[u] = w + (r + (u < n ? u : 0)) * k; /* a short last pass repeats row r */
        for (int64_t i = 0; i < m; i++) {
            const QuantizedRow *row = rows + i;
            __m512 acc[4] = {_mm512_setzero_ps(), _mm512_setzero_ps(), _mm512_setzero_ps(), _mm512_setzero_ps()};
            for (int64_t b = 0; b < blocks; b++) {
                const __m512 s = _mm512_set1_ps(row->sx[b]);
                __m512i d[4] = {_mm512_setzero_si512(), _mm512_setzero_si512(), _mm512_setzero_si512(),
                                _mm512_setzero_si512()};
                for (int64_t j = b * INT8_BLOCK; j < (b + 1) * INT8_BLOCK; j += 64) {
                    const __m512i xb = _mm512_loadu_si512(row->xq + j);
                    for (int u = 0; u < 4; u++) {
                        if (i == 0) _mm_prefetch((const char *)(wr[u] + PREFETCH_ROWS * k + j), _MM_HINT_T0);
                        const __m512i wb = _mm512_xor_si512(_mm512_loadu_si512(wr[u] + j), flip);
                        d[u] = _mm512_dpbusd_epi32(d[u], wb, xb);
                    }
                }
                for (int u = 0; u < 4; u++) acc[u] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(d[u]), s, acc[u]);
            }
            for (int u = 0; u < n; u++)
                y[i * ldy + r + u] = scale[r + u] * (_mm512_reduce_add_ps(acc[u]) - row->offset);
        }
    }
}

/* Thread t's share of n rows, in whole passes of four. */
static void share(int64_t n, int t, int nt, int64_t *r0, int64_t *r1) {
    const int64_t passes = (n + 3) / 4;
    *r0 = passes * t / nt * 4;
    *r1 = passes * (t + 1) / nt * 4;
    if (*r1 > n) *r1 = n;
}

int mmwb_int8_supported(void) { return 1; }

/* out (m, n) = x (m, k) w^T, m <= MAX_ROWS. */
int mmwb_int8_rows(const void *x, int bf16, int64_t m, int64_t k, const int8_t *w, const float *scale, int64_t n,
                   void *out, int threads) {
    if (k % INT8_BLOCK || k > MAX_K || m > MAX_ROWS) return 1;
    QuantizedRow *rows = malloc(m * sizeof(QuantizedRow));
    float *y = malloc(sizeof(float) * m * n);
    const size_t item = bf16 ? 2 : 4;
    int status = !rows || !y;
    for (int64_t i = 0; i < m && !status; i++) status = quantize_row((const char *)x + i * k * item, bf16, k, rows + i);
    if (!status) {
#pragma omp parallel num_threads(threads)
        {
            int64_t r0 = 0, r1 = n;
#ifdef _OPENMP
            share(n, omp_get_thread_num(), omp_get_num_threads(), &r0, &r1);
#endif
            rows_dot(w, scale, k, rows, m, y, n, r0, r1);
        }
        mmwb_store_floats(y, out, m * n, bf16);
    }
    free(rows);
    free(y);
    return status;
}

/* One token's chosen SwiGLU experts: out (c) = sum over e of coef[e] * down_e(silu(gate) * up), [gate; up] =
   gate_up_e x, with gate_up_e (2 * inter, c) and down_e (c, inter) int8 and their row scales. One parallel region
   for the whole sum: the threads split each product's rows and meet at a barrier between products. */
int mmwb_int8_experts(const void *x, int bf16, int64_t c, int64_t inter, int64_t count,
                      const int8_t *const *gate_up, const float *const *gate_up_scale, const int8_t *const *down,
                      const float *const *down_scale, const float *coef, void *out, int threads) {
    if (c % INT8_BLOCK || inter % INT8_BLOCK || c > MAX_K || inter > MAX_K) return 1;
    QuantizedRow *rows = malloc(2 * sizeof(QuantizedRow));
    float *h = malloc(sizeof(float) * (2 * inter + inter + 2 * c));
    if (!rows || !h) {
        free(rows);
        free(h);
        return 1;
    }
    float *act = h + 2 * inter, *d = act + inter, *y = d + c;
    int failed = quantize_row(x, bf16, c, rows);
    memset(y, 0, sizeof(float) * c);
#pragma omp parallel num_threads(threads) if (!failed)
    {
        int t = 0, nt = 1;
#ifdef _OPENMP
        t = omp_get_thread_num();
        nt = omp_get_num_threads();
#endif
        int64_t a0, a1, b0, b1, j0, j1;
        share(2 * inter, t, nt, &a0, &a1);
        share(c, t, nt, &b0, &b1);
        share(inter, t, nt, &j0, &j1);
        for (int64_t e = 0; e < count && !failed; e++) {
            rows_dot(gate_up[e], gate_up_scale[e], c, rows, 1, h, 0, a0, a1);
#pragma omp barrier
            for (int64_t j = j0; j < j1; j++) act[j] = h[j] / (1.0f + expf(-h[j])) * h[inter + j];
#pragma omp barrier
#pragma omp single
            failed = quantize_row(act, 0, inter, rows + 1);
            /* the single's barrier: every thread reads the same failed, so all leave the loop together */
            if (failed) break;
            rows_dot(down[e], down_scale[e], inter, rows + 1, 1, d, 0, b0, b1);
            for (int64_t j = b0; j < b1; j++) y[j] += coef[e] * d[j];
#pragma omp barrier
        }
    }
    if (!failed) mmwb_store_floats(y, out, c, bf16);
    free(rows);
    free(h);
    return failed;
}

#else

int mmwb_int8_supported(void) { return 0; }

int mmwb_int8_rows(const void *x, int bf16, int64_t m, int64_t k, const int8_t *w, const float *scale, int64_t n,
                   void *out, int threads) {
    return 2;
}

int mmwb_int8_experts(const void *x, int bf16, int64_t c, int64_t inter, int64_t count,
                      const int8_t *const *gate_up, const float *const *gate_up_scale, const int8_t *const *down,
                      const float *const *down_scale, const float *coef, void *out, int threads) {
    return 2;
}

#endif
