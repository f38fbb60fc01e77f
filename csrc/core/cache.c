/*
 * cache.c - the public paged-cache ops (SPEC.md sections 4 and 5):
 * validate the cache tensors and the call's tensors, then hand the call to
 * the CPU or the CUDA kernel.
 */
#include <math.h>

#include "internal.h"

#define DMS_NO_CUDA_MESSAGE                                               \
    "got a CUDA tensor, but dms was built without CUDA kernels; rebuild "  \
    "with nvcc available and DMS_CUDA=1: pip install -e ."

#define DMS_INT32 DMS_DTYPE_BIT(DMS_INT32)
#define DMS_FLAGS (DMS_DTYPE_BIT(DMS_BOOL) | DMS_DTYPE_BIT(DMS_UINT8))

/* A cache tensor: the given dtypes and rank, contiguous, beside k_pages. */
static dms_status check_state(const dms_tensor *t, const char *name,
                              unsigned dtypes, int ndim,
                              const dms_tensor *k_pages)
{
    DMS_TRY(dms_check_tensor(t, name, dtypes, ndim, 1));
    DMS_TRY(dms_check_contiguous(t, name));
    return dms_check_same_device(t, name, k_pages, "cache.k_pages");
}

static dms_status dim_is(const dms_tensor *t, const char *name, int d,
                         int64_t want, const char *what)
{
    if (t->shape[d] != want)
        return dms_fail(DMS_ERR_SHAPE, "%s: expected dim %d to be %lld (%s), "
                        "got %lld", name, d, (long long)want, what,
                        (long long)t->shape[d]);
    return DMS_OK;
}

static dms_status check_cache(const dms_cache *cache, dms_cache_view *v)
{
    if (cache == NULL)
        return dms_fail(DMS_ERR_VALUE, "cache: required, got none");
    const dms_tensor *kp = cache->k_pages;
    const dms_kv_format fmt = cache->kv_format;
    if (fmt != DMS_KV_NATIVE && fmt != DMS_KV_FP8_E4M3 &&
        fmt != DMS_KV_FP8_E5M2)
        return dms_fail(DMS_ERR_VALUE, "cache.kv_format: expected %d "
                        "(native), %d (fp8_e4m3) or %d (fp8_e5m2), got %d",
                        DMS_KV_NATIVE, DMS_KV_FP8_E4M3, DMS_KV_FP8_E5M2,
                        (int)fmt);
    const unsigned page_dtypes =
        fmt == DMS_KV_NATIVE ? DMS_FLOATING : DMS_DTYPE_BIT(DMS_UINT8);
    DMS_TRY(dms_check_tensor(kp, "cache.k_pages", page_dtypes, 3, 1));
    DMS_TRY(dms_check_contiguous(kp, "cache.k_pages"));
    DMS_TRY(check_state(cache->v_pages, "cache.v_pages", page_dtypes, 3, kp));
    DMS_TRY(dms_check_same_shape(cache->v_pages, "cache.v_pages", kp,
                                 "cache.k_pages"));
    if (cache->v_pages->dtype != kp->dtype)
        return dms_fail(DMS_ERR_DTYPE, "cache.v_pages: expected dtype %s (the "
                        "dtype of cache.k_pages), got %s",
                        dms_dtype_name(kp->dtype),
                        dms_dtype_name(cache->v_pages->dtype));
    const int64_t n_pages = kp->shape[0], P = kp->shape[1], D = kp->shape[2];
    const int64_t w = cache->window_size;
    if (w < 0)
        return dms_fail(DMS_ERR_VALUE, "cache.window_size: expected w >= 0, "
                        "got %lld", (long long)w);
    if (n_pages > INT32_MAX / P)
        return dms_fail(DMS_ERR_SHAPE, "cache.k_pages: %lld pages of %lld "
                        "slots overflow int32 slot ids", (long long)n_pages,
                        (long long)P);
    DMS_TRY(check_state(cache->slot_limit, "cache.slot_limit", DMS_INT32, 2,
                        kp));
    DMS_TRY(dim_is(cache->slot_limit, "cache.slot_limit", 0, n_pages,
                   "pages"));
    DMS_TRY(dim_is(cache->slot_limit, "cache.slot_limit", 1, P,
                   "page size"));
    DMS_TRY(check_state(cache->page_table, "cache.page_table", DMS_INT32, 2,
                        kp));
    const int64_t R = cache->page_table->shape[0];
    DMS_TRY(check_state(cache->row_slots, "cache.row_slots", DMS_INT32, 1,
                        kp));
    DMS_TRY(dim_is(cache->row_slots, "cache.row_slots", 0, R, "rows"));
    DMS_TRY(check_state(cache->row_seen, "cache.row_seen", DMS_INT32, 1, kp));
    DMS_TRY(dim_is(cache->row_seen, "cache.row_seen", 0, R, "rows"));
    DMS_TRY(check_state(cache->window, "cache.window", DMS_INT32, 2, kp));
    DMS_TRY(dim_is(cache->window, "cache.window", 0, R, "rows"));
    DMS_TRY(dim_is(cache->window, "cache.window", 1, w + 1,
                   "window_size + 1"));
    DMS_TRY(check_state(cache->free_pages, "cache.free_pages", DMS_INT32, 1,
                        kp));
    DMS_TRY(dim_is(cache->free_pages, "cache.free_pages", 0, n_pages,
                   "pages"));
    DMS_TRY(check_state(cache->free_count, "cache.free_count", DMS_INT32, 1,
                        kp));
    DMS_TRY(dim_is(cache->free_count, "cache.free_count", 0, 1, "a count"));
    const dms_tensor *scales[2] = {cache->k_scales, cache->v_scales};
    const char *scale_names[2] = {"cache.k_scales", "cache.v_scales"};
    for (int i = 0; i < 2; ++i) {
        if (fmt == DMS_KV_NATIVE) {
            if (scales[i] != NULL)
                return dms_fail(DMS_ERR_VALUE, "%s: expected none (pages of "
                                "dtype %s have no scales), got a tensor",
                                scale_names[i], dms_dtype_name(kp->dtype));
            continue;
        }
        if (scales[i] == NULL)
            return dms_fail(DMS_ERR_VALUE, "%s: required with FP8 pages "
                            "([n_pages, P] float32), got none",
                            scale_names[i]);
        DMS_TRY(check_state(scales[i], scale_names[i],
                            DMS_DTYPE_BIT(DMS_FLOAT32), 2, kp));
        DMS_TRY(dim_is(scales[i], scale_names[i], 0, n_pages, "pages"));
        DMS_TRY(dim_is(scales[i], scale_names[i], 1, P, "page size"));
    }
    v->k_pages = kp->data;
    v->v_pages = cache->v_pages->data;
    v->fmt = fmt;
    v->k_scales = fmt == DMS_KV_NATIVE ? NULL : (float *)cache->k_scales->data;
    v->v_scales = fmt == DMS_KV_NATIVE ? NULL : (float *)cache->v_scales->data;
    /* FP8: the first token tensor of the call (k_new, else q) sets it. */
    v->dtype = fmt == DMS_KV_NATIVE ? kp->dtype : DMS_NUM_DTYPES;
    v->slot_limit = (int32_t *)cache->slot_limit->data;
    v->page_table = (int32_t *)cache->page_table->data;
    v->row_slots = (int32_t *)cache->row_slots->data;
    v->row_seen = (int32_t *)cache->row_seen->data;
    v->window = (int32_t *)cache->window->data;
    v->free_pages = (int32_t *)cache->free_pages->data;
    v->free_count = (int32_t *)cache->free_count->data;
    v->n_pages = n_pages;
    v->P = P;
    v->D = D;
    v->R = R;
    v->max_pages = cache->page_table->shape[1];
    v->w = w;
    return DMS_OK;
}

/* A [B, heads, n, D] tensor of the call, in the pages' dtype (with FP8
 * pages: in the dtype of the call's first token tensor, which sets it). */
static dms_status check_tokens(const dms_tensor *t, const char *name,
                               dms_cache_view *c, const dms_tensor *kp,
                               int64_t B, int64_t heads, int64_t n,
                               int is_output)
{
    const unsigned dtypes = is_output || c->dtype == DMS_NUM_DTYPES
                                ? DMS_FLOATING
                                : DMS_DTYPE_BIT(c->dtype);
    DMS_TRY(dms_check_tensor(t, name, dtypes, 4, is_output));
    if (!is_output && c->dtype == DMS_NUM_DTYPES)
        c->dtype = t->dtype;
    DMS_TRY(dms_check_same_device(t, name, kp, "cache.k_pages"));
    return dms_check_heads(t, name, B, heads, n, c->D);
}

static dms_status check_small(const dms_tensor *t, const char *name,
                              unsigned dtypes, const dms_tensor *kp, int ndim,
                              const int64_t *want, int is_output)
{
    DMS_TRY(dms_check_tensor(t, name, dtypes, ndim, is_output));
    DMS_TRY(dms_check_same_device(t, name, kp, "cache.k_pages"));
    return dms_check_shape(t, name, ndim, want);
}

/* The new tokens: k_new, v_new, decisions, key_padding; fills B, H, n. */
static dms_status check_new_tokens(const dms_cache *cache, dms_cache_call *x,
                                   const dms_tensor *k_new,
                                   const dms_tensor *v_new,
                                   const dms_tensor *decisions,
                                   const dms_tensor *key_padding)
{
    const dms_tensor *kp = cache->k_pages;
    DMS_TRY(dms_check_tensor(k_new, "k_new", DMS_FLOATING, 4, 0));
    const int64_t B = k_new->shape[0], H = k_new->shape[1],
                  n = k_new->shape[2];
    if (B * H != x->c.R)
        return dms_fail(DMS_ERR_SHAPE, "k_new: %lld x %lld (batch x heads) "
                        "rows, but the cache has %lld rows", (long long)B,
                        (long long)H, (long long)x->c.R);
    DMS_TRY(check_tokens(k_new, "k_new", &x->c, kp, B, H, n, 0));
    DMS_TRY(check_tokens(v_new, "v_new", &x->c, kp, B, H, n, 0));
    const int64_t want3[3] = {B, H, n}, want2[2] = {B, n};
    DMS_TRY(check_small(decisions, "decisions", DMS_FLAGS, kp, 3, want3, 0));
    if (key_padding != NULL)
        DMS_TRY(check_small(key_padding, "key_padding", DMS_FLAGS, kp, 2,
                            want2, 0));
    x->B = B;
    x->H = H;
    x->n = n;
    x->k_new = k_new;
    x->v_new = v_new;
    x->decisions = decisions;
    x->key_padding = key_padding;
    return DMS_OK;
}

/* On the CPU, decisions must be 0 or 1 (a bool tensor always is). */
static dms_status check_decision_values(const dms_cache_call *x)
{
    const dms_tensor *d = x->decisions;
    if (d->device_type != DMS_CPU || d->dtype == DMS_BOOL)
        return DMS_OK;
    for (int64_t b = 0; b < x->B; ++b)
        for (int64_t h = 0; h < x->H; ++h)
            for (int64_t t = 0; t < x->n; ++t) {
                uint8_t v = ((const uint8_t *)d->data)[b * d->strides[0] +
                                                       h * d->strides[1] +
                                                       t * d->strides[2]];
                if (v > 1)
                    return dms_fail(DMS_ERR_VALUE, "decisions: expected 0 or "
                                    "1, got %u at [%lld, %lld, %lld]",
                                    (unsigned)v, (long long)b, (long long)h,
                                    (long long)t);
            }
    return DMS_OK;
}

dms_status dms_cache_append(const dms_cache *cache, const dms_tensor *k_new,
                            const dms_tensor *v_new,
                            const dms_tensor *decisions,
                            const dms_tensor *key_padding,
                            const dms_tensor *token_slots,
                            const dms_exec *exec)
{
    dms_cache_call x = {0};
    DMS_TRY(check_cache(cache, &x.c));
    DMS_TRY(check_new_tokens(cache, &x, k_new, v_new, decisions,
                             key_padding));
    const int64_t want3[3] = {x.B, x.H, x.n};
    DMS_TRY(check_small(token_slots, "token_slots", DMS_INT32,
                        cache->k_pages, 3, want3, 1));
    DMS_TRY(check_decision_values(&x));
    x.token_slots = token_slots;
    (void)exec; /* the CPU append is sequential; exec only carries a stream */
    if (cache->k_pages->device_type == DMS_CUDA) {
#ifdef DMS_WITH_CUDA
        if (decisions->dtype != DMS_BOOL)
            return dms_fail(DMS_ERR_DTYPE, "decisions: expected dtype bool on "
                            "CUDA (its values need no check), got %s",
                            dms_dtype_name(decisions->dtype));
        return dms_cache_append_cuda(&x, exec ? exec->cuda_stream : NULL);
#else
        return dms_fail(DMS_ERR_NO_CUDA, "cache.k_pages: " DMS_NO_CUDA_MESSAGE);
#endif
    }
    DMS_TRY(dms_cache_check_rows_cpu(&x.c, x.c.w + 1));
    return dms_cache_append_cpu(&x);
}

static dms_status check_attention(dms_cache_call *x, const dms_cache *cache,
                                  const dms_tensor *q, int64_t n, float scale,
                                  const dms_tensor *o, const dms_tensor *lse)
{
    const dms_tensor *kp = cache->k_pages;
    DMS_TRY(dms_check_tensor(q, "q", DMS_FLOATING, 4, 0));
    const int64_t B = q->shape[0], HG = q->shape[1];
    const int64_t H = x->H ? x->H : (B > 0 ? x->c.R / B : 0);
    if (H == 0 || B * H != x->c.R || HG % H != 0)
        return dms_fail(DMS_ERR_SHAPE, "q: %lld query heads of batch %lld do "
                        "not split over the cache's %lld rows (batch x kv "
                        "heads)", (long long)HG, (long long)B,
                        (long long)x->c.R);
    DMS_TRY(check_tokens(q, "q", &x->c, kp, B, HG, n, 0));
    DMS_TRY(check_tokens(o, "o", &x->c, kp, B, HG, n, 1));
    const int64_t want3[3] = {B, HG, n};
    DMS_TRY(check_small(lse, "lse", DMS_DTYPE_BIT(DMS_FLOAT32), kp, 3, want3,
                        1));
    if (!(scale > 0.0f) || !isfinite(scale))
        return dms_fail(DMS_ERR_VALUE, "scale: expected a finite value > 0, "
                        "got %g", (double)scale);
    x->B = B;
    x->H = H;
    x->G = HG / H;
    x->n = n;
    x->q = q;
    x->o = o;
    x->lse = lse;
    x->scale = scale;
    return DMS_OK;
}

dms_status dms_attn_prefill(const dms_cache *cache, const dms_tensor *q,
                            const dms_tensor *k_new, const dms_tensor *v_new,
                            const dms_tensor *decisions,
                            const dms_tensor *key_padding, float scale,
                            const dms_tensor *o, const dms_tensor *lse,
                            const dms_exec *exec)
{
    dms_cache_call x = {0};
    DMS_TRY(check_cache(cache, &x.c));
    DMS_TRY(check_new_tokens(cache, &x, k_new, v_new, decisions,
                             key_padding));
    DMS_TRY(check_attention(&x, cache, q, x.n, scale, o, lse));
    DMS_TRY(check_decision_values(&x));
    if (cache->k_pages->device_type == DMS_CUDA) {
#ifdef DMS_WITH_CUDA
        return dms_attn_prefill_cuda(&x, exec ? exec->cuda_stream : NULL);
#else
        return dms_fail(DMS_ERR_NO_CUDA, "cache.k_pages: " DMS_NO_CUDA_MESSAGE);
#endif
    }
    DMS_TRY(dms_cache_check_rows_cpu(&x.c, 1));
    dms_attn_prefill_cpu(&x, dms_resolve_threads(exec));
    return DMS_OK;
}

dms_status dms_attn_decode(const dms_cache *cache, const dms_tensor *q,
                           float scale, const dms_tensor *o,
                           const dms_tensor *lse, const dms_tensor *workspace,
                           const dms_exec *exec)
{
    dms_cache_call x = {0};
    DMS_TRY(check_cache(cache, &x.c));
    DMS_TRY(check_attention(&x, cache, q, 1, scale, o, lse));
    if (workspace != NULL) {
        DMS_TRY(check_state(workspace, "workspace",
                            DMS_DTYPE_BIT(DMS_FLOAT32), 3, cache->k_pages));
        DMS_TRY(dim_is(workspace, "workspace", 0, x.B * x.H * x.G,
                       "batch x query heads"));
        DMS_TRY(dim_is(workspace, "workspace", 2, x.c.D + 2,
                       "head dim + 2"));
        x.workspace = workspace;
    }
    if (cache->k_pages->device_type == DMS_CUDA) {
#ifdef DMS_WITH_CUDA
        return dms_attn_decode_cuda(&x, exec ? exec->cuda_stream : NULL);
#else
        return dms_fail(DMS_ERR_NO_CUDA, "cache.k_pages: " DMS_NO_CUDA_MESSAGE);
#endif
    }
    DMS_TRY(dms_cache_check_rows_cpu(&x.c, 0));
    return dms_attn_decode_cpu(&x, dms_resolve_threads(exec));
}
