/*
 * common.c - error recording, the argument checks every op runs before it
 * touches data, dtype names, run-time CPU feature detection and threads.
 */
#define _DEFAULT_SOURCE /* syscall(), for the AMX permission */
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#ifdef _OPENMP
#include <omp.h>
#endif

#include "internal.h"

/* One message per thread: kernels run with the GIL released. */
static _Thread_local char last_error[512];

const char *dms_last_error(void)
{
    return last_error;
}

dms_status dms_fail(dms_status status, const char *fmt, ...)
{
    va_list args;
    va_start(args, fmt);
    vsnprintf(last_error, sizeof last_error, fmt, args);
    va_end(args);
    return status;
}

const char *dms_status_name(dms_status status)
{
    switch (status) {
    case DMS_OK: return "DMS_OK";
    case DMS_ERR_DTYPE: return "DMS_ERR_DTYPE";
    case DMS_ERR_SHAPE: return "DMS_ERR_SHAPE";
    case DMS_ERR_LAYOUT: return "DMS_ERR_LAYOUT";
    case DMS_ERR_DEVICE: return "DMS_ERR_DEVICE";
    case DMS_ERR_VALUE: return "DMS_ERR_VALUE";
    case DMS_ERR_READONLY: return "DMS_ERR_READONLY";
    case DMS_ERR_NO_CUDA: return "DMS_ERR_NO_CUDA";
    case DMS_ERR_CUDA: return "DMS_ERR_CUDA";
    case DMS_ERR_POOL: return "DMS_ERR_POOL";
    case DMS_ERR_INTERNAL: return "DMS_ERR_INTERNAL";
    }
    return "DMS_ERR_UNKNOWN";
}

const char *dms_dtype_name(dms_dtype dtype)
{
    switch (dtype) {
    case DMS_FLOAT32: return "float32";
    case DMS_FLOAT16: return "float16";
    case DMS_BFLOAT16: return "bfloat16";
    case DMS_INT32: return "int32";
    case DMS_INT64: return "int64";
    case DMS_UINT8: return "uint8";
    case DMS_BOOL: return "bool";
    case DMS_NUM_DTYPES: break;
    }
    return "unknown";
}

size_t dms_dtype_size(dms_dtype dtype)
{
    switch (dtype) {
    case DMS_FLOAT32:
    case DMS_INT32: return 4;
    case DMS_FLOAT16:
    case DMS_BFLOAT16: return 2;
    case DMS_INT64: return 8;
    case DMS_UINT8:
    case DMS_BOOL: return 1;
    case DMS_NUM_DTYPES: break;
    }
    return 0;
}

/* ---- argument checks -------------------------------------------------- */

static void format_shape(const dms_tensor *t, char *buf, size_t size)
{
    size_t used = (size_t)snprintf(buf, size, "(");
    for (int d = 0; d < t->ndim && used < size; ++d)
        used += (size_t)snprintf(buf + used, size - used, "%s%lld",
                                 d ? ", " : "", (long long)t->shape[d]);
    if (t->ndim == 1 && used < size)
        used += (size_t)snprintf(buf + used, size - used, ",");
    if (used < size)
        snprintf(buf + used, size - used, ")");
}

static void format_dtypes(unsigned mask, char *buf, size_t size)
{
    size_t used = 0;
    int count = 0, total = 0;
    for (int dt = 0; dt < DMS_NUM_DTYPES; ++dt)
        total += (mask & DMS_DTYPE_BIT(dt)) != 0;
    buf[0] = '\0';
    for (int dt = 0; dt < DMS_NUM_DTYPES && used < size; ++dt) {
        if (!(mask & DMS_DTYPE_BIT(dt)))
            continue;
        const char *sep = count == 0 ? "" : (count == total - 1 ? " or " : ", ");
        used += (size_t)snprintf(buf + used, size - used, "%s%s", sep,
                                 dms_dtype_name((dms_dtype)dt));
        ++count;
    }
}

int64_t dms_numel(const dms_tensor *t)
{
    int64_t n = 1;
    for (int d = 0; d < t->ndim; ++d)
        n *= t->shape[d];
    return n;
}

dms_status dms_check_tensor(const dms_tensor *t, const char *name,
                            unsigned dtype_mask, int ndim, int is_output)
{
    char buf[160];
    if (t == NULL)
        return dms_fail(DMS_ERR_VALUE, "%s: a tensor is required, got none",
                        name);
    if ((unsigned)t->dtype >= DMS_NUM_DTYPES ||
        !(dtype_mask & DMS_DTYPE_BIT(t->dtype))) {
        format_dtypes(dtype_mask, buf, sizeof buf);
        return dms_fail(DMS_ERR_DTYPE, "%s: expected dtype %s, got %s", name,
                        buf, dms_dtype_name(t->dtype));
    }
    if (t->device_type != DMS_CPU && t->device_type != DMS_CUDA)
        return dms_fail(DMS_ERR_DEVICE, "%s: expected a CPU or CUDA tensor",
                        name);
    if (t->ndim < 0 || t->ndim > DMS_MAX_DIMS ||
        (ndim != DMS_ANY_RANK && t->ndim != ndim)) {
        format_shape(t, buf, sizeof buf);
        if (ndim == DMS_ANY_RANK)
            return dms_fail(DMS_ERR_SHAPE, "%s: expected at most %d dims, got "
                            "shape %s", name, DMS_MAX_DIMS, buf);
        return dms_fail(DMS_ERR_SHAPE, "%s: expected %d dims, got shape %s",
                        name, ndim, buf);
    }
    for (int d = 0; d < t->ndim; ++d) {
        if (t->shape[d] <= 0) {
            format_shape(t, buf, sizeof buf);
            return dms_fail(DMS_ERR_SHAPE, "%s: expected a non-empty tensor, "
                            "got shape %s", name, buf);
        }
    }
    if (t->data == NULL)
        return dms_fail(DMS_ERR_VALUE, "%s: non-empty tensor has a NULL data "
                        "pointer", name);
    if (is_output) {
        if (t->readonly)
            return dms_fail(DMS_ERR_READONLY, "%s: output tensor is read-only",
                            name);
        for (int d = 0; d < t->ndim; ++d)
            if (t->shape[d] > 1 && t->strides[d] == 0)
                return dms_fail(DMS_ERR_LAYOUT, "%s: output has stride 0 in "
                                "dim %d (a broadcast view cannot be written)",
                                name, d);
    }
    return DMS_OK;
}

dms_status dms_check_same_shape(const dms_tensor *t, const char *name,
                                const dms_tensor *ref, const char *ref_name)
{
    int same = t->ndim == ref->ndim;
    for (int d = 0; same && d < t->ndim; ++d)
        same = t->shape[d] == ref->shape[d];
    if (!same) {
        char got[160], want[160];
        format_shape(t, got, sizeof got);
        format_shape(ref, want, sizeof want);
        return dms_fail(DMS_ERR_SHAPE, "%s: expected shape %s (the shape of "
                        "%s), got %s", name, want, ref_name, got);
    }
    return DMS_OK;
}

dms_status dms_check_shape(const dms_tensor *t, const char *name, int ndim,
                           const int64_t *want)
{
    int same = t->ndim == ndim;
    for (int d = 0; same && d < ndim; ++d)
        same = t->shape[d] == want[d];
    if (!same) {
        dms_tensor expected = *t;
        char got[160], wanted[160];
        expected.ndim = ndim;
        for (int d = 0; d < ndim; ++d)
            expected.shape[d] = want[d];
        format_shape(t, got, sizeof got);
        format_shape(&expected, wanted, sizeof wanted);
        return dms_fail(DMS_ERR_SHAPE, "%s: expected shape %s, got %s", name,
                        wanted, got);
    }
    return DMS_OK;
}

dms_status dms_check_heads(const dms_tensor *t, const char *name, int64_t b,
                           int64_t heads, int64_t n, int64_t d)
{
    const int64_t want[4] = {b, heads, n, d};
    DMS_TRY(dms_check_shape(t, name, 4, want));
    if (t->strides[3] != 1 && d > 1)
        return dms_fail(DMS_ERR_LAYOUT, "%s: the last (head) dim must be "
                        "contiguous (stride 1), got stride %lld", name,
                        (long long)t->strides[3]);
    return DMS_OK;
}

static const char *device_name(dms_device_type type)
{
    return type == DMS_CUDA ? "cuda" : "cpu";
}

dms_status dms_check_same_device(const dms_tensor *t, const char *name,
                                 const dms_tensor *ref, const char *ref_name)
{
    if (t->device_type != ref->device_type ||
        (t->device_type == DMS_CUDA && t->device_index != ref->device_index))
        return dms_fail(DMS_ERR_DEVICE, "%s: expected device %s:%d (the device "
                        "of %s), got %s:%d", name,
                        device_name(ref->device_type), ref->device_index,
                        ref_name, device_name(t->device_type),
                        t->device_index);
    return DMS_OK;
}

dms_status dms_check_contiguous(const dms_tensor *t, const char *name)
{
    int64_t expected = 1;
    for (int d = t->ndim - 1; d >= 0; --d) {
        if (t->shape[d] != 1 && t->strides[d] != expected)
            return dms_fail(DMS_ERR_LAYOUT, "%s: expected a C-contiguous "
                            "tensor, got stride %lld in dim %d where %lld "
                            "was expected (call .contiguous() first)", name,
                            (long long)t->strides[d], d, (long long)expected);
        expected *= t->shape[d];
    }
    return DMS_OK;
}

/* ---- machine ---------------------------------------------------------- */

/*
 * AMX: the CPU has AMX-TILE and AMX-BF16 (CPUID leaf 7, EDX bits 24 and 22),
 * the OS saves the tile state (XCR0 bits 17 and 18), and Linux grants this
 * process the tile data (arch_prctl ARCH_REQ_XCOMP_PERM, asked once).
 */
static int amx_granted = -1;

#if DMS_X86_AMX
#include <cpuid.h>
#include <sys/syscall.h>
#include <unistd.h>

static int amx_ask(void)
{
    unsigned a, b, c, d;
    if (!__get_cpuid_count(7, 0, &a, &b, &c, &d) || !(d & (1u << 24)) ||
        !(d & (1u << 22)))
        return 0;
    if (!__get_cpuid(1, &a, &b, &c, &d) || !(c & (1u << 27))) /* OSXSAVE */
        return 0;
    unsigned lo, hi;
    __asm__ volatile("xgetbv" : "=a"(lo), "=d"(hi) : "c"(0));
    if ((lo & (3u << 17)) != (3u << 17))
        return 0;
#ifdef SYS_arch_prctl
    /* ARCH_REQ_XCOMP_PERM (0x1023) for XFEATURE_XTILEDATA (18). */
    return syscall(SYS_arch_prctl, 0x1023, 18) == 0;
#else
    return 0;
#endif
}
#endif

static int amx_usable(void)
{
    if (amx_granted < 0) {
#if DMS_X86_AMX
        amx_granted = amx_ask();
#else
        amx_granted = 0;
#endif
    }
    return amx_granted;
}

unsigned dms_cpu_features(void)
{
    unsigned features = 0;
#if defined(__GNUC__) && (defined(__x86_64__) || defined(__i386__))
    __builtin_cpu_init();
    if (__builtin_cpu_supports("avx2"))
        features |= DMS_CPU_AVX2;
    if (__builtin_cpu_supports("fma"))
        features |= DMS_CPU_FMA;
    if (__builtin_cpu_supports("f16c"))
        features |= DMS_CPU_F16C;
    if (__builtin_cpu_supports("avx512f"))
        features |= DMS_CPU_AVX512F;
#if defined(__GNUC__) && __GNUC__ >= 12
    if (__builtin_cpu_supports("avx512bf16"))
        features |= DMS_CPU_AVX512BF16;
#endif
#endif
    if (amx_usable())
        features |= DMS_CPU_AMX_BF16;
    return features;
}

static int bf16dot_on, amx_on;

__attribute__((unused)) static int env_off(const char *name)
{
    const char *want = getenv(name);
    return want != NULL && (strcmp(want, "off") == 0 || strcmp(want, "0") == 0);
}

#if DMS_X86_BF16DOT
__attribute__((constructor)) static void choose_tile_products(void)
{
    __builtin_cpu_init();
    bf16dot_on = !env_off("DMS_BF16DOT") &&
                 __builtin_cpu_supports("avx512f") &&
                 __builtin_cpu_supports("avx512bf16");
    /* AMX replaces vdpbf16ps, so DMS_BF16DOT=off turns it off too. */
    amx_on = bf16dot_on && !env_off("DMS_AMX") && amx_usable();
}
#endif

int dms_cpu_bf16dot(void)
{
    return bf16dot_on;
}

int dms_cpu_amx(void)
{
    return amx_on;
}

/* The clone the loader picks for a DMS_SIMD_CLONES function here. */
static const char *simd_clone(void)
{
    if (!DMS_HAVE_SIMD_CLONES)
        return "baseline";
    /* What the loader checks for the x86-64-v4 / -v3 clones. */
    __builtin_cpu_init();
    if (__builtin_cpu_supports("x86-64-v4"))
        return "avx512";
    return __builtin_cpu_supports("x86-64-v3") ? "avx2" : "baseline";
}

const char *dms_cpu_kernel(const char *op)
{
    if (strcmp(op, "gate") == 0)
        return simd_clone();
    if (strcmp(op, "attn_train") == 0 || strcmp(op, "attn_prefill") == 0)
        return dms_cpu_amx() ? "amx" : dms_cpu_bf16dot() ? "avx512bf16" : simd_clone();
    /* Philox is 32x32->64-bit multiplies: baseline code is fast enough for
     * noise drawn once per training step. */
    if (strcmp(op, "logistic_noise") == 0)
        return "baseline";
    /* Decode picks its variant itself (cpuid, DMS_DECODE_KERNEL). */
    if (strcmp(op, "attn_decode") == 0)
        return dms_attn_decode_cpu_kernel();
    return NULL;
}

int dms_default_num_threads(void)
{
#ifdef _OPENMP
    return omp_get_max_threads();
#else
    return 1;
#endif
}

int dms_resolve_threads(const dms_exec *exec)
{
    if (exec != NULL && exec->num_threads > 0)
        return exec->num_threads;
    return dms_default_num_threads();
}

int dms_has_cuda(void)
{
#ifdef DMS_WITH_CUDA
    return 1;
#else
    return 0;
#endif
}

dms_status dms_cuda_info(int *runtime_version, int *driver_version,
                         int *cublas_version, int *device_count)
{
#ifdef DMS_WITH_CUDA
    return dms_cuda_info_impl(runtime_version, driver_version, cublas_version,
                              device_count);
#else
    (void)runtime_version;
    (void)driver_version;
    (void)cublas_version;
    (void)device_count;
    return dms_fail(DMS_ERR_NO_CUDA, "dms was built without CUDA kernels; "
                    "rebuild with nvcc on PATH (or CUDA_HOME set) and "
                    "DMS_CUDA=1: pip install -e .");
#endif
}
