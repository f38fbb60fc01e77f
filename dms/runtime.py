"""Process-wide settings of the C engine: CPU threads, the CUDA stream a call
runs on, and what the build contains. Every op in `dms.ops` takes its
`num_threads`/`stream` from `exec_kwargs` here."""

import sys

from dms._ext import _C

_num_threads = 0  # 0: follow torch.get_num_threads(), else OpenMP's default


def set_num_threads(num_threads: int) -> None:
    """Threads the CPU kernels use; 0 restores the default (torch's setting
    when torch is imported, else OpenMP's, i.e. OMP_NUM_THREADS or the core
    count)."""
    global _num_threads
    if not isinstance(num_threads, int) or isinstance(num_threads, bool) or num_threads < 0:
        raise ValueError(f"num_threads: expected an int >= 0, got {num_threads!r}")
    _num_threads = num_threads


def get_num_threads() -> int:
    """Threads the next CPU kernel will use."""
    if _num_threads > 0:
        return _num_threads
    torch = sys.modules.get("torch")
    if torch is not None:
        return torch.get_num_threads()
    return _C.build_info()["default_num_threads"]


def _is_torch(x) -> bool:
    torch = sys.modules.get("torch")
    return torch is not None and isinstance(x, torch.Tensor)


def exec_kwargs(x) -> dict:
    """`num_threads` and `stream` for a call whose tensors live where `x` does:
    CUDA work goes on torch's current stream of that device."""
    stream = 0
    if _is_torch(x) and x.is_cuda:
        import torch

        stream = torch.cuda.current_stream(x.device).cuda_stream
    return {"num_threads": get_num_threads(), "stream": stream}


def build_info() -> dict:
    """What this build of dms contains: version, CUDA (archs, runtime, driver,
    cuBLAS, visible devices), CPU features detected at run time and the code
    path each CPU kernel takes with them, OpenMP and the default thread count,
    the compiler, the DLPack version consumed, and whether this is a
    sanitizer build (DMS_SANITIZE=1, for tests)."""
    return dict(_C.build_info())
