/*
 * cuda/runtime.cu - facts about the CUDA runtime, driver and cuBLAS this
 * build links, for dms.build_info(). No GPU (or no driver) is not an error
 * here: the device count is then 0. cuBLAS is linked only where setup.py
 * found it (no kernel needs it); its version reads 0 otherwise.
 */
#ifdef DMS_WITH_CUBLAS
#include <cublas_v2.h>
#endif

#include "common.cuh"

extern "C" dms_status dms_cuda_info_impl(int *runtime_version,
                                         int *driver_version,
                                         int *cublas_version,
                                         int *device_count)
{
    DMS_CUDA_CHECK(cudaRuntimeGetVersion(runtime_version));
    if (cudaDriverGetVersion(driver_version) != cudaSuccess)
        *driver_version = 0;
    *cublas_version = 0;
#ifdef DMS_WITH_CUBLAS
    int major = 0, minor = 0, patch = 0;
    if (cublasGetProperty(MAJOR_VERSION, &major) != CUBLAS_STATUS_SUCCESS ||
        cublasGetProperty(MINOR_VERSION, &minor) != CUBLAS_STATUS_SUCCESS ||
        cublasGetProperty(PATCH_LEVEL, &patch) != CUBLAS_STATUS_SUCCESS)
        return dms_fail(DMS_ERR_CUDA, "cublasGetProperty failed at %s:%d",
                        __FILE__, __LINE__);
    *cublas_version = major * 10000 + minor * 100 + patch;
#endif
    if (cudaGetDeviceCount(device_count) != cudaSuccess) {
        *device_count = 0;
        cudaGetLastError(); /* clear: having no GPU is a normal state */
    }
    return DMS_OK;
}
