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
