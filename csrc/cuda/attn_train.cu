/*
 * cuda/attn_train.cu - CUDA kernels of the training attention (SPEC.md
 * section 3, soft form), the twins of the CPU kernels behind
 * dms_attn_train_forward / dms_attn_train_backward (see dms.h for the exact
 * semantics). Flash-attention style: probabilities are never stored as a
 * T x T matrix, the backward recomputes them from the forward's lse.
 *
 * Two families of kernels; dms_attn_train_{forward,backward}_cuda at the
 * end of this file pick one (dms_attn_mma::supports is the one test):
 *   - tensor cores (attn_train_mma.cuh): bf16 / f16 inputs, D = 64 or 128;
 *   - SIMT (this file): everything else (float32, any D <= 256), float32
 *     everywhere inside (inputs of any floating dtype are converted on
 *     load, outputs rounded on store), 128 threads per block.
 * The SIMT kernels:
 *
 *   forward   one block per (b, query head, query tile): online softmax
 *             over the key tiles up to the diagonal.
 *   backward  kernel "dkv": one block per (b, kv head, key tile): loops
 *             over the G query heads of the group and the query tiles that
 *             can see its keys; accumulates grad_k, grad_v and the grad_y
 *             sums of its keys in shared memory / registers and writes them
 *             once. Kernel "dq": one block per (b, query head, query tile),
 *             accumulates grad_q over the key tiles up to the diagonal.
 *             No atomics and no workspace: every output element is written
 *             exactly once by one thread, with a fixed summation order, so
 *             results are deterministic.
 *
 * Thread layout (all kernels): thread t owns the "micro-tile" rows
 * (t / 8) + 16 a and columns (t % 8) + 8 b of a [rows x cols] score tile;
 * the eight threads that share a row are eight consecutive lanes of one
 * warp, so row reductions are three xor-shuffles. The same thread owns the
 * same rows of the [rows x D] accumulators (columns d = (t % 8) + 8 b of
 * each 32-wide chunk of D), so per-row softmax state lives in registers.
 *
 * Shared memory holds float32 tiles with an odd row stride ld (D or D + 1)
 * so that the strided micro-tile reads hit distinct banks; its size grows
 * linearly with D and the launcher picks the largest tile shape that fits
 * the device's opt-in limit (see *_smem_floats below).
 *
 * Built by setup.py with nvcc for sm_80 and sm_90 (+ PTX).
 */
#include <math.h>
#include <stdint.h>

#include "attn_train.cuh"
#include "attn_train_mma.cuh"
#include "common.cuh"
#include "tiles.cuh"
#include "../core/scalar.h"

namespace {

/* kThreads, kWarps, kMinBlocks, the reductions, tile_dot, tile_accum, ... */
using namespace dms_tiles;
/* AttnParams, DmsPadView, QueryTile, make_params, launch_tiles, ... */
using namespace dms_attn;

/*
 * Rows k0 .. k0 + BK - 1 of k and v (kv head h) into Ks / Vs (zeros past
 * T), and per key: kok = 1 if the key exists and is not padding, kpen = the
 * eviction penalty logsigmoid(-y[i + 1]) (0 when not needed). One warp per
 * row, lanes along D.
 */
template <int BK>
__device__ __forceinline__ void load_key_tile(const AttnParams &p, int64_t b,
                                              int64_t h, int64_t k0,
                                              bool need_pen, float *Ks,
                                              float *Vs, float *kok,
                                              float *kpen)
{
    const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
    const int D = p.D, ld = p.ld;
    for (int r = warp; r < BK; r += kWarps) {
        const int64_t i = k0 + r;
        float *krow = Ks + r * ld, *vrow = Vs + r * ld;
        if (i < p.T) {
            const int64_t koff = p.k.at(b, h, i), voff = p.v.at(b, h, i);
            for (int d = lane; d < D; d += 32) {
                krow[d] = dms_load(p.k.data, p.k.dtype, koff + d);
                vrow[d] = dms_load(p.v.data, p.v.dtype, voff + d);
            }
        } else {
            for (int d = lane; d < D; d += 32) {
                krow[d] = 0.0f;
                vrow[d] = 0.0f;
            }
        }
    }
    if (tid < BK) {
        const int64_t i = k0 + tid;
        kok[tid] = (i < p.T && !p.pad.is_pad(b, i)) ? 1.0f : 0.0f;
        float pen = 0.0f;
        if (need_pen && i + 1 < p.T)
            pen = dms_logsigmoid(
                -dms_load(p.y.data, p.y.dtype, p.y.at(b, h, i + 1)));
        kpen[tid] = pen;
    }
}

/*
 * Rows q0 .. q0 + BQ - 1 of q and grad_o (query head qh) into Qs / dOs
 * (zeros past T), dQs zeroed if given, and per query: rdelta = grad_o . o,
 * rlse = lse, rok = 1 if the query exists and is not padding (rlse = 0
 * otherwise, so it is never -inf). One warp per row, lanes along D.
 */
template <int BQ>
__device__ __forceinline__ void load_query_tile(const AttnParams &p,
                                                int64_t b, int64_t qh,
                                                int64_t q0, float *Qs,
                                                float *dOs, float *dQs,
                                                float *rlse, float *rdelta,
                                                float *rok)
{
    const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
    const int D = p.D, ld = p.ld;
    for (int r = warp; r < BQ; r += kWarps) { /* warp-uniform loop */
        const int64_t j = q0 + r;
        float *qrow = Qs + r * ld, *grow = dOs + r * ld;
        float dsum = 0.0f;
        if (j < p.T) {
            const int64_t qoff = p.q.at(b, qh, j);
            const int64_t goff = p.grad_o.at(b, qh, j);
            const int64_t ooff = p.o.at(b, qh, j);
            for (int d = lane; d < D; d += 32) {
                qrow[d] = dms_load(p.q.data, p.q.dtype, qoff + d);
                const float g = dms_load(p.grad_o.data, p.grad_o.dtype,
                                         goff + d);
                grow[d] = g;
                dsum = fmaf(g, dms_load(p.o.data, p.o.dtype, ooff + d), dsum);
            }
        } else {
            for (int d = lane; d < D; d += 32) {
                qrow[d] = 0.0f;
                grow[d] = 0.0f;
            }
        }
        if (dQs != nullptr)
            for (int d = lane; d < D; d += 32)
                dQs[r * ld + d] = 0.0f;
        dsum = warp_sum(dsum);
        if (lane == 0) {
            const bool ok = j < p.T && !p.pad.is_pad(b, j);
            rok[r] = ok ? 1.0f : 0.0f;
            rdelta[r] = dsum;
            rlse[r] = ok ? ((const float *)p.lse.data)[p.lse.at(b, qh, j)]
                         : 0.0f;
        }
    }
}

/* ---- forward ------------------------------------------------------------ */

template <int BQ, int BK>
constexpr int64_t fwd_smem_floats(int64_t ld)
{
    /* Qs, Ks, Vs, Os, Ps, rinv; kpen, kok */
    return fwd_tile_floats<BQ, BK>(ld) + 2 * BK;
}

template <int BQ, int BK>
__global__ void __launch_bounds__(kThreads, kMinBlocks)
    attn_fwd_kernel(AttnParams p)
{
    constexpr int RA = BQ / 16, CB = BK / 8, LDP = BK + 1;
    static_assert(BQ % 16 == 0 && BK % 8 == 0, "tile shape");
    extern __shared__ float dms_smem[];
    const int D = p.D, ld = p.ld;
    float *Qs = dms_smem;
    float *Ks = Qs + BQ * ld;
    float *Vs = Ks + BK * ld;
    float *Os = Vs + BK * ld;
    float *Ps = Os + BQ * ld;
    float *kpen = Ps + BQ * LDP;
    float *kok = kpen + BK;
    float *rinv = kok + BK;

    const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
    const int ty = tid >> 3, tx = tid & 7;
    const int64_t T = p.T;
    const QueryTile qtile = query_tile<BQ>(p);
    const int64_t b = qtile.b, qh = qtile.qh, h = qtile.h;
    const int64_t q0 = qtile.q0, q_last = qtile.q_last;

    for (int r = warp; r < BQ; r += kWarps) {
        const int64_t j = q0 + r;
        float *orow = Os + r * ld;
        load_row_or_zero(Qs + r * ld, j < T, p.q, p.q.at(b, qh, j), D, lane);
        for (int d = lane; d < D; d += 32)
            orow[d] = 0.0f;
    }

    int64_t jq[RA];
    bool qok[RA];
    float m[RA], lpart[RA], alpha[RA];
#pragma unroll
    for (int a = 0; a < RA; ++a) {
        jq[a] = q0 + ty + 16 * a;
        qok[a] = jq[a] < T && !p.pad.is_pad(b, jq[a]);
        m[a] = -INFINITY; /* running max of the row */
        lpart[a] = 0.0f;  /* this thread's share of the running sum */
        alpha[a] = 1.0f;
    }

    const int64_t n_kt = q_last / BK + 1; /* key tiles up to the diagonal */
    for (int64_t kt = 0; kt < n_kt; ++kt) {
        const int64_t k0 = kt * BK;
        /* some pair of this tile further apart than the window? */
        const bool need_pen = p.y.data != nullptr && q_last - k0 > p.window;
        load_key_tile<BK>(p, b, h, k0, need_pen, Ks, Vs, kok, kpen);
        __syncthreads();

        float acc[RA][CB];
        tile_dot<RA, CB>(Qs + ty * ld, Ks + tx * ld, ld, D, acc);
#pragma unroll
        for (int a = 0; a < RA; ++a) {
            float s[CB];
            float tmax = -INFINITY;
#pragma unroll
            for (int b2 = 0; b2 < CB; ++b2) {
                const int c = tx + 8 * b2;
                const int64_t i = k0 + c;
                float sc = p.scale * acc[a][b2];
                if (jq[a] - i > p.window)
                    sc += kpen[c];
                const bool vis = qok[a] && kok[c] != 0.0f && i <= jq[a];
                s[b2] = vis ? sc : -INFINITY;
                tmax = fmaxf(tmax, s[b2]);
            }
            tmax = group8_max(tmax);
            const float m_new = fmaxf(m[a], tmax);
            /* nothing visible so far: keep everything at zero */
            const float ref = m_new == -INFINITY ? 0.0f : m_new;
            alpha[a] = m_new == -INFINITY ? 1.0f : expf(m[a] - m_new);
            float part = 0.0f;
#pragma unroll
            for (int b2 = 0; b2 < CB; ++b2) {
                const float pr = expf(s[b2] - ref); /* exp(-inf) = 0 */
                Ps[(ty + 16 * a) * LDP + tx + 8 * b2] = pr;
                part += pr;
            }
            lpart[a] = lpart[a] * alpha[a] + part;
            m[a] = m_new;
        }
        __syncthreads();
        tile_accum<RA, BK, true>(Os, ld, Ps, Vs, D, ty, tx, alpha);
        __syncthreads(); /* Ks, Vs, Ps, kok, kpen are rewritten next */
    }

#pragma unroll
    for (int a = 0; a < RA; ++a) {
        const float l = group8_sum(lpart[a]);
        if (tx == 0) {
            /* A padding query: o = 0, lse = -inf. Any other sees its own
             * key, so a sum that is not positive is NaN (or 0: every
             * score NaN): o and lse are NaN, as in PyTorch. */
            const float poison = qok[a] ? NAN : 0.0f;
            const bool live = qok[a] && l > 0.0f;
            rinv[ty + 16 * a] = live ? 1.0f / l : poison;
            if (jq[a] < T)
                ((float *)p.lse.data)[p.lse.at(b, qh, jq[a])] =
                    live ? m[a] + logf(l) : (qok[a] ? NAN : -INFINITY);
        }
    }
    __syncthreads();
    for (int r = warp; r < BQ; r += kWarps) {
        const int64_t j = q0 + r;
        if (j >= T)
            break;
        const float inv = rinv[r]; /* 0: padding query, o = 0 */
        store_row_scaled(p.o, p.o.at(b, qh, j), Os + r * ld, inv,
                         inv != 0.0f, D, lane);
    }
}

/* ---- backward: grad_q --------------------------------------------------- */

template <int BQ, int BK>
constexpr int64_t dq_smem_floats(int64_t ld)
{
    /* Qs, dOs, dQs, Ks, Vs, dSs, kpen, kok, rlse, rdelta, rok */
    return (3 * BQ + 2 * BK) * ld + BQ * (BK + 1) + 2 * BK + 3 * BQ;
}

template <int BQ, int BK>
__global__ void __launch_bounds__(kThreads, kMinBlocks)
    attn_bwd_dq_kernel(AttnParams p)
{
    constexpr int RA = BQ / 16, CB = BK / 8, LDP = BK + 1;
    static_assert(BQ % 16 == 0 && BK % 8 == 0, "tile shape");
    extern __shared__ float dms_smem[];
    const int D = p.D, ld = p.ld;
    float *Qs = dms_smem;
    float *dOs = Qs + BQ * ld;
    float *dQs = dOs + BQ * ld;
    float *Ks = dQs + BQ * ld;
    float *Vs = Ks + BK * ld;
    float *dSs = Vs + BK * ld;
    float *kpen = dSs + BQ * LDP;
    float *kok = kpen + BK;
    float *rlse = kok + BK;
    float *rdelta = rlse + BQ;
    float *rok = rdelta + BQ;

    const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
    const int ty = tid >> 3, tx = tid & 7;
    const int64_t T = p.T;
    const QueryTile qtile = query_tile<BQ>(p);
    const int64_t b = qtile.b, qh = qtile.qh, h = qtile.h;
    const int64_t q0 = qtile.q0, q_last = qtile.q_last;

    load_query_tile<BQ>(p, b, qh, q0, Qs, dOs, dQs, rlse, rdelta, rok);
    __syncthreads();

    int64_t jq[RA];
    bool qok[RA];
    float lse_r[RA], delta_r[RA];
#pragma unroll
    for (int a = 0; a < RA; ++a) {
        const int r = ty + 16 * a;
        jq[a] = q0 + r;
        qok[a] = rok[r] != 0.0f;
        lse_r[a] = rlse[r];
        delta_r[a] = rdelta[r];
    }

    const int64_t n_kt = q_last / BK + 1;
    for (int64_t kt = 0; kt < n_kt; ++kt) {
        const int64_t k0 = kt * BK;
        const bool need_pen = p.y.data != nullptr && q_last - k0 > p.window;
        load_key_tile<BK>(p, b, h, k0, need_pen, Ks, Vs, kok, kpen);
        __syncthreads();

        float sacc[RA][CB], dpacc[RA][CB];
        tile_dot<RA, CB>(Qs + ty * ld, Ks + tx * ld, ld, D, sacc);
        tile_dot<RA, CB>(dOs + ty * ld, Vs + tx * ld, ld, D, dpacc);
#pragma unroll
        for (int a = 0; a < RA; ++a) {
#pragma unroll
            for (int b2 = 0; b2 < CB; ++b2) {
                const int c = tx + 8 * b2;
                const int64_t i = k0 + c;
                float sc = p.scale * sacc[a][b2];
                if (jq[a] - i > p.window)
                    sc += kpen[c];
                const bool vis = qok[a] && kok[c] != 0.0f && i <= jq[a];
                const float pr = vis ? expf(sc - lse_r[a]) : 0.0f;
                dSs[(ty + 16 * a) * LDP + c] =
                    vis ? pr * (dpacc[a][b2] - delta_r[a]) : 0.0f;
            }
        }
        __syncthreads();
        tile_accum<RA, BK, false>(dQs, ld, dSs, Ks, D, ty, tx,
                                  delta_r /* unused */);
        __syncthreads();
    }

    for (int r = warp; r < BQ; r += kWarps) {
        const int64_t j = q0 + r;
        if (j >= T)
            break;
        const int64_t off = p.grad_q.at(b, qh, j);
        const bool ok = rok[r] != 0.0f;
        for (int d = lane; d < D; d += 32)
            dms_store(p.grad_q.data, p.grad_q.dtype, off + d,
                      ok ? p.scale * dQs[r * ld + d] : 0.0f);
    }
}

/* ---- backward: grad_k, grad_v, grad_y ---------------------------------- */

template <int BK, int BQ>
constexpr int64_t dkv_smem_floats(int64_t ld)
{
    /* Ks, Vs, dKs, dVs, Qs, dOs, Ps, dSs, qlse, qdelta, qok */
    return (4 * BK + 2 * BQ) * ld + 2 * BK * (BQ + 1) + 3 * BQ;
}

template <int BK, int BQ>
__global__ void __launch_bounds__(kThreads, kMinBlocks)
    attn_bwd_dkv_kernel(AttnParams p)
{
    constexpr int RA = BK / 16, CB = BQ / 8, LDP = BQ + 1;
    static_assert(BK % 16 == 0 && BQ % 8 == 0, "tile shape");
    extern __shared__ float dms_smem[];
    const int D = p.D, ld = p.ld;
    float *Ks = dms_smem;
    float *Vs = Ks + BK * ld;
    float *dKs = Vs + BK * ld;
    float *dVs = dKs + BK * ld;
    float *Qs = dVs + BK * ld;
    float *dOs = Qs + BQ * ld;
    float *Ps = dOs + BQ * ld;
    float *dSs = Ps + BK * LDP;
    float *qlse = dSs + BK * LDP;
    float *qdelta = qlse + BQ;
    float *qok = qdelta + BQ;

    const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
    const int ty = tid >> 3, tx = tid & 7;
    const int64_t T = p.T;
    const int64_t bid = blockIdx.x;
    /* the heaviest (first) key tiles first */
    const int64_t kt = bid % p.n_tiles;
    const int64_t h = (bid / p.n_tiles) % p.H;
    const int64_t b = bid / p.n_tiles / p.H;
    const int64_t k0 = kt * BK;

    for (int r = warp; r < BK; r += kWarps) {
        const int64_t i = k0 + r;
        float *krow = Ks + r * ld, *vrow = Vs + r * ld;
        if (i < T) {
            const int64_t koff = p.k.at(b, h, i), voff = p.v.at(b, h, i);
            for (int d = lane; d < D; d += 32) {
                krow[d] = dms_load(p.k.data, p.k.dtype, koff + d);
                vrow[d] = dms_load(p.v.data, p.v.dtype, voff + d);
            }
        } else {
            for (int d = lane; d < D; d += 32) {
                krow[d] = 0.0f;
                vrow[d] = 0.0f;
            }
        }
        for (int d = lane; d < D; d += 32) {
            dKs[r * ld + d] = 0.0f;
            dVs[r * ld + d] = 0.0f;
        }
    }

    int64_t ik[RA];
    bool kok[RA];
    float pen[RA], gy[RA];
#pragma unroll
    for (int a = 0; a < RA; ++a) {
        ik[a] = k0 + ty + 16 * a;
        kok[a] = ik[a] < T && !p.pad.is_pad(b, ik[a]);
        pen[a] = 0.0f;
        if (p.y.data != nullptr && ik[a] + 1 < T)
            pen[a] = dms_logsigmoid(
                -dms_load(p.y.data, p.y.dtype, p.y.at(b, h, ik[a] + 1)));
        gy[a] = 0.0f; /* sum of dS over the pairs that carry the penalty */
    }

    const int64_t n_qt = (T + BQ - 1) / BQ;
    const int64_t qt0 = k0 / BQ; /* first query tile that sees a key here */
    for (int64_t g = 0; g < p.G; ++g) {
        const int64_t qh = h * p.G + g;
        for (int64_t qt = qt0; qt < n_qt; ++qt) {
            const int64_t q0 = qt * BQ;
            load_query_tile<BQ>(p, b, qh, q0, Qs, dOs, nullptr, qlse, qdelta,
                                qok);
            __syncthreads();

            float sacc[RA][CB], dpacc[RA][CB];
            tile_dot<RA, CB>(Ks + ty * ld, Qs + tx * ld, ld, D, sacc);
            tile_dot<RA, CB>(Vs + ty * ld, dOs + tx * ld, ld, D, dpacc);
#pragma unroll
            for (int a = 0; a < RA; ++a) {
#pragma unroll
                for (int b2 = 0; b2 < CB; ++b2) {
                    const int c = tx + 8 * b2;
                    const int64_t j = q0 + c;
                    const bool far = j - ik[a] > p.window;
                    float sc = p.scale * sacc[a][b2];
                    if (far)
                        sc += pen[a];
                    const bool vis = kok[a] && qok[c] != 0.0f && ik[a] <= j;
                    const float pr = vis ? expf(sc - qlse[c]) : 0.0f;
                    const float ds =
                        vis ? pr * (dpacc[a][b2] - qdelta[c]) : 0.0f;
                    Ps[(ty + 16 * a) * LDP + c] = pr;
                    dSs[(ty + 16 * a) * LDP + c] = ds;
                    if (far)
                        gy[a] += ds;
                }
            }
            __syncthreads();
            tile_accum<RA, BQ, false>(dVs, ld, Ps, dOs, D, ty, tx,
                                      gy /* unused */);
            tile_accum<RA, BQ, false>(dKs, ld, dSs, Qs, D, ty, tx,
                                      gy /* unused */);
            __syncthreads(); /* Qs, dOs, Ps, dSs, q* are rewritten next */
        }
    }

    /* grad_y[m] for m = i + 1 of this tile's keys i; grad_y[0] = 0 */
    const bool want_gy = p.grad_y.data != nullptr;
#pragma unroll
    for (int a = 0; a < RA; ++a) {
        const float total = group8_sum(gy[a]);
        const int64_t mi = ik[a] + 1;
        if (want_gy && tx == 0 && mi < T) {
            const float yv = dms_load(p.y.data, p.y.dtype, p.y.at(b, h, mi));
            /* 0 - x: +0 rather than -0 when nothing was far */
            dms_store(p.grad_y.data, p.grad_y.dtype, p.grad_y.at(b, h, mi),
                      0.0f - dms_sigmoid(yv) * total);
        }
    }
    if (want_gy && kt == 0 && tid == 0)
        dms_store(p.grad_y.data, p.grad_y.dtype, p.grad_y.at(b, h, 0), 0.0f);

    for (int r = warp; r < BK; r += kWarps) {
        const int64_t i = k0 + r;
        if (i >= T)
            break;
        const bool ok = !p.pad.is_pad(b, i);
        const int64_t koff = p.grad_k.at(b, h, i);
        const int64_t voff = p.grad_v.at(b, h, i);
        for (int d = lane; d < D; d += 32) {
            dms_store(p.grad_k.data, p.grad_k.dtype, koff + d,
                      ok ? p.scale * dKs[r * ld + d] : 0.0f);
            dms_store(p.grad_v.data, p.grad_v.dtype, voff + d,
                      ok ? dVs[r * ld + d] : 0.0f);
        }
    }
}

/* ---- host side ---------------------------------------------------------- */

dms_status no_fit(const char *what, int64_t D, int64_t need, int64_t limit)
{
    return dms_fail(DMS_ERR_SHAPE, "q: head dim %lld needs %lld bytes of "
                    "shared memory per block in the CUDA %s kernel, this "
                    "GPU allows %lld", (long long)D, (long long)need, what,
                    (long long)limit);
}

/*
 * Launches the kernel with tile shape <R, C> (R rows per block along T) if
 * its shared memory fits `limit`; returns false (launching nothing) if not.
 * `outer` is the number of (batch, head) pairs of the grid.
 */
template <int R>
bool try_launch(void (*kernel)(AttnParams), int64_t smem_floats,
                const AttnParams &p, int64_t outer, int64_t limit,
                cudaStream_t stream, dms_status *status)
{
    const int64_t smem = smem_floats * (int64_t)sizeof(float);
    if (smem > limit)
        return false;
    *status = launch_tiles(kernel, p, kThreads, (p.T + R - 1) / R, outer, smem,
                           stream);
    return true;
}

} // namespace

extern "C" dms_status dms_attn_train_forward_cuda(
    const dms_attn_train_args *args, void *stream)
{
    DmsDeviceGuard guard(args->q->device_index);
    DMS_CUDA_CHECK(guard.status());
    int64_t limit = 0;
    DMS_TRY(smem_optin_limit(args->q->device_index, &limit));
    const AttnParams p = make_params(args);
    const cudaStream_t s = (cudaStream_t)stream;
    if (dms_attn_mma::supports(args, limit))
        return dms_attn_mma::forward(args, p, s);
    const int64_t outer = args->B * args->H * args->G;
    dms_status status = DMS_OK;
    /* largest tile shape first */
    if (try_launch<64>(attn_fwd_kernel<64, 32>,
                           fwd_smem_floats<64, 32>(p.ld), p, outer, limit, s,
                           &status) ||
        try_launch<32>(attn_fwd_kernel<32, 32>,
                           fwd_smem_floats<32, 32>(p.ld), p, outer, limit, s,
                           &status) ||
        try_launch<16>(attn_fwd_kernel<16, 16>,
                           fwd_smem_floats<16, 16>(p.ld), p, outer, limit, s,
                           &status))
        return status;
    return no_fit("forward", args->D,
                  fwd_smem_floats<16, 16>(p.ld) * (int64_t)sizeof(float),
                  limit);
}

extern "C" dms_status dms_attn_train_backward_cuda(
    const dms_attn_train_args *args, void *stream)
{
    DmsDeviceGuard guard(args->q->device_index);
    DMS_CUDA_CHECK(guard.status());
    int64_t limit = 0;
    DMS_TRY(smem_optin_limit(args->q->device_index, &limit));
    const AttnParams p = make_params(args);
    const cudaStream_t s = (cudaStream_t)stream;
    if (dms_attn_mma::supports(args, limit))
        return dms_attn_mma::backward(args, p, s);
    dms_status status = DMS_OK;

    /* grad_k, grad_v, grad_y: tiles of keys */
    const int64_t kv_outer = args->B * args->H;
    if (!(try_launch<32>(attn_bwd_dkv_kernel<32, 32>,
                             dkv_smem_floats<32, 32>(p.ld), p, kv_outer,
                             limit, s, &status) ||
          try_launch<16>(attn_bwd_dkv_kernel<16, 32>,
                             dkv_smem_floats<16, 32>(p.ld), p, kv_outer,
                             limit, s, &status) ||
          try_launch<16>(attn_bwd_dkv_kernel<16, 16>,
                             dkv_smem_floats<16, 16>(p.ld), p, kv_outer,
                             limit, s, &status)))
        return no_fit("backward (dk, dv)", args->D,
                      dkv_smem_floats<16, 16>(p.ld) * (int64_t)sizeof(float),
                      limit);
    DMS_TRY(status);

    /* grad_q: tiles of queries */
    const int64_t q_outer = args->B * args->H * args->G;
    if (try_launch<64>(attn_bwd_dq_kernel<64, 32>,
                           dq_smem_floats<64, 32>(p.ld), p, q_outer, limit,
                           s, &status) ||
        try_launch<32>(attn_bwd_dq_kernel<32, 16>,
                           dq_smem_floats<32, 16>(p.ld), p, q_outer, limit,
                           s, &status) ||
        try_launch<16>(attn_bwd_dq_kernel<16, 16>,
                           dq_smem_floats<16, 16>(p.ld), p, q_outer, limit,
                           s, &status))
        return status;
    return no_fit("backward (dq)", args->D,
                  dq_smem_floats<16, 16>(p.ld) * (int64_t)sizeof(float),
                  limit);
}
