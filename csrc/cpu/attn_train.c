/*
 * cpu/attn_train.c - CPU kernels of the DMS training attention (SPEC.md
 * section 3, soft form; contract in dms.h), the reference the CUDA kernels
 * in cuda/attn_train.cu are tested against.
 *
 * Flash-attention structure: tiles of BQ queries x BK keys, online softmax,
 * no T x T buffer; the backward recomputes probabilities from the saved
 * log-sum-exp. Tiles are converted to float32 into per-thread scratch
 * (queries pre-multiplied by the softmax scale, keys/values transposed
 * where a product wants them so), and every product is a loop the compiler
 * vectorises over a contiguous dimension (DMS_SIMD_CLONES: AVX-512, AVX2,
 * baseline), in tiles.h. The mask pass runs only on tiles that need it:
 * a tile below the diagonal, inside the window and free of padding keys
 * goes straight from the product to the softmax.
 *
 * With bfloat16 inputs on a CPU with AVX512-BF16 the score products
 * (q k^T, and dO v^T in the backward) use vdpbf16ps on the raw bfloat16
 * tiles instead (tiles.h: exact products, float32 sums, so the same
 * numbers up to summation order, at twice the rate); everything after the
 * scores is float32 either way. DMS_BF16DOT=off (read when the library
 * loads) keeps the float32 products.
 *
 * Work split (deterministic, no atomics):
 *   forward     one task per (batch, kv head, query tile), all G query
 *               heads of the group against each key tile loaded once;
 *   backward A  one task per (batch, kv head, key tile): grad_k, grad_v and
 *               grad_y of those keys, over all G query heads;
 *   backward B  one task per (batch, kv head, query tile): grad_q of the G
 *               query heads.
 */
#include <math.h>
#include <stdlib.h>
#include <string.h>

#include "../core/internal.h"
#include "../core/scalar.h"
#include "simd_math.h"
#include "tiles.h"

/* ---- kernel choice ------------------------------------------------------ */

/* Whether score products with operand t take the bf16 path. */
static int dot_for(const dms_tensor *t)
{
    return t->dtype == DMS_BFLOAT16 && dms_cpu_bf16dot();
}

/*
 * s = a b^T for a tile of BQ rows against BK keys: from the raw bfloat16
 * rows a16 and key pairs bp (times `scale`) when a16 is set, else from the
 * float32 rows a (already scaled) and transposed keys bt.
 */
static void score_tile(const float *a, const float *bt, const uint16_t *a16,
                       const uint32_t *bp, int64_t ld, float scale, float *s)
{
#if DMS_X86_BF16DOT
    if (a16 != NULL) {
        matmul_nt_bf16(a16, bp, ld, scale, s);
        return;
    }
#else
    (void)a16;
    (void)bp;
    (void)scale;
#endif
    matmul_nt(a, bt, ld, s);
}

/* Keys [k0, k0 + kn) of t for score_tile: pairs when bp is set, else
 * transposed float32 columns. */
static void load_key_operand(const dms_tensor *t, int64_t b, int64_t h,
                             int64_t k0, int64_t kn, int64_t D, float *row,
                             float *bt, uint32_t *bp)
{
    const int64_t ld = padded_dim(D);
#if DMS_X86_BF16DOT
    if (bp != NULL) {
        load_pairs_bf16(t, b, h, k0, NULL, kn, D, ld, bp);
        return;
    }
#else
    (void)bp;
#endif
    load_cols(t, b, h, k0, kn, D, ld, row, bt);
}

/* Raw bfloat16 rows for score_tile (no-op without a destination). */
static void load_row_operand(const dms_tensor *t, int64_t b, int64_t h,
                             int64_t i0, int64_t n, int64_t D, uint16_t *dst)
{
#if DMS_X86_BF16DOT
    if (dst != NULL)
        load_rows_bf16(t, b, h, i0, NULL, n, BQ, D, padded_dim(D), dst);
#else
    (void)t, (void)b, (void)h, (void)i0, (void)n, (void)D, (void)dst;
#endif
}

/* Whether the probability products with float32 tiles of t (as their
 * second operand) run on AMX. */
static int amx_for(const dms_tensor *t)
{
    return t->dtype == DMS_BFLOAT16 && dms_cpu_amx();
}

/* out += p x for a BQ x BK tile p: on AMX from the row pairs xp of x when
 * they are there, else in float32. */
static void acc_product(const float *p, const float *x, const uint32_t *xp,
                        uint16_t *split, int64_t ld, float *out)
{
#if DMS_X86_AMX
    if (xp != NULL) {
        matmul_acc_nn_amx(p, xp, ld, split, out);
        return;
    }
#else
    (void)xp;
    (void)split;
#endif
    matmul_acc_nn(p, x, ld, out);
}

/* Scratch for the bf16 operands: NULL (unused) unless `dot`. */
static void *alloc_if(int dot, size_t bytes)
{
    return dot ? alloc_floats((bytes + sizeof(float) - 1) / sizeof(float))
               : NULL;
}

/* ---- masks ------------------------------------------------------------- */

/*
 * Per-tile facts: which keys are padding or past T, the penalty of each key
 * (logsigmoid(-y[i + 1]), 0 for the last token), which queries are padding.
 */
typedef struct tile_keys {
    int64_t k0, kn;           /* first key, keys in the tile */
    float penalty[BK];
    float hidden_bias[BK];    /* -inf for hidden keys, else 0 */
    unsigned char hidden[BK]; /* padding, or past the end   */
    int any_hidden;
} tile_keys;

/* key_padding[b, i] != 0 */
static int is_padding(const dms_attn_train_args *a, int64_t b, int64_t i)
{
    const dms_tensor *kp = a->key_padding;
    return kp && ((const uint8_t *)kp->data)[b * kp->strides[0] +
                                             i * kp->strides[1]] != 0;
}

static void load_keys(const dms_attn_train_args *a, int64_t b, int64_t h,
                      int64_t k0, tile_keys *tk)
{
    tk->k0 = k0;
    tk->kn = a->T - k0 < BK ? a->T - k0 : BK;
    tk->any_hidden = tk->kn < BK;
    for (int64_t c = 0; c < BK; ++c) {
        const int64_t i = k0 + c;
        const int hidden = c >= tk->kn || is_padding(a, b, i);
        tk->hidden[c] = (unsigned char)hidden;
        tk->hidden_bias[c] = hidden ? -INFINITY : 0.0f;
        tk->any_hidden |= hidden;
        float pen = 0.0f;
        if (a->y && !hidden && i + 1 < a->T) {
            /* logsigmoid(-y) = min(-y, 0) - log1p(exp(-|y|)) */
            float y = dms_load(a->y->data, a->y->dtype,
                               off3(a->y, b, h, i + 1));
            pen = fminf(-y, 0.0f) - log1pf(expf(-fabsf(y)));
        }
        tk->penalty[c] = pen;
    }
}

/* Whether every (query, key) pair of the tile is visible and unpenalised. */
static int tile_is_full(const dms_attn_train_args *a, int64_t q0, int64_t qn,
                        const tile_keys *tk)
{
    const int64_t k_last = tk->k0 + BK - 1, q_last = q0 + qn - 1;
    return !tk->any_hidden && k_last <= q0 &&
           (a->y == NULL || q_last - tk->k0 <= a->window);
}

/*
 * Applies causal order, hidden keys and window penalties to s (in place):
 * invisible pairs become -inf. Branch-free, so it vectorises.
 */
DMS_SIMD_CLONES
static void apply_masks(int64_t q0, int64_t k0, int64_t window,
                        const float *restrict penalty,
                        const float *restrict hidden_bias, float *restrict s)
{
    for (int r = 0; r < BQ; ++r) {
        /* Distances j - i fit in int64; compare in float-free ints. */
        const int64_t first = q0 + r - k0; /* j - i at c = 0 */
        float *row = s + r * BK;
        for (int c = 0; c < BK; ++c) {
            const int64_t dist = first - c;
            const float pen = dist > window ? penalty[c] : 0.0f;
            const float v = row[c] + pen + hidden_bias[c];
            row[c] = dist < 0 ? -INFINITY : v;
        }
    }
}

/* ---- forward ----------------------------------------------------------- */

/* Per-thread scratch: the query group, and one key tile. */
typedef struct fwd_scratch {
    query_group qg;
    float *kt, *v, *s, *row;
    uint16_t *q16; /* bf16 path: raw query rows, G x BQ x ld, else NULL */
    uint32_t *kp;  /* bf16 path: key pairs, ld / 2 x BK */
    /* AMX path (bfloat16 v, dms_cpu_amx()): value row pairs BK / 2 x ld and
     * the split probabilities 2 x BQ x BK of matmul_acc_nn_amx, else NULL. */
    uint32_t *vpairs;
    uint16_t *split;
} fwd_scratch;

/* Queries [q0, q0 + BQ) of all G query heads of kv head (b, h). */
static void forward_tile(const dms_attn_train_args *a, int64_t b, int64_t h,
                         int64_t q0, fwd_scratch *w)
{
    const int64_t D = a->D, ld = padded_dim(D), G = a->G;
    const int64_t qn = a->T - q0 < BQ ? a->T - q0 : BQ;
    start_query_group(a->q, b, h, G, q0, qn, D, a->scale, &w->qg);
    for (int64_t g = 0; g < G; ++g)
        load_row_operand(a->q, b, h * G + g, q0, qn, D,
                         w->q16 ? w->q16 + g * BQ * ld : NULL);
    const int64_t last_key = q0 + qn - 1;
    for (int64_t k0 = 0; k0 <= last_key; k0 += BK) {
        tile_keys tk;
        load_keys(a, b, h, k0, &tk);
        load_key_operand(a->k, b, h, k0, tk.kn, D, w->row, w->kt, w->kp);
        load_rows(a->v, b, h, k0, tk.kn, BK, D, ld, 1.0f, w->v);
#if DMS_X86_AMX
        if (w->vpairs != NULL)
            pack_row_pairs(w->v, BK, ld, w->vpairs);
#endif
        const int full = tile_is_full(a, q0, qn, &tk);
        for (int64_t g = 0; g < G; ++g) {
            float *o = w->qg.o + g * BQ * ld;
            score_tile(w->qg.q + g * BQ * ld, w->kt,
                       w->q16 ? w->q16 + g * BQ * ld : NULL, w->kp, ld,
                       a->scale, w->s);
            if (!full)
                apply_masks(q0, k0, a->y ? a->window : INT64_MAX, tk.penalty,
                            tk.hidden_bias, w->s);
#if DMS_X86_AMX
            if (w->vpairs != NULL)
                online_softmax_amx(w->s, BQ, w->qg.m + g * BQ, w->qg.l + g * BQ, o, ld);
            else
#endif
                online_softmax(w->s, BQ, w->qg.m + g * BQ, w->qg.l + g * BQ, o, ld);
            acc_product(w->s, w->v, w->vpairs, w->split, ld, o);
        }
    }
    unsigned char silent[BQ];
    for (int64_t r = 0; r < qn; ++r)
        silent[r] = (unsigned char)is_padding(a, b, q0 + r);
    finish_query_group(&w->qg, b, h, G, q0, qn, D, silent, a->o, a->lse);
}


void dms_attn_train_forward_cpu(const dms_attn_train_args *a,
                                int num_threads)
{
    const int64_t tiles = (a->T + BQ - 1) / BQ, G = a->G;
    const int64_t tasks = a->B * a->H * tiles, ld = padded_dim(a->D);
    const int dot = dot_for(a->q);
    (void)num_threads;
#ifdef _OPENMP
#pragma omp parallel num_threads(num_threads) if (tasks > 1)
#endif
    {
        fwd_scratch w;
        alloc_query_group(&w.qg, G, ld);
        w.kt = alloc_floats((size_t)(ld * BK));
        w.v = alloc_floats((size_t)(BK * ld));
        w.s = alloc_floats(BQ * BK);
        w.row = alloc_floats((size_t)ld);
        w.q16 = alloc_if(dot, sizeof(uint16_t) * (size_t)(G * BQ * ld));
        w.kp = alloc_if(dot, sizeof(uint32_t) * (size_t)(ld / 2 * BK));
        w.vpairs = alloc_if(amx_for(a->v), sizeof(uint32_t) * (size_t)(BK / 2 * ld));
        w.split = alloc_if(amx_for(a->v), sizeof(uint16_t) * (size_t)(2 * BQ * BK));
        /* Later query tiles (more keys) first, for balance. */
#ifdef _OPENMP
#pragma omp for schedule(dynamic, 1)
#endif
        for (int64_t task = 0; task < tasks; ++task) {
            const int64_t tile = tiles - 1 - task % tiles;
            const int64_t bh = task / tiles;
            forward_tile(a, bh / a->H, bh % a->H, tile * BQ, &w);
        }
        free_query_group(&w.qg);
        free(w.kt);
        free(w.v);
        free(w.s);
        free(w.row);
        free(w.q16);
        free(w.kp);
        free(w.vpairs);
        free(w.split);
    }
}

/* ---- backward ---------------------------------------------------------- */

/* Per-thread scratch of the backward. The query side (q, dout, lse,
 * delta) has G slots: pass B keeps a whole GQA group's queries loaded. */
typedef struct bwd_scratch {
    float *q, *dout, *lse, *delta; /* G x BQ x ld (twice), G x BQ (twice) */
    float *kt, *vt, *k, *s, *dp, *acc, *acc2, *row;
    /* bf16 path of s (q16, kp) and of dp (dout16, vp), else NULL: raw
     * rows G x BQ x ld, key pairs ld / 2 x BK. */
    uint16_t *q16, *dout16;
    uint32_t *kp, *vp;
    /* AMX path (bfloat16 k, dms_cpu_amx()): key row pairs BK / 2 x ld and
     * the split dS 4 x BQ x BK for grad_q; query or grad_o row pairs
     * BQ / 2 x ld for grad_k and grad_v (with q16, dout16). Else NULL. */
    uint32_t *kpairs, *xpairs;
    uint16_t *split;
} bwd_scratch;

/*
 * delta[b, qh, j] = grad_o[j] . o[j], the softmax-backward row term, once
 * per call into a [B, H*G, T] host buffer (every tile pair reuses it).
 */
static void compute_delta(const dms_attn_train_args *a, float *delta,
                          int num_threads)
{
    const int64_t HG = a->H * a->G, rows = a->B * HG * a->T, D = a->D;
    const int64_t ld = padded_dim(D);
    (void)num_threads;
#ifdef _OPENMP
#pragma omp parallel num_threads(num_threads) if (rows * D > 32768)
#endif
    {
        float *o = alloc_floats((size_t)ld), *g = alloc_floats((size_t)ld);
#ifdef _OPENMP
#pragma omp for schedule(static)
#endif
        for (int64_t row = 0; row < rows; ++row) {
            const int64_t j = row % a->T, bh = row / a->T;
            const int64_t b = bh / HG, qh = bh % HG;
            load_rows(a->o, b, qh, j, 1, 1, D, ld, 1.0f, o);
            load_rows(a->grad_o, b, qh, j, 1, 1, D, ld, 1.0f, g);
            float sum = 0.0f;
            for (int64_t d = 0; d < D; ++d)
                sum += o[d] * g[d];
            delta[row] = sum;
        }
        free(o);
        free(g);
    }
}

/* Query-side tile state into `slot`: scaled q, grad_o, lse (-inf for
 * padding and rows past T: probability 0, no gradient) and delta. */
static void load_query_side(const dms_attn_train_args *a, const float *delta,
                            int64_t b, int64_t qh, int64_t q0, int64_t qn,
                            bwd_scratch *w, int64_t slot)
{
    const int64_t D = a->D, ld = padded_dim(D);
    const float *drow = delta + (b * a->H * a->G + qh) * a->T;
    float *lse = w->lse + slot * BQ, *dl = w->delta + slot * BQ;
    load_rows(a->q, b, qh, q0, qn, BQ, D, ld, a->scale, w->q + slot * BQ * ld);
    load_rows(a->grad_o, b, qh, q0, qn, BQ, D, ld, 1.0f,
              w->dout + slot * BQ * ld);
    load_row_operand(a->q, b, qh, q0, qn, D,
                     w->q16 ? w->q16 + slot * BQ * ld : NULL);
    load_row_operand(a->grad_o, b, qh, q0, qn, D,
                     w->dout16 ? w->dout16 + slot * BQ * ld : NULL);
    for (int r = 0; r < BQ; ++r) {
        const int visible = r < qn && !is_padding(a, b, q0 + r);
        lse[r] = visible ? ((const float *)a->lse->data)[off3(a->lse, b, qh,
                                                               q0 + r)]
                         : -INFINITY;
        dl[r] = visible ? drow[q0 + r] : 0.0f;
    }
}

/* s (masked scores) -> P = exp(s - lse); dp -> dS = P * (dp - delta). */
DMS_SIMD_CLONES
static void softmax_grad(float *restrict s, float *restrict dp,
                         const float *restrict lse,
                         const float *restrict delta)
{
    for (int r = 0; r < BQ; ++r) {
        float *sr = s + r * BK, *dr = dp + r * BK;
        const float l = lse[r], dl = delta[r];
        for (int c = 0; c < BK; ++c) {
            /* s - lse <= 0 up to rounding; a -inf lse (padding) gives 0, a
             * NaN one (a NaN row) NaN. */
            const float x = sr[c] - l;
            const float p = exp_nonpositive(x > 0.0f ? 0.0f : x);
            const float pz = l == -INFINITY ? 0.0f : p;
            sr[c] = pz;
            dr[c] = pz * (dr[c] - dl);
        }
    }
}

#if DMS_X86_AMX
/* softmax_grad with exp_avx512 (tiles.h), for the AMX path. */
__attribute__((target("avx512f"))) static void softmax_grad_amx(float *restrict s, float *restrict dp,
                                                               const float *restrict lse,
                                                               const float *restrict delta)
{
    const __m512 zero = _mm512_setzero_ps();
    for (int r = 0; r < BQ; ++r) {
        float *sr = s + r * BK, *dr = dp + r * BK;
        const __m512 l = _mm512_set1_ps(lse[r]), dl = _mm512_set1_ps(delta[r]);
        const int silent = lse[r] == -INFINITY;
        for (int c = 0; c < BK; c += 16) {
            /* min(0, x): s - lse <= 0 up to rounding; a NaN stays NaN. */
            const __m512 x = _mm512_min_ps(zero, _mm512_sub_ps(_mm512_loadu_ps(sr + c), l));
            const __m512 p = silent ? zero : exp_avx512(x);
            _mm512_storeu_ps(sr + c, p);
            _mm512_storeu_ps(dr + c, _mm512_mul_ps(p, _mm512_sub_ps(_mm512_loadu_ps(dr + c), dl)));
        }
    }
}
#endif

/* dpen[c] += sum of dS[r][c] over the pairs beyond the window. */
DMS_SIMD_CLONES
static void window_grad(int64_t q0, int64_t k0, int64_t window,
                        const float *restrict ds, float *restrict dpen)
{
    for (int r = 0; r < BQ; ++r) {
        const int64_t first = q0 + r - k0;
        const float *row = ds + r * BK;
        for (int c = 0; c < BK; ++c)
            dpen[c] += first - c > window ? row[c] : 0.0f;
    }
}

/*
 * For the query tile in `slot` and the key tile tk (kt, vt loaded): P into
 * w->s and dS = P * (dP - delta) into w->dp.
 */
static void probs_and_dscores(const dms_attn_train_args *a, int64_t q0,
                              int64_t qn, const tile_keys *tk, bwd_scratch *w,
                              int64_t slot)
{
    const int64_t ld = padded_dim(a->D), at = slot * BQ * ld;
    score_tile(w->q + at, w->kt, w->q16 ? w->q16 + at : NULL, w->kp, ld,
               a->scale, w->s);
    if (!tile_is_full(a, q0, qn, tk))
        apply_masks(q0, tk->k0, a->y ? a->window : INT64_MAX, tk->penalty,
                    tk->hidden_bias, w->s);
    score_tile(w->dout + at, w->vt, w->dout16 ? w->dout16 + at : NULL, w->vp,
               ld, 1.0f, w->dp);
#if DMS_X86_AMX
    if (w->split != NULL) {
        softmax_grad_amx(w->s, w->dp, w->lse + slot * BQ, w->delta + slot * BQ);
        return;
    }
#endif
    softmax_grad(w->s, w->dp, w->lse + slot * BQ, w->delta + slot * BQ);
}

/* Pass A: grad_k, grad_v, grad_y for one key tile of kv head (b, h). */
static void backward_key_tile(const dms_attn_train_args *a,
                              const float *delta, int64_t b, int64_t h,
                              int64_t k0, bwd_scratch *w)
{
    const int64_t D = a->D, ld = padded_dim(D);
    tile_keys tk;
    load_keys(a, b, h, k0, &tk);
    load_key_operand(a->k, b, h, k0, tk.kn, D, w->row, w->kt, w->kp);
    load_key_operand(a->v, b, h, k0, tk.kn, D, w->row, w->vt, w->vp);
    float *dk = w->acc, *dv = w->acc2;
    memset(dk, 0, sizeof(float) * (size_t)(BK * ld));
    memset(dv, 0, sizeof(float) * (size_t)(BK * ld));
    float dpen[BK] = {0};
    for (int64_t g = 0; g < a->G; ++g) {
        const int64_t qh = h * a->G + g;
        for (int64_t q0 = (k0 / BQ) * BQ; q0 < a->T; q0 += BQ) {
            const int64_t qn = a->T - q0 < BQ ? a->T - q0 : BQ;
            load_query_side(a, delta, b, qh, q0, qn, w, 0);
            probs_and_dscores(a, q0, qn, &tk, w, 0);
#if DMS_X86_AMX
            if (w->xpairs != NULL && w->dout16 != NULL)
                matmul_acc_tn_amx(w->s, 1.0f, w->dout16, ld, w->split, w->xpairs, dv);
            else
#endif
                matmul_acc_tn(w->s, w->dout, ld, dv);
#if DMS_X86_AMX
            if (w->xpairs != NULL && w->q16 != NULL) /* raw q: the scale goes on dS */
                matmul_acc_tn_amx(w->dp, a->scale, w->q16, ld, w->split, w->xpairs, dk);
            else
#endif
                matmul_acc_tn(w->dp, w->q, ld, dk); /* q is pre-scaled */
            if (a->grad_y && q0 + qn - 1 - k0 > a->window)
                window_grad(q0, k0, a->window, w->dp, dpen);
        }
    }
    store_rows(a->grad_k, b, h, k0, tk.kn, D, ld, dk, 1.0f);
    store_rows(a->grad_v, b, h, k0, tk.kn, D, ld, dv, 1.0f);
    if (a->grad_y) {
        /* d logsigmoid(-y) / dy = -sigmoid(y); key i's penalty is y[i+1]. */
        if (k0 == 0)
            dms_store(a->grad_y->data, a->grad_y->dtype,
                      off3(a->grad_y, b, h, 0), 0.0f);
        for (int64_t c = 0; c < tk.kn && k0 + c + 1 < a->T; ++c) {
            const int64_t m = k0 + c + 1;
            float g = 0.0f;
            if (!tk.hidden[c]) {
                float y = dms_load(a->y->data, a->y->dtype,
                                   off3(a->y, b, h, m));
                g = -dms_sigmoid(y) * dpen[c];
            }
            dms_store(a->grad_y->data, a->grad_y->dtype,
                      off3(a->grad_y, b, h, m), g);
        }
    }
}

/* Pass B: grad_q for queries [q0, q0 + BQ) of all G query heads of kv head
 * (b, h); each key tile is loaded once for the group. */
static void backward_query_tile(const dms_attn_train_args *a,
                                const float *delta, int64_t b, int64_t h,
                                int64_t q0, bwd_scratch *w)
{
    const int64_t D = a->D, ld = padded_dim(D), G = a->G;
    const int64_t qn = a->T - q0 < BQ ? a->T - q0 : BQ;
    memset(w->acc, 0, sizeof(float) * (size_t)(G * BQ * ld));
    for (int64_t g = 0; g < G; ++g)
        load_query_side(a, delta, b, h * G + g, q0, qn, w, g);
    for (int64_t k0 = 0; k0 <= q0 + qn - 1; k0 += BK) {
        tile_keys tk;
        load_keys(a, b, h, k0, &tk);
        load_key_operand(a->k, b, h, k0, tk.kn, D, w->row, w->kt, w->kp);
        load_key_operand(a->v, b, h, k0, tk.kn, D, w->row, w->vt, w->vp);
        load_rows(a->k, b, h, k0, tk.kn, BK, D, ld, 1.0f, w->k);
#if DMS_X86_AMX
        if (w->kpairs != NULL)
            pack_row_pairs(w->k, BK, ld, w->kpairs);
#endif
        for (int64_t g = 0; g < G; ++g) {
            probs_and_dscores(a, q0, qn, &tk, w, g);
            acc_product(w->dp, w->k, w->kpairs, w->split, ld, w->acc + g * BQ * ld);
        }
    }
    for (int64_t g = 0; g < G; ++g)
        store_rows(a->grad_q, b, h * G + g, q0, qn, D, ld,
                   w->acc + g * BQ * ld, a->scale);
}

void dms_attn_train_backward_cpu(const dms_attn_train_args *a,
                                 int num_threads)
{
    const int64_t ld = padded_dim(a->D), G = a->G;
    const int64_t k_tiles = (a->T + BK - 1) / BK, q_tiles = (a->T + BQ - 1) / BQ;
    const int64_t tasks_a = a->B * a->H * k_tiles, tasks_b = a->B * a->H * q_tiles;
    const int dot_s = dot_for(a->q), dot_dp = dot_s && dot_for(a->grad_o);
    float *delta = alloc_floats((size_t)(a->B * a->H * G * a->T));
    compute_delta(a, delta, num_threads);
    (void)num_threads;
#ifdef _OPENMP
#pragma omp parallel num_threads(num_threads) if (tasks_a + tasks_b > 2)
#endif
    {
        bwd_scratch w;
        const size_t tile = (size_t)(BQ > BK ? BQ : BK) * (size_t)ld;
        w.q = alloc_floats(tile * (size_t)G);
        w.dout = alloc_floats(tile * (size_t)G);
        w.lse = alloc_floats((size_t)(G * BQ));
        w.delta = alloc_floats((size_t)(G * BQ));
        w.kt = alloc_floats(tile);
        w.vt = alloc_floats(tile);
        w.k = alloc_floats(tile);
        w.s = alloc_floats(BQ * BK);
        w.dp = alloc_floats(BQ * BK);
        w.acc = alloc_floats(tile * (size_t)G);
        w.acc2 = alloc_floats(tile);
        w.row = alloc_floats((size_t)ld);
        w.q16 = alloc_if(dot_s, sizeof(uint16_t) * (size_t)(G * BQ * ld));
        w.dout16 = alloc_if(dot_dp, sizeof(uint16_t) * (size_t)(G * BQ * ld));
        w.kp = alloc_if(dot_s, sizeof(uint32_t) * (size_t)(ld / 2 * BK));
        w.vp = alloc_if(dot_dp, sizeof(uint32_t) * (size_t)(ld / 2 * BK));
        w.kpairs = alloc_if(amx_for(a->k), sizeof(uint32_t) * (size_t)(BK / 2 * ld));
        w.xpairs = alloc_if(amx_for(a->k), sizeof(uint32_t) * (size_t)(BQ / 2 * ld));
        w.split = alloc_if(amx_for(a->k), sizeof(uint16_t) * (size_t)(4 * BQ * BK));
        /* Early key tiles are seen by the most queries: schedule first. */
#ifdef _OPENMP
#pragma omp for schedule(dynamic, 1) nowait
#endif
        for (int64_t task = 0; task < tasks_a; ++task) {
            const int64_t tile_i = task % k_tiles, bh = task / k_tiles;
            backward_key_tile(a, delta, bh / a->H, bh % a->H, tile_i * BK,
                              &w);
        }
#ifdef _OPENMP
#pragma omp for schedule(dynamic, 1)
#endif
        for (int64_t task = 0; task < tasks_b; ++task) {
            const int64_t tile_i = q_tiles - 1 - task % q_tiles;
            const int64_t bh = task / q_tiles;
            backward_query_tile(a, delta, bh / a->H, bh % a->H, tile_i * BQ,
                                &w);
        }
        free(w.q);
        free(w.dout);
        free(w.lse);
        free(w.delta);
        free(w.kt);
        free(w.vt);
        free(w.k);
        free(w.s);
        free(w.dp);
        free(w.acc);
        free(w.acc2);
        free(w.row);
        free(w.q16);
        free(w.dout16);
        free(w.kp);
        free(w.vp);
        free(w.kpairs);
        free(w.xpairs);
        free(w.split);
    }
    free(delta);
}
