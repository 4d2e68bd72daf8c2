"""passes/find_prunable.py: which ops are found (structurally), with which layout; every form asserted by count."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import fx, nn

from nmfx.meta import annotated_nodes
from nmfx.passes.find_prunable import find_prunable
from tests.passes_common import (annotations, traced, rewrite, masked_nodes, LinearModule, FunctionalLinear, FunctionalLinearBiasKwarg,
                                 Addmm, MatmulInOut, MatmulTransposed, TorchMatmulTranspose,
                                 IdentityPermuteMatmul, NotPrunable, Block)

# ----------------------------------------------------------------------------------------------
# find_prunable
# ----------------------------------------------------------------------------------------------
class TestFindPrunable:
    def test_nn_linear_call_module(self):
        gm = traced(LinearModule())
        ops = annotations(gm)
        assert list(ops) == ["fc.weight"]
        op = ops["fc.weight"]
        assert (op.kind, op.target, op.bias, op.transposed, op.weight_shape) == ("linear", "fc.weight", "fc.bias", False, (4, 8))
        assert (op.group_dim, op.in_features, op.out_features) == (1, 8, 4)
        assert op.status == "candidate" and op.role == "other"
        (node,) = annotated_nodes(gm.graph)
        assert node.op == "call_module" and node.target == "fc"

    def test_prefix_gives_qualified_name(self):
        op = annotations(find_prunable(fx.symbolic_trace(LinearModule()), prefix="enc.layers.3"))
        assert list(op) == ["enc.layers.3.fc.weight"]
        assert op["enc.layers.3.fc.weight"].target == "fc.weight"

    def test_functional_linear_with_parameter(self):
        ops = annotations(traced(FunctionalLinear()))
        assert list(ops) == ["w"]
        assert (ops["w"].kind, ops["w"].bias, ops["w"].transposed, ops["w"].group_dim) == ("linear", "b", False, 1)
    def test_functional_linear_bias_as_keyword(self):
        ops = annotations(traced(FunctionalLinearBiasKwarg()))
        assert ops["w"].bias == "b"

    def test_addmm_with_in_out_parameter(self):
        ops = annotations(traced(Addmm()))
        assert list(ops) == ["w"]
        op = ops["w"]
        assert (op.kind, op.bias, op.transposed, op.group_dim) == ("addmm", "b", True, 0)
        assert (op.in_features, op.out_features) == (8, 4)

    def test_matmul_in_out_parameter(self):
        op = annotations(traced(MatmulInOut()))["w"]
        assert (op.kind, op.bias, op.transposed, op.group_dim, op.in_features) == ("matmul", None, True, 0, 8)

    @pytest.mark.parametrize("module_cls", [MatmulTransposed, TorchMatmulTranspose])
    def test_matmul_transposed_parameter(self, module_cls):
        op = annotations(traced(module_cls()))["w"]
        assert (op.kind, op.transposed, op.group_dim, op.in_features, op.out_features) == ("matmul", False, 1, 8, 4)

    def test_identity_permute_is_not_a_transpose(self):
        """W.permute(0, 1) is W itself: never read as W.t() (left alone, or annotated as [in, out])."""
        op = annotations(traced(IdentityPermuteMatmul())).get("w")
        assert op is None or (op.transposed is True and op.group_dim == 0)

    def test_buffers_and_computed_tensors_are_not_prunable(self):
        gm = traced(NotPrunable())
        assert annotated_nodes(gm.graph) == []

    def test_linear_with_buffer_weight_not_prunable(self):
        lin = nn.Linear(8, 4)
        w = lin.weight.detach().clone()
        del lin.weight
        lin.register_buffer("weight", w)

        class M(nn.Module):
            def __init__(self):
                super().__init__()
                self.fc = lin

            def forward(self, x):
                return self.fc(x)

        assert annotated_nodes(traced(M()).graph) == []

    def test_is_an_analysis_pass_graph_unchanged(self):
        gm = fx.symbolic_trace(Block())
        before = gm.code
        find_prunable(gm)
        assert gm.code == before
        assert len(annotated_nodes(gm.graph)) == 5


@settings(max_examples=20, deadline=None)
@given(
    form=st.sampled_from(["module", "functional", "addmm", "matmul", "matmul_t", "buffer", "computed"]),
    inp=st.sampled_from([4, 8]),
    out=st.sampled_from([4, 12]),
)
def test_property_find_prunable_forms(form, inp, out):
    """Each linear form is found exactly once with the right layout, or not at all for non-parameters."""

    class M(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(inp, out)
            self.w_out_in = nn.Parameter(torch.randn(out, inp))
            self.w_in_out = nn.Parameter(torch.randn(inp, out))
            self.b = nn.Parameter(torch.randn(out))
            self.register_buffer("buf", torch.randn(out, inp))

        def forward(self, x):
            if form == "module":
                return self.fc(x)
            if form == "functional":
                return F.linear(x, self.w_out_in, self.b)
            if form == "addmm":
                return torch.addmm(self.b, x, self.w_in_out)
            if form == "matmul":
                return x @ self.w_in_out
            if form == "matmul_t":
                return x @ self.w_out_in.t()
            if form == "buffer":
                return F.linear(x, self.buf)
            return F.linear(x, self.w_out_in + 1)

    module = M()
    ops = list(annotations(traced(module)).values())
    if form in ("buffer", "computed"):
        assert ops == []
        return
    (op,) = ops
    assert (op.in_features, op.out_features) == (inp, out)
    assert op.transposed == (form in ("addmm", "matmul"))
    x = torch.randn(3, inp)
    expected = module(x)
    gm = rewrite(module, f"{inp}:{inp}")
    assert len(masked_nodes(gm)) == 1
    assert torch.equal(gm(x), expected)
