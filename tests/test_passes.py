"""Per-pass unit tests on small hand-built graphs: find_prunable, tag_roles, policy, rewrite_masked,
verify and PassPipeline, each run alone on ``fx.symbolic_trace`` of a tiny module.

Every rewrite test checks ``verify`` and asserts exactly how many nodes were matched / rewritten, so a
pass that silently matches nothing fails.
"""

from __future__ import annotations

import copy
import dataclasses
import math

import pytest
import torch
import torch.nn.functional as F
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from torch import fx, nn

import nmfx
from nmfx.meta import META_KEY, PrunableOp, annotated_nodes
from nmfx.methods import resolve_method
from nmfx.ops import masked_linear
from nmfx.passes.attention import tag_roles
from nmfx.passes.find_prunable import find_prunable
from nmfx.passes.pipeline import PassFailure, PassPipeline
from nmfx.passes.policy import Policy, apply_policy
from nmfx.passes.rewrite_masked import rewrite_masked
from nmfx.passes.verify import InvariantError, verify
from nmfx.pattern import Pattern
from nmfx.state import NMState


# ----------------------------------------------------------------------------------------------
# helpers
# ----------------------------------------------------------------------------------------------
def annotations(gm: fx.GraphModule) -> dict[str, PrunableOp]:
    """{weight name: annotation}; asserts no weight is annotated on two nodes unless expected."""
    return {node.meta[META_KEY].weight: node.meta[META_KEY] for node in annotated_nodes(gm.graph)}


def traced(module: nn.Module) -> fx.GraphModule:
    return find_prunable(fx.symbolic_trace(module))


def roles(module: nn.Module, whole_model: bool = False) -> dict[str, str]:
    gm = tag_roles(traced(module), whole_model=whole_model)
    return {name: op.role for name, op in annotations(gm).items()}


def decide(module: nn.Module, pattern="2:4", method="ste", whole_model=True, **policy_kwargs):
    """Run find_prunable -> tag_roles -> apply_policy; {weight: (status, reason)}."""
    pattern = Pattern.parse(pattern)
    method = resolve_method(method) if isinstance(method, str) else method
    gm = tag_roles(traced(module), whole_model=whole_model)
    apply_policy(gm, Policy(pattern, method, **policy_kwargs))
    return {name: (op.status, op.reason) for name, op in annotations(gm).items()}


def rewrite(module: nn.Module, pattern="2:4", method="ste", **policy_kwargs) -> fx.GraphModule:
    """The full pass sequence on ``module`` (not modified: it is traced; parameters are shared)."""
    pattern = Pattern.parse(pattern)
    method = resolve_method(method)
    gm = tag_roles(traced(module), whole_model=False)
    apply_policy(gm, Policy(pattern, method, **policy_kwargs))
    return rewrite_masked(gm, pattern, method)


def masked_nodes(gm: fx.GraphModule) -> list[fx.Node]:
    return [n for n in gm.graph.nodes if n.op == "call_function" and n.target is masked_linear]


def masked_reference(module: nn.Module, gm: fx.GraphModule) -> nn.Module:
    """A copy of ``module`` whose sparsified weights are multiplied by their masks from ``gm``."""
    ref = copy.deepcopy(module)
    found = nmfx.states(gm)
    assert found, "no NMState was registered"
    with torch.no_grad():
        for name, state in found.items():
            ref.get_parameter(name).mul_(state.mask)
    return ref


# ----------------------------------------------------------------------------------------------
# tiny modules
# ----------------------------------------------------------------------------------------------
class LinearModule(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(8, 4)

    def forward(self, x):
        return self.fc(x)


class FunctionalLinear(nn.Module):
    def __init__(self):
        super().__init__()
        self.w = nn.Parameter(torch.randn(4, 8))
        self.b = nn.Parameter(torch.randn(4))

    def forward(self, x):
        return F.linear(x, self.w, self.b)


class FunctionalLinearBiasKwarg(FunctionalLinear):
    def forward(self, x):
        return F.linear(x, self.w, bias=self.b)


class Addmm(nn.Module):
    """GPT-2 Conv1D: weight stored [in, out]."""

    def __init__(self):
        super().__init__()
        self.w = nn.Parameter(torch.randn(8, 4))
        self.b = nn.Parameter(torch.randn(4))

    def forward(self, x):
        return torch.addmm(self.b, x.reshape(-1, 8), self.w).reshape(x.shape[:-1] + (4,))


class MatmulInOut(nn.Module):
    """x @ W with W stored [in, out]."""

    def __init__(self):
        super().__init__()
        self.w = nn.Parameter(torch.randn(8, 4))

    def forward(self, x):
        return x @ self.w


class MatmulTransposed(nn.Module):
    """x @ W.t() with W stored [out, in]."""

    def __init__(self):
        super().__init__()
        self.w = nn.Parameter(torch.randn(4, 8))

    def forward(self, x):
        return x @ self.w.t()


class TorchMatmulTranspose(nn.Module):
    def __init__(self):
        super().__init__()
        self.w = nn.Parameter(torch.randn(4, 8))

    def forward(self, x):
        return torch.matmul(x, self.w.transpose(0, 1))


class IdentityPermuteMatmul(nn.Module):
    """x @ W.permute(0, 1): the permute is the identity, so W is used as stored, [in, out]."""

    def __init__(self):
        super().__init__()
        self.w = nn.Parameter(torch.randn(8, 8))

    def forward(self, x):
        return x @ self.w.permute(0, 1)


class NotPrunable(nn.Module):
    """Linear-looking ops whose weights are buffers or computed tensors: none is prunable."""

    def __init__(self):
        super().__init__()
        self.register_buffer("buf", torch.randn(4, 8))
        self.register_buffer("buf_bias", torch.randn(4))
        self.register_buffer("buf_in_out", torch.randn(8, 4))
        self.scale = nn.Parameter(torch.randn(4, 8))
        self.vec = nn.Parameter(torch.randn(8))  # a 1-D parameter is not a linear weight

    def forward(self, x):
        a = F.linear(x, self.buf, self.buf_bias)
        b = F.linear(x, self.scale * 2.0)  # computed from a parameter: not the parameter itself
        c = x @ self.buf_in_out
        d = torch.addmm(self.buf_bias, x, self.buf_in_out)
        e = x @ self.vec
        f = x @ x.transpose(-2, -1)  # activation @ activation
        return a.sum() + b.sum() + c.sum() + d.sum() + e.sum() + f.sum()


class SDPAAttention(nn.Module):
    def __init__(self, d=8):
        super().__init__()
        self.q_lin, self.k_lin, self.v_lin, self.out = (nn.Linear(d, d) for _ in range(4))

    def forward(self, x):
        q, k, v = self.q_lin(x), self.k_lin(x), self.v_lin(x)
        return self.out(F.scaled_dot_product_attention(q, k, v))


class SDPAValueKwarg(SDPAAttention):
    def forward(self, x):
        return self.out(F.scaled_dot_product_attention(self.q_lin(x), self.k_lin(x), value=self.v_lin(x)))


class MatmulSoftmaxAttention(nn.Module):
    """Names chosen to carry no hint: roles must come from the graph."""

    def __init__(self, d=8):
        super().__init__()
        self.a, self.b, self.c, self.d = (nn.Linear(d, d) for _ in range(4))
        self.drop = nn.Dropout(0.0)
        self.dim = d

    def forward(self, x):
        q, k, v = self.a(x), self.b(x), self.c(x)
        scores = q @ k.transpose(-2, -1) / math.sqrt(self.dim)
        probs = self.drop(torch.softmax(scores, dim=-1))
        return self.d(torch.matmul(probs, v))


class FusedQKV(nn.Module):
    def __init__(self, d=8):
        super().__init__()
        self.d = d
        self.p1 = nn.Linear(d, 3 * d)
        self.p2 = nn.Linear(d, d)

    def forward(self, x):
        q, k, v = self.p1(x).split(self.d, dim=-1)
        return self.p2(F.scaled_dot_product_attention(q, k, v))


class PlainMLP(nn.Module):
    def __init__(self, d=8, h=16):
        super().__init__()
        self.l1 = nn.Linear(d, h)
        self.act = nn.GELU()
        self.l2 = nn.Linear(h, d)

    def forward(self, x):
        return self.l2(self.act(self.l1(x)))


class GatedMLP(nn.Module):
    """Llama style: down(act(gate(x)) * up(x)); names carry no hint."""

    def __init__(self, d=8, h=16, gate_first=True):
        super().__init__()
        self.a = nn.Linear(d, h, bias=False)
        self.b = nn.Linear(d, h, bias=False)
        self.c = nn.Linear(h, d, bias=False)
        self.gate_first = gate_first

    def forward(self, x):
        if self.gate_first:
            return self.c(F.silu(self.a(x)) * self.b(x))
        return self.c(self.a(x) * F.silu(self.b(x)))


class Block(nn.Module):
    """attention (fused qkv) + MLP + classifier head."""

    def __init__(self, d=8, h=32, classes=5):
        super().__init__()
        self.attn = FusedQKV(d)
        self.up = nn.Linear(d, h)
        self.down = nn.Linear(h, d)
        self.cls = nn.Linear(d, classes)

    def forward(self, x):
        x = x + self.attn(x)
        x = x + self.down(F.gelu(self.up(x)))
        return self.cls(x)


class SharedWeight(nn.Module):
    """One parameter read by two linear nodes."""

    def __init__(self):
        super().__init__()
        self.w = nn.Parameter(torch.randn(8, 8))
        self.fc = nn.Linear(8, 8)

    def forward(self, x, y):
        return F.linear(x, self.w) + F.linear(y, self.w) + self.fc(x) + self.fc(y)


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


# ----------------------------------------------------------------------------------------------
# policy
# ----------------------------------------------------------------------------------------------
class TestPolicy:
    def test_default_sparsifies_everything_but_the_head(self):
        decided = decide(Block())
        assert {n: s for n, (s, _) in decided.items()} == {
            "attn.p1.weight": "sparsify", "attn.p2.weight": "sparsify", "up.weight": "sparsify",
            "down.weight": "sparsify", "cls.weight": "skip"}
        assert "head" in decided["cls.weight"][1] and "include" in decided["cls.weight"][1]
        assert decided["up.weight"][1] == "role mlp.up"

    def test_include_brings_head_back(self):
        decided = decide(Block(), include=("cls.*",))
        assert decided["cls.weight"] == ("sparsify", "matched 'cls.*'")
        assert all(s == "skip" and "not matched by include" in r for n, (s, r) in decided.items() if n != "cls.weight")

    def test_include_by_role_head(self):
        decided = decide(Block(), include=("head",))
        assert [n for n, (s, _) in decided.items() if s == "sparsify"] == ["cls.weight"]

    @pytest.mark.parametrize("glob, expected", [
        ("attn.*", {"attn.p1.weight", "attn.p2.weight"}),         # by role (and by module name)
        ("mlp.down", {"down.weight"}),                              # by role only
        ("up", {"up.weight"}),                                      # by module name
        ("*.p2.weight", {"attn.p2.weight"}),                        # by weight name
    ])
    def test_include_globs(self, glob, expected):
        decided = decide(Block(), include=(glob,))
        assert {n for n, (s, _) in decided.items() if s == "sparsify"} == expected

    @pytest.mark.parametrize("glob, excluded", [
        ("attn.qkv", {"attn.p1.weight"}),
        ("mlp.*", {"up.weight", "down.weight"}),
        ("attn.p2", {"attn.p2.weight"}),                            # module name
        ("down.weight", {"down.weight"}),
    ])
    def test_exclude_globs(self, glob, excluded):
        decided = decide(Block(), exclude=(glob,))
        sparsified = {n for n, (s, _) in decided.items() if s == "sparsify"}
        assert sparsified == {"attn.p1.weight", "attn.p2.weight", "up.weight", "down.weight"} - excluded
        for name in excluded:
            assert decided[name] == ("skip", f"excluded by {glob!r}")

    def test_exclude_wins_over_include(self):
        decided = decide(Block(), include=("mlp.*",), exclude=("down",))
        assert decided["up.weight"][0] == "sparsify"
        assert decided["down.weight"] == ("skip", "excluded by 'down'")

    def test_tied_weights_skipped(self):
        decided = decide(Block(), tied={"up.weight": "emb.weight", "emb.weight": "up.weight"})
        status, reason = decided["up.weight"]
        assert status == "skip" and "tied" in reason and "emb.weight" in reason
        assert decided["down.weight"][0] == "sparsify"

    def test_tied_skip_even_when_included(self):
        decided = decide(Block(), include=("*",), tied={"cls.weight": "x.weight"})
        assert decided["cls.weight"][0] == "skip"

    def test_non_divisible_input_dim_skipped_with_reason(self):
        model = nn.Sequential(nn.Linear(12, 16), nn.ReLU(), nn.Linear(16, 16), nn.ReLU(), nn.Linear(16, 4))
        decided = decide(model, pattern="1:8", whole_model=False)
        status, reason = decided["0.weight"]
        assert status == "skip"
        assert "12" in reason and "M=8" in reason and "not padded" in reason
        assert decided["2.weight"][0] == "sparsify"

    def test_sdgf_geometric_needs_m64_for_1_8(self):
        method = resolve_method("sdgf", total_steps=100, schedule="geometric")
        assert max(p.m for p in method.patterns("1:8")) == 64
        model = nn.Sequential(nn.Linear(32, 64), nn.ReLU(), nn.Linear(64, 32), nn.ReLU(), nn.Linear(32, 4))
        decided = decide(model, pattern="1:8", method=method, whole_model=False)
        status, reason = decided["0.weight"]
        assert status == "skip" and "32" in reason and "M=64" in reason
        assert decided["2.weight"][0] == "sparsify"  # input width 64
        assert decided["4.weight"][0] == "skip"
        # stepwise stays at M=8, so width 32 is fine there
        stepwise = decide(model, pattern="1:8", method=resolve_method("sdgf", total_steps=100), whole_model=False)
        assert {n: s for n, (s, _) in stepwise.items()} == dict.fromkeys(stepwise, "sparsify")

    def test_decided_ops_are_not_redecided(self):
        gm = tag_roles(traced(PlainMLP()))
        apply_policy(gm, Policy(Pattern(2, 4), resolve_method("ste"), exclude=("mlp.up",)))
        apply_policy(gm, Policy(Pattern(2, 4), resolve_method("ste")))
        assert annotations(gm)["l1.weight"].status == "skip"

    def test_every_decision_has_a_reason(self):
        decided = decide(Block(), exclude=("attn.o",), tied={"up.weight": "z"})
        assert all(reason for _, reason in decided.values())


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


# ----------------------------------------------------------------------------------------------
# verify
# ----------------------------------------------------------------------------------------------
class TestVerify:
    def _rewritten(self):
        return rewrite(PlainMLP(), "2:4")

    def test_clean_graph_passes(self):
        verify(self._rewritten(), rewritten=True)

    def test_dangling_mask_get_attr(self):
        gm = self._rewritten()
        node = masked_nodes(gm)[0]
        node.args[2].target = "nowhere.mask"
        with pytest.raises(InvariantError, match="nowhere.mask"):
            verify(gm)

    @pytest.mark.filterwarnings("ignore:Attempted to insert a get_attr")
    def test_dangling_get_attr_of_any_kind(self):
        gm = fx.symbolic_trace(PlainMLP())
        x = next(iter(gm.graph.nodes))
        with gm.graph.inserting_after(x):
            gm.graph.get_attr("missing_param")
        with pytest.raises(InvariantError, match="missing_param"):
            verify(gm)

    def test_mask_of_wrong_dtype(self):
        gm = self._rewritten()
        gm.l1.weight_nm.mask = gm.l1.weight_nm.mask.float()
        with pytest.raises(InvariantError, match="mask"):
            verify(gm)

    def test_mask_of_wrong_shape(self):
        gm = self._rewritten()
        gm.l1.weight_nm.mask = torch.ones(3, 3, dtype=torch.bool)
        with pytest.raises(InvariantError, match="mask"):
            verify(gm)

    def test_weight_not_a_parameter(self):
        gm = self._rewritten()
        node = masked_nodes(gm)[0]
        node.args[1].target = node.args[2].target  # the mask buffer where the weight should be
        with pytest.raises(InvariantError, match="not a parameter"):
            verify(gm)

    def test_masked_node_without_annotation(self):
        gm = self._rewritten()
        del masked_nodes(gm)[0].meta[META_KEY]
        with pytest.raises(InvariantError, match="annotation"):
            verify(gm)

    def test_chosen_but_not_rewritten(self):
        gm = tag_roles(traced(PlainMLP()))
        apply_policy(gm, Policy(Pattern(2, 4), resolve_method("ste")))
        verify(gm)  # fine before the rewrite
        with pytest.raises(InvariantError, match="not rewritten"):
            verify(gm, rewritten=True)

    def test_lint_failure(self):
        gm = fx.symbolic_trace(PlainMLP())
        nodes = list(gm.graph.nodes)
        # use a node before it is defined
        nodes[1].args = (nodes[2],)
        with pytest.raises(InvariantError, match="lint"):
            verify(gm)

    def test_invariant_error_is_assertion_error(self):
        assert issubclass(InvariantError, AssertionError)


# ----------------------------------------------------------------------------------------------
# PassPipeline
# ----------------------------------------------------------------------------------------------
class TestPassPipeline:
    def test_runs_in_order_and_checks_after_each(self):
        calls = []

        def make(name):
            def graph_pass(gm):
                calls.append(name)
                return gm
            return graph_pass

        checked = []
        pipeline = PassPipeline([("a", make("a")), ("b", make("b"))], check=lambda gm: checked.append(len(calls)))
        gm = fx.symbolic_trace(PlainMLP())
        assert pipeline(gm) is gm
        assert calls == ["a", "b"] and checked == [1, 2]

    def test_failure_names_pass_and_passes_before(self):
        def boom(gm):
            raise RuntimeError("kaboom")

        pipeline = PassPipeline([("find", find_prunable), ("roles", tag_roles), ("explode", boom),
                                 ("never", lambda gm: pytest.fail("ran after a failure"))])
        with pytest.raises(PassFailure) as info:
            pipeline(fx.symbolic_trace(PlainMLP()))
        message = str(info.value)
        assert "'explode'" in message and "kaboom" in message
        assert "find, roles" in message
        assert "never" not in message
        assert isinstance(info.value.__cause__, RuntimeError)

    @pytest.mark.filterwarnings("ignore:Attempted to insert a get_attr")
    def test_invariant_broken_by_a_pass_is_caught(self):
        def dangling(gm):
            first = next(iter(gm.graph.nodes))
            with gm.graph.inserting_after(first):
                gm.graph.get_attr("ghost")
            return gm

        pipeline = PassPipeline([("find", find_prunable), ("breaks", dangling)])
        with pytest.raises(PassFailure, match=r"'breaks'.*ghost.*passes run before it: find") as info:
            pipeline(fx.symbolic_trace(PlainMLP()))
        assert isinstance(info.value.__cause__, InvariantError)

    def test_first_pass_failure_says_none_before(self):
        pipeline = PassPipeline([("first", lambda gm: 1 / 0)])
        with pytest.raises(PassFailure, match=r"'first'.*passes run before it: none"):
            pipeline(fx.symbolic_trace(PlainMLP()))

    def test_full_pipeline_end_to_end(self):
        torch.manual_seed(0)
        module = Block()
        pattern, method = Pattern(1, 4), resolve_method("ste")
        pipeline = PassPipeline([
            ("find_prunable", find_prunable),
            ("tag_roles", lambda gm: tag_roles(gm, whole_model=True)),
            ("policy", lambda gm: apply_policy(gm, Policy(pattern, method))),
            ("rewrite_masked", lambda gm: rewrite_masked(gm, pattern, method)),
        ])
        gm = pipeline(fx.symbolic_trace(module))
        assert len(masked_nodes(gm)) == 4  # the head is skipped
        ref = masked_reference(module, gm)
        x = torch.randn(2, 3, 8)
        assert torch.equal(gm(x), ref(x))


# ----------------------------------------------------------------------------------------------
# networkx / dot views of a rewritten graph
# ----------------------------------------------------------------------------------------------
def test_to_networkx_and_dot_carry_annotations():
    gm = rewrite(Block(), "2:4", exclude=("mlp.up",))
    graph = nmfx.to_networkx(gm)
    annotated = {n: a for n, a in graph.nodes(data=True) if "nmfx_role" in a}
    assert len(annotated) == 5
    statuses = sorted(a["nmfx_status"] for a in annotated.values())
    assert statuses == ["skip"] + ["sparsified"] * 4
    assert all(graph.has_edge(inp.name, node.name) for node in gm.graph.nodes for inp in node.all_input_nodes)
    dot = nmfx.to_dot(gm)
    assert dot.startswith("digraph") and dot.count("palegreen") == 4 and dot.count("lightgrey") == 1


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
        assert sum(n.target is torch.ops.nmfx.nm_linear.default for n in gm.graph.nodes) == 2
        torch.testing.assert_close(gm(x), expected)
