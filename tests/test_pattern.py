"""Pattern parsing/validation and nm_mask invariants (hypothesis)."""

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from nmfx import Pattern, nm_mask
from nmfx.kernels import cpu as cpu_kernel
from nmfx.pattern import _nm_mask_torch

PATTERNS = [(1, 2), (2, 4), (1, 4), (3, 4), (2, 8), (1, 8), (3, 8), (7, 8), (1, 16), (5, 16), (1, 32), (8, 64), (127, 128)]


@st.composite
def weights_and_patterns(draw, dtypes=(torch.float32,)):
    n, m = draw(st.sampled_from(PATTERNS))
    rows = draw(st.integers(1, 5))
    groups = draw(st.integers(1, 4))
    dtype = draw(st.sampled_from(dtypes))
    # Few distinct values, so ties are common.
    values = draw(st.lists(st.sampled_from([0.0, 1.0, -1.0, 2.0, -3.0, 0.5, float("nan")]),
                           min_size=rows * groups * m, max_size=rows * groups * m))
    return torch.tensor(values, dtype=dtype).reshape(rows, groups * m), Pattern(n, m)


def _reference_mask(w: torch.Tensor, pattern: Pattern) -> torch.Tensor:
    """Obvious per-group implementation: sort by (-|w| with NaN lowest, index)."""
    out = torch.zeros(w.shape, dtype=torch.bool)
    for r in range(w.shape[0]):
        for g in range(w.shape[1] // pattern.m):
            vals = [(float(w[r, g * pattern.m + i].abs()), i) for i in range(pattern.m)]
            key = lambda vi: (-(vi[0] if not math.isnan(vi[0]) else -1.0), vi[1])
            for _, i in sorted(vals, key=key)[: pattern.n]:
                out[r, g * pattern.m + i] = True
    return out


class TestPattern:
    @pytest.mark.parametrize("text,n,m", [("1:8", 1, 8), (" 2:4 ", 2, 4), ("16:32", 16, 32), ("1 : 256", 1, 256)])
    def test_parse(self, text, n, m):
        p = Pattern.parse(text)
        assert (p.n, p.m) == (n, m) and str(p) == f"{n}:{m}"

    def test_parse_accepts_pattern_and_tuple(self):
        p = Pattern(1, 8)
        assert Pattern.parse(p) is p and Pattern.parse((1, 8)) == p

    @pytest.mark.parametrize("bad", ["0:4", "5:4", "1:0", "a:b", "1/8", "", "1.5:4", "1:8:2", "1:257", "-1:4", None, 3, (1, 2, 3), (True, 4)])
    def test_invalid_raises_with_value_and_expected_form(self, bad):
        with pytest.raises(ValueError) as info:
            Pattern.parse(bad)
        msg = str(info.value)
        assert "N:M" in msg and ("expected" in msg)

    @pytest.mark.parametrize("text,density", [("1:8", 0.125), ("2:4", 0.5), ("1:32", 1 / 32)])
    def test_density(self, text, density):
        assert Pattern.parse(text).density == density
        assert Pattern.parse(text).sparsity == 1 - density

    @pytest.mark.parametrize("text,ok", [("2:4", True), ("1:4", True), ("2:8", True), ("1:8", True), ("1:16", True),
                                         ("3:8", False), ("4:8", False), ("3:4", False), ("4:4", False), ("1:2", True),
                                         ("2:2", False), ("1:3", True), ("2:3", False)])
    def test_2to4_compatibility(self, text, ok):
        assert Pattern.parse(text).is_2to4_compatible is ok

    @settings(max_examples=60, deadline=None)
    @given(st.sampled_from(PATTERNS), st.integers(0, 2**16))
    def test_2to4_compatibility_matches_random_masks(self, nm, seed):
        """A compatible pattern never yields a mask with > 2 kept in an aligned group of 4."""
        p = Pattern(*nm)
        m_cols = math.lcm(4, p.m) * 2
        g = torch.Generator().manual_seed(seed)
        mask = nm_mask(torch.randn(8, m_cols, generator=g), p)
        worst = int(mask.reshape(8, -1, 4).sum(-1).max())
        if p.is_2to4_compatible:
            assert worst <= 2


class TestNMMask:
    @settings(max_examples=150, deadline=None)
    @given(weights_and_patterns(dtypes=(torch.float32, torch.float16, torch.bfloat16)))
    def test_matches_reference_with_ties_and_nan(self, case):
        w, p = case
        mask = nm_mask(w, p)
        assert mask.dtype == torch.bool and mask.shape == w.shape
        assert torch.equal(mask.reshape(w.shape[0], -1, p.m).sum(-1), torch.full((w.shape[0], w.shape[1] // p.m), p.n))
        expected = _reference_mask(w.float(), p)
        assert torch.equal(mask, expected)
        # Both implementations, whichever nm_mask picked: plain torch (CUDA, fallback) and the C++ kernel.
        assert torch.equal(_nm_mask_torch(w, p.n, p.m), expected)
        if cpu_kernel.available():
            assert torch.equal(cpu_kernel.nm_mask(w, p.n, p.m), expected)

    @settings(max_examples=60, deadline=None)
    @given(st.sampled_from(PATTERNS), st.integers(1, 4), st.integers(1, 3), st.integers(0, 2**16))
    def test_keeps_the_largest(self, nm, rows, groups, seed):
        p = Pattern(*nm)
        w = torch.randn(rows, groups * p.m, generator=torch.Generator().manual_seed(seed))
        mask = nm_mask(w, p).reshape(rows, groups, p.m)
        a = w.abs().reshape(rows, groups, p.m)
        kept_min = torch.where(mask, a, torch.inf).amin(-1)
        pruned_max = torch.where(~mask, a, -torch.inf).amax(-1)
        assert bool((kept_min >= pruned_max).all())

    @pytest.mark.parametrize("dim", [0, 1, -1, 2])
    def test_dim(self, dim):
        w = torch.randn(8, 16, 8)
        mask = nm_mask(w, "1:8", dim=dim)
        assert torch.equal(mask.sum(dim), torch.full([s for i, s in enumerate(w.shape) if i != dim % 3], w.shape[dim % 3] // 8))
        assert torch.equal(mask, nm_mask(w.movedim(dim, -1), "1:8").movedim(-1, dim))

    def test_all_zero_and_all_nan_groups_keep_n(self):
        w = torch.tensor([[0.0] * 8 + [float("nan")] * 8])
        for p in ["1:8", "2:8", "3:8"]:
            mask = nm_mask(w, p)
            assert mask.reshape(2, 8).sum(-1).tolist() == [int(p[0])] * 2
            assert mask.reshape(2, 8)[:, : int(p[0])].all()  # lower index wins

    def test_infinity_is_largest_and_nan_never(self):
        w = torch.tensor([[float("nan"), 1.0, float("-inf"), 2.0]])
        assert nm_mask(w, "1:4").tolist() == [[False, False, True, False]]
        assert nm_mask(w, "3:4").tolist() == [[False, True, True, True]]

    def test_dense_pattern_keeps_everything(self):
        assert nm_mask(torch.randn(3, 8), "8:8").all()

    def test_not_divisible_names_shape_and_pattern(self):
        with pytest.raises(ValueError, match=r"\(4, 12\).*1:8|1:8.*\(4, 12\)"):
            nm_mask(torch.randn(4, 12), "1:8")

    def test_bad_inputs(self):
        with pytest.raises(TypeError):
            nm_mask([1.0, 2.0], "1:2")
        with pytest.raises(ValueError):
            nm_mask(torch.tensor(1.0), "1:1")

    def test_cpu_kernel_serves_plain_cpu_tensors_only(self, monkeypatch):
        """The C++ kernel is used for plain CPU tensors (when built); float64 and a failed build take
        plain torch, with the same result."""
        import nmfx.pattern as pattern_module

        calls = []
        real = pattern_module._nm_mask_torch
        monkeypatch.setattr(pattern_module, "_nm_mask_torch", lambda *a: calls.append(a[0].dtype) or real(*a))
        w = torch.randn(4, 32)
        expected = _reference_mask(w, Pattern(2, 8))
        assert torch.equal(nm_mask(w.double(), "2:8"), expected) and calls == [torch.float64]
        assert torch.equal(nm_mask(w, "2:8"), expected)
        assert calls == ([torch.float64] if cpu_kernel.available() else [torch.float64, torch.float32])
        monkeypatch.setattr(cpu_kernel, "load", lambda: None)  # as if the build had failed
        assert torch.equal(nm_mask(w, "2:8"), expected) and calls[-1] == torch.float32

    def test_does_not_modify_weight(self):
        w = torch.tensor([[float("nan"), -1.0, 2.0, 0.0]])
        before = w.clone()
        nm_mask(w, "2:4")
        assert torch.equal(w.isnan(), before.isnan()) and torch.equal(w.nan_to_num(), before.nan_to_num())

    @pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
    @pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
    def test_cuda_matches_cpu(self, dtype):
        w = torch.randn(64, 256).to(dtype)
        for p in ["1:8", "2:8", "5:16"]:
            assert torch.equal(nm_mask(w.cuda(), p).cpu(), nm_mask(w, p))
