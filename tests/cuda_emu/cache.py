"""Emulated csrc/cuda/cache.cu (append, prefill and decode kernels) run as
sequences of calls on one paged cache, checked after every call:
  append  : every cache tensor and token_slots == a sequential Python model
            of dms_cache_append (exact);
  prefill : o, lse == full-history attention with the DMS rule (a token i is
            visible to query j when i == j, or token i + 1 did not decide to
            evict, or j - i <= window);
  decode  : o, lse == attention over every stored slot and, for rows whose
            last token is the query, == the full-history rule; with the
            flash-decoding workspace off and split S ways (combine kernel).
Unused pages hold large garbage and outputs start as NaN, so a stray read
or a missed write shows."""
import ctypes
import math
import random

import torch

from tests.cuda_emu.harness import DTYPES as DT, Tensor, strided, view
from tests.oracle import FP8_FORMATS, fp8_codes, fp8_round

INT32_MAX = 2**31 - 1
INF = math.inf


class View(ctypes.Structure):
    _fields_ = [("k_pages", ctypes.c_void_p), ("v_pages", ctypes.c_void_p), ("dtype", ctypes.c_int),
                ("fmt", ctypes.c_int), ("k_scales", ctypes.c_void_p), ("v_scales", ctypes.c_void_p)] + \
        [(n, ctypes.c_void_p) for n in ["slot_limit", "page_table", "row_slots", "row_seen", "window",
                                         "free_pages", "free_count"]] + \
        [(n, ctypes.c_int64) for n in ["n_pages", "P", "D", "R", "max_pages", "w"]]


class Call(ctypes.Structure):
    _fields_ = [("c", View)] + [(n, ctypes.c_int64) for n in ["B", "H", "G", "n"]] + \
        [(n, ctypes.POINTER(Tensor)) for n in ["q", "k_new", "v_new", "decisions", "key_padding",
                                                 "token_slots", "o", "lse", "workspace"]] + \
        [("scale", ctypes.c_float)]




def tv(t):
    return view(t, _keep)


_keep = []  # the dms_tensor structs of the current call (ctypes holds no reference)


def fp8_value(codes, scales, kv):
    """float64 values of codes [..., D] with scales [...]."""
    return codes.view(FP8_FORMATS[kv][0]).double() * scales.double()[..., None]


KV_FORMAT = {None: 0, "fp8_e4m3": 1, "fp8_e5m2": 2}


class Cache:
    def __init__(self, B, H, D, P, w, n_pages, max_pages, dtype, seed=0, perm=True, kv=None):
        R = B * H
        self.B, self.H, self.D, self.P, self.w, self.R = B, H, D, P, w, R
        self.n_pages, self.max_pages, self.dtype, self.kv = n_pages, max_pages, dtype, kv
        g = torch.Generator().manual_seed(seed + 99)
        # garbage in unused pages: tests that nothing reads them
        if kv is None:
            self.k_pages = torch.randn(n_pages, P, D, generator=g).to(dtype) * 1e3
            self.v_pages = torch.randn(n_pages, P, D, generator=g).to(dtype) * 1e3
        else:  # FP8: codes and scales
            self.k_pages = torch.randint(0, 256, (n_pages, P, D), generator=g, dtype=torch.uint8)
            self.v_pages = torch.randint(0, 256, (n_pages, P, D), generator=g, dtype=torch.uint8)
            self.k_scales = torch.rand(n_pages, P, generator=g) * 1e3
            self.v_scales = torch.rand(n_pages, P, generator=g) * 1e3
        self.slot_limit = torch.full((n_pages, P), -7, dtype=torch.int32)
        self.page_table = torch.full((R, max_pages), -3, dtype=torch.int32)
        self.row_slots = torch.zeros(R, dtype=torch.int32)
        self.row_seen = torch.zeros(R, dtype=torch.int32)
        self.window = torch.full((R, w + 1), -5, dtype=torch.int32)
        ids = list(range(n_pages))
        if perm:
            random.Random(seed).shuffle(ids)
        self.free_pages = torch.tensor(ids, dtype=torch.int32)
        self.free_count = torch.tensor([n_pages], dtype=torch.int32)

    def names(self):
        return ["k_pages", "v_pages", "slot_limit", "page_table", "row_slots", "row_seen", "window",
                "free_pages", "free_count"] + (["k_scales", "v_scales"] if self.kv else [])

    def values(self):
        """(K, V) of every slot, [n_pages * P, D] float64."""
        if self.kv is None:
            return self.k_pages.view(-1, self.D).double(), self.v_pages.view(-1, self.D).double()
        return tuple(fp8_value(p.view(-1, self.D), s.view(-1), self.kv)
                     for p, s in ((self.k_pages, self.k_scales), (self.v_pages, self.v_scales)))

    def clone(self):
        c = Cache.__new__(Cache)
        c.__dict__.update(self.__dict__)
        for n in self.names():
            setattr(c, n, getattr(self, n).clone())
        return c

    def view(self):
        v = View()
        v.k_pages = self.k_pages.data_ptr()
        v.v_pages = self.v_pages.data_ptr()
        v.dtype = DT[self.dtype]
        v.fmt = KV_FORMAT[self.kv]
        if self.kv:
            v.k_scales, v.v_scales = self.k_scales.data_ptr(), self.v_scales.data_ptr()
        for n in ["slot_limit", "page_table", "row_slots", "row_seen", "window", "free_pages", "free_count"]:
            setattr(v, n, getattr(self, n).data_ptr())
        v.n_pages, v.P, v.D, v.R, v.max_pages, v.w = self.n_pages, self.P, self.D, self.R, self.max_pages, self.w
        return v


def ref_append(c, k_new, v_new, dec, pad, token_slots):
    """Sequential model of the brief / cpu/cache.c (rows in order)."""
    B, H, n = dec.shape
    w, P = c.w, c.P
    W1 = w + 1
    sl = c.slot_limit.view(-1)
    pt = c.page_table
    fc = int(c.free_count[0])
    for r in range(c.R):
        b, h = divmod(r, H)
        seen0 = int(c.row_seen[r])
        seen = seen0
        slots = int(c.row_slots[r])
        ring = c.window[r]
        idx = {}
        for t in range(n):
            token_slots[b, h, t] = -1
        for t in range(n):
            if pad is not None and bool(pad[b, t]):
                continue
            p = seen
            seen += 1
            idx[p] = t
            a = int(bool(dec[b, h, t]))
            if p > 0:
                sp = int(ring[(p - 1) % W1])
                until = p - 1 + w + 1
                sl[sp] = until if (a and until < INT32_MAX) else INT32_MAX
            s = -1
            if p >= W1:
                lv = int(ring[p % W1])
                if int(sl[lv]) <= p:
                    s = lv
                    gone = p - w - 1
                    if gone >= seen0:
                        token_slots[b, h, idx[gone]] = -1
            if s < 0:
                i = slots
                slots += 1
                if i % P == 0:
                    fc -= 1
                    assert fc >= 0, "reference: pool exhausted"
                    pt[r, i // P] = c.free_pages[fc]
                s = int(pt[r, i // P]) * P + i % P
            ring[p % W1] = s
            sl[s] = INT32_MAX
            token_slots[b, h, t] = s
        c.row_seen[r] = seen
        c.row_slots[r] = slots
    c.free_count[0] = fc
    kp = c.k_pages.view(-1, c.D)
    vp = c.v_pages.view(-1, c.D)
    for b in range(B):
        for h in range(H):
            for t in range(n):
                s = int(token_slots[b, h, t])
                if s >= 0 and c.kv is None:
                    kp[s] = k_new[b, h, t]
                    vp[s] = v_new[b, h, t]
                elif s >= 0:
                    kp[s], c.k_scales.view(-1)[s] = fp8_codes(k_new[b, h, t], c.kv)
                    vp[s], c.v_scales.view(-1)[s] = fp8_codes(v_new[b, h, t], c.kv)


def make_call(c, B, H, G, n):
    _keep.clear()
    x = Call()
    x.c = c.view()
    x.B, x.H, x.G, x.n = B, H, G, n
    return x


def run_append(lib, c, k_new, v_new, dec, pad, token_slots):
    x = make_call(c, c.B, c.H, 0, k_new.shape[2])
    x.k_new, x.v_new, x.decisions, x.key_padding = tv(k_new), tv(v_new), tv(dec), tv(pad)
    x.token_slots = tv(token_slots)
    st = lib.dms_cache_append_cuda(ctypes.byref(x), None)
    assert st == 0, (st, lib.dms_last_error())


def run_prefill(lib, c, G, q, k_new, v_new, dec, pad, scale, o, lse):
    x = make_call(c, c.B, c.H, G, q.shape[2])
    x.q, x.k_new, x.v_new, x.decisions, x.key_padding = tv(q), tv(k_new), tv(v_new), tv(dec), tv(pad)
    x.o, x.lse, x.scale = tv(o), tv(lse), scale
    st = lib.dms_attn_prefill_cuda(ctypes.byref(x), None)
    assert st == 0, (st, lib.dms_last_error())


def run_decode(lib, c, G, q, scale, o, lse, ws):
    x = make_call(c, c.B, c.H, G, 1)
    x.q, x.o, x.lse, x.workspace, x.scale = tv(q), tv(o), tv(lse), tv(ws), scale
    st = lib.dms_attn_decode_cuda(ctypes.byref(x), None)
    assert st == 0, (st, lib.dms_last_error())


def ref_attention(qv, keys, vals, scale):
    """qv [D] f64, keys/vals [N, D] f64 -> o, lse"""
    if keys.shape[0] == 0:
        return torch.zeros_like(qv), -math.inf
    s = scale * (keys @ qv)
    lse = torch.logsumexp(s, 0)
    p = torch.exp(s - lse)
    return p @ vals, lse.item()


def check(name, got, ref, tol):
    got = got.double()
    ref = ref.double()
    wrong = torch.isnan(got) != torch.isnan(ref)  # a NaN query's row is NaN, nothing else
    if wrong.any():
        raise AssertionError(f"{name}: NaN differs at {wrong.nonzero()[:5].tolist()}")
    got, ref = got.nan_to_num(0.0, INF, -INF), ref.nan_to_num(0.0, INF, -INF)
    fin = torch.isfinite(ref)
    assert torch.equal(torch.isfinite(got), fin), f"{name}: inf pattern differs"
    if (~fin).any():
        assert torch.equal(got[~fin], ref[~fin]), f"{name}: inf values differ"
    err = (got[fin] - ref[fin]).abs().max().item() if fin.any() else 0.0
    mag = ref[fin].abs().max().item() if fin.any() else 0.0
    assert err <= tol * max(1.0, mag), f"{name}: max err {err} (mag {mag})"
    return err


def pad_pattern(kind, B, n, rng, step):
    if kind is None:
        return None
    m = torch.zeros(B, n + 3, dtype=torch.bool)
    for b in range(B):
        mode = (b + step) % 4
        if mode == 0:
            k = rng.randint(0, n)
            m[b, :k] = True  # left padding (may be everything)
        elif mode == 1:
            k = rng.randint(0, n)
            m[b, n - k:n] = True  # right padding
        elif mode == 2:
            for t in range(n):
                m[b, t] = rng.random() < 0.3  # holes
        # mode 3: none
    out = m[:, 1:n + 1] if kind == "strided" else m[:, :n].clone()
    if kind == "uint8":
        out = out.to(torch.uint8)
    return out


def run_sequence(lib, B=1, H=1, G=1, D=8, P=2, w=3, dtype=torch.float32, odtype=None, steps=(("prefill", 7),),
                 n_pages=64, max_pages=None, layout="c", pad=None, pdec=0.5, seed=0, S_list=(None, 1, 2, 5),
                 dec_layout="c", nan_query=False, verbose=False, kv=None):
    """nan_query: one element of one query per call is NaN (row 0, query
    head G - 1 of KV head 0, the call's middle token): its output and lse
    must be NaN (unless it is padding or its row is empty), the rest as ever.
    kv: FP8 pages ("fp8_e4m3" | "fp8_e5m2"): the references see every key
    and value as the pages store it."""
    rng = random.Random(seed)
    gen = torch.Generator().manual_seed(seed)
    odtype = odtype or torch.float32
    HG = H * G
    max_pages = max_pages or n_pages
    c = Cache(B, H, D, P, w, n_pages, max_pages, dtype, seed=seed, kv=kv)

    def stored(x):  # [D] of a key or value as attention sees it: the pages' rounding
        return x.double() if kv is None else fp8_round(x, kv)
    R = B * H
    hist_k = [[] for _ in range(R)]
    hist_v = [[] for _ in range(R)]
    hist_d = [[] for _ in range(R)]
    scale = 1.0 / math.sqrt(D) * 1.7
    tol = 3e-5 if odtype == torch.float32 else 1e-2
    maxerr = 0.0
    stepno = 0
    for kind, n in steps:
        reps = n if kind == "decode" else 1
        ncall = 1 if kind == "decode" else n
        for _ in range(reps):
            stepno += 1
            k_new = strided((B, H, ncall, D), dtype, layout, gen=gen)
            v_new = strided((B, H, ncall, D), dtype, layout, gen=gen)
            q = strided((B, HG, ncall, D), dtype, layout, gen=gen)
            if nan_query:
                q[0, G - 1, ncall // 2, D // 2] = float("nan")
            dec = strided((B, H, ncall), torch.bool, dec_layout, fill=False)
            dec.copy_(torch.rand(B, H, ncall, generator=gen) < pdec)
            kp = pad_pattern(pad, B, ncall, rng, stepno)
            seen_before = c.row_seen.clone()

            if kind == "prefill":
                o = strided((B, HG, ncall, D), odtype, layout, fill=float("nan"))
                lse = strided((B, HG, ncall), torch.float32, layout, fill=float("nan"))
                run_prefill(lib, c, G, q, k_new, v_new, dec, kp, scale, o, lse)
                # reference: full history + this call
                ro = torch.zeros(B, HG, ncall, D, dtype=torch.float64)
                rl = torch.full((B, HG, ncall), -INF, dtype=torch.float64)
                for b in range(B):
                    for h in range(H):
                        r = b * H + h
                        K = list(hist_k[r])
                        V = list(hist_v[r])
                        Dd = list(hist_d[r])
                        qpos = {}
                        for t in range(ncall):
                            if kp is not None and bool(kp[b, t]):
                                continue
                            qpos[t] = len(K)
                            K.append(stored(k_new[b, h, t]))
                            V.append(stored(v_new[b, h, t]))
                            Dd.append(int(dec[b, h, t]))
                        for t, pj in qpos.items():
                            vis = [i for i in range(pj + 1)
                                   if i == pj or Dd[i + 1] == 0 or pj - i <= w]
                            Ks = torch.stack([K[i] for i in vis])
                            Vs = torch.stack([V[i] for i in vis])
                            for g in range(G):
                                oo, ll = ref_attention(q[b, h * G + g, t].double(), Ks, Vs, scale)
                                ro[b, h * G + g, t] = oo
                                rl[b, h * G + g, t] = ll
                maxerr = max(maxerr, check("prefill o", o, ro, tol), check("prefill lse", lse, rl, 3e-5))

            # append: emulated vs sequential model
            ref = c.clone()
            ts = strided((B, H, ncall), torch.int32, dec_layout, fill=-77)
            rts = torch.full((B, H, ncall), -77, dtype=torch.int32)
            run_append(lib, c, k_new, v_new, dec, kp, ts)
            ref_append(ref, k_new, v_new, dec, kp, rts)
            assert torch.equal(ts, rts), f"token_slots\n{ts}\n{rts}"
            for nm in c.names():
                a, e = getattr(c, nm), getattr(ref, nm)
                if not torch.equal(a, e):
                    diff = (a != e).nonzero()[:8].tolist()
                    raise AssertionError(f"state {nm} differs at {diff}")
            for b in range(B):
                for h in range(H):
                    r = b * H + h
                    for t in range(ncall):
                        if kp is not None and bool(kp[b, t]):
                            continue
                        hist_k[r].append(stored(k_new[b, h, t]))
                        hist_v[r].append(stored(v_new[b, h, t]))
                        hist_d[r].append(int(dec[b, h, t]))
                    assert int(c.row_seen[r]) == len(hist_k[r])

            if kind == "decode":
                for S in S_list:
                    o = strided((B, HG, 1, D), odtype, layout, fill=float("nan"))
                    lse = strided((B, HG, 1), torch.float32, layout, fill=float("nan"))
                    ws = None if S is None else torch.full((B * HG, S, D + 2), float("nan"))
                    run_decode(lib, c, G, q, scale, o, lse, ws)
                    ro = torch.zeros(B, HG, 1, D, dtype=torch.float64)
                    rl = torch.full((B, HG, 1), -INF, dtype=torch.float64)
                    kpg, vpg = c.values()
                    for b in range(B):
                        for h in range(H):
                            r = b * H + h
                            ns = int(c.row_slots[r])
                            slots = [int(c.page_table[r, i // P]) * P + i % P for i in range(ns)]
                            Ks = kpg[slots] if ns else torch.zeros(0, D, dtype=torch.float64)
                            Vs = vpg[slots] if ns else torch.zeros(0, D, dtype=torch.float64)
                            # end to end: the query is the row's last token
                            e2e = kp is None or not bool(kp[b, 0])
                            pj = int(c.row_seen[r]) - 1
                            if e2e and pj >= 0:
                                Dd = hist_d[r]
                                vis = [i for i in range(pj + 1) if i == pj or Dd[i + 1] == 0 or pj - i <= w]
                                assert len(vis) == ns, (vis, ns)
                            for g in range(G):
                                oo, ll = ref_attention(q[b, h * G + g, 0].double(), Ks, Vs, scale)
                                ro[b, h * G + g, 0] = oo
                                rl[b, h * G + g, 0] = ll
                                if e2e and pj >= 0:
                                    K2 = torch.stack([hist_k[r][i] for i in vis])
                                    V2 = torch.stack([hist_v[r][i] for i in vis])
                                    o2, l2 = ref_attention(q[b, h * G + g, 0].double(), K2, V2, scale)
                                    assert torch.allclose(o2, oo, atol=1e-9, equal_nan=True)
                                    assert abs(l2 - ll) < 1e-9 or math.isnan(l2) and math.isnan(ll)
                    maxerr = max(maxerr, check(f"decode o S={S}", o, ro, tol),
                                 check(f"decode lse S={S}", lse, rl, 3e-5))
            if verbose:
                print("  step", stepno, kind, "seen", c.row_seen.tolist(), "slots", c.row_slots.tolist(),
                      "free", int(c.free_count[0]), flush=True)
    return maxerr, c


CASES = [
    # basic, tiny window, many reuses in-call
    dict(B=1, H=1, G=1, D=4, P=2, w=3, steps=[("prefill", 12)], pdec=0.6),
    dict(B=2, H=2, G=2, D=8, P=2, w=2, steps=[("prefill", 9), ("prefill", 5), ("decode", 4)], pad="bool"),
    dict(B=1, H=1, G=3, D=5, P=3, w=4, steps=[("prefill", 40), ("decode", 6), ("prefill", 11), ("decode", 3)],
         pdec=0.7),
    # w = 0 (outside P <= w, still defined) and w = 1
    dict(B=2, H=1, G=1, D=3, P=1, w=0, steps=[("prefill", 6), ("decode", 3), ("prefill", 4)], pad="bool"),
    dict(B=1, H=2, G=2, D=6, P=1, w=1, steps=[("prefill", 7), ("decode", 4), ("prefill", 9)], pdec=0.8),
    # all decisions 1 / all 0
    dict(B=1, H=1, G=2, D=7, P=2, w=3, steps=[("prefill", 20), ("decode", 5)], pdec=1.0),
    dict(B=1, H=1, G=1, D=9, P=4, w=5, steps=[("prefill", 20), ("decode", 3)], pdec=0.0),
    # strided layouts, uint8 and strided padding, strided decisions/token_slots
    dict(B=2, H=2, G=2, D=16, P=4, w=6, steps=[("prefill", 30), ("decode", 3), ("prefill", 17)], layout="t",
         pad="strided", dec_layout="t"),
    dict(B=3, H=1, G=1, D=10, P=3, w=5, steps=[("prefill", 25), ("decode", 4), ("prefill", 8)], layout="g",
         pad="uint8", dec_layout="g"),
    # low precision pool (+ bf16 output)
    dict(B=1, H=2, G=2, D=24, P=4, w=8, steps=[("prefill", 33), ("decode", 3)], dtype=torch.bfloat16, pad="bool"),
    dict(B=1, H=1, G=4, D=40, P=8, w=16, steps=[("prefill", 45), ("decode", 3)], dtype=torch.float16),
    dict(B=1, H=1, G=2, D=12, P=2, w=4, steps=[("prefill", 21), ("decode", 2)], dtype=torch.bfloat16,
         odtype=torch.bfloat16),
    # head dims: 1, odd, 80, 128, 256
    dict(B=1, H=1, G=1, D=1, P=2, w=3, steps=[("prefill", 10), ("decode", 3)]),
    dict(B=1, H=1, G=5, D=33, P=2, w=3, steps=[("prefill", 14), ("decode", 3)], pad="bool"),
    dict(B=1, H=1, G=2, D=80, P=4, w=6, steps=[("prefill", 19), ("decode", 2)], dtype=torch.bfloat16),
    dict(B=1, H=1, G=2, D=128, P=8, w=10, steps=[("prefill", 35), ("decode", 2)], pdec=0.6),
    dict(B=1, H=1, G=1, D=256, P=4, w=5, steps=[("prefill", 18), ("decode", 2)], dtype=torch.float16),
    # long enough for several key tiles / several commit tiles / large window
    dict(B=1, H=1, G=1, D=8, P=16, w=40, steps=[("prefill", 150), ("decode", 2), ("prefill", 70), ("decode", 2)],
         pdec=0.5, pad="bool"),
    dict(B=1, H=2, G=1, D=8, P=32, w=300, steps=[("prefill", 290), ("prefill", 40), ("decode", 2)], pdec=0.5),
    # a flagged key at the end of a 32-key tile takes its flag from the next tile's first token
    dict(B=1, H=1, G=1, D=8, P=4, w=3, steps=[("prefill", 140), ("decode", 2)], pdec=1.0),
    # chunked prefill of one-token chunks == decode path via prefill
    dict(B=2, H=1, G=2, D=6, P=2, w=3, steps=[("prefill", 1)] * 9 + [("decode", 2)], pad="bool"),
    # FP8 pages: odd head dims (byte loads), 16-byte loads, bf16 queries, both formats
    dict(B=2, H=2, G=2, D=19, P=3, w=4, steps=[("prefill", 23), ("decode", 3), ("prefill", 9), ("decode", 2)],
         pad="bool", kv="fp8_e4m3"),
    dict(B=1, H=1, G=3, D=64, P=4, w=6, steps=[("prefill", 40), ("decode", 3)], dtype=torch.bfloat16,
         kv="fp8_e5m2"),
    dict(B=1, H=2, G=5, D=128, P=8, w=10, steps=[("prefill", 70), ("decode", 2), ("prefill", 30), ("decode", 2)],
         pdec=0.6, layout="t", kv="fp8_e4m3"),
]



def fuzz_case(s):
    """A random sequence (seed s): window, page size, head dim, layouts,
    padding, decisions, workspace splits and shared-memory limit; returns
    (limit, case) for run_sequence."""
    rng = random.Random(s)
    w = rng.choice([0, 1, 2, 3, 4, 5, 7, 9, 16, 33])
    P = rng.randint(1, max(1, w)) if rng.random() < 0.9 else rng.randint(1, 6)
    D = rng.choice([1, 2, 3, 4, 5, 8, 12, 16, 17, 32, 48, 64, 80])
    case = dict(B=rng.randint(1, 3), H=rng.randint(1, 2), G=rng.choice([1, 1, 2, 3, 4, 7]), D=D, P=P, w=w,
                dtype=rng.choice([torch.float32, torch.float16, torch.bfloat16]),
                layout=rng.choice(["c", "t", "g"]), dec_layout=rng.choice(["c", "t", "g"]),
                pad=rng.choice([None, "bool", "uint8", "strided"]), pdec=rng.choice([0.0, 0.3, 0.5, 0.8, 1.0]),
                S_list=(None, rng.randint(1, 4), rng.randint(2, 9)))
    steps = []
    for _ in range(rng.randint(1, 5)):
        if rng.random() < 0.5:
            steps.append(("prefill", rng.randint(1, 70)))
        else:
            steps.append(("decode", rng.randint(1, 4)))
    case["steps"] = steps
    tot = sum(n for _, n in steps)
    case["n_pages"] = case["B"] * case["H"] * (tot // case["P"] + 2)
    limit = rng.choice([232448, 166912, 101376])
    case["kv"] = rng.choice([None, None, "fp8_e4m3", "fp8_e5m2"])  # drawn last: earlier draws as before
    return limit, case
