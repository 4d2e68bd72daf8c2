"""N:M sparsity patterns and the N:M mask.

An N:M pattern keeps ``N`` elements out of every group of ``M`` consecutive elements along one
dimension of a weight (for a linear layer, the input / reduction dimension).
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from typing import Union

import torch

__all__ = ["Pattern", "PatternLike", "nm_mask", "MAX_M"]

#: Largest group size a mask may use. SDGF's geometric schedule passes through 8:64 on its way to
#: 1:8 (and 8:128 on its way to 1:16), so masks need more than the packed format's M <= 32.
MAX_M = 256

_PATTERN_RE = re.compile(r"^\s*(\d+)\s*:\s*(\d+)\s*$")
_EXPECTED = "expected 'N:M' with integers 1 <= N <= M <= 256, e.g. '1:8' or '2:4'"


@dataclass(frozen=True, order=True)
class Pattern:
    """An N:M pattern: ``n`` kept out of every group of ``m`` consecutive elements."""

    n: int
    m: int

    def __post_init__(self) -> None:
        for name, value in (("n", self.n), ("m", self.m)):
            if isinstance(value, bool) or not isinstance(value, int):
                raise ValueError(f"invalid N:M pattern: {name}={value!r} is not an integer; {_EXPECTED}")
        if not (1 <= self.m <= MAX_M):
            raise ValueError(f"invalid N:M pattern {self.n}:{self.m}: M={self.m} is out of range; {_EXPECTED}")
        if not (1 <= self.n <= self.m):
            raise ValueError(f"invalid N:M pattern {self.n}:{self.m}: N={self.n} is out of range; {_EXPECTED}")

    @classmethod
    def parse(cls, value: "PatternLike") -> "Pattern":
        """Parse ``"1:8"`` (spaces allowed), an ``(n, m)`` tuple, or return a Pattern unchanged."""
        if isinstance(value, Pattern):
            return value
        if isinstance(value, tuple) and len(value) == 2:
            return cls(*value)
        if isinstance(value, str):
            match = _PATTERN_RE.match(value)
            if match is None:
                raise ValueError(f"invalid N:M pattern {value!r}: {_EXPECTED}")
            return cls(int(match.group(1)), int(match.group(2)))
        raise ValueError(f"invalid N:M pattern {value!r} of type {type(value).__name__}: {_EXPECTED}")

    def __str__(self) -> str:
        return f"{self.n}:{self.m}"

    @property
    def density(self) -> float:
        """Fraction of elements kept, ``n / m``."""
        return self.n / self.m

    @property
    def sparsity(self) -> float:
        """Fraction of elements pruned, ``1 - n / m``."""
        return 1.0 - self.n / self.m

    @property
    def is_dense(self) -> bool:
        return self.n == self.m

    @property
    def is_2to4_compatible(self) -> bool:
        """True when every aligned group of 4 elements holds at most 2 kept elements, whatever the
        weights: then a mask of this pattern is also a valid 2:4 mask (1:8, 2:8, 1:16, ... but not 3:8)."""
        period = math.lcm(4, self.m)
        for window_start in range(0, period, 4):
            window = range(window_start, window_start + 4)
            worst = 0
            for group_start in range((window_start // self.m) * self.m, window_start + 4, self.m):
                overlap = len(set(window) & set(range(group_start, group_start + self.m)))
                worst += min(self.n, overlap)
            if worst > 2:
                return False
        return True


PatternLike = Union[Pattern, str, "tuple[int, int]"]


def nm_mask(weight: torch.Tensor, pattern: PatternLike, dim: int = -1) -> torch.Tensor:
    """Boolean N:M mask of ``weight``'s shape.

    Groups are ``M`` consecutive elements along ``dim``; each keeps exactly ``N`` elements, those of
    largest magnitude. Ties go to the lower index; NaN counts as smaller than every number (and never
    changes how many are kept); an all-zero group still keeps ``N``. On the CPU a C++ kernel reads each
    group once (:mod:`nmfx.kernels.cpu`) when it is already built: a mask never starts the minute-long
    compile, which happens at ``to_inference`` or the first inference call instead; elsewhere, plain
    torch (the same mask): ``N = 1`` is one argmax, ``N = 2`` two, larger ``N`` a stable sort within each group.
    """
    pattern = Pattern.parse(pattern)
    if not isinstance(weight, torch.Tensor):
        raise TypeError(f"nm_mask expects a torch.Tensor, got {type(weight).__name__}")
    if weight.dim() == 0:
        raise ValueError("nm_mask needs a tensor with at least one dimension, got a scalar")
    dim = dim % weight.dim()
    size = weight.shape[dim]
    if size % pattern.m != 0:
        raise ValueError(
            f"cannot apply N:M pattern {pattern} to a weight of shape {tuple(weight.shape)}: dimension {dim} "
            f"has size {size}, which is not divisible by M={pattern.m}"
        )
    if pattern.is_dense:
        return torch.ones_like(weight, dtype=torch.bool)
    moved = weight.detach().movedim(dim, -1)
    if _cpu_kernel_applies(moved):
        from nmfx.kernels import cpu  # kernels are imported when first used, never when nmfx is imported

        keep = cpu.nm_mask(moved, pattern.n, pattern.m)
    else:
        keep = _nm_mask_torch(moved, pattern.n, pattern.m)
    return keep.movedim(-1, dim).contiguous()


_CPU_KERNEL_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def _cpu_kernel_applies(t: torch.Tensor) -> bool:
    """The one-pass C++ kernel serves plain CPU tensors outside compilation (fake and other tensor
    subclasses, CUDA tensors and float64 take the plain-torch path), once it is built (a verified
    library in the cache is loaded; a missing one is not compiled here, in the middle of training setup)."""
    if not (t.device.type == "cpu" and t.dtype in _CPU_KERNEL_DTYPES and type(t) is torch.Tensor
            and not torch.compiler.is_compiling()):
        return False
    from nmfx.kernels import cpu

    return cpu.cached() and cpu.load() is not None


def _nm_mask_torch(moved: torch.Tensor, n: int, m: int) -> torch.Tensor:
    """nm_mask along the last dimension in plain torch (any device): N = 1 is one argmax, N = 2 two,
    larger N a stable sort within each group."""
    size = moved.shape[-1]
    # |w| (our own temporary, modified in place below) with NaN mapped below every magnitude.
    # Written contiguous in the moved layout, so the group reductions below run over unit stride.
    score = torch.abs(moved, out=torch.empty(moved.shape, dtype=moved.dtype, device=moved.device))
    if score.isnan().any():
        score.nan_to_num_(nan=-1.0, posinf=float("inf"))
    groups = score.reshape(*moved.shape[:-1], size // m, m)
    positions = torch.arange(m, device=moved.device)
    if n == 1:
        keep = positions == groups.argmax(dim=-1, keepdim=True)
    elif n == 2:
        first = groups.argmax(dim=-1, keepdim=True)
        second = groups.scatter_(-1, first, -2.0).argmax(dim=-1, keepdim=True)
        keep = (positions == first) | (positions == second)
    else:
        order = torch.sort(groups, dim=-1, descending=True, stable=True).indices[..., :n]
        keep = torch.zeros(groups.shape, dtype=torch.bool, device=moved.device).scatter_(-1, order, True)
    return keep.reshape(moved.shape)
