"""ctypes plumbing shared by the emulator harnesses (tests/cuda_emu): load
the library that build.py made, describe torch tensors as dms_tensor views
(device_type CUDA: the emulated kernels read host memory as device memory),
and compare with a reference."""
import ctypes
import math

import torch

DTYPES = {torch.float32: 0, torch.float16: 1, torch.bfloat16: 2, torch.int32: 3,
          torch.int64: 4, torch.uint8: 5, torch.bool: 6}          # enum dms_dtype
DMS_CUDA = 2                                                       # enum dms_device_type


class Tensor(ctypes.Structure):  # struct dms_tensor (csrc/dms.h)
    _fields_ = [("data", ctypes.c_void_p), ("dtype", ctypes.c_int), ("device_type", ctypes.c_int),
                ("device_index", ctypes.c_int), ("ndim", ctypes.c_int),
                ("shape", ctypes.c_int64 * 8), ("strides", ctypes.c_int64 * 8), ("readonly", ctypes.c_int)]


def load(path):
    """The emulator library at `path`, with the result types set."""
    lib = ctypes.CDLL(str(path))
    for fn in ["dms_attn_train_forward_cuda", "dms_attn_train_backward_cuda", "dms_cache_append_cuda",
               "dms_attn_prefill_cuda", "dms_attn_decode_cuda"]:
        getattr(lib, fn).restype = ctypes.c_int
    lib.dms_last_error.restype = ctypes.c_char_p
    for fn in ["emu_get_cp_count", "emu_get_last_smem", "emu_get_launches"]:
        getattr(lib, fn).restype = ctypes.c_long
    return lib


def view(t, keep):
    """A pointer to a dms_tensor describing `t` (None -> NULL). The struct
    is appended to `keep`, which the caller holds until the call returns."""
    if t is None:
        return None
    x = Tensor()
    x.data, x.dtype, x.device_type, x.device_index, x.ndim = t.data_ptr(), DTYPES[t.dtype], DMS_CUDA, 0, t.dim()
    for i, (s, st) in enumerate(zip(t.shape, t.stride())):
        x.shape[i], x.strides[i] = s, st
    keep.append(x)
    return ctypes.pointer(x)


def strided(shape, dtype, layout, fill=None, gen=None, mag=1.0):
    """A tensor of `shape` in one of three layouts:
    c: contiguous; t: transposed storage ([B, T, H, D] seen as [B, H, T, D],
    or reversed dims for 2-D / 3-D); g: a gap after every dim and a
    1-element offset (misaligned rows: the kernels' plain-load paths).
    Filled with `fill`, or normal * mag from `gen`."""
    if layout == "t" and len(shape) == 4:
        B, H, n, D = shape
        t = torch.empty(B, n, H, D, dtype=dtype).transpose(1, 2)
    elif layout == "t" and len(shape) in (2, 3):
        t = torch.empty(*reversed(shape), dtype=dtype).permute(*reversed(range(len(shape))))
    elif layout == "g":
        big = torch.empty(*[s + 1 for s in shape[:-1]], shape[-1] + 3, dtype=dtype)
        t = big[tuple(slice(0, s) for s in shape[:-1]) + (slice(1, 1 + shape[-1]),)]
    else:
        t = torch.empty(*shape, dtype=dtype)
    if fill is not None:
        t.fill_(fill)
    elif gen is not None:
        t.copy_(torch.randn(*shape, generator=gen) * mag)
    return t


def rel_err(name, got, ref):
    """max |got - ref| / max(1, max |ref|) over the finite reference entries;
    NaN where the reference has none (or none where it has one), or a
    different pattern or value of infinities, fails."""
    got, ref = got.double(), ref.double()
    wrong = torch.isnan(got) != torch.isnan(ref)
    if wrong.any():
        raise AssertionError(f"{name}: NaN differs at {wrong.nonzero()[:5].tolist()}")
    got, ref = got.nan_to_num(0.0, math.inf, -math.inf), ref.nan_to_num(0.0, math.inf, -math.inf)
    fin = torch.isfinite(ref)
    assert torch.equal(torch.isfinite(got), fin), f"{name}: inf pattern differs"
    assert torch.equal(got[~fin], ref[~fin]), f"{name}: inf values differ"
    if not fin.any():
        return 0.0
    return ((got - ref)[fin].abs().max() / ref[fin].abs().max().clamp_min(1.0)).item()
