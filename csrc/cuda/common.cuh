/*
 * common.cuh - what every CUDA file of dms shares: turning CUDA runtime
 * errors into dms statuses (statement and file:line in the message), a
 * guard that selects the tensors' device for the duration of a call, and
 * the plain-old-data view of a strided [B, H, T] tensor that kernels take
 * by value.
 */
#ifndef DMS_CUDA_COMMON_CUH
#define DMS_CUDA_COMMON_CUH

#include <cuda_runtime.h>

#include "../core/internal.h"

#define DMS_CUDA_CHECK(stmt)                                              \
    do {                                                                  \
        cudaError_t dms_cuda_err_ = (stmt);                               \
        if (dms_cuda_err_ != cudaSuccess)                                 \
            return dms_fail(DMS_ERR_CUDA, "%s failed at %s:%d: %s", #stmt, \
                            __FILE__, __LINE__,                           \
                            cudaGetErrorString(dms_cuda_err_));           \
    } while (0)

/* Selects `device` for the guard's lifetime; restores the previous one. */
class DmsDeviceGuard {
  public:
    explicit DmsDeviceGuard(int device) : previous_(-1)
    {
        status_ = cudaGetDevice(&previous_);
        if (status_ == cudaSuccess && previous_ != device)
            status_ = cudaSetDevice(device);
        else
            previous_ = -1; /* nothing to restore */
    }
    ~DmsDeviceGuard()
    {
        if (previous_ >= 0)
            cudaSetDevice(previous_);
    }
    cudaError_t status() const { return status_; }

  private:
    int previous_;
    cudaError_t status_;
};

/* A strided [B, H, T] tensor as kernels see it; data == nullptr = absent. */
struct DmsView3 {
    void *data;
    dms_dtype dtype;
    int64_t s0, s1, s2;

    __device__ __forceinline__ int64_t at(int64_t b, int64_t h,
                                          int64_t t) const
    {
        return b * s0 + h * s1 + t * s2;
    }
};

static inline DmsView3 dms_view3(const dms_tensor *t)
{
    DmsView3 v;
    if (t == NULL) {
        v.data = nullptr;
        v.dtype = DMS_FLOAT32;
        v.s0 = v.s1 = v.s2 = 0;
        return v;
    }
    v.data = t->data;
    v.dtype = t->dtype;
    v.s0 = t->strides[0];
    v.s1 = t->strides[1];
    v.s2 = t->strides[2];
    return v;
}

/* Blocks for a grid-stride loop over n elements. */
static inline unsigned dms_grid_for(int64_t n, int threads)
{
    int64_t blocks = (n + threads - 1) / threads;
    const int64_t cap = 65536; /* grid-stride loops cover the rest */
    return (unsigned)(blocks < cap ? blocks : cap);
}

#endif /* DMS_CUDA_COMMON_CUH */
