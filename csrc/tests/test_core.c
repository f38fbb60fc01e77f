/*
 * test_core.c - C-level tests of the dms core, without Python, meant to run
 * under AddressSanitizer + UndefinedBehaviorSanitizer. tests/test_c_core.py
 * builds it without CUDA and runs it (`python -m pytest tests/test_c_core.py
 * -s` prints the compiler command line).
 *
 * It checks values against hand-computed ones, the float16/bfloat16
 * conversions exhaustively, Philox against its published known-answer
 * vectors, every argument check, decode attention (every CPU kernel
 * variant the machine runs) against a double-precision sum, and guard
 * bytes after every output.
 */
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "dms.h"
#include "core/internal.h"
#include "core/scalar.h"
#include "tests/host_view.h"

static int passed, failed;

#define CHECK(cond)                                                       \
    do {                                                                  \
        if (cond) {                                                       \
            ++passed;                                                     \
        } else {                                                          \
            ++failed;                                                     \
            fprintf(stderr, "FAILED %s:%d: %s\n", __FILE__, __LINE__,     \
                    #cond);                                               \
        }                                                                 \
    } while (0)

/* Checks a failing call: its status, and that the message names `arg`. */
#define CHECK_FAILS(call, want_status, arg)                               \
    do {                                                                  \
        dms_status st_ = (call);                                          \
        CHECK(st_ == (want_status));                                      \
        CHECK(strstr(dms_last_error(), arg) == dms_last_error());         \
        if (st_ != (want_status) ||                                       \
            strstr(dms_last_error(), arg) != dms_last_error())            \
            fprintf(stderr, "  got %s: %s\n", dms_status_name(st_),       \
                    dms_last_error());                                    \
    } while (0)

#define GUARD_BYTES 64
#define GUARD_VALUE 0xA5

/* A buffer of `bytes` followed by guard bytes; free with free(). */
static void *guarded_alloc(size_t bytes)
{
    unsigned char *p = malloc(bytes + GUARD_BYTES);
    memset(p, 0, bytes);
    memset(p + bytes, GUARD_VALUE, GUARD_BYTES);
    return p;
}

static int guard_intact(const void *buf, size_t bytes)
{
    const unsigned char *p = (const unsigned char *)buf + bytes;
    for (int i = 0; i < GUARD_BYTES; ++i)
        if (p[i] != GUARD_VALUE)
            return 0;
    return 1;
}

static dms_tensor view3(void *data, dms_dtype dtype, int64_t b, int64_t h,
                        int64_t t)
{
    dms_tensor v;
    memset(&v, 0, sizeof v);
    v.data = data;
    v.dtype = dtype;
    v.device_type = DMS_CPU;
    v.ndim = 3;
    v.shape[0] = b;
    v.shape[1] = h;
    v.shape[2] = t;
    v.strides[2] = 1;
    v.strides[1] = t;
    v.strides[0] = h * t;
    return v;
}

static int close_to(double got, double want, double tol)
{
    return fabs(got - want) <= tol * (1.0 + fabs(want));
}

static void test_gate_values(void)
{
    /* z, noise and tau chosen so every branch of sigmoid is exercised. */
    float z[6] = {-1.0f, 0.0f, 2.0f, 30.0f, -30.0f, 0.25f};
    float n[6] = {0.5f, -0.25f, 0.0f, 0.0f, 0.0f, -0.5f};
    const float tau = 0.5f;
    float *y = guarded_alloc(sizeof z), *p = guarded_alloc(sizeof z);
    unsigned char *a = guarded_alloc(6);
    dms_tensor vz = view3(z, DMS_FLOAT32, 1, 2, 3);
    dms_tensor vn = view3(n, DMS_FLOAT32, 1, 2, 3);
    dms_tensor vy = view3(y, DMS_FLOAT32, 1, 2, 3);
    dms_tensor vp = view3(p, DMS_FLOAT32, 1, 2, 3);
    dms_tensor va = view3(a, DMS_BOOL, 1, 2, 3);
    dms_exec ex = {1, NULL};
    CHECK(dms_gate_forward(&vz, &vn, tau, &vy, &vp, &va, &ex) == DMS_OK);
    for (int i = 0; i < 6; ++i) {
        double want_y = ((double)z[i] + n[i]) / tau;
        CHECK(close_to(y[i], want_y, 1e-6));
        CHECK(close_to(p[i], 1.0 / (1.0 + exp(-want_y)), 1e-6));
        CHECK(a[i] == (want_y > 0));
    }
    CHECK(guard_intact(y, sizeof z) && guard_intact(p, sizeof z) &&
          guard_intact(a, 6));

    /* Inference threshold: no noise, a = 1[z > 0] whatever tau is. */
    CHECK(dms_gate_forward(&vz, NULL, 123.0f, NULL, NULL, &va, &ex) ==
          DMS_OK);
    for (int i = 0; i < 6; ++i)
        CHECK(a[i] == (z[i] > 0));

    /* Backward: grad_z = ((ga + gp) s (1 - s) + gy) / tau. */
    float ga[6] = {1, 2, 3, 4, 5, 6}, gp[6] = {0.5f, 0, 0, 0, 0, 1};
    float gy[6] = {0, 1, 0, -1, 0, 2};
    float *gz = guarded_alloc(sizeof z);
    dms_tensor vga = view3(ga, DMS_FLOAT32, 1, 2, 3);
    dms_tensor vgp = view3(gp, DMS_FLOAT32, 1, 2, 3);
    dms_tensor vgy = view3(gy, DMS_FLOAT32, 1, 2, 3);
    dms_tensor vgz = view3(gz, DMS_FLOAT32, 1, 2, 3);
    CHECK(dms_gate_forward(&vz, &vn, tau, &vy, NULL, NULL, &ex) == DMS_OK);
    CHECK(dms_gate_backward(&vy, &vga, &vgp, &vgy, tau, &vgz, &ex) ==
          DMS_OK);
    for (int i = 0; i < 6; ++i) {
        double s = 1.0 / (1.0 + exp(-(double)y[i]));
        double want = ((ga[i] + gp[i]) * s * (1 - s) + gy[i]) / tau;
        CHECK(close_to(gz[i], want, 1e-5));
    }
    /* Missing gradients are zeros. */
    CHECK(dms_gate_backward(&vy, NULL, NULL, &vgy, tau, &vgz, &ex) ==
          DMS_OK);
    for (int i = 0; i < 6; ++i)
        CHECK(close_to(gz[i], gy[i] / tau, 1e-6));
    CHECK(guard_intact(gz, sizeof z));
    free(y);
    free(p);
    free(a);
    free(gz);
}

/* A strided output: every other element; the gaps must stay untouched. */
static void test_gate_strided(void)
{
    enum { B = 2, H = 3, T = 7 };
    float z[B * H * T];
    for (int i = 0; i < B * H * T; ++i)
        z[i] = (float)(i % 5) - 2.0f;
    size_t bytes = sizeof(uint16_t) * B * H * T * 2;
    uint16_t *y = guarded_alloc(bytes);
    for (int i = 0; i < B * H * T * 2; ++i)
        y[i] = 0x7777;
    dms_tensor vz = view3(z, DMS_FLOAT32, B, H, T);
    dms_tensor vy = view3(y, DMS_BFLOAT16, B, H, T);
    for (int d = 0; d < 3; ++d)
        vy.strides[d] *= 2;
    dms_exec ex = {2, NULL};
    CHECK(dms_gate_forward(&vz, NULL, 2.0f, &vy, NULL, NULL, &ex) == DMS_OK);
    int ok = 1;
    for (int i = 0; i < B * H * T; ++i) {
        ok &= dms_bf16_to_f32(y[2 * i]) == z[i] / 2.0f;
        ok &= y[2 * i + 1] == 0x7777;
    }
    CHECK(ok);
    CHECK(guard_intact(y, bytes));
    free(y);
}

static void test_argument_checks(void)
{
    float z[8] = {0}, out[8] = {0};
    int64_t iz[8] = {0};
    dms_tensor vz = view3(z, DMS_FLOAT32, 2, 2, 2);
    dms_tensor vo = view3(out, DMS_FLOAT32, 2, 2, 2);
    dms_exec ex = {1, NULL};

    CHECK_FAILS(dms_gate_forward(NULL, NULL, 1.0f, &vo, NULL, NULL, &ex),
                DMS_ERR_VALUE, "z:");
    dms_tensor bad = view3(iz, DMS_INT64, 2, 2, 2);
    CHECK_FAILS(dms_gate_forward(&bad, NULL, 1.0f, &vo, NULL, NULL, &ex),
                DMS_ERR_DTYPE, "z:");
    CHECK(strstr(dms_last_error(), "int64") != NULL);
    bad = view3(z, DMS_FLOAT32, 2, 2, 2);
    bad.ndim = 2;
    CHECK_FAILS(dms_gate_forward(&bad, NULL, 1.0f, &vo, NULL, NULL, &ex),
                DMS_ERR_SHAPE, "z:");
    bad = view3(out, DMS_FLOAT32, 2, 4, 1);
    CHECK_FAILS(dms_gate_forward(&vz, NULL, 1.0f, &bad, NULL, NULL, &ex),
                DMS_ERR_SHAPE, "y:");
    CHECK(strstr(dms_last_error(), "(2, 2, 2)") != NULL);
    bad = view3(out, DMS_FLOAT32, 2, 0, 2);
    CHECK_FAILS(dms_gate_forward(&bad, NULL, 1.0f, &vo, NULL, NULL, &ex),
                DMS_ERR_SHAPE, "z:");
    bad = vo;
    bad.readonly = 1;
    CHECK_FAILS(dms_gate_forward(&vz, NULL, 1.0f, NULL, &bad, NULL, &ex),
                DMS_ERR_READONLY, "p:");
    bad = vo;
    bad.strides[1] = 0;
    CHECK_FAILS(dms_gate_forward(&vz, NULL, 1.0f, NULL, NULL, &bad, &ex),
                DMS_ERR_LAYOUT, "a:");
    CHECK_FAILS(dms_gate_forward(&vz, NULL, 0.0f, &vo, NULL, NULL, &ex),
                DMS_ERR_VALUE, "tau:");
    CHECK_FAILS(dms_gate_forward(&vz, NULL, NAN, &vo, NULL, NULL, &ex),
                DMS_ERR_VALUE, "tau:");
    CHECK_FAILS(dms_gate_forward(&vz, NULL, 1.0f, NULL, NULL, NULL, &ex),
                DMS_ERR_VALUE, "y, p, a:");
    bad = vz;
    bad.data = NULL;
    CHECK_FAILS(dms_gate_forward(&bad, NULL, 1.0f, &vo, NULL, NULL, &ex),
                DMS_ERR_VALUE, "z:");
    CHECK_FAILS(dms_gate_backward(&vz, NULL, NULL, NULL, 1.0f, NULL, &ex),
                DMS_ERR_VALUE, "grad_z:");
    bad = view3(iz, DMS_INT64, 2, 2, 2);
    CHECK_FAILS(dms_gate_backward(&vz, &bad, NULL, NULL, 1.0f, &vo, &ex),
                DMS_ERR_DTYPE, "grad_a:");

    /* Devices: a CUDA tensor next to a CPU one, and CUDA without CUDA. */
    dms_tensor cuda = vo;
    cuda.device_type = DMS_CUDA;
    CHECK_FAILS(dms_gate_forward(&vz, NULL, 1.0f, &cuda, NULL, NULL, &ex),
                DMS_ERR_DEVICE, "y:");
    dms_tensor cuda_z = vz;
    cuda_z.device_type = DMS_CUDA;
    if (!dms_has_cuda())
        CHECK_FAILS(dms_gate_forward(&cuda_z, NULL, 1.0f, &cuda, NULL, NULL,
                                     &ex),
                    DMS_ERR_NO_CUDA, "z:");

    /* Noise wants float32, C-contiguous. */
    dms_tensor strided = vo;
    strided.strides[2] = 2;
    strided.shape[2] = 1;
    strided.shape[1] = 2;
    strided.strides[1] = 4;
    CHECK_FAILS(dms_logistic_noise(&strided, 1, 0, 0, 0, &ex),
                DMS_ERR_LAYOUT, "out:");
    CHECK_FAILS(dms_logistic_noise(&bad, 1, 0, 0, 0, &ex), DMS_ERR_DTYPE,
                "out:");
}

static void test_f16_bf16(void)
{
    /* float16 -> float32 -> float16 is exact for every non-NaN pattern. */
    int ok = 1;
    for (uint32_t h = 0; h < 65536; ++h) {
        float f = dms_f16_to_f32((uint16_t)h);
        if (isnan(f))
            ok &= dms_f32_to_f16(f) != 0 && isnan(dms_f16_to_f32(
                                                dms_f32_to_f16(f)));
        else
            ok &= dms_f32_to_f16(f) == h;
    }
    CHECK(ok);
#if defined(__FLT16_MAX__)
    /* Against the compiler's own rounding, on a spread of floats. */
    ok = 1;
    uint32_t state = 12345u;
    for (int i = 0; i < 2000000; ++i) {
        state = state * 1664525u + 1013904223u;
        uint32_t bits = state;
        if (((bits >> 23) & 0xffu) > 0x8f && ((bits >> 23) & 0xffu) != 0xff)
            bits = (bits & 0x807fffffu) | (((bits >> 23) & 0x1fu) + 0x60u) << 23;
        float f = dms_bits_float(bits);
        if (isnan(f))
            continue;
        _Float16 ref = (_Float16)f;
        uint16_t ref_bits;
        memcpy(&ref_bits, &ref, 2);
        if (dms_f32_to_f16(f) != ref_bits) {
            if (ok)
                fprintf(stderr, "  f16(%a): got %04x want %04x\n", (double)f,
                        dms_f32_to_f16(f), ref_bits);
            ok = 0;
        }
    }
    CHECK(ok);
#endif
    /* bfloat16: exact round trip, and round-to-nearest-even on ties. */
    ok = 1;
    for (uint32_t h = 0; h < 65536; ++h) {
        float f = dms_bf16_to_f32((uint16_t)h);
        if (!isnan(f))
            ok &= dms_f32_to_bf16(f) == h;
    }
    CHECK(ok);
    CHECK(dms_f32_to_bf16(dms_bits_float(0x3f808000u)) == 0x3f80); /* tie, even */
    CHECK(dms_f32_to_bf16(dms_bits_float(0x3f818000u)) == 0x3f82); /* tie, odd */
    CHECK(dms_f32_to_bf16(dms_bits_float(0x3f808001u)) == 0x3f81);
    CHECK(isnan(dms_bf16_to_f32(dms_f32_to_bf16(NAN))));
    CHECK(dms_f32_to_f16(65520.0f) == 0x7c00 && dms_f32_to_f16(65519.0f) == 0x7bff);
}

/* FP8: every code decodes to its value by the formula of the format and
 * encodes back to itself; hand-checked values, ties, subnormals and
 * saturation. (tests/test_fp8_cache.py compares with torch's float8.) */
static void test_fp8(void)
{
    for (int e5m2 = 0; e5m2 < 2; ++e5m2) {
        const int M = e5m2 ? 2 : 3, bias = e5m2 ? 15 : 7;
        int ok = 1;
        for (int c = 0; c < 256; ++c) {
            const int exponent = (c & 0x7f) >> M, mantissa = c & ((1 << M) - 1);
            const int special = e5m2 ? exponent == 31 : (c & 0x7f) == 0x7f;
            const float f = dms_fp8_to_f32((uint8_t)c, e5m2);
            if (special) {
                ok &= e5m2 && mantissa == 0 ? isinf(f) : isnan(f);
                continue;
            }
            const double want =
                (c & 0x80 ? -1.0 : 1.0) *
                (exponent ? ldexp(1.0 + mantissa / (double)(1 << M),
                                  exponent - bias)
                          : ldexp(mantissa / (double)(1 << M), 1 - bias));
            ok &= (double)f == want && dms_f32_to_fp8(f, e5m2) == c;
        }
        CHECK(ok);
    }
    CHECK(dms_f32_to_fp8(448.0f, 0) == 0x7e && dms_f32_to_fp8(-448.0f, 0) == 0xfe);
    CHECK(dms_f32_to_fp8(464.0f, 0) == 0x7e); /* rounds to 480 = NaN: saturates */
    CHECK(dms_f32_to_fp8(INFINITY, 0) == 0x7e && dms_f32_to_fp8(-INFINITY, 1) == 0xfb);
    CHECK(dms_f32_to_fp8(1e30f, 1) == 0x7b && dms_f32_to_fp8(61440.0f, 1) == 0x7b);
    CHECK((dms_f32_to_fp8(NAN, 0) & 0x7f) == 0x7f && isnan(dms_fp8_to_f32(dms_f32_to_fp8(NAN, 1), 1)));
    CHECK(dms_f32_to_fp8(1.0625f, 0) == 0x38); /* tie between 1 and 1.125: even */
    CHECK(dms_f32_to_fp8(1.1875f, 0) == 0x3a); /* tie between 1.125 and 1.25: even */
    CHECK(dms_f32_to_fp8(0.0009765625f, 0) == 0x00); /* 2^-10: half the least, tie to 0 */
    CHECK(dms_f32_to_fp8(0.0009765626f, 0) == 0x01);
    CHECK(dms_f32_to_fp8(0.0029296875f, 0) == 0x02); /* 1.5 x 2^-9: tie to 2 x 2^-9 */
    CHECK(dms_f32_to_fp8(1e-40f, 0) == 0x00 && dms_f32_to_fp8(-0.0f, 1) == 0x80);
    CHECK(dms_fp8_quantize(5.0f, 0.0f, 0) == 0 && dms_fp8_row_scale(448.0f, 0) == 1.0f);
}

static void test_philox_and_noise(void)
{
    /* Known-answer vectors of Philox4x32-10 (Random123 kat_vectors). */
    dms_philox_words r = dms_philox4x32_10(0, 0, 0, 0, 0, 0);
    CHECK(r.w[0] == 0x6627e8d5u && r.w[1] == 0xe169c58du &&
          r.w[2] == 0xbc57ac4cu && r.w[3] == 0x9b00dbd8u);
    r = dms_philox4x32_10(0xffffffffu, 0xffffffffu, 0xffffffffu, 0xffffffffu,
                          0xffffffffu, 0xffffffffu);
    CHECK(r.w[0] == 0x408f276du && r.w[1] == 0x41c83b0eu &&
          r.w[2] == 0xa20bc7c6u && r.w[3] == 0x6d5451fdu);
    r = dms_philox4x32_10(0x243f6a88u, 0x85a308d3u, 0x13198a2eu, 0x03707344u,
                          0xa4093822u, 0x299f31d0u);
    CHECK(r.w[0] == 0xd16cfe09u && r.w[1] == 0x94fdccebu &&
          r.w[2] == 0x5001e420u && r.w[3] == 0x24126ea1u);

    enum { N = 1001 }; /* not a multiple of 4 */
    float *a = guarded_alloc(N * sizeof(float));
    float *b = guarded_alloc(N * sizeof(float));
    dms_tensor va, vb;
    memset(&va, 0, sizeof va);
    va.data = a;
    va.dtype = DMS_FLOAT32;
    va.device_type = DMS_CPU;
    va.ndim = 1;
    va.shape[0] = N;
    va.strides[0] = 1;
    vb = va;
    vb.data = b;
    dms_exec one = {1, NULL}, two = {2, NULL};
    CHECK(dms_logistic_noise(&va, 42, 1, 2, 3, &one) == DMS_OK);
    CHECK(dms_logistic_noise(&vb, 42, 1, 2, 3, &two) == DMS_OK);
    CHECK(memcmp(a, b, N * sizeof(float)) == 0);
    double mean = 0, var = 0;
    int finite = 1;
    for (int i = 0; i < N; ++i) {
        finite &= isfinite(a[i]);
        mean += a[i] / N;
    }
    for (int i = 0; i < N; ++i)
        var += (a[i] - mean) * (a[i] - mean) / (N - 1);
    CHECK(finite);
    CHECK(fabs(mean) < 0.25);                     /* sd of mean ~0.057 */
    CHECK(fabs(var - 3.28986813) < 0.8); /* var = pi^2/3 */
    /* Each counter changes the stream. */
    const uint32_t counters[4][3] = {{0, 2, 3}, {1, 0, 3}, {1, 2, 0}, {1, 2, 3}};
    const uint64_t seeds[4] = {42, 42, 42, 43};
    for (int c = 0; c < 4; ++c) {
        CHECK(dms_logistic_noise(&vb, seeds[c], counters[c][0], counters[c][1],
                                 counters[c][2], &one) == DMS_OK);
        int same = 0;
        for (int i = 0; i < N; ++i)
            same += a[i] == b[i];
        CHECK(same < 5);
    }
    CHECK(guard_intact(a, N * sizeof(float)) &&
          guard_intact(b, N * sizeof(float)));
    free(a);
    free(b);
}

static float round_to(dms_dtype dtype, float x)
{
    if (dtype == DMS_BFLOAT16)
        return dms_bf16_to_f32(dms_f32_to_bf16(x));
    if (dtype == DMS_FLOAT16)
        return dms_f16_to_f32(dms_f32_to_f16(x));
    return x;
}

static void store_as(void *base, dms_dtype dtype, int64_t i, float x)
{
    if (dtype == DMS_FLOAT32)
        ((float *)base)[i] = x;
    else if (dtype == DMS_BFLOAT16)
        ((uint16_t *)base)[i] = dms_f32_to_bf16(x);
    else
        ((uint16_t *)base)[i] = dms_f32_to_f16(x);
}

/*
 * One decode call on a hand-built cache (every slot stored, rows of
 * different lengths - one empty - on pages in a scrambled order) against
 * the double-precision softmax over each row's slots; o and lse end in
 * guard bytes. The pool is exactly as large as the stored rows need, so a
 * kernel reading past a row's last key or value trips the sanitizer.
 */
/* Decode over pages of `dtype` (fmt DMS_KV_NATIVE) or of FP8 codes with a
 * scale per slot (queries in `dtype`), against a double-precision sum. */
static int decode_case(dms_dtype dtype, dms_kv_format fmt, int64_t D,
                       int64_t G, int64_t P, double tol)
{
    enum { H = 3 };
    const int64_t lengths[H] = {301, 16, 0}, max_pages = 301 / P + 1;
    int64_t n_pages = 0;
    for (int h = 0; h < H; ++h)
        n_pages += (lengths[h] + P - 1) / P;
    const size_t esize = dms_dtype_size(dtype);
    const size_t pool =
        (size_t)(n_pages * P * D) * (fmt == DMS_KV_NATIVE ? esize : 1);
    /* Exactly the pool's size: ASan catches a read past its end. */
    void *k_pages = malloc(pool), *v_pages = malloc(pool);
    float *k_scales = malloc(sizeof(float) * (size_t)(n_pages * P));
    float *v_scales = malloc(sizeof(float) * (size_t)(n_pages * P));
    float *kf = malloc(sizeof(float) * (size_t)(n_pages * P * D));
    float *vf = malloc(sizeof(float) * (size_t)(n_pages * P * D));
    int32_t *slot_limit = malloc(sizeof(int32_t) * (size_t)(n_pages * P));
    int32_t *page_table = malloc(sizeof(int32_t) * (size_t)(H * max_pages));
    int32_t row_slots[H], row_seen[H], window[H * 2] = {0}, free_count = 0;
    int32_t *free_pages = calloc((size_t)n_pages, sizeof(int32_t));
    uint32_t state = 7u * (uint32_t)(D + G + P);
    for (int64_t i = 0; i < n_pages * P && fmt != DMS_KV_NATIVE; ++i) {
        state = state * 1664525u + 1013904223u;
        k_scales[i] = (float)(1 + (state >> 24)) / 8192.0f; /* up to 1/32 */
        state = state * 1664525u + 1013904223u;
        v_scales[i] = (float)(1 + (state >> 24)) / 8192.0f;
    }
    for (int64_t i = 0; i < n_pages * P * D && fmt != DMS_KV_NATIVE; ++i) {
        const int e5m2 = fmt == DMS_KV_FP8_E5M2;
        uint8_t codes[2];
        for (int j = 0; j < 2; ++j) { /* any finite code */
            do {
                state = state * 1664525u + 1013904223u;
                codes[j] = (uint8_t)(state >> 24);
            } while (!isfinite(dms_fp8_to_f32(codes[j], e5m2)) ||
                     fabsf(dms_fp8_to_f32(codes[j], e5m2)) > 448.0f);
        }
        ((uint8_t *)k_pages)[i] = codes[0];
        ((uint8_t *)v_pages)[i] = codes[1];
        kf[i] = dms_fp8_to_f32(codes[0], e5m2) * k_scales[i / D];
        vf[i] = dms_fp8_to_f32(codes[1], e5m2) * v_scales[i / D];
    }
    for (int64_t i = 0; i < n_pages * P * D && fmt == DMS_KV_NATIVE; ++i) {
        state = state * 1664525u + 1013904223u;
        kf[i] = round_to(dtype, (float)(state >> 8) / 8388608.0f - 1.0f);
        state = state * 1664525u + 1013904223u;
        vf[i] = round_to(dtype, (float)(state >> 8) / 8388608.0f - 1.0f);
        store_as(k_pages, dtype, i, kf[i]);
        store_as(v_pages, dtype, i, vf[i]);
    }
    for (int64_t i = 0; i < n_pages * P; ++i)
        slot_limit[i] = INT32_MAX;
    /* Row 0 ends on the pool's last page (with P = 1 and 7 its last slot
     * is the pool's last slot); otherwise rows take pages from the end of
     * the pool backwards. */
    const int64_t row0_pages = (lengths[0] + P - 1) / P;
    int64_t next = n_pages - 1;
    for (int h = 0; h < H; ++h) {
        row_slots[h] = row_seen[h] = (int32_t)lengths[h];
        for (int64_t p = 0; p < max_pages; ++p) {
            int32_t page = -1;
            if (h == 0 && p == row0_pages - 1)
                page = (int32_t)(n_pages - 1);
            else if (p < (lengths[h] + P - 1) / P)
                page = (int32_t)--next;
            page_table[h * max_pages + p] = page;
        }
    }
    const int64_t HG = H * G;
    float *q = malloc(sizeof(float) * (size_t)(HG * D));
    void *q_data = malloc((size_t)(HG * D) * esize);
    for (int64_t i = 0; i < HG * D; ++i) {
        q[i] = round_to(dtype, (float)((i * 37) % 29) / 14.0f - 1.0f);
        store_as(q_data, dtype, i, q[i]);
    }
    float *o = guarded_alloc(sizeof(float) * (size_t)(HG * D));
    float *lse = guarded_alloc(sizeof(float) * (size_t)HG);

    host_cache hc;
    host_cache_init(&hc, k_pages, v_pages,
                    fmt == DMS_KV_NATIVE ? dtype : DMS_UINT8, n_pages, P, D,
                    H, max_pages, 1, slot_limit, page_table, row_slots,
                    row_seen, window, free_pages, &free_count);
    dms_cache cache = hc.cache;
    const int64_t s_scales[2] = {n_pages, P};
    dms_tensor tks = host_view(k_scales, DMS_FLOAT32, 2, s_scales);
    dms_tensor tvs = host_view(v_scales, DMS_FLOAT32, 2, s_scales);
    if (fmt != DMS_KV_NATIVE) {
        cache.k_scales = &tks;
        cache.v_scales = &tvs;
        cache.kv_format = fmt;
    }
    const int64_t s_q[4] = {1, HG, 1, D}, s_lse[3] = {1, HG, 1};
    dms_tensor tq = host_view(q_data, dtype, 4, s_q);
    dms_tensor to = host_view(o, DMS_FLOAT32, 4, s_q);
    dms_tensor tlse = host_view(lse, DMS_FLOAT32, 3, s_lse);
    dms_exec ex = {2, NULL};
    const float scale = 1.0f / sqrtf((float)D);

    int ok = dms_attn_decode(&cache, &tq, scale, &to, &tlse, NULL, &ex) ==
             DMS_OK;
    double worst = 0.0;
    double *s = malloc(sizeof(double) * 301);
    for (int h = 0; h < H && ok; ++h) {
        for (int64_t g = 0; g < G; ++g) {
            const int64_t qh = h * G + g;
            if (lengths[h] == 0) {
                ok &= isinf(lse[qh]) && lse[qh] < 0;
                for (int64_t d = 0; d < D; ++d)
                    ok &= o[qh * D + d] == 0.0f;
                continue;
            }
            double mx = -INFINITY, l = 0.0;
            for (int64_t i = 0; i < lengths[h]; ++i) {
                const int64_t slot = page_table[h * max_pages + i / P] * P +
                                     i % P;
                double dot = 0.0;
                for (int64_t d = 0; d < D; ++d)
                    dot += (double)q[qh * D + d] * kf[slot * D + d];
                s[i] = dot * scale;
                mx = s[i] > mx ? s[i] : mx;
            }
            for (int64_t i = 0; i < lengths[h]; ++i)
                l += exp(s[i] - mx);
            const double want_lse = mx + log(l);
            worst = fmax(worst, fabs(lse[qh] - want_lse) / (1 + fabs(want_lse)));
            for (int64_t d = 0; d < D; ++d) {
                double want = 0.0;
                for (int64_t i = 0; i < lengths[h]; ++i) {
                    const int64_t slot =
                        page_table[h * max_pages + i / P] * P + i % P;
                    want += exp(s[i] - mx) / l * vf[slot * D + d];
                }
                worst = fmax(worst, fabs(o[qh * D + d] - want) /
                                        (1 + fabs(want)));
            }
        }
    }
    ok &= worst <= tol;
    ok &= guard_intact(o, sizeof(float) * (size_t)(HG * D));
    ok &= guard_intact(lse, sizeof(float) * (size_t)HG);
    if (!ok)
        fprintf(stderr, "  decode %s %s fmt=%d D=%lld G=%lld P=%lld: error "
                "%.3g\n", dms_attn_decode_cpu_kernel(), dms_dtype_name(dtype),
                (int)fmt, (long long)D, (long long)G, (long long)P, worst);
    free(s);
    free(k_pages);
    free(v_pages);
    free(k_scales);
    free(v_scales);
    free(kf);
    free(vf);
    free(slot_limit);
    free(page_table);
    free(free_pages);
    free(q);
    free(q_data);
    free(o);
    free(lse);
    return ok;
}

static void test_decode_variants(void)
{
    static const char *const variants[] = {"baseline", "avx2", "avx512",
                                           "avx512bf16"};
    const char *chosen = dms_attn_decode_cpu_kernel();
    CHECK(strcmp(dms_cpu_kernel("attn_decode"), chosen) == 0);
    static const dms_dtype dtypes[] = {DMS_FLOAT32, DMS_BFLOAT16,
                                       DMS_FLOAT16};
    static const double tols[] = {1e-5, 2e-5, 2e-5};
    static const int64_t dims[] = {8, 24, 40, 128};
    static const int64_t groups[] = {1, 4, 5};
    static const int64_t page_sizes[] = {1, 7, 64};
    for (size_t vi = 0; vi < sizeof variants / sizeof *variants; ++vi) {
        if (!dms_attn_decode_cpu_use(variants[vi])) {
            printf("decode variant %s: not supported here\n", variants[vi]);
            continue;
        }
        int ok = 1;
        for (size_t t = 0; t < 3; ++t)
            for (size_t d = 0; d < sizeof dims / sizeof *dims; ++d)
                for (size_t g = 0; g < sizeof groups / sizeof *groups; ++g)
                    for (size_t p = 0; p < 3; ++p)
                        ok &= decode_case(dtypes[t], DMS_KV_NATIVE, dims[d],
                                          groups[g], page_sizes[p], tols[t]);
        CHECK(ok);
        /* FP8 pages (both formats), float32 and bfloat16 queries. */
        ok = 1;
        for (int f = DMS_KV_FP8_E4M3; f <= DMS_KV_FP8_E5M2; ++f)
            for (size_t t = 0; t < 2; ++t)
                for (size_t d = 0; d < sizeof dims / sizeof *dims; ++d)
                    for (size_t p = 0; p < 3; ++p)
                        ok &= decode_case(dtypes[t], (dms_kv_format)f,
                                          dims[d], 5, page_sizes[p], 1e-5);
        CHECK(ok);
    }
    CHECK(!dms_attn_decode_cpu_use("avx9000"));
    if (chosen[0] != 'i') /* not "invalid DMS_DECODE_KERNEL" */
        CHECK(dms_attn_decode_cpu_use(chosen));
}

int main(void)
{
    test_gate_values();
    test_gate_strided();
    test_argument_checks();
    test_f16_bf16();
    test_fp8();
    test_philox_and_noise();
    test_decode_variants();
    printf("%d passed, %d failed\n", passed, failed);
    return failed != 0;
}
