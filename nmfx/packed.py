"""The packed N:M weight format: kept values plus bit-packed in-group positions.

``pack_nm(weight, pattern)`` turns a dense ``[out, in]`` weight (and an optional N:M mask) into a
:class:`PackedNMWeight`; ``PackedNMWeight.unpack()`` gives back the dense masked weight, exactly.
Groups always run along the input dimension (the last dim of an ``[out, in]`` weight); a weight
stored ``[in, out]`` is transposed by its caller first.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

import torch

from nmfx.pattern import Pattern, PatternLike, nm_mask

__all__ = ["PackedNMWeight", "pack_nm", "index_bits", "pack_positions", "unpack_positions", "MAX_PACKED_M"]

#: Largest group size the packed format stores (positions fit in at most 5 bits).
MAX_PACKED_M = 32

_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def index_bits(m: int) -> int:
    """Bits per stored position for group size ``m``: ``ceil(log2(m))``, at least 1.

    1 for M=2, 2 for M=3..4, 3 for M=5..8, 4 for M=9..16, 5 for M=17..32. A non-power-of-two M
    wastes part of its code space (M=6 uses 3 bits for 6 codes); power-of-two M packs densest.
    """
    if not (1 <= m <= MAX_PACKED_M):
        raise ValueError(f"the packed N:M format supports 1 <= M <= {MAX_PACKED_M}, got M={m}")
    return max(1, (m - 1).bit_length())


def pack_positions(positions: torch.Tensor, bits: int) -> torch.Tensor:
    """Bit-pack ``positions`` (uint8 ``[rows, K]``, each value < 2**bits) row by row.

    Returns uint8 ``[rows, ceil(K * bits / 8)]``: each row is an independent little-endian bit stream;
    the position of element ``k`` occupies stream bits ``[k*bits, (k+1)*bits)``, least significant
    bit first, where stream bit ``i`` is bit ``i % 8`` of byte ``i // 8``. Pad bits are zero.
    """
    rows, k = positions.shape
    row_bytes = (k * bits + 7) // 8
    shifts = torch.arange(bits, device=positions.device, dtype=torch.uint8)
    stream = (positions.unsqueeze(-1) >> shifts) & 1  # [rows, K, bits], LSB first
    stream = stream.reshape(rows, k * bits)
    pad = row_bytes * 8 - k * bits
    if pad:
        stream = torch.nn.functional.pad(stream, (0, pad))
    weights = torch.arange(8, device=positions.device, dtype=torch.uint8)
    return (stream.reshape(rows, row_bytes, 8) << weights).sum(dim=-1, dtype=torch.uint8)


def unpack_positions(packed: torch.Tensor, bits: int, k: int) -> torch.Tensor:
    """Inverse of :func:`pack_positions`: uint8 ``[rows, row_bytes]`` -> uint8 ``[rows, K]``."""
    rows = packed.shape[0]
    shifts = torch.arange(8, device=packed.device, dtype=torch.uint8)
    stream = ((packed.unsqueeze(-1) >> shifts) & 1).reshape(rows, -1)[:, : k * bits]
    weights = torch.arange(bits, device=packed.device, dtype=torch.uint8)
    return (stream.reshape(rows, k, bits) << weights).sum(dim=-1, dtype=torch.uint8)


@dataclass(frozen=True, eq=False)
class PackedNMWeight:
    """An N:M-sparse ``[out, in]`` weight stored as kept values plus bit-packed in-group positions.

    With ``K = in * N / M`` kept values per output row and ``b = index_bits(M) = max(1, ceil(log2 M))``:

    ``values``: ``[out, K]``, the weight's dtype (float32, float16 or bfloat16), row-major contiguous.
        Row ``o`` holds the kept weights of output ``o``, group after group (group ``g`` covers input
        columns ``[g*M, (g+1)*M)``), and within a group in increasing column order. Kept value ``k``
        therefore belongs to group ``k // N``.

    ``indices``: uint8 ``[out, ceil(K * b / 8)]``, contiguous. Row ``o`` is an independent
        little-endian bit stream: the in-group position ``p`` (``0 <= p < M``) of ``values[o, k]``
        occupies stream bits ``[k*b, (k+1)*b)``, least significant bit first, and stream bit ``i`` is
        bit ``i % 8`` of byte ``i // 8``. The pad bits at the end of a row are zero. So the dense column
        of ``values[o, k]`` is ``(k // N) * M + p``. Example, 1:8 (``b = 3``): positions
        ``[5, 0, 7, 2, ...]`` of a row start with bytes ``0b11_000_101`` (5, 0, low two bits of 7) and
        ``0b..._010_1`` (high bit of 7, then 2), bits read right to left. M=2/4/8/16/32 use 1/2/3/4/5 bits; a non-power-of-two M (say 6) still uses
        ``ceil(log2 M)`` bits (3) and leaves codes ``>= M`` unused.

    ``pattern``, ``shape`` (``(out, in)``) and ``dtype`` describe the dense weight.

    That is the stored / serialized format (:meth:`to_dict` / :meth:`from_dict`; all plain tensors, so
    it goes through ``safetensors``). Total bytes: ``out*K*itemsize + out*ceil(K*b/8)`` (:attr:`nbytes`),
    e.g. 4096x4096 1:8 fp32: 8 MiB of values + 0.75 MiB of indices.

    The C++ CPU kernel (``nmfx::nm_linear``) reads ``values`` as they are and either ``indices``
    directly (``index_bits=b``) or the byte-per-position layout :meth:`positions` (uint8 ``[out, K]``,
    ``index_bits=8``); see ``nmfx.inference_ops``.
    """

    values: torch.Tensor
    indices: torch.Tensor
    pattern: Pattern
    shape: tuple
    dtype: torch.dtype
    _positions: Optional[torch.Tensor] = field(default=None, repr=False, compare=False)

    def __post_init__(self) -> None:
        pattern = Pattern.parse(self.pattern)
        object.__setattr__(self, "pattern", pattern)
        object.__setattr__(self, "shape", tuple(int(s) for s in self.shape))
        bits = index_bits(pattern.m)
        if len(self.shape) != 2:
            raise ValueError(f"PackedNMWeight.shape must be (out, in), got {self.shape}")
        out, inp = self.shape
        if inp % pattern.m:
            raise ValueError(f"in={inp} is not divisible by M={pattern.m} (pattern {pattern})")
        k = inp // pattern.m * pattern.n
        if self.dtype not in _DTYPES:
            raise ValueError(f"unsupported dtype {self.dtype}; the packed format holds float32, float16, bfloat16")
        if self.values.dtype != self.dtype or tuple(self.values.shape) != (out, k):
            raise ValueError(
                f"values must be {self.dtype} of shape {(out, k)} for a {self.shape} {pattern} weight, "
                f"got {self.values.dtype} {tuple(self.values.shape)}"
            )
        row_bytes = (k * bits + 7) // 8
        if self.indices.dtype != torch.uint8 or tuple(self.indices.shape) != (out, row_bytes):
            raise ValueError(
                f"indices must be uint8 of shape {(out, row_bytes)} ({bits}-bit positions, {k} per row), "
                f"got {self.indices.dtype} {tuple(self.indices.shape)}"
            )

    @property
    def index_bits(self) -> int:
        """Bits per stored position, ``max(1, ceil(log2 M))``."""
        return index_bits(self.pattern.m)

    @property
    def kept_per_row(self) -> int:
        """``K = in * N / M``."""
        return self.shape[1] // self.pattern.m * self.pattern.n

    @property
    def nbytes(self) -> int:
        """Bytes of the stored format (values + bit-packed indices), excluding any cached decode."""
        return self.values.numel() * self.values.element_size() + self.indices.numel()

    def positions(self) -> torch.Tensor:
        """In-group positions, one uint8 per kept value, ``[out, K]`` (decoded once, then cached)."""
        if self._positions is None:
            pos = unpack_positions(self.indices, self.index_bits, self.kept_per_row).contiguous()
            object.__setattr__(self, "_positions", pos)
        return self._positions

    def columns(self) -> torch.Tensor:
        """Dense input column of every kept value, int64 ``[out, K]``."""
        n, m = self.pattern.n, self.pattern.m
        k = torch.arange(self.kept_per_row, device=self.values.device)
        return (k // n * m).unsqueeze(0) + self.positions().long()

    def unpack(self) -> torch.Tensor:
        """The dense masked weight ``[out, in]``: ``torch.where(mask, weight, 0)`` of what was packed."""
        out, inp = self.shape
        dense = torch.zeros(out, inp, dtype=self.dtype, device=self.values.device)
        return dense.scatter_(1, self.columns(), self.values)

    def mask(self) -> torch.Tensor:
        """The boolean N:M mask ``[out, in]``."""
        out, inp = self.shape
        mask = torch.zeros(out, inp, dtype=torch.bool, device=self.values.device)
        return mask.scatter_(1, self.columns(), True)

    def to(self, device) -> "PackedNMWeight":
        return PackedNMWeight(self.values.to(device), self.indices.to(device), self.pattern, self.shape, self.dtype)

    def to_dict(self) -> dict:
        """Plain tensors plus JSON-able metadata (for safetensors / state_dict)."""
        return {
            "values": self.values,
            "indices": self.indices,
            "pattern": str(self.pattern),
            "shape": list(self.shape),
            "dtype": str(self.dtype).removeprefix("torch."),
            "format": "nmfx.packed_nm/1",
        }

    @classmethod
    def from_dict(cls, d: dict) -> "PackedNMWeight":
        if d.get("format", "nmfx.packed_nm/1") != "nmfx.packed_nm/1":
            raise ValueError(f"unknown packed format {d.get('format')!r}")
        return cls(d["values"], d["indices"], Pattern.parse(d["pattern"]), tuple(d["shape"]), getattr(torch, d["dtype"]))

    def __repr__(self) -> str:
        return (
            f"PackedNMWeight(shape={self.shape}, pattern={self.pattern}, dtype={self.dtype}, "
            f"index_bits={self.index_bits}, nbytes={self.nbytes})"
        )


def _positions_from_mask(mask: torch.Tensor, pattern: Pattern) -> torch.Tensor:
    """uint8 [out, K] in-group positions of the kept elements, validating exactly N per group."""
    n, m = pattern.n, pattern.m
    out, inp = mask.shape
    groups = mask.reshape(out, inp // m, m)
    counts = groups.sum(dim=-1)
    bad = counts != n
    if bool(bad.any()):
        row, group = (int(i) for i in bad.nonzero()[0])
        nbad = int(bad.sum())
        raise ValueError(
            f"mask is not a valid {pattern} mask: {nbad} group(s) along the input dim do not keep exactly "
            f"N={n} of M={m}; first: row {row}, group {group} (columns {group * m}..{group * m + m - 1}) "
            f"keeps {int(counts[row, group])}"
        )
    # Stable descending sort of the 0/1 mask puts the kept positions first, in increasing order.
    order = torch.sort(groups.to(torch.uint8), dim=-1, descending=True, stable=True).indices[..., :n]
    return order.reshape(out, inp // m * n).to(torch.uint8)


def pack_nm(weight: torch.Tensor, pattern: PatternLike, mask: Optional[torch.Tensor] = None) -> PackedNMWeight:
    """Pack a dense ``[out, in]`` weight into the N:M packed format (groups along ``in``).

    ``mask`` defaults to ``nm_mask(weight, pattern, dim=-1)`` (largest magnitudes). A given mask must
    keep exactly N of every M consecutive inputs of every row, else ``ValueError``. Exact:
    ``pack_nm(w, p, mask).unpack()`` equals ``torch.where(mask, w, 0)`` bit for bit. Supports
    ``M <= 32`` and float32 / float16 / bfloat16.
    """
    pattern = Pattern.parse(pattern)
    if not isinstance(weight, torch.Tensor):
        raise TypeError(f"pack_nm expects a torch.Tensor weight, got {type(weight).__name__}")
    if weight.dim() != 2:
        raise ValueError(f"pack_nm expects a 2-D [out, in] weight, got shape {tuple(weight.shape)}")
    if pattern.m > MAX_PACKED_M:
        raise ValueError(f"the packed N:M format supports M <= {MAX_PACKED_M}, got pattern {pattern}")
    if weight.dtype not in _DTYPES:
        raise ValueError(f"pack_nm supports float32, float16, bfloat16 weights, got {weight.dtype}")
    out, inp = weight.shape
    if inp % pattern.m:
        raise ValueError(
            f"cannot pack a weight of shape {tuple(weight.shape)} as {pattern}: in={inp} is not divisible by M={pattern.m}"
        )
    weight = weight.detach()
    if mask is None:
        mask = nm_mask(weight, pattern, dim=-1)
    else:
        if not isinstance(mask, torch.Tensor) or tuple(mask.shape) != tuple(weight.shape):
            got = tuple(mask.shape) if isinstance(mask, torch.Tensor) else type(mask).__name__
            raise ValueError(f"mask must have the weight's shape {tuple(weight.shape)}, got {got}")
        mask = mask.detach().to(device=weight.device, dtype=torch.bool)
    positions = _positions_from_mask(mask, pattern)
    k = inp // pattern.m * pattern.n
    base = torch.arange(k, device=weight.device) // pattern.n * pattern.m
    values = weight.gather(1, base.unsqueeze(0) + positions.long()).contiguous()
    bits = index_bits(pattern.m)
    indices = pack_positions(positions, bits).contiguous()
    packed = PackedNMWeight(values, indices, pattern, (out, inp), weight.dtype)
    object.__setattr__(packed, "_positions", positions.contiguous())
    return packed
