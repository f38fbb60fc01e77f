/*
 * dlpack.h - the parts of the DLPack ABI (https://dmlc.github.io/dlpack/,
 * v1.x, and the legacy pre-1.0 managed tensor) that dms consumes, written
 * from the public specification. Only the binding includes this file; the
 * kernels see dms_tensor views.
 */
#ifndef DMS_DLPACK_H
#define DMS_DLPACK_H

#include <stdint.h>

/* The major version whose struct layout this file describes. */
#define DMS_DLPACK_MAJOR 1
#define DMS_DLPACK_MINOR 0

enum {
    DMS_DL_CPU = 1,
    DMS_DL_CUDA = 2,
    DMS_DL_CUDA_HOST = 3,    /* pinned host memory: readable by the CPU */
    DMS_DL_CUDA_MANAGED = 13 /* unified memory: readable by both */
};

enum {
    DMS_DL_INT = 0,
    DMS_DL_UINT = 1,
    DMS_DL_FLOAT = 2,
    DMS_DL_BFLOAT = 4,
    DMS_DL_COMPLEX = 5,
    DMS_DL_BOOL = 6
};

typedef struct {
    int32_t device_type;
    int32_t device_id;
} DmsDLDevice;

typedef struct {
    uint8_t code;
    uint8_t bits;
    uint16_t lanes;
} DmsDLDataType;

typedef struct {
    void *data;
    DmsDLDevice device;
    int32_t ndim;
    DmsDLDataType dtype;
    int64_t *shape;
    int64_t *strides; /* in elements; NULL means compact row-major */
    uint64_t byte_offset;
} DmsDLTensor;

/* Legacy capsule "dltensor". */
typedef struct DmsDLManagedTensor {
    DmsDLTensor dl_tensor;
    void *manager_ctx;
    void (*deleter)(struct DmsDLManagedTensor *self);
} DmsDLManagedTensor;

#define DMS_DL_FLAG_READ_ONLY (UINT64_C(1) << 0)
#define DMS_DL_FLAG_IS_COPIED (UINT64_C(1) << 1)

/* Versioned capsule "dltensor_versioned" (DLPack >= 1.0). */
typedef struct DmsDLManagedTensorVersioned {
    struct {
        uint32_t major;
        uint32_t minor;
    } version;
    void *manager_ctx;
    void (*deleter)(struct DmsDLManagedTensorVersioned *self);
    uint64_t flags;
    DmsDLTensor dl_tensor;
} DmsDLManagedTensorVersioned;

#endif /* DMS_DLPACK_H */
