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
/* Shape exactly `want` (ndim dims). */
dms_status dms_check_shape(const dms_tensor *t, const char *name, int ndim,
                           const int64_t *want);
/* A [b, heads, n, d] tensor whose last (head) dim is contiguous. */
dms_status dms_check_heads(const dms_tensor *t, const char *name, int64_t b,
                           int64_t heads, int64_t n, int64_t d);
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

/*
 * A checked dms_cache (every cache tensor C-contiguous, on one device) and
 * the per-call tensors of the cache ops, as the CPU and CUDA kernels take
 * them. Row r = b * H + h.
 */
typedef struct dms_cache_view {
    void *k_pages, *v_pages;      /* [n_pages, P, D]                       */
    dms_dtype dtype;              /* of k_new / v_new / q (and of native
                                     pages)                                */
    dms_kv_format fmt;            /* native pages, or FP8 with ...         */
    float *k_scales, *v_scales;   /* ... [n_pages, P] scales, else NULL    */
    int32_t *slot_limit;          /* [n_pages, P]                          */
    int32_t *page_table;          /* [R, max_pages]                        */
    int32_t *row_slots, *row_seen; /* [R]                                  */
    int32_t *window;              /* [R, w + 1]                            */
    int32_t *free_pages;          /* [n_pages]                             */
    int32_t *free_count;          /* [1]                                   */
    int64_t n_pages, P, D, R, max_pages, w;
} dms_cache_view;

typedef struct dms_cache_call {
    dms_cache_view c;
    int64_t B, H, G, n;           /* n new tokens per row                  */
    const dms_tensor *q;          /* [B, H*G, n, D] (attention only)       */
    const dms_tensor *k_new, *v_new; /* [B, H, n, D]                       */
    const dms_tensor *decisions;  /* [B, H, n] bool | uint8                */
    const dms_tensor *key_padding; /* [B, n] or NULL                       */
    const dms_tensor *token_slots; /* [B, H, n] int32 (append)             */
    const dms_tensor *o, *lse;    /* attention outputs                     */
    const dms_tensor *workspace;  /* decode: [B*H*G, S, D + 2] or NULL     */
    float scale;
} dms_cache_call;

/* DMS_ERR_VALUE unless every row's counters, pages in use and the last
 * `ring` entries of its window record (as many as the op reads: all w + 1
 * for append, 1 for prefill, 0 for decode) point inside the pool (the
 * kernels index with them unchecked). */
dms_status dms_cache_check_rows_cpu(const dms_cache_view *c, int64_t ring);
dms_status dms_cache_append_cpu(const dms_cache_call *call);
void dms_attn_prefill_cpu(const dms_cache_call *call, int num_threads);
/* Fails (DMS_ERR_VALUE) only when DMS_DECODE_KERNEL names a variant this
 * CPU cannot run. */
dms_status dms_attn_decode_cpu(const dms_cache_call *call, int num_threads);
/* The variant dms_attn_decode_cpu runs: "baseline", "avx2", "avx512" or
 * "avx512bf16" (bfloat16 caches multiply with vdpbf16ps, FP8 caches widen
 * with AVX512-VBMI: a CPU with both), chosen when the
 * library loads from the CPU and the DMS_DECODE_KERNEL variable. */
const char *dms_attn_decode_cpu_kernel(void);
/* Tests: switch to variant `name`; 0 if this CPU cannot run it. Not
 * thread-safe against running decodes. */
int dms_attn_decode_cpu_use(const char *name);
/*
 * The CPU attention kernels (training, prefill) compute the scores of
 * bfloat16 inputs with the AVX512-BF16 dot product (cpu/tiles.h) where the
 * compiler can emit it (DMS_X86_BF16DOT) and dms_cpu_bf16dot() says so: the
 * CPU has it and DMS_BF16DOT is not "off" (read when the library loads).
 */
#if (defined(__GNUC__) || defined(__clang__)) && defined(__x86_64__) &&   \
    (defined(__clang__) || __GNUC__ >= 12)
#define DMS_X86_BF16DOT 1
#else
#define DMS_X86_BF16DOT 0
#endif
int dms_cpu_bf16dot(void);
/*
 * Where the CPU also has AMX (AMX-TILE and AMX-BF16; Sapphire Rapids and
 * later) and Linux lets this process use the tile registers, those tile
 * products run on AMX instead (cpu/tiles.h): the score products of bfloat16
 * inputs, and the probability products whose other operand is bfloat16.
 * dms_cpu_amx() says so: DMS_X86_AMX, the CPU, the permission (asked once,
 * when the library loads) and DMS_AMX not "off".
 */
#if DMS_X86_BF16DOT && !defined(__clang__)
#define DMS_X86_AMX 1
#else
#define DMS_X86_AMX 0
#endif
int dms_cpu_amx(void);

#ifdef DMS_WITH_CUDA
dms_status dms_cache_append_cuda(const dms_cache_call *call, void *stream);
dms_status dms_attn_prefill_cuda(const dms_cache_call *call, void *stream);
dms_status dms_attn_decode_cuda(const dms_cache_call *call, void *stream);
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
