"""nmfx::nm_linear: the C++ CPU kernel against the plain-torch reference, opcheck, compile, export.

The C++ extension is built once per session by the ``cpu_kernel`` fixture (session-scoped; the first
build takes ~30 s, later sessions reuse the cache in $NMFX_CACHE_DIR / ~/.cache/nmfx). If it cannot be
built, every test that needs it is skipped with the build error as the reason; reference tests always run.
"""

import warnings
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

import nmfx
import nmfx.kernels.cpu as cpu
from nmfx.inference_ops import nm_linear, nm_linear_packed, nm_linear_reference
from tests.nm_cases import UNIT_ROUNDOFF, fp64_tolerance
from tests.nm_cases import random_case as _case

PATTERNS = ["1:2", "2:4", "1:4", "2:8", "1:8", "3:8", "1:16", "1:32", "1:3", "2:6"]
DTYPES = [torch.float32, torch.bfloat16, torch.float16]


@pytest.fixture(scope="session")
def cpu_kernel():
    """SESSION-SCOPED: builds (or loads from cache) the C++ extension once; skips if that fails."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        ok = cpu.available()
    if not ok:
        pytest.skip(f"nmfx C++ CPU kernel could not be built: {cpu.build_error()}")
    return cpu


def _assert_matches_fp64(y, x, packed, b):
    """|y - exact| <= fp64_tolerance (see tests/nm_cases.py), elementwise."""
    w = packed.unpack().double()
    exact = F.linear(x.double(), w, None if b is None else b.double())
    scale = F.linear(x.double().abs(), w.abs(), None if b is None else b.double().abs())
    tol = fp64_tolerance(y.dtype, packed.kept_per_row, scale)
    err = (y.double() - exact).abs()
    assert y.shape == exact.shape and y.dtype == x.dtype
    assert bool((err <= tol).all()), f"max err {err.max().item()} vs tol {tol.flatten()[err.argmax()].item()}"


# --------------------------------------------------------------------------------------------
# Reference (always runs)
# --------------------------------------------------------------------------------------------
@settings(max_examples=25, deadline=None)
@given(
    pattern=st.sampled_from(PATTERNS),
    dtype=st.sampled_from(DTYPES),
    batch=st.sampled_from([(1,), (3,), (2, 5)]),
    with_bias=st.booleans(),
    seed=st.integers(0, 10**6),
)
def test_reference_is_dense_linear(pattern, dtype, batch, with_bias, seed):
    p, packed, x, b = _case(pattern, dtype, batch, 3, 7, seed, with_bias)
    expected = F.linear(x, packed.unpack(), b)
    for bits, idx in ((packed.index_bits, packed.indices), (8, packed.positions())):
        y = nm_linear_reference(x, packed.values, idx, b, p.n, p.m, bits)
        assert torch.equal(y, expected)
        assert torch.equal(torch.ops.nmfx.nm_linear_reference(x, packed.values, idx, b, p.n, p.m, bits), expected)


def test_opcheck_reference():
    p, packed, x, b = _case("2:8", torch.float32, (2, 3), 4, 5, 0, True)
    op = torch.ops.nmfx.nm_linear_reference.default
    torch.library.opcheck(op, (x, packed.values, packed.indices, b, 2, 8, 3))
    torch.library.opcheck(op, (x, packed.values, packed.positions(), None, 2, 8, 8))


def test_bad_inputs_raise_value_errors():
    p, packed, x, b = _case("1:8", torch.float32, (2,), 4, 6, 0, True)
    v, i = packed.values, packed.indices
    for fn in (nm_linear, torch.ops.nmfx.nm_linear_reference):
        with pytest.raises(ValueError, match="in_features=32"):
            fn(torch.randn(2, 40), v, i, b, 1, 8, 3)
        with pytest.raises(ValueError, match="index_bits must be 8 or 3"):
            fn(x, v, i, b, 1, 8, 4)
        with pytest.raises(ValueError, match="indices must be uint8"):
            fn(x, v, i[:, :1], b, 1, 8, 3)
        with pytest.raises(ValueError, match="indices must be uint8"):
            fn(x, v, i, b, 1, 8, 8)
        with pytest.raises(ValueError, match="bias must be"):
            fn(x, v, i, b[:3], 1, 8, 3)
        with pytest.raises(ValueError, match="share a float32/bfloat16/float16 dtype"):
            fn(x.double(), v, i, b, 1, 8, 3)
        with pytest.raises(ValueError, match="M <= 32"):
            fn(x, v, i, b, 1, 64, 3)


def test_failed_build_falls_back_with_one_warning(monkeypatch, tmp_path):
    """In a process whose build failed, the C++ CPU kernel is never registered and every call runs the
    op's Python implementation (called here as nmfx::_nm_linear_python, since this session may already
    have loaded the real library; the end-to-end case is the subprocess test below)."""
    import torch.utils.cpp_extension as ext

    def broken(*args, **kwargs):
        raise RuntimeError("no compiler here")

    monkeypatch.setenv("NMFX_CACHE_DIR", str(tmp_path))  # an empty cache: the (broken) build must run
    monkeypatch.setattr(cpu, "_module", None)
    monkeypatch.setattr(cpu, "_error", None)
    monkeypatch.setattr(cpu, "_warned", False)
    monkeypatch.setattr(ext, "load", broken)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        p, packed, x, b = _case("1:4", torch.float32, (3,), 2, 4, 0, True)
        python_impl = torch.ops.nmfx._nm_linear_python.default
        args = (x, packed.values, packed.indices, b, 1, 4, packed.index_bits)
        y1, y2 = python_impl(*args), python_impl(*args)
    msgs = [str(w.message) for w in caught if "could not build the C++ CPU kernel" in str(w.message)]
    assert len(msgs) == 1 and "no compiler here" in msgs[0]
    assert not cpu.available()
    assert torch.equal(y1, F.linear(x, packed.unpack(), b)) and torch.equal(y1, y2)


# --------------------------------------------------------------------------------------------
# C++ kernel (skipped, with the reason, when it cannot be built)
# --------------------------------------------------------------------------------------------
@settings(max_examples=120, deadline=None)
@given(
    pattern=st.sampled_from(PATTERNS),
    dtype=st.sampled_from(DTYPES),
    batch=st.sampled_from([1, 3, 17, 2, 5, 33, 70]),
    inp_groups=st.sampled_from([1, 2, 3, 7]),
    out=st.sampled_from([1, 3, 5, 17, 21, 37]),
    with_bias=st.booleans(),
    path=st.sampled_from([0, 1, 2]),
    packed_bits=st.booleans(),
    seed=st.integers(0, 10**6),
)
def test_kernel_matches_reference(cpu_kernel, pattern, dtype, batch, inp_groups, out, with_bias, path, packed_bits, seed):
    p, packed, x, b = _case(pattern, dtype, (batch,), inp_groups, out, seed, with_bias)
    bits, idx = (packed.index_bits, packed.indices) if packed_bits else (8, packed.positions())
    y = cpu_kernel.nm_linear(x, packed.values, idx, b, p.n, p.m, bits, path)
    _assert_matches_fp64(y, x, packed, b)
    ref = nm_linear_reference(x, packed.values, idx, b, p.n, p.m, bits)
    _assert_matches_fp64(ref, x, packed, b)
    if dtype == torch.float32:
        torch.testing.assert_close(y, ref, rtol=1e-4, atol=1e-4)


@settings(max_examples=60, deadline=None)
@given(
    pattern=st.sampled_from(["2:4", "1:2", "1:4", "2:8", "1:8", "1:16", "3:8", "1:32"]),
    dtype=st.sampled_from([torch.bfloat16, torch.float32]),
    batch=st.sampled_from([1, 2, 3, 4, 5, 8, 9, 15, 16, 17, 32, 33, 64, 65]),
    out=st.sampled_from([5, 16, 37]),
    packed_bits=st.booleans(),
    seed=st.integers(0, 10**6),
)
def test_batch_dispatch_thresholds(cpu_kernel, pattern, dtype, batch, out, packed_bits, seed):
    """Batch sizes on both sides of every GEMV / batched-path threshold (fp32 2 and 4; bf16 2, 4, 8, 16;
    batch tiles 16 / 32 / 64): the auto pick, both forced paths and the op agree with the reference."""
    p, packed, x, b = _case(pattern, dtype, (batch,), 5, out, seed, True)
    bits, idx = (packed.index_bits, packed.indices) if packed_bits else (8, packed.positions())
    ref = nm_linear_reference(x, packed.values, idx, b, p.n, p.m, bits)
    _assert_matches_fp64(ref, x, packed, b)
    auto = cpu_kernel.nm_linear(x, packed.values, idx, b, p.n, p.m, bits, 0)
    assert torch.equal(auto, torch.ops.nmfx.nm_linear(x, packed.values, idx, b, p.n, p.m, bits))
    for path in (0, 1, 2):
        _assert_matches_fp64(cpu_kernel.nm_linear(x, packed.values, idx, b, p.n, p.m, bits, path), x, packed, b)


@pytest.fixture(scope="session")
def brgemm_kernel(cpu_kernel):
    """The kernel, where its bf16 brgemm path (path=3, oneDNN's micro-kernel) can run; else skip."""
    if not cpu_kernel.load().brgemm_bf16():
        pytest.skip("at::native::cpublas::brgemm cannot run bf16 VNNI here (no oneDNN ukernel, CPU below AVX-512, or oneDNN disabled)")
    return cpu_kernel


@settings(max_examples=40, deadline=None)
@given(
    pattern=st.sampled_from(PATTERNS),
    batch=st.sampled_from([1, 2, 15, 16, 17, 63, 64, 65, 130]),
    inp_groups=st.sampled_from([1, 3, 7, 33]),
    out=st.sampled_from([1, 5, 31, 32, 33, 70]),
    with_bias=st.booleans(),
    packed_bits=st.booleans(),
    seed=st.integers(0, 10**6),
)
def test_brgemm_path_matches_reference(brgemm_kernel, pattern, batch, inp_groups, out, with_bias, packed_bits, seed):
    """bf16 through brgemm: batch tiles of 64 rows padded to 16 (1, 15..17, 63..65, 130), in padded to a
    multiple of 64, 32-row weight panels with a partial last one; the auto pick (brgemm on AMX from
    batch 32, the batched path otherwise) agrees too."""
    p, packed, x, b = _case(pattern, torch.bfloat16, (batch,), inp_groups, out, seed, with_bias)
    bits, idx = (packed.index_bits, packed.indices) if packed_bits else (8, packed.positions())
    y = brgemm_kernel.nm_linear(x, packed.values, idx, b, p.n, p.m, bits, 3)
    _assert_matches_fp64(y, x, packed, b)
    auto = brgemm_kernel.nm_linear(x, packed.values, idx, b, p.n, p.m, bits, 0)
    _assert_matches_fp64(auto, x, packed, b)
    if batch >= 32:  # past every GEMV threshold: auto is brgemm exactly where brgemm runs on AMX
        picked = 3 if brgemm_kernel.load().brgemm_bf16_amx() else 2
        assert torch.equal(auto, brgemm_kernel.nm_linear(x, packed.values, idx, b, p.n, p.m, bits, picked))


def test_brgemm_path_adds_repeated_positions(brgemm_kernel):
    """Kept values of a group at one position (never packed by nmfx, but the format's meaning: they
    add) are summed before the dense tile is rounded to bf16."""
    from nmfx.packed import pack_positions

    g = torch.Generator().manual_seed(0)
    pos = torch.zeros(5, 7 * 3, dtype=torch.uint8)
    pos[1] = torch.randint(0, 2, (7 * 3,), generator=g, dtype=torch.uint8)
    values = torch.randn(5, 7 * 3, generator=g).bfloat16()
    x = torch.randn(20, 7 * 8, generator=g).bfloat16()
    cols = (torch.arange(7 * 3) // 3 * 8).unsqueeze(0) + pos.long()
    w = torch.zeros(5, 7 * 8, dtype=torch.float64).scatter_add_(1, cols, values.double())
    w_abs = torch.zeros_like(w).scatter_add_(1, cols, values.double().abs())
    exact, scale = F.linear(x.double(), w), F.linear(x.double().abs(), w_abs)
    for path in (2, 3):
        y = brgemm_kernel.nm_linear(x, values, pack_positions(pos, 3), None, 3, 8, 3, path)
        assert bool(((y.double() - exact).abs() <= fp64_tolerance(torch.bfloat16, 21, scale)).all()), path


def test_brgemm_path_refusals(cpu_kernel):
    """path=3 is bf16-only, and unavailable with oneDNN disabled (the auto pick then never takes it)."""
    p, packed, x, b = _case("1:8", torch.float32, (20,), 4, 5, 0, True)
    for dtype in (torch.float32, torch.float16):
        with pytest.raises(ValueError, match="bfloat16-only"):
            cpu_kernel.nm_linear(x.to(dtype), packed.values.to(dtype), packed.indices, b.to(dtype), 1, 8, 3, 3)
    xb, vb, bb = x.bfloat16(), packed.values.bfloat16(), b.bfloat16()
    with torch.backends.mkldnn.flags(enabled=False):
        assert not cpu_kernel.load().brgemm_bf16()
        with pytest.raises(ValueError, match="brgemm"):
            cpu_kernel.nm_linear(xb, vb, packed.indices, bb, 1, 8, 3, 3)
        auto = cpu_kernel.nm_linear(xb, vb, packed.indices, bb, 1, 8, 3, 0)
    assert torch.equal(auto, cpu_kernel.nm_linear(xb, vb, packed.indices, bb, 1, 8, 3, 2))


@pytest.mark.parametrize("pattern", ["1:8", "2:4", "1:16", "2:8", "1:32", "2:6"])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("batch", [1, 3, 17, 40])
def test_kernel_wide_input(cpu_kernel, pattern, dtype, batch):
    """in = 1000 * M (long rows, many index chunks, a vector tail), out not a multiple of the 16-row
    block; every path (auto, GEMV with permutes or gathers, batched)."""
    p, packed, x, b = _case(pattern, dtype, (batch,), 1000, 19, batch, True)
    for bits, idx in ((packed.index_bits, packed.indices), (8, packed.positions())):
        for path in (0, 1, 2):
            _assert_matches_fp64(cpu_kernel.nm_linear(x, packed.values, idx, b, p.n, p.m, bits, path), x, packed, b)


@pytest.mark.parametrize("with_bias", [False, True])
@pytest.mark.parametrize("dtype", DTYPES)
def test_op_3d_input(cpu_kernel, with_bias, dtype):
    p, packed, x, b = _case("1:8", dtype, (3, 11), 6, 21, 7, with_bias)
    y = nm_linear_packed(x, packed, b)
    assert y.shape == (3, 11, 21)
    _assert_matches_fp64(y, x, packed, b)
    y8 = nm_linear(x, packed.values, packed.positions(), b, 1, 8, 8)
    assert torch.equal(y, y8)


def test_opcheck_cpu(cpu_kernel):
    p, packed, x, b = _case("2:8", torch.float32, (2, 3), 4, 5, 0, True)
    op = torch.ops.nmfx.nm_linear.default
    torch.library.opcheck(op, (x, packed.values, packed.indices, b, 2, 8, 3))
    torch.library.opcheck(op, (x[0], packed.values, packed.positions(), None, 2, 8, 8))


def test_cpu_calls_run_the_cpp_kernel_without_python(cpu_kernel):
    """Once the library is loaded, nmfx::nm_linear has a C++ kernel for the CPU dispatch key: an eager
    call runs no nmfx Python code and returns exactly the extension's result; nmfx::nm_linear_reference
    and refused arguments still reach the Python implementation (its results and wording)."""
    import sys

    assert torch._C._dispatch_has_kernel_for_dispatch_key("nmfx::nm_linear", "CPU")
    p, packed, x, b = _case("1:8", torch.bfloat16, (3,), 8, 21, 1, True)
    args = (x, packed.values, packed.indices, b, 1, 8, packed.index_bits)
    op, reference_op = torch.ops.nmfx.nm_linear.default, torch.ops.nmfx.nm_linear_reference.default
    calls = []
    package_dir = str(Path(nmfx.__file__).resolve().parent) + "/"

    def profile(frame, event, arg):
        # Match the package directory, not the word "nmfx": CI's venv lives under /tmp/nmfx-ci.*,
        # where torch's own OpOverload.__call__ would match too.
        if event == "call" and str(Path(frame.f_code.co_filename).resolve()).startswith(package_dir):
            calls.append(frame.f_code.co_name)

    for grad_mode in (torch.no_grad, torch.enable_grad, torch.inference_mode):
        with grad_mode():
            sys.setprofile(profile)
            try:
                y = op(*args)
            finally:
                sys.setprofile(None)
        assert calls == [], calls
        assert torch.equal(y, cpu_kernel.nm_linear(*args, 0))
    sys.setprofile(profile)
    try:
        y_ref = reference_op(*args)
    finally:
        sys.setprofile(None)
    assert "nm_linear_reference" in calls
    assert torch.equal(y_ref, nm_linear_reference(*args))
    v, i = packed.values, packed.indices
    # the kernel refuses these; the op's own message names the problem
    with pytest.raises(ValueError, match="in_features=64"):
        op(torch.randn(2, 40).bfloat16(), v, i, b, 1, 8, 3)
    with pytest.raises(ValueError, match="bias must be"):
        op(x, v, i, b[:3], 1, 8, 3)
    with pytest.raises(ValueError, match="index_bits must be 8 or 3"):
        op(x, v, i, b, 1, 8, 4)
    for fn in (op, reference_op):  # no backward: one through the result raises
        xg = x.detach().requires_grad_()
        with pytest.raises(RuntimeError, match="not implemented|no backward"):
            fn(xg, *args[1:]).float().sum().backward()


def test_kernels_are_registered_per_device():
    """The schema names no kernel: the CPU and CUDA dispatch keys have kernels of their own (the C++ one is
    registered by the extension when it loads; see the test above), every other device falls back to the
    device-generic one; the reference is an op of its own."""
    import nmfx.inference_ops as ops

    schema = str(torch.ops.nmfx.nm_linear.default._schema)
    assert "backend" not in schema and "str" not in schema, schema
    assert str(torch.ops.nmfx.nm_linear_reference.default._schema).split("(", 1)[1] == schema.split("(", 1)[1]
    assert torch._C._dispatch_has_kernel_for_dispatch_key("nmfx::nm_linear", "CUDA")
    assert torch._C._dispatch_has_kernel_for_dispatch_key("nmfx::nm_linear", "CompositeExplicitAutograd")
    assert set(ops.OP_FOR_BACKEND) == {"auto", "reference"}


def test_the_cuda_kernel_falls_back_to_the_reference_with_one_warning(monkeypatch):
    """nm_linear's CUDA kernel runs Triton; where Triton cannot run it computes the reference and says why, once
    (called directly here: this machine has no GPU)."""
    import nmfx.inference_ops as ops
    from nmfx.kernels import triton_nm

    monkeypatch.setattr(triton_nm, "unavailable_reason", lambda *t: "no GPU in this test")
    monkeypatch.setattr(ops, "_warned", set())
    p, packed, x, b = _case("1:8", torch.float32, (3,), 4, 6, 0, True)
    args = (x, packed.values, packed.indices, b, 1, 8, packed.index_bits)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        ys = [ops._nm_linear_cuda(*args) for _ in range(2)]
    assert [str(w.message) for w in caught if "no GPU in this test" in str(w.message)] != []
    assert len([w for w in caught if "Triton" in str(w.message)]) == 1
    for y in ys:
        assert torch.equal(y, nm_linear_reference(*args))
    with pytest.raises(ValueError, match="in_features=32"):
        ops._nm_linear_cuda(torch.randn(2, 40), *args[1:])


class _Packed(torch.nn.Module):
    def __init__(self, packed, bias):
        super().__init__()
        self.register_buffer("values", packed.values)
        self.register_buffer("indices", packed.indices)
        self.register_buffer("bias", bias)
        self.n, self.m, self.bits = packed.pattern.n, packed.pattern.m, packed.index_bits

    def forward(self, x):
        return torch.relu(torch.ops.nmfx.nm_linear(x, self.values, self.indices, self.bias, self.n, self.m, self.bits))


@pytest.mark.slow
def test_compile_fullgraph_and_export(cpu_kernel):
    torch._dynamo.reset()
    p, packed, x, b = _case("1:4", torch.float32, (4, 6), 8, 24, 3, True)
    mod = _Packed(packed, b)
    eager = mod(x)
    compiled = torch.compile(mod, fullgraph=True, backend="inductor")
    torch.testing.assert_close(compiled(x), eager)
    torch.testing.assert_close(compiled(torch.cat([x, x])), torch.cat([eager, eager]))  # a new batch size
    ep = torch.export.export(mod, (x,))
    targets = [n.target for n in ep.graph.nodes if n.op == "call_function"]
    assert torch.ops.nmfx.nm_linear.default in targets
    torch.testing.assert_close(ep.module()(x), eager)


def test_no_compiler_falls_back_to_the_reference_with_one_warning(tmp_path):
    """With no working C++ compiler (CXX=/bin/false, empty build cache), the op still computes the right
    result through the reference, and says so once."""
    import os
    import subprocess
    import sys
    import textwrap

    script = textwrap.dedent("""
        import warnings, torch
        from nmfx.inference_ops import nm_linear_packed
        from nmfx.kernels import cpu
        from nmfx.packed import pack_nm
        x = torch.randn(3, 32)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            p = pack_nm(torch.randn(8, 32), "1:8")  # its nm_mask does not try the build; the op does
            ys = [nm_linear_packed(x, p, None) for _ in range(3)]
        expected = torch.nn.functional.linear(x, p.unpack())
        assert all(torch.allclose(y, expected, atol=1e-6) for y in ys)
        assert not cpu.available() and cpu.build_error()
        messages = [str(w.message) for w in caught if "reference" in str(w.message)]
        assert len(messages) == 1, messages
        print("ok")
    """)
    env = {**os.environ, "CXX": "/bin/false", "NMFX_CACHE_DIR": str(tmp_path / "cache")}
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env, timeout=300)
    assert done.returncode == 0 and "ok" in done.stdout, done.stdout[-2000:] + done.stderr[-3000:]


_FIRST_BUILD = """
import sys, warnings, torch
from nmfx.kernels import cpu
from nmfx.pattern import nm_mask
from nmfx.packed import pack_nm
from nmfx.inference_ops import nm_linear_packed
warnings.simplefilter("error")  # a build attempt (CXX=/bin/false) would warn
w = torch.randn(16, 64)
mask = nm_mask(w, "2:8")
p = pack_nm(w, "2:8")
assert mask.sum() == 16 * 16 and cpu._error is None, cpu._error
print("after sparsify-time masks: loaded", cpu.loaded(), flush=True)
warnings.simplefilter("default")
with warnings.catch_warnings(record=True) as caught:
    warnings.simplefilter("always")
    nm_linear_packed(torch.randn(2, 64), p)
print("after the first inference call: loaded", cpu.loaded(), "build warnings",
      sum("could not build" in str(c.message) for c in caught))
y = nm_linear_packed(torch.randn(2, 64, requires_grad=True), p)
try:
    y.sum().backward()
except RuntimeError as exc:
    print("backward:", "has no backward" in str(exc) or "not implemented" in str(exc))
"""


def test_masks_never_start_the_build_but_the_first_inference_call_does(tmp_path):
    """With an empty cache, nm_mask (what sparsify and training steps call) uses plain torch and does
    not compile the kernel (here CXX=/bin/false: an attempt would warn); the first nm_linear call does
    try, once."""
    import os
    import subprocess
    import sys

    env = {**os.environ, "CXX": "/bin/false", "NMFX_CACHE_DIR": str(tmp_path / "empty")}
    done = subprocess.run([sys.executable, "-c", _FIRST_BUILD], capture_output=True, text=True, env=env, timeout=300)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-3000:]
    assert "after sparsify-time masks: loaded False" in done.stdout
    assert "after the first inference call: loaded False build warnings 1" in done.stdout, done.stdout
    assert "backward: True" in done.stdout  # the Python autograd kernel refuses a backward too
    assert "compiling the C++ CPU kernels" in done.stderr and done.stderr.count("compiling the C++") == 1


def test_masks_use_a_cached_kernel_without_building(cpu_kernel):
    """With the library in the cache (built by this session), nm_mask loads it (verified, no compile)."""
    import os
    import subprocess
    import sys

    done = subprocess.run([sys.executable, "-c", _FIRST_BUILD], capture_output=True, text=True, env=dict(os.environ),
                          timeout=300)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-3000:]
    assert "after sparsify-time masks: loaded True" in done.stdout
    assert "compiling" not in done.stderr
    assert "backward: True" in done.stdout


_ISA_ORDER = ["scalar", "avx2", "avx512", "avx512bf16"]
_LESSER_ISAS = _ISA_ORDER[: _ISA_ORDER.index(cpu.isa())]


@pytest.mark.parametrize("isa", _LESSER_ISAS or [pytest.param("none", marks=pytest.mark.skip(reason="host has no lesser ISA"))])
def test_lesser_isa_builds_match_the_reference(isa):
    """The builds other machines get (AVX-512 without BF16, AVX2, scalar; forced with NMFX_CPU_ISA, in
    a subprocess) compute the same results: every path, patterns inside and outside the permute
    paths, a vector tail (K = 37 N), every dtype."""
    import os
    import subprocess
    import sys
    import textwrap

    script = textwrap.dedent("""
        import torch, torch.nn.functional as F
        from nmfx.kernels import cpu
        from nmfx.packed import pack_nm
        from nmfx.pattern import Pattern
        from tests.nm_cases import UNIT_ROUNDOFF, fp64_tolerance
        assert cpu.isa() == ISA and cpu.available(), cpu.build_error()
        g = torch.Generator().manual_seed(0)
        for pattern in ("1:8", "2:4", "1:16", "2:32", "1:32", "3:8"):
            p = Pattern.parse(pattern)
            for dtype in UNIT_ROUNDOFF:
                w, bias = torch.randn(21, 37 * p.m, generator=g).to(dtype), torch.randn(21, generator=g).to(dtype)
                packed = pack_nm(w, p)
                exact_w = packed.unpack().double()
                for batch in (1, 2, 4, 5, 9, 17, 33, 65):
                    x = torch.randn(batch, 37 * p.m, generator=g).to(dtype)
                    exact = F.linear(x.double(), exact_w, bias.double())
                    scale = F.linear(x.double().abs(), exact_w.abs(), bias.double().abs())
                    tol = fp64_tolerance(dtype, packed.kept_per_row, scale)
                    brgemm = dtype == torch.bfloat16 and cpu.load().brgemm_bf16()
                    for path in (0, 1, 2, 3) if brgemm else (0, 1, 2):
                        y = cpu.nm_linear(x, packed.values, packed.indices, bias, p.n, p.m, packed.index_bits, path)
                        err = (y.double() - exact).abs()
                        assert bool((err <= tol).all()), (pattern, dtype, batch, path, err.max().item())
        print("ok")
    """).replace("ISA", repr(isa))
    env = {**os.environ, "NMFX_CPU_ISA": isa}
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env, timeout=600,
                          cwd=Path(__file__).resolve().parents[1])
    assert done.returncode == 0 and "ok" in done.stdout, done.stdout[-2000:] + done.stderr[-3000:]


def test_ninja_from_the_interpreters_scripts_dir_is_found(tmp_path, monkeypatch):
    """A venv's python run without activating the venv: the ninja wheel's binary sits in the scripts
    directory, off PATH; the build puts that directory on PATH (and leaves PATH alone otherwise)."""
    import os
    import shutil
    import sysconfig

    scripts = tmp_path / "bin"
    scripts.mkdir()
    (scripts / "ninja").write_text("#!/bin/sh\n")
    monkeypatch.setattr(sysconfig, "get_path", lambda name: str(scripts) if name == "scripts" else None)
    monkeypatch.setenv("PATH", "/nonexistent")
    monkeypatch.setattr(shutil, "which", lambda cmd: None)
    cpu._ensure_ninja_on_path()
    assert os.environ["PATH"].split(os.pathsep)[0] == str(scripts)
    monkeypatch.setenv("PATH", "/already")
    monkeypatch.setattr(shutil, "which", lambda cmd: "/usr/bin/ninja")
    cpu._ensure_ninja_on_path()
    assert os.environ["PATH"] == "/already"
