/*
 * simd_math.h - float math for CPU kernels written in plain arithmetic (no
 * libm calls), so loops over it vectorise in every DMS_SIMD_CLONES variant.
 */
#ifndef DMS_CPU_SIMD_MATH_H
#define DMS_CPU_SIMD_MATH_H

#include "../core/scalar.h"

/*
 * exp(x) for x <= 0 in plain arithmetic so loops over it vectorise:
 * x = k ln2 + r with |r| <= ln2/2, exp(r) by the Cephes minimax polynomial
 * (about 1 ulp), 2^k through the exponent bits. Below -87 (exp < 1.7e-38,
 * the smallest normal float) the result is flushed to 0, also for -inf:
 * masked attention scores get weight exactly 0.
 */
static inline float exp_nonpositive(float x)
{
    const float flushed = x < -87.0f ? 0.0f : 1.0f;
    x = x < -87.0f ? -87.0f : x;
    const float round_magic = 12582912.0f; /* 1.5 * 2^23 */
    float k = (x * 1.44269504088896341f + round_magic) - round_magic;
    float r = x - k * 0.693359375f + k * 2.12194440e-4f;
    float poly = 1.9875691500e-4f;
    poly = poly * r + 1.3981999507e-3f;
    poly = poly * r + 8.3334519073e-3f;
    poly = poly * r + 4.1665795894e-2f;
    poly = poly * r + 1.6666665459e-1f;
    poly = poly * r + 5.0000001201e-1f;
    float e = poly * r * r + r + 1.0f;
    int32_t bits = ((int32_t)k + 127) << 23;
    return e * dms_bits_float((uint32_t)bits) * flushed;
}

/* sigmoid(y) = 1 / (1 + e) for y >= 0 and e / (1 + e) below, e = exp(-|y|):
 * no overflow, full relative precision on both tails. */
static inline float sigmoid_fast(float y)
{
    float e = exp_nonpositive(y < 0.0f ? y : -y);
    float s = 1.0f / (1.0f + e);
    return y >= 0.0f ? s : e * s;
}

#endif /* DMS_CPU_SIMD_MATH_H */
