"""Shared test setup: the `cuda` marker skips without a GPU or without CUDA
kernels in this build; `devices` lists where an op can run here."""

import pytest

import dms

try:
    import torch
except ImportError:  # NumPy-only environments run the C-core tests only
    torch = None


def cuda_available() -> bool:
    return torch is not None and torch.cuda.is_available() and dms.build_info()["cuda"]


def pytest_collection_modifyitems(config, items):
    if cuda_available():
        return
    reason = "needs a CUDA GPU and a dms build with CUDA kernels"
    for item in items:
        if "cuda" in item.keywords:
            item.add_marker(pytest.mark.skip(reason=reason))


DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.cuda)]
