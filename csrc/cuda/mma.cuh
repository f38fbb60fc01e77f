/*
 * mma.cuh - every piece of inline PTX of the tensor-core kernels, each
 * behind one small __device__ wrapper, so that a CPU emulator of these
 * instructions can stand in for this header when the kernels are checked
 * without a GPU. Baseline sm_80 (all of it also runs on sm_90).
 *
 *   mma_16816     mma.sync.aligned.m16n8k16.row.col.f32.{bf16,f16}.f32:
 *                 D[16x8] += A[16x16] B[16x8], float32 accumulators
 *   ldsm_x4       ldmatrix.sync.aligned.m8n8.x4.shared.b16 (four 8x8
 *   ldsm_x4_t     matrices of 16-bit elements; _t: with .trans)
 *   cp_async_16   cp.async.cg.shared.global, 16 bytes (cp_async_4:
 *                 .ca, 4 bytes), and the group commit / wait
 *   pack2         two floats -> two 16-bit elements in one 32-bit register
 *                 (round to nearest even), the low half holding `lo`
 *
 * Fragment layouts (PTX ISA, "Matrix Fragments for mma.m16n8k16 with
 * floating point type"), with g = lane / 4 and t = lane % 4:
 *   A (row major, 4 registers of 2 elements, low half first):
 *     a[0] = A[g][2t, 2t+1]      a[1] = A[g+8][2t, 2t+1]
 *     a[2] = A[g][2t+8, 2t+9]    a[3] = A[g+8][2t+8, 2t+9]
 *   B ("col": element pairs run along k):
 *     b[0] = B[2t, 2t+1][g]      b[1] = B[2t+8, 2t+9][g]
 *   C / D (4 floats):
 *     c[0], c[1] = C[g][2t, 2t+1]    c[2], c[3] = C[g+8][2t, 2t+1]
 * ldmatrix: lanes 8m .. 8m+7 give the row addresses of matrix m (16-byte
 * aligned rows of eight 16-bit elements); register m of lane l receives
 * row l / 4, elements 2 (l % 4) and 2 (l % 4) + 1 of matrix m, or with
 * .trans the same two elements of the transposed matrix (rows 2 (l % 4)
 * and 2 (l % 4) + 1, column l / 4 of the stored one).
 */
#ifndef DMS_CUDA_MMA_CUH
#define DMS_CUDA_MMA_CUH

#include <stdint.h>
#include <string.h>

#include <cuda_bf16.h>
#include <cuda_fp16.h>

namespace dms_mma {

/* D += A B for one m16n8k16 tile; kBf16 selects bf16 or f16 inputs. */
template <bool kBf16>
__device__ __forceinline__ void mma_16816(float (&d)[4], const uint32_t (&a)[4],
                                          uint32_t b0, uint32_t b1)
{
    if constexpr (kBf16)
        asm volatile("mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 "
                     "{%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, "
                     "{%0, %1, %2, %3};\n"
                     : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
                     : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0),
                       "r"(b1));
    else
        asm volatile("mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 "
                     "{%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, "
                     "{%0, %1, %2, %3};\n"
                     : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
                     : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0),
                       "r"(b1));
}

__device__ __forceinline__ uint32_t smem_addr(const void *p)
{
    return (uint32_t)__cvta_generic_to_shared(p);
}

/* Four 8x8 matrices; `row` is this lane's row address (see above). */
__device__ __forceinline__ void ldsm_x4(uint32_t (&r)[4], const uint16_t *row)
{
    asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 "
                 "{%0, %1, %2, %3}, [%4];\n"
                 : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
                 : "r"(smem_addr(row)));
}

__device__ __forceinline__ void ldsm_x4_t(uint32_t (&r)[4],
                                          const uint16_t *row)
{
    asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 "
                 "{%0, %1, %2, %3}, [%4];\n"
                 : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
                 : "r"(smem_addr(row)));
}

/* 16 bytes global -> shared, asynchronously; both 16-byte aligned. */
__device__ __forceinline__ void cp_async_16(void *smem, const void *gmem)
{
    asm volatile("cp.async.cg.shared.global [%0], [%1], 16;\n"
                 :
                 : "r"(smem_addr(smem)), "l"(gmem)
                 : "memory");
}

/* 4 bytes global -> shared, asynchronously; both 4-byte aligned. */
__device__ __forceinline__ void cp_async_4(void *smem, const void *gmem)
{
    asm volatile("cp.async.ca.shared.global [%0], [%1], 4;\n"
                 :
                 : "r"(smem_addr(smem)), "l"(gmem)
                 : "memory");
}

__device__ __forceinline__ void cp_async_commit()
{
    asm volatile("cp.async.commit_group;\n" ::: "memory");
}

/* Waits until at most kPending of this thread's groups are in flight. */
template <int kPending>
__device__ __forceinline__ void cp_async_wait()
{
    asm volatile("cp.async.wait_group %0;\n" ::"n"(kPending) : "memory");
}

template <bool kBf16>
__device__ __forceinline__ uint32_t pack2(float lo, float hi)
{
    uint32_t r;
    if constexpr (kBf16) {
        const __nv_bfloat162 h = __floats2bfloat162_rn(lo, hi);
        memcpy(&r, &h, sizeof r);
    } else {
        const __half2 h = __floats2half2_rn(lo, hi);
        memcpy(&r, &h, sizeof r);
    }
    return r;
}

} // namespace dms_mma

#endif /* DMS_CUDA_MMA_CUH */
