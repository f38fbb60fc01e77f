/*
 * cpu/cache.c - CPU kernels of the paged DMS cache (SPEC.md sections 4 and
 * 5; contract in dms.h): append with delayed eviction, prefill attention
 * against the cache plus the new tokens, and decode attention over the
 * stored slots. The reference the CUDA kernels in cuda/cache.cu are tested
 * against.
 *
 * Append runs rows in order (deterministic page ids) after a dry run that
 * checks the pool and the page table can take the call, so a rejected call
 * changes nothing; the K/V copies then run in parallel. Prefill uses the
 * tiles of tiles.h (one task per (batch, kv head, query tile), G query
 * heads sharing each key tile; bfloat16 scores on vdpbf16ps where
 * dms_cpu_bf16dot() allows, as in the training attention). Decode is memory-bound: one pass over the
 * row's slots per (batch, kv head) by the kernel of decode_kernel.h (K/V
 * converted in registers straight from the pages), in the variant this
 * CPU runs best (chosen by cpuid when the library loads), rows split into
 * key ranges merged by log-sum-exp when there are fewer rows than threads.
 */
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

/* The decode kernel's x86 variants (decode_kernel.h); vdpbf16ps and its
 * cpuid test need GCC 12 or clang. */
#if (defined(__GNUC__) || defined(__clang__)) && defined(__x86_64__)
#define DK_X86 1
#include <immintrin.h>
#if defined(__clang__) || __GNUC__ >= 12
#define DK_X86_BF16 1
#else
#define DK_X86_BF16 0
#endif
#else
#define DK_X86 0
#define DK_X86_BF16 0
#endif

#include "../core/internal.h"
#include "../core/scalar.h"
#include "simd_math.h"
#include "tiles.h"

/* ---- the new tokens of a call ------------------------------------------ */

static int pad_at(const dms_cache_call *x, int64_t b, int64_t t)
{
    const dms_tensor *kp = x->key_padding;
    return kp && ((const uint8_t *)kp->data)[b * kp->strides[0] +
                                             t * kp->strides[1]] != 0;
}

static int decision_at(const dms_cache_call *x, int64_t b, int64_t h,
                       int64_t t)
{
    const dms_tensor *d = x->decisions;
    return ((const uint8_t *)d->data)[b * d->strides[0] + h * d->strides[1] +
                                      t * d->strides[2]] != 0;
}

/*
 * The call's tokens of row (b, h) in row terms: idx[k] is the k-th
 * non-padding token, flag[k] its eviction flag (the next non-padding
 * token's decision, 0 for the last), first_decision that of idx[0].
 * Returns m, the number of non-padding tokens.
 */
static int64_t row_tokens(const dms_cache_call *x, int64_t b, int64_t h,
                          int64_t *idx, unsigned char *flag,
                          int *first_decision)
{
    int64_t m = 0;
    for (int64_t t = 0; t < x->n; ++t)
        if (!pad_at(x, b, t))
            idx[m++] = t;
    for (int64_t k = 0; k < m; ++k)
        flag[k] = k + 1 < m ? (unsigned char)decision_at(x, b, h, idx[k + 1])
                            : 0;
    *first_decision = m > 0 ? decision_at(x, b, h, idx[0]) : 0;
    return m;
}

static inline int32_t limit_for(int flagged, int64_t position, int64_t w)
{
    const int64_t until = position + w + 1;
    return flagged && until < INT32_MAX ? (int32_t)until : INT32_MAX;
}

/* ---- FP8 rows (dms.h: dms_kv_format) ------------------------------------ */

/* The D elements of a row (element offset `at` of `data`, of `dtype`) as
 * FP8 codes at `codes`; returns the row's scale. */
static float fp8_store_row(const void *data, int64_t at, dms_dtype dtype,
                           int64_t D, int e5m2, uint8_t *codes)
{
    float amax = 0.0f;
    for (int64_t d = 0; d < D; ++d) {
        const float a = fabsf(dms_load(data, dtype, at + d));
        amax = a > amax || a != a ? a : amax; /* NaN wins, as torch.amax */
    }
    const float scale = dms_fp8_row_scale(amax, e5m2);
    for (int64_t d = 0; d < D; ++d)
        codes[d] = dms_fp8_quantize(dms_load(data, dtype, at + d), scale, e5m2);
    return scale;
}

/* A float32 row of D elements replaced by what FP8 pages store of it. */
static void fp8_round_row(float *row, int64_t D, int e5m2)
{
    float amax = 0.0f;
    for (int64_t d = 0; d < D; ++d) {
        const float a = fabsf(row[d]);
        amax = a > amax || a != a ? a : amax;
    }
    const float scale = dms_fp8_row_scale(amax, e5m2);
    for (int64_t d = 0; d < D; ++d)
        row[d] = dms_fp8_to_f32(dms_fp8_quantize(row[d], scale, e5m2), e5m2) *
                 scale;
}

/* ---- state check ------------------------------------------------------- */

dms_status dms_cache_check_rows_cpu(const dms_cache_view *c, int64_t ring)
{
    const int64_t w = c->w, P = c->P, slots_in_pool = c->n_pages * P;
    for (int64_t r = 0; r < c->R; ++r) {
        const int64_t slots = c->row_slots[r], seen = c->row_seen[r];
        const char *bad = NULL;
        int64_t value = 0;
        if (slots < 0 || slots > seen || slots > c->max_pages * P) {
            bad = "row_slots";
            value = slots;
        }
        for (int64_t i = 0; bad == NULL && i < (slots + P - 1) / P; ++i) {
            value = c->page_table[r * c->max_pages + i];
            if (value < 0 || value >= c->n_pages)
                bad = "page_table";
        }
        const int64_t held = seen < ring ? seen : ring;
        for (int64_t k = 0; bad == NULL && k < held; ++k) {
            value = c->window[r * (w + 1) + (seen - 1 - k) % (w + 1)];
            if (value < 0 || value >= slots_in_pool)
                bad = "window";
        }
        if (bad != NULL)
            return dms_fail(DMS_ERR_VALUE, "cache.%s: row %lld holds %lld, "
                            "which its other state does not allow (%lld "
                            "tokens seen, %lld slots, %lld pages); the cache "
                            "tensors were changed outside dms: reset the "
                            "cache", bad, (long long)r, (long long)value,
                            (long long)seen, (long long)slots,
                            (long long)c->n_pages);
    }
    return DMS_OK;
}

/* ---- append ------------------------------------------------------------ */

static inline int64_t slot_of(const dms_cache_view *c, int64_t r, int64_t i)
{
    return (int64_t)c->page_table[r * c->max_pages + i / c->P] * c->P +
           i % c->P;
}

/*
 * Dry run of one row: the slots the row will use after the call, from the
 * cache state and the call's flags alone (nothing is written).
 */
static int64_t slots_after(const dms_cache_view *c, int64_t r, int64_t m,
                           const unsigned char *flag, int first_decision)
{
    const int64_t seen = c->row_seen[r], w = c->w;
    int64_t slots = c->row_slots[r];
    for (int64_t k = 0; k < m; ++k) {
        const int64_t p = seen + k, leaving = p - w - 1;
        int flagged = 0;
        if (leaving >= seen)
            flagged = flag[leaving - seen];
        else if (leaving == seen - 1 && leaving >= 0)
            flagged = first_decision;
        else if (leaving >= 0)
            flagged = c->slot_limit[c->window[r * (w + 1) + p % (w + 1)]] <= p;
        slots += !flagged;
    }
    return slots;
}

dms_status dms_cache_append_cpu(const dms_cache_call *x)
{
    const dms_cache_view *c = &x->c;
    const int64_t w = c->w, P = c->P, n = x->n;
    int64_t *idx = malloc(sizeof(int64_t) * (size_t)(n ? n : 1));
    unsigned char *flag = malloc((size_t)(n ? n : 1));
    int64_t pages_needed = 0;
    dms_status status = DMS_OK;

    /* Dry run: pages the call pops, and page-table room. */
    for (int64_t r = 0; r < c->R && status == DMS_OK; ++r) {
        int first;
        const int64_t m = row_tokens(x, r / x->H, r % x->H, idx, flag, &first);
        const int64_t before = c->row_slots[r];
        const int64_t after = slots_after(c, r, m, flag, first);
        const int64_t pages_after = (after + P - 1) / P;
        if (pages_after > c->max_pages)
            status = dms_fail(DMS_ERR_POOL, "cache.page_table: row %lld needs "
                              "%lld pages, the table has room for %lld; grow "
                              "it and retry", (long long)r,
                              (long long)pages_after, (long long)c->max_pages);
        pages_needed += pages_after - (before + P - 1) / P;
    }
    if (status == DMS_OK && pages_needed > *c->free_count)
        status = dms_fail(DMS_ERR_POOL, "cache.free_pages: the call needs "
                          "%lld new pages, %d are free; grow the pool by at "
                          "least %lld pages and retry", (long long)pages_needed,
                          (int)*c->free_count,
                          (long long)(pages_needed - *c->free_count));
    if (status != DMS_OK) {
        free(idx);
        free(flag);
        return status;
    }

    /* Commit, row by row in order, so page ids are deterministic. */
    const dms_tensor *ts = x->token_slots;
    int32_t *token_slots = (int32_t *)ts->data;
    for (int64_t r = 0; r < c->R; ++r) {
        const int64_t b = r / x->H, h = r % x->H;
        int first;
        const int64_t m = row_tokens(x, b, h, idx, flag, &first);
        const int64_t seen = c->row_seen[r];
        int64_t slots = c->row_slots[r];
        int32_t *ring = c->window + r * (w + 1);
        const int64_t ts_row = b * ts->strides[0] + h * ts->strides[1];
        for (int64_t t = 0; t < n; ++t)
            token_slots[ts_row + t * ts->strides[2]] = -1;
        for (int64_t k = 0; k < m; ++k) {
            const int64_t p = seen + k;
            const int a = decision_at(x, b, h, idx[k]);
            if (p > 0) /* the decision flags the token before */
                c->slot_limit[ring[(p - 1) % (w + 1)]] = limit_for(a, p - 1, w);
            int64_t s = -1;
            if (p >= w + 1) {
                const int64_t leaving = ring[p % (w + 1)];
                if (c->slot_limit[leaving] <= p) {
                    s = leaving; /* evicted: its slot is reused */
                    const int64_t gone = p - w - 1 - seen; /* this call's? */
                    if (gone >= 0)
                        token_slots[ts_row + idx[gone] * ts->strides[2]] = -1;
                }
            }
            if (s < 0) {
                const int64_t i = slots++;
                if (i % P == 0)
                    c->page_table[r * c->max_pages + i / P] =
                        c->free_pages[--*c->free_count];
                s = slot_of(c, r, i);
            }
            ring[p % (w + 1)] = (int32_t)s;
            c->slot_limit[s] = INT32_MAX;
            token_slots[ts_row + idx[k] * ts->strides[2]] = (int32_t)s;
        }
        c->row_seen[r] = (int32_t)(seen + m);
        c->row_slots[r] = (int32_t)slots;
    }
    free(idx);
    free(flag);

    /* Copy the surviving tokens' keys and values into their slots (FP8
     * pages: quantised, with their scales). */
    const int64_t D = c->D, esize = (int64_t)dms_dtype_size(c->dtype);
    const int64_t rows = c->R * n;
#ifdef _OPENMP
#pragma omp parallel for schedule(static) if (rows * D > 65536)
#endif
    for (int64_t rt = 0; rt < rows; ++rt) {
        const int64_t r = rt / n, t = rt % n, b = r / x->H, h = r % x->H;
        const int32_t s = token_slots[b * ts->strides[0] + h * ts->strides[1] +
                                      t * ts->strides[2]];
        if (s < 0)
            continue;
        const dms_tensor *k = x->k_new, *v = x->v_new;
        if (c->fmt != DMS_KV_NATIVE) {
            const int e5m2 = c->fmt == DMS_KV_FP8_E5M2;
            c->k_scales[s] = fp8_store_row(
                k->data, b * k->strides[0] + h * k->strides[1] +
                             t * k->strides[2], c->dtype, D, e5m2,
                (uint8_t *)c->k_pages + (int64_t)s * D);
            c->v_scales[s] = fp8_store_row(
                v->data, b * v->strides[0] + h * v->strides[1] +
                             t * v->strides[2], c->dtype, D, e5m2,
                (uint8_t *)c->v_pages + (int64_t)s * D);
            continue;
        }
        memcpy((char *)c->k_pages + (int64_t)s * D * esize,
               (const char *)k->data + (b * k->strides[0] + h * k->strides[1] +
                                        t * k->strides[2]) * esize,
               (size_t)(D * esize));
        memcpy((char *)c->v_pages + (int64_t)s * D * esize,
               (const char *)v->data + (b * v->strides[0] + h * v->strides[1] +
                                        t * v->strides[2]) * esize,
               (size_t)(D * esize));
    }
    return DMS_OK;
}

/* ---- prefill attention -------------------------------------------------- */

/* Rows `slot[0..kn)` of a pool as float32 rows of length ld (zero past D and
 * past kn), converted in vector code; FP8 pools (c->fmt) are scaled by
 * `scales`. */
DMS_SIMD_CLONES
static void gather_tile(const void *pool, const dms_cache_view *c,
                        const float *scales, const int64_t *restrict slot,
                        int64_t kn, int64_t D, int64_t ld,
                        float *restrict out)
{
    const dms_dtype dtype = c->dtype;
    for (int64_t i = 0; i < BK; ++i) {
        float *o = out + i * ld;
        if (i >= kn) {
            for (int64_t d = 0; d < ld; ++d)
                o[d] = 0.0f;
            continue;
        }
        if (c->fmt != DMS_KV_NATIVE) {
            const uint8_t *src = (const uint8_t *)pool + slot[i] * D;
            const int e5m2 = c->fmt == DMS_KV_FP8_E5M2;
            const float scale = scales[slot[i]];
            for (int64_t d = 0; d < D; ++d)
                o[d] = dms_fp8_to_f32(src[d], e5m2) * scale;
        } else if (dtype == DMS_FLOAT32) {
            const float *src = (const float *)pool + slot[i] * D;
            for (int64_t d = 0; d < D; ++d)
                o[d] = src[d];
        } else if (dtype == DMS_BFLOAT16) {
            const uint16_t *src = (const uint16_t *)pool + slot[i] * D;
            for (int64_t d = 0; d < D; ++d)
                o[d] = dms_bits_float((uint32_t)src[d] << 16);
        } else {
            const uint16_t *src = (const uint16_t *)pool + slot[i] * D;
            for (int64_t d = 0; d < D; ++d)
                o[d] = dms_f16_to_f32(src[d]);
        }
        for (int64_t d = D; d < ld; ++d)
            o[d] = 0.0f;
    }
}

DMS_SIMD_CLONES
static void transpose_tile(const float *src, int64_t ld, float *dst)
{
    for (int64_t r = 0; r < BK; ++r)
        for (int64_t d = 0; d < ld; ++d)
            dst[d * BK + r] = src[r * ld + d];
}

/* A query at position qpos sees key c iff kpos[c] <= qpos < limit[c]
 * (cached keys have kpos -1: they precede every query of the call). */
DMS_SIMD_CLONES
static void mask_visible(const int64_t *restrict qpos,
                         const int64_t *restrict kpos,
                         const int64_t *restrict limit, float *restrict s)
{
    for (int r = 0; r < BQ; ++r) {
        float *row = s + r * BK;
        for (int c = 0; c < BK; ++c)
            row[c] = kpos[c] <= qpos[r] && qpos[r] < limit[c] ? row[c]
                                                               : -INFINITY;
    }
}

typedef struct prefill_scratch {
    query_group qg;          /* the G query heads of the tile            */
    float *k, *kt, *v, *s;   /* BK x ld, ld x BK, BK x ld, BQ x BK       */
    /* bfloat16 with dms_cpu_bf16dot(), else NULL: the raw query rows
     * (G x BQ x ld) and the key tile as pairs (ld / 2 x BK) for
     * matmul_nt_bf16 (tiles.h), which replaces kt. */
    uint16_t *q16;
    uint32_t *kp;
    /* With dms_cpu_amx(): the value tile as row pairs (BK / 2 x ld) and the
     * split probabilities (2 x BQ x BK) of matmul_acc_nn_amx; else NULL. */
    uint32_t *vp;
    uint16_t *split;
    /* With both: raw bfloat16 value rows (BK x ld) of the call's tokens,
     * on their way to vp; else NULL. */
    uint16_t *v16;
    int64_t *idx, *pos;      /* n: the call's non-padding tokens, positions */
    unsigned char *flag;     /* n */
} prefill_scratch;

/* Whether every query of the tile sees every key of the key tile (then the
 * mask is skipped): kpos[c] <= qpos[r] < limit[c] for all r and c. */
static int all_visible(const int64_t *qpos, const int64_t *kpos,
                       const int64_t *limit)
{
    int64_t q_min = INT64_MAX, q_max = INT64_MIN;
    int64_t k_max = INT64_MIN, limit_min = INT64_MAX;
    for (int i = 0; i < BQ; ++i) {
        q_min = qpos[i] < q_min ? qpos[i] : q_min;
        q_max = qpos[i] > q_max ? qpos[i] : q_max;
    }
    for (int i = 0; i < BK; ++i) {
        k_max = kpos[i] > k_max ? kpos[i] : k_max;
        limit_min = limit[i] < limit_min ? limit[i] : limit_min;
    }
    return k_max <= q_min && q_max < limit_min;
}

/* One key tile against the G query tiles: scores, visibility mask,
 * softmax, P.V. The keys and values are w->k and w->v, or, where `packed`,
 * already in the layouts of the bfloat16 products (w->kp, w->vp). */
static void prefill_key_tile(const dms_cache_call *x, prefill_scratch *w,
                             const int64_t *qpos, const int64_t *limit,
                             const int64_t *kpos, int packed)
{
    const int64_t ld = padded_dim(x->c.D);
    if (!packed) {
#if DMS_X86_BF16DOT
        if (w->q16 != NULL)
            pack_pairs_from_f32(w->k, ld, w->kp);
        else
#endif
            transpose_tile(w->k, ld, w->kt);
#if DMS_X86_AMX
        if (w->vp != NULL)
            pack_row_pairs(w->v, BK, ld, w->vp);
#endif
    }
    const int masked = !all_visible(qpos, kpos, limit);
    for (int64_t g = 0; g < x->G; ++g) {
        float *o = w->qg.o + g * BQ * ld;
#if DMS_X86_BF16DOT
        if (w->q16 != NULL)
            matmul_nt_bf16(w->q16 + g * BQ * ld, w->kp, ld, x->scale, w->s);
        else
#endif
            matmul_nt(w->qg.q + g * BQ * ld, w->kt, ld, w->s);
        if (masked)
            mask_visible(qpos, kpos, limit, w->s);
#if DMS_X86_AMX
        if (w->vp != NULL) {
            online_softmax_amx(w->s, BQ, w->qg.m + g * BQ, w->qg.l + g * BQ, o, ld);
            matmul_acc_nn_amx(w->s, w->vp, ld, w->split, o);
            continue;
        }
#endif
        online_softmax(w->s, BQ, w->qg.m + g * BQ, w->qg.l + g * BQ, o, ld);
        matmul_acc_nn(w->s, w->v, ld, o);
    }
}

/* Marks the key tile's entries past kn as invisible to every query. */
static void close_key_tile(int64_t kn, int64_t *kpos, int64_t *limit)
{
    for (int64_t i = kn; i < BK; ++i) {
        kpos[i] = -1;
        limit[i] = INT64_MIN;
    }
}

/* A key tile of the call's own tokens at call indices at[0..kn): their
 * bfloat16 keys and values go straight into the layouts of the AMX
 * products (no float32 round trip), others through float32 rows. */
static void prefill_own_tile(const dms_cache_call *x, prefill_scratch *w,
                             int64_t b, int64_t h, const int64_t *at,
                             int64_t kn, const int64_t *qpos,
                             const int64_t *kpos, const int64_t *limit)
{
    const int64_t D = x->c.D, ld = padded_dim(D);
    const int packed = w->v16 != NULL;
#if DMS_X86_AMX
    if (packed) {
        load_pairs_bf16(x->k_new, b, h, 0, at, kn, D, ld, w->kp);
        load_rows_bf16(x->v_new, b, h, 0, at, kn, BK, D, ld, w->v16);
        pack_row_pairs16(w->v16, BK, ld, w->vp);
    }
#endif
    if (!packed)
        for (int64_t i = 0; i < BK; ++i) {
            const int64_t t = i < kn ? at[i] : 0, n = i < kn ? 1 : 0;
            load_rows(x->k_new, b, h, t, n, 1, D, ld, 1.0f, w->k + i * ld);
            load_rows(x->v_new, b, h, t, n, 1, D, ld, 1.0f, w->v + i * ld);
        }
    for (int64_t i = 0; i < kn && x->c.fmt != DMS_KV_NATIVE; ++i) {
        fp8_round_row(w->k + i * ld, D, x->c.fmt == DMS_KV_FP8_E5M2);
        fp8_round_row(w->v + i * ld, D, x->c.fmt == DMS_KV_FP8_E5M2);
    }
    prefill_key_tile(x, w, qpos, limit, kpos, packed);
}

/*
 * Queries [q0, q0 + BQ) (call indices) of the G query heads of row (b, h)
 * against the cached slots and the call's tokens.
 */
static void prefill_tile(const dms_cache_call *x, int64_t b, int64_t h,
                         int64_t q0, prefill_scratch *w)
{
    const dms_cache_view *c = &x->c;
    const int64_t D = c->D, ld = padded_dim(D), G = x->G, r = b * x->H + h;
    const int64_t qn = x->n - q0 < BQ ? x->n - q0 : BQ;
    const int64_t seen = c->row_seen[r], slots = c->row_slots[r];
    int first;
    const int64_t m = row_tokens(x, b, h, w->idx, w->flag, &first);
    /* Row positions of the call's tokens (-1: padding). */
    for (int64_t t = 0, k = 0; t < x->n; ++t)
        w->pos[t] = (k < m && w->idx[k] == t) ? seen + k++ : -1;
    int64_t qpos[BQ];
    for (int64_t j = 0; j < BQ; ++j)
        qpos[j] = j < qn && w->pos[q0 + j] >= 0 ? w->pos[q0 + j] : -1;
    /* The tile's first and last query positions: a key whose limit is at
     * or before the first is invisible to every query of the tile and is
     * left out of the key tiles (what the cache's chunked prefill gets by
     * freeing evicted slots). Only padding queries (q_last -1): no key
     * tiles at all. */
    int64_t q_first = INT64_MAX, q_last = -1;
    for (int64_t j = 0; j < qn; ++j)
        if (qpos[j] >= 0) {
            q_first = qpos[j] < q_first ? qpos[j] : q_first;
            q_last = qpos[j] > q_last ? qpos[j] : q_last;
        }

    start_query_group(x->q, b, h, G, q0, qn, D, x->scale, &w->qg);
#if DMS_X86_BF16DOT
    for (int64_t g = 0; g < G && w->q16 != NULL; ++g)
        load_rows_bf16(x->q, b, h * G + g, q0, NULL, qn, BQ, D, ld,
                       w->q16 + g * BQ * ld);
#endif
    int64_t at[BK], limit[BK], kpos[BK];
    int64_t kn = 0;

    /* The cached slots the tile sees; the last cached token's flag is this
     * call's first decision. Cached keys precede every query of the call
     * (kpos -1). */
    const int64_t last_slot =
        seen > 0 ? c->window[r * (c->w + 1) + (seen - 1) % (c->w + 1)] : -1;
    for (int64_t i = 0; i < slots && q_last >= 0; ++i) {
        const int64_t s = slot_of(c, r, i);
        const int64_t lim = s == last_slot ? limit_for(first, seen - 1, c->w)
                                           : c->slot_limit[s];
        if (lim > q_first) {
            at[kn] = s;
            kpos[kn] = -1;
            limit[kn++] = lim;
        }
        if (kn == BK || (i + 1 == slots && kn > 0)) {
            close_key_tile(kn, kpos, limit);
            gather_tile(c->k_pages, c, c->k_scales, at, kn, D, ld, w->k);
            gather_tile(c->v_pages, c, c->v_scales, at, kn, D, ld, w->v);
            prefill_key_tile(x, w, qpos, limit, kpos, 0);
            kn = 0;
        }
    }

    /* The call's own tokens up to the tile's last query, with the hard rule
     * of SPEC section 3: the key at position p is visible to positions
     * [p, limit). */
    for (int64_t k = 0; k < m && w->idx[k] < q0 + qn && q_last >= 0; ++k) {
        const int64_t p = seen + k;
        const int64_t lim = limit_for(w->flag[k], p, c->w);
        if (lim > q_first) {
            at[kn] = w->idx[k];
            kpos[kn] = p;
            limit[kn++] = lim;
        }
        if (kn == BK || ((k + 1 == m || w->idx[k + 1] >= q0 + qn) && kn > 0)) {
            close_key_tile(kn, kpos, limit);
            prefill_own_tile(x, w, b, h, at, kn, qpos, kpos, limit);
            kn = 0;
        }
    }

    unsigned char silent[BQ];
    for (int64_t j = 0; j < qn; ++j)
        silent[j] = qpos[j] < 0;
    finish_query_group(&w->qg, b, h, G, q0, qn, D, silent, x->o, x->lse);
}

void dms_attn_prefill_cpu(const dms_cache_call *x, int num_threads)
{
    const int64_t tiles = (x->n + BQ - 1) / BQ, G = x->G;
    const int64_t tasks = x->B * x->H * tiles, ld = padded_dim(x->c.D);
    (void)num_threads;
#ifdef _OPENMP
#pragma omp parallel num_threads(num_threads) if (tasks > 1)
#endif
    {
        prefill_scratch w;
        alloc_query_group(&w.qg, G, ld);
        w.k = alloc_floats((size_t)(BK * ld));
        w.kt = alloc_floats((size_t)(ld * BK));
        w.v = alloc_floats((size_t)(BK * ld));
        w.s = alloc_floats(BQ * BK);
        w.idx = malloc(sizeof(int64_t) * (size_t)x->n);
        w.pos = malloc(sizeof(int64_t) * (size_t)x->n);
        w.flag = malloc((size_t)x->n);
        w.q16 = NULL;
        w.kp = NULL;
        w.vp = NULL;
        w.split = NULL;
        w.v16 = NULL;
        /* Tiles of FP8 pages (fp8 * scale) are not bfloat16: float32. */
        const int bf16_tiles =
            x->c.dtype == DMS_BFLOAT16 && x->c.fmt == DMS_KV_NATIVE;
        if (bf16_tiles && dms_cpu_bf16dot()) {
            w.q16 = (uint16_t *)alloc_floats((size_t)(G * BQ * ld / 2));
            w.kp = (uint32_t *)alloc_floats((size_t)(ld / 2 * BK));
        }
        if (bf16_tiles && dms_cpu_amx()) {
            w.vp = (uint32_t *)alloc_floats((size_t)(BK / 2 * ld));
            w.split = (uint16_t *)alloc_floats(BQ * BK);
            if (w.kp != NULL)
                w.v16 = (uint16_t *)alloc_floats((size_t)(BK * ld / 2));
        }
#ifdef _OPENMP
#pragma omp for schedule(dynamic, 1)
#endif
        for (int64_t task = 0; task < tasks; ++task) {
            const int64_t tile = tiles - 1 - task % tiles, bh = task / tiles;
            prefill_tile(x, bh / x->H, bh % x->H, tile * BQ, &w);
        }
        free_query_group(&w.qg);
        free(w.k);
        free(w.kt);
        free(w.v);
        free(w.s);
        free(w.idx);
        free(w.pos);
        free(w.flag);
        free(w.q16);
        free(w.kp);
        free(w.vp);
        free(w.split);
        free(w.v16);
    }
}

/* ---- decode attention --------------------------------------------------- */

/* The variants of decode_kernel.h, in order of preference. */
#define DK_BASELINE 0
#define DK_AVX2 1
#define DK_AVX512 2
#define DK_AVX512BF16 3

/* W-lane vectors of the decode kernels (W = 16, 8, 4). */
#define DK_VECTORS(W)                                                     \
    typedef float dk_vf_##W __attribute__((vector_size(4 * W)));          \
    typedef int32_t dk_vi_##W __attribute__((vector_size(4 * W)));        \
    typedef uint32_t dk_vu_##W __attribute__((vector_size(4 * W)));       \
    typedef uint16_t dk_vh_##W __attribute__((vector_size(2 * W)));      \
    typedef uint8_t dk_vb_##W __attribute__((vector_size(W)));
DK_VECTORS(16)
DK_VECTORS(8)
DK_VECTORS(4)

/* Floats of per-thread scratch decode_range needs for G heads of padded
 * head dim ld (a multiple of 32): the queries, and per group of 4 heads a
 * 64-slot block of score vectors (64 x 4 floats) and the running max and
 * sum (a 16-float vector each, 64-byte aligned). */
static int64_t decode_scratch_floats(int64_t G, int64_t ld)
{
    return G * ld + (G + 3) / 4 * (64 * 4 + 2 * 16);
}

/* bfloat16 of each FP8 magnitude code ([0]: E4M3, [1]: E5M2), and its low
 * and high bytes, for the AVX-512 kernels' in-register widening
 * (decode_kernel.h: fp8_bf16); byte indices that interleave two byte
 * vectors into words (a0 b0 a1 b1 ...: vpermi2b's index 64 + j is b's j). */
static uint16_t dk_fp8_bf16[2][128];
static uint8_t dk_fp8_bf16_bytes[2][2][128];
static uint8_t dk_interleave_bytes[64];

__attribute__((constructor)) static void fill_fp8_tables(void)
{
    for (int e5m2 = 0; e5m2 < 2; ++e5m2)
        for (int c = 0; c < 128; ++c) {
            const uint16_t b = dms_f32_to_bf16(dms_fp8_to_f32((uint8_t)c, e5m2));
            dk_fp8_bf16[e5m2][c] = b;
            dk_fp8_bf16_bytes[e5m2][0][c] = (uint8_t)(b & 0xff);
            dk_fp8_bf16_bytes[e5m2][1][c] = (uint8_t)(b >> 8);
        }
    for (int j = 0; j < 32; ++j) {
        dk_interleave_bytes[2 * j] = (uint8_t)j;
        dk_interleave_bytes[2 * j + 1] = (uint8_t)(64 + j);
    }
}

#define DK_ISA DK_BASELINE
#define DK_SUFFIX baseline
#include "decode_kernel.h"
#undef DK_ISA
#undef DK_SUFFIX
#if DK_X86
#define DK_ISA DK_AVX2
#define DK_SUFFIX avx2
#include "decode_kernel.h"
#undef DK_ISA
#undef DK_SUFFIX
#define DK_ISA DK_AVX512
#define DK_SUFFIX avx512
#include "decode_kernel.h"
#undef DK_ISA
#undef DK_SUFFIX
#if DK_X86_BF16
#define DK_ISA DK_AVX512BF16
#define DK_SUFFIX avx512bf16
#include "decode_kernel.h"
#undef DK_ISA
#undef DK_SUFFIX
#endif
#endif

typedef void (*decode_range_fn)(const dms_cache_view *c, int64_t r,
                                int64_t i0, int64_t i1, int64_t G,
                                float scale, const void *q_data,
                                int64_t q_off, int64_t q_stride,
                                float *scratch, float *acc, float *m,
                                float *l);

static const char *const decode_kernel_names[] = {"baseline", "avx2",
                                                  "avx512", "avx512bf16"};

static decode_range_fn decode_kernel_fn(int isa)
{
    switch (isa) {
#if DK_X86
    case DK_AVX2: return decode_range_avx2;
    case DK_AVX512: return decode_range_avx512;
#if DK_X86_BF16
    case DK_AVX512BF16: return decode_range_avx512bf16;
#endif
#endif
    default: return decode_range_baseline;
    }
}

/* Whether this build and this CPU can run variant `isa`. */
static int decode_kernel_supported(int isa)
{
    if (isa == DK_BASELINE)
        return 1;
#if DK_X86
    __builtin_cpu_init();
    const int avx2 = __builtin_cpu_supports("avx2") &&
                     __builtin_cpu_supports("fma") &&
                     __builtin_cpu_supports("f16c");
    const int avx512 = avx2 && __builtin_cpu_supports("avx512f") &&
                       __builtin_cpu_supports("avx512bw") &&
                       __builtin_cpu_supports("avx512vl") &&
                       __builtin_cpu_supports("avx512dq");
    switch (isa) {
    case DK_AVX2: return avx2;
    case DK_AVX512: return avx512;
#if DK_X86_BF16
    /* VBMI too (its byte permutes widen FP8 pages): Sapphire Rapids and
     * later, Zen 4; Cooper Lake (BF16 without VBMI) runs avx512. */
    case DK_AVX512BF16: return avx512 && __builtin_cpu_supports("avx512bf16") &&
                               __builtin_cpu_supports("avx512vbmi");
#endif
    default: return 0;
    }
#else
    return 0;
#endif
}

/*
 * The variant decode runs, fixed when the library loads: the best this CPU
 * supports, or the one DMS_DECODE_KERNEL names ("auto" = the best). A name
 * that is unknown or unsupported here is kept (decode_kernel = -1) and
 * every decode call fails with a message saying so.
 */
static int decode_kernel = DK_BASELINE;
static char decode_kernel_request[32];

__attribute__((constructor)) static void choose_decode_kernel(void)
{
    int best = DK_BASELINE;
    for (int isa = DK_AVX512BF16; isa > DK_BASELINE; --isa)
        if (decode_kernel_supported(isa)) {
            best = isa;
            break;
        }
    decode_kernel = best;
    const char *want = getenv("DMS_DECODE_KERNEL");
    if (want == NULL || *want == '\0' || strcmp(want, "auto") == 0)
        return;
    snprintf(decode_kernel_request, sizeof decode_kernel_request, "%s", want);
    decode_kernel = -1;
    for (int isa = 0; isa <= DK_AVX512BF16; ++isa)
        if (strcmp(want, decode_kernel_names[isa]) == 0 &&
            decode_kernel_supported(isa))
            decode_kernel = isa;
}

const char *dms_attn_decode_cpu_kernel(void)
{
    return decode_kernel < 0 ? "invalid DMS_DECODE_KERNEL"
                             : decode_kernel_names[decode_kernel];
}

int dms_attn_decode_cpu_use(const char *name)
{
    for (int isa = 0; isa <= DK_AVX512BF16; ++isa)
        if (strcmp(name, decode_kernel_names[isa]) == 0 &&
            decode_kernel_supported(isa)) {
            decode_kernel = isa;
            return 1;
        }
    return 0;
}

dms_status dms_attn_decode_cpu(const dms_cache_call *x, int num_threads)
{
    if (decode_kernel < 0)
        return dms_fail(DMS_ERR_VALUE, "DMS_DECODE_KERNEL: expected auto, "
                        "baseline, avx2, avx512 or avx512bf16 (one this CPU "
                        "supports), got '%s'", decode_kernel_request);
    const int isa = decode_kernel;
    const decode_range_fn range = decode_kernel_fn(isa);
    const dms_cache_view *c = &x->c;
    const int64_t G = x->G, D = c->D, R = c->R, ld = padded_dim(D);
    /* Enough key ranges for every thread, each at least 256 slots. */
    int64_t max_slots = 0;
    for (int64_t r = 0; r < R; ++r)
        max_slots = c->row_slots[r] > max_slots ? c->row_slots[r] : max_slots;
    int64_t splits = (2 * (int64_t)num_threads + R - 1) / R;
    const int64_t by_size = (max_slots + 255) / 256;
    splits = splits < by_size ? splits : by_size;
    splits = splits < 1 ? 1 : splits;
    /* Partial results per (row, split): acc (G x ld), m (G), l (G). */
    const int64_t part_size = G * (ld + 2);
    float *part = alloc_floats((size_t)(R * splits * part_size));
    (void)num_threads;
#ifdef _OPENMP
#pragma omp parallel num_threads(num_threads) if (R * splits > 1)
#endif
    {
        float *scratch = alloc_floats((size_t)decode_scratch_floats(G, ld));
#ifdef _OPENMP
#pragma omp for schedule(dynamic, 1)
#endif
        for (int64_t task = 0; task < R * splits; ++task) {
            const int64_t r = task / splits, sp = task % splits;
            const int64_t b = r / x->H, h = r % x->H, n = c->row_slots[r];
            const int64_t i0 = n * sp / splits, i1 = n * (sp + 1) / splits;
            const dms_tensor *t = x->q;
            float *base = part + task * part_size;
            range(c, r, i0, i1, G, x->scale, t->data,
                  b * t->strides[0] + h * G * t->strides[1], t->strides[1],
                  scratch, base, base + G * ld, base + G * ld + G);
        }
        free(scratch);
    }
    /* Merge the splits by log-sum-exp; write o and lse. */
    float *lse = (float *)x->lse->data;
    float *out = alloc_floats((size_t)ld);
    for (int64_t r = 0; r < R; ++r) {
        const int64_t b = r / x->H, h = r % x->H;
        for (int64_t g = 0; g < G; ++g) {
            float mx = -INFINITY;
            for (int64_t sp = 0; sp < splits; ++sp) {
                const float *base = part + (r * splits + sp) * part_size;
                mx = base[G * ld + g] > mx ? base[G * ld + g] : mx;
            }
            float l = 0.0f;
            for (int64_t d = 0; d < ld; ++d)
                out[d] = 0.0f;
            for (int64_t sp = 0; sp < splits && mx > -INFINITY; ++sp) {
                const float *base = part + (r * splits + sp) * part_size;
                const float wgt = exp_nonpositive(base[G * ld + g] - mx);
                l += wgt * base[G * ld + G + g];
                for (int64_t d = 0; d < ld; ++d)
                    out[d] += wgt * base[g * ld + d];
            }
            const int64_t qh = h * G + g;
            const int64_t at = b * x->lse->strides[0] + qh * x->lse->strides[1];
            if (l == 0.0f) {
                /* An empty row sees nothing: 0 and -inf. A stored row sees
                 * at least the query's own token, so a zero sum there means
                 * all its scores were NaN: NaN, as PyTorch's attention. */
                const float fill = c->row_slots[r] > 0 ? NAN : 0.0f;
                for (int64_t d = 0; d < ld; ++d)
                    out[d] = fill;
                lse[at] = c->row_slots[r] > 0 ? NAN : -INFINITY;
            } else {
                for (int64_t d = 0; d < ld; ++d)
                    out[d] /= l;
                lse[at] = mx + logf(l);
            }
            store_rows(x->o, b, qh, 0, 1, D, ld, out, 1.0f);
        }
    }
    free(out);
    free(part);
    return DMS_OK;
}
