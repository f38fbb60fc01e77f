/*
 * gate.c - the public gating ops (SPEC.md section 2): validate every
 * argument, then hand the call to the CPU or the CUDA kernel. This is the
 * only place that decides between the two.
 */
#include <math.h>

#include "internal.h"

#define DMS_DECISION_DTYPES                                               \
    (DMS_FLOATING | DMS_DTYPE_BIT(DMS_UINT8) | DMS_DTYPE_BIT(DMS_BOOL))

#define DMS_NO_CUDA_MESSAGE                                               \
    "got a CUDA tensor, but dms was built without CUDA kernels; rebuild "  \
    "with nvcc available and DMS_CUDA=1: pip install -e ."

/* Checks an optional [B, H, T] tensor against the reference `z`. */
static dms_status check_like(const dms_tensor *t, const char *name,
                             unsigned dtype_mask, const dms_tensor *ref,
                             const char *ref_name, int is_output)
{
    if (t == NULL)
        return DMS_OK;
    DMS_TRY(dms_check_tensor(t, name, dtype_mask, 3, is_output));
    DMS_TRY(dms_check_same_shape(t, name, ref, ref_name));
    return dms_check_same_device(t, name, ref, ref_name);
}

static dms_status check_tau(float tau)
{
    if (!(tau > 0.0f) || !isfinite(tau))
        return dms_fail(DMS_ERR_VALUE, "tau: expected a finite temperature "
                        "> 0, got %g", (double)tau);
    return DMS_OK;
}

dms_status dms_gate_forward(const dms_tensor *z, const dms_tensor *noise,
                            float tau, const dms_tensor *y,
                            const dms_tensor *p, const dms_tensor *a,
                            const dms_exec *exec)
{
    DMS_TRY(dms_check_tensor(z, "z", DMS_FLOATING, 3, 0));
    DMS_TRY(check_like(noise, "noise", DMS_FLOATING, z, "z", 0));
    DMS_TRY(check_tau(tau));
    DMS_TRY(check_like(y, "y", DMS_FLOATING, z, "z", 1));
    DMS_TRY(check_like(p, "p", DMS_FLOATING, z, "z", 1));
    DMS_TRY(check_like(a, "a", DMS_DECISION_DTYPES, z, "z", 1));
    if (y == NULL && p == NULL && a == NULL)
        return dms_fail(DMS_ERR_VALUE, "y, p, a: at least one output is "
                        "required");
    if (z->device_type == DMS_CUDA) {
#ifdef DMS_WITH_CUDA
        return dms_gate_forward_cuda(z, noise, tau, y, p, a,
                                     exec ? exec->cuda_stream : NULL);
#else
        return dms_fail(DMS_ERR_NO_CUDA, "z: " DMS_NO_CUDA_MESSAGE);
#endif
    }
    dms_gate_forward_cpu(z, noise, tau, y, p, a, dms_resolve_threads(exec));
    return DMS_OK;
}

dms_status dms_gate_backward(const dms_tensor *y, const dms_tensor *grad_a,
                             const dms_tensor *grad_p,
                             const dms_tensor *grad_y, float tau,
                             const dms_tensor *grad_z, const dms_exec *exec)
{
    DMS_TRY(dms_check_tensor(y, "y", DMS_FLOATING, 3, 0));
    DMS_TRY(check_like(grad_a, "grad_a", DMS_FLOATING, y, "y", 0));
    DMS_TRY(check_like(grad_p, "grad_p", DMS_FLOATING, y, "y", 0));
    DMS_TRY(check_like(grad_y, "grad_y", DMS_FLOATING, y, "y", 0));
    DMS_TRY(check_tau(tau));
    if (grad_z == NULL)
        return dms_fail(DMS_ERR_VALUE, "grad_z: a tensor is required, got "
                        "none");
    DMS_TRY(check_like(grad_z, "grad_z", DMS_FLOATING, y, "y", 1));
    if (y->device_type == DMS_CUDA) {
#ifdef DMS_WITH_CUDA
        return dms_gate_backward_cuda(y, grad_a, grad_p, grad_y, tau, grad_z,
                                      exec ? exec->cuda_stream : NULL);
#else
        return dms_fail(DMS_ERR_NO_CUDA, "y: " DMS_NO_CUDA_MESSAGE);
#endif
    }
    dms_gate_backward_cpu(y, grad_a, grad_p, grad_y, tau, grad_z,
                          dms_resolve_threads(exec));
    return DMS_OK;
}

/* 2^32 Philox blocks of 4 words each. */
#define DMS_NOISE_MAX_NUMEL (INT64_C(1) << 34)

dms_status dms_logistic_noise(const dms_tensor *out, uint64_t seed,
                              uint32_t process_index, uint32_t accum_step,
                              uint32_t global_step, const dms_exec *exec)
{
    DMS_TRY(dms_check_tensor(out, "out", DMS_DTYPE_BIT(DMS_FLOAT32),
                             DMS_ANY_RANK, 1));
    DMS_TRY(dms_check_contiguous(out, "out"));
    if (dms_numel(out) > DMS_NOISE_MAX_NUMEL)
        return dms_fail(DMS_ERR_SHAPE, "out: expected at most 2^34 elements, "
                        "got %lld", (long long)dms_numel(out));
    if (out->device_type == DMS_CUDA) {
#ifdef DMS_WITH_CUDA
        return dms_logistic_noise_cuda(out, seed, process_index, accum_step,
                                       global_step,
                                       exec ? exec->cuda_stream : NULL);
#else
        return dms_fail(DMS_ERR_NO_CUDA, "out: " DMS_NO_CUDA_MESSAGE);
#endif
    }
    dms_logistic_noise_cpu(out, seed, process_index, accum_step, global_step,
                           dms_resolve_threads(exec));
    return DMS_OK;
}
