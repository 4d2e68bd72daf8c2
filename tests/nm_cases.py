"""Shared test inputs for the nm_linear kernels (C++ and Triton): a random N:M layer, packed."""

import torch

from nmfx.packed import pack_nm
from nmfx.pattern import Pattern


def random_case(pattern, dtype, batch_shape, inp_groups, out, seed, with_bias, device="cpu"):
    """(pattern, packed weight, x, bias) for an ``out x inp_groups*M`` layer, seeded, on ``device``."""
    p = Pattern.parse(pattern)
    g = torch.Generator().manual_seed(seed)
    inp = inp_groups * p.m
    w = torch.randn(out, inp, generator=g).to(dtype)
    x = torch.randn(*batch_shape, inp, generator=g).to(dtype)
    b = torch.randn(out, generator=g).to(dtype) if with_bias else None
    packed = pack_nm(w, p)
    if device != "cpu":
        packed, x = packed.to(device), x.to(device)
        b = None if b is None else b.to(device)
    return p, packed, x, b


#: Unit roundoff of each output dtype.
UNIT_ROUNDOFF = {torch.float32: 2.0**-24, torch.bfloat16: 2.0**-8, torch.float16: 2.0**-11}


def fp64_tolerance(dtype: torch.dtype, kept: int, scale: torch.Tensor) -> torch.Tensor:
    """The bound every kernel must meet against the fp64 result, elementwise: (2 u(dtype) + K u(fp32)) times
    ``scale`` = |x| @ |W|^T + |b|, plus half the dtype's subnormal spacing (the one rounding of a result too
    small for the relative term: an fp16 output near 1e-6 carries an absolute error up to 3e-8)."""
    subnormal_half_spacing = torch.finfo(dtype).smallest_normal * torch.finfo(dtype).eps / 2
    return (2 * UNIT_ROUNDOFF[dtype] + kept * 2.0**-23) * scale + 1e-30 + subnormal_half_spacing
