/*
 * cuda_runtime.h - the CUDA runtime as the kernels of csrc/cuda/ see it,
 * emulated on the host for tests/cuda_emu (testing only, never shipped).
 *
 * Every CUDA thread of a block is a host thread; blocks of a grid run one
 * after another. __syncthreads is a real std::barrier over the block, every
 * warp collective (shuffle, ballot, mma, ldmatrix) a barrier over the 32
 * lanes, so a missing barrier or a lane that skips a collective shows up as
 * a wrong result or a hang rather than passing by luck. Shared memory
 * starts as NaN (0x7fc0 halves: NaN in float32, float16 and bfloat16).
 */
#pragma once
#include <math.h>
#include <stddef.h>
#include <stdint.h>
#include <string.h>

#include <atomic>
#include <barrier>
#include <cstdio>
#include <cstdlib>
#include <functional>
#include <memory>
#include <mutex>
#include <thread>
#include <vector>

#define __global__
#define __device__
#define __host__
#define __forceinline__ inline
#define __launch_bounds__(...)
/* Static __shared__ arrays are shared by the block's threads; one block
 * runs at a time, so a static variable is exactly that. (The dynamic
 * `extern __shared__` arrays are rewritten by build.py to emu_smem.) */
#define __shared__ static
#define __align__(n) alignas(n)

typedef int cudaError_t;
enum { cudaSuccess = 0, cudaErrorInvalidValue = 1, cudaErrorLaunch = 2 };
typedef void *cudaStream_t;
enum cudaFuncAttribute { cudaFuncAttributeMaxDynamicSharedMemorySize = 8 };
enum cudaDeviceAttr { cudaDevAttrMaxSharedMemoryPerBlockOptin = 97 };

struct emu_dim3 { unsigned x, y, z; };
extern thread_local emu_dim3 threadIdx, blockIdx;
extern emu_dim3 blockDim, gridDim;
extern int emu_smem_limit;           /* opt-in shared memory per block */
extern cudaError_t emu_last_error;
extern std::vector<std::pair<const void *, int>> emu_attrs;
extern unsigned char *emu_smem;      /* this block's dynamic shared memory */
extern size_t emu_smem_bytes;

[[noreturn]] void emu_die(const char *fmt, ...);

struct alignas(16) float4 { float x, y, z, w; };
struct alignas(16) uint4 { unsigned x, y, z, w; };
struct alignas(8) uint2 { unsigned x, y; };
static inline float4 make_float4(float a, float b, float c, float d) { return float4{a, b, c, d}; }

static inline cudaError_t cudaGetDevice(int *d) { *d = 0; return cudaSuccess; }
static inline cudaError_t cudaSetDevice(int) { return cudaSuccess; }
static inline const char *cudaGetErrorString(cudaError_t e) { return e ? "emu error" : "no error"; }
static inline cudaError_t cudaGetLastError()
{
    cudaError_t e = emu_last_error;
    emu_last_error = 0;
    return e;
}
static inline cudaError_t cudaDeviceGetAttribute(int *v, cudaDeviceAttr a, int)
{
    if (a != cudaDevAttrMaxSharedMemoryPerBlockOptin) return cudaErrorInvalidValue;
    *v = emu_smem_limit;
    return cudaSuccess;
}
/* A launch above 48 KiB of dynamic shared memory fails unless the kernel
 * opted in first, as on the device. */
template <class F> cudaError_t cudaFuncSetAttribute(F *f, cudaFuncAttribute a, int v)
{
    if (a != cudaFuncAttributeMaxDynamicSharedMemorySize || v > emu_smem_limit) return cudaErrorInvalidValue;
    for (auto &e : emu_attrs)
        if (e.first == (const void *)f) { e.second = v; return cudaSuccess; }
    emu_attrs.push_back({(const void *)f, v});
    return cudaSuccess;
}
/* Stream-ordered allocation: host memory filled with NaN bytes, so a
 * workspace read before it is written shows. */
static inline cudaError_t cudaMallocAsync(void **p, size_t n, cudaStream_t)
{
    *p = malloc(n ? n : 1);
    if (!*p) return cudaErrorInvalidValue;
    memset(*p, 0xff, n);
    return cudaSuccess;
}
static inline cudaError_t cudaFreeAsync(void *p, cudaStream_t) { free(p); return cudaSuccess; }

/* ---- block barriers ---- */
void emu_syncthreads();
int emu_syncthreads_count(int pred);
static inline void __syncthreads() { emu_syncthreads(); }
static inline int __syncthreads_count(int pred) { return emu_syncthreads_count(pred != 0); }
static inline int __syncthreads_or(int pred) { return emu_syncthreads_count(pred != 0) != 0; }

/* ---- warp collectives ----
 * emu_warp_exchange: every lane of the caller's warp posts n <= 64 bytes,
 * then may read every lane's bytes (lane l's at ret + 64 l) until its next
 * collective. All 32 lanes must call: a partial mask is an error. */
const unsigned char *emu_warp_exchange(const void *mine, size_t n);
static inline void emu_full_mask(unsigned mask)
{
    if (mask != 0xffffffffu) emu_die("warp collective with a partial mask %08x", mask);
}
template <class V> static inline V emu_shfl_from(unsigned mask, V v, int src)
{
    emu_full_mask(mask);
    const unsigned char *all = emu_warp_exchange(&v, sizeof v);
    V r;
    memcpy(&r, all + 64 * src, sizeof r);
    return r;
}
static inline unsigned emu_lane() { return threadIdx.x % 32; }
static inline void __syncwarp(unsigned mask = 0xffffffffu)
{
    char z = 0;
    emu_full_mask(mask);
    emu_warp_exchange(&z, 1);
}
template <class V> static inline V __shfl_xor_sync(unsigned m, V v, int off) { return emu_shfl_from(m, v, (int)(emu_lane() ^ off)); }
template <class V> static inline V __shfl_sync(unsigned m, V v, int src) { return emu_shfl_from(m, v, src & 31); }
template <class V> static inline V __shfl_up_sync(unsigned m, V v, unsigned d)
{
    const int l = (int)emu_lane();
    return emu_shfl_from(m, v, l - (int)d >= 0 ? l - (int)d : l);
}
static inline unsigned __ballot_sync(unsigned mask, int pred)
{
    emu_full_mask(mask);
    const char mine = pred != 0;
    const unsigned char *all = emu_warp_exchange(&mine, 1);
    unsigned r = 0;
    for (int l = 0; l < 32; ++l)
        if (all[64 * l]) r |= 1u << l;
    return r;
}
static inline int __popc(unsigned x) { return __builtin_popcount(x); }
static inline int __ffs(int x) { return __builtin_ffs(x); }

/* ---- global atomics (one mutex: correctness, not speed) ---- */
extern std::mutex emu_atomic_mu;
static inline int atomicSub(int *p, int v) { std::lock_guard<std::mutex> g(emu_atomic_mu); int o = *p; *p = o - v; return o; }
static inline int atomicMin(int *p, int v) { std::lock_guard<std::mutex> g(emu_atomic_mu); int o = *p; if (v < o) *p = v; return o; }

/* shared-memory range check for ldmatrix / cp.async */
static inline bool emu_in_smem(const void *p, size_t n)
{
    const unsigned char *c = (const unsigned char *)p;
    return c >= emu_smem && c + n <= emu_smem + emu_smem_bytes;
}

/* kernel<<<grid, block, smem, stream>>>(args) is rewritten by build.py to
 * EMU_LAUNCH(kernel, grid, block, smem, stream, args). */
void emu_launch_impl(const void *kernel, unsigned grid, unsigned block, size_t smem, std::function<void()> body);
#define EMU_LAUNCH(kernel, grid, block, smem, stream, ...) \
    emu_launch_impl((const void *)(kernel), (grid), (block), (smem), [&] { kernel(__VA_ARGS__); })
