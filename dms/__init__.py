"""dms: Dynamic Memory Sparsification for KV-cache compression.

The engine is the C extension `dms._C` (CPU kernels in C, GPU kernels in
CUDA C) that takes PyTorch or NumPy tensors through DLPack. `dms.ops` wraps
its kernels for PyTorch (autograd) and NumPy.
"""

import sys as _sys

from dms._ext import _C
from dms._C import CudaError, CudaUnavailableError, DMSError, PoolExhaustedError
from dms.runtime import build_info, get_num_threads, set_num_threads

__version__ = _C.build_info()["version"]

if "transformers" in _sys.modules:
    # Where transformers is in use, its Auto classes learn the DMS model
    # types now (AutoModelForCausalLM.from_pretrained on a directory saved by
    # dms then needs no remote code). Otherwise `import dms.models` (or any
    # model class from dms) does it; the C core alone never imports torch.
    import dms.models  # noqa: F401


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
