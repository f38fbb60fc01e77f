/*
 * scalar.h - per-element helpers compiled identically by the C compiler
 * (CPU kernels) and by nvcc (CUDA kernels), so both sides round, convert
 * and draw random numbers bit for bit the same way.
 *
 *  - float16 / bfloat16 <-> float32 conversion (round to nearest even),
 *  - load/store of one element of any dms_dtype as float,
 *  - a numerically stable sigmoid,
 *  - the Philox4x32-10 counter-based generator (Salmon et al., SC'11).
 */
#ifndef DMS_SCALAR_H
#define DMS_SCALAR_H

#include <stdint.h>
#include <string.h>
#include <math.h>

#include "../dms.h"

#if defined(__CUDACC__)
#define DMS_HD __host__ __device__ __forceinline__
#else
#define DMS_HD static inline
#endif

DMS_HD uint32_t dms_float_bits(float f)
{
#if defined(__CUDA_ARCH__)
    return __float_as_uint(f);
#else
    uint32_t u;
    memcpy(&u, &f, sizeof u);
    return u;
#endif
}

DMS_HD float dms_bits_float(uint32_t u)
{
#if defined(__CUDA_ARCH__)
    return __uint_as_float(u);
#else
    float f;
    memcpy(&f, &u, sizeof f);
    return f;
#endif
}

DMS_HD float dms_bf16_to_f32(uint16_t h)
{
    return dms_bits_float((uint32_t)h << 16);
}

DMS_HD uint16_t dms_f32_to_bf16(float f)
{
    uint32_t x = dms_float_bits(f);
    if ((x & 0x7fffffffu) > 0x7f800000u) /* NaN: keep it a quiet NaN */
        return (uint16_t)((x >> 16) | 0x0040u);
    x += 0x7fffu + ((x >> 16) & 1u);
    return (uint16_t)(x >> 16);
}

DMS_HD float dms_f16_to_f32(uint16_t h)
{
    uint32_t sign = (uint32_t)(h & 0x8000u) << 16;
    uint32_t exponent = (h >> 10) & 0x1fu;
    uint32_t mantissa = h & 0x3ffu;
    if (exponent == 0x1fu) /* inf / NaN */
        return dms_bits_float(sign | 0x7f800000u | (mantissa << 13));
    if (exponent == 0) { /* zero or subnormal: mantissa * 2^-24 */
        float magnitude = (float)mantissa * 5.9604644775390625e-08f;
        return sign ? -magnitude : magnitude;
    }
    return dms_bits_float(sign | ((exponent + 112u) << 23) | (mantissa << 13));
}

DMS_HD uint16_t dms_f32_to_f16(float f)
{
    uint32_t x = dms_float_bits(f);
    uint32_t sign = (x >> 16) & 0x8000u;
    uint32_t ax = x & 0x7fffffffu;
    if (ax > 0x7f800000u) /* NaN */
        return (uint16_t)(sign | 0x7e00u);
    if (ax >= 0x477ff000u) /* >= 65520 rounds to infinity */
        return (uint16_t)(sign | 0x7c00u);
    if (ax < 0x38800000u) {
        /* Below 2^-14 the result is subnormal: adding 0.5 makes the FPU
         * round |f| to a multiple of 2^-24 (nearest even), which is then
         * read off the low mantissa bits. */
        float rounded = dms_bits_float(ax) + 0.5f;
        return (uint16_t)(sign | (dms_float_bits(rounded) - 0x3f000000u));
    }
    /* Re-bias the exponent (127 -> 15) and round to nearest even. */
    ax += 0xc8000fffu + ((ax >> 13) & 1u);
    return (uint16_t)(sign | (ax >> 13));
}

/* Element `i` (already offset by strides) of a tensor of type `dtype`. */
DMS_HD float dms_load(const void *base, dms_dtype dtype, int64_t i)
{
    switch (dtype) {
    case DMS_FLOAT32:
        return ((const float *)base)[i];
    case DMS_FLOAT16:
        return dms_f16_to_f32(((const uint16_t *)base)[i]);
    case DMS_BFLOAT16:
        return dms_bf16_to_f32(((const uint16_t *)base)[i]);
    case DMS_INT32:
        return (float)((const int32_t *)base)[i];
    case DMS_INT64:
        return (float)((const int64_t *)base)[i];
    case DMS_UINT8:
    case DMS_BOOL:
    default:
        return (float)((const uint8_t *)base)[i];
    }
}

DMS_HD void dms_store(void *base, dms_dtype dtype, int64_t i, float v)
{
    switch (dtype) {
    case DMS_FLOAT32:
        ((float *)base)[i] = v;
        break;
    case DMS_FLOAT16:
        ((uint16_t *)base)[i] = dms_f32_to_f16(v);
        break;
    case DMS_BFLOAT16:
        ((uint16_t *)base)[i] = dms_f32_to_bf16(v);
        break;
    case DMS_INT32:
        ((int32_t *)base)[i] = (int32_t)v;
        break;
    case DMS_INT64:
        ((int64_t *)base)[i] = (int64_t)v;
        break;
    case DMS_BOOL:
        ((uint8_t *)base)[i] = (uint8_t)(v != 0.0f);
        break;
    case DMS_UINT8:
    default:
        ((uint8_t *)base)[i] = (uint8_t)v;
        break;
    }
}

/* sigmoid without overflow for large |y|. */
DMS_HD float dms_sigmoid(float y)
{
    if (y >= 0.0f)
        return 1.0f / (1.0f + expf(-y));
    float e = expf(y);
    return e / (1.0f + e);
}

/* ---- Philox4x32-10 ---------------------------------------------------- */

typedef struct dms_philox_words {
    uint32_t w[4];
} dms_philox_words;

DMS_HD uint32_t dms_mulhilo32(uint32_t a, uint32_t b, uint32_t *hi)
{
    uint64_t product = (uint64_t)a * (uint64_t)b;
    *hi = (uint32_t)(product >> 32);
    return (uint32_t)product;
}

DMS_HD dms_philox_words dms_philox4x32_10(uint32_t c0, uint32_t c1,
                                          uint32_t c2, uint32_t c3,
                                          uint32_t k0, uint32_t k1)
{
    for (int round = 0; round < 10; ++round) {
        uint32_t hi0, hi1;
        uint32_t lo0 = dms_mulhilo32(0xD2511F53u, c0, &hi0);
        uint32_t lo1 = dms_mulhilo32(0xCD9E8D57u, c2, &hi1);
        uint32_t n0 = hi1 ^ c1 ^ k0;
        uint32_t n2 = hi0 ^ c3 ^ k1;
        c0 = n0;
        c1 = lo1;
        c2 = n2;
        c3 = lo0;
        k0 += 0x9E3779B9u;
        k1 += 0xBB67AE85u;
    }
    dms_philox_words out;
    out.w[0] = c0;
    out.w[1] = c1;
    out.w[2] = c2;
    out.w[3] = c3;
    return out;
}

/*
 * One standard logistic sample from a 32-bit word: u in (0, 1) from the
 * top 24 bits, then log(u) - log(1 - u), computed in double so the CPU and
 * the GPU round to the same float.
 */
DMS_HD float dms_logistic_from_bits(uint32_t bits)
{
    double u = ((double)(bits >> 8) + 0.5) * (1.0 / 16777216.0);
    return (float)(log(u) - log1p(-u));
}

#endif /* DMS_SCALAR_H */
