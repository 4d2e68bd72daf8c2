"""passes/rewrite_masked.py: masked_linear nodes computing exactly the masked original, checked by verify and
by count; and its install step keep_module_calls (module calls kept, then lowered by lower_inference)."""

from __future__ import annotations

import dataclasses

import pytest
import torch
import torch.nn.functional as F
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from torch import nn

import nmfx
from nmfx.meta import META_KEY, annotated_nodes
from nmfx.ops import masked_linear
from nmfx.passes.verify import InvariantError, verify
from nmfx.pattern import Pattern
from nmfx.state import NMState
from tests.passes_common import (traced, rewrite, masked_nodes, masked_reference, LinearModule, FunctionalLinear,
                                 FunctionalLinearBiasKwarg, Addmm, MatmulInOut, MatmulTransposed,
                                 TorchMatmulTranspose, IdentityPermuteMatmul, SDPAAttention,
                                 MatmulSoftmaxAttention, FusedQKV, PlainMLP, GatedMLP, Block,
                                 SharedWeight)

# ----------------------------------------------------------------------------------------------
# rewrite_masked
# ----------------------------------------------------------------------------------------------
EXACT_CASES = [LinearModule, FunctionalLinear, FunctionalLinearBiasKwarg, Addmm, MatmulInOut, MatmulTransposed,
               TorchMatmulTranspose, SDPAAttention, MatmulSoftmaxAttention, FusedQKV, PlainMLP, GatedMLP, Block]


class TestRewriteMasked:
    @pytest.mark.parametrize("module_cls", EXACT_CASES, ids=lambda c: c.__name__)
    @pytest.mark.parametrize("pattern", ["1:4", "2:4"])
    def test_exact_vs_masked_weights(self, module_cls, pattern):
        torch.manual_seed(0)
        module = module_cls().eval()
        n_prunable = len(annotated_nodes(traced(module).graph))
        gm = rewrite(module, pattern)
        verify(gm, rewritten=True)
        gm.graph.lint()
        assert len(masked_nodes(gm)) == n_prunable > 0
        assert all(META_KEY in n.meta and n.meta[META_KEY].status == "sparsified" for n in masked_nodes(gm))
        assert len(annotated_nodes(gm.graph)) == n_prunable  # the originals are gone
        ref = masked_reference(module, gm)
        for state in nmfx.states(gm).values():
            assert state.mask.float().mean().item() == pytest.approx(Pattern.parse(pattern).density)
        x = torch.randn(2, 3, 8)
        torch.testing.assert_close(gm(x), ref(x), atol=0, rtol=0)

    @pytest.mark.parametrize("module_cls", EXACT_CASES, ids=lambda c: c.__name__)
    def test_dense_pattern_is_identity(self, module_cls):
        torch.manual_seed(1)
        module = module_cls().eval()
        x = torch.randn(2, 3, 8)
        expected = module(x)
        gm = rewrite(module, "4:4")
        assert masked_nodes(gm)
        assert torch.equal(gm(x), expected)

    def test_identity_permute_rewrite_exact(self):
        torch.manual_seed(0)
        module = IdentityPermuteMatmul()
        x = torch.randn(3, 8)
        expected = module(x)
        gm = rewrite(module, "8:8")
        torch.testing.assert_close(gm(x), expected, atol=0, rtol=0)

    def test_one_state_for_a_weight_used_by_two_nodes(self):
        torch.manual_seed(0)
        module = SharedWeight()
        gm = rewrite(module, "2:4")
        verify(gm, rewritten=True)
        nodes = masked_nodes(gm)
        assert len(nodes) == 4
        states = [m for m in gm.modules() if isinstance(m, NMState)]
        assert len(states) == 2
        assert isinstance(gm.w_nm, NMState) and isinstance(gm.fc.weight_nm, NMState)
        mask_targets = sorted(n.args[2].target for n in nodes)
        assert mask_targets == ["fc.weight_nm.mask"] * 2 + ["w_nm.mask"] * 2
        ref = masked_reference(module, gm)
        x, y = torch.randn(3, 8), torch.randn(3, 8)
        torch.testing.assert_close(gm(x, y), ref(x, y), atol=0, rtol=0)

    def test_skipped_ops_untouched(self):
        module = Block()
        gm = rewrite(module, "2:4", exclude=("mlp.*",))
        kinds = {n.meta[META_KEY].weight: (n.target is masked_linear, n.meta[META_KEY].status)
                 for n in annotated_nodes(gm.graph)}
        assert kinds == {"attn.p1.weight": (True, "sparsified"), "attn.p2.weight": (True, "sparsified"),
                         "up.weight": (False, "skip"), "down.weight": (False, "skip"),
                         "cls.weight": (True, "sparsified")}  # not whole-model: cls is "other"
        assert not hasattr(gm.up, "weight_nm")

    def test_state_layout_follows_group_dim(self):
        gm = rewrite(Addmm(), "1:4")
        state = gm.w_nm
        assert state.dim == 0 and state.mask.shape == (8, 4)
        # each group of 4 along dim 0 (the input dim) keeps exactly one
        assert torch.equal(state.mask.reshape(2, 4, 4).sum(1), torch.ones(2, 4, dtype=torch.long))
        node = masked_nodes(gm)[0]
        assert node.kwargs["transposed"] is True

    def test_srste_reads_lambda_buffer(self):
        gm = rewrite(PlainMLP(), "2:4", method="srste")
        for node in masked_nodes(gm):
            assert node.args[5] is not None and node.args[5].target.endswith("_nm.srste_lambda")
        gm_ste = rewrite(PlainMLP(), "2:4", method="ste")
        assert all(n.args[5] is None for n in masked_nodes(gm_ste))

    def test_gradients_reach_dense_weights(self):
        torch.manual_seed(0)
        module = Block()
        gm = rewrite(module, "1:4")
        gm(torch.randn(2, 3, 8)).sum().backward()
        for name in ("attn.p1.weight", "up.weight", "down.weight"):
            grad = gm.get_parameter(name).grad
            assert grad is not None and grad.abs().sum() > 0
            # straight-through: pruned positions get gradient too
            mask = nmfx.states(gm)[name].mask
            assert grad[~mask].abs().sum() > 0


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    widths=st.lists(st.sampled_from([4, 8, 12, 16]), min_size=2, max_size=5),
    pattern=st.sampled_from(["1:4", "2:4", "3:4", "4:4"]),
    bias=st.booleans(),
    seed=st.integers(0, 2**16),
)
def test_property_linear_stack_rewrite_exact(widths, pattern, bias, seed):
    """Random Linear/ReLU stacks: every linear is rewritten, the graph verifies, and the output equals the
    original with masked weights, bit for bit."""
    torch.manual_seed(seed)
    layers = []
    for i, (a, b) in enumerate(zip(widths, widths[1:])):
        layers += [nn.Linear(a, b, bias=bias), nn.ReLU()]
    module = nn.Sequential(*layers[:-1])
    gm = rewrite(module, pattern)
    verify(gm, rewritten=True)
    assert len(masked_nodes(gm)) == len(widths) - 1
    ref = masked_reference(module, gm)
    p = Pattern.parse(pattern)
    for state in nmfx.states(gm).values():
        groups = state.mask.reshape(state.mask.shape[0], -1, p.m).sum(-1)
        assert torch.all(groups == p.n)
    x = torch.randn(5, widths[0])
    assert torch.equal(gm(x), ref(x))


# ----------------------------------------------------------------------------------------------
# keep_module_calls (install step) and lower_inference on module calls
# ----------------------------------------------------------------------------------------------
class TestModuleCalls:
    def _kept(self, pattern="2:4"):
        from nmfx.passes.rewrite_masked import keep_module_calls

        torch.manual_seed(0)
        module = PlainMLP()
        gm = rewrite(module, pattern)
        expected = gm(torch.ones(2, 8))
        assert sorted(keep_module_calls(gm)) == ["l1", "l2"]
        return module, gm, expected

    def test_masked_nodes_become_calls_of_the_same_objects(self):
        from nmfx.layers import MaskedLinear

        module, gm, expected = self._kept()
        verify(gm, rewritten=True)
        assert masked_nodes(gm) == []
        calls = [n for n in gm.graph.nodes if n.op == "call_module" and n.target in ("l1", "l2")]
        assert len(calls) == 2 and all(n.meta[META_KEY].status == "sparsified" for n in calls)
        assert gm.l1 is module.l1 and type(module.l1) is MaskedLinear
        assert torch.equal(gm(torch.ones(2, 8)), expected)
        graph = nmfx.to_networkx(gm)
        assert graph.nodes[calls[0].name]["module_type"] == "MaskedLinear"
        assert "(MaskedLinear)" in nmfx.to_dot(gm)

    def test_module_call_invariants(self):
        _, gm, _ = self._kept()
        call = next(n for n in gm.graph.nodes if n.op == "call_module" and n.target == "l1")
        del call.meta[META_KEY]
        with pytest.raises(InvariantError, match="MaskedLinear call must be annotated 'sparsified'"):
            verify(gm)
        _, gm, _ = self._kept()
        gm.l2.weight_nm.mask = torch.ones(3, dtype=torch.bool)
        with pytest.raises(InvariantError, match="mask of 'l2'"):
            verify(gm)

    def test_lowering_keeps_the_calls_and_swaps_to_nm_linear(self):
        from nmfx.layers import NMLinear
        from nmfx.passes.lower_inference import lower_inference

        module, gm, expected = self._kept()
        lower_inference(gm, backend="reference")
        verify(gm)
        assert type(module.l1) is NMLinear and gm.l1 is module.l1 and not hasattr(module.l1, "weight")
        calls = [n for n in gm.graph.nodes if n.op == "call_module" and n.target in ("l1", "l2")]
        assert [n.meta[META_KEY].status for n in calls] == ["packed", "packed"]
        assert [n.meta[META_KEY].kind for n in calls] == ["nm_linear", "nm_linear"]
        torch.testing.assert_close(gm(torch.ones(2, 8)), expected)
        call = calls[0]
        call.meta[META_KEY] = dataclasses.replace(call.meta[META_KEY], status="skip")
        with pytest.raises(InvariantError, match="NMLinear call must be annotated 'packed'"):
            verify(gm)

    def test_inlined_owner_of_a_functional_linear_becomes_nm_linear_too(self):
        from nmfx.layers import NMLinear
        from nmfx.passes.lower_inference import lower_inference

        class Functional(nn.Module):
            def __init__(self):
                super().__init__()
                self.fc = nn.Linear(8, 4)

            def forward(self, x):
                return F.linear(x, self.fc.weight, self.fc.bias) + self.fc(x)  # read inline and called

        torch.manual_seed(0)
        module = Functional()
        gm = rewrite(module, "1:4")
        x = torch.randn(2, 8)
        expected = gm(x)
        lower_inference(gm, backend="reference")
        verify(gm)
        assert type(module.fc) is NMLinear  # the same weight: one owner, packed once
        assert sum(n.target is torch.ops.nmfx.nm_linear_reference.default for n in gm.graph.nodes) == 2
        torch.testing.assert_close(gm(x), expected)
