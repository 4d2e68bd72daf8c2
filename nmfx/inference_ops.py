"""``nmfx::nm_linear``: the inference op for a linear layer with a packed N:M weight.

Signature (a ``torch.library`` op; traceable by ``torch.compile(fullgraph=True)`` and
``torch.export`` through its fake implementation)::

    torch.ops.nmfx.nm_linear(
        x: Tensor,               # [..., in], float32 / bfloat16 / float16
        values: Tensor,          # [out, K], x's dtype; K = in / M * N (PackedNMWeight.values)
        indices: Tensor,         # uint8, layout given by index_bits:
                                 #   index_bits = b = ceil(log2 M) (1..5): the stored bit-packed rows
                                 #       [out, ceil(K*b/8)]  (PackedNMWeight.indices)
                                 #   index_bits = 8: one in-group position per byte, [out, K]
                                 #       (PackedNMWeight.positions())
        bias: Optional[Tensor],  # [out], x's dtype, or None
        n: int, m: int,          # the pattern N:M (M <= 32); in_features = K / N * M
        index_bits: int,         # 8, or the packed width (see indices)
        backend: str = "auto",   # "auto" | "cpu" | "reference" | "triton"
    ) -> Tensor                  # [..., out], x's dtype

It computes ``x @ W.T + bias`` where ``W = PackedNMWeight(...).unpack()``. Backends: ``"reference"``
is :func:`nm_linear_reference` (plain torch: densify, then ``F.linear``; the oracle); ``"cpu"`` is the
C++ kernel in ``nmfx/kernels/nm_linear_cpu.cpp`` (it falls back to the reference, warning once, if the
kernel cannot be built); ``"auto"`` uses the C++ kernel for CPU tensors when it is available and the
reference otherwise (no warning off the CPU). The C++ kernel accumulates in fp32 whatever the dtype.

Bounds: a stored in-group position ``>= M`` (a corrupted or mismatched weight) is refused with a
``ValueError`` by the reference and by the C++ kernel (which checks each indices tensor once while it
is unmodified, and clamps positions so it never reads outside ``x`` in any case); the Triton kernels
mask such a position out (it contributes nothing) rather than synchronise the device to check.
``nmfx.load`` checks every position once when a file is loaded, with :func:`first_invalid_position`.

From a lowering pass, with ``p = pack_nm(weight, pattern, mask)`` stored as buffers::

    y = torch.ops.nmfx.nm_linear(x, p.values, p.indices, bias, p.pattern.n, p.pattern.m, p.index_bits, "auto")

or simply ``nm_linear_packed(x, p, bias)``. On this repo's benchmark CPU the kernel reads the
bit-packed ``indices`` about as fast as byte positions (see benchmarks/bench_inference.py), so the
stored format can be passed as is; ``index_bits=8`` with ``p.positions()`` is the alternative.
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F

from nmfx.packed import MAX_PACKED_M, PackedNMWeight, index_bits as _index_bits, unpack_positions

__all__ = ["nm_linear", "nm_linear_reference", "nm_linear_packed", "first_invalid_position", "BACKENDS"]

BACKENDS = ("auto", "cpu", "reference", "triton")
_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def _check(
    x: torch.Tensor,
    values: torch.Tensor,
    indices: torch.Tensor,
    bias: Optional[torch.Tensor],
    n: int,
    m: int,
    index_bits: int,
    backend: str,
) -> tuple:
    """Validate the op's arguments (ValueError naming the problem); return (out, K, in)."""
    if backend not in BACKENDS:
        raise ValueError(f"nm_linear: backend must be one of {BACKENDS}, got {backend!r}")
    if not (1 <= n <= m <= MAX_PACKED_M):
        raise ValueError(f"nm_linear: need 1 <= N <= M <= {MAX_PACKED_M}, got {n}:{m}")
    if values.dim() != 2:
        raise ValueError(f"nm_linear: values must be [out, K], got shape {tuple(values.shape)}")
    out, k = values.shape
    if k % n:
        raise ValueError(f"nm_linear: values has K={k} kept values per row, not a multiple of N={n}")
    inp = k // n * m
    if x.dim() < 1 or x.shape[-1] != inp:
        raise ValueError(
            f"nm_linear: x has shape {tuple(x.shape)}, but the {n}:{m} weight with {k} kept values per row has "
            f"in_features={inp}"
        )
    if x.dtype not in _DTYPES or values.dtype != x.dtype:
        raise ValueError(f"nm_linear: x and values must share a float32/bfloat16/float16 dtype, got {x.dtype}, {values.dtype}")
    if index_bits == 8:
        want = (out, k)
    elif index_bits == _index_bits(m):
        want = (out, (k * index_bits + 7) // 8)
    else:
        raise ValueError(f"nm_linear: index_bits must be 8 or {_index_bits(m)} for M={m}, got {index_bits}")
    if indices.dtype != torch.uint8 or tuple(indices.shape) != want:
        raise ValueError(
            f"nm_linear: indices must be uint8 {want} for index_bits={index_bits}, got {indices.dtype} {tuple(indices.shape)}"
        )
    if bias is not None and (tuple(bias.shape) != (out,) or bias.dtype != x.dtype):
        raise ValueError(f"nm_linear: bias must be {x.dtype} [{out}], got {bias.dtype} {tuple(bias.shape)}")
    return out, k, inp


def _first_over(positions: torch.Tensor, m: int) -> Optional[tuple]:
    """(row, k, position) of the first entry of uint8 ``positions`` ``[rows, K]`` that is >= m, or None."""
    if positions.numel() == 0 or int(positions.max()) < m:
        return None
    flat = int(torch.nonzero((positions >= m).flatten())[0])
    row, k = divmod(flat, positions.shape[1])
    return row, k, int(positions[row, k])


def first_invalid_position(indices: torch.Tensor, index_bits: int, m: int, k: int) -> Optional[tuple]:
    """``(row, kept value, position)`` of the first stored in-group position ``>= m`` in ``indices``
    (uint8, ``[rows, K]`` bytes when ``index_bits == 8``, else bit-packed rows as in
    :func:`nmfx.packed.pack_positions`), or None when every position is valid.

    Vectorised, one pass over the indices; bit-packed rows are decoded a block of rows at a time
    (bounded temporary memory). Bit-packed indices of a power-of-two ``m`` cannot hold an invalid
    position, so they are not read. For checking a file once at load time (the C++ kernel checks the
    indices it is given itself; see ``nmfx/kernels/nm_linear_cpu.cpp``).
    """
    if index_bits != 8 and (1 << index_bits) == m:
        return None
    if index_bits == 8:
        return _first_over(indices, m)
    rows_per_block = max(1, (1 << 22) // max(1, k * 8))  # ~4 MB of decode temporaries per block
    for r0 in range(0, indices.shape[0], rows_per_block):
        bad = _first_over(unpack_positions(indices[r0 : r0 + rows_per_block], index_bits, k), m)
        if bad is not None:
            return bad[0] + r0, bad[1], bad[2]
    return None


def nm_linear_reference(
    x: torch.Tensor,
    values: torch.Tensor,
    indices: torch.Tensor,
    bias: Optional[torch.Tensor],
    n: int,
    m: int,
    index_bits: int,
) -> torch.Tensor:
    """The oracle: rebuild the dense masked weight and call ``F.linear`` (same arguments as the op)."""
    out, k, inp = _check(x, values, indices, bias, n, m, index_bits, "reference")
    positions = indices if index_bits == 8 else unpack_positions(indices, index_bits, k)
    bad = _first_over(positions, m)
    if bad is not None:
        raise ValueError(
            f"nm_linear: indices hold in-group position {bad[2]} >= M={m} (row {bad[0]}, kept value {bad[1]}); "
            f"the packed weight is corrupted or does not match its {n}:{m} pattern"
        )
    cols = (torch.arange(k, device=values.device) // n * m).unsqueeze(0) + positions.long()
    # scatter_add: two kept values of a group at one position (not a valid packing) add, as in the kernels.
    weight = torch.zeros(out, inp, dtype=values.dtype, device=values.device).scatter_add_(1, cols, values)
    return F.linear(x, weight, bias)


# The op is defined with torch.library (not ``custom_op``) so that its CPU kernel can be registered from
# C++: when the extension is loaded it registers ``nmfx::nm_linear`` for the CPU dispatch key
# (``TORCH_LIBRARY_IMPL`` in nm_linear_cpu.cpp), and an eager call on CPU tensors with backend "auto" or
# "cpu" then runs no Python at all. The Python implementation below is the CompositeExplicitAutograd
# kernel: it serves other devices, the first call before the extension is loaded, a failed build, and
# (through ``nmfx::_nm_linear_python``, which the C++ kernel calls) the "reference"/"triton" backends and
# the Python-worded argument errors on the CPU. There is no backward: one through the result raises.
_SCHEMA = (
    "(Tensor x, Tensor values, Tensor indices, Tensor? bias, SymInt n, SymInt m, SymInt index_bits, "
    'str backend="auto") -> Tensor'
)
_lib = torch.library.Library("nmfx", "FRAGMENT")
_lib.define("nm_linear" + _SCHEMA, tags=(torch.Tag.pt2_compliant_tag,))
_lib.define("_nm_linear_python" + _SCHEMA, tags=(torch.Tag.pt2_compliant_tag,))


def _nm_linear_impl(
    x: torch.Tensor,
    values: torch.Tensor,
    indices: torch.Tensor,
    bias: Optional[torch.Tensor],
    n: int,
    m: int,
    index_bits: int,
    backend: str = "auto",
) -> torch.Tensor:
    """The op's Python implementation (see the comment above for when it runs)."""
    _check(x, values, indices, bias, n, m, index_bits, backend)
    on_cpu = x.device.type == "cpu" and values.device.type == "cpu" and indices.device.type == "cpu"
    if backend == "cpu" and not on_cpu:
        raise ValueError(f"nm_linear: backend 'cpu' needs CPU tensors, got x on {x.device}, values on {values.device}")
    if backend == "triton" or (backend == "auto" and x.device.type == "cuda"):
        from nmfx.kernels import triton_nm as _triton

        why = _triton.unavailable_reason(x, values, indices, bias)
        if why is None:
            return _triton.nm_linear_triton(x, values, indices, bias, n, m, index_bits)
        if backend == "triton":
            raise ValueError(f"nm_linear: backend 'triton' cannot run here: {why}")
    if backend != "reference" and on_cpu:
        from nmfx.kernels import cpu as _cpu

        if _cpu.available():  # warns once, inside, when the build fails; loading registers the C++ CPU kernel
            return _cpu.nm_linear(x, values, indices, bias, n, m, index_bits)
    return nm_linear_reference(x, values, indices, bias, n, m, index_bits)


def _nm_linear_fake(x, values, indices, bias, n, m, index_bits, backend="auto"):
    if torch.onnx.is_in_onnx_export():
        raise ValueError("nmfx::nm_linear has no ONNX definition, so a packed nmfx inference model cannot be "
                         "exported to ONNX: export the dense copy instead, torch.onnx.export(nmfx.to_dense(model), "
                         "...), whose weights hold the N:M zeros")
    out, _, _ = _check(x, values, indices, bias, n, m, index_bits, backend)
    return x.new_empty((*x.shape[:-1], out))


def _no_backward(ctx, grad):
    raise RuntimeError(
        "nmfx::nm_linear has no backward: it is an inference op (nmfx.to_inference freezes the model). "
        "Train the sparsified model (nmfx.sparsify) and call to_inference afterwards."
    )


for _name in ("nm_linear", "_nm_linear_python"):
    _lib.impl(_name, _nm_linear_impl, "CompositeExplicitAutograd")
    torch.library.register_fake(f"nmfx::{_name}", _nm_linear_fake, lib=_lib)
    # A backward through the result raises (instead of gradients silently stopping here). Once the
    # C++ library is loaded, CPU tensors use its C++ equivalent (AutogradCPU, nm_linear_cpu.cpp).
    torch.library.register_autograd(f"nmfx::{_name}", _no_backward, lib=_lib)


def nm_linear(
    x: torch.Tensor,
    values: torch.Tensor,
    indices: torch.Tensor,
    bias: Optional[torch.Tensor],
    n: int,
    m: int,
    index_bits: int,
    backend: str = "auto",
) -> torch.Tensor:
    """``x @ W.T + bias`` for a packed N:M weight: calls ``torch.ops.nmfx.nm_linear`` (see the module
    docstring for the argument layout)."""
    return torch.ops.nmfx.nm_linear.default(x, values, indices, bias, n, m, index_bits, backend)


def nm_linear_packed(
    x: torch.Tensor, packed: PackedNMWeight, bias: Optional[torch.Tensor] = None, backend: str = "auto"
) -> torch.Tensor:
    """Convenience wrapper: ``torch.ops.nmfx.nm_linear`` on a :class:`PackedNMWeight` (bit-packed indices)."""
    return nm_linear(x, packed.values, packed.indices, bias, packed.pattern.n, packed.pattern.m, packed.index_bits, backend)
