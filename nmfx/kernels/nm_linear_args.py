"""The argument contract of ``nmfx::nm_linear``, shared by the op and every kernel that implements it.

The packed arguments, in order: ``x`` ``[..., in]`` (float32 / bfloat16 / float16), ``values``
``[out, K]`` in x's dtype (``K = in / M * N``), ``indices`` uint8 (``index_bits = 8``: one in-group
position per byte, ``[out, K]``; ``index_bits = ceil(log2 M)``: bit-packed rows ``[out, ceil(K*b/8)]``),
``bias`` ``[out]`` in x's dtype or None, ``n``, ``m`` (``1 <= N <= M <= 32``) and ``index_bits``.
"""

from __future__ import annotations

from typing import Optional

import torch

from nmfx.packed import MAX_PACKED_M, index_bits as packed_index_bits

__all__ = ["check_nm_linear_args", "DTYPES"]

DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def check_nm_linear_args(x: torch.Tensor, values: torch.Tensor, indices: torch.Tensor, bias: Optional[torch.Tensor],
                         n: int, m: int, index_bits: int) -> tuple[int, int, int]:
    """Validate ``nm_linear``'s arguments (a ValueError naming the problem); return ``(out, K, in)``.

    Shapes and dtypes only: whether every stored position is ``< M`` is data, checked by the kernels.
    """
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
    if x.dtype not in DTYPES or values.dtype != x.dtype:
        raise ValueError(f"nm_linear: x and values must share a float32/bfloat16/float16 dtype, got {x.dtype}, {values.dtype}")
    if index_bits == 8:
        want = (out, k)
    elif index_bits == packed_index_bits(m):
        want = (out, (k * index_bits + 7) // 8)
    else:
        raise ValueError(f"nm_linear: index_bits must be 8 or {packed_index_bits(m)} for M={m}, got {index_bits}")
    if indices.dtype != torch.uint8 or tuple(indices.shape) != want:
        raise ValueError(
            f"nm_linear: indices must be uint8 {want} for index_bits={index_bits}, got {indices.dtype} {tuple(indices.shape)}"
        )
    if bias is not None and (tuple(bias.shape) != (out,) or bias.dtype != x.dtype):
        raise ValueError(f"nm_linear: bias must be {x.dtype} [{out}], got {bias.dtype} {tuple(bias.shape)}")
    return out, k, inp
