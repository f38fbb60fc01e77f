/*
 * tiles.cuh - the SIMT flash-attention tile machinery that the training
 * attention (attn_train.cu) and the cache's prefill / decode (cache.cu)
 * share: the block shape, row reductions over the 8 lanes of a micro-tile
 * row and over a warp, the micro-tile score product (tile_dot) and P.V
 * accumulation (tile_accum), row loads / stores between global tensors and
 * float32 shared-memory tiles, and the host-side helpers that size shared
 * memory and grids.
 *
 * Thread layout (tile kernels): thread t owns the micro-tile rows
 * (t / 8) + 16 a and columns (t % 8) + 8 b of a [rows x cols] score tile;
 * the eight threads that share a row are eight consecutive lanes of one
 * warp. Shared-memory tiles are float32 with an odd row stride ld (see
 * odd_ld) so that strided micro-tile reads hit distinct banks.
 *
 * Everything here is inline (templates or __forceinline__), so each .cu
 * file gets its own copy; nothing needs device linking.
 */
#ifndef DMS_CUDA_TILES_CUH
#define DMS_CUDA_TILES_CUH

#include <math.h>
#include <stdint.h>

#include "common.cuh"
#include "../core/scalar.h"

namespace dms_tiles {

constexpr int kThreads = 128; /* threads per block of the tile kernels */
constexpr int kWarps = kThreads / 32;
/*
 * Asking for 4 resident blocks caps registers at 128 per thread; without a
 * minimum ptxas settles on ~48 registers and spills in several kernels.
 */
constexpr int kMinBlocks = 4;
constexpr unsigned kFullMask = 0xffffffffu;

/* ---- reductions --------------------------------------------------------- */

/* Reductions over the 8 lanes (same t / 8) that share a micro-tile row. */
__device__ __forceinline__ float group8_max(float v)
{
    v = fmaxf(v, __shfl_xor_sync(kFullMask, v, 1));
    v = fmaxf(v, __shfl_xor_sync(kFullMask, v, 2));
    v = fmaxf(v, __shfl_xor_sync(kFullMask, v, 4));
    return v;
}

__device__ __forceinline__ float group8_sum(float v)
{
    v += __shfl_xor_sync(kFullMask, v, 1);
    v += __shfl_xor_sync(kFullMask, v, 2);
    v += __shfl_xor_sync(kFullMask, v, 4);
    return v;
}

/* Over the 32 lanes of a warp (xor 16, 8, 4, 2, 1); every lane gets it. */
__device__ __forceinline__ float warp_max(float v)
{
#pragma unroll
    for (int off = 16; off > 0; off >>= 1)
        v = fmaxf(v, __shfl_xor_sync(kFullMask, v, off));
    return v;
}

__device__ __forceinline__ float warp_sum(float v)
{
#pragma unroll
    for (int off = 16; off > 0; off >>= 1)
        v += __shfl_xor_sync(kFullMask, v, off);
    return v;
}

/* ---- micro-tile products ------------------------------------------------ */

/*
 * acc[a][b] = sum_{d < D} A[16 a][d] * Bm[8 b][d], both row-major in shared
 * memory with row stride ld; A and Bm already point at this thread's first
 * row (row t / 8 of the left tile, row t % 8 of the right tile).
 */
template <int RA, int CB>
__device__ __forceinline__ void tile_dot(const float *A, const float *Bm,
                                         int ld, int D, float (&acc)[RA][CB])
{
#pragma unroll
    for (int a = 0; a < RA; ++a)
#pragma unroll
        for (int b = 0; b < CB; ++b)
            acc[a][b] = 0.0f;
#pragma unroll 2
    for (int d = 0; d < D; ++d) {
        float av[RA], bv[CB];
#pragma unroll
        for (int a = 0; a < RA; ++a)
            av[a] = A[a * 16 * ld + d];
#pragma unroll
        for (int b = 0; b < CB; ++b)
            bv[b] = Bm[b * 8 * ld + d];
#pragma unroll
        for (int a = 0; a < RA; ++a)
#pragma unroll
            for (int b = 0; b < CB; ++b)
                acc[a][b] = fmaf(av[a], bv[b], acc[a][b]);
    }
}

/*
 * Acc[r][d] = Acc[r][d] * rowscale[a] + sum_{c < NC} P[r][c] * X[c][d]
 * for this thread's rows r = ty + 16 a and columns d = d0 + tx + 8 b of
 * every 32-wide chunk d0 of D (rowscale is ignored unless kScaleRows). P
 * has row stride NC + 1, Acc and X row stride ld. Each Acc element belongs
 * to one thread; the sum over c runs in a fixed order.
 */
template <int RA, int NC, bool kScaleRows>
__device__ __forceinline__ void tile_accum(float *Acc, int ld, const float *P,
                                           const float *X, int D, int ty,
                                           int tx, const float (&rowscale)[RA])
{
    constexpr int ldp = NC + 1;
    for (int d0 = 0; d0 < D; d0 += 32) {
        bool ok[4];
        int col[4]; /* clamped into [0, D) so reads of X stay in the row */
        float acc[RA][4];
#pragma unroll
        for (int b = 0; b < 4; ++b) {
            const int d = d0 + tx + 8 * b;
            ok[b] = d < D;
            col[b] = ok[b] ? d : D - 1;
        }
#pragma unroll
        for (int a = 0; a < RA; ++a) {
            const float *row = Acc + (ty + 16 * a) * ld;
#pragma unroll
            for (int b = 0; b < 4; ++b) {
                /* columns past D belong to nobody: never read them here */
                const float old = ok[b] ? row[col[b]] : 0.0f;
                acc[a][b] = kScaleRows ? old * rowscale[a] : old;
            }
        }
#pragma unroll 4
        for (int c = 0; c < NC; ++c) {
            float pv[RA], xv[4];
#pragma unroll
            for (int a = 0; a < RA; ++a)
                pv[a] = P[(ty + 16 * a) * ldp + c];
#pragma unroll
            for (int b = 0; b < 4; ++b)
                xv[b] = X[c * ld + col[b]];
#pragma unroll
            for (int a = 0; a < RA; ++a)
#pragma unroll
                for (int b = 0; b < 4; ++b)
                    acc[a][b] = fmaf(pv[a], xv[b], acc[a][b]);
        }
#pragma unroll
        for (int a = 0; a < RA; ++a) {
            float *row = Acc + (ty + 16 * a) * ld;
#pragma unroll
            for (int b = 0; b < 4; ++b)
                if (ok[b])
                    row[col[b]] = acc[a][b];
        }
    }
}

/* ---- rows between global tensors and shared memory ---------------------- */

/* One warp: row[d] = src[off + d] if ok, else zeros. */
__device__ __forceinline__ void load_row_or_zero(float *row, bool ok,
                                                 const DmsView3 &src,
                                                 int64_t off, int D, int lane)
{
    if (ok) {
        for (int d = lane; d < D; d += 32)
            row[d] = dms_load(src.data, src.dtype, off + d);
    } else {
        for (int d = lane; d < D; d += 32)
            row[d] = 0.0f;
    }
}

/* One warp: dst[off + d] = ok ? f * row[d] : 0 for d < D. */
__device__ __forceinline__ void store_row_scaled(const DmsView3 &dst,
                                                 int64_t off, const float *row,
                                                 float f, bool ok, int D,
                                                 int lane)
{
    for (int d = lane; d < D; d += 32)
        dms_store(dst.data, dst.dtype, off + d, ok ? f * row[d] : 0.0f);
}

/* ---- host side ---------------------------------------------------------- */

/*
 * Floats of shared memory of a forward tile kernel with BQ query rows and
 * BK keys: Qs, Os (BQ x ld), Ks, Vs (BK x ld), Ps (BQ x (BK + 1)), rinv
 * (BQ). The kernels add their own per-key / per-row extras.
 */
template <int BQ, int BK>
constexpr int64_t fwd_tile_floats(int64_t ld)
{
    return (2 * BQ + 2 * BK) * ld + BQ * (BK + 1) + BQ;
}

/* Shared-memory row stride for head dim D: odd, so no bank conflicts. */
inline int odd_ld(int64_t D)
{
    return (int)(D % 2 == 0 ? D + 1 : D);
}

/* The largest dynamic shared memory a block of `device` may opt in to. */
inline dms_status smem_optin_limit(int device, int64_t *bytes)
{
    int value = 0;
    DMS_CUDA_CHECK(cudaDeviceGetAttribute(
        &value, cudaDevAttrMaxSharedMemoryPerBlockOptin, device));
    *bytes = value;
    return DMS_OK;
}

inline dms_status grid_check(int64_t blocks, const char *what)
{
    if (blocks > 2147483647)
        return dms_fail(DMS_ERR_SHAPE, "%s: %lld thread blocks exceed the "
                        "CUDA grid limit", what, (long long)blocks);
    return DMS_OK;
}

} // namespace dms_tiles

#endif /* DMS_CUDA_TILES_CUH */
