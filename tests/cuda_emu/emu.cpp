/*
 * emu.cpp - the emulated CUDA runtime behind include/cuda_runtime.h and
 * include/mma.cuh (tests/cuda_emu): launches, block barriers, warp
 * exchanges and cp.async queues. Linked with the rewritten kernels of
 * csrc/cuda/ and core/common.c into one shared library that the ctypes
 * harnesses load.
 */
#include "cuda_runtime.h"
#include "mma.cuh"

#include <array>
#include <cstdarg>
#include <deque>

thread_local emu_dim3 threadIdx, blockIdx;
emu_dim3 blockDim, gridDim;
int emu_smem_limit = 232448; /* an H100's opt-in limit; harnesses lower it */
cudaError_t emu_last_error = 0;
std::vector<std::pair<const void *, int>> emu_attrs;
unsigned char *emu_smem;
size_t emu_smem_bytes;
std::mutex emu_atomic_mu;
static long g_launches;
static size_t g_last_smem;

static thread_local std::barrier<> *t_block_bar;
static thread_local std::barrier<> *t_warp_bar;
static thread_local unsigned char (*t_xbuf)[32][64]; /* [slot][lane][bytes] of this warp */
static thread_local unsigned t_collectives;
static std::atomic<int> g_count; /* __syncthreads_count of the running block */

void emu_die(const char *fmt, ...)
{
    va_list ap;
    va_start(ap, fmt);
    fprintf(stderr, "EMU FATAL (block %u thread %u): ", blockIdx.x, threadIdx.x);
    vfprintf(stderr, fmt, ap);
    fprintf(stderr, "\n");
    fflush(stderr);
    va_end(ap);
    abort();
}

void emu_syncthreads() { t_block_bar->arrive_and_wait(); }

int emu_syncthreads_count(int pred)
{
    t_block_bar->arrive_and_wait(); /* the previous count has been read */
    if (threadIdx.x == 0) g_count = 0;
    t_block_bar->arrive_and_wait();
    if (pred) g_count++;
    t_block_bar->arrive_and_wait();
    return g_count.load();
}

/* Two slots used in turn make one barrier per exchange enough: a lane can
 * only write a slot again after every lane passed the next exchange's
 * barrier, that is, after every lane finished reading it. */
const unsigned char *emu_warp_exchange(const void *mine, size_t n)
{
    if (n > 64) emu_die("warp exchange of %zu bytes", n);
    unsigned char (*buf)[64] = t_xbuf[t_collectives++ & 1u];
    memcpy(buf[threadIdx.x % 32], mine, n);
    t_warp_bar->arrive_and_wait();
    return &buf[0][0];
}

/* ---- cp.async: per-thread queue of committed groups ----
 * EMU_CPASYNC=late (default): a copy lands only at the cp.async.wait_group
 * that retires its group, so reading before the wait sees NaN garbage;
 * EMU_CPASYNC=early: it lands at issue, so a prefetch that overwrites a
 * buffer still in use shows. */
struct Copy { void *dst; const void *src; size_t n; };
static thread_local std::vector<Copy> t_open;                /* not committed */
static thread_local std::deque<std::vector<Copy>> t_groups;  /* committed, oldest first */
static int g_cp_early = -1;
static std::atomic<long> g_cp_count{0};

namespace dms_mma {
static void cp_async(void *smem, const void *gmem, size_t n)
{
    if (((uintptr_t)smem & (n - 1)) || ((uintptr_t)gmem & (n - 1)))
        emu_die("cp.async %zu: misaligned %p <- %p", n, smem, gmem);
    if (!emu_in_smem(smem, n)) emu_die("cp.async: destination %p outside shared memory", smem);
    if (g_cp_early < 0) {
        const char *e = getenv("EMU_CPASYNC");
        g_cp_early = e && e[0] == 'e';
    }
    g_cp_count++;
    if (g_cp_early) memcpy(smem, gmem, n);
    else t_open.push_back({smem, gmem, n});
}
void emu_cp_async_16(void *smem, const void *gmem) { cp_async(smem, gmem, 16); }
void emu_cp_async_4(void *smem, const void *gmem) { cp_async(smem, gmem, 4); }
void emu_cp_async_commit()
{
    t_groups.push_back(std::move(t_open));
    t_open.clear();
}
void emu_cp_async_wait(int pending)
{
    while ((int)t_groups.size() > pending) {
        for (auto &c : t_groups.front()) memcpy(c.dst, c.src, c.n);
        t_groups.pop_front();
    }
}
/* True when no issued copy is still in flight; forgets empty groups. */
bool emu_cp_pending_empty()
{
    bool empty = t_open.empty();
    for (auto &g : t_groups) empty = empty && g.empty();
    t_groups.clear();
    t_open.clear();
    return empty;
}
} // namespace dms_mma

void emu_launch_impl(const void *kernel, unsigned grid, unsigned block, size_t smem, std::function<void()> body)
{
    if (smem > 48 * 1024) {
        int allowed = 48 * 1024;
        for (auto &e : emu_attrs)
            if (e.first == kernel) allowed = e.second;
        if ((int)smem > allowed) { emu_last_error = cudaErrorLaunch; return; }
    }
    if (block == 0 || block % 32 || block > 1024 || grid == 0) { emu_last_error = cudaErrorLaunch; return; }
    g_launches++;
    g_last_smem = smem;
    blockDim = {block, 1, 1};
    gridDim = {grid, 1, 1};
    std::vector<unsigned char> sm(smem + 16);
    unsigned char *base = sm.data();
    while ((uintptr_t)base & 15) ++base;
    emu_smem = base;
    emu_smem_bytes = smem;
    auto fill = [&] {
        for (size_t i = 0; i + 1 < smem; i += 2) { base[i] = 0xc0; base[i + 1] = 0x7f; }
    };
    fill();
    const unsigned nw = block / 32;
    std::vector<std::array<std::array<std::array<unsigned char, 64>, 32>, 2>> xb(nw);
    std::vector<std::unique_ptr<std::barrier<>>> wb;
    for (unsigned w = 0; w < nw; ++w) wb.emplace_back(new std::barrier<>(32));
    std::barrier<> bar(block);
    std::vector<std::thread> th;
    for (unsigned t = 0; t < block; ++t) {
        th.emplace_back([&, t] {
            threadIdx = {t, 0, 0};
            t_block_bar = &bar;
            t_warp_bar = wb[t / 32].get();
            t_xbuf = (unsigned char (*)[32][64])xb[t / 32].data();
            t_collectives = 0;
            for (unsigned b = 0; b < grid; ++b) {
                blockIdx = {b, 0, 0};
                body();
                if (!dms_mma::emu_cp_pending_empty()) emu_die("cp.async copies left in flight at block exit");
                bar.arrive_and_wait();
                if (t == 0) fill();
                bar.arrive_and_wait();
            }
        });
    }
    for (auto &x : th) x.join();
}

/* for the harnesses (ctypes) */
extern "C" void emu_set_limit(int v) { emu_smem_limit = v; emu_attrs.clear(); }
extern "C" long emu_get_launches() { return g_launches; }
extern "C" long emu_get_last_smem() { return (long)g_last_smem; }
extern "C" long emu_get_cp_count() { return g_cp_count.load(); }

/* core/common.c reports the CPU decode kernel in build_info; the emulator
 * links no CPU kernels and never calls it. */
extern "C" const char *dms_attn_decode_cpu_kernel(void) { return "none (emulator)"; }
