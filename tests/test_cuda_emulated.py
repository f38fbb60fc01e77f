"""The CUDA kernels' logic, checked without a GPU: csrc/cuda/attn_train.cu
(tensor-core and SIMT kernels) and csrc/cuda/cache.cu run on the CPU
emulator of tests/cuda_emu, built from this checkout's sources, against the
float64 oracle and the plain-Python cache model. A CI-sized selection (about
a minute on two cores, build included); the full matrices, the fuzzer and
the mutation check: scripts/cuda_emu.sh. Marker `emu`: `-m "not emu"` skips it."""
import pytest

torch = pytest.importorskip("torch")

from tests.cuda_emu import attn_train, cache  # noqa: E402
from tests.cuda_emu.build import REPO, Unavailable, build  # noqa: E402
from tests.cuda_emu.harness import load  # noqa: E402

pytestmark = pytest.mark.emu

bf16, f16, f32 = torch.bfloat16, torch.float16, torch.float32
ATTN_CASES = {
    # tensor cores: D 64 / 128, T off the 64-row tiles, padding, G > 1, window small / >= T / 0
    "mma-bf16-D64-T70-G2-w5-pad": dict(B=2, H=1, G=2, T=70, D=64, window=5, pad=True, dtype=bf16),
    "mma-f16-D128-T100-G2-w20": dict(B=1, H=1, G=2, T=100, D=128, window=20, dtype=f16),
    "mma-bf16-D128-T130-w>=T-pad": dict(B=2, H=2, G=1, T=130, D=128, window=135, pad=True, dtype=bf16),
    "mma-f16-D64-T17-G4-w0-pad": dict(B=2, H=1, G=4, T=17, D=64, window=0, pad=True, dtype=f16),
    "mma-bf16-D64-T300-w3": dict(B=1, H=1, G=1, T=300, D=64, window=3, dtype=bf16),
    "mma-bf16-D64-f32out-pad": dict(B=2, H=1, G=2, T=70, D=64, window=5, pad=True, dtype=bf16, odtype=f32,
                                    godtype=f32),
    "mma-f16-D64-no-y-transposed": dict(B=1, H=2, G=2, T=45, D=64, window=7, use_y=False, layout="t", dtype=f16),
    # SIMT: float32, an odd D, 16-bit with a D the tensor cores do not take, strided, low smem limit
    "simt-f32-D65-T97-G2-w4-pad": dict(B=2, H=2, G=2, T=97, D=65, window=4, pad=True, dtype=f32),
    "simt-f32-D24-T33-w>=T-gaps": dict(B=1, H=1, G=3, T=33, D=24, window=40, layout="g", dtype=f32),
    "simt-bf16-D48-T70-48KiB": dict(B=1, H=1, G=2, T=70, D=48, window=5, dtype=bf16, limit=49152),
}


@pytest.fixture(scope="module")
def lib():
    try:
        path = build(REPO / "build" / "cuda_emu")
    except Unavailable as e:
        pytest.skip(f"CUDA emulator not buildable here: {e}")
    return load(path)


@pytest.mark.parametrize("name", list(ATTN_CASES))
def test_attn_train(lib, name):
    case = ATTN_CASES[name]
    attn_train.run_case(lib, tensor_cores=name.startswith("mma"), **case)


@pytest.mark.parametrize("name", ["mma-bf16-D64-T70-G2-w5-pad", "simt-f32-D65-T97-G2-w4-pad"])
def test_attn_train_nan_query(lib, name):
    """A NaN in a query gives a NaN output and lse on both kernel families
    (it gave 0 and -inf, the output of a row that sees nothing)."""
    case = ATTN_CASES[name]
    attn_train.run_case(lib, tensor_cores=name.startswith("mma"), nan_query=True, **case)


@pytest.mark.parametrize("name", ["mma-bf16-D64-T70-G2-w5-pad", "mma-f16-D64-T17-G4-w0-pad",
                                  "simt-f32-D65-T97-G2-w4-pad"])
def test_attn_train_hot_padding_key(lib, name):
    """A padding key whose score would overflow 16 bits gets no gradient
    (the tensor-core grad_k/grad_v kernel multiplied it by 0: 0 * inf = NaN)."""
    case = ATTN_CASES[name]
    attn_train.run_case(lib, tensor_cores=name.startswith("mma"), hot_padding_key=True, **case)


@pytest.mark.parametrize("i", [1, 9])
def test_cache_nan_query(lib, i):
    """The same through prefill and decode (split or not), empty and
    padding rows included."""
    lib.emu_set_limit(232448)
    cache.run_sequence(lib, seed=i, nan_query=True, **cache.CASES[i])


@pytest.mark.parametrize("i", range(len(cache.CASES)))
def test_cache_sequence(lib, i):
    lib.emu_set_limit(232448)  # an H100's; each test sets its own
    cache.run_sequence(lib, seed=i, **cache.CASES[i])


@pytest.mark.parametrize("seed", [3, 11])
def test_cache_fuzz(lib, seed):
    limit, case = cache.fuzz_case(seed)
    lib.emu_set_limit(limit)
    cache.run_sequence(lib, seed=seed, **case)
