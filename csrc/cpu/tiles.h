/*
 * tiles.h - the tile machinery the CPU attention kernels share (training
 * attention, cache prefill): float32 tiles of BQ queries x BK keys packed
 * from tensors of any floating dtype, register-blocked products, and the
 * online-softmax step. Static functions: each kernel file gets its own
 * copy, compiled into its SIMD clones.
 */
#ifndef DMS_CPU_TILES_H
#define DMS_CPU_TILES_H

#include <math.h>
#include <stdlib.h>
#include <string.h>

#include "../core/internal.h"
#include "../core/scalar.h"
#include "simd_math.h"

/* Not every kernel file uses every routine. */
#define DMS_TILE_FN static __attribute__((unused))

#define BQ 64 /* queries per tile */
#define BK 64 /* keys per tile    */

enum { TILE_FULL = 0, TILE_MASKED = 1 };

/* Head dim rounded up to whole accumulator blocks (DC, below). */
DMS_TILE_FN int64_t padded_dim(int64_t d)
{
    return (d + 31) & ~(int64_t)31;
}

static inline int64_t off4(const dms_tensor *t, int64_t b, int64_t h,
                           int64_t i)
{
    return b * t->strides[0] + h * t->strides[1] + i * t->strides[2];
}

static inline int64_t off3(const dms_tensor *t, int64_t b, int64_t h,
                           int64_t i)
{
    return b * t->strides[0] + h * t->strides[1] + i * t->strides[2];
}

/*
 * Rows [i0, i0 + n) of head (b, h) of a [B, heads, T, D] tensor as float32
 * rows of length ld (times `mul`), zero-filled past D and for rows >= T.
 */
DMS_TILE_FN void load_rows(const dms_tensor *t, int64_t b, int64_t h, int64_t i0,
                      int64_t n, int64_t rows, int64_t D, int64_t ld,
                      float mul, float *dst)
{
    for (int64_t r = 0; r < rows; ++r) {
        float *out = dst + r * ld;
        if (r >= n) {
            memset(out, 0, sizeof(float) * (size_t)ld);
            continue;
        }
        const int64_t base = off4(t, b, h, i0 + r);
        switch (t->dtype) {
        case DMS_FLOAT32: {
            const float *src = (const float *)t->data + base;
            for (int64_t d = 0; d < D; ++d)
                out[d] = src[d] * mul;
            break;
        }
        case DMS_BFLOAT16: {
            const uint16_t *src = (const uint16_t *)t->data + base;
            for (int64_t d = 0; d < D; ++d)
                out[d] = dms_bf16_to_f32(src[d]) * mul;
            break;
        }
        default: {
            const uint16_t *src = (const uint16_t *)t->data + base;
            for (int64_t d = 0; d < D; ++d)
                out[d] = dms_f16_to_f32(src[d]) * mul;
            break;
        }
        }
        for (int64_t d = D; d < ld; ++d)
            out[d] = 0.0f;
    }
}

/* The transpose of load_rows: dst[d * BK + r], d < ld. */
DMS_TILE_FN void load_cols(const dms_tensor *t, int64_t b, int64_t h, int64_t i0,
                      int64_t n, int64_t D, int64_t ld, float *row_buf,
                      float *dst)
{
    for (int64_t r = 0; r < BK; ++r) {
        load_rows(t, b, h, i0 + r, r < n ? 1 : 0, 1, D, ld, 1.0f, row_buf);
        for (int64_t d = 0; d < ld; ++d)
            dst[d * BK + r] = row_buf[d];
    }
}

DMS_TILE_FN void store_rows(const dms_tensor *t, int64_t b, int64_t h, int64_t i0,
                       int64_t n, int64_t D, int64_t ld, const float *src,
                       float mul)
{
    for (int64_t r = 0; r < n; ++r) {
        const int64_t base = off4(t, b, h, i0 + r);
        const float *in = src + r * ld;
        switch (t->dtype) {
        case DMS_FLOAT32: {
            float *out = (float *)t->data + base;
            for (int64_t d = 0; d < D; ++d)
                out[d] = in[d] * mul;
            break;
        }
        case DMS_BFLOAT16: {
            uint16_t *out = (uint16_t *)t->data + base;
            for (int64_t d = 0; d < D; ++d)
                out[d] = dms_f32_to_bf16(in[d] * mul);
            break;
        }
        default: {
            uint16_t *out = (uint16_t *)t->data + base;
            for (int64_t d = 0; d < D; ++d)
                out[d] = dms_f32_to_f16(in[d] * mul);
            break;
        }
        }
    }
}

/* ---- products on packed tiles ----------------------------------------- */

/*
 * The three products, register-blocked: each inner loop updates a 4 x DC
 * block of accumulators (a few vector registers in every clone) from one
 * streamed row, so loads stay well below the multiply-adds.
 */
#define DC 32 /* columns of an accumulator block; ld is a multiple */

/* s[r][c] = sum_d a[r][d] * bt[d][c] for r < BQ, c < BK (a: BQ x ld). */
DMS_SIMD_CLONES
DMS_TILE_FN void matmul_nt(const float *restrict a, const float *restrict bt,
                      int64_t ld, float *restrict s)
{
    for (int r = 0; r < BQ; r += 4) {
        for (int c0 = 0; c0 < BK; c0 += DC) {
            float acc[4][DC];
            for (int rr = 0; rr < 4; ++rr)
                for (int e = 0; e < DC; ++e)
                    acc[rr][e] = 0.0f;
            for (int64_t d = 0; d < ld; ++d) {
                const float *brow = bt + d * BK + c0;
                const float a0 = a[(r + 0) * ld + d], a1 = a[(r + 1) * ld + d];
                const float a2 = a[(r + 2) * ld + d], a3 = a[(r + 3) * ld + d];
                for (int e = 0; e < DC; ++e) {
                    acc[0][e] += a0 * brow[e];
                    acc[1][e] += a1 * brow[e];
                    acc[2][e] += a2 * brow[e];
                    acc[3][e] += a3 * brow[e];
                }
            }
            for (int rr = 0; rr < 4; ++rr)
                memcpy(s + (r + rr) * BK + c0, acc[rr], sizeof acc[rr]);
        }
    }
}

/* out[r][:] += sum_c p[r][c] * v[c][:]  (p: BQ x BK, v: BK x ld). */
DMS_SIMD_CLONES
DMS_TILE_FN void matmul_acc_nn(const float *restrict p, const float *restrict v,
                          int64_t ld, float *restrict out)
{
    for (int r = 0; r < BQ; r += 4) {
        for (int64_t d0 = 0; d0 < ld; d0 += DC) {
            float acc[4][DC];
            for (int rr = 0; rr < 4; ++rr)
                memcpy(acc[rr], out + (r + rr) * ld + d0, sizeof acc[rr]);
            for (int c = 0; c < BK; ++c) {
                const float *vr = v + c * ld + d0;
                const float p0 = p[(r + 0) * BK + c], p1 = p[(r + 1) * BK + c];
                const float p2 = p[(r + 2) * BK + c], p3 = p[(r + 3) * BK + c];
                for (int e = 0; e < DC; ++e) {
                    acc[0][e] += p0 * vr[e];
                    acc[1][e] += p1 * vr[e];
                    acc[2][e] += p2 * vr[e];
                    acc[3][e] += p3 * vr[e];
                }
            }
            for (int rr = 0; rr < 4; ++rr)
                memcpy(out + (r + rr) * ld + d0, acc[rr], sizeof acc[rr]);
        }
    }
}

/* out[c][:] += sum_r p[r][c] * x[r][:]  (p: BQ x BK, x: BQ x ld). */
DMS_SIMD_CLONES
DMS_TILE_FN void matmul_acc_tn(const float *restrict p, const float *restrict x,
                          int64_t ld, float *restrict out)
{
    for (int c = 0; c < BK; c += 4) {
        for (int64_t d0 = 0; d0 < ld; d0 += DC) {
            float acc[4][DC];
            for (int cc = 0; cc < 4; ++cc)
                memcpy(acc[cc], out + (c + cc) * ld + d0, sizeof acc[cc]);
            for (int r = 0; r < BQ; ++r) {
                const float *xr = x + r * ld + d0;
                const float *pr = p + r * BK + c;
                const float p0 = pr[0], p1 = pr[1], p2 = pr[2], p3 = pr[3];
                for (int e = 0; e < DC; ++e) {
                    acc[0][e] += p0 * xr[e];
                    acc[1][e] += p1 * xr[e];
                    acc[2][e] += p2 * xr[e];
                    acc[3][e] += p3 * xr[e];
                }
            }
            for (int cc = 0; cc < 4; ++cc)
                memcpy(out + (c + cc) * ld + d0, acc[cc], sizeof acc[cc]);
        }
    }
}

/* ---- bfloat16 products with AVX512-BF16 ------------------------------ */

/*
 * With bfloat16 inputs the two score products (s = q k^T and dp = dO v^T)
 * can run on vdpbf16ps: the product of two bfloat16 is exact in float32 and
 * the sum is float32, so this loses nothing against widening the tiles to
 * float32 first, at twice the multiply-adds per instruction. The other
 * products take a float32 probability or gradient tile and stay float32.
 * Packed layouts: the row operand as raw bfloat16 rows (BQ x ld), the key
 * operand as pairs - 32-bit lanes holding columns (2 e, 2 e + 1) of one
 * key - in [ld / 2][BK] order, zero past D and past the last key.
 */
#if DMS_X86_BF16DOT
#include <immintrin.h>

/* Rows [i0, i0 + n) of a bfloat16 tensor as raw rows of length ld, zero
 * past D and for rows >= n (of `rows`). */
DMS_TILE_FN void load_rows_bf16(const dms_tensor *t, int64_t b, int64_t h,
                                int64_t i0, int64_t n, int64_t rows,
                                int64_t D, int64_t ld, uint16_t *dst)
{
    for (int64_t r = 0; r < rows; ++r) {
        uint16_t *out = dst + r * ld;
        int64_t d = 0;
        if (r < n) {
            memcpy(out, (const uint16_t *)t->data + off4(t, b, h, i0 + r),
                   sizeof(uint16_t) * (size_t)D);
            d = D;
        }
        memset(out + d, 0, sizeof(uint16_t) * (size_t)(ld - d));
    }
}

/* Keys [i0, i0 + n) of a bfloat16 tensor as pairs: dst[e * BK + c]. */
DMS_TILE_FN void load_pairs_bf16(const dms_tensor *t, int64_t b, int64_t h,
                                 int64_t i0, int64_t n, int64_t D,
                                 int64_t ld, uint32_t *dst)
{
    memset(dst, 0, sizeof(uint32_t) * (size_t)(ld / 2 * BK));
    for (int64_t c = 0; c < n; ++c) {
        const uint16_t *src = (const uint16_t *)t->data + off4(t, b, h, i0 + c);
        for (int64_t e = 0; e < D / 2; ++e)
            dst[e * BK + c] = (uint32_t)src[2 * e] |
                              (uint32_t)src[2 * e + 1] << 16;
        if (D % 2)
            dst[D / 2 * BK + c] = src[D - 1];
    }
}

/* s[r][c] = scale * sum_d a[r][d] * b_c[d] for r < BQ, c < BK, from raw
 * rows a (BQ x ld) and key pairs bt; 4 rows x 64 keys of accumulators. */
__attribute__((target("avx512f,avx512bf16"), unused))
static void matmul_nt_bf16(const uint16_t *restrict a,
                           const uint32_t *restrict bt, int64_t ld,
                           float scale, float *restrict s)
{
    for (int r = 0; r < BQ; r += 4) {
        __m512 acc[4][BK / 16];
        for (int rr = 0; rr < 4; ++rr)
            for (int j = 0; j < BK / 16; ++j)
                acc[rr][j] = _mm512_setzero_ps();
        for (int64_t e = 0; e < ld / 2; ++e) {
            __m512bh bv[BK / 16];
            for (int j = 0; j < BK / 16; ++j)
                memcpy(&bv[j], bt + e * BK + 16 * j, sizeof bv[j]);
            for (int rr = 0; rr < 4; ++rr) {
                uint32_t pair;
                memcpy(&pair, a + (r + rr) * ld + 2 * e, sizeof pair);
                const __m512i av = _mm512_set1_epi32((int)pair);
                __m512bh ab;
                memcpy(&ab, &av, sizeof ab);
                for (int j = 0; j < BK / 16; ++j)
                    acc[rr][j] = _mm512_dpbf16_ps(acc[rr][j], ab, bv[j]);
            }
        }
        const __m512 sc = _mm512_set1_ps(scale);
        for (int rr = 0; rr < 4; ++rr)
            for (int j = 0; j < BK / 16; ++j)
                _mm512_storeu_ps(s + (r + rr) * BK + 16 * j,
                                 _mm512_mul_ps(acc[rr][j], sc));
    }
}

/* Key pairs (dst[e * BK + c], as load_pairs_bf16 makes them) from a float32
 * key tile src (BK x ld) whose values are bfloat16 widened by load_rows or
 * a gather, so dropping each float's low half is exact. */
DMS_TILE_FN void pack_pairs_from_f32(const float *src, int64_t ld,
                                     uint32_t *dst)
{
    for (int64_t c = 0; c < BK; ++c)
        for (int64_t e = 0; e < ld / 2; ++e) {
            uint32_t lo, hi;
            memcpy(&lo, src + c * ld + 2 * e, sizeof lo);
            memcpy(&hi, src + c * ld + 2 * e + 1, sizeof hi);
            dst[e * BK + c] = lo >> 16 | (hi & 0xffff0000u);
        }
}
#endif

/*
 * One step of the online softmax for `rows` rows (BQ for a query tile, G
 * at decode) against a tile of scores s (rows x BK):
 * s becomes the unnormalised probabilities exp(s - m_new), m and l (row max
 * and sum) are updated, and the accumulated output rows o are rescaled.
 * Max and sum run in 16 lanes so they vectorise without reassociation.
 */
DMS_SIMD_CLONES
DMS_TILE_FN void online_softmax(float *restrict s, int64_t rows,
                                float *restrict m, float *restrict l,
                                float *restrict o, int64_t ld)
{
    for (int64_t r = 0; r < rows; ++r) {
        float *row = s + r * BK;
        float lanes[16];
        for (int e = 0; e < 16; ++e)
            lanes[e] = -INFINITY;
        for (int c = 0; c < BK; c += 16)
            for (int e = 0; e < 16; ++e)
                lanes[e] = row[c + e] > lanes[e] ? row[c + e] : lanes[e];
        float mx = m[r];
        for (int e = 0; e < 16; ++e)
            mx = lanes[e] > mx ? lanes[e] : mx;
        if (mx == -INFINITY) { /* nothing visible yet */
            for (int c = 0; c < BK; ++c)
                row[c] = 0.0f;
            continue;
        }
        for (int e = 0; e < 16; ++e)
            lanes[e] = 0.0f;
        for (int c = 0; c < BK; c += 16)
            for (int e = 0; e < 16; ++e) {
                const float p = exp_nonpositive(row[c + e] - mx);
                row[c + e] = p;
                lanes[e] += p;
            }
        float sum = 0.0f;
        for (int e = 0; e < 16; ++e)
            sum += lanes[e];
        const float corr = exp_nonpositive(m[r] - mx);
        l[r] = l[r] * corr + sum;
        m[r] = mx;
        if (corr != 1.0f) {
            float *orow = o + r * ld;
            for (int64_t d = 0; d < ld; ++d)
                orow[d] *= corr;
        }
    }
}

/*
 * The query side of a tile task: the G query heads of one kv head, BQ
 * queries each - queries pre-scaled (G x BQ x ld), output accumulators
 * (G x BQ x ld) and the online-softmax state m, l (G x BQ).
 */
typedef struct query_group {
    float *q, *o, *m, *l;
} query_group;

/* Scratch for a group of G query tiles (host memory). */
DMS_TILE_FN void alloc_query_group(query_group *w, int64_t G, int64_t ld);
DMS_TILE_FN void free_query_group(query_group *w)
{
    free(w->q);
    free(w->o);
    free(w->m);
    free(w->l);
}

/* Loads queries [q0, q0 + qn) of heads h*G .. h*G + G - 1 of q [B, H*G, T,
 * D] and resets the softmax state. */
DMS_TILE_FN void start_query_group(const dms_tensor *q, int64_t b, int64_t h,
                                   int64_t G, int64_t q0, int64_t qn,
                                   int64_t D, float scale, query_group *w)
{
    const int64_t ld = padded_dim(D);
    for (int64_t g = 0; g < G; ++g) {
        load_rows(q, b, h * G + g, q0, qn, BQ, D, ld, scale, w->q + g * BQ * ld);
        for (int r = 0; r < BQ; ++r) {
            w->m[g * BQ + r] = -INFINITY;
            w->l[g * BQ + r] = 0.0f;
        }
    }
    memset(w->o, 0, sizeof(float) * (size_t)(G * BQ * ld));
}

/*
 * Normalises the accumulated outputs and writes o [B, H*G, T, D] and lse
 * [B, H*G, T] for queries [q0, q0 + qn). Rows with silent[r] set (padding
 * queries) get o = 0 and lse = -inf. Every other query sees at least its own
 * key, so a zero sum means its scores were all NaN (a NaN in the query, or in
 * every key it sees): its o and lse are NaN, as PyTorch's attention gives.
 */
DMS_TILE_FN void finish_query_group(const query_group *w, int64_t b,
                                    int64_t h, int64_t G, int64_t q0,
                                    int64_t qn, int64_t D,
                                    const unsigned char *silent,
                                    const dms_tensor *o,
                                    const dms_tensor *lse)
{
    const int64_t ld = padded_dim(D);
    float *lse_data = (float *)lse->data;
    for (int64_t g = 0; g < G; ++g) {
        const int64_t qh = h * G + g;
        float *acc = w->o + g * BQ * ld;
        for (int64_t r = 0; r < qn; ++r) {
            const float l = w->l[g * BQ + r];
            float *row = acc + r * ld;
            const int64_t at = off3(lse, b, qh, q0 + r);
            if (silent[r]) {
                memset(row, 0, sizeof(float) * (size_t)ld);
                lse_data[at] = -INFINITY;
                continue;
            }
            if (l == 0.0f) {
                for (int64_t d = 0; d < ld; ++d)
                    row[d] = NAN;
                lse_data[at] = NAN;
                continue;
            }
            const float inv = 1.0f / l;
            for (int64_t d = 0; d < ld; ++d)
                row[d] *= inv;
            lse_data[at] = w->m[g * BQ + r] + logf(l);
        }
        store_rows(o, b, qh, q0, qn, D, ld, acc, 1.0f);
    }
}

/* 64-byte aligned scratch of n floats (host memory, freed with free). */
DMS_TILE_FN float *alloc_floats(size_t n)
{
    size_t bytes = (sizeof(float) * n + 63) & ~(size_t)63;
    return aligned_alloc(64, bytes ? bytes : 64);
}

DMS_TILE_FN void alloc_query_group(query_group *w, int64_t G, int64_t ld)
{
    w->q = alloc_floats((size_t)(G * BQ * ld));
    w->o = alloc_floats((size_t)(G * BQ * ld));
    w->m = alloc_floats((size_t)(G * BQ));
    w->l = alloc_floats((size_t)(G * BQ));
}

#endif /* DMS_CPU_TILES_H */
