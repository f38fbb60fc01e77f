"""dms: Dynamic Memory Sparsification for KV-cache compression.

The engine is the C extension `dms._C` (CPU kernels in C, GPU kernels in
CUDA C) that takes PyTorch or NumPy tensors through DLPack. `dms.ops` wraps
its kernels for PyTorch (autograd) and NumPy.
"""

from dms._ext import _C
from dms._C import CudaError, CudaUnavailableError, DMSError, PoolExhaustedError
from dms.runtime import build_info, get_num_threads, set_num_threads

__version__ = _C.build_info()["version"]


def __getattr__(name):
    # The model pulls in torch and transformers; the C core must not need them.
    if name in ("Qwen3ConfigDMS", "Qwen3ForCausalLMDMS", "Qwen3ModelDMS"):
        from dms.models import qwen3

        return getattr(qwen3, name)
    raise AttributeError(f"module 'dms' has no attribute {name!r}")

__all__ = [
    "CudaError",
    "CudaUnavailableError",
    "DMSError",
    "PoolExhaustedError",
    "Qwen3ConfigDMS",
    "Qwen3ForCausalLMDMS",
    "Qwen3ModelDMS",
    "build_info",
    "get_num_threads",
    "set_num_threads",
    "__version__",
]
