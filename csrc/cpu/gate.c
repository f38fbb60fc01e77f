/*
 * cpu/gate.c - CPU kernels of the gating ops; the reference semantics the
 * CUDA kernels in cuda/gate.cu are tested against. Arguments were checked
 * by core/gate.c.
 *
 * Each (batch, head) row is processed in chunks of CHUNK tokens: the inputs
 * are converted to float32 into stack buffers (one dtype switch per chunk,
 * not per element), the math runs as a branch-free loop the compiler
 * vectorises - compiled three times, for AVX-512, AVX2 and baseline x86-64,
 * and picked at load time by the CPU (GCC target_clones) - and the results
 * are converted back out. Threads split the rows.
 */
#include "../core/internal.h"
#include "../core/scalar.h"
#include "simd_math.h"

#define CHUNK 256

/* Below this many elements a parallel region costs more than it saves. */
#define DMS_PARALLEL_MIN_ELEMENTS 32768

/* Converts n elements starting at `src` (stride in elements) to float. */
static void load_chunk(const dms_tensor *t, int64_t offset, int64_t n,
                       float *dst)
{
    const int64_t s = t->strides[2];
    switch (t->dtype) {
    case DMS_FLOAT32: {
        const float *src = (const float *)t->data + offset;
        for (int64_t i = 0; i < n; ++i)
            dst[i] = src[i * s];
        break;
    }
    case DMS_FLOAT16: {
        const uint16_t *src = (const uint16_t *)t->data + offset;
        for (int64_t i = 0; i < n; ++i)
            dst[i] = dms_f16_to_f32(src[i * s]);
        break;
    }
    case DMS_BFLOAT16: {
        const uint16_t *src = (const uint16_t *)t->data + offset;
        for (int64_t i = 0; i < n; ++i)
            dst[i] = dms_bf16_to_f32(src[i * s]);
        break;
    }
    default:
        for (int64_t i = 0; i < n; ++i)
            dst[i] = dms_load(t->data, t->dtype, offset + i * s);
        break;
    }
}

static void store_chunk(const dms_tensor *t, int64_t offset, int64_t n,
                        const float *src)
{
    const int64_t s = t->strides[2];
    switch (t->dtype) {
    case DMS_FLOAT32: {
        float *dst = (float *)t->data + offset;
        for (int64_t i = 0; i < n; ++i)
            dst[i * s] = src[i];
        break;
    }
    case DMS_FLOAT16: {
        uint16_t *dst = (uint16_t *)t->data + offset;
        for (int64_t i = 0; i < n; ++i)
            dst[i * s] = dms_f32_to_f16(src[i]);
        break;
    }
    case DMS_BFLOAT16: {
        uint16_t *dst = (uint16_t *)t->data + offset;
        for (int64_t i = 0; i < n; ++i)
            dst[i * s] = dms_f32_to_bf16(src[i]);
        break;
    }
    default:
        for (int64_t i = 0; i < n; ++i)
            dms_store(t->data, t->dtype, offset + i * s, src[i]);
        break;
    }
}

DMS_SIMD_CLONES
static void gate_math(int64_t n, const float *z, const float *noise,
                      float inv_tau, float *y, float *p, float *a)
{
    for (int64_t i = 0; i < n; ++i) {
        float yi = (z[i] + noise[i]) * inv_tau;
        y[i] = yi;
        p[i] = sigmoid_fast(yi);
        a[i] = yi > 0.0f ? 1.0f : 0.0f;
    }
}

DMS_SIMD_CLONES
static void gate_grad_math(int64_t n, const float *y, const float *g_soft,
                           const float *g_y, float inv_tau, float *g_z)
{
    for (int64_t i = 0; i < n; ++i) {
        float s = sigmoid_fast(y[i]);
        g_z[i] = (g_soft[i] * s * (1.0f - s) + g_y[i]) * inv_tau;
    }
}

static inline int64_t row_offset(const dms_tensor *t, int64_t b, int64_t h,
                                 int64_t t0)
{
    return b * t->strides[0] + h * t->strides[1] + t0 * t->strides[2];
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
            float zc[CHUNK], nc[CHUNK], yc[CHUNK], pc[CHUNK], ac[CHUNK];
            if (!noise)
                for (int i = 0; i < CHUNK; ++i)
                    nc[i] = 0.0f;
            for (int64_t t0 = 0; t0 < T; t0 += CHUNK) {
                const int64_t n = T - t0 < CHUNK ? T - t0 : CHUNK;
                load_chunk(z, row_offset(z, b, h, t0), n, zc);
                if (noise)
                    load_chunk(noise, row_offset(noise, b, h, t0), n, nc);
                gate_math(n, zc, nc, inv_tau, yc, pc, ac);
                if (y)
                    store_chunk(y, row_offset(y, b, h, t0), n, yc);
                if (p)
                    store_chunk(p, row_offset(p, b, h, t0), n, pc);
                if (a)
                    store_chunk(a, row_offset(a, b, h, t0), n, ac);
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
            float yc[CHUNK], soft[CHUNK], tmp[CHUNK], gy[CHUNK], gz[CHUNK];
            for (int64_t t0 = 0; t0 < T; t0 += CHUNK) {
                const int64_t n = T - t0 < CHUNK ? T - t0 : CHUNK;
                load_chunk(y, row_offset(y, b, h, t0), n, yc);
                for (int64_t i = 0; i < n; ++i)
                    soft[i] = gy[i] = 0.0f;
                if (grad_a)
                    load_chunk(grad_a, row_offset(grad_a, b, h, t0), n, soft);
                if (grad_p) {
                    load_chunk(grad_p, row_offset(grad_p, b, h, t0), n, tmp);
                    for (int64_t i = 0; i < n; ++i)
                        soft[i] += tmp[i];
                }
                if (grad_y)
                    load_chunk(grad_y, row_offset(grad_y, b, h, t0), n, gy);
                gate_grad_math(n, yc, soft, gy, inv_tau, gz);
                store_chunk(grad_z, row_offset(grad_z, b, h, t0), n, gz);
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
