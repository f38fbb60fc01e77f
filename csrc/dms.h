/*
 * dms.h - the whole C API of the DMS engine (Dynamic Memory Sparsification).
 *
 * Every entry point is `dms_`-prefixed and returns an `enum dms_status`.
 * On failure the thread-local message returned by dms_last_error() names
 * the offending argument and says what was expected and what was received.
 * Kernels never abort, never print and never allocate device memory: the
 * caller owns every buffer, outputs included.
 *
 * Tensors are passed as `dms_tensor` views (see below). Shapes in the
 * comments use SPEC.md's names: B batch, H key/value heads, T tokens.
 * An op runs on the device of its tensors; all tensors of one call must be
 * on the same device. CUDA work is queued on `dms_exec.cuda_stream` and is
 * never synchronised by the library.
 */
#ifndef DMS_H
#define DMS_H

#include <stddef.h>
#include <stdint.h>

#ifdef __cplusplus
extern "C" {
#endif

#define DMS_VERSION_MAJOR 0
#define DMS_VERSION_MINOR 1
#define DMS_VERSION_PATCH 0

#define DMS_MAX_DIMS 8

typedef enum dms_status {
    DMS_OK = 0,
    DMS_ERR_DTYPE,     /* unsupported or mismatched element type          */
    DMS_ERR_SHAPE,     /* wrong rank, mismatched or empty shape           */
    DMS_ERR_LAYOUT,    /* strides the op does not support                 */
    DMS_ERR_DEVICE,    /* wrong device, or tensors on different devices   */
    DMS_ERR_VALUE,     /* scalar argument out of range                    */
    DMS_ERR_READONLY,  /* an output tensor is read-only                   */
    DMS_ERR_NO_CUDA,   /* a CUDA tensor reached a build without CUDA      */
    DMS_ERR_CUDA,      /* the CUDA runtime reported an error              */
    DMS_ERR_POOL,      /* the page pool has too few free pages: grow it   */
    DMS_ERR_INTERNAL   /* a bug in dms: please report it                  */
} dms_status;

typedef enum dms_dtype {
    DMS_FLOAT32 = 0,
    DMS_FLOAT16,
    DMS_BFLOAT16,
    DMS_INT32,
    DMS_INT64,
    DMS_UINT8,
    DMS_BOOL,
    DMS_NUM_DTYPES
} dms_dtype;

/* Bit masks of dtypes, for validation. */
#define DMS_DTYPE_BIT(dt) (1u << (unsigned)(dt))
#define DMS_FLOATING                                                      \
    (DMS_DTYPE_BIT(DMS_FLOAT32) | DMS_DTYPE_BIT(DMS_FLOAT16) |            \
     DMS_DTYPE_BIT(DMS_BFLOAT16))

typedef enum dms_device_type {
    DMS_CPU = 1,
    DMS_CUDA = 2
} dms_device_type;

/*
 * A non-owning view of a tensor. `data` points at element [0, ..., 0]
 * (DLPack's byte_offset already applied); `strides` count elements, not
 * bytes, and are always filled in (compact row-major when the producer
 * gave none). `readonly` is set for tensors that must not be written.
 */
typedef struct dms_tensor {
    void *data;
    dms_dtype dtype;
    dms_device_type device_type;
    int device_index;
    int ndim;
    int64_t shape[DMS_MAX_DIMS];
    int64_t strides[DMS_MAX_DIMS];
    int readonly;
} dms_tensor;

/*
 * How to run a call. num_threads <= 0 means the OpenMP default.
 * cuda_stream is a cudaStream_t (NULL = the legacy default stream); it is
 * ignored for CPU tensors.
 */
typedef struct dms_exec {
    int num_threads;
    void *cuda_stream;
} dms_exec;

/* ---- errors and build ------------------------------------------------ */

/* The message of the last failure on this thread ("" if none). */
const char *dms_last_error(void);
/* A constant name such as "DMS_ERR_SHAPE". */
const char *dms_status_name(dms_status status);
/* "float32", "bfloat16", ... */
const char *dms_dtype_name(dms_dtype dtype);
size_t dms_dtype_size(dms_dtype dtype);

/* CPU features detected at run time, as DMS_CPU_* bits. */
#define DMS_CPU_AVX2 (1u << 0)
#define DMS_CPU_FMA (1u << 1)
#define DMS_CPU_F16C (1u << 2)
#define DMS_CPU_AVX512F (1u << 3)
#define DMS_CPU_AVX512BF16 (1u << 4)
#define DMS_CPU_AMX_BF16 (1u << 5) /* AMX tiles usable: the CPU has them and Linux granted them */
unsigned dms_cpu_features(void);
/*
 * The CPU code path an op takes on this machine ("baseline" x86-64/other,
 * "avx2", "avx512"), chosen at load time from the CPU's features; NULL for
 * an unknown op name. Ops: "gate", "logistic_noise", "attn_train",
 * "attn_prefill", "attn_decode". attn_decode can also be "avx512bf16" (bfloat16 caches use
 * the AVX512-BF16 dot product, FP8 caches widen codes with AVX512-VBMI byte
 * permutes; CPUs with both) and follows the DMS_DECODE_KERNEL variable
 * (auto | baseline | avx2 | avx512 | avx512bf16, read when the library
 * loads; a variant this CPU lacks makes decode fail, and is reported here
 * as "invalid DMS_DECODE_KERNEL"). attn_train and attn_prefill are
 * "avx512bf16" when bfloat16 calls compute their score products with the
 * AVX512-BF16 dot product (the rest of the kernel and other dtypes run the
 * avx512 code); DMS_BF16DOT=off, read when the library loads, turns that
 * off.
 */
const char *dms_cpu_kernel(const char *op);
/* Threads an OpenMP region would use by default (1 without OpenMP). */
int dms_default_num_threads(void);
/* 1 when the CUDA kernels were compiled into this build. */
int dms_has_cuda(void);
/*
 * CUDA runtime, driver and cuBLAS versions, and the number of visible
 * devices (0 when there is no GPU or no driver; that is not an error).
 * Fails with DMS_ERR_NO_CUDA in a CPU-only build.
 */
dms_status dms_cuda_info(int *runtime_version, int *driver_version,
                         int *cublas_version, int *device_count);

/* ---- gating (SPEC.md section 2) -------------------------------------- */

/*
 * Gate forward, elementwise over [B, H, T]:
 *     y = (z + noise) / tau          (noise = 0 when `noise` is NULL)
 *     p = sigmoid(y)                 soft gate
 *     a = 1 if y > 0 else 0          hard decision (== p > 0.5)
 * Inference threshold mode is `noise == NULL`: a = 1[z > 0] for any tau.
 *
 *   z     : [B, H, T] float32 | float16 | bfloat16, decision logits
 *   noise : [B, H, T] floating, logistic noise, or NULL
 *   tau   : temperature, finite and > 0
 *   y     : [B, H, T] floating output, or NULL to skip
 *   p     : [B, H, T] floating output, or NULL to skip
 *   a     : [B, H, T] floating | uint8 | bool output, or NULL to skip
 * Any strides are accepted; outputs must not alias each other or inputs.
 */
dms_status dms_gate_forward(const dms_tensor *z, const dms_tensor *noise,
                            float tau, const dms_tensor *y,
                            const dms_tensor *p, const dms_tensor *a,
                            const dms_exec *exec);

/*
 * Gate backward. The hard decision passes its gradient straight through to
 * the soft gate (forward value a, gradient of p), so with s = sigmoid(y):
 *     grad_z = ((grad_a + grad_p) * s * (1 - s) + grad_y) / tau
 * Missing gradients (NULL) count as zero.
 *
 *   y      : [B, H, T] floating, the y saved by the forward
 *   grad_a : [B, H, T] floating, or NULL
 *   grad_p : [B, H, T] floating, or NULL
 *   grad_y : [B, H, T] floating, or NULL
 *   grad_z : [B, H, T] floating output
 */
dms_status dms_gate_backward(const dms_tensor *y, const dms_tensor *grad_a,
                             const dms_tensor *grad_p,
                             const dms_tensor *grad_y, float tau,
                             const dms_tensor *grad_z, const dms_exec *exec);

/*
 * Deterministic logistic noise (the difference of two standard Gumbel
 * samples has the standard logistic distribution, so it is drawn directly
 * by inverting the logistic CDF: n = log(u) - log(1 - u)).
 *
 * Element i of `out` (C order) takes the (i mod 4)-th word of
 * Philox4x32-10 with key = seed and counter =
 * (i / 4, process_index, accum_step, global_step); u is that word's top
 * 24 bits, centred in (0, 1). The result depends only on these numbers and
 * i, so CPU and CUDA agree (up to the last bit of log) and a resumed run
 * draws the same noise.
 *
 *   out : any shape, C-contiguous, float32, at most 2^34 elements
 */
dms_status dms_logistic_noise(const dms_tensor *out, uint64_t seed,
                              uint32_t process_index, uint32_t accum_step,
                              uint32_t global_step, const dms_exec *exec);

/* ---- training attention (SPEC.md section 3, soft form) ---------------- */

/*
 * Causal attention of query j over keys i <= j where a key more than
 * `window` positions behind the query is down-weighted by the soft eviction
 * gate of the token after it:
 *
 *   s[j, i] = scale * q[j].k[i]                             if j - i <= window
 *   s[j, i] = scale * q[j].k[i] + logsigmoid(-y[i + 1])     if j - i >  window
 *   o[j]    = sum_i softmax_i(s[j, :]) v[i],   lse[j] = logsumexp_i s[j, i]
 *
 * (logsigmoid(-y) = log(1 - sigmoid(y)), computed stably.) Padding keys are
 * never visible; a padding query gets o = 0 and lse = -inf. Query head qh
 * reads key/value head qh / G (grouped-query attention, never expanded).
 *
 *   q           : [B, H*G, T, D] float32 | float16 | bfloat16
 *   k, v        : [B, H, T, D]   same dtype as q
 *   y           : [B, H, T] floating, noised gate logits, or NULL (no
 *                 penalty: plain causal attention, e.g. the teacher pass)
 *   key_padding : [B, T] bool | uint8, nonzero = padding, or NULL
 *   window      : w >= 0 (w >= T - 1 means no penalty anywhere)
 *   scale       : softmax scale, finite and > 0 (usually 1/sqrt(D))
 *   o           : [B, H*G, T, D] floating output
 *   lse         : [B, H*G, T] float32 output, kept for the backward
 * D <= 256. Every [.., T, D] tensor may have any strides as long as the D
 * dimension is contiguous (stride 1): the [B, T, H, D] layout a projection
 * produces is read in place through a transposed view.
 */
dms_status dms_attn_train_forward(const dms_tensor *q, const dms_tensor *k,
                                  const dms_tensor *v, const dms_tensor *y,
                                  const dms_tensor *key_padding,
                                  int64_t window, float scale,
                                  const dms_tensor *o, const dms_tensor *lse,
                                  const dms_exec *exec);

/*
 * Backward of dms_attn_train_forward, from its inputs, its outputs o and
 * lse, and grad_o. Probabilities are recomputed from lse; no T x T buffer.
 *
 *   grad_o          : [B, H*G, T, D] floating
 *   grad_q          : [B, H*G, T, D] floating output
 *   grad_k, grad_v  : [B, H, T, D]   floating outputs
 *   grad_y          : [B, H, T] floating output, or NULL (also when y is
 *                     NULL); grad_y[..., 0] is 0 (no key precedes token 0)
 * Results are deterministic: no atomics, the same on every run.
 */
dms_status dms_attn_train_backward(
    const dms_tensor *q, const dms_tensor *k, const dms_tensor *v,
    const dms_tensor *y, const dms_tensor *key_padding, int64_t window,
    float scale, const dms_tensor *o, const dms_tensor *lse,
    const dms_tensor *grad_o, const dms_tensor *grad_q,
    const dms_tensor *grad_k, const dms_tensor *grad_v,
    const dms_tensor *grad_y, const dms_exec *exec);

/* ---- paged inference cache (SPEC.md sections 4 and 5) ----------------- */

/*
 * How a paged cache stores keys and values. NATIVE pages hold them in their
 * own dtype (float32 | float16 | bfloat16: that of q, k_new and v_new).
 * FP8 pages are uint8 codes of OCP FP8 (E4M3 as torch.float8_e4m3fn, E5M2
 * as torch.float8_e5m2) with one float32 scale per stored row of D
 * elements, in k_scales / v_scales: s = amax / (448 | 57344) of the row,
 * code = x / s rounded to nearest even and saturated, read back as
 * fp8(code) * s (csrc/core/scalar.h); q, k_new and v_new may then have any
 * floating dtype (one for the three). Every key and value an attention op
 * uses goes through that rounding, the new tokens of a prefill call too,
 * so results do not depend on how a sequence is split into calls.
 */
typedef enum dms_kv_format {
    DMS_KV_NATIVE = 0,
    DMS_KV_FP8_E4M3,
    DMS_KV_FP8_E5M2
} dms_kv_format;

/*
 * The paged DMS cache of one layer. Every piece of state is a tensor the
 * caller owns (on the device the kernels run on), so a decode step needs no
 * host round trip. A row is one (batch element b, KV head h), r = b*H + h.
 *
 *   k_pages, v_pages : [n_pages, P, D] float32 | float16 | bfloat16, or
 *                      uint8 with FP8 pages (kv_format), the pool; page p
 *                      holds P consecutive slots of one row
 *   slot_limit       : [n_pages, P] int32; a stored key is visible to a
 *                      query at row position j iff j < slot_limit (a key
 *                      flagged for eviction at position i gets i + w + 1,
 *                      every other key INT32_MAX)
 *   page_table       : [R, max_pages] int32, row r's pages in slot order
 *   row_slots        : [R] int32, slots in use; slots 0 .. row_slots - 1 of
 *                      a row are all occupied (an evicted slot is reused by
 *                      the very token whose arrival evicts it)
 *   row_seen         : [R] int32, tokens appended (the next row position;
 *                      padding tokens are not tokens of the row)
 *   window           : [R, w + 1] int32, the slot (page * P + offset) of
 *                      each of the last w + 1 tokens, at position % (w + 1)
 *   free_pages       : [n_pages] int32, a stack of free page ids, of which
 *                      free_count[0] are valid (bottom first)
 *   free_count       : [1] int32
 *   window_size      : w >= 0, any page size P >= 1 (the model's config
 *                      keeps SPEC's P < w; the kernels do not need it)
 */
typedef struct dms_cache {
    const dms_tensor *k_pages, *v_pages, *slot_limit, *page_table;
    const dms_tensor *row_slots, *row_seen, *window, *free_pages, *free_count;
    int64_t window_size;
    /* FP8 pages (kv_format != DMS_KV_NATIVE) only, else NULL: the scale of
     * each stored K / V row, [n_pages, P] float32 (see dms_kv_format). */
    const dms_tensor *k_scales, *v_scales;
    dms_kv_format kv_format;
} dms_cache;

/*
 * Appends n tokens per row (SPEC section 4), in order. For each non-padding
 * token at row position t with decision a[t]:
 *   - a[t] is the eviction flag of token t - 1 (the decision concerns the
 *     token before it; the first token's decision has nothing to flag);
 *   - the token at t - w - 1 leaves the window: if it is flagged its slot
 *     is reused by token t, else token t takes a fresh slot (a new page is
 *     popped from free_pages when the row's last page is full).
 * k_new/v_new rows of tokens whose slot is reused later in the same call
 * are not copied. Nothing is modified if the pool cannot supply the pages
 * the call needs: the call fails with DMS_ERR_POOL and the message says how
 * many pages are missing (grow the pool and retry).
 *
 *   k_new, v_new  : [B, H, n, D], the dtype of k_pages (any one floating
 *                   dtype with FP8 pages); last dim contiguous
 *   decisions     : [B, H, n] bool | uint8 (0 or 1)
 *   key_padding   : [B, n] bool | uint8, nonzero = padding, or NULL
 *   token_slots   : [B, H, n] int32 output: each token's slot, -1 for
 *                   padding and for tokens evicted within the call
 */
dms_status dms_cache_append(const dms_cache *cache, const dms_tensor *k_new,
                            const dms_tensor *v_new,
                            const dms_tensor *decisions,
                            const dms_tensor *key_padding,
                            const dms_tensor *token_slots,
                            const dms_exec *exec);

/*
 * Prefill attention (SPEC sections 3 and 5): n new queries per row against
 * the cache as it is *before* dms_cache_append of the same tokens, plus the
 * n new keys, with the hard visibility rule. A query at row position j
 * sees a cached slot iff j < its slot_limit (the last cached token's flag
 * is taken from the first non-padding decision of this call), and a new
 * key at position i iff i <= j, it is not padding, and (its flag is 0 or
 * j - i <= w). Padding queries give o = 0 and lse = -inf.
 *
 *   q            : [B, H*G, n, D] (dtype of k_new), last dim contiguous
 *   k_new, v_new : [B, H, n, D]
 *   decisions, key_padding : as for dms_cache_append
 *   scale        : softmax scale, finite and > 0
 *   o            : [B, H*G, n, D] floating output
 *   lse          : [B, H*G, n] float32 output
 */
dms_status dms_attn_prefill(const dms_cache *cache, const dms_tensor *q,
                            const dms_tensor *k_new, const dms_tensor *v_new,
                            const dms_tensor *decisions,
                            const dms_tensor *key_padding, float scale,
                            const dms_tensor *o, const dms_tensor *lse,
                            const dms_exec *exec);

/*
 * Decode attention: one query per row (G query heads per KV head) over
 * every stored slot of the row, after dms_cache_append of the query's own
 * token (at decode time every stored key is visible: flagged keys are
 * overwritten the moment they leave the window). Rows with no stored slot
 * (an all-padding batch element) give o = 0, lse = -inf.
 *
 *   q         : [B, H*G, 1, D], last dim contiguous
 *   o         : [B, H*G, 1, D] floating output
 *   lse       : [B, H*G, 1] float32 output
 *   workspace : [B * H * G, S, D + 2] float32 scratch, or NULL: long rows
 *               are split into up to S key ranges processed in parallel
 *               (flash-decoding) and merged by log-sum-exp; NULL = S = 1.
 *               Results do not depend on S beyond float rounding.
 */
dms_status dms_attn_decode(const dms_cache *cache, const dms_tensor *q,
                           float scale, const dms_tensor *o,
                           const dms_tensor *lse, const dms_tensor *workspace,
                           const dms_exec *exec);

#ifdef __cplusplus
}
#endif

#endif /* DMS_H */
