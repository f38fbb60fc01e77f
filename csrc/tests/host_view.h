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

#endif /* DMS_TESTS_HOST_VIEW_H */
