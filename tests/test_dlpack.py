"""The binding's DLPack import (csrc/python/module.c): versioned and legacy
capsules, ownership (deleter called exactly once), flags, devices, dtypes,
strides and byte offsets; bad tensors named in the error; no leaks over 100k
calls; C-owned NumPy arrays."""

import gc
import os

import numpy as np
import pytest
import torch

import dms
from dms import _C
from tests.dlpack_forge import (DL_BFLOAT, DL_CUDA, DL_FLOAT, DL_OPENCL, FLAG_IS_COPIED, FLAG_READ_ONLY,
                                ForgedTensor)


def _gate_into(z, a):
    _C.gate_forward(z, None, 1.0, None, None, a)


def test_versioned_capsule_is_consumed_once():
    z = ForgedTensor(np.linspace(-1, 1, 12, dtype=np.float32).reshape(1, 3, 4))
    a = np.empty((1, 3, 4), np.float32)
    _gate_into(z, a)
    assert z.deleted == 1
    assert z.requests == [{"max_version": (1, 0)}]  # no stream for a CPU tensor
    np.testing.assert_array_equal(a, (z.array > 0).astype(np.float32))


def test_legacy_producer_fallback():
    z = ForgedTensor(np.ones((1, 2, 3), np.float32), legacy=True)
    a = np.zeros((1, 2, 3), np.float32)
    _gate_into(z, a)
    assert [sorted(r) for r in z.requests] == [["max_version"], []]
    assert z.deleted == 1 and a.min() == 1.0
    assert _C.tensor_info(ForgedTensor(np.ones(3, np.float32), legacy=True))["dlpack_version"] is None


def test_raw_capsules_and_reuse():
    forged = ForgedTensor(np.ones((1, 1, 4), np.float32))
    for versioned in (True, False):
        capsule = forged.capsule(versioned=versioned)
        a = np.zeros((1, 1, 4), np.float32)
        _gate_into(capsule, a)
        assert a.min() == 1.0
        with pytest.raises(ValueError, match="^z: expected a DLPack capsule named .*consumed only once"):
            _gate_into(capsule, a)
    assert forged.deleted == 2


def test_unsupported_major_version_is_returned_to_producer():
    forged = ForgedTensor(np.ones((1, 1, 4), np.float32), version=(2, 0))
    with pytest.raises(BufferError, match="^z: DLPack major version 2 is not supported"):
        _gate_into(forged, np.zeros((1, 1, 4), np.float32))
    assert forged.deleted == 1


@pytest.mark.parametrize(
    "kwargs, exc, message",
    [
        (dict(device=(DL_OPENCL, 0)), ValueError, "z: expected a CPU or CUDA tensor, got DLPack device type 4"),
        (dict(dtype=(DL_FLOAT, 32, 4)), TypeError, "z: dtype float32 x4 lanes is not supported"),
        (dict(dtype=(DL_FLOAT, 64, 1)), TypeError, "z: dtype float64 is not supported"),
        (dict(dtype=(DL_BFLOAT, 32, 1)), TypeError, "z: dtype bfloat32 is not supported"),
        (dict(shape=(1,) * 9), ValueError, "z: expected at most 8 dims, got 9"),
        (dict(data=0), ValueError, "z: non-empty tensor has a NULL data pointer"),
    ],
)
def test_bad_tensors_are_named(kwargs, exc, message):
    forged = ForgedTensor(np.ones((1, 1, 1), np.float32), **kwargs)
    with pytest.raises(exc) as info:
        _gate_into(forged, np.zeros((1, 1, 1), np.float32))
    assert str(info.value).startswith(message), str(info.value)
    assert forged.deleted == 1  # released on the error path too


def test_output_flags():
    z = np.ones((1, 2, 2), np.float32)
    copied = ForgedTensor(np.zeros((1, 2, 2), np.float32), flags=FLAG_IS_COPIED)
    with pytest.raises(ValueError, match="^a: the producer exported a copy"):
        _gate_into(z, copied)
    read_only = ForgedTensor(np.zeros((1, 2, 2), np.float32), flags=FLAG_READ_ONLY)
    with pytest.raises(ValueError, match="^a: output tensor is read-only"):
        _gate_into(z, read_only)
    assert copied.deleted == 1 and read_only.deleted == 1
    # Both flags are harmless on inputs.
    _gate_into(ForgedTensor(z, flags=FLAG_IS_COPIED | FLAG_READ_ONLY), np.zeros((1, 2, 2), np.float32))


def test_byte_offset_and_explicit_strides():
    base = np.arange(-8, 16, dtype=np.float32)
    # A [1, 2, 3] view starting at element 8 with strides (0, 6, 2).
    forged = ForgedTensor(base, shape=(1, 2, 3), strides=(24, 6, 2), byte_offset=8 * 4)
    a = np.zeros((1, 2, 3), np.float32)
    _gate_into(forged, a)
    expected = base[8:][np.array([[0, 2, 4], [6, 8, 10]])] > 0
    np.testing.assert_array_equal(a[0], expected.astype(np.float32))
    info = _C.tensor_info(ForgedTensor(base, shape=(1, 2, 3), strides=(24, 6, 2), byte_offset=8))
    assert info["strides"] == (24, 6, 2) and info["data_ptr"] == base.ctypes.data + 8


def test_cuda_tensor_without_a_usable_gpu():
    """A (forged) CUDA tensor: the binding asks the producer for our stream
    (1 = the legacy default stream in the DLPack protocol), then the op fails
    cleanly - CudaUnavailableError in a CPU-only build, CudaError when the
    runtime finds no GPU."""
    if torch.cuda.is_available():
        pytest.skip("a real GPU is present; forged device pointers would be dereferenced")
    z = ForgedTensor(np.ones((1, 1, 4), np.float32), device=(DL_CUDA, 0))
    a = ForgedTensor(np.zeros((1, 1, 4), np.float32), device=(DL_CUDA, 0))
    expected = dms.CudaError if dms.build_info()["cuda"] else dms.CudaUnavailableError
    with pytest.raises(expected) as info:
        _gate_into(z, a)
    assert isinstance(info.value, dms.DMSError) and isinstance(info.value, RuntimeError)
    if expected is dms.CudaUnavailableError:
        assert str(info.value).startswith("z: got a CUDA tensor, but dms was built without CUDA")
    assert z.requests == [{"stream": 1, "max_version": (1, 0)}]
    assert z.deleted == 1 and a.deleted == 1
    # A CUDA output next to a CPU input is a device mismatch, named.
    with pytest.raises(ValueError, match=r"^a: expected device cpu:0 \(the device of z\), got cuda:0"):
        _gate_into(np.ones((1, 1, 4), np.float32), ForgedTensor(np.zeros((1, 1, 4), np.float32), device=(DL_CUDA, 0)))


def test_non_capsule_from_dunder_dlpack():
    class Liar:
        def __dlpack_device__(self):
            return (1, 0)

        def __dlpack__(self, **kwargs):
            return 42

    with pytest.raises(TypeError, match="^z: __dlpack__ returned int, not a capsule"):
        _gate_into(Liar(), np.zeros((1, 1, 1), np.float32))


def test_tensor_info_of_torch_and_numpy():
    t = torch.zeros(4, 6, dtype=torch.bfloat16)[:, 1::2]
    info = _C.tensor_info(t)
    assert info["dtype"] == "bfloat16" and info["shape"] == (4, 3) and info["strides"] == (6, 2)
    assert info["device"] == ("cpu", 0) and info["readonly"] is False and info["dlpack_version"][0] == 1
    assert info["data_ptr"] == t.data_ptr()
    for dtype, name in [(torch.float16, "float16"), (torch.int32, "int32"), (torch.int64, "int64"),
                        (torch.uint8, "uint8"), (torch.bool, "bool")]:
        assert _C.tensor_info(torch.zeros(2, dtype=dtype))["dtype"] == name
    frozen = np.zeros((2, 2), np.float32)
    frozen.flags.writeable = False
    assert _C.tensor_info(frozen)["readonly"] is True
    assert _C.tensor_info(np.zeros((), np.float32))["shape"] == ()


def test_aligned_empty_is_owned_by_c():
    for alignment in (64, 4096):
        a = _C.aligned_empty((3, 5, 7), "float32", alignment=alignment)
        assert a.shape == (3, 5, 7) and a.dtype == np.float32 and a.flags.writeable
        assert a.ctypes.data % alignment == 0
        assert type(a.base).__name__ == "PyCapsule"
        a[...] = 1.0  # the memory is ours to write
    assert _C.aligned_empty((0,), "int64").shape == (0,)
    with pytest.raises(TypeError, match="^dtype: expected float32"):
        _C.aligned_empty((2,), "float64")
    with pytest.raises(ValueError, match="^alignment: expected a power of two"):
        _C.aligned_empty((2,), "float32", alignment=48)
    with pytest.raises(ValueError, match="^shape: dim 1 is -2"):
        _C.aligned_empty((2, -2), "float32")


def _rss_bytes():
    with open(f"/proc/{os.getpid()}/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


@pytest.mark.skipif(not os.path.exists("/proc/self/statm"), reason="needs /proc to read resident memory")
def test_no_leak_over_100k_calls():
    """Fresh torch and NumPy tensors and C-owned arrays through 100k calls:
    every export is released (4 KiB a call would leak 400 MB)."""

    def burst(n):
        for i in range(n):
            z = torch.full((1, 4, 256), float(i % 3 - 1))  # 4 KiB
            a = _C.aligned_empty((1, 4, 256), "float32")
            _C.gate_forward(z, None, 1.0, None, None, a)
            _C.gate_forward(a, None, 1.0, np.empty((1, 4, 256), np.float32), None, None)

    burst(5_000)
    gc.collect()
    before = _rss_bytes()
    burst(100_000)
    gc.collect()
    growth = _rss_bytes() - before
    assert growth < 8 * 2**20, f"resident memory grew by {growth / 2**20:.1f} MiB"


def test_forged_deleters_balance_over_many_calls():
    forged = ForgedTensor(np.ones((1, 1, 8), np.float32))
    a = np.zeros((1, 1, 8), np.float32)
    for _ in range(2000):
        _gate_into(forged, a)
    assert forged.deleted == 2000


def _forged_cache_state():
    """The nine state tensors of a small float32 cache, each exported by a
    ForgedTensor over the same memory."""
    from dms.cache import PagedLayerCache

    cache = PagedLayerCache(1, 2, 4, 3, page_size=2, dtype=torch.float32)
    k = torch.randn(1, 2, 3, 4)
    cache.append(k, k, torch.zeros(1, 2, 3, dtype=torch.bool))
    return cache, tuple(ForgedTensor(t.numpy()) for t in cache._state())


def test_cache_views_hold_their_exports_until_deleted():
    cache, forged = _forged_cache_state()
    views = _C.CacheViews(forged)
    assert views.holds(forged) and not views.holds(cache._state())
    assert [f.requests for f in forged] == [[{"max_version": (1, 0)}]] * 9
    assert [f.deleted for f in forged] == [0] * 9
    q = torch.randn(1, 4, 1, 4)
    o, lse = torch.empty(1, 4, 1, 4), torch.empty(1, 4, 1)
    for _ in range(3):
        _C.attn_decode(views, 3, q, 0.5, o, lse, None)
    want, _ = cache.decode_attention(q, scale=0.5)
    assert torch.equal(o, want)
    assert [len(f.requests) for f in forged] == [1] * 9  # not exported again per call
    del views
    gc.collect()
    assert [f.deleted for f in forged] == [1] * 9


def test_cpu_cache_calls_skip_the_device_query():
    """With the cache on the CPU, the call's other tensors are exported
    without a stream (and without asking their device); one that lives on
    a GPU is then refused by the device check, before anything runs."""
    cache, _ = _forged_cache_state()
    q = ForgedTensor(np.ones((1, 4, 1, 4), np.float32), device=(DL_CUDA, 0))
    o, lse = torch.empty(1, 4, 1, 4), torch.empty(1, 4, 1)
    with pytest.raises(ValueError, match=r"^q: expected device cpu:0 \(the device of cache.k_pages\), got cuda:0"):
        _C.attn_decode(cache._state(), 3, q, 0.5, o, lse, None)
    assert q.requests == [{"max_version": (1, 0)}] and q.deleted == 1
    with pytest.raises(TypeError, match=r"^q: expected a tensor supporting DLPack .*, got str"):
        _C.attn_decode(_C.CacheViews(cache._state()), 3, "q", 0.5, o, lse, None)
