"""passes/attention.py (tag_roles): roles from the graph structure."""

from __future__ import annotations

import pytest
from torch import fx

from nmfx.meta import annotated_nodes
from nmfx.passes.attention import tag_roles
from tests.passes_common import (annotations, traced, roles, NotPrunable, SDPAAttention, SDPAValueKwarg, MatmulSoftmaxAttention,
                                 FusedQKV, PlainMLP, GatedMLP, Block)

# ----------------------------------------------------------------------------------------------
# tag_roles
# ----------------------------------------------------------------------------------------------
class TestTagRoles:
    def test_sdpa_attention(self):
        assert roles(SDPAAttention()) == {
            "q_lin.weight": "attn.q", "k_lin.weight": "attn.k", "v_lin.weight": "attn.v", "out.weight": "attn.o"}
    def test_sdpa_value_as_keyword(self):
        assert roles(SDPAValueKwarg()) == {
            "q_lin.weight": "attn.q", "k_lin.weight": "attn.k", "v_lin.weight": "attn.v", "out.weight": "attn.o"}

    def test_matmul_softmax_matmul_attention(self):
        assert roles(MatmulSoftmaxAttention()) == {
            "a.weight": "attn.q", "b.weight": "attn.k", "c.weight": "attn.v", "d.weight": "attn.o"}

    def test_fused_qkv_split_in_three(self):
        assert roles(FusedQKV()) == {"p1.weight": "attn.qkv", "p2.weight": "attn.o"}

    def test_plain_mlp(self):
        assert roles(PlainMLP()) == {"l1.weight": "mlp.up", "l2.weight": "mlp.down"}

    @pytest.mark.parametrize("gate_first", [True, False])
    def test_gated_mlp_gate_vs_up(self, gate_first):
        expected = {"a.weight": "mlp.gate", "b.weight": "mlp.up"} if gate_first else {
            "a.weight": "mlp.up", "b.weight": "mlp.gate"}
        assert roles(GatedMLP(gate_first=gate_first)) == {**expected, "c.weight": "mlp.down"}

    def test_head_only_with_whole_model(self):
        partial = roles(Block(), whole_model=False)
        whole = roles(Block(), whole_model=True)
        common = {"attn.p1.weight": "attn.qkv", "attn.p2.weight": "attn.o", "up.weight": "mlp.up",
                  "down.weight": "mlp.down"}
        assert partial == {**common, "cls.weight": "other"}
        assert whole == {**common, "cls.weight": "head"}

    def test_role_source_is_graph_and_nothing_else_changes(self):
        gm = traced(Block())
        before = annotations(gm)
        tag_roles(gm, whole_model=True)
        after = annotations(gm)
        assert set(before) == set(after)
        for name, op in after.items():
            assert op.role_source == "graph"
            assert (op.kind, op.target, op.bias, op.transposed, op.status) == (
                before[name].kind, before[name].target, before[name].bias, before[name].transposed, "candidate")

    def test_no_prunable_ops_is_a_noop(self):
        gm = fx.symbolic_trace(NotPrunable())
        assert tag_roles(gm, whole_model=True) is gm
        assert annotated_nodes(gm.graph) == []
