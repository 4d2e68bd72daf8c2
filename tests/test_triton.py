"""The Triton kernels for nmfx::nm_linear against the plain-torch reference.

The kernels run on CPU tensors in Triton's interpreter, which only works when ``TRITON_INTERPRET=1`` is
in the environment before triton is first imported (Triton decorates its standard library at import;
torch and other test files may import triton first). So in a normal run the interpreter tests (the
``interp`` fixture) skip, and ``test_interpreter_tests_in_subprocess`` reruns this file in a child
``python -m pytest`` with ``TRITON_INTERPRET=1`` set, where they run. ``TRITON_INTERPRET=1 pytest
tests/test_triton.py`` runs them directly. Shapes are small: the interpreter executes every program of
the grid in Python. CUDA tests (compiled, autotuned) skip without a GPU. The whole file skips when
triton is not installed.
"""

import os
import subprocess
import sys
from pathlib import Path

import pytest

triton = pytest.importorskip("triton")

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

import nmfx.inference_ops as ops  # noqa: E402
from nmfx.inference_ops import nm_linear_reference  # noqa: E402
from nmfx.kernels import triton_nm  # noqa: E402
from nmfx.kernels.triton_nm import nm_linear_triton  # noqa: E402
from nmfx.packed import pack_positions  # noqa: E402
from tests.nm_cases import UNIT_ROUNDOFF, fp64_tolerance  # noqa: E402
from tests.nm_cases import random_case as _case  # noqa: E402

PATTERNS = ["2:4", "1:4", "2:8", "1:8", "1:16", "1:32", "3:8"]
DTYPES = [torch.float32, torch.bfloat16, torch.float16]
EPS = UNIT_ROUNDOFF
#: This process imported triton with TRITON_INTERPRET=1, so interpreted kernels run here.
IN_INTERPRETER = triton_nm.interpreting() and triton_nm.available()
cuda = pytest.mark.skipif(not torch.cuda.is_available() or IN_INTERPRETER, reason="needs CUDA (compiled kernels)")


@pytest.fixture
def interp():
    """The kernels run in Triton's CPU interpreter in this process (else: skip, the subprocess runs it)."""
    if not IN_INTERPRETER:
        pytest.skip("interpreter test: runs in the TRITON_INTERPRET=1 child of test_interpreter_tests_in_subprocess")


@pytest.mark.skipif(IN_INTERPRETER, reason="already running under TRITON_INTERPRET=1")
def test_interpreter_tests_in_subprocess():
    """Every interpreter test of this file, in a child pytest started with TRITON_INTERPRET=1."""
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    cmd = [sys.executable, "-m", "pytest", str(Path(__file__).resolve()), "-q", "-x", "-p", "no:cacheprovider",
           "-o", "addopts=", "-W", "ignore::pytest.PytestUnknownMarkWarning"]
    res = subprocess.run(cmd, cwd=Path(__file__).resolve().parents[1], env=env, capture_output=True, text=True,
                         timeout=900)
    tail = (res.stdout[-8000:] + "\n" + res.stderr[-4000:]).strip()
    assert res.returncode == 0, f"interpreter tests failed (rc={res.returncode}):\n{tail}"
    assert " passed" in res.stdout and " failed" not in res.stdout, tail


def _assert_matches(y, x, packed, b, idx=None, bits=None):
    """Within an fp64 bound: |y - exact| <= (2 eps(dtype) + K eps(fp32)) (|x| @ |W|^T + |b|); and
    close to the reference oracle."""
    w = packed.unpack().double()
    bd = None if b is None else b.double()
    exact = F.linear(x.double(), w, bd)
    scale = F.linear(x.double().abs(), w.abs(), None if b is None else bd.abs())
    tol = fp64_tolerance(y.dtype, packed.kept_per_row, scale)
    err = (y.double() - exact).abs()
    assert y.shape == exact.shape and y.dtype == x.dtype and y.device == x.device
    assert bool((err <= tol).all()), f"max err {err.max().item()} vs tol {tol.flatten()[err.argmax()].item()}"
    p = packed.pattern
    ref = nm_linear_reference(x, packed.values, packed.indices if idx is None else idx, b, p.n, p.m,
                              packed.index_bits if bits is None else bits)
    torch.testing.assert_close(y, ref, rtol=4 * EPS[y.dtype] ** 0.5, atol=4 * EPS[y.dtype] ** 0.5 * float(scale.max()))


def _run(x, packed, b, bits=None, **kw):
    p = packed.pattern
    idx = packed.indices if bits in (None, packed.index_bits) else packed.positions()
    bits = packed.index_bits if bits is None else bits
    return nm_linear_triton(x, packed.values, idx, b, p.n, p.m, bits, **kw), idx, bits


# --------------------------------------------------------------------------------------------
# Interpreter (runs everywhere triton is installed)
# --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("pattern", PATTERNS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("batch", [1, 3, 17])
def test_matches_reference(interp, pattern, dtype, batch):
    """Default path (GEMV for batch 1/3, tiled for 17), bit-packed indices, in = 2M, out = 19 (not a
    multiple of any block); bias on for half the cases."""
    with_bias = (PATTERNS.index(pattern) + batch) % 2 == 0
    _, packed, x, b = _case(pattern, dtype, (batch,), 2, 19, batch, with_bias)
    y, idx, bits = _run(x, packed, b)
    _assert_matches(y, x, packed, b, idx, bits)


@pytest.mark.parametrize("pattern", PATTERNS)
@pytest.mark.parametrize("inp_groups", [1, 64])
@pytest.mark.parametrize("path", ["gemv", "tiled"])
def test_in_m_and_64m_both_paths(interp, pattern, inp_groups, path):
    """in = M (a single group) and in = 64 M (several K steps); each path forced, batch 3 / 17."""
    dtype = DTYPES[(PATTERNS.index(pattern) + inp_groups) % 3]
    batch = 3 if path == "gemv" else 17
    _, packed, x, b = _case(pattern, dtype, (batch,), inp_groups, 21, inp_groups, True)
    y, idx, bits = _run(x, packed, b, path=path)
    _assert_matches(y, x, packed, b, idx, bits)


@pytest.mark.parametrize("pattern", ["2:4", "1:8", "3:8", "1:32"])
@pytest.mark.parametrize("path", ["gemv", "tiled"])
def test_byte_positions_layout(interp, pattern, path):
    """index_bits = 8 (PackedNMWeight.positions()) gives the same result as the bit-packed layout."""
    _, packed, x, b = _case(pattern, torch.float32, (5,), 3, 19, 1, True)
    y8, idx, bits = _run(x, packed, b, bits=8, path=path)
    _assert_matches(y8, x, packed, b, idx, bits)
    yb, _, _ = _run(x, packed, b, path=path)
    torch.testing.assert_close(y8, yb, rtol=0, atol=0)


@pytest.mark.parametrize("pattern,splits", [("2:4", 2), ("3:8", 3), ("1:4", 5)])
@pytest.mark.parametrize("with_bias", [False, True])
def test_gemv_split_k(interp, pattern, splits, with_bias):
    """K split over programs (fp32 partials summed by the host, bias added after) == one split."""
    _, packed, x, b = _case(pattern, torch.float16, (2,), 64, 13, 3, with_bias)
    y_split, idx, bits = _run(x, packed, b, path="gemv", split_k=splits)
    _assert_matches(y_split, x, packed, b, idx, bits)
    y_one, _, _ = _run(x, packed, b, path="gemv", split_k=1)
    torch.testing.assert_close(y_split, y_one)


def test_gemv_batch_blocks_and_small_tiles(interp):
    """GEMV with batch 37 (three batch blocks of 16) and explicit block sizes that leave partial tiles."""
    _, packed, x, b = _case("1:8", torch.float32, (37,), 9, 23, 5, True)
    y, idx, bits = _run(x, packed, b, path="gemv", config={"BLOCK_O": 8, "BLOCK_K": 16})
    _assert_matches(y, x, packed, b, idx, bits)
    y, idx, bits = _run(x, packed, b, path="tiled", config={"BLOCK_T": 16, "BLOCK_O": 16, "BLOCK_IN": 16})
    _assert_matches(y, x, packed, b, idx, bits)


@pytest.mark.parametrize("dtype", DTYPES)
def test_leading_dims(interp, dtype):
    _, packed, x, b = _case("1:8", dtype, (2, 5, 3), 4, 11, 2, True)  # 30 rows -> tiled
    y, idx, bits = _run(x, packed, b)
    assert y.shape == (2, 5, 3, 11)
    _assert_matches(y, x, packed, b, idx, bits)
    y1, _, _ = _run(x[:1, :1], packed, b)  # 3 rows -> GEMV
    torch.testing.assert_close(y1, y[:1, :1], rtol=4 * EPS[dtype] ** 0.5, atol=1e-2 if dtype != torch.float32 else 1e-5)


def test_empty_batch(interp):
    _, packed, x, b = _case("2:4", torch.float32, (0,), 2, 5, 0, True)
    y, _, _ = _run(x, packed, b)
    assert y.shape == (0, 5)


@settings(max_examples=6, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    pattern=st.sampled_from(PATTERNS + ["1:3", "2:6", "1:2", "5:32"]),
    dtype=st.sampled_from(DTYPES),
    batch=st.sampled_from([1, 2, 3, 17]),
    inp_groups=st.sampled_from([1, 2, 3, 7]),
    out=st.sampled_from([1, 5, 17, 33]),
    with_bias=st.booleans(),
    packed_bits=st.booleans(),
    seed=st.integers(0, 10**6),
)
def test_property(interp, pattern, dtype, batch, inp_groups, out, with_bias, packed_bits, seed):
    """Random shapes, including non-power-of-two M (padded groups in the tiled kernel)."""
    _, packed, x, b = _case(pattern, dtype, (batch,), inp_groups, out, seed, with_bias)
    y, idx, bits = _run(x, packed, b, bits=None if packed_bits else 8)
    _assert_matches(y, x, packed, b, idx, bits)


@pytest.mark.parametrize("pattern,bits", [("1:8", 8), ("1:24", 5), ("2:6", 3), ("2:6", 8)])
@pytest.mark.parametrize("path", ["gemv", "tiled"])
def test_invalid_positions_contribute_nothing(interp, pattern, bits, path):
    """Stored positions >= M (a corrupted weight; 5-bit codes 24..31 for 1:24, 255 bytes) are masked out
    by both kernels: no read past x (the last group's are the ones that would leave it), and the
    result is the reference with those kept values dropped."""
    p, packed, x, b = _case(pattern, torch.float32, (3 if path == "gemv" else 17,), 4, 9, 5, True)
    pos = packed.positions().clone()
    g = torch.Generator().manual_seed(1)
    bad = torch.rand(pos.shape, generator=g) < 0.3
    bad[:, -1] = True  # the last kept value of every row: its column would lie past the end of x
    pos[bad] = 255 if bits == 8 else (1 << bits) - 1
    idx = pos if bits == 8 else pack_positions(pos, bits)
    y = nm_linear_triton(x, packed.values, idx, b, p.n, p.m, bits, path=path)
    dropped = torch.where(bad, torch.zeros_like(packed.values), packed.values)
    ref = nm_linear_reference(x, dropped, packed.positions(), b, p.n, p.m, 8)
    torch.testing.assert_close(y, ref, rtol=1e-5, atol=1e-5)


def test_bad_inputs_raise(interp):
    _, packed, x, b = _case("1:8", torch.float32, (2,), 4, 6, 0, True)
    with pytest.raises(ValueError, match="in_features=32"):
        nm_linear_triton(torch.randn(2, 40), packed.values, packed.indices, b, 1, 8, 3)
    with pytest.raises(ValueError, match="index_bits must be 8 or 3"):
        nm_linear_triton(x, packed.values, packed.indices, b, 1, 8, 4)
    with pytest.raises(ValueError, match="path must be"):
        nm_linear_triton(x, packed.values, packed.indices, b, 1, 8, 3, path="dense")


@pytest.mark.skipif(IN_INTERPRETER, reason="checks a process that imported triton without the interpreter")
def test_late_interpret_env_is_refused_clearly(monkeypatch):
    """TRITON_INTERPRET=1 set after triton was imported cannot work (Triton's standard library is already
    compiled-mode): the call raises a RuntimeError saying so, instead of failing inside the kernel."""
    _, packed, x, b = _case("1:4", torch.float32, (3,), 2, 5, 0, True)
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    assert not triton_nm.available()
    with pytest.raises(RuntimeError, match="before the process first imports triton"):
        _run(x, packed, b)
    monkeypatch.delenv("TRITON_INTERPRET")
    if not torch.cuda.is_available():
        assert not triton_nm.available()
        with pytest.raises(RuntimeError, match="CUDA is not available"):
            _run(x, packed, b)


def test_the_ops_cuda_kernel_runs_triton(interp):
    """nm_linear's kernel for the CUDA dispatch key runs the Triton kernels (called directly here, in the
    interpreter on CPU tensors: on a GPU the dispatcher calls it for CUDA tensors; see the GPU test below)."""
    _, packed, x, b = _case("1:8", torch.bfloat16, (2, 9), 4, 19, 4, True)  # 18 rows -> tiled
    p = packed.pattern
    calls = []
    real = triton_nm.nm_linear_triton
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(triton_nm, "nm_linear_triton", lambda *a, **k: calls.append(1) or real(*a, **k))
        y = ops._nm_linear_cuda(x, packed.values, packed.indices, b, p.n, p.m, packed.index_bits)
        y1 = ops._nm_linear_cuda(x[0, :1], packed.values, packed.indices, b, p.n, p.m, packed.index_bits)  # GEMV
    assert len(calls) == 2
    _assert_matches(y, x, packed, b)
    _assert_matches(y1, x[0, :1], packed, b)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA (the op dispatches to Triton for CUDA tensors)")
def test_to_inference_with_triton_backend_on_a_gpu():
    """The public path: nmfx.to_inference(model.cuda(), backend="triton") runs nm_linear's CUDA kernel and
    matches the trained model."""
    import nmfx
    from nmfx.examples import TinyViT

    torch.manual_seed(0)
    x = torch.randn(3, 1, 8, 8, device="cuda")
    model = nmfx.sparsify(TinyViT(dim=32, heads=2).cuda(), "1:8", "ste", example_inputs=(x[:2],)).eval()
    inference = nmfx.to_inference(model, backend="triton")
    with torch.no_grad():
        torch.testing.assert_close(inference(x), model(x), rtol=1e-4, atol=1e-4)


@pytest.mark.skipif(IN_INTERPRETER or torch.cuda.is_available(), reason="checks a CPU-only process without the interpreter")
def test_the_cuda_kernel_says_why_triton_cannot_run(monkeypatch):
    monkeypatch.setattr(ops, "_warned", set())
    _, packed, x, b = _case("1:8", torch.float32, (2,), 4, 5, 0, True)
    with pytest.warns(RuntimeWarning, match="CUDA is not available"):
        y = ops._nm_linear_cuda(x, packed.values, packed.indices, b, 1, 8, packed.index_bits)
    torch.testing.assert_close(y, F.linear(x, packed.unpack(), b))


@pytest.mark.skipif(IN_INTERPRETER, reason="needs triton imported in compiled mode")
@pytest.mark.parametrize("dtype,pattern", [("fp16", "1:8"), ("bf16", "3:8"), ("fp32", "2:6")])
def test_kernels_compile_for_sm90_without_a_gpu(dtype, pattern):
    """The real compiler (to an sm_90 cubin through Triton's bundled ptxas) accepts both kernels, with
    bit-packed and byte indices: catches type/layout errors the interpreter does not see."""
    n, m = (int(v) for v in pattern.split(":"))
    bits = max(1, (m - 1).bit_length())
    try:
        for b in (bits, 8):
            k = triton_nm.compile_offline("gemv", dtype, n, m, b, {"BLOCK_O": 8, "BLOCK_K": 128}, partial=b == 8)
            assert k.asm["cubin"]
            k = triton_nm.compile_offline("tiled", dtype, n, m, b, {"BLOCK_T": 64, "BLOCK_O": 64, "BLOCK_IN": 32})
            assert k.asm["cubin"]
    except RuntimeError as exc:  # no ptxas in this triton build
        if "ptxas" in str(exc).lower():
            pytest.skip(f"cannot compile offline here: {exc}")
        raise


# --------------------------------------------------------------------------------------------
# CUDA (compiled kernels, autotuning)
# --------------------------------------------------------------------------------------------
@cuda
@pytest.mark.parametrize("pattern", ["2:4", "1:8", "3:8", "1:32", "2:6"])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("batch", [1, 5, 16, 300])
def test_cuda_matches_reference(monkeypatch, pattern, dtype, batch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    _, packed, x, b = _case(pattern, dtype, (batch,), 96, 1000, batch, True, device="cuda")
    y, idx, bits = _run(x, packed, b)  # autotuned
    _assert_matches(y, x, packed, b, idx, bits)
    y8, idx8, _ = _run(x, packed, b, bits=8)
    _assert_matches(y8, x, packed, b, idx8, 8)


@cuda
def test_cuda_split_k_and_autotune_cache(monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    _, packed, x, b = _case("1:8", torch.float16, (1,), 2048, 64, 0, True, device="cuda")  # out small, K long
    y, idx, bits = _run(x, packed, b)
    _assert_matches(y, x, packed, b, idx, bits)
    kern = triton_nm._kernel("gemv", False)
    assert len(kern.cache) >= 1  # the autotuner recorded a best config for this key


@cuda
def test_cuda_speed_sanity(monkeypatch):
    """Loose guard against a pathological kernel (not a benchmark; see benchmarks/bench_gpu.py): at
    batch 1, fp16, 4096x4096, 1:8 reads ~6.7x fewer bytes than dense, so it must not be 2x slower."""
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    _, packed, x, b = _case("1:8", torch.float16, (1,), 512, 4096, 0, False, device="cuda")
    dense = packed.unpack()
    p = packed.pattern

    def nm():
        return nm_linear_triton(x, packed.values, packed.indices, None, p.n, p.m, packed.index_bits)

    nm()
    t_nm = triton.testing.do_bench(nm)
    t_dense = triton.testing.do_bench(lambda: F.linear(x, dense))
    assert t_nm < 2 * t_dense, f"nmfx 1:8 batch-1 {t_nm * 1e3:.1f} us vs dense {t_dense * 1e3:.1f} us"
