/* Batch-1 products with int8 and int4 weights (mmwb.models.quantize's layers): compiled with cpu.c into one library,
 * called through the bindings in cpu.py (int8_linear, int8_experts, int4_linear, int4_experts).
 *
 * Both quantize the input row to int8 in blocks (one fp32 scale a block; llama.cpp's Q8 activations use 32 or 256:
 * one outlier flattens the rest of its block; every block costs a conversion and a multiply-add a row), so that the
 * weight bytes meet the input in AVX-512 VNNI instructions (u8 x s8 dot products of four, summed into 16 int32
 * lanes) instead of every weight being widened to float. A row's sum is exact in integers within a block, and in
 * fp32 across blocks.
 *
 * int8: a weight is (n, k) int8, row-major, one fp32 scale per output row: w[o, i] ~ q[o, i] * scale[o]; the input
 * in blocks of INT8_BLOCK. VNNI wants one unsigned operand: the weight's bytes are flipped to unsigned (q + 128, an
 * xor of the sign bit) and the 128 * sum(x) this adds is taken off once a row.
 *
 * int4: levels q in [0, 15] in groups of `group` inputs, w[o, i] ~ (q - 8) * scale[o, g] + zero[o, g], laid out in
 * panels of 16 output rows (mmwb.models.quantize.to_panels): a panel's bytes run input by input, 64 bytes for each
 * 8 inputs (lane r = output row r: 4 bytes, inputs 0-3 in the low nibbles and 4-7 in the high ones), and beside
 * them a table of each panel's bf16 scales and zeros per group (16 each). Each 64-byte load is two VNNI products
 * into 16 rows' sums with no horizontal reduction, and a panel is one stream front to back: 25 GB/s on a token's
 * six cold Kimi-sized experts here where torch's _weight_int4pack_mm_for_cpu read 13 (issue 20). The input's
 * blocks are the weight's groups: per group sum(w x) = scale * (sx * sum(q xq) - 8 xsum) + zero * xsum, xsum the
 * block's sum as quantized.
 *
 * An input holding a NaN or an infinity returns 1 (the caller then runs a float product, which carries them
 * through). Without AVX-512 VNNI (another CPU, or a compiler without it) mmwb_vnni_supported() is 0: int8 layers
 * then run torch's kernel and int4 layers are laid out for torch's. */
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <math.h>
#ifdef _OPENMP
#include <omp.h>
#endif

#define INT8_BLOCK 128 /* inputs per activation scale of the int8 products: k must be a multiple of it */
#define MIN_BLOCK 32   /* smallest block (int4: the group size, 32, 64 or 128) */
#define MAX_K 16384    /* widest input */
#define PREFETCH_ROWS 4 /* rows ahead that an int8 pass asks the memory for */
#define PREFETCH_BYTES 1024 /* bytes ahead in its panel that an int4 pass asks the memory for */
#define MAX_ROWS 4      /* input rows of mmwb_int8_rows (cpu.py's MAX_ROWS), and of one int4 pass */
#define PANEL 16        /* int4 output rows a panel */

void mmwb_store_floats(const float *x, void *dst, int64_t n, int bf16); /* cpu.c */

#if defined(__AVX512F__) && defined(__AVX512BW__) && defined(__AVX512VNNI__)
#include <immintrin.h>

/* The input row as int8 blocks: xq (k), one scale per block (sx), the block's sum as quantized (xsum = sx *
   sum(xq)) and the row's correction 128 * sum_b xsum_b for int8's flipped weight bytes. */
typedef struct {
    int8_t xq[MAX_K];
    float sx[MAX_K / MIN_BLOCK];
    float xsum[MAX_K / MIN_BLOCK];
    float offset;
} QuantizedRow;

static inline __m512 load16(const void *x, int bf16, int64_t i) {
    if (!bf16) return _mm512_loadu_ps((const float *)x + i);
    __m256i h = _mm256_loadu_si256((const __m256i *)((const uint16_t *)x + i));
    return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16));
}

/* x (k, fp32, or bf16 when bf16 is set) in blocks of `block`: 0, or 1 when x holds a NaN or an infinity. */
static int quantize_row(const void *x, int bf16, int64_t k, int64_t block, QuantizedRow *row) {
    row->offset = 0.0f;
    for (int64_t b = 0; b < k / block; b++) {
        const int64_t start = b * block;
        __m512 m = _mm512_setzero_ps();
        __mmask16 nan = 0;
        for (int i = 0; i < block; i += 16) {
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
        for (int i = 0; i < block; i += 16) {
            __m512i q = _mm512_cvtps_epi32(_mm512_mul_ps(load16(x, bf16, start + i), inv)); /* round to nearest */
            sum += _mm512_reduce_add_epi32(q);
            _mm_storeu_si128((__m128i *)(row->xq + start + i), _mm512_cvtsepi32_epi8(q));
        }
        row->sx[b] = scale;
        row->xsum[b] = scale * (float)sum;
        row->offset += 128.0f * row->xsum[b];
    }
    return 0;
}

/* m rows of x (k each) quantized in blocks of `block`, or NULL (no memory, or a NaN or an infinity in x). */
static QuantizedRow *quantize_rows(const void *x, int bf16, int64_t m, int64_t k, int64_t block) {
    QuantizedRow *rows = malloc(m * sizeof(QuantizedRow));
    const size_t item = bf16 ? 2 : 4;
    for (int64_t i = 0; i < m && rows; i++)
        if (quantize_row((const char *)x + i * k * item, bf16, k, block, rows + i)) {
            free(rows);
            rows = NULL;
        }
    return rows;
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

int mmwb_vnni_supported(void) { return 1; }

/* out (m, n) = x (m, k) w^T, m <= MAX_ROWS. */
int mmwb_int8_rows(const void *x, int bf16, int64_t m, int64_t k, const int8_t *w, const float *scale, int64_t n,
                   void *out, int threads) {
    if (k % INT8_BLOCK || k > MAX_K || m > MAX_ROWS) return 1;
    QuantizedRow *rows = quantize_rows(x, bf16, m, k, INT8_BLOCK);
    float *y = malloc(sizeof(float) * m * n);
    const int status = !rows || !y;
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
    int failed = quantize_row(x, bf16, c, INT8_BLOCK, rows);
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
            failed = quantize_row(act, 0, inter, INT8_BLOCK, rows + 1);
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

/* 16 bf16 values widened to fp32 (exact). */
static inline __m512 widen_bf16(const uint16_t *p) {
    return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(_mm256_loadu_si256((const __m256i *)p)), 16));
}

/* y[i * ldy + 16 p + r] = row r of panel p of the int4 weight w (k inputs, groups of `group`, tables beside: see
   the header) times input row i, for panels [p0, p1) and m <= MAX_ROWS rows quantized in blocks of `group`. Four
   sums a row (two loads of 64 bytes, low and high nibbles) so that the VNNI instructions' latency overlaps. */
static void panels_dot(const uint8_t *w, const uint16_t *table, int64_t k, int64_t group, const QuantizedRow *rows,
                       int64_t m, float *y, int64_t ldy, int64_t p0, int64_t p1) {
    const int64_t groups = k / group, loads = group / 8; /* 64 bytes hold 8 inputs of the panel's 16 rows */
    const __m512i nibble = _mm512_set1_epi8(0x0F);
    const __m512 eight = _mm512_set1_ps(8.0f);
    for (int64_t p = p0; p < p1; p++) {
        const uint8_t *wp = w + p * PANEL * k / 2;
        const uint16_t *tp = table + p * groups * 2 * PANEL;
        __m512 acc[MAX_ROWS];
        for (int64_t i = 0; i < m; i++) acc[i] = _mm512_setzero_ps();
        for (int64_t g = 0; g < groups; g++) {
            const uint8_t *wg = wp + g * loads * 64;
            __m512i d[MAX_ROWS][4];
            for (int64_t i = 0; i < m; i++)
                for (int u = 0; u < 4; u++) d[i][u] = _mm512_setzero_si512();
            for (int64_t j = 0; j < loads; j += 2) {
                _mm_prefetch((const char *)(wg + j * 64 + PREFETCH_BYTES), _MM_HINT_T0);
                const __m512i v0 = _mm512_loadu_si512(wg + j * 64), v1 = _mm512_loadu_si512(wg + j * 64 + 64);
                const __m512i q[4] = {_mm512_and_si512(v0, nibble), _mm512_and_si512(_mm512_srli_epi16(v0, 4), nibble),
                                      _mm512_and_si512(v1, nibble), _mm512_and_si512(_mm512_srli_epi16(v1, 4), nibble)};
                for (int64_t i = 0; i < m; i++) {
                    int32_t xq[4]; /* inputs 4u to 4u + 3 of these 16, as VNNI's four-byte operand */
                    memcpy(xq, rows[i].xq + g * group + j * 8, sizeof xq);
                    for (int u = 0; u < 4; u++) d[i][u] = _mm512_dpbusd_epi32(d[i][u], q[u], _mm512_set1_epi32(xq[u]));
                }
            }
            const __m512 scale = widen_bf16(tp + g * 2 * PANEL), zero = widen_bf16(tp + g * 2 * PANEL + PANEL);
            for (int64_t i = 0; i < m; i++) {
                const __m512i sum =
                    _mm512_add_epi32(_mm512_add_epi32(d[i][0], d[i][1]), _mm512_add_epi32(d[i][2], d[i][3]));
                const __m512 xsum = _mm512_set1_ps(rows[i].xsum[g]), sx = _mm512_set1_ps(rows[i].sx[g]);
                const __m512 t = _mm512_fmsub_ps(_mm512_cvtepi32_ps(sum), sx, _mm512_mul_ps(eight, xsum));
                acc[i] = _mm512_fmadd_ps(zero, xsum, _mm512_fmadd_ps(scale, t, acc[i]));
            }
        }
        for (int64_t i = 0; i < m; i++) _mm512_storeu_ps(y + i * ldy + p * PANEL, acc[i]);
    }
}

/* Thread t's share of `count` panels. */
static void panel_share(int64_t count, int t, int nt, int64_t *p0, int64_t *p1) {
    *p0 = count * t / nt;
    *p1 = count * (t + 1) / nt;
}

/* out (m, n) = x (m, k) w^T for an int4 weight w (n, k) in panels and its tables; rows MAX_ROWS at a time, each
   panel read from memory once for all of them. */
int mmwb_int4_rows(const void *x, int bf16, int64_t m, int64_t k, int64_t group, const uint8_t *w,
                   const uint16_t *table, int64_t n, void *out, int threads) {
    if (k % group || group % MIN_BLOCK || group > 128 || k > MAX_K || n % PANEL) return 2;
    QuantizedRow *rows = quantize_rows(x, bf16, m, k, group);
    float *y = malloc(sizeof(float) * m * n);
    const int status = !rows || !y;
    if (!status) {
#pragma omp parallel num_threads(threads)
        {
            int64_t p0 = 0, p1 = n / PANEL;
#ifdef _OPENMP
            panel_share(n / PANEL, omp_get_thread_num(), omp_get_num_threads(), &p0, &p1);
#endif
            for (int64_t p = p0; p < p1; p++)
                for (int64_t i = 0; i < m; i += MAX_ROWS) {
                    const int64_t pass = m - i < MAX_ROWS ? m - i : MAX_ROWS;
                    panels_dot(w, table, k, group, rows + i, pass, y + i * n, n, p, p + 1);
                }
        }
        mmwb_store_floats(y, out, m * n, bf16);
    }
    free(rows);
    free(y);
    return status;
}

/* The panels [p0, p1) of `count` weights of `per` panels each, weight e's outputs at y + e * ldy: the share of a
   thread in one sweep over all of a token's experts. */
static void experts_dot(const uint8_t *const *w, const uint16_t *const *table, int64_t k, int64_t group,
                        const QuantizedRow *rows, int64_t rows_step, int64_t count, int64_t per, float *y,
                        int64_t ldy, int64_t p0, int64_t p1) {
    for (int64_t e = 0; e < count; e++) {
        const int64_t a = p0 > e * per ? p0 - e * per : 0, b = p1 < (e + 1) * per ? p1 - e * per : per;
        if (a < b) panels_dot(w[e], table[e], k, group, rows + e * rows_step, 1, y + e * ldy, 0, a, b);
    }
}

/* One token's chosen int4 SwiGLU experts: out (c) = sum over e of coef[e] * down_e(silu(gate) * up), [gate; up] =
   gate_up_e x, gate_up_e (2 * inter, c) and down_e (c, inter) in panels with their tables. Two sweeps, each over
   every chosen expert's panels split between the threads: all gate_up products, then all down products. */
int mmwb_int4_experts(const void *x, int bf16, int64_t c, int64_t inter, int64_t group, int64_t count,
                      const uint8_t *const *gate_up, const uint16_t *const *gate_up_table, const uint8_t *const *down,
                      const uint16_t *const *down_table, const float *coef, void *out, int threads) {
    if (c % group || inter % group || group % MIN_BLOCK || group > 128 || c > MAX_K || inter > MAX_K || c % PANEL ||
        inter % (PANEL / 2))
        return 2;
    QuantizedRow *rows = malloc((1 + count) * sizeof(QuantizedRow)); /* x, then each expert's activation */
    float *h = malloc(sizeof(float) * (count * (3 * inter + c) + c));
    int failed = !rows || !h || quantize_row(x, bf16, c, group, rows);
    float *act = h + count * 2 * inter, *d = act + count * inter, *y = d + count * c;
#pragma omp parallel num_threads(threads) if (!failed)
    if (!failed) {
        int t = 0, nt = 1;
#ifdef _OPENMP
        t = omp_get_thread_num();
        nt = omp_get_num_threads();
#endif
        int64_t p0, p1;
        panel_share(count * 2 * inter / PANEL, t, nt, &p0, &p1);
        experts_dot(gate_up, gate_up_table, c, group, rows, 0, count, 2 * inter / PANEL, h, 2 * inter, p0, p1);
#pragma omp barrier
#pragma omp for reduction(| : failed)
        for (int64_t e = 0; e < count; e++) {
            const float *he = h + e * 2 * inter;
            float *ae = act + e * inter;
            for (int64_t j = 0; j < inter; j++) ae[j] = he[j] / (1.0f + expf(-he[j])) * he[inter + j];
            failed |= quantize_row(ae, 0, inter, group, rows + 1 + e);
        }
        /* the loop's barrier: every thread reads the same failed */
        if (!failed) {
            panel_share(count * c / PANEL, t, nt, &p0, &p1);
            experts_dot(down, down_table, inter, group, rows + 1, 1, count, c / PANEL, d, c, p0, p1);
#pragma omp barrier
#pragma omp for
            for (int64_t j = 0; j < c; j++) {
                float sum = 0.0f;
                for (int64_t e = 0; e < count; e++) sum += coef[e] * d[e * c + j];
                y[j] = sum;
            }
        }
    }
    if (!failed) mmwb_store_floats(y, out, c, bf16);
    free(rows);
    free(h);
    return failed;
}

#else

int mmwb_vnni_supported(void) { return 0; }

int mmwb_int8_rows(const void *x, int bf16, int64_t m, int64_t k, const int8_t *w, const float *scale, int64_t n,
                   void *out, int threads) {
    return 2;
}

int mmwb_int8_experts(const void *x, int bf16, int64_t c, int64_t inter, int64_t count,
                      const int8_t *const *gate_up, const float *const *gate_up_scale, const int8_t *const *down,
                      const float *const *down_scale, const float *coef, void *out, int threads) {
    return 2;
}

int mmwb_int4_rows(const void *x, int bf16, int64_t m, int64_t k, int64_t group, const uint8_t *w,
                   const uint16_t *table, int64_t n, void *out, int threads) {
    return 2;
}

int mmwb_int4_experts(const void *x, int bf16, int64_t c, int64_t inter, int64_t group, int64_t count,
                      const uint8_t *const *gate_up, const uint16_t *const *gate_up_table, const uint8_t *const *down,
                      const uint16_t *const *down_table, const float *coef, void *out, int threads) {
    return 2;
}

#endif
