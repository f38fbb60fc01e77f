/*
 * cpu/gate.c - CPU kernels of the gating ops; the reference semantics the
 * CUDA kernels in cuda/gate.cu are tested against. Arguments were checked
 * by core/gate.c. Gating touches B*H*T elements once, a negligible cost
 * next to attention, so these loops favour any-stride, any-dtype
 * generality over SIMD; threads split the (batch, head) rows.
 */
#include "../core/internal.h"
#include "../core/scalar.h"

/* Below this many elements a parallel region costs more than it saves. */
#define DMS_PARALLEL_MIN_ELEMENTS 32768

static inline int64_t offset3(const dms_tensor *t, int64_t b, int64_t h,
                              int64_t i)
{
    return b * t->strides[0] + h * t->strides[1] + i * t->strides[2];
}

void dms_gate_forward_cpu(const dms_tensor *z, const dms_tensor *noise,
                          float tau, const dms_tensor *y, const dms_tensor *p,
                          const dms_tensor *a, int num_threads)
{
    const int64_t B = z->shape[0], H = z->shape[1], T = z->shape[2];
    const float inv_tau = 1.0f / tau;
    (void)num_threads;
#ifdef _OPENMP
#pragma omp parallel for collapse(2) schedule(static) num_threads(num_threads) \
    if (B * H * T >= DMS_PARALLEL_MIN_ELEMENTS)
#endif
    for (int64_t b = 0; b < B; ++b) {
        for (int64_t h = 0; h < H; ++h) {
            for (int64_t t = 0; t < T; ++t) {
                float zt = dms_load(z->data, z->dtype, offset3(z, b, h, t));
                float n = noise ? dms_load(noise->data, noise->dtype,
                                           offset3(noise, b, h, t))
                                : 0.0f;
                float yt = (zt + n) * inv_tau;
                if (y)
                    dms_store(y->data, y->dtype, offset3(y, b, h, t), yt);
                if (p)
                    dms_store(p->data, p->dtype, offset3(p, b, h, t),
                              dms_sigmoid(yt));
                if (a)
                    dms_store(a->data, a->dtype, offset3(a, b, h, t),
                              yt > 0.0f ? 1.0f : 0.0f);
            }
        }
    }
}

void dms_gate_backward_cpu(const dms_tensor *y, const dms_tensor *grad_a,
                           const dms_tensor *grad_p, const dms_tensor *grad_y,
                           float tau, const dms_tensor *grad_z,
                           int num_threads)
{
    const int64_t B = y->shape[0], H = y->shape[1], T = y->shape[2];
    const float inv_tau = 1.0f / tau;
    (void)num_threads;
#ifdef _OPENMP
#pragma omp parallel for collapse(2) schedule(static) num_threads(num_threads) \
    if (B * H * T >= DMS_PARALLEL_MIN_ELEMENTS)
#endif
    for (int64_t b = 0; b < B; ++b) {
        for (int64_t h = 0; h < H; ++h) {
            for (int64_t t = 0; t < T; ++t) {
                float s = dms_sigmoid(
                    dms_load(y->data, y->dtype, offset3(y, b, h, t)));
                float g_soft = 0.0f, g_y = 0.0f;
                if (grad_a)
                    g_soft += dms_load(grad_a->data, grad_a->dtype,
                                       offset3(grad_a, b, h, t));
                if (grad_p)
                    g_soft += dms_load(grad_p->data, grad_p->dtype,
                                       offset3(grad_p, b, h, t));
                if (grad_y)
                    g_y = dms_load(grad_y->data, grad_y->dtype,
                                   offset3(grad_y, b, h, t));
                float g = (g_soft * s * (1.0f - s) + g_y) * inv_tau;
                dms_store(grad_z->data, grad_z->dtype,
                          offset3(grad_z, b, h, t), g);
            }
        }
    }
}

void dms_logistic_noise_cpu(const dms_tensor *out, uint64_t seed,
                            uint32_t process_index, uint32_t accum_step,
                            uint32_t global_step, int num_threads)
{
    const int64_t n = dms_numel(out);
    const int64_t blocks = (n + 3) / 4;
    float *dst = (float *)out->data;
    const uint32_t k0 = (uint32_t)seed, k1 = (uint32_t)(seed >> 32);
    (void)num_threads;
#ifdef _OPENMP
#pragma omp parallel for schedule(static) num_threads(num_threads) \
    if (n >= DMS_PARALLEL_MIN_ELEMENTS)
#endif
    for (int64_t blk = 0; blk < blocks; ++blk) {
        dms_philox_words r = dms_philox4x32_10(
            (uint32_t)blk, process_index, accum_step, global_step, k0, k1);
        for (int j = 0; j < 4 && blk * 4 + j < n; ++j)
            dst[blk * 4 + j] = dms_logistic_from_bits(r.w[j]);
    }
}
