"""Loads the compiled engine `dms._C`, or says how to build it."""

try:
    from dms import _C
except ImportError as exc:  # pragma: no cover - exercised in a subprocess test
    raise ImportError(
        "dms: the compiled extension dms._C is missing or failed to load "
        f"({exc}). Build it from the repository root with\n"
        "    pip install -e .\n"
        "(a C compiler and NumPy are needed; CUDA kernels are added when nvcc is "
        "found, DMS_CUDA=0 skips them). See README.md, 'Building'."
    ) from exc

__all__ = ["_C"]
