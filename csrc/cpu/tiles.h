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
DMS_SIMD_CLONES
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

DMS_SIMD_CLONES
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

/* Rows [i0, i0 + n) of a bfloat16 tensor (rows at[0..n) where `at` is not
 * NULL) as raw rows of length ld, zero past D and for rows >= n (of
 * `rows`). */
DMS_TILE_FN void load_rows_bf16(const dms_tensor *t, int64_t b, int64_t h,
                                int64_t i0, const int64_t *at, int64_t n,
                                int64_t rows, int64_t D, int64_t ld,
                                uint16_t *dst)
{
    for (int64_t r = 0; r < rows; ++r) {
        uint16_t *out = dst + r * ld;
        int64_t d = 0;
        if (r < n) {
            const int64_t i = at != NULL ? at[r] : i0 + r;
            memcpy(out, (const uint16_t *)t->data + off4(t, b, h, i),
                   sizeof(uint16_t) * (size_t)D);
            d = D;
        }
        memset(out + d, 0, sizeof(uint16_t) * (size_t)(ld - d));
    }
}

/* Keys [i0, i0 + n) of a bfloat16 tensor (keys at[0..n) where `at` is not
 * NULL) as pairs: dst[e * BK + c]. */
DMS_TILE_FN void load_pairs_bf16(const dms_tensor *t, int64_t b, int64_t h,
                                 int64_t i0, const int64_t *at, int64_t n,
                                 int64_t D, int64_t ld, uint32_t *dst)
{
    memset(dst, 0, sizeof(uint32_t) * (size_t)(ld / 2 * BK));
    for (int64_t c = 0; c < n; ++c) {
        const int64_t i = at != NULL ? at[c] : i0 + c;
        const uint16_t *src = (const uint16_t *)t->data + off4(t, b, h, i);
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
static void matmul_nt_bf16_dot(const uint16_t *restrict a,
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

/* ---- AMX tile products -------------------------------------------- */

/*
 * With AMX (dms_cpu_amx()) the same products run on the tile unit: eight
 * tile registers of 16 rows x 64 bytes, tdpbf16ps multiplying a 16 x 32
 * bfloat16 tile by a 16 x (16 pairs) tile into 16 x 16 float32. The score
 * product takes exactly the operands of matmul_nt_bf16_dot (raw rows, key
 * pairs) and is exact in the same way. The probability products
 * (out += p v, p a float32 tile) take the other operand as pairs of rows,
 * dst[(c / 2) * ld + d] = (x[c][d], x[c + 1][d]), from a tensor whose values
 * are bfloat16 (so the pairs are exact), and split p into two bfloat16
 * halves, p = hi + lo with hi the truncation: both products are exact in
 * float32 and hi + lo keeps 16 significant bits of p, an error below 2^-16
 * of each term (float32 keeps 24; the bfloat16 inputs themselves 8).
 * Every function configures the tiles itself and releases them.
 */
#if DMS_X86_AMX
#define DMS_AMX_FN __attribute__((target("amx-tile,amx-bf16,avx512f,avx512bf16"), unused)) static

typedef struct amx_config {
    uint8_t palette, start_row, reserved[14];
    uint16_t colsb[16];
    uint8_t rows[16];
} amx_config;

/* Tiles 0..7, each 16 rows of 64 bytes. */
DMS_AMX_FN void amx_start(void)
{
    amx_config cfg;
    memset(&cfg, 0, sizeof cfg);
    cfg.palette = 1;
    for (int t = 0; t < 8; ++t) {
        cfg.colsb[t] = 64;
        cfg.rows[t] = 16;
    }
    _tile_loadconfig(&cfg);
}

/* matmul_nt_bf16_dot on tiles: 2 x 2 accumulator tiles of 16 x 16 per
 * 32 x 32 block of s, then the scale. */
DMS_AMX_FN void matmul_nt_amx(const uint16_t *restrict a,
                              const uint32_t *restrict bt, int64_t ld,
                              float scale, float *restrict s)
{
    amx_start();
    const size_t sa = (size_t)ld * 2, sb = BK * 4, ss = BK * 4;
    for (int r = 0; r < BQ; r += 32)
        for (int c = 0; c < BK; c += 32) {
            _tile_zero(0);
            _tile_zero(1);
            _tile_zero(2);
            _tile_zero(3);
            for (int64_t e = 0; e < ld / 2; e += 16) {
                _tile_loadd(4, a + r * ld + 2 * e, sa);
                _tile_loadd(5, a + (r + 16) * ld + 2 * e, sa);
                _tile_loadd(6, bt + e * BK + c, sb);
                _tile_loadd(7, bt + e * BK + c + 16, sb);
                _tile_dpbf16ps(0, 4, 6);
                _tile_dpbf16ps(1, 4, 7);
                _tile_dpbf16ps(2, 5, 6);
                _tile_dpbf16ps(3, 5, 7);
            }
            _tile_stored(0, s + r * BK + c, ss);
            _tile_stored(1, s + r * BK + c + 16, ss);
            _tile_stored(2, s + (r + 16) * BK + c, ss);
            _tile_stored(3, s + (r + 16) * BK + c + 16, ss);
        }
    _tile_release();
    const __m512 sc = _mm512_set1_ps(scale);
    for (int i = 0; i < BQ * BK; i += 16)
        _mm512_storeu_ps(s + i, _mm512_mul_ps(_mm512_loadu_ps(s + i), sc));
}

/* hi[i], lo[i]: p[i] as the sum of two bfloat16 (hi truncated), n % 16 == 0. */
DMS_AMX_FN void split_bf16(const float *restrict p, int64_t n,
                           uint16_t *restrict hi, uint16_t *restrict lo)
{
    const __m512i top = _mm512_set1_epi32((int)0xffff0000u);
    for (int64_t i = 0; i < n; i += 16) {
        const __m512 x = _mm512_loadu_ps(p + i);
        const __m512i h = _mm512_and_si512(_mm512_castps_si512(x), top);
        const __m512 rest = _mm512_sub_ps(x, _mm512_castsi512_ps(h));
        _mm256_storeu_si256((__m256i *)(hi + i),
                            _mm512_cvtepi32_epi16(_mm512_srli_epi32(h, 16)));
        const __m256bh l = _mm512_cvtneps_pbh(rest);
        memcpy(lo + i, &l, sizeof l);
    }
}

/* Pairs of rows of a float32 tile src (rows x ld) whose values are
 * bfloat16: dst[(c / 2) * ld + d] = (src[c][d], src[c + 1][d]); rows even. */
DMS_AMX_FN void pack_row_pairs(const float *restrict src, int64_t rows,
                               int64_t ld, uint32_t *restrict dst)
{
    for (int64_t c = 0; c < rows; c += 2)
        for (int64_t d = 0; d < ld; d += 16) {
            const __m512i x0 = _mm512_srli_epi32(_mm512_loadu_si512(src + c * ld + d), 16);
            const __m512i x1 = _mm512_loadu_si512(src + (c + 1) * ld + d);
            const __m512i both = _mm512_or_si512(
                x0, _mm512_and_si512(x1, _mm512_set1_epi32((int)0xffff0000u)));
            _mm512_storeu_si512(dst + (c / 2) * ld + d, both);
        }
}

/* out[r][:] += sum_c (hi + lo)[r][c] * x[c][:] for r, c < 64: hi, lo
 * 64 x 64 bfloat16, x as row pairs ([32][ld]). */
DMS_AMX_FN void acc_split_amx(const uint16_t *restrict hi,
                              const uint16_t *restrict lo,
                              const uint32_t *restrict xp, int64_t ld,
                              float *restrict out)
{
    amx_start();
    const size_t so = (size_t)ld * 4, sp = 64 * 2, sx = (size_t)ld * 4;
    for (int r = 0; r < 64; r += 16)
        for (int64_t d = 0; d < ld; d += 32) {
            _tile_loadd(0, out + r * ld + d, so);
            _tile_loadd(1, out + r * ld + d + 16, so);
            for (int c = 0; c < 64; c += 32) {
                _tile_loadd(4, hi + r * 64 + c, sp);
                _tile_loadd(5, lo + r * 64 + c, sp);
                _tile_loadd(6, xp + (c / 2) * ld + d, sx);
                _tile_loadd(7, xp + (c / 2) * ld + d + 16, sx);
                _tile_dpbf16ps(0, 4, 6);
                _tile_dpbf16ps(1, 4, 7);
                _tile_dpbf16ps(0, 5, 6);
                _tile_dpbf16ps(1, 5, 7);
            }
            _tile_stored(0, out + r * ld + d, so);
            _tile_stored(1, out + r * ld + d + 16, so);
        }
    _tile_release();
}

/* out[r][:] += sum_c p[r][c] * x[c][:] for r < BQ, c < BK: p float32
 * (BQ x BK, split as above into hi, lo: 2 x BQ x BK scratch), x as row
 * pairs (pack_row_pairs of a BK x ld tile). */
DMS_AMX_FN void matmul_acc_nn_amx(const float *restrict p,
                                  const uint32_t *restrict xp, int64_t ld,
                                  uint16_t *restrict split,
                                  float *restrict out)
{
    uint16_t *hi = split, *lo = split + BQ * BK;
    split_bf16(p, BQ * BK, hi, lo);
    acc_split_amx(hi, lo, xp, ld, out);
}

/* Pairs of raw bfloat16 rows (rows x ld): dst[(r / 2) * ld + d] =
 * (src[r][d], src[r + 1][d]); rows even, ld % 16 == 0. */
DMS_AMX_FN void pack_row_pairs16(const uint16_t *restrict src, int64_t rows,
                                 int64_t ld, uint32_t *restrict dst)
{
    for (int64_t r = 0; r < rows; r += 2)
        for (int64_t d = 0; d < ld; d += 16) {
            const __m512i x0 = _mm512_cvtepu16_epi32(_mm256_loadu_si256((const __m256i *)(src + r * ld + d)));
            const __m512i x1 = _mm512_cvtepu16_epi32(_mm256_loadu_si256((const __m256i *)(src + (r + 1) * ld + d)));
            _mm512_storeu_si512(dst + (r / 2) * ld + d, _mm512_or_si512(x0, _mm512_slli_epi32(x1, 16)));
        }
}

/* dst (16 x 16, row stride ds) = the transpose of src (row stride ss). */
DMS_AMX_FN void transpose16(const float *restrict src, int64_t ss, float *restrict dst, int64_t ds)
{
    __m512 r[16], t[16];
    for (int i = 0; i < 16; ++i)
        r[i] = _mm512_loadu_ps(src + i * ss);
    for (int i = 0; i < 16; i += 2) { /* pairs of rows, interleaved per 128-bit lane */
        t[i] = _mm512_unpacklo_ps(r[i], r[i + 1]);
        t[i + 1] = _mm512_unpackhi_ps(r[i], r[i + 1]);
    }
    for (int i = 0; i < 16; i += 4) { /* 4 x 4 blocks within each lane */
        r[i] = _mm512_castpd_ps(_mm512_unpacklo_pd(_mm512_castps_pd(t[i]), _mm512_castps_pd(t[i + 2])));
        r[i + 1] = _mm512_castpd_ps(_mm512_unpackhi_pd(_mm512_castps_pd(t[i]), _mm512_castps_pd(t[i + 2])));
        r[i + 2] = _mm512_castpd_ps(_mm512_unpacklo_pd(_mm512_castps_pd(t[i + 1]), _mm512_castps_pd(t[i + 3])));
        r[i + 3] = _mm512_castpd_ps(_mm512_unpackhi_pd(_mm512_castps_pd(t[i + 1]), _mm512_castps_pd(t[i + 3])));
    }
    for (int i = 0; i < 4; ++i) { /* then the lanes themselves */
        t[i] = _mm512_shuffle_f32x4(r[i], r[i + 4], 0x88);
        t[i + 4] = _mm512_shuffle_f32x4(r[i], r[i + 4], 0xdd);
        t[i + 8] = _mm512_shuffle_f32x4(r[i + 8], r[i + 12], 0x88);
        t[i + 12] = _mm512_shuffle_f32x4(r[i + 8], r[i + 12], 0xdd);
    }
    for (int i = 0; i < 4; ++i) {
        r[i] = _mm512_shuffle_f32x4(t[i], t[i + 8], 0x88);
        r[i + 8] = _mm512_shuffle_f32x4(t[i], t[i + 8], 0xdd);
        r[i + 4] = _mm512_shuffle_f32x4(t[i + 4], t[i + 12], 0x88);
        r[i + 12] = _mm512_shuffle_f32x4(t[i + 4], t[i + 12], 0xdd);
    }
    for (int i = 0; i < 16; ++i)
        _mm512_storeu_ps(dst + i * ds, r[i]);
}

/* out[c][:] += sum_r mul * p[r][c] * x[r][:] (the transposed product of
 * matmul_acc_tn) for c < BK, r < BQ: x raw bfloat16 rows (BQ x ld);
 * scratch: 4 x BQ x BK bfloat16 (the split of the transpose, then the
 * transpose itself as BK x BQ floats) and BQ / 2 x ld pairs. */
DMS_AMX_FN void matmul_acc_tn_amx(const float *restrict p, float mul,
                                  const uint16_t *restrict x, int64_t ld,
                                  uint16_t *restrict split,
                                  uint32_t *restrict xp, float *restrict out)
{
    uint16_t *hi = split, *lo = split + BQ * BK;
    float *pt = (float *)(split + 2 * BQ * BK); /* BK x BQ */
    for (int r = 0; r < BQ; r += 16)
        for (int c = 0; c < BK; c += 16)
            transpose16(p + r * BK + c, BK, pt + c * BQ + r, BQ);
    if (mul != 1.0f) {
        const __m512 m = _mm512_set1_ps(mul);
        for (int i = 0; i < BQ * BK; i += 16)
            _mm512_storeu_ps(pt + i, _mm512_mul_ps(_mm512_loadu_ps(pt + i), m));
    }
    split_bf16(pt, BQ * BK, hi, lo);
    pack_row_pairs16(x, BQ, ld, xp);
    acc_split_amx(hi, lo, xp, ld, out);
}

/*
 * exp(x) of 16 scores x <= 0 (or -inf, or NaN) in AVX-512 registers, for the
 * AMX path where the tile products no longer hide the exps:
 * 2^(x log2 e) as 2^k 2^f, f in [-1/2, 1/2] by the Cephes exp2f polynomial
 * (about 1 ulp, as exp_nonpositive) and 2^k by vscalefps. Below 2^-125
 * (exp_nonpositive's flush point; masked scores, -inf, among them) the
 * result is exactly 0, set by a mask: letting vscalefps underflow would make
 * denormals, which cost a microcode assist each. NaN stays NaN.
 */
__attribute__((target("avx512f"), unused)) static inline __m512 exp_avx512(__m512 x)
{
    const __m512 floor_ = _mm512_set1_ps(-125.0f);
    __m512 y = _mm512_mul_ps(x, _mm512_set1_ps(1.44269504088896341f));
    const __mmask16 live = _mm512_cmp_ps_mask(y, floor_, _CMP_NLE_UQ); /* > 2^-125 or NaN */
    y = _mm512_max_ps(floor_, y); /* NaN stays NaN */
    const __m512 k = _mm512_roundscale_ps(y, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    const __m512 f = _mm512_sub_ps(y, k);
    __m512 p = _mm512_set1_ps(1.535336188319500e-4f);
    p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(1.339887440266574e-3f));
    p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(9.618437357674640e-3f));
    p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(5.550332471162809e-2f));
    p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(2.402264791363012e-1f));
    p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(6.931472028550421e-1f));
    p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(1.0f));
    return _mm512_maskz_scalef_ps(live, p, k);
}

/*
 * online_softmax (below) with exp_avx512, for the AMX path: 16 rows at a
 * time, their maxima and sums gathered by a 16 x 16 transpose instead of a
 * horizontal reduction per row, the state (m, l, the correction) updated as
 * vectors. NaN scores are left out of the max and give NaN probabilities,
 * as online_softmax does. rows % 16 == 0.
 */
DMS_AMX_FN void online_softmax_amx(float *restrict s, int64_t rows,
                                   float *restrict m, float *restrict l,
                                   float *restrict o, int64_t ld)
{
    float part[16 * 16] __attribute__((aligned(64)));
    float tpart[16 * 16] __attribute__((aligned(64)));
    float mx[16] __attribute__((aligned(64))), corr[16] __attribute__((aligned(64)));
    for (int64_t r0 = 0; r0 < rows; r0 += 16) {
        for (int i = 0; i < 16; ++i) {
            const float *row = s + (r0 + i) * BK;
            __m512 mv = _mm512_set1_ps(-INFINITY);
            for (int j = 0; j < BK / 16; ++j)
                mv = _mm512_max_ps(_mm512_loadu_ps(row + 16 * j), mv); /* a NaN keeps mv */
            _mm512_store_ps(part + 16 * i, mv);
        }
        transpose16(part, 16, tpart, 16);
        __m512 mxv = _mm512_loadu_ps(m + r0);
        for (int i = 0; i < 16; ++i)
            mxv = _mm512_max_ps(_mm512_load_ps(tpart + 16 * i), mxv);
        _mm512_store_ps(mx, mxv);
        for (int i = 0; i < 16; ++i) {
            float *row = s + (r0 + i) * BK;
            __m512 sum = _mm512_setzero_ps();
            if (mx[i] != -INFINITY) { /* else nothing visible yet: p = 0 */
                const __m512 b = _mm512_set1_ps(mx[i]);
                for (int j = 0; j < BK / 16; ++j) {
                    const __m512 p = exp_avx512(_mm512_sub_ps(_mm512_loadu_ps(row + 16 * j), b));
                    _mm512_storeu_ps(row + 16 * j, p);
                    sum = _mm512_add_ps(sum, p);
                }
            } else {
                for (int j = 0; j < BK / 16; ++j)
                    _mm512_storeu_ps(row + 16 * j, sum);
            }
            _mm512_store_ps(part + 16 * i, sum);
        }
        transpose16(part, 16, tpart, 16);
        __m512 sumv = _mm512_setzero_ps();
        for (int i = 0; i < 16; ++i)
            sumv = _mm512_add_ps(sumv, _mm512_load_ps(tpart + 16 * i));
        const __m512 mold = _mm512_loadu_ps(m + r0);
        /* Rows still at -inf keep their state (correction 1, sum 0). */
        const __mmask16 seen = _mm512_cmp_ps_mask(mxv, _mm512_set1_ps(-INFINITY), _CMP_NEQ_UQ);
        const __m512 cv = _mm512_mask_blend_ps(seen, _mm512_set1_ps(1.0f), exp_avx512(_mm512_sub_ps(mold, mxv)));
        _mm512_storeu_ps(l + r0, _mm512_fmadd_ps(_mm512_loadu_ps(l + r0), cv, sumv));
        _mm512_storeu_ps(m + r0, _mm512_mask_blend_ps(seen, mold, mxv));
        _mm512_store_ps(corr, cv);
        for (int i = 0; i < 16; ++i) {
            if (corr[i] == 1.0f)
                continue;
            float *orow = o + (r0 + i) * ld;
            const __m512 c = _mm512_set1_ps(corr[i]);
            for (int64_t d = 0; d < ld; d += 16)
                _mm512_storeu_ps(orow + d, _mm512_mul_ps(_mm512_loadu_ps(orow + d), c));
        }
    }
}
#endif


/* The score product of bfloat16 operands: on AMX where dms_cpu_amx(), else
 * on vdpbf16ps. */
__attribute__((unused)) static void matmul_nt_bf16(const uint16_t *restrict a,
                                                   const uint32_t *restrict bt,
                                                   int64_t ld, float scale,
                                                   float *restrict s)
{
#if DMS_X86_AMX
    if (dms_cpu_amx()) {
        matmul_nt_amx(a, bt, ld, scale, s);
        return;
    }
#endif
    matmul_nt_bf16_dot(a, bt, ld, scale, s);
}

/* Key pairs (dst[e * BK + c], as load_pairs_bf16 makes them) from a float32
 * key tile src (BK x ld) whose values are bfloat16 widened by load_rows or
 * a gather, so dropping each float's low half is exact. */
DMS_SIMD_CLONES
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
DMS_SIMD_CLONES
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
