/*
 * host_view.h - a C-contiguous CPU dms_tensor over host memory, for the C
 * programs that call the API without Python (csrc/tests/test_core.c,
 * the harnesses in csrc/dev).
 */
#ifndef DMS_TESTS_HOST_VIEW_H
#define DMS_TESTS_HOST_VIEW_H

#include <string.h>

#include "../dms.h"

static inline dms_tensor host_view(void *data, dms_dtype dtype, int ndim,
                                   const int64_t *shape)
{
    dms_tensor v;
    memset(&v, 0, sizeof v);
    v.data = data;
    v.dtype = dtype;
    v.device_type = DMS_CPU;
    v.ndim = ndim;
    int64_t stride = 1;
    for (int d = ndim - 1; d >= 0; --d) {
        v.shape[d] = shape[d];
        v.strides[d] = stride;
        stride *= shape[d];
    }
    return v;
}

/*
 * A cache whose state lives in host arrays: the nine views and the
 * dms_cache pointing at them. R rows of at most `row_pages` pages of P
 * slots, window w; k and v are [n_pages, P, D] of `dtype`. The cache points
 * into the struct: fill it in place, do not copy it.
 */
typedef struct host_cache {
    dms_tensor k_pages, v_pages, slot_limit, page_table, row_slots, row_seen;
    dms_tensor window, free_pages, free_count;
    dms_cache cache;
} host_cache;

static inline void host_cache_init(host_cache *c, void *k, void *v,
                                   dms_dtype dtype, int64_t n_pages,
                                   int64_t P, int64_t D, int64_t R,
                                   int64_t row_pages, int64_t w,
                                   int32_t *slot_limit, int32_t *page_table,
                                   int32_t *row_slots, int32_t *row_seen,
                                   int32_t *window, int32_t *free_pages,
                                   int32_t *free_count)
{
    const int64_t s_pages[3] = {n_pages, P, D}, s_limit[2] = {n_pages, P};
    const int64_t s_table[2] = {R, row_pages}, s_rows[1] = {R};
    const int64_t s_window[2] = {R, w + 1}, s_free[1] = {n_pages};
    const int64_t s_one[1] = {1};
    c->k_pages = host_view(k, dtype, 3, s_pages);
    c->v_pages = host_view(v, dtype, 3, s_pages);
    c->slot_limit = host_view(slot_limit, DMS_INT32, 2, s_limit);
    c->page_table = host_view(page_table, DMS_INT32, 2, s_table);
    c->row_slots = host_view(row_slots, DMS_INT32, 1, s_rows);
    c->row_seen = host_view(row_seen, DMS_INT32, 1, s_rows);
    c->window = host_view(window, DMS_INT32, 2, s_window);
    c->free_pages = host_view(free_pages, DMS_INT32, 1, s_free);
    c->free_count = host_view(free_count, DMS_INT32, 1, s_one);
    const dms_cache cache = {&c->k_pages,    &c->v_pages,  &c->slot_limit,
                             &c->page_table, &c->row_slots, &c->row_seen,
                             &c->window,     &c->free_pages, &c->free_count,
                             w,              NULL,         NULL,
                             DMS_KV_NATIVE};
    c->cache = cache;
}

#endif /* DMS_TESTS_HOST_VIEW_H */
