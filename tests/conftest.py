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


@pytest.fixture
def one_torch_thread():
    """torch on one thread for the test (the training runs: faster and
    steadier on a small shared machine than two threads fighting)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
