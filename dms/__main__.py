"""`python -m dms`: report what this build of dms contains and check each
compiled kernel on every device present against a float64 formula: gating
(SPEC §2), the training attention forward and backward (§3), and the paged
cache's append, prefill and decode attention (§3-§5), at small shapes.

    python -m dms [--size B H T] [--seed N]

Exits non-zero if any check fails.
"""

import argparse
import sys
import time

import numpy as np

import dms
from dms import ops


def _devices():
    try:
        import torch
    except ImportError:
        return ["numpy"]
    devices = ["numpy", "cpu"]
    if torch.cuda.is_available() and dms.build_info()["cuda"]:
        devices.append("cuda")
    return devices


def _check_gate(device, shape, seed):
    """Max abs error of y, p against float64, decision mismatches, and time."""
    rng = np.random.default_rng(seed)
    z = (rng.standard_normal(shape) * 3).astype(np.float32)
    noise = ops.logistic_noise(np.empty(shape, np.float32), seed=seed)
    tau = 0.1
    y64 = (z.astype(np.float64) + noise) / tau
    if device == "numpy":
        zz, nn = z, noise
    else:
        import torch

        zz, nn = torch.from_numpy(z).to(device), torch.from_numpy(noise).to(device)
    start = time.perf_counter()
    y, p, a = ops.gate_forward(zz, nn, tau)
    if device == "cuda":
        import torch

        torch.cuda.synchronize()
    elapsed = time.perf_counter() - start
    y, p, a = (np.asarray(x.cpu()) if device != "numpy" else x for x in (y, p, a))
    err_y = float(np.max(np.abs(y - y64) / (1 + np.abs(y64))))
    err_p = float(np.max(np.abs(p - 1 / (1 + np.exp(-y64)))))
    settled = np.abs(y64) > 1e-4
    mismatches = int(np.sum((a[settled] > 0) != (y64[settled] > 0)))
    ok = err_y < 1e-5 and err_p < 1e-5 and mismatches == 0
    return ok, err_y, err_p, mismatches, elapsed, float(np.mean(a))


def _softmax_rows(s):
    m = np.max(s, axis=-1, keepdims=True)
    e = np.exp(s - m)
    return e / e.sum(-1, keepdims=True), (m + np.log(e.sum(-1, keepdims=True)))[..., 0]


def _reference_attention(q, k, v, y, window, scale, *, evict=None):
    """Float64 DMS attention over [B, H*G, T, D] queries and [B, H, T, D]
    keys (SPEC §3): the soft form with penalty log(1 - sigmoid(y[i+1])) beyond
    the window, or with `evict` ([B, H, T] 0/1 decisions) the hard form.
    Returns (o, lse, P, beyond): P the probabilities, beyond the mask of
    (query, key) pairs more than `window` apart."""
    B, HG, T, D = q.shape
    G = HG // k.shape[1]
    kk, vv = np.repeat(k, G, axis=1), np.repeat(v, G, axis=1)
    s = scale * np.einsum("bhjd,bhid->bhji", q, kk)
    j, i = np.arange(T)[:, None], np.arange(T)[None, :]
    beyond = (j - i) > window
    if evict is None:
        nxt = np.concatenate([y[..., 1:], np.zeros_like(y[..., :1])], axis=-1)  # y[i + 1] for key i
        penalty = -np.logaddexp(0.0, nxt)  # log(1 - sigmoid(y)) = logsigmoid(-y)
        s = s + np.where(beyond, np.repeat(penalty, G, axis=1)[:, :, None, :], 0.0)
    else:
        flag = np.concatenate([evict[..., 1:], np.zeros_like(evict[..., :1])], axis=-1)
        hidden = beyond & (np.repeat(flag, G, axis=1)[:, :, None, :] > 0)
        s = np.where(hidden, -np.inf, s)
    s = np.where(i <= j, s, -np.inf)
    p, lse = _softmax_rows(s)
    return p @ vv, lse, p, beyond


def _as(device, *arrays):
    if device == "numpy":
        return arrays
    import torch

    return tuple(torch.from_numpy(np.ascontiguousarray(a)).to(device) for a in arrays)


def _host(*tensors):
    return tuple(np.asarray(t.cpu()) if hasattr(t, "cpu") else np.asarray(t) for t in tensors)


def _relative(got, want):
    return float(np.max(np.abs(got - want)) / (np.max(np.abs(want)) + 1e-30))


def _check_attn_train(device, seed):
    """Forward and all four gradients of the training attention (float32,
    B 1, H 2, G 2, T 70, D 32, w 9) against float64 formulas; the largest
    relative error."""
    rng = np.random.default_rng(seed)
    B, H, G, T, D, w = 1, 2, 2, 70, 32, 9
    q = rng.standard_normal((B, H * G, T, D)).astype(np.float32)
    k, v = (rng.standard_normal((B, H, T, D)).astype(np.float32) for _ in range(2))
    y = (rng.standard_normal((B, H, T)) * 2).astype(np.float32)
    grad_o = rng.standard_normal((B, H * G, T, D)).astype(np.float32)
    scale = D ** -0.5
    start = time.perf_counter()
    o, lse = ops.attn_train_forward(*_as(device, q, k, v, y), None, window=w, scale=scale)
    grads = ops.attn_train_backward(*_as(device, q, k, v, y), None, o, lse, *_as(device, grad_o), window=w,
                                    scale=scale)
    _sync(device)
    elapsed = time.perf_counter() - start
    q64, k64, v64, y64, go = (a.astype(np.float64) for a in (q, k, v, y, grad_o))
    o64, lse64, p, beyond = _reference_attention(q64, k64, v64, y64, w, scale)
    dp = go @ np.repeat(v64, G, axis=1).transpose(0, 1, 3, 2)
    ds = p * (dp - np.sum(go * o64, axis=-1, keepdims=True))
    gq = scale * ds @ np.repeat(k64, G, axis=1)
    gk = (scale * ds.transpose(0, 1, 3, 2) @ q64).reshape(B, H, G, T, D).sum(2)
    gv = (p.transpose(0, 1, 3, 2) @ go).reshape(B, H, G, T, D).sum(2)
    # d penalty[i] / d y[i+1] = -sigmoid(y[i+1]); the penalty of key i sits on y[i + 1]
    per_key = np.where(beyond, ds, 0.0).reshape(B, H, G, T, T).sum((2, 3))  # [B, H, T] by key
    gy = np.zeros_like(y64)
    gy[..., 1:] = per_key[..., :-1] * -(1 / (1 + np.exp(-y64[..., 1:])))
    errors = [_relative(a, b) for a, b in zip(_host(o, lse, *grads), (o64, lse64, gq, gk, gv, gy))]
    return max(errors) < 1e-4, max(errors), elapsed


def _check_cache(device, seed):
    """A paged cache filled by a prefill and 10 decode steps (float32, B 2,
    H 2, G 2, D 32, w 12, pages of 4, random decisions): every output against
    the float64 hard rule over the whole sequence; the largest relative error."""
    import torch

    from dms.cache import PagedLayerCache

    rng = np.random.default_rng(seed)
    B, H, G, T, D, w, n = 2, 2, 2, 60, 32, 12, 50
    q = rng.standard_normal((B, H * G, T, D)).astype(np.float32)
    k, v = (rng.standard_normal((B, H, T, D)).astype(np.float32) for _ in range(2))
    evict = rng.random((B, H, T)) < 0.5
    tq, tk, tv = _as(device, q, k, v)
    te = torch.from_numpy(evict).to(device)
    start = time.perf_counter()
    cache = PagedLayerCache(B, H, D, w, page_size=4, dtype=torch.float32, device=device)
    outs = [cache.prefill_attention(tq[:, :, :n], tk[:, :, :n], tv[:, :, :n], te[:, :, :n])[0]]
    cache.append(tk[:, :, :n], tv[:, :, :n], te[:, :, :n])
    for t in range(n, T):
        cache.append(tk[:, :, t:t + 1], tv[:, :, t:t + 1], te[:, :, t:t + 1])
        outs.append(cache.decode_attention(tq[:, :, t:t + 1])[0])
    got = torch.cat(outs, 2)
    _sync(device)
    elapsed = time.perf_counter() - start
    o64 = _reference_attention(*(a.astype(np.float64) for a in (q, k, v)), None, w, D ** -0.5,
                               evict=evict.astype(np.float64))[0]
    error = _relative(_host(got)[0], o64)
    return error < 1e-4, error, elapsed


def _sync(device):
    if device == "cuda":
        import torch

        torch.cuda.synchronize()


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m dms", description=__doc__.split("\n\n")[0])
    parser.add_argument("--size", nargs=3, type=int, default=[2, 8, 4096], metavar=("B", "H", "T"),
                        help="shape of the gating check (default: 2 8 4096)")
    parser.add_argument("--seed", type=int, default=0, help="random seed (default: 0)")
    args = parser.parse_args(argv)

    info = dms.build_info()
    print(f"dms {info['version']}")
    cuda = (f"yes (sm {info['cuda_archs']}, runtime {info['cuda_runtime_version']}, "
            f"{info['cuda_device_count']} device(s) visible, cuBLAS {info['cublas_version'] or 'not linked'})"
            if info["cuda"] else "no (CPU-only build)")
    print(f"  CUDA kernels : {cuda}")
    print(f"  CPU features : {', '.join(info['cpu_features']) or 'none detected'}")
    print(f"  CPU kernels  : {', '.join(f'{op} {path}' for op, path in info['cpu_kernels'].items())}")
    print(f"  OpenMP       : {info['openmp']} (default threads {info['default_num_threads']}, "
          f"using {dms.get_num_threads()})")
    print(f"  compiler     : {info['compiler']}")
    print()
    shape = tuple(args.size)
    print(f"gating check on {shape} (SPEC §2, tau 0.1, against float64):")
    print(f"  {'device':<7} {'result':<6} {'max rel err y':>14} {'max err p':>10} {'flips':>6} "
          f"{'evicted':>8} {'time':>9}")
    all_ok = True
    for device in _devices():
        ok, err_y, err_p, flips, elapsed, evicted = _check_gate(device, shape, args.seed)
        all_ok &= ok
        print(f"  {device:<7} {'ok' if ok else 'FAIL':<6} {err_y:>14.2e} {err_p:>10.2e} {flips:>6} "
              f"{evicted:>8.1%} {elapsed * 1e3:>7.2f}ms")
    print()
    print("training attention, forward + gradients of q, k, v, y (SPEC §3 soft form, against float64):")
    print(f"  {'device':<7} {'result':<6} {'max rel err':>12} {'time':>9}")
    for device in _devices():
        ok, error, elapsed = _check_attn_train(device, args.seed)
        all_ok &= ok
        print(f"  {device:<7} {'ok' if ok else 'FAIL':<6} {error:>12.2e} {elapsed * 1e3:>7.2f}ms")
    print()
    print("paged cache: prefill + append + 10 decode steps (SPEC §3-§5 hard rule, against float64):")
    print(f"  {'device':<7} {'result':<6} {'max rel err':>12} {'time':>9}")
    for device in _devices():
        if device == "numpy":
            print("  numpy   -      (the cache works on torch tensors)")
            continue
        ok, error, elapsed = _check_cache(device, args.seed)
        all_ok &= ok
        print(f"  {device:<7} {'ok' if ok else 'FAIL':<6} {error:>12.2e} {elapsed * 1e3:>7.2f}ms")
    print()
    print("all checks passed" if all_ok else "SOME CHECKS FAILED")
    return 0 if all_ok else 1


if __name__ == "__main__":
    sys.exit(main())
