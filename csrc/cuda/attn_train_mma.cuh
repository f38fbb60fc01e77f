/*
 * attn_train_mma.cuh - tensor-core kernels of the training attention
 * (SPEC.md section 3, soft form) for bf16 / f16 inputs with head dim 64 or
 * 128; attn_train.cu dispatches here (see `supports`) and keeps its SIMT
 * kernels for everything else. Same semantics as the SIMT and CPU kernels
 * (dms.h, dms_attn_train_forward / _backward). All products run on
 * mma.sync m16n8k16 with float32 accumulators (mma.cuh); softmax
 * statistics, the penalty and every gradient sum stay in float32.
 *
 * Every tile kernel has 4 warps; a warp owns 16 rows of its block's tile
 * and the whole width of every product along them, so row statistics live
 * in the registers of the 4 lanes that share a row (quad shuffles), and a
 * score tile's accumulators become the A operand of the next product
 * without a trip through shared memory (the C layout of two n8 tiles is
 * the A layout of one k16 step).
 *
 *   forward  one block per (b, query head, 64 queries): Q in registers, a
 *            loop over key tiles of BK up to the diagonal (K, V double
 *            buffered with cp.async, per-key padding / penalty prefetched
 *            one tile ahead), online softmax in the log2 domain. Writes o
 *            and the float32 log-sum-exp.
 *   dkv      one block per (b, kv head, 64 keys): loops over the G query
 *            heads of the group and the query tiles of BQ that can see its
 *            keys (Q, dO double buffered with cp.async, the tile's row
 *            statistics computed one tile ahead); recomputes
 *            P^T = exp(S^T - lse) and dP^T = V dO^T, accumulates
 *            dK += dS^T Q, dV += P^T dO and the dy sums of its keys in
 *            registers.
 *   dq       one block per (b, query head, 64 queries): the same P and dP
 *            per key tile, dQ += dS K in registers.
 * The row statistics of the backward (delta = grad_o . o and the lse in
 * log2 units) are recomputed by each kernel for the query rows it visits
 * (row_stats), as the SIMT kernels do: reading BQ rows of o and grad_o is
 * small next to the tile's products, and it leaves the backward needing
 * no memory beyond its outputs (nothing to allocate, so nothing that a
 * CUDA graph or a full memory pool could trip on). No atomics: each output
 * element is written once, by one thread, after a fixed-order sum, so
 * results are deterministic.
 *
 * Work that cannot matter is skipped: key tiles above the diagonal are not
 * visited, a warp whose rows see no key of a tile skips it, the causal /
 * padding mask is applied only to tiles that cross the diagonal or when
 * there is padding, and the penalty is looked up only for tiles with some
 * pair further apart than the window (and added without a per-pair test
 * when every pair is).
 *
 * Shared-memory tiles are 16-bit with rows padded to D + 8 elements
 * (16 bytes), so the eight row addresses of an ldmatrix hit distinct banks.
 * Inputs that are not already of the kernel's element type, or not 16-byte
 * aligned, are converted / copied with plain loads (same results).
 */
#ifndef DMS_CUDA_ATTN_TRAIN_MMA_CUH
#define DMS_CUDA_ATTN_TRAIN_MMA_CUH

#include <math.h>
#include <stdint.h>

#include "attn_train.cuh"
#include "mma.cuh"
#include "tiles.cuh"

namespace dms_attn_mma {

using namespace dms_attn;
using namespace dms_mma;

constexpr int kThreads = 128; /* 4 warps of 16 rows */
constexpr int kRows = 64;     /* rows of the tile a block owns */
constexpr unsigned kFull = 0xffffffffu;
constexpr float kLog2e = 1.4426950408889634f;
constexpr float kLn2 = 0.6931471805599453f;

/* ---- small helpers ------------------------------------------------------ */

template <bool kBf16>
__device__ __forceinline__ uint16_t to_elem(float x)
{
    return kBf16 ? dms_f32_to_bf16(x) : dms_f32_to_f16(x);
}

/* Over the 4 lanes (same lane / 4) that share an accumulator row. */
__device__ __forceinline__ float quad_max(float v)
{
    v = fmaxf(v, __shfl_xor_sync(kFull, v, 1));
    return fmaxf(v, __shfl_xor_sync(kFull, v, 2));
}

__device__ __forceinline__ float quad_sum(float v)
{
    v += __shfl_xor_sync(kFull, v, 1);
    return v + __shfl_xor_sync(kFull, v, 2);
}

/*
 * A position difference (query - key offsets of a tile pair, or the window
 * minus one) clamped into int range: within a pair of tiles only values in
 * [-128, 128] can change a comparison, so the per-element tests run in
 * 32-bit arithmetic whatever T is.
 */
__device__ __forceinline__ int clamp_diff(int64_t x)
{
    return (int)(x < -1024 ? -1024 : (x > 1024 ? 1024 : x));
}

/*
 * Rows r0 .. r0 + ROWS - 1 of a [.., T, D] tensor (batch b, head h) into a
 * [ROWS][D + 8] tile of the kernel's 16-bit type, zeros past T. cp.async
 * when the tensor holds that type at a 16-byte aligned address (the caller
 * commits and waits), plain stores otherwise.
 */
template <bool kBf16, int D, int ROWS>
__device__ __forceinline__ void load_tile(uint16_t *dst, const DmsView3 &src,
                                          int64_t b, int64_t h, int64_t r0,
                                          int64_t T)
{
    constexpr int LD = D + 8, kChunks = D / 8;
    constexpr dms_dtype kElem = kBf16 ? DMS_BFLOAT16 : DMS_FLOAT16;
    for (int c = threadIdx.x; c < ROWS * kChunks; c += kThreads) {
        const int r = c / kChunks, col = (c % kChunks) * 8;
        uint16_t *d = dst + r * LD + col;
        const int64_t i = r0 + r;
        if (i >= T) {
            for (int e = 0; e < 8; ++e)
                d[e] = 0;
            continue;
        }
        const int64_t off = src.at(b, h, i) + col;
        if (src.dtype == kElem) {
            const uint16_t *s = (const uint16_t *)src.data + off;
            if (((uintptr_t)s & 15) == 0) {
                cp_async_16(d, s);
            } else {
                for (int e = 0; e < 8; ++e)
                    d[e] = s[e];
            }
        } else {
            for (int e = 0; e < 8; ++e)
                d[e] = to_elem<kBf16>(dms_load(src.data, src.dtype, off + e));
        }
    }
}

/*
 * The per-key facts of a key tile k0 .. k0 + BK - 1 (thread c < BK owns key
 * k0 + c), fetched one tile ahead as raw bits so the loads are in flight
 * while the current tile computes, then published to shared memory:
 * kok = 1 if the key exists and is not padding, kpen = log2(e) *
 * logsigmoid(-y[i + 1]) (0 without a penalty, and for the last token,
 * which has no successor).
 */
struct KeyInfo {
    uint32_t y_bits;  /* y[i + 1] as stored (16 or 32 bits) */
    uint8_t pad_byte; /* key_padding[b, i] as stored */
    bool exists, pen; /* i < T; penalty wanted and defined */

    __device__ __forceinline__ void fetch(const AttnParams &p, int64_t b,
                                          int64_t h, int64_t k0,
                                          bool need_pen)
    {
        const int64_t i = k0 + threadIdx.x;
        exists = i < p.T;
        pen = need_pen && i + 1 < p.T;
        pad_byte = exists && p.pad.data != nullptr
                       ? p.pad.data[b * p.pad.s0 + i * p.pad.s1]
                       : 0;
        y_bits = 0;
        if (pen) {
            const int64_t off = p.y.at(b, h, i + 1);
            y_bits = p.y.dtype == DMS_FLOAT32
                         ? ((const uint32_t *)p.y.data)[off]
                         : ((const uint16_t *)p.y.data)[off];
        }
    }

    __device__ __forceinline__ void publish(dms_dtype y_dtype, float *kok,
                                            float *kpen) const
    {
        const int c = threadIdx.x;
        kok[c] = exists && pad_byte == 0 ? 1.0f : 0.0f;
        float pv = 0.0f;
        if (pen) {
            const float yv =
                y_dtype == DMS_FLOAT32    ? dms_bits_float(y_bits)
                : y_dtype == DMS_BFLOAT16 ? dms_bf16_to_f32((uint16_t)y_bits)
                                          : dms_f16_to_f32((uint16_t)y_bits);
            pv = kLog2e * dms_logsigmoid(-yv);
        }
        kpen[c] = pv;
    }
};

/* dst[off], dst[off + 1] = a, b; one 32-bit store when the type allows. */
template <bool kBf16>
__device__ __forceinline__ void store_pair(const DmsView3 &dst, int64_t off,
                                           float a, float b)
{
    constexpr dms_dtype kElem = kBf16 ? DMS_BFLOAT16 : DMS_FLOAT16;
    if (dst.dtype == kElem) {
        uint16_t *ptr = (uint16_t *)dst.data + off;
        if (((uintptr_t)ptr & 3) == 0) {
            *(uint32_t *)ptr = pack2<kBf16>(a, b);
            return;
        }
    }
    dms_store(dst.data, dst.dtype, off, a);
    dms_store(dst.data, dst.dtype, off + 1, b);
}

/*
 * Lane addresses of ldmatrix x4 for the operands of m16n8k16 (tiles are
 * [rows][LD] of 16-bit elements, all offsets in elements):
 *   a_rows   A fragment of rows r0 .. r0 + 15, columns c0 .. c0 + 15
 *   b_rows   B fragments of two n8 tiles for a matrix stored [n][k]
 *            (n = r0 .. r0 + 15, k = c0 .. c0 + 15): registers 0, 1 go to
 *            the n tile r0, registers 2, 3 to the n tile r0 + 8
 *   b_trans  B fragments (with .trans) of two n8 tiles for a matrix
 *            stored [k][n] (k = r0 .. r0 + 15, n = c0 .. c0 + 15)
 */
template <int LD>
__device__ __forceinline__ const uint16_t *a_rows(const uint16_t *tile,
                                                  int r0, int c0, int lane)
{
    return tile + (r0 + (lane & 15)) * LD + c0 + (lane >> 4) * 8;
}

template <int LD>
__device__ __forceinline__ const uint16_t *b_rows(const uint16_t *tile,
                                                  int r0, int c0, int lane)
{
    return tile + (r0 + (lane & 7) + ((lane >> 4) << 3)) * LD + c0 +
           ((lane >> 3) & 1) * 8;
}

template <int LD>
__device__ __forceinline__ const uint16_t *b_trans(const uint16_t *tile,
                                                   int r0, int c0, int lane)
{
    return tile + (r0 + (lane & 7) + (((lane >> 3) & 1) << 3)) * LD + c0 +
           (lane >> 4) * 8;
}

/*
 * The accumulators of two n8 tiles (16 columns) as the A operand of a k16
 * step: rows g and g + 8, columns 2t, 2t + 1 of each n8 tile.
 */
template <bool kBf16>
__device__ __forceinline__ void acc_to_a(uint32_t (&a)[4], const float (&lo)[4],
                                         const float (&hi)[4])
{
    a[0] = pack2<kBf16>(lo[0], lo[1]);
    a[1] = pack2<kBf16>(lo[2], lo[3]);
    a[2] = pack2<kBf16>(hi[0], hi[1]);
    a[3] = pack2<kBf16>(hi[2], hi[3]);
}

/* acc[n][.] += A (16 x 16 k-slice) * B^T, B stored [n][k]: NB n8 tiles. */
template <bool kBf16, int LD, int NB>
__device__ __forceinline__ void mma_rows(float (&acc)[NB][4],
                                         const uint32_t (&a)[4],
                                         const uint16_t *btile, int c0,
                                         int lane)
{
#pragma unroll
    for (int np = 0; np < NB / 2; ++np) {
        uint32_t bf[4];
        ldsm_x4(bf, b_rows<LD>(btile, np * 16, c0, lane));
        mma_16816<kBf16>(acc[2 * np], a, bf[0], bf[1]);
        mma_16816<kBf16>(acc[2 * np + 1], a, bf[2], bf[3]);
    }
}

/* acc[n][.] += A (16 x 16 k-slice) * B, B stored [k][n] from row r0. */
template <bool kBf16, int LD, int NB>
__device__ __forceinline__ void mma_trans(float (&acc)[NB][4],
                                          const uint32_t (&a)[4],
                                          const uint16_t *btile, int r0,
                                          int lane)
{
#pragma unroll
    for (int np = 0; np < NB / 2; ++np) {
        uint32_t bf[4];
        ldsm_x4_t(bf, b_trans<LD>(btile, r0, np * 16, lane));
        mma_16816<kBf16>(acc[2 * np], a, bf[0], bf[1]);
        mma_16816<kBf16>(acc[2 * np + 1], a, bf[2], bf[3]);
    }
}

template <int N>
__device__ __forceinline__ void zero(float (&acc)[N][4])
{
#pragma unroll
    for (int n = 0; n < N; ++n)
        acc[n][0] = acc[n][1] = acc[n][2] = acc[n][3] = 0.0f;
}

/*
 * The two products of a backward tile, over the whole head dim:
 * s = As Bs^T and dp = Ad Bd^T for the 16 rows r0 .. r0 + 15 of As / Ad
 * (dq: Q K^T and dO V^T; dkv: K Q^T and V dO^T). One k loop for both, so
 * the ldmatrix of one product overlaps the mma of the other.
 */
template <bool kBf16, int D, int N>
__device__ __forceinline__ void scores_and_dp(float (&s)[N][4],
                                              float (&dp)[N][4],
                                              const uint16_t *As,
                                              const uint16_t *Ad, int r0,
                                              const uint16_t *Bs,
                                              const uint16_t *Bd, int lane)
{
    constexpr int LD = D + 8;
    zero(s);
    zero(dp);
#pragma unroll
    for (int ks = 0; ks < D / 16; ++ks) {
        uint32_t as[4], ad[4];
        ldsm_x4(as, a_rows<LD>(As, r0, 16 * ks, lane));
        ldsm_x4(ad, a_rows<LD>(Ad, r0, 16 * ks, lane));
        mma_rows<kBf16, LD, N>(s, as, Bs, 16 * ks, lane);
        mma_rows<kBf16, LD, N>(dp, ad, Bd, 16 * ks, lane);
    }
}

/*
 * Scores of one warp's 16 query rows against a key tile, in the log2
 * domain: x = log2(e) (scale * q.k + penalty), -inf where masked. Row r
 * (0 .. 63 in the query tile) of accumulator element e is rbase + 8 (e / 2),
 * column c (0 .. BK - 1 in the key tile) is 8 n + 2t + e % 2; the pair is
 * far iff r - c > far_lim and causal-hidden iff c - r > vis_lim.
 */
template <int NS>
__device__ __forceinline__ void scores_log2(float (&s)[NS][4], float sl2,
                                            int rbase, int t, bool pen_all,
                                            bool pen_any, int far_lim,
                                            bool mask, int vis_lim,
                                            const float *tok,
                                            const float *tpen)
{
#pragma unroll
    for (int n = 0; n < NS; ++n) {
#pragma unroll
        for (int e = 0; e < 4; ++e) {
            const int c = 8 * n + 2 * t + (e & 1), r = rbase + 8 * (e >> 1);
            float x = s[n][e] * sl2;
            if (pen_all || (pen_any && r - c > far_lim))
                x += tpen[c];
            if (mask && (tok[c] == 0.0f || c - r > vis_lim))
                x = -INFINITY;
            s[n][e] = x;
        }
    }
}

/* ---- forward ------------------------------------------------------------ */

template <int D, int BK>
constexpr int64_t fwd_smem_bytes()
{
    /* Qs, Ks[2], Vs[2] (16-bit, rows of D + 8); kok[2], kpen[2] */
    return (int64_t)(kRows + 4 * BK) * (D + 8) * 2 + 4 * BK * 4;
}

template <bool kBf16, int D, int BK>
__global__ void __launch_bounds__(kThreads, 1)
    attn_fwd_mma_kernel(AttnParams p)
{
    constexpr int BQ = kRows, LD = D + 8, KS = D / 16, NS = BK / 8,
                  NO = D / 8;
    static_assert(D % 16 == 0 && BK % 16 == 0 && BK <= kThreads, "tiles");
    extern __shared__ __align__(16) uint16_t dms_smem16[];
    uint16_t *Qs = dms_smem16;
    uint16_t *Ks = Qs + BQ * LD; /* two buffers */
    uint16_t *Vs = Ks + 2 * BK * LD;
    float *kok = (float *)(Vs + 2 * BK * LD); /* [2][BK] */
    float *kpen = kok + 2 * BK;               /* [2][BK] */

    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    const int g = lane >> 2, t = lane & 3;
    const int64_t T = p.T, w = p.window;
    const QueryTile qtile = query_tile<BQ>(p);
    const int64_t b = qtile.b, qh = qtile.qh, h = qtile.h;
    const int64_t q0 = qtile.q0, q_last = qtile.q_last;
    const int64_t wq0 = q0 + 16 * warp; /* the warp's rows wq0 .. wlast */
    const int64_t wlast = wq0 + 15 < q_last ? wq0 + 15 : q_last;
    const bool has_y = p.y.data != nullptr, has_pad = p.pad.data != nullptr;
    const bool info = threadIdx.x < BK; /* this thread fetches key facts */
    const float sl2 = p.scale * kLog2e;
    const int64_t n_kt = q_last / BK + 1; /* key tiles up to the diagonal */

    load_tile<kBf16, D, BQ>(Qs, p.q, b, qh, q0, T);
    load_tile<kBf16, D, BK>(Ks, p.k, b, h, 0, T);
    load_tile<kBf16, D, BK>(Vs, p.v, b, h, 0, T);
    cp_async_commit();
    KeyInfo ki;
    if (info) {
        ki.fetch(p, b, h, 0, has_y && q_last > w);
        ki.publish(p.y.dtype, kok, kpen);
        if (n_kt > 1)
            ki.fetch(p, b, h, BK, has_y && q_last - BK > w);
    }

    uint32_t qf[KS][4];
    float o[NO][4];
    zero(o);
    float m[2] = {-INFINITY, -INFINITY}; /* running row max (log2 units) */
    float lpart[2] = {0.0f, 0.0f};        /* this lane's share of the sum */

    for (int64_t kt = 0; kt < n_kt; ++kt) {
        const int buf = (int)(kt & 1), nb = buf ^ 1;
        const int64_t k0 = kt * BK;
        if (kt + 1 < n_kt) { /* prefetch the next tile into the other buffer */
            const int64_t k1 = k0 + BK;
            load_tile<kBf16, D, BK>(Ks + nb * BK * LD, p.k, b, h, k1, T);
            load_tile<kBf16, D, BK>(Vs + nb * BK * LD, p.v, b, h, k1, T);
            if (info) {
                ki.publish(p.y.dtype, kok + nb * BK, kpen + nb * BK);
                if (kt + 2 < n_kt)
                    ki.fetch(p, b, h, k1 + BK, has_y && q_last - k1 - BK > w);
            }
        }
        cp_async_commit();
        cp_async_wait<1>(); /* everything but the prefetch has landed */
        __syncthreads();
        if (kt == 0) {
#pragma unroll
            for (int ks = 0; ks < KS; ++ks)
                ldsm_x4(qf[ks], a_rows<LD>(Qs, 16 * warp, 16 * ks, lane));
        }
        if (k0 <= wlast) { /* warp-uniform: some pair of the warp is visible */
            const uint16_t *Kt = Ks + buf * BK * LD, *Vt = Vs + buf * BK * LD;
            float s[NS][4];
            zero(s);
#pragma unroll
            for (int ks = 0; ks < KS; ++ks)
                mma_rows<kBf16, LD, NS>(s, qf[ks], Kt, 16 * ks, lane);
            scores_log2<NS>(s, sl2, 16 * warp + g, t,
                            has_y && wq0 - (k0 + BK - 1) > w,
                            has_y && wlast - k0 > w, clamp_diff(w - (q0 - k0)),
                            has_pad || k0 + BK - 1 > wq0, clamp_diff(q0 - k0),
                            kok + buf * BK, kpen + buf * BK);
#pragma unroll
            for (int r = 0; r < 2; ++r) {
                float tmax = -INFINITY;
#pragma unroll
                for (int n = 0; n < NS; ++n)
                    tmax = fmaxf(tmax, fmaxf(s[n][2 * r], s[n][2 * r + 1]));
                tmax = quad_max(tmax);
                const float m_new = fmaxf(m[r], tmax);
                /* nothing visible so far: keep everything at zero */
                const float ref = m_new == -INFINITY ? 0.0f : m_new;
                const float alpha =
                    m_new == -INFINITY ? 1.0f : exp2f(m[r] - m_new);
                m[r] = m_new;
                float part = 0.0f;
#pragma unroll
                for (int n = 0; n < NS; ++n) {
                    s[n][2 * r] = exp2f(s[n][2 * r] - ref); /* -inf: 0 */
                    s[n][2 * r + 1] = exp2f(s[n][2 * r + 1] - ref);
                    part += s[n][2 * r] + s[n][2 * r + 1];
                }
                lpart[r] = lpart[r] * alpha + part;
#pragma unroll
                for (int n = 0; n < NO; ++n) {
                    o[n][2 * r] *= alpha;
                    o[n][2 * r + 1] *= alpha;
                }
            }
#pragma unroll
            for (int kk = 0; kk < BK / 16; ++kk) {
                uint32_t pa[4];
                acc_to_a<kBf16>(pa, s[2 * kk], s[2 * kk + 1]);
                mma_trans<kBf16, LD, NO>(o, pa, Vt, 16 * kk, lane);
            }
        }
        __syncthreads(); /* this buffer is refilled two tiles from now */
    }

#pragma unroll
    for (int r = 0; r < 2; ++r) {
        const float l = quad_sum(lpart[r]);
        const int64_t j = wq0 + g + 8 * r;
        if (j >= T)
            continue;
        /* padding query: o = 0, lse = -inf; any other sees its own key, so
         * a sum that is not positive means NaN scores: NaN, as PyTorch */
        const bool query = !p.pad.is_pad(b, j), live = query && l > 0.0f;
        const float inv = live ? 1.0f / l : (query ? NAN : 0.0f);
        if (t == 0)
            ((float *)p.lse.data)[p.lse.at(b, qh, j)] =
                live ? m[r] * kLn2 + logf(l) : (query ? NAN : -INFINITY);
        const int64_t off = p.o.at(b, qh, j) + 2 * t;
#pragma unroll
        for (int n = 0; n < NO; ++n)
            store_pair<kBf16>(p.o, off + 8 * n, o[n][2 * r] * inv,
                              o[n][2 * r + 1] * inv);
    }
}

/* ---- backward: per-row statistics --------------------------------------- */

/*
 * The statistics of query row j (batch b, query head qh), computed by the
 * whole warp (lanes along D; j must be warp-uniform), every lane gets both:
 * delta = grad_o . o, and lse2 = log2(e) * lse, or +inf for a padding
 * query so that its probabilities come out 0; +inf / 0 past T. One fixed
 * summation order, so dkv and dq, which both recompute a row, agree to
 * the bit.
 */
template <bool kBf16, int D>
__device__ __forceinline__ void row_stats(const AttnParams &p, int64_t b,
                                          int64_t qh, int64_t j, int lane,
                                          float *lse2, float *delta)
{
    if (j >= p.T) {
        *lse2 = INFINITY;
        *delta = 0.0f;
        return;
    }
    constexpr dms_dtype kElem = kBf16 ? DMS_BFLOAT16 : DMS_FLOAT16;
    const int64_t ooff = p.o.at(b, qh, j), goff = p.grad_o.at(b, qh, j);
    float dsum = 0.0f;
    if (p.o.dtype == kElem && p.grad_o.dtype == kElem) {
        /* the common case without a dtype switch per element, so the loads
         * of a row are all in flight at once (same values, same order) */
        const uint16_t *o = (const uint16_t *)p.o.data + ooff;
        const uint16_t *go = (const uint16_t *)p.grad_o.data + goff;
#pragma unroll
        for (int d = lane; d < D; d += 32)
            dsum = fmaf(kBf16 ? dms_bf16_to_f32(go[d]) : dms_f16_to_f32(go[d]),
                        kBf16 ? dms_bf16_to_f32(o[d]) : dms_f16_to_f32(o[d]),
                        dsum);
    } else {
#pragma unroll
        for (int d = lane; d < D; d += 32)
            dsum = fmaf(dms_load(p.grad_o.data, p.grad_o.dtype, goff + d),
                        dms_load(p.o.data, p.o.dtype, ooff + d), dsum);
    }
    *delta = dms_tiles::warp_sum(dsum); /* xor tree: every lane, same bits */
    *lse2 = p.pad.is_pad(b, j)
                ? INFINITY
                : kLog2e * ((const float *)p.lse.data)[p.lse.at(b, qh, j)];
}

/*
 * row_stats of query rows q0 .. q0 + BQ - 1 into shared memory, row c by
 * warp c % 4. Plain loads: the caller issues this right after its cp.async
 * prefetch, so the two sets of loads are in flight together.
 */
template <bool kBf16, int D, int BQ>
__device__ __forceinline__ void tile_row_stats(const AttnParams &p, int64_t b,
                                               int64_t qh, int64_t q0,
                                               float *lse2, float *delta)
{
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
#pragma unroll
    for (int c = warp; c < BQ; c += kThreads / 32) {
        float l, d;
        row_stats<kBf16, D>(p, b, qh, q0 + c, lane, &l, &d);
        if (lane == 0) {
            lse2[c] = l;
            delta[c] = d;
        }
    }
}

/* ---- backward: grad_k, grad_v, grad_y ---------------------------------- */

template <int D, int BQ>
constexpr int64_t dkv_smem_bytes()
{
    /* Ks, Vs, Qs[2], dOs[2]; qlse2[2], qdelta[2] */
    return (int64_t)(2 * kRows + 4 * BQ) * (D + 8) * 2 + 4 * BQ * 4;
}

template <bool kBf16, int D, int BQ>
__global__ void __launch_bounds__(kThreads, 1)
    attn_bwd_dkv_mma_kernel(AttnParams p)
{
    constexpr int BK = kRows, LD = D + 8, NQ = BQ / 8, NO = D / 8;
    static_assert(D % 16 == 0 && BQ % 16 == 0, "tiles");
    extern __shared__ __align__(16) uint16_t dms_smem16[];
    uint16_t *Ks = dms_smem16;
    uint16_t *Vs = Ks + BK * LD;
    uint16_t *Qs = Vs + BK * LD;      /* two buffers */
    uint16_t *dOs = Qs + 2 * BQ * LD; /* two buffers */
    float *qlse2 = (float *)(dOs + 2 * BQ * LD); /* [2][BQ] */
    float *qdelta = qlse2 + 2 * BQ;              /* [2][BQ] */

    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    const int g = lane >> 2, t = lane & 3;
    const int64_t T = p.T, w = p.window;
    const int64_t bid = blockIdx.x;
    const int64_t kt = bid % p.n_tiles; /* the heaviest (first) tiles first */
    const int64_t h = (bid / p.n_tiles) % p.H;
    const int64_t b = bid / p.n_tiles / p.H;
    const int64_t k0 = kt * BK;
    const int64_t wk0 = k0 + 16 * warp; /* the warp's keys wk0 .. wk0 + 15 */
    const bool has_y = p.y.data != nullptr;
    const float sl2 = p.scale * kLog2e;

    load_tile<kBf16, D, BK>(Ks, p.k, b, h, k0, T);
    load_tile<kBf16, D, BK>(Vs, p.v, b, h, k0, T);

    bool kok[2];
    float pen2[2]; /* log2(e) * logsigmoid(-y[i + 1]) of this lane's keys */
#pragma unroll
    for (int r = 0; r < 2; ++r) {
        const int64_t i = wk0 + g + 8 * r;
        kok[r] = i < T && !p.pad.is_pad(b, i);
        pen2[r] = 0.0f;
        if (has_y && i + 1 < T)
            pen2[r] = kLog2e * dms_logsigmoid(-dms_load(
                                   p.y.data, p.y.dtype, p.y.at(b, h, i + 1)));
    }

    /* work items: (query head of the group, query tile) */
    const int64_t n_qt = (T + BQ - 1) / BQ;
    const int64_t qt0 = k0 / BQ; /* the first query tile that sees a key */
    const int64_t per_head = n_qt - qt0;
    const int64_t n_items = p.G * per_head;

    load_tile<kBf16, D, BQ>(Qs, p.q, b, h * p.G, qt0 * BQ, T);
    load_tile<kBf16, D, BQ>(dOs, p.grad_o, b, h * p.G, qt0 * BQ, T);
    cp_async_commit();
    tile_row_stats<kBf16, D, BQ>(p, b, h * p.G, qt0 * BQ, qlse2, qdelta);

    float dk[NO][4], dv[NO][4];
    zero(dk);
    zero(dv);
    float gy[2] = {0.0f, 0.0f}; /* sums of dS over the penalised pairs */

    for (int64_t it = 0; it < n_items; ++it) {
        const int buf = (int)(it & 1), nb = buf ^ 1;
        const int64_t q0 = (qt0 + it % per_head) * BQ;
        if (it + 1 < n_items) {
            const int64_t qh1 = h * p.G + (it + 1) / per_head;
            const int64_t q1 = (qt0 + (it + 1) % per_head) * BQ;
            load_tile<kBf16, D, BQ>(Qs + nb * BQ * LD, p.q, b, qh1, q1, T);
            load_tile<kBf16, D, BQ>(dOs + nb * BQ * LD, p.grad_o, b, qh1, q1,
                                    T);
        }
        cp_async_commit();
        if (it + 1 < n_items) /* published by the barrier below */
            tile_row_stats<kBf16, D, BQ>(p, b, h * p.G + (it + 1) / per_head,
                                         (qt0 + (it + 1) % per_head) * BQ,
                                         qlse2 + nb * BQ, qdelta + nb * BQ);
        cp_async_wait<1>();
        __syncthreads();
        const int64_t q_last = (q0 + BQ < T ? q0 + BQ : T) - 1;
        if (wk0 <= q_last) { /* some key of the warp is seen in this tile */
            const uint16_t *Qt = Qs + buf * BQ * LD, *dOt = dOs + buf * BQ * LD;
            const float *tlse2 = qlse2 + buf * BQ, *tdelta = qdelta + buf * BQ;
            float st[NQ][4], dpt[NQ][4]; /* S^T, dP^T: keys x queries */
            scores_and_dp<kBf16, D, NQ>(st, dpt, Ks, Vs, 16 * warp, Qt, dOt,
                                        lane);
            /* key row r (0 .. 63), query column c: j - i = (q0 - k0) + c - r */
            const bool pen_all = has_y && q0 - (wk0 + 15) > w;
            const bool pen_any = has_y && q_last - wk0 > w;
            const int far_lim = clamp_diff(w - (q0 - k0));
            const bool mask = q0 < wk0 + 15; /* the tile crosses the diagonal */
            const int hid_lim = clamp_diff(q0 - k0);
#pragma unroll
            for (int n = 0; n < NQ; ++n) {
#pragma unroll
                for (int e = 0; e < 4; ++e) {
                    const int c = 8 * n + 2 * t + (e & 1), rr = e >> 1;
                    const int r = 16 * warp + g + 8 * rr;
                    const bool far = pen_all || (pen_any && c - r > far_lim);
                    float x = st[n][e] * sl2;
                    if (far)
                        x += pen2[rr];
                    if ((mask && r - c > hid_lim) || !kok[rr])
                        x = -INFINITY; /* hidden, or a padding key: its score
                                          may overflow 16 bits (0 * inf) */
                    const float pr = exp2f(x - tlse2[c]);
                    const float ds = pr * (dpt[n][e] - tdelta[c]);
                    if (far)
                        gy[rr] += ds;
                    st[n][e] = pr;
                    dpt[n][e] = ds;
                }
            }
#pragma unroll
            for (int kk = 0; kk < BQ / 16; ++kk) {
                uint32_t pa[4], da[4];
                acc_to_a<kBf16>(pa, st[2 * kk], st[2 * kk + 1]);
                acc_to_a<kBf16>(da, dpt[2 * kk], dpt[2 * kk + 1]);
                mma_trans<kBf16, LD, NO>(dv, pa, dOt, 16 * kk, lane);
                mma_trans<kBf16, LD, NO>(dk, da, Qt, 16 * kk, lane);
            }
        }
        __syncthreads(); /* this buffer is refilled two items from now */
    }

    /* grad_y[m] for m = i + 1 of this tile's keys i; grad_y[0] = 0 */
    const bool want_gy = p.grad_y.data != nullptr;
#pragma unroll
    for (int r = 0; r < 2; ++r) {
        const float total = quad_sum(gy[r]);
        const int64_t mi = wk0 + g + 8 * r + 1;
        if (want_gy && t == 0 && mi < T) {
            const float yv = dms_load(p.y.data, p.y.dtype, p.y.at(b, h, mi));
            /* 0 - x: +0 rather than -0 when nothing was far */
            dms_store(p.grad_y.data, p.grad_y.dtype, p.grad_y.at(b, h, mi),
                      0.0f - dms_sigmoid(yv) * (kok[r] ? total : 0.0f));
        }
    }
    if (want_gy && kt == 0 && threadIdx.x == 0)
        dms_store(p.grad_y.data, p.grad_y.dtype, p.grad_y.at(b, h, 0), 0.0f);

#pragma unroll
    for (int r = 0; r < 2; ++r) {
        const int64_t i = wk0 + g + 8 * r;
        if (i >= T)
            continue;
        /* padding keys: no gradient (stored as 0 by a select, never as a
         * product that could be 0 * inf) */
        const bool ok = kok[r];
        const int64_t koff = p.grad_k.at(b, h, i) + 2 * t;
        const int64_t voff = p.grad_v.at(b, h, i) + 2 * t;
#pragma unroll
        for (int n = 0; n < NO; ++n) {
            store_pair<kBf16>(p.grad_k, koff + 8 * n,
                              ok ? p.scale * dk[n][2 * r] : 0.0f,
                              ok ? p.scale * dk[n][2 * r + 1] : 0.0f);
            store_pair<kBf16>(p.grad_v, voff + 8 * n,
                              ok ? dv[n][2 * r] : 0.0f,
                              ok ? dv[n][2 * r + 1] : 0.0f);
        }
    }
}

/* ---- backward: grad_q --------------------------------------------------- */

template <int D, int BK>
constexpr int64_t dq_smem_bytes()
{
    /* Qs, dOs, Ks[2], Vs[2]; kok[2], kpen[2] */
    return (int64_t)(2 * kRows + 4 * BK) * (D + 8) * 2 + 4 * BK * 4;
}

template <bool kBf16, int D, int BK>
__global__ void __launch_bounds__(kThreads, 1)
    attn_bwd_dq_mma_kernel(AttnParams p)
{
    constexpr int BQ = kRows, LD = D + 8, NS = BK / 8, NO = D / 8;
    static_assert(D % 16 == 0 && BK % 16 == 0 && BK <= kThreads, "tiles");
    extern __shared__ __align__(16) uint16_t dms_smem16[];
    uint16_t *Qs = dms_smem16;
    uint16_t *dOs = Qs + BQ * LD;
    uint16_t *Ks = dOs + BQ * LD; /* two buffers */
    uint16_t *Vs = Ks + 2 * BK * LD;
    float *kok = (float *)(Vs + 2 * BK * LD); /* [2][BK] */
    float *kpen = kok + 2 * BK;               /* [2][BK] */

    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    const int g = lane >> 2, t = lane & 3;
    const int64_t T = p.T, w = p.window;
    const QueryTile qtile = query_tile<BQ>(p);
    const int64_t b = qtile.b, qh = qtile.qh, h = qtile.h;
    const int64_t q0 = qtile.q0, q_last = qtile.q_last;
    const int64_t wq0 = q0 + 16 * warp;
    const int64_t wlast = wq0 + 15 < q_last ? wq0 + 15 : q_last;
    const bool has_y = p.y.data != nullptr, has_pad = p.pad.data != nullptr;
    const bool info = threadIdx.x < BK;
    const float sl2 = p.scale * kLog2e;
    const int64_t n_kt = q_last / BK + 1;

    load_tile<kBf16, D, BQ>(Qs, p.q, b, qh, q0, T);
    load_tile<kBf16, D, BQ>(dOs, p.grad_o, b, qh, q0, T);
    load_tile<kBf16, D, BK>(Ks, p.k, b, h, 0, T);
    load_tile<kBf16, D, BK>(Vs, p.v, b, h, 0, T);
    cp_async_commit();
    KeyInfo ki;
    if (info) {
        ki.fetch(p, b, h, 0, has_y && q_last > w);
        ki.publish(p.y.dtype, kok, kpen);
        if (n_kt > 1)
            ki.fetch(p, b, h, BK, has_y && q_last - BK > w);
    }
    float lse2[2], delta[2]; /* of this lane's rows g, g + 8 */
    for (int rr = 0; rr < 16; ++rr) { /* the warp's rows, one at a time */
        float l, d;
        row_stats<kBf16, D>(p, b, qh, wq0 + rr, lane, &l, &d);
        if (rr == g) {
            lse2[0] = l;
            delta[0] = d;
        }
        if (rr == g + 8) {
            lse2[1] = l;
            delta[1] = d;
        }
    }

    float dq[NO][4];
    zero(dq);

    for (int64_t kt = 0; kt < n_kt; ++kt) {
        const int buf = (int)(kt & 1), nb = buf ^ 1;
        const int64_t k0 = kt * BK;
        if (kt + 1 < n_kt) {
            const int64_t k1 = k0 + BK;
            load_tile<kBf16, D, BK>(Ks + nb * BK * LD, p.k, b, h, k1, T);
            load_tile<kBf16, D, BK>(Vs + nb * BK * LD, p.v, b, h, k1, T);
            if (info) {
                ki.publish(p.y.dtype, kok + nb * BK, kpen + nb * BK);
                if (kt + 2 < n_kt)
                    ki.fetch(p, b, h, k1 + BK, has_y && q_last - k1 - BK > w);
            }
        }
        cp_async_commit();
        cp_async_wait<1>();
        __syncthreads();
        if (k0 <= wlast) {
            const uint16_t *Kt = Ks + buf * BK * LD, *Vt = Vs + buf * BK * LD;
            float s[NS][4], dp[NS][4];
            scores_and_dp<kBf16, D, NS>(s, dp, Qs, dOs, 16 * warp, Kt, Vt,
                                        lane);
            scores_log2<NS>(s, sl2, 16 * warp + g, t,
                            has_y && wq0 - (k0 + BK - 1) > w,
                            has_y && wlast - k0 > w, clamp_diff(w - (q0 - k0)),
                            has_pad || k0 + BK - 1 > wq0, clamp_diff(q0 - k0),
                            kok + buf * BK, kpen + buf * BK);
#pragma unroll
            for (int n = 0; n < NS; ++n) {
#pragma unroll
                for (int e = 0; e < 4; ++e) /* dS = P (dP - delta) */
                    s[n][e] = exp2f(s[n][e] - lse2[e >> 1]) *
                              (dp[n][e] - delta[e >> 1]);
            }
#pragma unroll
            for (int kk = 0; kk < BK / 16; ++kk) {
                uint32_t da[4];
                acc_to_a<kBf16>(da, s[2 * kk], s[2 * kk + 1]);
                mma_trans<kBf16, LD, NO>(dq, da, Kt, 16 * kk, lane);
            }
        }
        __syncthreads();
    }

#pragma unroll
    for (int r = 0; r < 2; ++r) {
        const int64_t j = wq0 + g + 8 * r;
        if (j >= T)
            continue;
        const float f = p.pad.is_pad(b, j) ? 0.0f : p.scale;
        const int64_t off = p.grad_q.at(b, qh, j) + 2 * t;
#pragma unroll
        for (int n = 0; n < NO; ++n)
            store_pair<kBf16>(p.grad_q, off + 8 * n, f * dq[n][2 * r],
                              f * dq[n][2 * r + 1]);
    }
}

/* ---- host side ---------------------------------------------------------- */

/*
 * Key tile of the forward and dq kernels, query tile of dkv, per D: sized
 * so that no kernel spills on sm_80 / sm_90 (the accumulators of dkv alone
 * take 128 registers per thread at D = 128) and two blocks fit an SM.
 */
template <int D>
struct Tiles {
    static constexpr int kFwdBK = D <= 64 ? 64 : 32;
    static constexpr int kDqBK = D <= 64 ? 64 : 32;
    static constexpr int kDkvBQ = D <= 64 ? 64 : 16;
};

template <int D>
int64_t max_smem_bytes()
{
    const int64_t f = fwd_smem_bytes<D, Tiles<D>::kFwdBK>();
    const int64_t q = dq_smem_bytes<D, Tiles<D>::kDqBK>();
    const int64_t k = dkv_smem_bytes<D, Tiles<D>::kDkvBQ>();
    return f > q ? (f > k ? f : k) : (q > k ? q : k);
}

/*
 * Whether the tensor-core kernels take this call: bf16 / f16 inputs, head
 * dim 64 or 128, and their shared memory within the device's opt-in limit
 * (always so on sm_80 and newer). The one place that decides.
 */
inline bool supports(const dms_attn_train_args *a, int64_t smem_limit)
{
    const dms_dtype dt = a->q->dtype;
    if (dt != DMS_BFLOAT16 && dt != DMS_FLOAT16)
        return false;
    if (a->D == 64)
        return max_smem_bytes<64>() <= smem_limit;
    if (a->D == 128)
        return max_smem_bytes<128>() <= smem_limit;
    return false;
}

template <bool kBf16, int D>
dms_status forward_typed(const AttnParams &p, cudaStream_t stream)
{
    constexpr int BK = Tiles<D>::kFwdBK;
    return launch_tiles(attn_fwd_mma_kernel<kBf16, D, BK>, p, kThreads,
                        (p.T + kRows - 1) / kRows, p.B * p.H * p.G,
                        fwd_smem_bytes<D, BK>(), stream);
}

template <bool kBf16, int D>
dms_status backward_typed(const AttnParams &p, cudaStream_t stream)
{
    constexpr int BQ = Tiles<D>::kDkvBQ, BK = Tiles<D>::kDqBK;
    const int64_t tiles = (p.T + kRows - 1) / kRows;
    DMS_TRY(launch_tiles(attn_bwd_dkv_mma_kernel<kBf16, D, BQ>, p, kThreads,
                         tiles, p.B * p.H, dkv_smem_bytes<D, BQ>(), stream));
    return launch_tiles(attn_bwd_dq_mma_kernel<kBf16, D, BK>, p, kThreads,
                        tiles, p.B * p.H * p.G, dq_smem_bytes<D, BK>(),
                        stream);
}

/* Launch the forward; only after supports() said yes. */
inline dms_status forward(const dms_attn_train_args *a, const AttnParams &p,
                          cudaStream_t stream)
{
    const bool bf16 = a->q->dtype == DMS_BFLOAT16;
    if (a->D == 64)
        return bf16 ? forward_typed<true, 64>(p, stream)
                    : forward_typed<false, 64>(p, stream);
    return bf16 ? forward_typed<true, 128>(p, stream)
                : forward_typed<false, 128>(p, stream);
}

/* Launch the backward; only after supports() said yes. */
inline dms_status backward(const dms_attn_train_args *a, const AttnParams &p,
                           cudaStream_t stream)
{
    const bool bf16 = a->q->dtype == DMS_BFLOAT16;
    if (a->D == 64)
        return bf16 ? backward_typed<true, 64>(p, stream)
                    : backward_typed<false, 64>(p, stream);
    return bf16 ? backward_typed<true, 128>(p, stream)
                : backward_typed<false, 128>(p, stream);
}

} // namespace dms_attn_mma

#endif /* DMS_CUDA_ATTN_TRAIN_MMA_CUH */
