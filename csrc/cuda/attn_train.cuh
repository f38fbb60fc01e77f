/*
 * attn_train.cuh - what the two families of training-attention kernels
 * share: the SIMT kernels (attn_train.cu, any dtype and head dim) and the
 * tensor-core kernels (attn_train_mma.cuh, bf16 / f16 with D = 64 or 128).
 * The parameter block every kernel takes by value, the padding view, the
 * stable log-sigmoid of the penalty, and the query tile of a block.
 */
#ifndef DMS_CUDA_ATTN_TRAIN_CUH
#define DMS_CUDA_ATTN_TRAIN_CUH

#include <math.h>
#include <stdint.h>

#include "common.cuh"
#include "tiles.cuh"
#include "../core/scalar.h"

namespace dms_attn {

/* key_padding [B, T], one byte per element, nonzero = padding. */
struct DmsPadView {
    const uint8_t *data; /* nullptr = no padding */
    int64_t s0, s1;

    __device__ __forceinline__ bool is_pad(int64_t b, int64_t t) const
    {
        return data != nullptr && data[b * s0 + t * s1] != 0;
    }
};

/*
 * Everything a kernel reads. The 4-D tensors use DmsView3 with the strides
 * of their first three dims (the last one is contiguous).
 */
struct AttnParams {
    DmsView3 q, k, v, y, o, lse, grad_o, grad_q, grad_k, grad_v, grad_y;
    DmsPadView pad;
    int64_t B, H, G, T, window;
    int64_t n_tiles; /* tiles along T of the kernel's own tiling */
    int D, ld;       /* head dim, SIMT shared-memory row stride (odd) */
    float scale;
};

/* log(sigmoid(x)), stable for any x. */
__device__ __forceinline__ float dms_logsigmoid(float x)
{
    return fminf(x, 0.0f) - log1pf(expf(-fabsf(x)));
}

/*
 * The block of a kernel tiled along the queries (forward, dq): batch b,
 * query head qh, its kv head h, and query rows q0 .. q_last (clipped to T).
 * The heaviest (last) query tiles go first.
 */
struct QueryTile {
    int64_t b, qh, h, q0, q_last;
};

template <int BQ>
__device__ __forceinline__ QueryTile query_tile(const AttnParams &p)
{
    const int64_t HG = p.H * p.G, T = p.T;
    const int64_t bid = blockIdx.x;
    const int64_t qt = p.n_tiles - 1 - bid % p.n_tiles;
    QueryTile t;
    t.qh = (bid / p.n_tiles) % HG;
    t.b = bid / p.n_tiles / HG;
    t.h = t.qh / p.G;
    t.q0 = qt * BQ;
    t.q_last = (t.q0 + BQ < T ? t.q0 + BQ : T) - 1;
    return t;
}

inline AttnParams make_params(const dms_attn_train_args *a)
{
    AttnParams p;
    p.q = dms_view3(a->q);
    p.k = dms_view3(a->k);
    p.v = dms_view3(a->v);
    p.y = dms_view3(a->y);
    p.o = dms_view3(a->o);
    p.lse = dms_view3(a->lse);
    p.grad_o = dms_view3(a->grad_o);
    p.grad_q = dms_view3(a->grad_q);
    p.grad_k = dms_view3(a->grad_k);
    p.grad_v = dms_view3(a->grad_v);
    p.grad_y = dms_view3(a->grad_y);
    if (a->key_padding != NULL) {
        p.pad.data = (const uint8_t *)a->key_padding->data;
        p.pad.s0 = a->key_padding->strides[0];
        p.pad.s1 = a->key_padding->strides[1];
    } else {
        p.pad.data = nullptr;
        p.pad.s0 = p.pad.s1 = 0;
    }
    p.B = a->B;
    p.H = a->H;
    p.G = a->G;
    p.T = a->T;
    p.window = a->window;
    p.n_tiles = 0;
    p.D = (int)a->D;
    p.ld = dms_tiles::odd_ld(a->D);
    p.scale = a->scale;
    return p;
}

/*
 * One block of `threads` per (tile, batch and head): `outer` counts the
 * latter. Opts in to more than 48 KiB of shared memory when asked for.
 */
inline dms_status launch_tiles(void (*kernel)(AttnParams), const AttnParams &p,
                               int threads, int64_t tiles, int64_t outer,
                               int64_t smem, cudaStream_t stream)
{
    const int64_t blocks = tiles * outer;
    DMS_TRY(dms_tiles::grid_check(blocks, "training attention"));
    if (smem > 48 * 1024)
        DMS_CUDA_CHECK(cudaFuncSetAttribute(
            kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, (int)smem));
    AttnParams args = p;
    args.n_tiles = tiles;
    kernel<<<(unsigned)blocks, threads, (size_t)smem, stream>>>(args);
    DMS_CUDA_CHECK(cudaGetLastError());
    return DMS_OK;
}

} // namespace dms_attn

#endif /* DMS_CUDA_ATTN_TRAIN_CUH */
