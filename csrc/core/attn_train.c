/*
 * attn_train.c - the public training-attention ops (SPEC.md section 3,
 * soft form): validate every argument, collect them into one
 * dms_attn_train_args, then hand the call to the CPU or the CUDA kernel.
 */
#include <math.h>

#include "internal.h"

#define DMS_ATTN_MAX_HEAD_DIM 256

#define DMS_NO_CUDA_MESSAGE                                               \
    "got a CUDA tensor, but dms was built without CUDA kernels; rebuild "  \
    "with nvcc available and DMS_CUDA=1: pip install -e ."

/* A [.., T, D] tensor of the call: rank 4, floating, same device as q. */
static dms_status check4(const dms_tensor *t, const char *name,
                         const dms_tensor *q, int is_output, int64_t b,
                         int64_t h, int64_t n, int64_t d)
{
    DMS_TRY(dms_check_tensor(t, name, DMS_FLOATING, 4, is_output));
    DMS_TRY(dms_check_same_device(t, name, q, "q"));
    return dms_check_heads(t, name, b, h, n, d);
}

/* Everything both directions share; fills `a`. */
static dms_status check_common(dms_attn_train_args *a, const dms_tensor *q,
                               const dms_tensor *k, const dms_tensor *v,
                               const dms_tensor *y,
                               const dms_tensor *key_padding, int64_t window,
                               float scale)
{
    DMS_TRY(dms_check_tensor(q, "q", DMS_FLOATING, 4, 0));
    DMS_TRY(dms_check_tensor(k, "k", DMS_FLOATING, 4, 0));
    const int64_t B = q->shape[0], HG = q->shape[1], T = q->shape[2],
                  D = q->shape[3], H = k->shape[1];
    if (k->dtype != q->dtype)
        return dms_fail(DMS_ERR_DTYPE, "k: expected dtype %s (the dtype of "
                        "q), got %s", dms_dtype_name(q->dtype),
                        dms_dtype_name(k->dtype));
    if (HG % H != 0)
        return dms_fail(DMS_ERR_SHAPE, "k: its %lld heads must divide the "
                        "%lld query heads of q (grouped-query attention)",
                        (long long)H, (long long)HG);
    if (D > DMS_ATTN_MAX_HEAD_DIM)
        return dms_fail(DMS_ERR_SHAPE, "q: head dim %lld is larger than the "
                        "supported %d", (long long)D, DMS_ATTN_MAX_HEAD_DIM);
    DMS_TRY(dms_check_heads(q, "q", B, HG, T, D));
    DMS_TRY(dms_check_same_device(k, "k", q, "q"));
    DMS_TRY(dms_check_heads(k, "k", B, H, T, D));
    DMS_TRY(check4(v, "v", q, 0, B, H, T, D));
    if (v->dtype != q->dtype)
        return dms_fail(DMS_ERR_DTYPE, "v: expected dtype %s (the dtype of "
                        "q), got %s", dms_dtype_name(q->dtype),
                        dms_dtype_name(v->dtype));
    if (y != NULL) {
        const int64_t want[3] = {B, H, T};
        DMS_TRY(dms_check_tensor(y, "y", DMS_FLOATING, 3, 0));
        DMS_TRY(dms_check_same_device(y, "y", q, "q"));
        DMS_TRY(dms_check_shape(y, "y", 3, want));
    }
    if (key_padding != NULL) {
        const int64_t want[2] = {B, T};
        DMS_TRY(dms_check_tensor(key_padding, "key_padding",
                                 DMS_DTYPE_BIT(DMS_BOOL) |
                                     DMS_DTYPE_BIT(DMS_UINT8),
                                 2, 0));
        DMS_TRY(dms_check_same_device(key_padding, "key_padding", q, "q"));
        DMS_TRY(dms_check_shape(key_padding, "key_padding", 2, want));
    }
    if (window < 0)
        return dms_fail(DMS_ERR_VALUE, "window: expected a delay >= 0, got "
                        "%lld", (long long)window);
    if (!(scale > 0.0f) || !isfinite(scale))
        return dms_fail(DMS_ERR_VALUE, "scale: expected a finite value > 0, "
                        "got %g", (double)scale);
    a->q = q;
    a->k = k;
    a->v = v;
    a->y = y;
    a->key_padding = key_padding;
    a->B = B;
    a->H = H;
    a->G = HG / H;
    a->T = T;
    a->D = D;
    a->window = window;
    a->scale = scale;
    return DMS_OK;
}

static dms_status check_lse(const dms_tensor *lse, const dms_tensor *q,
                            int is_output)
{
    const int64_t want[3] = {q->shape[0], q->shape[1], q->shape[2]};
    DMS_TRY(dms_check_tensor(lse, "lse", DMS_DTYPE_BIT(DMS_FLOAT32), 3,
                             is_output));
    DMS_TRY(dms_check_same_device(lse, "lse", q, "q"));
    return dms_check_shape(lse, "lse", 3, want);
}

dms_status dms_attn_train_forward(const dms_tensor *q, const dms_tensor *k,
                                  const dms_tensor *v, const dms_tensor *y,
                                  const dms_tensor *key_padding,
                                  int64_t window, float scale,
                                  const dms_tensor *o, const dms_tensor *lse,
                                  const dms_exec *exec)
{
    dms_attn_train_args a = {0};
    DMS_TRY(check_common(&a, q, k, v, y, key_padding, window, scale));
    DMS_TRY(check4(o, "o", q, 1, a.B, a.H * a.G, a.T, a.D));
    DMS_TRY(check_lse(lse, q, 1));
    a.o = o;
    a.lse = lse;
    if (q->device_type == DMS_CUDA) {
#ifdef DMS_WITH_CUDA
        return dms_attn_train_forward_cuda(&a, exec ? exec->cuda_stream
                                                    : NULL);
#else
        return dms_fail(DMS_ERR_NO_CUDA, "q: " DMS_NO_CUDA_MESSAGE);
#endif
    }
    dms_attn_train_forward_cpu(&a, dms_resolve_threads(exec));
    return DMS_OK;
}

dms_status dms_attn_train_backward(
    const dms_tensor *q, const dms_tensor *k, const dms_tensor *v,
    const dms_tensor *y, const dms_tensor *key_padding, int64_t window,
    float scale, const dms_tensor *o, const dms_tensor *lse,
    const dms_tensor *grad_o, const dms_tensor *grad_q,
    const dms_tensor *grad_k, const dms_tensor *grad_v,
    const dms_tensor *grad_y, const dms_exec *exec)
{
    dms_attn_train_args a = {0};
    DMS_TRY(check_common(&a, q, k, v, y, key_padding, window, scale));
    const int64_t HG = a.H * a.G;
    DMS_TRY(check4(o, "o", q, 0, a.B, HG, a.T, a.D));
    DMS_TRY(check_lse(lse, q, 0));
    DMS_TRY(check4(grad_o, "grad_o", q, 0, a.B, HG, a.T, a.D));
    DMS_TRY(check4(grad_q, "grad_q", q, 1, a.B, HG, a.T, a.D));
    DMS_TRY(check4(grad_k, "grad_k", q, 1, a.B, a.H, a.T, a.D));
    DMS_TRY(check4(grad_v, "grad_v", q, 1, a.B, a.H, a.T, a.D));
    if (grad_y != NULL) {
        const int64_t want[3] = {a.B, a.H, a.T};
        if (y == NULL)
            return dms_fail(DMS_ERR_VALUE, "grad_y: given, but y is None (no "
                            "gate, no gradient)");
        DMS_TRY(dms_check_tensor(grad_y, "grad_y", DMS_FLOATING, 3, 1));
        DMS_TRY(dms_check_same_device(grad_y, "grad_y", q, "q"));
        DMS_TRY(dms_check_shape(grad_y, "grad_y", 3, want));
    }
    a.o = o;
    a.lse = lse;
    a.grad_o = grad_o;
    a.grad_q = grad_q;
    a.grad_k = grad_k;
    a.grad_v = grad_v;
    a.grad_y = grad_y;
    if (q->device_type == DMS_CUDA) {
#ifdef DMS_WITH_CUDA
        return dms_attn_train_backward_cuda(&a, exec ? exec->cuda_stream
                                                     : NULL);
#else
        return dms_fail(DMS_ERR_NO_CUDA, "q: " DMS_NO_CUDA_MESSAGE);
#endif
    }
    dms_attn_train_backward_cpu(&a, dms_resolve_threads(exec));
    return DMS_OK;
}
