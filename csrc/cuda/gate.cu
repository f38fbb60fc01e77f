/*
 * cuda/gate.cu - CUDA kernels of the gating ops, the twins of cpu/gate.c
 * (same per-element code from core/scalar.h, so results agree with the CPU
 * to the last bit of expf/log). Elementwise and memory-bound: one
 * grid-stride loop per op, any strides, any supported dtype.
 *
 * Built by setup.py with nvcc for sm_80 and sm_90 (+ PTX).
 */
#include "common.cuh"
#include "../core/scalar.h"

namespace {

constexpr int kThreads = 256;

__global__ void gate_forward_kernel(DmsView3 z, DmsView3 noise, float inv_tau,
                                    DmsView3 y, DmsView3 p, DmsView3 a,
                                    int64_t H, int64_t T, int64_t n)
{
    for (int64_t i = blockIdx.x * (int64_t)blockDim.x + threadIdx.x; i < n;
         i += (int64_t)gridDim.x * blockDim.x) {
        const int64_t t = i % T, bh = i / T, h = bh % H, b = bh / H;
        float zt = dms_load(z.data, z.dtype, z.at(b, h, t));
        float nt = noise.data ? dms_load(noise.data, noise.dtype,
                                         noise.at(b, h, t))
                              : 0.0f;
        float yt = (zt + nt) * inv_tau;
        if (y.data)
            dms_store(y.data, y.dtype, y.at(b, h, t), yt);
        if (p.data)
            dms_store(p.data, p.dtype, p.at(b, h, t), dms_sigmoid(yt));
        if (a.data)
            dms_store(a.data, a.dtype, a.at(b, h, t), yt > 0.0f ? 1.0f : 0.0f);
    }
}

__global__ void gate_backward_kernel(DmsView3 y, DmsView3 grad_a,
                                     DmsView3 grad_p, DmsView3 grad_y,
                                     float inv_tau, DmsView3 grad_z, int64_t H,
                                     int64_t T, int64_t n)
{
    for (int64_t i = blockIdx.x * (int64_t)blockDim.x + threadIdx.x; i < n;
         i += (int64_t)gridDim.x * blockDim.x) {
        const int64_t t = i % T, bh = i / T, h = bh % H, b = bh / H;
        float s = dms_sigmoid(dms_load(y.data, y.dtype, y.at(b, h, t)));
        float g_soft = 0.0f, g_y = 0.0f;
        if (grad_a.data)
            g_soft += dms_load(grad_a.data, grad_a.dtype, grad_a.at(b, h, t));
        if (grad_p.data)
            g_soft += dms_load(grad_p.data, grad_p.dtype, grad_p.at(b, h, t));
        if (grad_y.data)
            g_y = dms_load(grad_y.data, grad_y.dtype, grad_y.at(b, h, t));
        dms_store(grad_z.data, grad_z.dtype, grad_z.at(b, h, t),
                  (g_soft * s * (1.0f - s) + g_y) * inv_tau);
    }
}

__global__ void logistic_noise_kernel(float *out, int64_t n, uint32_t k0,
                                      uint32_t k1, uint32_t process_index,
                                      uint32_t accum_step,
                                      uint32_t global_step)
{
    const int64_t blocks = (n + 3) / 4;
    for (int64_t blk = blockIdx.x * (int64_t)blockDim.x + threadIdx.x;
         blk < blocks; blk += (int64_t)gridDim.x * blockDim.x) {
        dms_philox_words r = dms_philox4x32_10(
            (uint32_t)blk, process_index, accum_step, global_step, k0, k1);
        for (int j = 0; j < 4 && blk * 4 + j < n; ++j)
            out[blk * 4 + j] = dms_logistic_from_bits(r.w[j]);
    }
}

} // namespace

extern "C" dms_status dms_gate_forward_cuda(const dms_tensor *z,
                                            const dms_tensor *noise, float tau,
                                            const dms_tensor *y,
                                            const dms_tensor *p,
                                            const dms_tensor *a, void *stream)
{
    DmsDeviceGuard guard(z->device_index);
    DMS_CUDA_CHECK(guard.status());
    const int64_t n = dms_numel(z);
    gate_forward_kernel<<<dms_grid_for(n, kThreads), kThreads, 0,
                          (cudaStream_t)stream>>>(
        dms_view3(z), dms_view3(noise), 1.0f / tau, dms_view3(y), dms_view3(p),
        dms_view3(a), z->shape[1], z->shape[2], n);
    DMS_CUDA_CHECK(cudaGetLastError());
    return DMS_OK;
}

extern "C" dms_status dms_gate_backward_cuda(const dms_tensor *y,
                                             const dms_tensor *grad_a,
                                             const dms_tensor *grad_p,
                                             const dms_tensor *grad_y,
                                             float tau,
                                             const dms_tensor *grad_z,
                                             void *stream)
{
    DmsDeviceGuard guard(y->device_index);
    DMS_CUDA_CHECK(guard.status());
    const int64_t n = dms_numel(y);
    gate_backward_kernel<<<dms_grid_for(n, kThreads), kThreads, 0,
                           (cudaStream_t)stream>>>(
        dms_view3(y), dms_view3(grad_a), dms_view3(grad_p), dms_view3(grad_y),
        1.0f / tau, dms_view3(grad_z), y->shape[1], y->shape[2], n);
    DMS_CUDA_CHECK(cudaGetLastError());
    return DMS_OK;
}

extern "C" dms_status dms_logistic_noise_cuda(const dms_tensor *out,
                                              uint64_t seed,
                                              uint32_t process_index,
                                              uint32_t accum_step,
                                              uint32_t global_step,
                                              void *stream)
{
    DmsDeviceGuard guard(out->device_index);
    DMS_CUDA_CHECK(guard.status());
    const int64_t n = dms_numel(out);
    logistic_noise_kernel<<<dms_grid_for((n + 3) / 4, kThreads), kThreads, 0,
                            (cudaStream_t)stream>>>(
        (float *)out->data, n, (uint32_t)seed, (uint32_t)(seed >> 32),
        process_index, accum_step, global_step);
    DMS_CUDA_CHECK(cudaGetLastError());
    return DMS_OK;
}
