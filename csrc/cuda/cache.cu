/*
 * cuda/cache.cu - CUDA kernels of the paged DMS cache (SPEC.md sections 4
 * and 5; the contract is in dms.h), the twins of cpu/cache.c.
 *
 * append (dms_cache_append_cuda), two kernels on the call's stream:
 *   slots   one block per row (rows are independent; only the page pop is
 *           shared). A dry pass counts the row's fresh slots from the flags
 *           and the cached slot limits alone (like the CPU's dry run), the
 *           row then pops all the pages it needs with ONE atomicSub on
 *           free_count (all or nothing per row) and writes them into its
 *           page table. The commit pass walks the call's tokens in tiles of
 *           at most min(threads, w) tokens: the positions of a tile are
 *           fewer than w + 1 apart, so the token that leaves the window for
 *           each of them was placed by an earlier tile and its slot_limit
 *           (set by its successor, also in an earlier tile) is final; inside
 *           a tile the tokens are independent, and block scans give the
 *           row positions and the fresh local slot indices. Every write of
 *           the sequential algorithm is reproduced (window, slot_limit,
 *           token_slots; a token whose slot is reused later in the same call
 *           gets token_slots = -1, written by its successor whose decision
 *           flags it). Page ids may differ from the CPU's (rows race for
 *           the pool); everything else is the same.
 *   copy    one warp per token: K/V rows of tokens with token_slots >= 0
 *           into their slots, with the widest vector (16/8/4/2 bytes) that
 *           every pointer, stride and row length allows.
 *
 *   Pool exhaustion. The host must make sure the pool and the page table
 *   have room before calling (the CPU path checks and fails with
 *   DMS_ERR_POOL; the device cannot report an error without a sync). If a
 *   row still finds too few free pages, its atomicSub leaves free_count
 *   negative; a row whose page table is too small (or that finds an
 *   invalid page id or slot in the state) forces free_count to <= -1 with
 *   atomicMin. Such a row is left unmodified and all its token_slots are
 *   -1; other rows of the call may have been committed. So: free_count < 0
 *   after a CUDA append means the call was applied partially and the cache
 *   no longer matches the sequence: rebuild it. No out-of-bounds access
 *   happens on any of these paths.
 *
 * prefill (dms_attn_prefill_cuda): flash attention, SIMT, float32 inside, 128
 *   threads, the tile machinery of tiles.cuh (shared with attn_train.cu). One
 *   block per (b, kv head h, tile of BQ "rows"), a row being a (query j, head
 *   g) pair ordered j-major, so the G query heads of a kv head share every K/V
 *   tile they load. Keys are the row's cached slots (tiles of BK local slots,
 *   gathered through the page table) followed by the call's keys up to the
 *   tile's last query. Every key carries (kpos, klim): query position pj sees
 *   it iff kpos <= pj < klim (cached: kpos = -1, klim = slot_limit or, for the
 *   last cached token, the limit its flag in this call gives; new key at
 *   position pt: kpos = pt, klim = pt + w + 1 if its flag is 1 else "never";
 *   the flag of a new key is the decision of the next non-padding token, found
 *   with warp ballots). Warp 0 computes a tile's metadata while the block
 *   still works on the previous tile (two buffers). A key tile no query of the
 *   block can see is skipped (only its metadata is read), which is where
 *   evicted keys save compute. Queries' row positions come from a block-wide
 *   count of the padding before the tile.
 *
 * decode (dms_attn_decode_cuda): one block per (row, key range), the G
 *   query heads of the kv head together, so every K/V byte of the range is
 *   read once. Chunks of KC slots: K and V are gathered with vector loads
 *   into shared memory (float32), scores for all G heads, online softmax
 *   per head, P.V into a shared [G, D] accumulator. With a workspace of S
 *   > 1 ranges, range s of a row with N slots covers the chunks [c*s/S,
 *   c*(s+1)/S) of c = ceil(N / KC) and writes workspace[(r*G + g), s, :] =
 *   (o normalised by its own sum l, then m = running max of the scaled
 *   scores, then l; an empty range writes o = 0, m = -inf, l = 0); a
 *   combine kernel (one block per query head) merges the ranges by
 *   log-sum-exp. Without a workspace (or S = 1) the block writes o and lse
 *   directly.
 *
 * No device allocation, no atomics besides the page pop, no host sync; all
 * offsets are 64-bit. Built by setup.py with nvcc for sm_80 and sm_90
 * (+ PTX).
 */
#include <math.h>
#include <stdint.h>

#if defined(__CUDACC__)
#include <cuda_fp16.h>
#endif

#include "common.cuh"
#include "tiles.cuh"
#include "../core/scalar.h"

namespace {

/* kFullMask, kThreads, the reductions, tile_dot, tile_accum, ... */
using namespace dms_tiles;

__device__ __forceinline__ int64_t min64(int64_t a, int64_t b)
{
    return a < b ? a : b;
}

__device__ __forceinline__ int64_t max64(int64_t a, int64_t b)
{
    return a > b ? a : b;
}

/* ---- block-wide helpers (blockDim.x a multiple of 32, <= 1024) --------- */

template <typename V>
__device__ __forceinline__ V warp_inclusive_scan(V v, int lane)
{
#pragma unroll
    for (int off = 1; off < 32; off <<= 1) {
        const V u = __shfl_up_sync(kFullMask, v, off);
        if (lane >= off)
            v += u;
    }
    return v;
}

/*
 * Exclusive prefix sum of v over the block's threads in order; *total gets
 * the sum. Every thread must call it; sh holds >= 32 values.
 */
__device__ __forceinline__ long long block_exclusive_scan(long long v,
                                                          long long *sh,
                                                          long long *total)
{
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    const int n_warps = blockDim.x >> 5;
    const long long inc = warp_inclusive_scan(v, lane);
    if (lane == 31)
        sh[warp] = inc;
    __syncthreads();
    long long before = 0, all = 0;
    for (int i = 0; i < n_warps; ++i) {
        const long long s = sh[i];
        if (i < warp)
            before += s;
        all += s;
    }
    __syncthreads(); /* sh is reused by the next call */
    *total = all;
    return before + inc - v;
}

struct OpSum {
    __device__ long long operator()(long long a, long long b) const
    {
        return a + b;
    }
};
struct OpMin {
    __device__ long long operator()(long long a, long long b) const
    {
        return a < b ? a : b;
    }
};
struct OpMax {
    __device__ long long operator()(long long a, long long b) const
    {
        return a > b ? a : b;
    }
};

/* op over the block's values; every thread gets the result. */
template <typename Op>
__device__ __forceinline__ long long block_reduce(long long v, long long *sh,
                                                  Op op)
{
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    const int n_warps = blockDim.x >> 5;
#pragma unroll
    for (int off = 16; off > 0; off >>= 1)
        v = op(v, __shfl_xor_sync(kFullMask, v, off));
    if (lane == 0)
        sh[warp] = v;
    __syncthreads();
    long long all = sh[0];
    for (int i = 1; i < n_warps; ++i)
        all = op(all, sh[i]);
    __syncthreads();
    return all;
}

/* Byte flags: key_padding [B, n] (nullptr = none), decisions [B, H, n]. */
struct FlagViews {
    const uint8_t *pad;
    int64_t ps0, ps1;
    const uint8_t *dec;
    int64_t ds0, ds1, ds2;

    __device__ __forceinline__ bool is_pad(int64_t b, int64_t t) const
    {
        return pad != nullptr && pad[b * ps0 + t * ps1] != 0;
    }
    __device__ __forceinline__ int decision(int64_t b, int64_t h,
                                            int64_t t) const
    {
        return dec[b * ds0 + h * ds1 + t * ds2] != 0;
    }
};

FlagViews make_flags(const dms_cache_call *x)
{
    FlagViews f;
    f.pad = nullptr;
    f.ps0 = f.ps1 = 0;
    if (x->key_padding != NULL) {
        f.pad = (const uint8_t *)x->key_padding->data;
        f.ps0 = x->key_padding->strides[0];
        f.ps1 = x->key_padding->strides[1];
    }
    f.dec = nullptr;
    f.ds0 = f.ds1 = f.ds2 = 0;
    if (x->decisions != NULL) {
        f.dec = (const uint8_t *)x->decisions->data;
        f.ds0 = x->decisions->strides[0];
        f.ds1 = x->decisions->strides[1];
        f.ds2 = x->decisions->strides[2];
    }
    return f;
}

/* The limit a key at `position` gets from its flag (CPU: limit_for). */
__device__ __forceinline__ int32_t limit_for(int flagged, int64_t position,
                                             int64_t w)
{
    const int64_t until = position + w + 1;
    return flagged && until < INT32_MAX ? (int32_t)until : INT32_MAX;
}

/* ---- append: slots ------------------------------------------------------ */

constexpr int kAppendMaxThreads = 256;

struct AppendParams {
    int32_t *slot_limit, *page_table, *row_slots, *row_seen, *window;
    const int32_t *free_pages;
    int32_t *free_count;
    int64_t n_pages, n_slots, P, w, max_pages, H, n;
    FlagViews f;
    int32_t *token_slots;
    int64_t ts0, ts1, ts2;
    int tile; /* tokens per commit tile: min(blockDim, max(w, 1)) */
};

__global__ void __launch_bounds__(kAppendMaxThreads)
    append_slots_kernel(AppendParams p)
{
    __shared__ long long s_red[32];
    __shared__ int32_t s_slot[kAppendMaxThreads]; /* slot of k-th position */
    __shared__ int64_t s_tok[kAppendMaxThreads];  /* its token index t    */
    __shared__ int s_fail;
    __shared__ int32_t s_top;

    const int tid = threadIdx.x, nt = blockDim.x;
    const int64_t r = blockIdx.x, b = r / p.H, h = r % p.H;
    const int64_t n = p.n, w = p.w, W1 = w + 1, P = p.P;
    const int64_t seen0 = p.row_seen[r], rs0 = p.row_slots[r];
    int32_t *ring = p.window + r * W1;
    int32_t *ptab = p.page_table + r * p.max_pages;
    int32_t *ts = p.token_slots + b * p.ts0 + h * p.ts1;

    /* ---- dry pass: the row's fresh slots ---- */
    long long m = n; /* non-padding tokens of the call */
    if (p.f.pad != nullptr) {
        long long c = 0;
        for (int64_t t = tid; t < n; t += nt)
            c += !p.f.is_pad(b, t);
        m = block_reduce(c, s_red, OpSum());
    }
    /*
     * Token k (k-th non-padding token, position seen0 + k) flags the token
     * before it, which leaves the window when position seen0 + k + w
     * arrives: that position reuses a slot iff a[k] = 1, for k in
     * [klo, m - w) (klo = 1 when the row is empty: token 0 flags nothing).
     */
    const long long klo = seen0 == 0 ? 1 : 0, khi = m - w;
    long long reused = 0;
    if (khi > klo) {
        long long base = 0;
        for (int64_t t0 = 0; t0 < n && base < khi; t0 += nt) {
            const int64_t t = t0 + tid;
            const int np = t < n && !p.f.is_pad(b, t);
            long long cnt;
            const long long k = base + block_exclusive_scan(np, s_red, &cnt);
            if (np && k >= klo && k < khi)
                reused += p.f.decision(b, h, t);
            base += cnt;
        }
    }
    /* Positions whose leaving token was flagged before this call. */
    {
        const int64_t lo = max64(seen0, W1), hi = min64(seen0 + m, seen0 + w);
        for (int64_t pos = lo + tid; pos < hi; pos += nt) {
            const int32_t sl = ring[pos % W1];
            if (sl >= 0 && sl < p.n_slots && p.slot_limit[sl] <= pos)
                ++reused;
        }
    }
    reused = block_reduce(reused, s_red, OpSum());
    const int64_t fresh = m - reused;
    const int64_t rs_end = rs0 + fresh;
    const int64_t pages0 = (rs0 + P - 1) / P, pages1 = (rs_end + P - 1) / P;
    const int64_t need = pages1 - pages0;

    /* ---- pop the row's pages: one atomic, all or nothing ---- */
    if (tid == 0) {
        int fail = 0;
        int32_t top = 0;
        if (rs0 < 0 || fresh < 0 || pages1 > p.max_pages ||
            need > p.n_pages) {
            atomicMin(p.free_count, -1);
            fail = 1;
        } else if (need > 0) {
            const int32_t old = atomicSub(p.free_count, (int32_t)need);
            if (old < need) { /* exhausted: free_count is now negative */
                fail = 1;
            } else if (old > p.n_pages) { /* corrupt count */
                atomicMin(p.free_count, -1);
                fail = 1;
            } else {
                top = old;
            }
        }
        s_fail = fail;
        s_top = top;
    }
    __syncthreads();
    int fail = s_fail;
    const int64_t top = s_top;
    if (!fail) {
        int bad = 0;
        for (int64_t j = tid; j < need; j += nt) {
            const int32_t pg = p.free_pages[top - 1 - j];
            bad |= pg < 0 || pg >= p.n_pages;
        }
        fail = __syncthreads_or(bad);
        if (fail && tid == 0)
            atomicMin(p.free_count, -1);
    }
    if (fail) { /* the row is left as it was */
        for (int64_t t = tid; t < n; t += nt)
            ts[t * p.ts2] = -1;
        return;
    }
    for (int64_t j = tid; j < need; j += nt)
        ptab[pages0 + j] = p.free_pages[top - 1 - j];
    __syncthreads();

    /* ---- commit, tile by tile ---- */
    const int tile = p.tile;
    int64_t pbase = seen0, rs = rs0;
    int32_t prev_slot = seen0 > 0 ? ring[(seen0 - 1) % W1] : -1;
    int64_t prev_tok = -1;
    int err = 0;
    for (int64_t t0 = 0; t0 < n; t0 += tile) {
        const int64_t t = t0 + tid;
        const bool act = tid < tile && t < n;
        const bool np = act && !p.f.is_pad(b, t);
        const int a = np ? p.f.decision(b, h, t) : 0;
        long long cnt_ll;
        const int kk = (int)block_exclusive_scan(np, s_red, &cnt_ll);
        const int cnt = (int)cnt_ll;
        const int64_t pos = pbase + kk;

        /* the token leaving the window: reuse its slot if it is expired */
        int32_t sl = -1;
        bool reuse = false;
        if (np && pos >= W1) {
            sl = ring[pos % W1];
            if (sl >= 0 && sl < p.n_slots)
                /* w = 0: the leaving token is the previous one, flagged by
                 * this very decision (written below, not yet visible) */
                reuse = w == 0 ? a != 0 : p.slot_limit[sl] <= pos;
        }
        const bool is_fresh = np && !reuse;
        long long fcnt;
        const int64_t ff = block_exclusive_scan(is_fresh, s_red, &fcnt);
        int32_t slot = -1;
        if (reuse) {
            slot = sl;
        } else if (is_fresh) {
            const int64_t i = rs + ff;
            const int32_t pg = i < rs_end ? ptab[i / P] : -1;
            if (pg >= 0 && pg < p.n_pages)
                slot = (int32_t)(pg * P + i % P);
            else
                err = 1; /* only with an inconsistent cache state */
        }
        if (np) {
            s_slot[kk] = slot;
            s_tok[kk] = t;
        }
        __syncthreads();
        if (np) {
            ring[pos % W1] = slot;
            ts[t * p.ts2] = slot;
            if (pos > 0) { /* this decision flags the token before */
                const int32_t sp = kk > 0 ? s_slot[kk - 1] : prev_slot;
                if (sp >= 0 && sp < p.n_slots)
                    p.slot_limit[sp] = limit_for(a, pos - 1, w);
            }
            /* the tile's last token is unflagged until its successor */
            if (kk == cnt - 1 && slot >= 0)
                p.slot_limit[slot] = INT32_MAX;
        } else if (act) {
            ts[t * p.ts2] = -1;
        }
        __syncthreads();
        /* The token before this one is evicted within the call (its slot
         * reused by position pos + w) iff this decision flags it and that
         * position is part of the call. */
        const int64_t kc = pos - seen0;
        if (np && a && kc >= 1 && kc + w <= m - 1) {
            const int64_t tp = kk > 0 ? s_tok[kk - 1] : prev_tok;
            ts[tp * p.ts2] = -1;
        }
        if (cnt > 0) {
            prev_slot = s_slot[cnt - 1];
            prev_tok = s_tok[cnt - 1];
        }
        pbase += cnt;
        rs += fcnt;
        __syncthreads(); /* s_slot, s_tok are rewritten by the next tile */
    }
    err = __syncthreads_or(err);
    if (tid == 0) {
        p.row_seen[r] = (int32_t)(seen0 + m);
        p.row_slots[r] = (int32_t)rs_end;
        if (err)
            atomicMin(p.free_count, -1);
    }
}

/* ---- append: K/V copy --------------------------------------------------- */

struct CopyParams {
    const char *k_src, *v_src;
    int64_t ks0, ks1, ks2, vs0, vs1, vs2; /* element strides */
    char *k_dst, *v_dst;
    const int32_t *token_slots;
    int64_t ts0, ts1, ts2;
    int64_t H, n, tokens, row_bytes, esize;
    int vb; /* vector bytes: 16, 8, 4 or 2 */
    /* FP8 pages (fmt != DMS_KV_NATIVE): rows of src_dtype quantised into
     * D codes and a scale each. */
    dms_kv_format fmt;
    dms_dtype src_dtype;
    int64_t D;
    float *k_scales, *v_scales;
};

/* The largest |x| of the warp's lanes (NaN wins, as on the CPU: the result
 * does not depend on the order). */
__device__ __forceinline__ float warp_amax(float a)
{
    for (int m = 16; m > 0; m >>= 1) {
        const float o = __shfl_xor_sync(0xffffffffu, a, m);
        a = o > a || o != o ? o : a;
    }
    return a;
}

/* One warp: row `src` (element offset `at`) of a token as FP8 codes at dst;
 * returns the row's scale (dms_fp8_quantize, csrc/core/scalar.h). */
__device__ __forceinline__ float fp8_store_row(const CopyParams &p,
                                               const char *src, int64_t at,
                                               uint8_t *dst, int lane)
{
    const int e5m2 = p.fmt == DMS_KV_FP8_E5M2;
    float amax = 0.0f;
    for (int64_t d = lane; d < p.D; d += 32) {
        const float a = fabsf(dms_load(src, p.src_dtype, at + d));
        amax = a > amax || a != a ? a : amax;
    }
    const float scale = dms_fp8_row_scale(warp_amax(amax), e5m2);
    for (int64_t d = lane; d < p.D; d += 32)
        dst[d] = dms_fp8_quantize(dms_load(src, p.src_dtype, at + d), scale,
                                  e5m2);
    return scale;
}

template <int VB>
struct VecOf;
template <>
struct VecOf<16> {
    typedef uint4 type;
};
template <>
struct VecOf<8> {
    typedef uint2 type;
};
template <>
struct VecOf<4> {
    typedef uint32_t type;
};
template <>
struct VecOf<2> {
    typedef uint16_t type;
};
template <>
struct VecOf<1> {
    typedef uint8_t type;
};

template <int VB>
__device__ __forceinline__ void copy_row(char *dst, const char *src,
                                         int64_t bytes, int lane)
{
    typedef typename VecOf<VB>::type V;
    const int64_t units = bytes / VB;
    for (int64_t u = lane; u < units; u += 32)
        ((V *)dst)[u] = ((const V *)src)[u];
}

__device__ __forceinline__ void copy_row_any(char *dst, const char *src,
                                             int64_t bytes, int vb, int lane)
{
    switch (vb) {
    case 16:
        copy_row<16>(dst, src, bytes, lane);
        break;
    case 8:
        copy_row<8>(dst, src, bytes, lane);
        break;
    case 4:
        copy_row<4>(dst, src, bytes, lane);
        break;
    default:
        copy_row<2>(dst, src, bytes, lane);
        break;
    }
}

__global__ void __launch_bounds__(256) append_copy_kernel(CopyParams p)
{
    const int lane = threadIdx.x & 31;
    const int64_t warps = ((int64_t)gridDim.x * blockDim.x) >> 5;
    for (int64_t tok = ((int64_t)blockIdx.x * blockDim.x + threadIdx.x) >> 5;
         tok < p.tokens; tok += warps) {
        const int64_t t = tok % p.n, bh = tok / p.n;
        const int64_t h = bh % p.H, b = bh / p.H;
        const int32_t s = p.token_slots[b * p.ts0 + h * p.ts1 + t * p.ts2];
        if (s < 0)
            continue;
        if (p.fmt != DMS_KV_NATIVE) {
            const float ks = fp8_store_row(
                p, p.k_src, b * p.ks0 + h * p.ks1 + t * p.ks2,
                (uint8_t *)p.k_dst + (int64_t)s * p.D, lane);
            const float vs = fp8_store_row(
                p, p.v_src, b * p.vs0 + h * p.vs1 + t * p.vs2,
                (uint8_t *)p.v_dst + (int64_t)s * p.D, lane);
            if (lane == 0) {
                p.k_scales[s] = ks;
                p.v_scales[s] = vs;
            }
            continue;
        }
        const int64_t dst = (int64_t)s * p.row_bytes;
        copy_row_any(p.k_dst + dst,
                     p.k_src + (b * p.ks0 + h * p.ks1 + t * p.ks2) * p.esize,
                     p.row_bytes, p.vb, lane);
        copy_row_any(p.v_dst + dst,
                     p.v_src + (b * p.vs0 + h * p.vs1 + t * p.vs2) * p.esize,
                     p.row_bytes, p.vb, lane);
    }
}

/* ---- prefill attention -------------------------------------------------- */

constexpr int64_t kNever = INT64_MAX;  /* kpos of a key nobody sees  */
constexpr int64_t kGone = INT64_MIN;   /* klim of a key nobody sees  */

struct PrefillParams {
    DmsView3 q, k, v, o, lse; /* [.., n, D] tensors: strides of dims 0-2 */
    FlagViews f;
    const void *k_pages, *v_pages;
    dms_dtype dtype;
    dms_kv_format fmt;                /* FP8 pages: codes and ...        */
    const float *k_scales, *v_scales; /* ... a scale per slot            */
    const int32_t *slot_limit, *page_table, *row_slots, *row_seen, *window;
    int64_t H, G, n, P, w, max_pages;
    int64_t n_tiles;
    int D, ld; /* head dim, shared-memory row stride (odd, >= D) */
    float scale;
};

/* One warp: a float32 row (lane d holds d, d + 32, ...) replaced by what
 * FP8 pages store of it (__syncwarp: each lane reads only its own). */
__device__ __forceinline__ void fp8_round_row(float *row, int D,
                                              dms_kv_format fmt, int lane)
{
    const int e5m2 = fmt == DMS_KV_FP8_E5M2;
    float amax = 0.0f;
    for (int d = lane; d < D; d += 32) {
        const float a = fabsf(row[d]);
        amax = a > amax || a != a ? a : amax;
    }
    const float scale = dms_fp8_row_scale(warp_amax(amax), e5m2);
    for (int d = lane; d < D; d += 32)
        row[d] = dms_fp8_to_f32(dms_fp8_quantize(row[d], scale, e5m2), e5m2) *
                 scale;
}

/* What warp 0 needs to describe a key tile (see prefill_meta). */
struct MetaCtx {
    int64_t b, h, seen0, rs, n_ct, qmin, qmax, last_lim;
    int32_t last_slot;
    const int32_t *ptab;
    int64_t nbase; /* non-padding new tokens before the next new tile */
};

/*
 * Warp 0 only (all 32 lanes): kpos, klim, ksrc of key tile `it` into buf
 * (lane c < BK describes key c). Tiles [0, n_ct) are the row's cached
 * slots; the rest are the call's tokens, in order (so nbase advances).
 * Returns whether a query of the block (positions in [qmin, qmax]) may see
 * this lane's key.
 */
template <int BK>
__device__ __forceinline__ bool prefill_meta(const PrefillParams &p,
                                             MetaCtx &mc, int64_t it,
                                             int64_t *buf)
{
    const int lane = threadIdx.x & 31;
    const bool cached = it < mc.n_ct;
    const int64_t k0 = (cached ? it : it - mc.n_ct) * BK;
    const int64_t b = mc.b, h = mc.h, n = p.n;
    int64_t kp = kNever, kl = kGone, src = -1;
    if (cached) {
        const int64_t i = k0 + lane;
        if (lane < BK && i < mc.rs) {
            const int64_t s = (int64_t)mc.ptab[i / p.P] * p.P + i % p.P;
            kp = -1;
            kl = s == mc.last_slot ? mc.last_lim : p.slot_limit[s];
            src = s;
        }
    } else {
        const int64_t t = k0 + lane;
        const bool np = lane < BK && t < n && !p.f.is_pad(b, t);
        const unsigned bal = __ballot_sync(kFullMask, np);
        /* decision of the first non-padding token past the tile */
        int beyond = 0;
        if (bal != 0u) {
            for (int64_t t2 = k0 + BK; t2 < n; t2 += 32) {
                const int64_t u = t2 + lane;
                const bool np2 = u < n && !p.f.is_pad(b, u);
                const unsigned b2 = __ballot_sync(kFullMask, np2);
                if (b2 != 0u) {
                    const int src_lane = __ffs((int)b2) - 1;
                    const int d = lane == src_lane ? p.f.decision(b, h, u) : 0;
                    beyond = __shfl_sync(kFullMask, d, src_lane);
                    break;
                }
            }
        }
        /* a key's flag is the decision of the next non-padding token */
        const int mine = np ? p.f.decision(b, h, t) : 0;
        const unsigned after = bal & ~((2u << lane) - 1u);
        const int next_lane = after ? __ffs((int)after) - 1 : lane;
        const int next_dec = __shfl_sync(kFullMask, mine, next_lane);
        const int flag = after ? next_dec : beyond;
        if (np) {
            kp = mc.seen0 + mc.nbase + __popc(bal & ((1u << lane) - 1u));
            kl = flag ? kp + p.w + 1 : kNever;
            src = t;
        }
        mc.nbase += __popc(bal);
    }
    if (lane < BK) {
        buf[lane] = kp;
        buf[BK + lane] = kl;
        buf[2 * BK + lane] = src;
    }
    return lane < BK && kp <= mc.qmax && mc.qmin < kl;
}

template <int BQ, int BK>
constexpr int64_t prefill_smem_bytes(int64_t ld)
{
    /* int64: two key-metadata buffers of kpos, klim, ksrc (BK each), qpos
     * (BQ), reductions (32); int32: jflag (BQ); float: Qs, Os, Ks, Vs, Ps,
     * rinv (fwd_tile_floats) */
    return (6 * BK + BQ + 32) * 8 + BQ * 4 + fwd_tile_floats<BQ, BK>(ld) * 4;
}

template <int BQ, int BK>
__global__ void __launch_bounds__(kThreads, kMinBlocks)
    prefill_kernel(PrefillParams p)
{
    constexpr int RA = BQ / 16, CB = BK / 8, LDP = BK + 1;
    static_assert(BQ % 16 == 0 && BK % 8 == 0 && BK <= 32, "tile shape");
    extern __shared__ __align__(16) unsigned char dms_smem_bytes[];
    const int D = p.D, ld = p.ld;
    int64_t *meta = (int64_t *)dms_smem_bytes; /* 2 x (kpos, klim, ksrc) */
    int64_t *qpos = meta + 6 * BK; /* row position of each row; -1: none */
    long long *red = (long long *)(qpos + BQ);
    int32_t *jflag = (int32_t *)(red + 32);
    float *Qs = (float *)(jflag + BQ);
    float *Ks = Qs + BQ * ld;
    float *Vs = Ks + BK * ld;
    float *Os = Vs + BK * ld;
    float *Ps = Os + BQ * ld;
    float *rinv = Ps + BQ * LDP;

    const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
    const int ty = tid >> 3, tx = tid & 7;
    const int64_t G = p.G, n = p.n, NG = n * G, w = p.w;
    const int64_t bid = blockIdx.x;
    const int64_t tile = p.n_tiles - 1 - bid % p.n_tiles; /* heaviest first */
    const int64_t r = bid / p.n_tiles; /* row b * H + h */
    const int64_t h = r % p.H, b = r / p.H;
    const int64_t rho0 = tile * BQ; /* first (j, g) row, j-major */
    const int64_t jq0 = rho0 / G;
    const int64_t jq1 = min64(n - 1, (rho0 + BQ - 1) / G);
    const int64_t seen0 = p.row_seen[r], rs = p.row_slots[r];

    /* Non-padding tokens before jq0, and the first non-padding token. */
    long long before = jq0, first = 0;
    if (p.f.pad != nullptr) {
        long long c = 0, f = kNever;
        for (int64_t t = tid; t <= jq1; t += kThreads) {
            const bool np = !p.f.is_pad(b, t);
            if (t < jq0)
                c += np;
            if (np && t < f)
                f = t;
        }
        before = block_reduce(c, red, OpSum());
        first = block_reduce(f, red, OpMin());
    }
    for (int x = tid; x < BQ; x += kThreads)
        jflag[x] = jq0 + x <= jq1 && !p.f.is_pad(b, jq0 + x);
    __syncthreads();
    long long qmin = kNever, qmax = -1;
    for (int x = tid; x < BQ; x += kThreads) {
        const int64_t rho = rho0 + x;
        int64_t pos = -1;
        if (rho < NG && jflag[rho / G - jq0]) {
            pos = seen0 + before;
            for (int64_t y = 0; y < rho / G - jq0; ++y)
                pos += jflag[y];
        }
        qpos[x] = pos;
        if (pos >= 0) {
            qmin = pos < qmin ? pos : qmin;
            qmax = pos > qmax ? pos : qmax;
        }
    }
    qmin = block_reduce(qmin, red, OpMin());
    qmax = block_reduce(qmax, red, OpMax()); /* also publishes qpos */

    /* Queries (zeros for padding rows) and the output accumulator. */
    for (int x = warp; x < BQ; x += kWarps) {
        const int64_t rho = rho0 + x;
        float *orow = Os + x * ld;
        load_row_or_zero(Qs + x * ld, qpos[x] >= 0, p.q,
                         p.q.at(b, h * G + rho % G, rho / G), D, lane);
        for (int d = lane; d < D; d += 32)
            orow[d] = 0.0f;
    }

    int64_t pj[RA];
    float m[RA], lpart[RA], alpha[RA];
#pragma unroll
    for (int a = 0; a < RA; ++a) {
        pj[a] = qpos[ty + 16 * a];
        m[a] = -INFINITY;
        lpart[a] = 0.0f;
        alpha[a] = 1.0f;
    }

    /* The last cached token's flag is this call's first decision. */
    const int64_t W1 = w + 1;
    const int32_t last_slot =
        seen0 > 0 ? p.window[r * W1 + (seen0 - 1) % W1] : -1;
    const int first_dec =
        (seen0 > 0 && qmax >= 0) ? p.f.decision(b, h, first) : 0;
    const int64_t last_lim = limit_for(first_dec, seen0 - 1, w);
    const int32_t *ptab = p.page_table + r * p.max_pages;

    const int64_t n_ct = qmax >= 0 ? (rs + BK - 1) / BK : 0;
    const int64_t n_nt = qmax >= 0 ? jq1 / BK + 1 : 0;
    const int64_t n_it = n_ct + n_nt;
    MetaCtx mc;
    mc.b = b;
    mc.h = h;
    mc.seen0 = seen0;
    mc.rs = rs;
    mc.n_ct = n_ct;
    mc.qmin = qmin;
    mc.qmax = qmax;
    mc.last_slot = last_slot;
    mc.last_lim = last_lim;
    mc.ptab = ptab;
    mc.nbase = 0;
    /*
     * Key tile `it` is described by meta buffer it % 2 (kpos, klim, ksrc);
     * warp 0 fills the next tile's buffer while the block computes this
     * one, and the barrier that ends the iteration publishes it together
     * with whether any query of the block sees a key of it.
     */
    bool lane_any = false;
    if (warp == 0 && n_it > 0)
        lane_any = prefill_meta<BK>(p, mc, 0, meta);
    bool live = __syncthreads_or(lane_any);
    for (int64_t it = 0; it < n_it; ++it) {
        const int64_t *kpos = meta + (it & 1) * 3 * BK;
        const int64_t *klim = kpos + BK, *ksrc = klim + BK;
        int64_t *next = meta + ((it + 1) & 1) * 3 * BK;
        lane_any = false;
        if (!live) { /* no query of the block sees this tile: skip it */
            if (warp == 0 && it + 1 < n_it)
                lane_any = prefill_meta<BK>(p, mc, it + 1, next);
            live = __syncthreads_or(lane_any);
            continue;
        }
        const bool cached = it < n_ct;
        for (int rr = warp; rr < BK; rr += kWarps) {
            const int64_t src = ksrc[rr];
            float *krow = Ks + rr * ld, *vrow = Vs + rr * ld;
            if (src >= 0 && cached && p.fmt != DMS_KV_NATIVE) {
                const uint8_t *kc = (const uint8_t *)p.k_pages + src * D;
                const uint8_t *vc = (const uint8_t *)p.v_pages + src * D;
                const float ks = p.k_scales[src], vs = p.v_scales[src];
                const int e5m2 = p.fmt == DMS_KV_FP8_E5M2;
                for (int d = lane; d < D; d += 32) {
                    krow[d] = dms_fp8_to_f32(kc[d], e5m2) * ks;
                    vrow[d] = dms_fp8_to_f32(vc[d], e5m2) * vs;
                }
            } else if (src >= 0 && cached) {
                const int64_t off = src * D;
                for (int d = lane; d < D; d += 32) {
                    krow[d] = dms_load(p.k_pages, p.dtype, off + d);
                    vrow[d] = dms_load(p.v_pages, p.dtype, off + d);
                }
            } else if (src >= 0) {
                const int64_t koff = p.k.at(b, h, src);
                const int64_t voff = p.v.at(b, h, src);
                for (int d = lane; d < D; d += 32) {
                    krow[d] = dms_load(p.k.data, p.k.dtype, koff + d);
                    vrow[d] = dms_load(p.v.data, p.v.dtype, voff + d);
                }
                if (p.fmt != DMS_KV_NATIVE) { /* as append will store them */
                    fp8_round_row(krow, D, p.fmt, lane);
                    fp8_round_row(vrow, D, p.fmt, lane);
                }
            } else { /* padding or past the end: zeros, never NaN */
                for (int d = lane; d < D; d += 32) {
                    krow[d] = 0.0f;
                    vrow[d] = 0.0f;
                }
            }
        }
        int64_t kpv[CB], klv[CB];
#pragma unroll
        for (int b2 = 0; b2 < CB; ++b2) {
            kpv[b2] = kpos[tx + 8 * b2];
            klv[b2] = klim[tx + 8 * b2];
        }
        __syncthreads();
        if (warp == 0 && it + 1 < n_it)
            lane_any = prefill_meta<BK>(p, mc, it + 1, next);

        float acc[RA][CB];
        tile_dot<RA, CB>(Qs + ty * ld, Ks + tx * ld, ld, D, acc);
#pragma unroll
        for (int a = 0; a < RA; ++a) {
            float s[CB];
            float tmax = -INFINITY;
#pragma unroll
            for (int b2 = 0; b2 < CB; ++b2) {
                const bool vis = pj[a] >= 0 && kpv[b2] <= pj[a] &&
                                 pj[a] < klv[b2];
                s[b2] = vis ? p.scale * acc[a][b2] : -INFINITY;
                tmax = fmaxf(tmax, s[b2]);
            }
            tmax = group8_max(tmax);
            const float m_new = fmaxf(m[a], tmax);
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
        /* Ks, Vs, Ps are rewritten next; the next meta buffer is ready */
        live = __syncthreads_or(lane_any);
    }

#pragma unroll
    for (int a = 0; a < RA; ++a) {
        const float l = group8_sum(lpart[a]);
        const int x = ty + 16 * a;
        const int64_t rho = rho0 + x;
        if (tx == 0) {
            /* padding query: 0 and -inf; any other sees its own key, so a
             * sum that is not positive means NaN scores: NaN, as PyTorch */
            const bool query = pj[a] >= 0, live = query && l > 0.0f;
            rinv[x] = live ? 1.0f / l : (query ? NAN : 0.0f);
            if (rho < NG)
                ((float *)p.lse.data)[p.lse.at(b, h * G + rho % G, rho / G)] =
                    live ? m[a] + logf(l) : (query ? NAN : -INFINITY);
        }
    }
    __syncthreads();
    for (int x = warp; x < BQ; x += kWarps) {
        const int64_t rho = rho0 + x;
        if (rho >= NG)
            break;
        const float inv = rinv[x]; /* 0: padding query, o = 0 */
        store_row_scaled(p.o, p.o.at(b, h * G + rho % G, rho / G),
                         Os + x * ld, inv, inv != 0.0f, D, lane);
    }
}

/* ---- decode attention --------------------------------------------------- */

constexpr int kDecodeThreads = 128;
constexpr int kDecodeWarps = kDecodeThreads / 32;

struct DecodeParams {
    DmsView3 q, o, lse; /* [B, H*G, 1, (D)]: strides of dims 0-2 */
    const void *k_pages, *v_pages;
    const float *k_scales, *v_scales; /* FP8 pages (else nullptr)       */
    int e5m2;                         /* FP8: E5M2 (else E4M3) codes    */
    const int32_t *page_table, *row_slots;
    float *ws; /* [B*H*G, S, D + 2], or nullptr: write o / lse directly */
    int64_t H, G, P, max_pages, S;
    int D, GP, ldk, KC, vb; /* GP: G rounded up to 4; ldk: odd >= D */
    float scale;
};

/* Element types of the pool: raw storage and exact conversion to float. */
template <dms_dtype DT>
struct Elem;
template <>
struct Elem<DMS_FLOAT32> {
    typedef float raw;
    static __device__ __forceinline__ float f(float x) { return x; }
};
template <>
struct Elem<DMS_FLOAT16> {
    typedef uint16_t raw;
    static __device__ __forceinline__ float f(uint16_t x)
    {
#if defined(__CUDA_ARCH__)
        return __half2float(__ushort_as_half(x));
#else
        return dms_f16_to_f32(x);
#endif
    }
};
template <>
struct Elem<DMS_BFLOAT16> {
    typedef uint16_t raw;
    static __device__ __forceinline__ float f(uint16_t x)
    {
        return dms_bf16_to_f32(x);
    }
};

/* Shared-memory layout of the decode kernel, in bytes from the base. */
struct DecodeLayout {
    int64_t slots, qt, ks, vs, ss, acc, stat, total;
};

__host__ __device__ __forceinline__ int64_t round16(int64_t x)
{
    return (x + 15) & ~(int64_t)15;
}

__host__ __device__ __forceinline__ DecodeLayout
decode_layout(int64_t D, int64_t GP, int64_t ldk, int64_t KC)
{
    DecodeLayout L;
    L.slots = 0;                                  /* int64 [KC]     */
    L.qt = round16(L.slots + KC * 8);             /* float [D][GP]  */
    L.ks = round16(L.qt + D * GP * 4);            /* float [KC][ldk] */
    L.vs = round16(L.ks + KC * ldk * 4);          /* float [KC][D]  */
    L.ss = round16(L.vs + KC * D * 4);            /* float [KC][GP] */
    L.acc = round16(L.ss + KC * GP * 4);          /* float [GP][D]  */
    L.stat = round16(L.acc + GP * D * 4);         /* float m, l, alpha [GP] */
    L.total = round16(L.stat + 3 * GP * 4);
    return L;
}

/* K and V rows of the chunk's kc slots into Ks / Vs as float32. */
template <dms_dtype DT, int VB>
__device__ __forceinline__ void decode_gather(const DecodeParams &p,
                                              const int64_t *sslot, int kc,
                                              float *Ks, float *Vs)
{
    typedef typename Elem<DT>::raw R;
    typedef typename VecOf<VB>::type V;
    constexpr int N = VB / (int)sizeof(R);
    constexpr int U = 4; /* units in flight per thread */
    static_assert(N >= 1, "vector narrower than an element");
    union Unpack {
        V v;
        R e[N];
    };
    const int D = p.D, ldk = p.ldk;
    const int upr = D / N; /* units per row (the host made D % N == 0) */
    const int total = kc * upr;
    const char *kb = (const char *)p.k_pages, *vb = (const char *)p.v_pages;
    for (int base = threadIdx.x; base < total; base += kDecodeThreads * U) {
        Unpack ku[U], vu[U];
#pragma unroll
        for (int u = 0; u < U; ++u) {
            const int idx = base + u * kDecodeThreads;
            if (idx < total) {
                const int k = idx / upr, e = (idx - k * upr) * N;
                const int64_t off = (sslot[k] * D + e) * (int64_t)sizeof(R);
                ku[u].v = *(const V *)(kb + off);
                vu[u].v = *(const V *)(vb + off);
            }
        }
#pragma unroll
        for (int u = 0; u < U; ++u) {
            const int idx = base + u * kDecodeThreads;
            if (idx < total) {
                const int k = idx / upr, e = (idx - k * upr) * N;
#pragma unroll
                for (int i = 0; i < N; ++i) {
                    Ks[k * ldk + e + i] = Elem<DT>::f(ku[u].e[i]);
                    Vs[k * D + e + i] = Elem<DT>::f(vu[u].e[i]);
                }
            }
        }
    }
}

/* FP8 pages: VB codes per load, widened and scaled by their slot's scale
 * (the kernel instance of DT = DMS_UINT8). */
template <int VB>
__device__ __forceinline__ void decode_gather_fp8(const DecodeParams &p,
                                                  const int64_t *sslot,
                                                  int kc, float *Ks, float *Vs)
{
    typedef typename VecOf<VB>::type V;
    union Unpack {
        V v;
        uint8_t e[VB];
    };
    const int D = p.D, ldk = p.ldk, upr = D / VB, total = kc * upr;
    const char *kb = (const char *)p.k_pages, *vb = (const char *)p.v_pages;
    for (int idx = threadIdx.x; idx < total; idx += kDecodeThreads) {
        const int k = idx / upr, e = (idx - k * upr) * VB;
        const int64_t off = sslot[k] * D + e;
        Unpack ku, vu;
        ku.v = *(const V *)(kb + off);
        vu.v = *(const V *)(vb + off);
        const float ks = p.k_scales[sslot[k]], vs = p.v_scales[sslot[k]];
#pragma unroll
        for (int i = 0; i < VB; ++i) {
            Ks[k * ldk + e + i] = dms_fp8_to_f32(ku.e[i], p.e5m2) * ks;
            Vs[k * D + e + i] = dms_fp8_to_f32(vu.e[i], p.e5m2) * vs;
        }
    }
}

template <dms_dtype DT>
__device__ __forceinline__ void decode_gather_any(const DecodeParams &p,
                                                  const int64_t *sslot,
                                                  int kc, float *Ks, float *Vs)
{
    if constexpr (DT == DMS_UINT8) {
        switch (p.vb) {
        case 16: decode_gather_fp8<16>(p, sslot, kc, Ks, Vs); return;
        case 8: decode_gather_fp8<8>(p, sslot, kc, Ks, Vs); return;
        case 4: decode_gather_fp8<4>(p, sslot, kc, Ks, Vs); return;
        case 2: decode_gather_fp8<2>(p, sslot, kc, Ks, Vs); return;
        default: decode_gather_fp8<1>(p, sslot, kc, Ks, Vs); return;
        }
    } else {
    /* p.vb is never narrower than an element (widest_vector) */
    constexpr int kNarrowest = (int)sizeof(typename Elem<DT>::raw);
    switch (p.vb) {
    case 16:
        decode_gather<DT, 16>(p, sslot, kc, Ks, Vs);
        break;
    case 8:
        decode_gather<DT, 8>(p, sslot, kc, Ks, Vs);
        break;
    default:
        if (kNarrowest < 4 && p.vb == 4)
            decode_gather<DT, 4>(p, sslot, kc, Ks, Vs);
        else
            decode_gather<DT, kNarrowest>(p, sslot, kc, Ks, Vs);
        break;
    }
    }
}

template <dms_dtype DT>
__global__ void __launch_bounds__(kDecodeThreads)
    decode_kernel(DecodeParams p)
{
    extern __shared__ __align__(16) unsigned char dms_smem_bytes[];
    const DecodeLayout L = decode_layout(p.D, p.GP, p.ldk, p.KC);
    int64_t *sslot = (int64_t *)(dms_smem_bytes + L.slots);
    float *Qt = (float *)(dms_smem_bytes + L.qt);
    float *Ks = (float *)(dms_smem_bytes + L.ks);
    float *Vs = (float *)(dms_smem_bytes + L.vs);
    float *Ss = (float *)(dms_smem_bytes + L.ss);
    float *Acc = (float *)(dms_smem_bytes + L.acc);
    float *mst = (float *)(dms_smem_bytes + L.stat);
    float *lst = mst + p.GP, *ast = lst + p.GP;

    const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
    const int D = p.D, GP = p.GP, ldk = p.ldk, KC = p.KC, ng4 = GP / 4;
    const int64_t G = p.G, S = p.S;
    const int64_t split = blockIdx.x % S, r = blockIdx.x / S;
    const int64_t b = r / p.H, h = r % p.H;
    const int64_t rs = p.row_slots[r];
    const int64_t n_chunks = rs > 0 ? (rs + KC - 1) / KC : 0;
    const int64_t c_lo = n_chunks * split / S;
    const int64_t c_hi = n_chunks * (split + 1) / S;
    const int32_t *ptab = p.page_table + r * p.max_pages;

    for (int idx = tid; idx < GP * D; idx += kDecodeThreads) {
        const int g = idx / D, d = idx - g * D;
        float v = 0.0f;
        if (g < G)
            v = dms_load(p.q.data, p.q.dtype, p.q.at(b, h * G + g, 0) + d);
        Qt[d * GP + g] = v;
        Acc[idx] = 0.0f;
    }
    for (int g = tid; g < GP; g += kDecodeThreads) {
        mst[g] = -INFINITY;
        lst[g] = 0.0f;
        ast[g] = 1.0f;
    }

    for (int64_t c = c_lo; c < c_hi; ++c) {
        const int64_t i0 = c * KC;
        const int kc = (int)min64(KC, rs - i0);
        for (int k = tid; k < kc; k += kDecodeThreads) {
            const int64_t i = i0 + k;
            sslot[k] = (int64_t)ptab[i / p.P] * p.P + i % p.P;
        }
        __syncthreads(); /* also: the previous chunk is done with Ks, Vs */
        decode_gather_any<DT>(p, sslot, kc, Ks, Vs);
        __syncthreads();

        /* scores of key k for heads 4 g4 .. 4 g4 + 3 */
        for (int item = tid; item < KC * ng4; item += kDecodeThreads) {
            const int k = item % KC, g4 = item / KC;
            float4 s = make_float4(-INFINITY, -INFINITY, -INFINITY,
                                   -INFINITY);
            if (k < kc) {
                float4 acc = make_float4(0.0f, 0.0f, 0.0f, 0.0f);
                const float *krow = Ks + k * ldk;
                const float *qcol = Qt + g4 * 4;
#pragma unroll 4
                for (int d = 0; d < D; ++d) {
                    const float kv = krow[d];
                    const float4 qv = *(const float4 *)(qcol + d * GP);
                    acc.x = fmaf(qv.x, kv, acc.x);
                    acc.y = fmaf(qv.y, kv, acc.y);
                    acc.z = fmaf(qv.z, kv, acc.z);
                    acc.w = fmaf(qv.w, kv, acc.w);
                }
                s = make_float4(p.scale * acc.x, p.scale * acc.y,
                                p.scale * acc.z, p.scale * acc.w);
            }
            *(float4 *)(Ss + k * GP + g4 * 4) = s;
        }
        __syncthreads();

        /* online softmax, one warp per head */
        for (int g = warp; g < GP; g += kDecodeWarps) {
            if (g >= G) { /* padding head: nothing to accumulate */
                for (int k = lane; k < KC; k += 32)
                    Ss[k * GP + g] = 0.0f;
                continue;
            }
            float mx = -INFINITY;
            for (int k = lane; k < KC; k += 32)
                mx = fmaxf(mx, Ss[k * GP + g]);
            mx = warp_max(mx);
            const float m_old = mst[g], m_new = fmaxf(m_old, mx);
            const float ref = m_new == -INFINITY ? 0.0f : m_new;
            const float alpha =
                m_new == -INFINITY ? 1.0f : expf(m_old - m_new);
            float sum = 0.0f;
            for (int k = lane; k < KC; k += 32) {
                const float pr = expf(Ss[k * GP + g] - ref);
                Ss[k * GP + g] = pr;
                sum += pr;
            }
            sum = warp_sum(sum);
            if (lane == 0) {
                mst[g] = m_new;
                lst[g] = lst[g] * alpha + sum;
                ast[g] = alpha;
            }
        }
        __syncthreads();

        /* Acc[g][d] = Acc[g][d] * alpha[g] + sum_k P[k][g] V[k][d] */
        for (int item = tid; item < ng4 * D; item += kDecodeThreads) {
            const int g4 = item / D, d = item - g4 * D;
            float *a0 = Acc + (g4 * 4) * D + d;
            float4 acc = make_float4(a0[0] * ast[g4 * 4],
                                     a0[D] * ast[g4 * 4 + 1],
                                     a0[2 * D] * ast[g4 * 4 + 2],
                                     a0[3 * D] * ast[g4 * 4 + 3]);
            const float *pcol = Ss + g4 * 4;
#pragma unroll 4
            for (int k = 0; k < kc; ++k) {
                const float vv = Vs[k * D + d];
                const float4 pr = *(const float4 *)(pcol + k * GP);
                acc.x = fmaf(pr.x, vv, acc.x);
                acc.y = fmaf(pr.y, vv, acc.y);
                acc.z = fmaf(pr.z, vv, acc.z);
                acc.w = fmaf(pr.w, vv, acc.w);
            }
            a0[0] = acc.x;
            a0[D] = acc.y;
            a0[2 * D] = acc.z;
            a0[3 * D] = acc.w;
        }
        /* the next chunk's first barrier orders Acc, Ss, Vs reuse */
    }
    __syncthreads();

    /* A row with stored slots sees at least the query's own token: a sum
     * that is not positive there is NaN (NaN scores), and so is the result,
     * as in PyTorch; an empty row (or an empty range of a split) gives 0. */
    for (int idx = tid; idx < G * D; idx += kDecodeThreads) {
        const int g = idx / D, d = idx - g * D;
        const float l = lst[g];
        const float val = l > 0.0f ? Acc[idx] / l : (l == 0.0f ? 0.0f : NAN);
        if (p.ws != nullptr)
            p.ws[((r * G + g) * S + split) * (D + 2) + d] = val;
        else
            dms_store(p.o.data, p.o.dtype, p.o.at(b, h * G + g, 0) + d, val);
    }
    for (int g = tid; g < G; g += kDecodeThreads) {
        const float l = lst[g];
        if (p.ws != nullptr) {
            float *cell = p.ws + ((r * G + g) * S + split) * (D + 2);
            cell[D] = mst[g];
            cell[D + 1] = l;
        } else {
            ((float *)p.lse.data)[p.lse.at(b, h * G + g, 0)] =
                l > 0.0f ? mst[g] + logf(l) : (l == 0.0f ? -INFINITY : NAN);
        }
    }
}

/* Merges the S ranges of one query head (block) by log-sum-exp. */
__global__ void __launch_bounds__(kDecodeThreads)
    decode_combine_kernel(DecodeParams p)
{
    const int64_t G = p.G, S = p.S, qr = blockIdx.x; /* (b * H + h) * G + g */
    const int D = p.D;
    const int64_t r = qr / G, g = qr % G, b = r / p.H, h = r % p.H;
    const float *cell = p.ws + qr * S * (D + 2);
    float mx = -INFINITY, L = 0.0f;
    bool poisoned = false; /* a range whose sum is NaN: NaN scores */
    for (int64_t s = 0; s < S; ++s) {
        const float l = cell[s * (D + 2) + D + 1];
        poisoned |= !(l >= 0.0f);
        if (l > 0.0f)
            mx = fmaxf(mx, cell[s * (D + 2) + D]);
    }
    for (int64_t s = 0; s < S; ++s) {
        const float l = cell[s * (D + 2) + D + 1];
        if (l > 0.0f)
            L += l * expf(cell[s * (D + 2) + D] - mx);
    }
    for (int d = threadIdx.x; d < D; d += kDecodeThreads) {
        float acc = 0.0f;
        for (int64_t s = 0; s < S; ++s) {
            const float l = cell[s * (D + 2) + D + 1];
            if (l > 0.0f)
                acc += l * expf(cell[s * (D + 2) + D] - mx) *
                       cell[s * (D + 2) + d];
        }
        dms_store(p.o.data, p.o.dtype, p.o.at(b, h * G + g, 0) + d,
                  poisoned ? NAN : L > 0.0f ? acc / L : 0.0f);
    }
    if (threadIdx.x == 0)
        ((float *)p.lse.data)[p.lse.at(b, h * G + g, 0)] =
            poisoned ? NAN : L > 0.0f ? mx + logf(L) : -INFINITY;
}

/* ---- host side ---------------------------------------------------------- */

DmsView3 view3(const dms_tensor *t)
{
    return dms_view3(t);
}

/* The largest of 16, 8, 4, 2 bytes that divides every value (>= esize). */
int widest_vector(const int64_t *values, int count, int64_t esize)
{
    for (int vb = 16; vb > (int)esize; vb /= 2) {
        bool ok = true;
        for (int i = 0; i < count && ok; ++i)
            ok = values[i] % vb == 0;
        if (ok)
            return vb;
    }
    return (int)esize;
}

int64_t ptr_bits(const void *ptr)
{
    return (int64_t)(uintptr_t)ptr;
}

/* Device of the call: the q / k_new tensors (cache views carry none). */
int call_device(const dms_cache_call *x)
{
    return x->k_new != NULL ? x->k_new->device_index : x->q->device_index;
}

template <int BQ, int BK>
bool try_prefill(const PrefillParams &p0, int64_t rows, int64_t limit,
                 cudaStream_t stream, dms_status *status)
{
    const int64_t smem = prefill_smem_bytes<BQ, BK>(p0.ld);
    if (smem > limit)
        return false;
    PrefillParams p = p0;
    p.n_tiles = (p.n * p.G + BQ - 1) / BQ;
    const int64_t blocks = p.n_tiles * rows;
    *status = grid_check(blocks, "prefill attention");
    if (*status != DMS_OK)
        return true;
    void (*kernel)(PrefillParams) = prefill_kernel<BQ, BK>;
    if (smem > 48 * 1024) {
        const cudaError_t e = cudaFuncSetAttribute(
            kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, (int)smem);
        if (e != cudaSuccess) {
            *status = dms_fail(DMS_ERR_CUDA, "cudaFuncSetAttribute failed at "
                               "%s:%d: %s", __FILE__, __LINE__,
                               cudaGetErrorString(e));
            return true;
        }
    }
    kernel<<<(unsigned)blocks, kThreads, (size_t)smem, stream>>>(p);
    const cudaError_t e = cudaGetLastError();
    *status = e == cudaSuccess
                  ? DMS_OK
                  : dms_fail(DMS_ERR_CUDA, "prefill kernel launch failed at "
                             "%s:%d: %s", __FILE__, __LINE__,
                             cudaGetErrorString(e));
    return true;
}

} // namespace

extern "C" dms_status dms_cache_append_cuda(const dms_cache_call *x,
                                            void *stream)
{
    DmsDeviceGuard guard(call_device(x));
    DMS_CUDA_CHECK(guard.status());
    const dms_cache_view *c = &x->c;
    const cudaStream_t s = (cudaStream_t)stream;
    DMS_TRY(grid_check(c->R, "cache append"));

    AppendParams p;
    p.slot_limit = c->slot_limit;
    p.page_table = c->page_table;
    p.row_slots = c->row_slots;
    p.row_seen = c->row_seen;
    p.window = c->window;
    p.free_pages = c->free_pages;
    p.free_count = c->free_count;
    p.n_pages = c->n_pages;
    p.n_slots = c->n_pages * c->P;
    p.P = c->P;
    p.w = c->w;
    p.max_pages = c->max_pages;
    p.H = x->H;
    p.n = x->n;
    p.f = make_flags(x);
    p.token_slots = (int32_t *)x->token_slots->data;
    p.ts0 = x->token_slots->strides[0];
    p.ts1 = x->token_slots->strides[1];
    p.ts2 = x->token_slots->strides[2];
    const int64_t span = c->w > 1 ? c->w : 1; /* tokens per tile at most */
    const int64_t want = x->n < span ? x->n : span;
    int threads = (int)((want + 31) / 32 * 32);
    threads = threads < 32 ? 32 : threads;
    threads = threads > kAppendMaxThreads ? kAppendMaxThreads : threads;
    p.tile = (int)(span < threads ? span : threads);
    append_slots_kernel<<<(unsigned)c->R, threads, 0, s>>>(p);
    DMS_CUDA_CHECK(cudaGetLastError());

    CopyParams cp;
    const int64_t esize = (int64_t)dms_dtype_size(c->dtype);
    const dms_tensor *k = x->k_new, *v = x->v_new;
    cp.k_src = (const char *)k->data;
    cp.v_src = (const char *)v->data;
    cp.ks0 = k->strides[0];
    cp.ks1 = k->strides[1];
    cp.ks2 = k->strides[2];
    cp.vs0 = v->strides[0];
    cp.vs1 = v->strides[1];
    cp.vs2 = v->strides[2];
    cp.k_dst = (char *)c->k_pages;
    cp.v_dst = (char *)c->v_pages;
    cp.token_slots = p.token_slots;
    cp.ts0 = p.ts0;
    cp.ts1 = p.ts1;
    cp.ts2 = p.ts2;
    cp.H = x->H;
    cp.n = x->n;
    cp.tokens = x->B * x->H * x->n;
    cp.row_bytes = c->D * esize;
    cp.esize = esize;
    const int64_t align[] = {
        ptr_bits(cp.k_src), ptr_bits(cp.v_src), ptr_bits(cp.k_dst),
        ptr_bits(cp.v_dst), cp.row_bytes,       cp.ks0 * esize,
        cp.ks1 * esize,     cp.ks2 * esize,     cp.vs0 * esize,
        cp.vs1 * esize,     cp.vs2 * esize};
    cp.vb = widest_vector(align, (int)(sizeof align / sizeof align[0]),
                          esize);
    cp.fmt = c->fmt;
    cp.src_dtype = c->dtype;
    cp.D = c->D;
    cp.k_scales = c->k_scales;
    cp.v_scales = c->v_scales;
    const int copy_threads = 256;
    append_copy_kernel<<<dms_grid_for(cp.tokens * 32, copy_threads),
                         copy_threads, 0, s>>>(cp);
    DMS_CUDA_CHECK(cudaGetLastError());
    return DMS_OK;
}

extern "C" dms_status dms_attn_prefill_cuda(const dms_cache_call *x,
                                            void *stream)
{
    DmsDeviceGuard guard(call_device(x));
    DMS_CUDA_CHECK(guard.status());
    const dms_cache_view *c = &x->c;
    int64_t limit = 0;
    DMS_TRY(smem_optin_limit(call_device(x), &limit));

    PrefillParams p;
    p.q = view3(x->q);
    p.k = view3(x->k_new);
    p.v = view3(x->v_new);
    p.o = view3(x->o);
    p.lse = view3(x->lse);
    p.f = make_flags(x);
    p.k_pages = c->k_pages;
    p.v_pages = c->v_pages;
    p.dtype = c->dtype;
    p.fmt = c->fmt;
    p.k_scales = c->k_scales;
    p.v_scales = c->v_scales;
    p.slot_limit = c->slot_limit;
    p.page_table = c->page_table;
    p.row_slots = c->row_slots;
    p.row_seen = c->row_seen;
    p.window = c->window;
    p.H = x->H;
    p.G = x->G;
    p.n = x->n;
    p.P = c->P;
    p.w = c->w;
    p.max_pages = c->max_pages;
    p.n_tiles = 0;
    p.D = (int)c->D;
    p.ld = odd_ld(c->D);
    p.scale = x->scale;

    const cudaStream_t s = (cudaStream_t)stream;
    const int64_t rows = x->B * x->H;
    dms_status status = DMS_OK;
    if (try_prefill<64, 32>(p, rows, limit, s, &status) ||
        try_prefill<32, 32>(p, rows, limit, s, &status) ||
        try_prefill<16, 16>(p, rows, limit, s, &status))
        return status;
    return dms_fail(DMS_ERR_SHAPE, "q: head dim %lld needs %lld bytes of "
                    "shared memory per block in the CUDA prefill kernel, "
                    "this GPU allows %lld", (long long)c->D,
                    (long long)prefill_smem_bytes<16, 16>(p.ld),
                    (long long)limit);
}

extern "C" dms_status dms_attn_decode_cuda(const dms_cache_call *x,
                                           void *stream)
{
    const int device = call_device(x);
    DmsDeviceGuard guard(device);
    DMS_CUDA_CHECK(guard.status());
    const dms_cache_view *c = &x->c;
    int64_t limit = 0;
    DMS_TRY(smem_optin_limit(device, &limit));

    DecodeParams p;
    p.q = view3(x->q);
    p.o = view3(x->o);
    p.lse = view3(x->lse);
    p.k_pages = c->k_pages;
    p.v_pages = c->v_pages;
    p.k_scales = c->k_scales;
    p.v_scales = c->v_scales;
    p.e5m2 = c->fmt == DMS_KV_FP8_E5M2;
    p.page_table = c->page_table;
    p.row_slots = c->row_slots;
    p.H = x->H;
    p.G = x->G;
    p.P = c->P;
    p.max_pages = c->max_pages;
    p.S = x->workspace != NULL ? x->workspace->shape[1] : 1;
    p.ws = (x->workspace != NULL && p.S > 1) ? (float *)x->workspace->data
                                              : nullptr;
    p.D = (int)c->D;
    p.GP = (int)((x->G + 3) / 4 * 4);
    p.ldk = odd_ld(c->D);
    p.scale = x->scale;
    const int64_t esize =
        c->fmt != DMS_KV_NATIVE ? 1 : (int64_t)dms_dtype_size(c->dtype);
    const int64_t align[] = {ptr_bits(c->k_pages), ptr_bits(c->v_pages),
                             c->D * esize};
    p.vb = widest_vector(align, 3, esize);

    /* Keys per chunk: as many as fit, at most 64 (32 past D = 128). */
    int kc = c->D <= 128 ? 64 : 32;
    while (kc > 8 && decode_layout(p.D, p.GP, p.ldk, kc).total > limit)
        kc /= 2;
    const int64_t smem = decode_layout(p.D, p.GP, p.ldk, kc).total;
    if (smem > limit)
        return dms_fail(DMS_ERR_SHAPE, "q: %lld query heads per kv head of "
                        "dim %lld need %lld bytes of shared memory in the "
                        "CUDA decode kernel, this GPU allows %lld",
                        (long long)x->G, (long long)c->D, (long long)smem,
                        (long long)limit);
    p.KC = kc;

    const cudaStream_t s = (cudaStream_t)stream;
    const int64_t blocks = c->R * p.S;
    DMS_TRY(grid_check(blocks, "decode attention"));
    void (*kernel)(DecodeParams);
    switch (c->fmt != DMS_KV_NATIVE ? DMS_UINT8 : c->dtype) {
    case DMS_UINT8:
        kernel = decode_kernel<DMS_UINT8>;
        break;
    case DMS_FLOAT32:
        kernel = decode_kernel<DMS_FLOAT32>;
        break;
    case DMS_FLOAT16:
        kernel = decode_kernel<DMS_FLOAT16>;
        break;
    default:
        kernel = decode_kernel<DMS_BFLOAT16>;
        break;
    }
    if (smem > 48 * 1024)
        DMS_CUDA_CHECK(cudaFuncSetAttribute(
            kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, (int)smem));
    kernel<<<(unsigned)blocks, kDecodeThreads, (size_t)smem, s>>>(p);
    DMS_CUDA_CHECK(cudaGetLastError());
    if (p.ws != nullptr) {
        const int64_t heads = c->R * x->G;
        DMS_TRY(grid_check(heads, "decode attention"));
        decode_combine_kernel<<<(unsigned)heads, kDecodeThreads, 0, s>>>(p);
        DMS_CUDA_CHECK(cudaGetLastError());
    }
    return DMS_OK;
}
