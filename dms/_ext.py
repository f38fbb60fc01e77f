"""Loads the compiled engine `dms._C`, or says how to build it."""

import glob
import os

try:
    from dms import _C
except ImportError as exc:  # pragma: no cover - exercised in a subprocess test
    # Without a built file Python's own message blames a "circular import";
    # say what is really wrong, and keep the loader's words when a file exists.
    built = glob.glob(os.path.join(os.path.dirname(os.path.abspath(__file__)), "_C.*"))
    reason = f"failed to load ({exc})" if built else "is not built"
    error = ImportError(
        f"dms: the compiled extension dms._C {reason}. Build it from the repository root with\n"
        "    pip install -e .\n"
        "(a C compiler and NumPy are needed; CUDA kernels are added when nvcc is "
        "found, DMS_CUDA=0 skips them). See README.md, 'Building'.")
    raise error from (exc if built else None)

__all__ = ["_C"]
