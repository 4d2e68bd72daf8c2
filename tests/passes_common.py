"""Shared helpers and tiny modules of the per-pass tests (tests/test_pass_*.py): each pass runs alone on
``fx.symbolic_trace`` of a small module."""

from __future__ import annotations

import copy
import math

import torch
import torch.nn.functional as F
from torch import fx, nn

import nmfx
from nmfx.meta import META_KEY, PrunableOp, annotated_nodes
from nmfx.methods import resolve_method
from nmfx.ops import masked_linear
from nmfx.passes.attention import tag_roles
from nmfx.passes.find_prunable import find_prunable
from nmfx.passes.policy import Policy, apply_policy
from nmfx.passes.rewrite_masked import install_states, rewrite_masked
from nmfx.pattern import Pattern

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
    rewrite_masked(gm, pattern, method)
    install_states(gm)  # the install step: states move to <owner>.<param>_nm
    return gm


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
