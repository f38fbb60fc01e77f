"""A hand-made DLPack producer (ctypes) for testing how `dms._C` consumes
tensors: any device, dtype, version, flags, strides or byte offset, and a
count of how often the consumer called the deleter."""

import ctypes

import numpy as np

DL_CPU, DL_CUDA, DL_OPENCL = 1, 2, 4
DL_INT, DL_UINT, DL_FLOAT, DL_BFLOAT, DL_BOOL = 0, 1, 2, 4, 6
FLAG_READ_ONLY, FLAG_IS_COPIED = 1, 2


class DLDevice(ctypes.Structure):
    _fields_ = [("device_type", ctypes.c_int32), ("device_id", ctypes.c_int32)]


class DLDataType(ctypes.Structure):
    _fields_ = [("code", ctypes.c_uint8), ("bits", ctypes.c_uint8), ("lanes", ctypes.c_uint16)]


class DLTensor(ctypes.Structure):
    _fields_ = [
        ("data", ctypes.c_void_p),
        ("device", DLDevice),
        ("ndim", ctypes.c_int32),
        ("dtype", DLDataType),
        ("shape", ctypes.POINTER(ctypes.c_int64)),
        ("strides", ctypes.POINTER(ctypes.c_int64)),
        ("byte_offset", ctypes.c_uint64),
    ]


DELETER = ctypes.CFUNCTYPE(None, ctypes.c_void_p)


class DLManagedTensor(ctypes.Structure):
    _fields_ = [("dl_tensor", DLTensor), ("manager_ctx", ctypes.c_void_p), ("deleter", DELETER)]


class DLPackVersion(ctypes.Structure):
    _fields_ = [("major", ctypes.c_uint32), ("minor", ctypes.c_uint32)]


class DLManagedTensorVersioned(ctypes.Structure):
    _fields_ = [
        ("version", DLPackVersion),
        ("manager_ctx", ctypes.c_void_p),
        ("deleter", DELETER),
        ("flags", ctypes.c_uint64),
        ("dl_tensor", DLTensor),
    ]


_capsule_new = ctypes.pythonapi.PyCapsule_New
_capsule_new.restype = ctypes.py_object
_capsule_new.argtypes = [ctypes.c_void_p, ctypes.c_char_p, ctypes.c_void_p]


class ForgedTensor:
    """Exports `array`'s memory through DLPack with whatever metadata the
    test asks for. `deleted` counts deleter calls; `requests` records the
    keyword arguments of every __dlpack__ call."""

    def __init__(self, array, *, device=(DL_CPU, 0), dtype=None, shape=None, strides=None, byte_offset=0,
                 flags=0, version=(1, 0), legacy=False, data=None):
        self.array = np.ascontiguousarray(array)
        self.device = device
        if dtype is None:
            kind = {"f": DL_FLOAT, "i": DL_INT, "u": DL_UINT, "b": DL_BOOL}[self.array.dtype.kind]
            dtype = (kind, self.array.dtype.itemsize * 8, 1)
        self.dtype = dtype
        self.shape = tuple(self.array.shape if shape is None else shape)
        self.strides = strides
        self.byte_offset = byte_offset
        self.flags = flags
        self.version = version
        self.legacy = legacy
        self.data = data
        self.deleted = 0
        self.requests = []
        self._keep = []

    def __dlpack_device__(self):
        return self.device

    def _deleter(self, _ptr):
        self.deleted += 1

    def capsule(self, versioned=True):
        ndim = len(self.shape)
        shape = (ctypes.c_int64 * max(ndim, 1))(*self.shape)
        strides = None if self.strides is None else (ctypes.c_int64 * max(ndim, 1))(*self.strides)
        tensor = DLTensor(
            data=self.data if self.data is not None else self.array.ctypes.data,
            device=DLDevice(*self.device),
            ndim=ndim,
            dtype=DLDataType(*self.dtype),
            shape=shape,
            strides=strides,
            byte_offset=self.byte_offset,
        )
        deleter = DELETER(self._deleter)
        if versioned:
            managed = DLManagedTensorVersioned(version=DLPackVersion(*self.version), deleter=deleter,
                                               flags=self.flags, dl_tensor=tensor)
            name = b"dltensor_versioned"
        else:
            managed = DLManagedTensor(dl_tensor=tensor, deleter=deleter)
            name = b"dltensor"
        self._keep.append((shape, strides, deleter, managed, name))
        return _capsule_new(ctypes.addressof(managed), name, None)

    def __dlpack__(self, **kwargs):
        self.requests.append(kwargs)
        if self.legacy and "max_version" in kwargs:
            raise TypeError("__dlpack__() got an unexpected keyword argument 'max_version'")
        return self.capsule(versioned=not self.legacy)
