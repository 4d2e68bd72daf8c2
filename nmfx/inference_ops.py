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
    ) -> Tensor                  # [..., out], x's dtype

It computes ``x @ W.T + bias`` where ``W = PackedNMWeight(...).unpack()``. The schema names no kernel:
kernels are registered per device with ``torch.library``, and the dispatcher picks one from the
tensors' device, so an exported or saved graph runs wherever its tensors are moved:

* **CPU**: the C++ kernel of ``nmfx/kernels/nm_linear_cpu.cpp``, registered for the ``CPU`` dispatch key
  by the extension itself when it is loaded (an eager call then runs no Python). Until it is loaded,
  the op's device-generic kernel below serves CPU calls: it loads (building once, about a minute) the
  extension, which registers itself, and falls back to the reference, warning once, if it cannot be built.
* **CUDA**: the Triton kernels of ``nmfx/kernels/triton_nm.py`` (registered here for the ``CUDA`` key,
  importing triton on the first call); the reference, warning once with the reason, where Triton cannot run.
* **Any other device**: the reference.

The kernels can also be called directly (same arguments): :func:`nm_linear_reference` (plain torch:
densify, then ``F.linear``; the oracle), ``nmfx.kernels.cpu.nm_linear`` and
``nmfx.kernels.triton_nm.nm_linear_triton``. The reference is also an op of its own,
``torch.ops.nmfx.nm_linear_reference`` (same schema, every device): that is how a model chooses the
plain-torch path explicitly, ``nmfx.to_inference(model, backend="reference")`` lowering its layers to
it instead of ``nm_linear``. The C++ kernel accumulates in fp32 whatever the dtype.

Bounds: a stored in-group position ``>= M`` (a corrupted or mismatched weight) is refused with a
``ValueError`` by the reference and by the C++ kernel (which checks each indices tensor once while it
is unmodified, and clamps positions so it never reads outside ``x`` in any case); the Triton kernels
mask such a position out (it contributes nothing) rather than synchronise the device to check.
``nmfx.load`` checks every position once when a file is loaded, with :func:`first_invalid_position`.

From a lowering pass, with ``p = pack_nm(weight, pattern, mask)`` stored as buffers::

    y = torch.ops.nmfx.nm_linear(x, p.values, p.indices, bias, p.pattern.n, p.pattern.m, p.index_bits)

or simply ``nm_linear_packed(x, p, bias)``. On this repo's benchmark CPU the kernel reads the
bit-packed ``indices`` about as fast as byte positions (see benchmarks/bench_inference.py), so the
stored format can be passed as is; ``index_bits=8`` with ``p.positions()`` is the alternative.
"""

from __future__ import annotations

import warnings
from typing import Optional

import torch
import torch.nn.functional as F

from nmfx.kernels.nm_linear_args import check_nm_linear_args
from nmfx.packed import PackedNMWeight, unpack_positions

__all__ = ["nm_linear", "nm_linear_reference", "nm_linear_packed", "first_invalid_position", "OP_FOR_BACKEND"]


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


def nm_linear_reference(x: torch.Tensor, values: torch.Tensor, indices: torch.Tensor, bias: Optional[torch.Tensor],
                        n: int, m: int, index_bits: int) -> torch.Tensor:
    """The oracle: rebuild the dense masked weight and call ``F.linear`` (same arguments as the op)."""
    out, k, inp = check_nm_linear_args(x, values, indices, bias, n, m, index_bits)
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


# The ops are defined with torch.library (not ``custom_op``) so that nm_linear's CPU kernel can be
# registered from C++ (``TORCH_LIBRARY_IMPL`` in nm_linear_cpu.cpp) when the extension is loaded.
# ``nm_linear_reference`` (same schema) is the reference as an op of its own, so that a lowering can
# choose it explicitly (``to_inference(backend="reference")``) and still compile and export as one
# opaque node. ``_nm_linear_python`` is the Python implementation by another name: the C++ CPU kernel
# hands the arguments it refuses to it, so the error reads the same on every path. None of them has a
# backward: one through the result raises.
_SCHEMA = "(Tensor x, Tensor values, Tensor indices, Tensor? bias, SymInt n, SymInt m, SymInt index_bits) -> Tensor"
_lib = torch.library.Library("nmfx", "FRAGMENT")
for _name in ("nm_linear", "_nm_linear_python", "nm_linear_reference"):
    _lib.define(_name + _SCHEMA, tags=(torch.Tag.pt2_compliant_tag,))
_warned: set[str] = set()


def _warn_once(key: str, message: str) -> None:
    if key not in _warned:
        _warned.add(key)
        warnings.warn(message, RuntimeWarning, stacklevel=3)


def _nm_linear_any_device(x: torch.Tensor, values: torch.Tensor, indices: torch.Tensor, bias: Optional[torch.Tensor],
                          n: int, m: int, index_bits: int) -> torch.Tensor:
    """The kernel of a device with no kernel of its own (CompositeExplicitAutograd): on CPU tensors
    before the C++ extension is loaded, it loads it (the extension registers the CPU kernel, which
    serves every later call) and runs it; elsewhere, or where the build fails, the reference."""
    check_nm_linear_args(x, values, indices, bias, n, m, index_bits)
    if x.device.type == "cpu" and values.device.type == "cpu" and indices.device.type == "cpu":
        from nmfx.kernels import cpu as _cpu

        if _cpu.available():  # warns once, inside, when the build fails
            return _cpu.nm_linear(x, values, indices, bias, n, m, index_bits)
    return nm_linear_reference(x, values, indices, bias, n, m, index_bits)


def _nm_linear_cuda(x: torch.Tensor, values: torch.Tensor, indices: torch.Tensor, bias: Optional[torch.Tensor],
                    n: int, m: int, index_bits: int) -> torch.Tensor:
    """The CUDA kernel: Triton, or the reference (warning once with the reason) where Triton cannot run."""
    from nmfx.kernels import triton_nm as _triton

    why = _triton.unavailable_reason(x, values, indices, bias)
    if why is None:
        return _triton.nm_linear_triton(x, values, indices, bias, n, m, index_bits)
    check_nm_linear_args(x, values, indices, bias, n, m, index_bits)
    _warn_once("triton", f"nmfx::nm_linear: the Triton kernels cannot run ({why}); using the plain-torch "
               "reference, which densifies the weight at every call")
    return nm_linear_reference(x, values, indices, bias, n, m, index_bits)


ONNX_REFUSAL = ("nmfx::nm_linear has no ONNX definition, so a packed nmfx inference model cannot be exported to "
                "ONNX: export the dense copy instead, torch.onnx.export(nmfx.to_dense(model), ...), whose weights "
                "hold the N:M zeros")


def _nm_linear_fake(x, values, indices, bias, n, m, index_bits):
    if torch.onnx.is_in_onnx_export():  # the dynamo exporter traces through the fake
        raise ValueError(ONNX_REFUSAL)
    out, _, _ = check_nm_linear_args(x, values, indices, bias, n, m, index_bits)
    return x.new_empty((*x.shape[:-1], out))


def _no_backward(ctx, grad):
    raise RuntimeError(
        "nmfx::nm_linear has no backward: it is an inference op (nmfx.to_inference freezes the model). "
        "Train the sparsified model (nmfx.sparsify) and call to_inference afterwards."
    )


_IMPLEMENTATIONS = {"nm_linear": _nm_linear_any_device, "_nm_linear_python": _nm_linear_any_device,
                    "nm_linear_reference": nm_linear_reference}
for _name, _impl in _IMPLEMENTATIONS.items():
    _lib.impl(_name, _impl, "CompositeExplicitAutograd")
    torch.library.register_fake(f"nmfx::{_name}", _nm_linear_fake, lib=_lib)
    # A backward through the result raises (instead of gradients silently stopping here). Once the
    # C++ library is loaded, CPU tensors use its C++ equivalent (AutogradCPU, nm_linear_cpu.cpp).
    torch.library.register_autograd(f"nmfx::{_name}", _no_backward, lib=_lib)
_lib.impl("nm_linear", _nm_linear_cuda, "CUDA")

#: The op a packed layer calls for its ``backend``: "auto" = the kernel registered for the tensors'
#: device, "reference" = the plain-torch oracle on every device.
OP_FOR_BACKEND = {"auto": torch.ops.nmfx.nm_linear.default, "reference": torch.ops.nmfx.nm_linear_reference.default}


def nm_linear(x: torch.Tensor, values: torch.Tensor, indices: torch.Tensor, bias: Optional[torch.Tensor],
              n: int, m: int, index_bits: int) -> torch.Tensor:
    """``x @ W.T + bias`` for a packed N:M weight: calls ``torch.ops.nmfx.nm_linear`` (see the module
    docstring for the argument layout and which kernel runs)."""
    return torch.ops.nmfx.nm_linear.default(x, values, indices, bias, n, m, index_bits)


def nm_linear_packed(x: torch.Tensor, packed: PackedNMWeight, bias: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Convenience wrapper: ``torch.ops.nmfx.nm_linear`` on a :class:`PackedNMWeight` (bit-packed indices)."""
    return nm_linear(x, packed.values, packed.indices, bias, packed.pattern.n, packed.pattern.m, packed.index_bits)


def _refuse_onnx(g, *args):  # the TorchScript ONNX exporter's symbolic for nmfx::nm_linear
    raise ValueError(ONNX_REFUSAL)


_register_symbolic = getattr(torch.onnx, "register_custom_op_symbolic", None)  # absent once torch drops the exporter
if _register_symbolic is not None:
    _register_symbolic("nmfx::nm_linear", _refuse_onnx, 9)  # opset 9 and every later one
