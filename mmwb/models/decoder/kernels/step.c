/* One decode token of a whole mmwb decoder in one call (mmwb/models/decoder/decode_plan.py builds the structures
 * below from a model and its cache): batch 1, fp32 activations, each linear layer's weight fp32 or int8 / int4
 * (mmwb.models.quantize). It strings together the kernels of cpu.c and quantized.c that the modules call one by one
 * (the same functions, so the same sums), with no Python or torch dispatch between them: at bench-small's widths
 * a token is ~35 products of 1-6 us each, and the modules spent ~2 ms of host work around them (issue 20).
 *
 * Returns 0, or the status of the first kernel that declined (an input holding a NaN, a failed allocation), or 4
 * for a token id or cache slot out of range: the caller then runs the token through the modules, which write the
 * same cache slots again (or raise their error). */
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#ifdef _OPENMP
#include <omp.h>
#endif

/* cpu.c */
int mmwb_rows_times_matrix(const float *x, int64_t ldx, const float *w, int64_t ldw, float *y, int64_t m, int64_t k,
                           int64_t n, int threads);
void mmwb_rms_norm(const float *x, const float *w, float *y, int64_t m, int64_t n, float eps);
int mmwb_latent_attention(const float *q, const float *kv, const float *norm_w, float eps, const float *cos,
                          const float *sin, void *cache, int64_t slots, int64_t pos, const uint8_t *mask,
                          int64_t batch, const void *wkvb, int64_t ld_kvb, int64_t heads, int64_t dn, int64_t dr,
                          int64_t dv, int64_t rank, float scale, float *out, int bf16, int row_major, int threads);
int mmwb_gqa_attention(const float *q, const float *k, const float *v, const float *cos, const float *sin,
                       float *key_cache, float *value_cache, int64_t slots, int64_t pos, int64_t heads,
                       int64_t kv_heads, int64_t d, float scale, float *out);
int mmwb_route(const void *x, const void *w, const float *bias, int64_t m, int64_t c, int64_t e, int64_t k,
               int sigmoid, int64_t n_group, int64_t topk_group, int norm, float scaling, float *logits,
               int64_t *indices, float *weights, int bf16);
int mmwb_swiglu_sum(const float *x, int64_t m, int64_t c, int64_t inter, int64_t count, const float *const *gate,
                    const float *const *up, int64_t ld_in, const float *const *down, int64_t ld_down,
                    const float *coef, float *y, int threads);
/* quantized.c */
int mmwb_int8_rows(const void *x, int bf16, int64_t m, int64_t k, const int8_t *w, const float *scale, int64_t n,
                   void *out, int threads);
int mmwb_int8_experts(const void *x, int bf16, int64_t c, int64_t inter, int64_t count, const int8_t *const *gate_up,
                      const float *const *gate_up_scale, const int8_t *const *down, const float *const *down_scale,
                      const float *coef, void *out, int threads);
int mmwb_int4_rows(const void *x, int bf16, int64_t m, int64_t k, int64_t group, const uint8_t *w,
                   const uint16_t *table, int64_t n, void *out, int threads);
int mmwb_int4_experts(const void *x, int bf16, int64_t c, int64_t inter, int64_t group, int64_t count,
                      const uint8_t *const *gate_up, const uint16_t *const *gate_up_table, const uint8_t *const *down,
                      const uint16_t *const *down_table, const float *coef, void *out, int threads);

/* How a weight is stored (decode_plan.FORMATS): fp32 (out, in) column-major (the decode layout: row i of w^T at
   weight + i * ld) or row-major (row o at weight + o * ld: a tied LM head, a token table); int8 rows with fp32 row
   scales; int4 panels with their bf16 table (scale). */
enum { FP32_COLUMNS = 0, FP32_ROWS = 1, INT8 = 2, INT4 = 3 };
#define COLUMNS_A_CALL 4096 /* output width of one rows_times_matrix call (its accumulator stays in cache) */
#define MAX_EXPERTS_A_TOKEN 64 /* decode_plan.MAX_EXPERTS_A_TOKEN */

typedef struct {
    int64_t format, in, out, ld, group;
    const void *weight, *scale;
    const float *bias; /* NULL: none */
} Matrix;

typedef struct { /* a SwiGLU MLP: down(silu(gate x) * up x); inter 0: none */
    int64_t inter;
    Matrix gate, up, down;
} Mlp;

typedef struct {
    int64_t mla, heads, kv_heads, head_dim; /* GQA */
    int64_t nope, rope, value, rank;        /* MLA: qk_nope / qk_rope / v head dims, kv_lora_rank */
    int64_t kv_b_ld, kv_b_row_major, slots;
    float scale;
    Matrix q, k, v, o, q_a; /* MLA: k is kv_a_proj_with_mqa, q is q_b_proj when q_a.weight is set, else q_proj */
    const float *q_norm, *k_norm, *q_a_norm, *kv_norm; /* GQA: Qwen3's per-head norms, or NULL */
    const void *kv_b;
    float *key_cache, *value_cache; /* GQA (kv_heads, slots, head_dim) each; MLA: the latent (slots, rank + rope) */
} Attention;

typedef struct {
    int64_t experts; /* 0: a dense MLP (mlp) */
    int64_t top_k, sigmoid, n_group, topk_group, norm;
    float scaling;
    const float *router, *router_bias; /* (experts, hidden) fp32 row-major; bias (experts,) or NULL */
    int64_t format, inter, group, ld_in, ld_down; /* the routed experts' weights, experts entries each: */
    const void *const *gate_up, *const *gate_up_scale, *const *down, *const *down_scale;
    Mlp mlp; /* the dense MLP, or the shared experts */
} FeedForward;

typedef struct {
    const float *input_norm, *post_norm;
    Attention attention;
    FeedForward ff;
} Layer;

typedef struct {
    int64_t layers, hidden, rope_half;
    float eps, rope_factor;
    const float *inv_freq, *norm;
    Matrix embed, lm_head; /* embed: FP32_ROWS or INT8 (rows: the token ids, hidden) */
    const Layer *layer;
} Decoder;

static int64_t max64(int64_t a, int64_t b) { return a > b ? a : b; }

/* y (out) = W x (+ bias) in the weight's format. */
static int matvec(const Matrix *m, const float *x, float *y, int threads) {
    int status = 0;
    switch (m->format) {
    case FP32_COLUMNS:
        for (int64_t j = 0; j < m->out && !status; j += COLUMNS_A_CALL) {
            const int64_t n = m->out - j < COLUMNS_A_CALL ? m->out - j : COLUMNS_A_CALL;
            status = mmwb_rows_times_matrix(x, m->in, (const float *)m->weight + j, m->ld, y + j, 1, m->in, n,
                                            threads);
        }
        break;
    case FP32_ROWS: {
        const float *w = m->weight;
        #pragma omp parallel for num_threads(threads) schedule(static) if (m->in * m->out >= (1 << 18))
        for (int64_t o = 0; o < m->out; o++) {
            const float *row = w + o * m->ld;
            float acc = 0.0f;
            #pragma omp simd reduction(+ : acc)
            for (int64_t i = 0; i < m->in; i++) acc += row[i] * x[i];
            y[o] = acc;
        }
        break;
    }
    case INT8:
        status = mmwb_int8_rows(x, 0, 1, m->in, m->weight, m->scale, m->out, y, threads);
        break;
    case INT4:
        status = mmwb_int4_rows(x, 0, 1, m->in, m->group, m->weight, m->scale, m->out, y, threads);
        break;
    default:
        status = 3;
    }
    if (!status && m->bias)
        for (int64_t j = 0; j < m->out; j++) y[j] += m->bias[j];
    return status;
}

static float silu(float g) { return g / (1.0f + expf(-g)); }

/* y (hidden) = down(silu(gate x) * up x); scratch: 2 * inter floats. */
static int mlp(const Mlp *p, const float *x, float *y, float *scratch, int threads) {
    float *gate = scratch, *up = scratch + p->inter;
    int status = matvec(&p->gate, x, gate, threads) || matvec(&p->up, x, up, threads);
    if (status) return status;
    for (int64_t j = 0; j < p->inter; j++) gate[j] = silu(gate[j]) * up[j];
    return matvec(&p->down, gate, y, threads);
}

/* out (hidden) = attention of the normed token x, written to the cache at slot; scratch as sized by
   scratch_floats. */
static int attention(const Attention *a, const float *x, const float *cos, const float *sin, int64_t slot,
                     float eps, float *out, float *scratch, int threads) {
    float *q = scratch, *k, *v, *attended;
    int status;
    if (a->mla) {
        k = q + a->heads * (a->nope + a->rope);
        attended = k + a->rank + a->rope;
        float *q_latent = attended + a->heads * a->value;
        if (a->q_a.weight) {
            status = matvec(&a->q_a, x, q_latent, threads);
            if (status) return status;
            mmwb_rms_norm(q_latent, a->q_a_norm, q_latent, 1, a->q_a.out, eps);
            status = matvec(&a->q, q_latent, q, threads);
        } else
            status = matvec(&a->q, x, q, threads);
        status = status || matvec(&a->k, x, k, threads);
        status = status || mmwb_latent_attention(q, k, a->kv_norm, eps, cos, sin, a->key_cache, a->slots, slot, NULL,
                                                 1, a->kv_b, a->kv_b_ld, a->heads, a->nope, a->rope, a->value,
                                                 a->rank, a->scale, attended, 0, (int)a->kv_b_row_major, threads);
    } else {
        const int64_t d = a->head_dim;
        k = q + a->heads * d;
        v = k + a->kv_heads * d;
        attended = v + a->kv_heads * d;
        status = matvec(&a->q, x, q, threads) || matvec(&a->k, x, k, threads) || matvec(&a->v, x, v, threads);
        if (status) return status;
        if (a->q_norm) {
            mmwb_rms_norm(q, a->q_norm, q, a->heads, d, eps);
            mmwb_rms_norm(k, a->k_norm, k, a->kv_heads, d, eps);
        }
        status = mmwb_gqa_attention(q, k, v, cos, sin, a->key_cache, a->value_cache, a->slots, slot, a->heads,
                                    a->kv_heads, d, a->scale, attended);
    }
    return status || matvec(&a->o, attended, out, threads);
}

/* out (hidden) = the feed-forward of the normed token x: a dense MLP, or routed experts plus the shared ones. */
static int feed_forward(const FeedForward *f, const float *x, int64_t hidden, float *out, float *scratch,
                        int threads) {
    if (!f->experts) return mlp(&f->mlp, x, out, scratch, threads);
    if (f->top_k > MAX_EXPERTS_A_TOKEN) return 3;
    float logits[f->experts], coef[MAX_EXPERTS_A_TOKEN];
    int64_t chosen[MAX_EXPERTS_A_TOKEN];
    const void *gate_up[MAX_EXPERTS_A_TOKEN], *gate_up_scale[MAX_EXPERTS_A_TOKEN];
    const void *down[MAX_EXPERTS_A_TOKEN], *down_scale[MAX_EXPERTS_A_TOKEN], *up[MAX_EXPERTS_A_TOKEN];
    int status = mmwb_route(x, f->router, f->router_bias, 1, hidden, f->experts, f->top_k, (int)f->sigmoid,
                            f->n_group, f->topk_group, (int)f->norm, f->scaling, logits, chosen, coef, 0);
    if (status) return status;
    for (int64_t s = 0; s < f->top_k; s++) {
        const int64_t e = chosen[s];
        gate_up[s] = f->gate_up[e], gate_up_scale[s] = f->gate_up_scale[e];
        down[s] = f->down[e], down_scale[s] = f->down_scale[e];
        up[s] = (const float *)f->gate_up[e] + f->inter; /* fp32: the up half starts inter floats into a row */
    }
    if (f->format == FP32_COLUMNS)
        status = mmwb_swiglu_sum(x, 1, hidden, f->inter, f->top_k, (const float *const *)gate_up,
                                 (const float *const *)up, f->ld_in, (const float *const *)down, f->ld_down, coef,
                                 out, threads);
    else if (f->format == INT8)
        status = mmwb_int8_experts(x, 0, hidden, f->inter, f->top_k, (const int8_t *const *)gate_up,
                                   (const float *const *)gate_up_scale, (const int8_t *const *)down,
                                   (const float *const *)down_scale, coef, out, threads);
    else if (f->format == INT4)
        status = mmwb_int4_experts(x, 0, hidden, f->inter, f->group, f->top_k, (const uint8_t *const *)gate_up,
                                   (const uint16_t *const *)gate_up_scale, (const uint8_t *const *)down,
                                   (const uint16_t *const *)down_scale, coef, out, threads);
    else
        status = 3;
    if (status || !f->mlp.inter) return status;
    float *shared = scratch;
    status = mlp(&f->mlp, x, shared, shared + hidden, threads);
    for (int64_t j = 0; j < hidden && !status; j++) out[j] += shared[j];
    return status;
}

/* Floats of scratch one layer needs at most (attention's vectors, or an MLP's two intermediate rows beside a
   hidden row). */
static int64_t scratch_floats(const Decoder *m) {
    int64_t most = 0;
    for (int64_t i = 0; i < m->layers; i++) {
        const Attention *a = &m->layer[i].attention;
        const int64_t attn = a->mla ? a->heads * (a->nope + a->rope) + a->rank + a->rope + a->heads * a->value +
                                          (a->q_a.weight ? a->q_a.out : 0)
                                    : (a->heads + 2 * a->kv_heads) * a->head_dim + a->heads * a->head_dim;
        most = max64(most, max64(attn, m->hidden + 2 * m->layer[i].ff.mlp.inter));
    }
    return most;
}

/* logits (lm_head.out) of token at RoPE position pos: embedding, every layer (each writes its cache at slot and attends
   to slots 0..slot), the final norm and the LM head. */
int mmwb_decode_token(const Decoder *m, int64_t token, int64_t slot, int64_t pos, float *logits, int threads) {
    const int64_t c = m->hidden;
    if (token < 0 || token >= m->embed.out) return 4;
    for (int64_t i = 0; i < m->layers; i++)
        if (slot < 0 || slot >= m->layer[i].attention.slots) return 4;
    float *h = malloc(sizeof(float) * (3 * c + 2 * m->rope_half + scratch_floats(m)));
    if (!h) return 1;
    float *x = h + c, *y = x + c, *cos = y + c, *sin = cos + m->rope_half, *scratch = sin + m->rope_half;
    if (m->embed.format == INT8) {
        const int8_t *row = (const int8_t *)m->embed.weight + token * m->embed.ld;
        const float scale = ((const float *)m->embed.scale)[token];
        for (int64_t j = 0; j < c; j++) h[j] = (float)row[j] * scale;
    } else
        memcpy(h, (const float *)m->embed.weight + token * m->embed.ld, sizeof(float) * c);
    for (int64_t j = 0; j < m->rope_half; j++) { /* as RotaryEmbedding: fp32 angles, scaled by the factor */
        const float angle = (float)pos * m->inv_freq[j];
        cos[j] = cosf(angle) * m->rope_factor;
        sin[j] = sinf(angle) * m->rope_factor;
    }
    int status = 0;
    for (int64_t i = 0; i < m->layers && !status; i++) {
        const Layer *l = &m->layer[i];
        mmwb_rms_norm(h, l->input_norm, x, 1, c, m->eps);
        status = attention(&l->attention, x, cos, sin, slot, m->eps, y, scratch, threads);
        if (status) break;
        for (int64_t j = 0; j < c; j++) h[j] += y[j];
        mmwb_rms_norm(h, l->post_norm, x, 1, c, m->eps);
        status = feed_forward(&l->ff, x, c, y, scratch, threads);
        for (int64_t j = 0; j < c && !status; j++) h[j] += y[j];
    }
    if (!status) {
        mmwb_rms_norm(h, m->norm, x, 1, c, m->eps);
        status = matvec(&m->lm_head, x, logits, threads);
    }
    free(h);
    return status;
}
