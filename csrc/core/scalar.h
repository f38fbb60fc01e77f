/*
 * scalar.h - per-element helpers compiled identically by the C compiler
 * (CPU kernels) and by nvcc (CUDA kernels), so both sides round, convert
 * and draw random numbers bit for bit the same way.
 *
 *  - float16 / bfloat16 <-> float32 conversion (round to nearest even),
 *  - FP8 (E4M3, E5M2) <-> float32 conversion (round to nearest even,
 *    saturating) and the per-row scaling of FP8 cache pages,
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

/* ---- FP8 (OCP 8-bit floats, as torch.float8_e4m3fn / float8_e5m2) ----- */

/* The largest finite value: 448 (E4M3: no infinities, one NaN code per
 * sign) or 57344 (E5M2: IEEE-like, with infinities). */
DMS_HD float dms_fp8_max(int e5m2)
{
    return e5m2 ? 57344.0f : 448.0f;
}

/*
 * The FP8 code of f, rounded to nearest even; magnitudes past the largest
 * finite value, infinity included, saturate to it (torch's cast gives NaN
 * or infinity there); NaN stays NaN (code 0x7f with f's sign). Integer
 * arithmetic only, so the C compiler and nvcc agree bit for bit.
 */
DMS_HD uint8_t dms_f32_to_fp8(float f, int e5m2)
{
    const uint32_t x = dms_float_bits(f);
    const uint8_t sign = (uint8_t)((x >> 24) & 0x80u);
    const uint32_t ax = x & 0x7fffffffu;
    const int M = e5m2 ? 2 : 3, bias = e5m2 ? 15 : 7;
    const uint32_t top = e5m2 ? 0x7bu : 0x7eu; /* the largest finite code */
    if (ax > 0x7f800000u)
        return (uint8_t)(sign | 0x7fu);
    const int e = ax >> 23 ? (int)(ax >> 23) - 127 : -126; /* f's exponent */
    uint32_t code;
    if (e >= 1 - bias) {
        /* A normal FP8 number: keep M mantissa bits (nearest even; a carry
         * moves into the exponent), then re-bias the exponent. */
        const int shift = 23 - M;
        const uint32_t rounded =
            (ax + (1u << (shift - 1)) - 1u + ((ax >> shift) & 1u)) >> shift;
        code = rounded - ((uint32_t)(127 - bias) << M);
    } else {
        /* Subnormal: |f| in units of 2^(1 - bias - M), rounded to an
         * integer (2^M, the smallest normal, when it rounds up to it). */
        const uint32_t m = ax >> 23 ? (ax & 0x7fffffu) | 0x800000u
                                    : ax & 0x7fffffu;
        const int s = 24 - bias - M - e; /* >= 21: m has 24 bits */
        if (s >= 32) {
            code = 0;
        } else {
            const uint32_t half = 1u << (s - 1), rest = m & ((half << 1) - 1u);
            code = m >> s;
            code += rest > half || (rest == half && (code & 1u));
        }
    }
    return (uint8_t)(sign | (code > top ? top : code));
}

/* The value of an FP8 code (exact in float32). */
DMS_HD float dms_fp8_to_f32(uint8_t c, int e5m2)
{
    if (e5m2) /* E5M2 is the top byte of a float16 */
        return dms_f16_to_f32((uint16_t)((uint16_t)c << 8));
    const uint32_t sign = (uint32_t)(c & 0x80u) << 24, mag = c & 0x7fu;
    if (mag == 0x7fu)
        return dms_bits_float(sign | 0x7fc00000u);
    if (mag < 8u) { /* subnormal: mag * 2^-9 */
        const float v = (float)mag * 0.001953125f;
        return sign ? -v : v;
    }
    return dms_bits_float(sign | ((mag << 20) + (120u << 23)));
}

/*
 * FP8 cache pages store each (token, KV head) row of D keys or values as D
 * codes and one float32 scale, s = amax / dms_fp8_max (amax: the row's
 * largest magnitude), so the row's largest element maps to the format's
 * largest finite value: code_i = dms_f32_to_fp8(x_i / s) (0 when s = 0,
 * e.g. an all-zero row) and the stored value is dms_fp8_to_f32(code_i) *
 * s, both in float32 (IEEE division and product: the CPU, the GPU and the
 * oracle round them alike).
 */
DMS_HD float dms_fp8_row_scale(float amax, int e5m2)
{
    return amax / dms_fp8_max(e5m2);
}

DMS_HD uint8_t dms_fp8_quantize(float x, float scale, int e5m2)
{
    return scale == 0.0f ? (uint8_t)0 : dms_f32_to_fp8(x / scale, e5m2);
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
