"""Python face of the C kernels: output allocation, PyTorch autograd, and the
plain calls that work on NumPy arrays (CPU) and torch tensors (CPU, CUDA).

Device dispatch happens in one place, the C layer (csrc/core/*.c), from the
device of the tensors; this module only allocates outputs where the inputs
live and passes torch's current CUDA stream (`dms.runtime.exec_kwargs`).

Shapes follow SPEC.md: B batch, H key/value heads, T tokens.
"""

import math

import numpy as np

from dms._ext import _C
from dms.runtime import _is_torch, exec_kwargs

try:
    import torch
except ImportError:  # the C core works with NumPy alone
    torch = None

__all__ = [
    "AttnTrain",
    "Gate",
    "attn_train",
    "attn_train_backward",
    "attn_train_forward",
    "gate",
    "gate_backward",
    "gate_forward",
    "logistic_noise",
    "logistic_noise_like",
]

_FLOAT_NAMES = ("float32", "float16", "bfloat16")


def _dtype_name(dtype) -> str:
    """'float32', 'bfloat16', ... for a torch or NumPy dtype (or a name)."""
    if isinstance(dtype, str):
        return dtype
    if torch is not None and isinstance(dtype, torch.dtype):
        return str(dtype).removeprefix("torch.")
    return np.dtype(dtype).name


def _check_array(name, x, dtypes=_FLOAT_NAMES):
    """TypeError naming `name` unless `x` is a torch tensor or NumPy array of
    one of `dtypes` (the C layer then checks shapes, strides and devices)."""
    if not (_is_torch(x) or isinstance(x, np.ndarray)):
        raise TypeError(f"{name}: expected a torch tensor or a NumPy array, got {type(x).__name__}")
    if _dtype_name(x.dtype) not in dtypes:
        raise TypeError(f"{name}: expected dtype {', '.join(dtypes[:-1])} or {dtypes[-1]}, got {_dtype_name(x.dtype)}")


def _check_positive(name, value, what="a finite number > 0"):
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{name}: expected {what}, got {type(value).__name__} {value!r}")
    if not (math.isfinite(value) and value > 0):
        raise ValueError(f"{name}: expected {what}, got {value!r}")


def _check_counter(name, value, bits):
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
        raise TypeError(f"{name}: expected an int, got {type(value).__name__} {value!r}")
    if not 0 <= value < 2**bits:
        raise ValueError(f"{name}: expected an int in [0, 2^{bits}), got {value}")


def _empty(shape, dtype, like):
    """An uninitialised array of `shape` and `dtype` on the device of `like`
    (a torch tensor or a NumPy array)."""
    name = _dtype_name(dtype)
    if _is_torch(like):
        return torch.empty(tuple(shape), dtype=getattr(torch, name), device=like.device)
    if name == "bfloat16":
        raise TypeError("dtype: NumPy has no bfloat16; pass NumPy inputs with float32 or float16 outputs")
    return _C.aligned_empty(tuple(shape), name)


def gate_forward(z, noise=None, tau=0.1, *, y_dtype="float32", p_dtype="float32", a_dtype=None):
    """Gating (SPEC §2), no autograd.

    Args:
        z: [B, H, T] decision logits (float32, float16 or bfloat16).
        noise: [B, H, T] logistic noise (training), or None for the inference
            threshold a = 1[z > 0].
        tau: Gumbel-sigmoid temperature, > 0 (default 0.1).
        y_dtype, p_dtype: dtypes of y and p (default float32); None skips
            that output (it is returned as None).
        a_dtype: dtype of the hard decision; default z's dtype. Also uint8 or
            bool.

    Returns:
        (y, p, a): y = (z + noise) / tau, p = sigmoid(y), a = 1[y > 0], each
        [B, H, T], on z's device and of z's array type.
    """
    _check_array("z", z)
    if noise is not None:
        _check_array("noise", noise, ("float32",))
    _check_positive("tau", tau, "a finite temperature > 0")
    y = None if y_dtype is None else _empty(z.shape, y_dtype, z)
    p = None if p_dtype is None else _empty(z.shape, p_dtype, z)
    if a_dtype is None:  # z's dtype; an unsupported z is reported by the C checks
        a_dtype = _dtype_name(z.dtype) if _dtype_name(z.dtype) in _FLOAT_NAMES else "float32"
    a = _empty(z.shape, a_dtype, z)
    _C.gate_forward(z, noise, float(tau), y, p, a, **exec_kwargs(z))
    return y, p, a


def gate_backward(y, grad_a=None, grad_p=None, grad_y=None, tau=0.1, *, dtype="float32"):
    """Gradient of the gate with respect to z (no autograd).

    With s = sigmoid(y): grad_z = ((grad_a + grad_p) * s * (1 - s) + grad_y) / tau;
    the hard decision passes its gradient straight through to the soft gate.
    Every tensor is [B, H, T]; a None gradient counts as zero.
    """
    grad_z = _empty(y.shape, dtype, y)
    _C.gate_backward(y, grad_a, grad_p, grad_y, float(tau), grad_z, **exec_kwargs(y))
    return grad_z


def logistic_noise(out, *, seed: int, process_index: int = 0, accum_step: int = 0, global_step: int = 0):
    """Fills `out` (float32, C-contiguous, any shape, NumPy or torch, CPU or
    CUDA) with standard logistic noise g1 - g2 (g1, g2 Gumbel) and returns it.

    The noise is a pure function of (seed, process_index, accum_step,
    global_step) and the element's position: Philox4x32-10 keyed by `seed`
    with counter (position // 4, process_index, accum_step, global_step).
    CPU and CUDA give the same numbers; a resumed run draws the same noise.
    """
    _check_counter("seed", seed, 64)
    for name, value in (("process_index", process_index), ("accum_step", accum_step), ("global_step", global_step)):
        _check_counter(name, value, 32)
    _C.logistic_noise(out, int(seed), int(process_index), int(accum_step), int(global_step), **exec_kwargs(out))
    return out


def logistic_noise_like(z, *, seed: int, process_index: int = 0, accum_step: int = 0, global_step: int = 0):
    """A new float32 tensor of z's shape, on z's device, filled by
    `logistic_noise`."""
    if not (_is_torch(z) or isinstance(z, np.ndarray)):
        raise TypeError(f"z: expected a torch tensor or a NumPy array, got {type(z).__name__}")
    if _is_torch(z) and isinstance(seed, int) and not isinstance(seed, bool) and 0 <= seed < 2**63:
        # the custom op (torch.compile traces it; its ints are 64-bit signed); it checks the counters
        return torch.ops.dms.logistic_noise(z.detach(), seed, process_index, accum_step, global_step)
    out = _empty(z.shape, "float32", z)
    return logistic_noise(out, seed=seed, process_index=process_index, accum_step=accum_step, global_step=global_step)


def _checked_scale(q, k, v, scale):
    """The softmax scale (default 1/sqrt(D)) once q, k, v and scale are
    checked (array types and dtypes here; the C layer checks the rest)."""
    for name, x in (("q", q), ("k", k), ("v", v)):
        _check_array(name, x)
    if scale is not None:
        _check_positive("scale", scale)
    return q.shape[-1] ** -0.5 if scale is None else float(scale)


def attn_train_forward(q, k, v, y=None, key_padding=None, *, window=512, scale=None):
    """DMS training attention (SPEC §3, soft form), no autograd.

    Args:
        q: [B, H*G, T, D] queries (float32, float16 or bfloat16); any strides
            with the last dim contiguous, so a [B, T, H*G, D] projection can be
            passed as ``x.transpose(1, 2)`` without a copy. Likewise k, v.
        k, v: [B, H, T, D], q's dtype; query head j reads kv head j // G.
        y: [B, H, T] noised gate logits (from `gate`), or None for plain causal
            attention (no penalty).
        key_padding: [B, T] bool/uint8, True (nonzero) = padding token
            (``attention_mask == 0`` in Hugging Face terms), or None.
        window: eviction delay w >= 0 (default 512).
        scale: softmax scale (default 1/sqrt(D)).

    Returns:
        (o, lse): o [B, H*G, T, D] in q's dtype, lse [B, H*G, T] float32
        (-inf for padding queries, whose o is 0).
    """
    scale = _checked_scale(q, k, v, scale)
    o = _empty(q.shape, q.dtype, q)
    lse = _empty(q.shape[:3], "float32", q)
    _C.attn_train_forward(q, k, v, y, key_padding, int(window), scale, o, lse, **exec_kwargs(q))
    return o, lse


def attn_train_backward(q, k, v, y, key_padding, o, lse, grad_o, *, window=512, scale=None, need_grad_y=True):
    """Gradients of `attn_train_forward`: (grad_q, grad_k, grad_v, grad_y),
    in the dtypes of q, k, v and float32 (grad_y is None when y is None or
    `need_grad_y` is false)."""
    scale = q.shape[-1] ** -0.5 if scale is None else float(scale)
    grad_q = _empty(q.shape, q.dtype, q)
    grad_k = _empty(k.shape, k.dtype, k)
    grad_v = _empty(v.shape, v.dtype, v)
    grad_y = _empty(y.shape, "float32", y) if (y is not None and need_grad_y) else None
    _C.attn_train_backward(q, k, v, y, key_padding, int(window), scale, o, lse, grad_o, grad_q, grad_k, grad_v,
                           grad_y, **exec_kwargs(q))
    return grad_q, grad_k, grad_v, grad_y


if torch is not None:
    from typing import Optional

    # The torch entry points are torch.library custom ops with fake (meta)
    # implementations, so torch.compile traces through them (no graph break)
    # and their gradients are registered with register_autograd.

    @torch.library.custom_op("dms::attn_train", mutates_args=())
    def _attn_train_op(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, y: Optional[torch.Tensor],
                       key_padding: Optional[torch.Tensor], window: int,
                       scale: float) -> tuple[torch.Tensor, torch.Tensor]:
        q, k, v, y = (None if t is None else t.detach() for t in (q, k, v, y))
        return attn_train_forward(q, k, v, y, key_padding, window=window, scale=scale)

    @_attn_train_op.register_fake
    def _(q, k, v, y, key_padding, window, scale):
        return q.new_empty(q.shape), q.new_empty(q.shape[:3], dtype=torch.float32)

    @torch.library.custom_op("dms::attn_train_backward", mutates_args=())
    def _attn_train_backward_op(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, y: Optional[torch.Tensor],
                                key_padding: Optional[torch.Tensor], o: torch.Tensor, lse: torch.Tensor,
                                grad_o: torch.Tensor, window: int, scale: float,
                                need_grad_y: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        q, k, v, y, o, lse, grad_o = (None if t is None else t.detach() for t in (q, k, v, y, o, lse, grad_o))
        grad_q, grad_k, grad_v, grad_y = attn_train_backward(q, k, v, y, key_padding, o, lse, grad_o, window=window,
                                                             scale=scale, need_grad_y=need_grad_y)
        return grad_q, grad_k, grad_v, q.new_empty(0, dtype=torch.float32) if grad_y is None else grad_y

    @_attn_train_backward_op.register_fake
    def _(q, k, v, y, key_padding, o, lse, grad_o, window, scale, need_grad_y):
        grad_y = y.new_empty(y.shape, dtype=torch.float32) if (y is not None and need_grad_y) else \
            q.new_empty(0, dtype=torch.float32)
        return q.new_empty(q.shape), k.new_empty(k.shape), v.new_empty(v.shape), grad_y

    def _attn_train_setup(ctx, inputs, output):
        q, k, v, y, key_padding, window, scale = inputs
        ctx.save_for_backward(q, k, v, y, key_padding, *output)
        ctx.window, ctx.scale = window, scale

    def _attn_train_grad(ctx, grad_o, _grad_lse):
        q, k, v, y, key_padding, o, lse = ctx.saved_tensors
        need_y = y is not None and ctx.needs_input_grad[3]
        if grad_o is None:
            grad_o = torch.zeros_like(o)
        elif grad_o.stride(-1) != 1 or any(st == 0 and n > 1 for st, n in zip(grad_o.stride(), grad_o.shape)):
            grad_o = grad_o.contiguous()  # e.g. the expanded gradient of o.sum(): the kernel reads rows
        grad_q, grad_k, grad_v, grad_y = torch.ops.dms.attn_train_backward(q, k, v, y, key_padding, o, lse, grad_o,
                                                                           ctx.window, ctx.scale, need_y)
        return grad_q, grad_k, grad_v, grad_y.to(y.dtype) if need_y else None, None, None, None

    _attn_train_op.register_autograd(_attn_train_grad, setup_context=_attn_train_setup)

    @torch.library.custom_op("dms::gate", mutates_args=())
    def _gate_op(z: torch.Tensor, noise: Optional[torch.Tensor], tau: float,
                 a_dtype: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        return gate_forward(z.detach(), None if noise is None else noise.detach(), tau, a_dtype=a_dtype or None)

    @_gate_op.register_fake
    def _(z, noise, tau, a_dtype):
        default = z.dtype if z.dtype in (torch.float32, torch.float16, torch.bfloat16) else torch.float32
        a = getattr(torch, a_dtype) if a_dtype else default
        return z.new_empty(z.shape, dtype=torch.float32), z.new_empty(z.shape, dtype=torch.float32), \
            z.new_empty(z.shape, dtype=a)

    @torch.library.custom_op("dms::gate_backward", mutates_args=())
    def _gate_backward_op(y: torch.Tensor, grad_a: Optional[torch.Tensor], grad_p: Optional[torch.Tensor],
                          grad_y: Optional[torch.Tensor], tau: float, dtype: str) -> torch.Tensor:
        y, grad_a, grad_p, grad_y = (None if t is None else t.detach() for t in (y, grad_a, grad_p, grad_y))
        return gate_backward(y, grad_a, grad_p, grad_y, tau, dtype=dtype)

    @_gate_backward_op.register_fake
    def _(y, grad_a, grad_p, grad_y, tau, dtype):
        return y.new_empty(y.shape, dtype=getattr(torch, dtype))

    def _gate_setup(ctx, inputs, output):
        z, _noise, tau, _a_dtype = inputs
        ctx.save_for_backward(output[0])
        ctx.tau, ctx.z_dtype = tau, _dtype_name(z.dtype)

    def _gate_grad(ctx, grad_y, grad_p, grad_a):
        if not ctx.needs_input_grad[0]:
            return None, None, None, None
        (y,) = ctx.saved_tensors
        grad_a = grad_a if grad_a is not None and grad_a.is_floating_point() else None
        return torch.ops.dms.gate_backward(y, grad_a, grad_p, grad_y, ctx.tau, ctx.z_dtype), None, None, None

    _gate_op.register_autograd(_gate_grad, setup_context=_gate_setup)

    @torch.library.custom_op("dms::logistic_noise", mutates_args=())
    def _logistic_noise_op(like: torch.Tensor, seed: int, process_index: int, accum_step: int,
                           global_step: int) -> torch.Tensor:
        out = torch.empty(like.shape, dtype=torch.float32, device=like.device)
        return logistic_noise(out, seed=seed, process_index=process_index, accum_step=accum_step,
                              global_step=global_step)

    @_logistic_noise_op.register_fake
    def _(like, seed, process_index, accum_step, global_step):
        return like.new_empty(like.shape, dtype=torch.float32)

    class AttnTrain:
        """Differentiable DMS training attention (the custom op
        ``torch.ops.dms.attn_train``): apply(q, k, v, y, key_padding, window,
        scale) -> (o, lse); see `attn_train_forward`. Gradients reach q, k, v
        and y (hence the gate and the DMS adapter); lse has none."""

        @staticmethod
        def apply(q, k, v, y, key_padding, window, scale):
            return torch.ops.dms.attn_train(q, k, v, y, key_padding, int(window), _checked_scale(q, k, v, scale))

    class Gate:
        """Gating with the straight-through estimator (SPEC §2; the custom op
        ``torch.ops.dms.gate``).

        apply(z, noise, tau, a_dtype) -> (y, p, a), all [B, H, T]:
        y = (z + noise) / tau (float32), p = sigmoid(y) (float32) and the hard
        decision a = 1[y > 0] in `a_dtype` (default z's dtype). Gradients
        reach z through y, through p, and through a as if a were p.
        `noise` receives no gradient; None means inference (no noise).
        """

        @staticmethod
        def apply(z, noise, tau, a_dtype):
            _check_array("z", z)
            _check_positive("tau", tau, "a finite temperature > 0")
            return torch.ops.dms.gate(z, noise, float(tau), "" if a_dtype is None else _dtype_name(a_dtype))

else:
    AttnTrain = Gate = None


def attn_train(q, k, v, y=None, key_padding=None, *, window=512, scale=None):
    """DMS training attention: o [B, H*G, T, D]. Differentiable for torch
    tensors (via `AttnTrain`), a plain call for NumPy arrays. Arguments as
    in `attn_train_forward`."""
    if _is_torch(q):
        return AttnTrain.apply(q, k, v, y, key_padding, window, scale)[0]
    return attn_train_forward(q, k, v, y, key_padding, window=window, scale=scale)[0]


def gate(z, noise=None, tau=0.1, *, a_dtype=None):
    """Gating (SPEC §2) for torch tensors (differentiable, via `Gate`) and
    NumPy arrays (plain call). Returns (y, p, a), see `gate_forward`."""
    if _is_torch(z):
        return Gate.apply(z, noise, tau, a_dtype)
    return gate_forward(z, noise, tau, a_dtype=a_dtype)
