/*
 * internal.h - what the C files and the CUDA files of dms share but users
 * never see: error recording, argument checks, the CPU/CUDA kernel entry
 * points behind each public op, and the OpenMP helpers.
 */
#ifndef DMS_INTERNAL_H
#define DMS_INTERNAL_H

#include "../dms.h"

#ifdef __cplusplus
extern "C" {
#endif

/* Record a failure for dms_last_error() and return `status`. */
dms_status dms_fail(dms_status status, const char *fmt, ...)
#if defined(__GNUC__)
    __attribute__((format(printf, 2, 3)))
#endif
    ;

/* Propagate a failed status. */
#define DMS_TRY(expr)                                                     \
    do {                                                                  \
        dms_status dms_try_status_ = (expr);                              \
        if (dms_try_status_ != DMS_OK)                                    \
            return dms_try_status_;                                       \
    } while (0)

/* ---- argument checks (csrc/core/check.c) ----------------------------- */

/* Any rank. */
#define DMS_ANY_RANK (-1)

/*
 * The checks every tensor argument goes through: present, one of the
 * dtypes in `dtype_mask`, rank `ndim` (or DMS_ANY_RANK), not empty, and -
 * when `is_output` - writable and free of zero strides (a broadcast view
 * cannot be written element by element).
 */
dms_status dms_check_tensor(const dms_tensor *t, const char *name,
                            unsigned dtype_mask, int ndim, int is_output);
/* Same shape as `ref`. */
dms_status dms_check_same_shape(const dms_tensor *t, const char *name,
                                const dms_tensor *ref, const char *ref_name);
/* Same device (type and index) as `ref`. */
dms_status dms_check_same_device(const dms_tensor *t, const char *name,
                                 const dms_tensor *ref, const char *ref_name);
/* C-contiguous (row-major, no gaps). */
dms_status dms_check_contiguous(const dms_tensor *t, const char *name);
int64_t dms_numel(const dms_tensor *t);

/* ---- SIMD dispatch ------------------------------------------------------ */

/*
 * A function marked DMS_SIMD_CLONES is compiled for x86-64-v4 (AVX-512),
 * x86-64-v3 (AVX2 + FMA) and baseline x86-64; the loader picks one for the
 * CPU it runs on (GCC target_clones, an ifunc). Elsewhere, and under the
 * sanitizers (which ifuncs confuse), it is compiled once. setup.py builds
 * with -ffp-contract=fast so the clones use fused multiply-adds.
 */
#if defined(__GNUC__) && !defined(__clang__) && defined(__x86_64__) &&    \
    defined(__linux__) && !defined(__SANITIZE_ADDRESS__)
#define DMS_HAVE_SIMD_CLONES 1
#define DMS_SIMD_CLONES                                                   \
    __attribute__((target_clones("arch=x86-64-v4", "arch=x86-64-v3", "default")))
#else
#define DMS_HAVE_SIMD_CLONES 0
#define DMS_SIMD_CLONES
#endif

/* ---- threads ---------------------------------------------------------- */

int dms_resolve_threads(const dms_exec *exec);

/* ---- kernels behind the public ops ------------------------------------ */

void dms_gate_forward_cpu(const dms_tensor *z, const dms_tensor *noise,
                          float tau, const dms_tensor *y, const dms_tensor *p,
                          const dms_tensor *a, int num_threads);
void dms_gate_backward_cpu(const dms_tensor *y, const dms_tensor *grad_a,
                           const dms_tensor *grad_p, const dms_tensor *grad_y,
                           float tau, const dms_tensor *grad_z,
                           int num_threads);
void dms_logistic_noise_cpu(const dms_tensor *out, uint64_t seed,
                            uint32_t process_index, uint32_t accum_step,
                            uint32_t global_step, int num_threads);

/*
 * The checked arguments of the training attention, shared by the CPU and
 * CUDA kernels. Tensors the call did not get are NULL.
 */
typedef struct dms_attn_train_args {
    const dms_tensor *q, *k, *v, *y, *key_padding;
    const dms_tensor *o, *lse;                       /* forward outputs  */
    const dms_tensor *grad_o;                        /* backward inputs  */
    const dms_tensor *grad_q, *grad_k, *grad_v, *grad_y; /* bwd outputs  */
    int64_t B, H, G, T, D, window;
    float scale;
} dms_attn_train_args;

void dms_attn_train_forward_cpu(const dms_attn_train_args *args,
                                int num_threads);
void dms_attn_train_backward_cpu(const dms_attn_train_args *args,
                                 int num_threads);

#ifdef DMS_WITH_CUDA
dms_status dms_attn_train_forward_cuda(const dms_attn_train_args *args,
                                       void *stream);
dms_status dms_attn_train_backward_cuda(const dms_attn_train_args *args,
                                        void *stream);
dms_status dms_gate_forward_cuda(const dms_tensor *z, const dms_tensor *noise,
                                 float tau, const dms_tensor *y,
                                 const dms_tensor *p, const dms_tensor *a,
                                 void *stream);
dms_status dms_gate_backward_cuda(const dms_tensor *y,
                                  const dms_tensor *grad_a,
                                  const dms_tensor *grad_p,
                                  const dms_tensor *grad_y, float tau,
                                  const dms_tensor *grad_z, void *stream);
dms_status dms_logistic_noise_cuda(const dms_tensor *out, uint64_t seed,
                                   uint32_t process_index,
                                   uint32_t accum_step, uint32_t global_step,
                                   void *stream);
dms_status dms_cuda_info_impl(int *runtime_version, int *driver_version,
                              int *cublas_version, int *device_count);
#endif

#ifdef __cplusplus
}
#endif

#endif /* DMS_INTERNAL_H */
