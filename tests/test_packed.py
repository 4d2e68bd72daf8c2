"""The packed N:M format: exact round trips, the documented byte layout, and clear errors."""

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from nmfx.packed import (
    MAX_PACKED_M,
    PackedNMWeight,
    index_bits,
    pack_nm,
    pack_positions,
    unpack_positions,
)
from nmfx.pattern import Pattern, nm_mask

PATTERNS = ["1:2", "2:4", "1:4", "2:8", "1:8", "3:8", "1:16", "1:32", "1:3", "2:6", "5:32", "4:4", "1:1"]
DTYPES = [torch.float32, torch.float16, torch.bfloat16]
_INT_VIEW = {torch.float32: torch.int32, torch.float16: torch.int16, torch.bfloat16: torch.int16}


def _bits_equal(a: torch.Tensor, b: torch.Tensor) -> bool:
    return a.dtype == b.dtype and a.shape == b.shape and torch.equal(a.view(_INT_VIEW[a.dtype]), b.view(_INT_VIEW[b.dtype]))


def _random_mask(out: int, inp: int, pattern: Pattern, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return nm_mask(torch.rand(out, inp, generator=g), pattern)


@settings(max_examples=60, deadline=None)
@given(
    pattern=st.sampled_from(PATTERNS),
    dtype=st.sampled_from(DTYPES),
    out=st.integers(1, 9),
    groups=st.integers(1, 7),
    seed=st.integers(0, 2**31 - 1),
    given_mask=st.booleans(),
)
def test_round_trip_is_exact(pattern, dtype, out, groups, seed, given_mask):
    p = Pattern.parse(pattern)
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(out, groups * p.m, generator=g).to(dtype)
    mask = _random_mask(out, groups * p.m, p, seed) if given_mask else nm_mask(w, p)
    packed = pack_nm(w, p, mask if given_mask else None)
    dense = packed.unpack()
    assert torch.equal(dense, w * mask)  # as the brief states it (-0.0 == 0.0 under torch.equal)
    assert _bits_equal(dense, torch.where(mask, w, torch.zeros((), dtype=dtype)))  # and bit for bit
    assert torch.equal(packed.mask(), mask)
    k = groups * p.n
    assert packed.values.shape == (out, k) and packed.values.dtype == dtype
    assert packed.indices.shape == (out, (k * index_bits(p.m) + 7) // 8) and packed.indices.dtype == torch.uint8
    assert packed.nbytes == out * k * w.element_size() + packed.indices.numel()
    # decoding the stored bits (not the cached positions) gives the same weight
    fresh = PackedNMWeight(packed.values, packed.indices, p, packed.shape, dtype)
    assert torch.equal(fresh.positions(), packed.positions())
    assert _bits_equal(fresh.unpack(), dense)


def test_special_values_survive_bitwise():
    w = torch.tensor([[-0.0, 1.0, float("inf"), -2.0, float("nan"), 0.5, -float("inf"), 3.0]])
    mask = torch.tensor([[True, False, True, False, True, False, True, False]])
    dense = pack_nm(w, "1:2", mask).unpack()
    assert _bits_equal(dense, torch.where(mask, w, torch.zeros(())))
    assert torch.signbit(dense[0, 0])  # a kept -0.0 stays -0.0


@pytest.mark.parametrize("m,bits", [(1, 1), (2, 1), (3, 2), (4, 2), (5, 3), (6, 3), (8, 3), (9, 4), (16, 4), (17, 5), (32, 5)])
def test_index_bits(m, bits):
    assert index_bits(m) == bits


@given(bits=st.integers(1, 5), rows=st.integers(1, 4), k=st.integers(0, 40), seed=st.integers(0, 1000))
@settings(max_examples=40, deadline=None)
def test_position_bitstream_round_trip(bits, rows, k, seed):
    g = torch.Generator().manual_seed(seed)
    pos = torch.randint(0, 2**bits, (rows, k), generator=g, dtype=torch.uint8)
    packed = pack_positions(pos, bits)
    assert packed.shape == (rows, (k * bits + 7) // 8)
    assert torch.equal(unpack_positions(packed, bits, k), pos)


def test_documented_byte_layout():
    # 1:8 -> 3 bits; positions 5, 0, 7, 2: byte 0 = 0b11_000_101, byte 1 = 0b0000_010_1 (LSB first)
    pos = torch.tensor([[5, 0, 7, 2, 0, 0, 0, 0]], dtype=torch.uint8)
    assert pack_positions(pos, 3).tolist() == [[0b11000101, 0b00000101, 0]]
    w = torch.zeros(1, 64)
    w[0, [5, 8, 23, 26]] = torch.tensor([1.0, 2.0, 3.0, 4.0])
    w[0, 32::8] = 9.0  # groups 4..7 keep position 0
    packed = pack_nm(w, "1:8")
    assert packed.indices.tolist() == [[0b11000101, 0b00000101, 0]]
    assert packed.values[0, :4].tolist() == [1.0, 2.0, 3.0, 4.0]


def test_dict_round_trip():
    w = torch.randn(6, 24, dtype=torch.bfloat16)
    packed = pack_nm(w, "2:6")
    again = PackedNMWeight.from_dict(packed.to_dict())
    assert again.pattern == packed.pattern and again.shape == packed.shape and again.dtype == packed.dtype
    assert torch.equal(again.unpack(), packed.unpack())


def test_error_m_too_large():
    with pytest.raises(ValueError, match="M <= 32"):
        pack_nm(torch.randn(2, 64), "1:64")
    assert MAX_PACKED_M == 32


def test_error_mask_counts():
    w = torch.randn(3, 16)
    mask = nm_mask(w, "2:8")
    mask[1, 9] = ~mask[1, 9]  # row 1, group 1 now keeps 1 or 3
    with pytest.raises(ValueError, match=r"exactly N=2 of M=8; first: row 1, group 1"):
        pack_nm(w, "2:8", mask)


def test_error_shapes_and_dtypes():
    with pytest.raises(ValueError, match="not divisible by M=8"):
        pack_nm(torch.randn(2, 12), "1:8")
    with pytest.raises(ValueError, match="mask must have the weight's shape"):
        pack_nm(torch.randn(2, 16), "1:8", torch.ones(2, 8, dtype=torch.bool))
    with pytest.raises(ValueError, match="2-D"):
        pack_nm(torch.randn(2, 3, 16), "1:8")
    with pytest.raises(ValueError, match="float32, float16, bfloat16"):
        pack_nm(torch.randn(2, 16, dtype=torch.float64), "1:8")
    packed = pack_nm(torch.randn(2, 16), "1:8")
    with pytest.raises(ValueError, match="indices must be uint8"):
        PackedNMWeight(packed.values, packed.indices[:, :0], packed.pattern, packed.shape, packed.dtype)
    with pytest.raises(ValueError, match="values must be"):
        PackedNMWeight(packed.values[:1], packed.indices, packed.pattern, packed.shape, packed.dtype)
