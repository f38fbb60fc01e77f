"""dms: Dynamic Memory Sparsification for KV-cache compression.

The engine is the C extension `dms._C` (CPU kernels in C, GPU kernels in
CUDA C) that takes PyTorch or NumPy tensors through DLPack. `dms.ops` wraps
its kernels for PyTorch (autograd) and NumPy.
"""

from dms._ext import _C
from dms._C import CudaError, CudaUnavailableError, DMSError, PoolExhaustedError
from dms.runtime import build_info, get_num_threads, set_num_threads

__version__ = _C.build_info()["version"]

__all__ = [
    "CudaError",
    "CudaUnavailableError",
    "DMSError",
    "PoolExhaustedError",
    "build_info",
    "get_num_threads",
    "set_num_threads",
    "__version__",
]
