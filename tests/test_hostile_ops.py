"""Hostile calls of the C++ kernels: corrupted indices, inconsistent arguments, x ending at a page boundary.

A kernel that reads outside its inputs can kill the interpreter, so every case runs in a child pytest
(``test_hostile_cases_in_a_subprocess``): there a crash is a failed test, not a lost test run. The child
cases (``child_*``, collected only by the child, which sets ``python_functions``) call the extension directly (``nmfx.kernels.cpu``, bypassing
the Python op's own checks) and through ``torch.ops.nmfx.nm_linear``. ``x`` is placed so that it ends
right before a ``PROT_NONE`` page: a read past its end faults instead of returning whatever follows.
"""

import ctypes
import math
import mmap
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

from nmfx.inference_ops import first_invalid_position, nm_linear, nm_linear_reference
from nmfx.kernels import cpu
from nmfx.packed import index_bits, pack_positions, unpack_positions
from tests.nm_cases import fp64_tolerance

_ISAS = ["scalar", "avx2", "avx512", "avx512bf16"]


@pytest.mark.parametrize("isa", _ISAS[: _ISAS.index(cpu.isa()) + 1])
def test_hostile_cases_in_a_subprocess(isa):
    """Every child_* case of this file in a child pytest, for the host's build and each lesser one
    (NMFX_CPU_ISA; the position scan and decoders differ per ISA); a segfault there fails this test."""
    if not cpu.available():
        pytest.skip(f"nmfx C++ CPU kernel could not be built: {cpu.build_error()}")
    cmd = [sys.executable, "-m", "pytest", str(Path(__file__).resolve()), "-q", "-x", "-p", "no:cacheprovider",
           "-o", "addopts=", "-o", "python_functions=child_*"]
    env = {**os.environ, "NMFX_CPU_ISA": isa}
    res = subprocess.run(cmd, cwd=Path(__file__).resolve().parents[1], env=env, capture_output=True, text=True,
                         timeout=600)
    tail = (res.stdout[-6000:] + "\n" + res.stderr[-3000:]).strip()
    assert res.returncode == 0, f"hostile cases failed or crashed (rc={res.returncode}):\n{tail}"
    assert " passed" in res.stdout and "skipped" not in res.stdout, tail


_guard_pages: list = []  # the mappings stay alive for the whole child process


def _at_page_end(t: torch.Tensor) -> torch.Tensor:
    """A copy of ``t`` whose last byte is the last byte before an inaccessible page."""
    page = mmap.PAGESIZE
    nbytes = t.numel() * t.element_size()
    pages = math.ceil(nbytes / page) + 1
    buf = mmap.mmap(-1, pages * page)
    libc = ctypes.CDLL(None, use_errno=True)
    libc.mprotect.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
    base = ctypes.addressof(ctypes.c_char.from_buffer(buf))
    assert libc.mprotect(base + (pages - 1) * page, page, 0) == 0, os.strerror(ctypes.get_errno())
    _guard_pages.append(buf)
    out = torch.frombuffer(buf, dtype=t.dtype, count=t.numel(), offset=(pages - 1) * page - nbytes).view(t.shape)
    out.copy_(t)
    return out


def _kernel():
    assert cpu.available(), cpu.build_error()
    assert cpu.load().isa() == cpu.isa()  # the build NMFX_CPU_ISA asked for
    return cpu


# ------------------------------------------------------------------------------------------------
# Child cases
# ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("path", [0, 1, 2, 3])
def child_issue_example_is_refused_on_every_path(path):
    """The issue's call (all positions 255 for 1:8, one byte each) reads past x today; now a ValueError."""
    k = _kernel()
    x = _at_page_end(torch.ones(1, 64))
    idx = torch.full((4, 8), 255, dtype=torch.uint8)
    with pytest.raises(ValueError, match=r"position 255 >= M=8 \(row 0, kept value 0\)"):
        k.nm_linear(x, torch.ones(4, 8), idx, None, 1, 8, 8, path)
    for op in (torch.ops.nmfx.nm_linear, torch.ops.nmfx.nm_linear_reference):
        with pytest.raises(ValueError, match="position 255 >= M=8"):
            op(x, torch.ones(4, 8), idx, None, 1, 8, 8)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def child_five_bit_codes_past_24_are_refused(dtype):
    """1:24 stores 5-bit codes, which can hold 24..31: an overwritten (0xFF) weight is refused."""
    k = _kernel()
    x = _at_page_end(torch.randn(3, 24 * 16).to(dtype))
    values = torch.randn(8, 16).to(dtype)
    idx = torch.full((8, 10), 0xFF, dtype=torch.uint8)
    for path in (0, 1, 2, 3):
        with pytest.raises(ValueError, match="position 31 >= M=24"):
            k.nm_linear(x, values, idx, None, 1, 24, 5, path)
    with pytest.raises(ValueError, match="position 31 >= M=24"):
        nm_linear(x, values, idx, None, 1, 24, 5)
    assert first_invalid_position(idx, 5, 24, 16) == (0, 0, 31)


def child_an_in_place_write_after_a_valid_call_is_seen():
    """The kernel scans an indices tensor once; an in-place write (the version counter) makes it rescan."""
    k = _kernel()
    x = _at_page_end(torch.randn(2, 64))
    values = torch.randn(4, 8)
    idx = torch.randint(0, 8, (4, 8), dtype=torch.uint8)
    y = k.nm_linear(x, values, idx, None, 1, 8, 8)
    assert torch.allclose(y, nm_linear_reference(x, values, idx, None, 1, 8, 8), atol=1e-5)
    idx[3, 7] = 200
    with pytest.raises(ValueError, match=r"position 200 >= M=8 \(row 3, kept value 7\)"):
        k.nm_linear(x, values, idx, None, 1, 8, 8)


def child_overwritten_indices_of_a_lowered_1_24_model_are_refused():
    """The issue's case: a deployed 1:24 model whose indices are overwritten with 0xFF leaked memory
    contents into its output; now its next forward raises."""
    import nmfx

    _kernel()

    class Net(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b = torch.nn.Linear(48, 16), torch.nn.Linear(16, 4)

        def forward(self, x):
            return self.b(torch.relu(self.a(x)))

    x = _at_page_end(torch.randn(3, 48))
    model = nmfx.sparsify(Net(), "1:24", "ste", example_inputs=(x,))
    deployed = nmfx.to_inference(model, backend="cpu", force=True)
    expected = deployed(x)
    (indices,) = [b for name, b in deployed.named_buffers() if name.endswith("_indices")]
    indices.fill_(0xFF)
    with pytest.raises(ValueError, match="position 31 >= M=24"):
        deployed(x)
    assert expected.isfinite().all()


def child_inconsistent_arguments_are_refused_by_the_extension():
    """The extension checks its own arguments (the Python op's checks are bypassed here)."""
    k = _kernel()
    x, v, i8, ip = torch.randn(2, 64), torch.randn(4, 8), torch.zeros(4, 8, dtype=torch.uint8), torch.zeros(4, 3, dtype=torch.uint8)
    cases = [
        ((x, v, ip, None, 1, 8, 4), "index_bits must be 8 or 3"),
        ((x, v, ip, None, 1, 8, 2), "index_bits must be 8 or 3"),
        ((torch.randn(2, 64 * 8), torch.randn(4, 8), i8, None, 1, 64, 8), r"1 <= N <= M <= 32"),
        ((x, v, i8, None, 0, 8, 8), r"1 <= N <= M <= 32"),
        ((x, v, i8, None, 9, 8, 8), r"1 <= N <= M <= 32"),
        ((x, v, torch.zeros(4, 7, dtype=torch.uint8), None, 1, 8, 8), r"indices must be \[4, 8\]"),
        ((x, v, torch.zeros(4, 4, dtype=torch.uint8), None, 1, 8, 3), r"indices must be \[4, 3\]"),
        ((x, v, torch.zeros(5, 3, dtype=torch.uint8), None, 1, 8, 3), r"indices must be \[4, 3\]"),
        ((x, v, i8.to(torch.int32), None, 1, 8, 8), "indices must be uint8"),
        ((x, v, i8.flatten(), None, 1, 8, 8), "indices must be uint8"),
        ((x, v.flatten(), i8, None, 1, 8, 8), r"values must be \[out, K\]"),
        ((torch.randn(2, 63), v, i8, None, 1, 8, 8), r"x must be \[\.\.\., 64\]"),
        ((torch.randn(64).new_empty(()), v, i8, None, 1, 8, 8), r"x must be"),
        ((x.double(), v.double(), i8, None, 1, 8, 8), "supports float32, bfloat16, float16"),
        ((x.half(), v, i8, None, 1, 8, 8), "share a dtype"),
        ((x, v, i8, torch.randn(2, 2), 1, 8, 8), r"bias must be \[4\]"),
        ((x, v, i8, torch.randn(4).half(), 1, 8, 8), r"bias must be \[4\]"),
        ((x, torch.randn(4, 9), torch.zeros(4, 9, dtype=torch.uint8), None, 2, 8, 8), "multiple of N"),
    ]
    for args, message in cases:
        with pytest.raises(ValueError, match=message):
            k.nm_linear(*args)


def child_nm_mask_arguments_are_refused_by_the_extension():
    k = _kernel()
    for args, message in [
        ((torch.randn(4, 8), 0, 8), "1 <= N <= M <= 256"),
        ((torch.randn(4, 8), 3, 2), "1 <= N <= M <= 256"),
        ((torch.randn(4, 512), 1, 512), "1 <= N <= M <= 256"),
        ((torch.randn(4, 12), 1, 8), "multiple of M=8"),
        ((torch.randn(4, 8).double(), 1, 8), "supports float32"),
    ]:
        with pytest.raises(ValueError, match=message):
            k.nm_mask(*args)


_PATTERNS = [(1, 8), (1, 24), (2, 6), (1, 3), (3, 8), (1, 1), (2, 5), (1, 32)]


@settings(max_examples=120, deadline=None)
@given(
    nm=st.sampled_from(_PATTERNS),
    byte_layout=st.booleans(),
    dtype=st.sampled_from([torch.float32, torch.bfloat16, torch.float16]),
    batch=st.sampled_from([1, 3, 20]),
    path=st.sampled_from([0, 1, 2, 3]),
    groups=st.integers(1, 40),
    out=st.integers(1, 5),
    data=st.data(),
)
def child_random_index_bytes_match_the_reference_or_are_refused(nm, byte_layout, dtype, batch, path, groups, out, data):
    """Arbitrary index bytes (valid or not): valid -> the kernel equals the reference; any position
    >= M -> both raise ValueError. Never a crash, never output read from outside x."""
    k = _kernel()
    if path == 3 and not (dtype == torch.bfloat16 and k.load().brgemm_bf16()):
        path = 2  # brgemm (path 3) is bf16-only and needs oneDNN's ukernel
    n, m = nm
    kept = groups * n
    bits = 8 if byte_layout else index_bits(m)
    row_bytes = kept if bits == 8 else (kept * bits + 7) // 8
    # Mostly valid positions, sometimes arbitrary bytes, so both outcomes are common.
    if data.draw(st.booleans(), label="arbitrary"):
        raw = data.draw(st.binary(min_size=out * row_bytes, max_size=out * row_bytes), label="bytes")
        idx = torch.frombuffer(bytearray(raw), dtype=torch.uint8).view(out, row_bytes).clone()
    else:
        pos = torch.tensor(data.draw(st.lists(st.integers(0, m - 1), min_size=out * kept, max_size=out * kept), label="pos"),
                           dtype=torch.uint8).view(out, kept)
        idx = pos if bits == 8 else pack_positions(pos, bits)
    g = torch.Generator().manual_seed(data.draw(st.integers(0, 2**16), label="seed"))
    x = _at_page_end(torch.randn(batch, groups * m, generator=g).to(dtype))
    values = torch.randn(out, kept, generator=g).to(dtype)
    positions = idx if bits == 8 else unpack_positions(idx, bits, kept)
    if bool((positions >= m).any()):
        with pytest.raises(ValueError, match=f">= M={m}"):
            k.nm_linear(x, values, idx, None, n, m, bits, path)
        with pytest.raises(ValueError, match=f">= M={m}"):
            nm_linear_reference(x, values, idx, None, n, m, bits)
        assert first_invalid_position(idx, bits, m, kept) is not None
        return
    assert first_invalid_position(idx, bits, m, kept) is None
    y = k.nm_linear(x, values, idx, None, n, m, bits, path)
    cols = (torch.arange(kept) // n * m).unsqueeze(0) + positions.long()
    w = torch.zeros(out, groups * m, dtype=torch.float64).scatter_add_(1, cols, values.double())  # duplicates add
    exact = F.linear(x.double(), w)
    w_abs = torch.zeros_like(w).scatter_add_(1, cols, values.double().abs())
    scale = F.linear(x.double().abs(), w_abs)
    assert bool(((y.double() - exact).abs() <= fp64_tolerance(dtype, kept, scale)).all())
