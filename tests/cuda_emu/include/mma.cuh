/*
 * mma.cuh - stands in for csrc/cuda/mma.cuh under tests/cuda_emu: the same
 * wrappers, computed on the host from the fragment layouts of the PTX ISA
 * (mma.m16n8k16 with floating point type; ldmatrix .m8n8 .b16; cp.async).
 * Warp-collective: every lane posts its operands, then computes its own
 * results from all of them, so a wrong fragment layout in the kernel gives
 * wrong numbers here as it would on the device. */
#pragma once
#include <stdint.h>
#include <string.h>
#include "cuda_runtime.h"
#include "core/scalar.h" /* -I csrc */

namespace dms_mma {

void emu_cp_async_16(void *smem, const void *gmem);
void emu_cp_async_commit();
void emu_cp_async_wait(int pending);
bool emu_cp_pending_empty();

static inline float emu_half_to_f32(uint16_t h, bool bf16) { return bf16 ? dms_bf16_to_f32(h) : dms_f16_to_f32(h); }

/* PTX ISA, Matrix Fragments for mma.m16n8k16 with floating point type:
 * groupID = laneid >> 2, threadID_in_group = laneid % 4.
 * A (.f16/.bf16): a0..a7, register r holds a_{2r} (low) and a_{2r+1} (high):
 *   row = groupID for ai where 0 <= i < 2 || 4 <= i < 6, groupID + 8 otherwise
 *   col = (threadID_in_group * 2) + (i & 0x1) for i < 4, ... + 8 for i >= 4
 * B: b0..b3: row = (threadID_in_group * 2) + (i & 0x1) for i < 2, + 8 for i >= 2; col = groupID
 * C/D (.f32): c0..c3: row = groupID for i < 2, groupID + 8 otherwise; col = (threadID_in_group * 2) + (i & 0x1) */
static inline void emu_a_pos(int lane, int i, int *row, int *col)
{
    const int g = lane >> 2, t = lane % 4;
    *row = ((0 <= i && i < 2) || (4 <= i && i < 6)) ? g : g + 8;
    *col = i < 4 ? t * 2 + (i & 1) : t * 2 + (i & 1) + 8;
}
static inline void emu_b_pos(int lane, int i, int *row, int *col)
{
    const int g = lane >> 2, t = lane % 4;
    *row = i < 2 ? t * 2 + (i & 1) : t * 2 + (i & 1) + 8;
    *col = g;
}
static inline void emu_c_pos(int lane, int i, int *row, int *col)
{
    const int g = lane >> 2, t = lane % 4;
    *row = i < 2 ? g : g + 8;
    *col = t * 2 + (i & 1);
}

template <bool kBf16>
inline void mma_16816(float (&d)[4], const uint32_t (&a)[4], uint32_t b0, uint32_t b1)
{
    struct Post { uint32_t a[4], b[2]; } mine = {{a[0], a[1], a[2], a[3]}, {b0, b1}};
    const unsigned char *all = emu_warp_exchange(&mine, sizeof mine);
    float A[16][16], B[16][8];
    bool seenA[16][16] = {}, seenB[16][8] = {};
    for (int l = 0; l < 32; ++l) {
        Post p; memcpy(&p, all + 64 * l, sizeof p);
        for (int i = 0; i < 8; ++i) {
            int r, c; emu_a_pos(l, i, &r, &c);
            const uint16_t h = (uint16_t)(p.a[i / 2] >> (16 * (i & 1)));
            if (seenA[r][c]) emu_die("mma: A element held twice");
            seenA[r][c] = true; A[r][c] = emu_half_to_f32(h, kBf16);
        }
        for (int i = 0; i < 4; ++i) {
            int r, c; emu_b_pos(l, i, &r, &c);
            const uint16_t h = (uint16_t)(p.b[i / 2] >> (16 * (i & 1)));
            if (seenB[r][c]) emu_die("mma: B element held twice");
            seenB[r][c] = true; B[r][c] = emu_half_to_f32(h, kBf16);
        }
    }
    const int lane = threadIdx.x % 32;
    for (int i = 0; i < 4; ++i) {
        int r, c; emu_c_pos(lane, i, &r, &c);
        double acc = d[i];
        for (int k = 0; k < 16; ++k) acc += (double)A[r][k] * (double)B[k][c];
        d[i] = (float)acc;
    }
}

/* ldmatrix .m8n8 .x4 .b16: lanes 8m..8m+7 give the row addresses of matrix m;
 * register m of lane l: row l/4, elements 2*(l%4), 2*(l%4)+1 (low, high);
 * .trans: the same positions of the transposed matrix. */
template <bool kTrans>
inline void emu_ldsm_x4(uint32_t (&r)[4], const uint16_t *row)
{
    if ((uintptr_t)row & 15) emu_die("ldmatrix: row address %p not 16-byte aligned", (const void *)row);
    if (!emu_in_smem(row, 16)) emu_die("ldmatrix: row %p outside shared memory", (const void *)row);
    const unsigned char *all = emu_warp_exchange(&row, sizeof row);
    const uint16_t *rows[32];
    for (int l = 0; l < 32; ++l) memcpy(&rows[l], all + 64 * l, sizeof rows[l]);
    const int lane = threadIdx.x % 32;
    for (int m = 0; m < 4; ++m) {
        uint16_t e[2];
        for (int j = 0; j < 2; ++j) {
            if (!kTrans) e[j] = rows[8 * m + lane / 4][2 * (lane % 4) + j];
            else e[j] = rows[8 * m + 2 * (lane % 4) + j][lane / 4];
        }
        r[m] = (uint32_t)e[0] | ((uint32_t)e[1] << 16);
    }
}
inline void ldsm_x4(uint32_t (&r)[4], const uint16_t *row) { emu_ldsm_x4<false>(r, row); }
inline void ldsm_x4_t(uint32_t (&r)[4], const uint16_t *row) { emu_ldsm_x4<true>(r, row); }

inline void cp_async_16(void *smem, const void *gmem) { emu_cp_async_16(smem, gmem); }
void emu_cp_async_4(void *smem, const void *gmem);
inline void cp_async_4(void *smem, const void *gmem) { emu_cp_async_4(smem, gmem); }
inline void cp_async_commit() { emu_cp_async_commit(); }
template <int kPending> inline void cp_async_wait() { emu_cp_async_wait(kPending); }

template <bool kBf16>
inline uint32_t pack2(float lo, float hi)
{
    const uint16_t l = kBf16 ? dms_f32_to_bf16(lo) : dms_f32_to_f16(lo);
    const uint16_t h = kBf16 ? dms_f32_to_bf16(hi) : dms_f32_to_f16(hi);
    return (uint32_t)l | ((uint32_t)h << 16);
}

} // namespace dms_mma
