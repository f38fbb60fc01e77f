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


# Model classes dms exports, by the family package that defines them.
_MODEL_EXPORTS = {name: module for module, names in {
    "dms.models.auto": ["AutoModelForCausalLMDMS"],
    "dms.models.llama": ["LlamaConfigDMS", "LlamaForCausalLMDMS", "LlamaModelDMS"],
    "dms.models.mistral": ["MistralConfigDMS", "MistralForCausalLMDMS", "MistralModelDMS"],
    "dms.models.qwen2": ["Qwen2ConfigDMS", "Qwen2ForCausalLMDMS", "Qwen2ModelDMS"],
    "dms.models.qwen3": ["Qwen3ConfigDMS", "Qwen3ForCausalLMDMS", "Qwen3ModelDMS"],
    "dms.models.qwen3_moe": ["Qwen3MoeConfigDMS", "Qwen3MoeForCausalLMDMS", "Qwen3MoeModelDMS"],
}.items() for name in names}


def __getattr__(name):
    # The models pull in torch and transformers; the C core must not need them.
    if name in _MODEL_EXPORTS:
        import importlib

        import dms.models  # noqa: F401  (registers every family with the Auto classes)

        return getattr(importlib.import_module(_MODEL_EXPORTS[name]), name)
    raise AttributeError(f"module 'dms' has no attribute {name!r}")

__all__ = [
    "AutoModelForCausalLMDMS",
    "CudaError",
    "CudaUnavailableError",
    "DMSError",
    "LlamaConfigDMS",
    "LlamaForCausalLMDMS",
    "LlamaModelDMS",
    "MistralConfigDMS",
    "MistralForCausalLMDMS",
    "MistralModelDMS",
    "PoolExhaustedError",
    "Qwen2ConfigDMS",
    "Qwen2ForCausalLMDMS",
    "Qwen2ModelDMS",
    "Qwen3ConfigDMS",
    "Qwen3ForCausalLMDMS",
    "Qwen3ModelDMS",
    "Qwen3MoeConfigDMS",
    "Qwen3MoeForCausalLMDMS",
    "Qwen3MoeModelDMS",
    "build_info",
    "get_num_threads",
    "set_num_threads",
    "__version__",
]
