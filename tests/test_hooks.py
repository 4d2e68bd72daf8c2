"""Hooks on the modules nmfx rewrites keep firing (or, where they cannot, nmfx says so).

* an ``nn.Linear`` called by a traced block, or sparsified alone, keeps its object (class swapped to
  ``MaskedLinear``, then ``NMLinear``): forward, pre- and full backward hooks registered before or after
  ``sparsify`` fire, through ``to_inference`` too, and outputs are unchanged;
* a submodule with hooks at trace time is kept as a call (not inlined) and its weights are still sparsified;
* a module with hooks is never itself replaced by a graph: the skip is reported with the reason;
* a hook registered later on a module whose call was inlined (or on the object a graph replaced) warns,
  naming the module, and ``nmfx.report`` lists it.
"""

from __future__ import annotations

import copy
import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import nmfx
from nmfx.examples import TinyViT
from nmfx.layers import MaskedLinear, NMLinear

X = torch.randn(3, 1, 8, 8, generator=torch.Generator().manual_seed(0))


def _vit() -> TinyViT:
    torch.manual_seed(0)
    return TinyViT(dim=32, depth=1, heads=2).eval()


def _masked_reference(original: nn.Module, model: nn.Module) -> nn.Module:
    ref = copy.deepcopy(original)
    with torch.no_grad():
        for name, mask in nmfx.masks(model).items():
            ref.get_parameter(name).mul_(mask)
    return ref


class _Recorder:
    def __init__(self):
        self.outputs: list[torch.Tensor] = []
        self.inputs: list[torch.Tensor] = []

    def forward(self, module, args, output):
        self.outputs.append(output.detach().clone())

    def pre(self, module, args):
        self.inputs.append(args[0].detach().clone())


def test_linear_in_a_traced_block_keeps_hooks_registered_before_and_after():
    original = _vit()
    model = copy.deepcopy(original)
    q = model.blocks[0].q
    before, after = _Recorder(), _Recorder()
    q.register_forward_hook(before.forward)
    q.register_forward_pre_hook(before.pre)
    nmfx.sparsify(model, "1:4", "ste", example_inputs=(X,))
    assert before.outputs == before.inputs == []  # sparsify suspends hooks while it traces: no proxies, no fakes
    assert "blocks.0" in nmfx.graphs(model)  # the block was traced whole, q is called by its graph
    assert model.blocks[0].q is q and type(q) is MaskedLinear and isinstance(q, nn.Linear)
    assert nmfx.report(model).notes == []
    q.register_forward_hook(after.forward)
    with torch.no_grad():
        out = model(X)
        torch.testing.assert_close(out, _masked_reference(original, model)(X), rtol=0, atol=0)
    assert len(before.outputs) == len(after.outputs) == len(before.inputs) == 1
    expected = F.linear(before.inputs[0], q.weight * q.weight_nm.mask, q.bias)
    torch.testing.assert_close(before.outputs[0], expected)
    assert torch.equal(before.outputs[0], after.outputs[0])

    inference = nmfx.to_inference(model, backend="reference", inplace=True)  # a copy would copy the bound hooks too
    assert inference.blocks[0].q is q and type(q) is NMLinear
    with torch.no_grad():
        torch.testing.assert_close(inference(X), out, rtol=1e-5, atol=1e-6)
    assert len(before.outputs) == len(after.outputs) == 2
    torch.testing.assert_close(before.outputs[1], before.outputs[0], rtol=1e-5, atol=1e-6)


def test_state_dict_keys_unchanged_by_the_class_swap():
    model = _vit()
    keys = set(model.state_dict())
    nmfx.sparsify(model, "1:4", "ste", example_inputs=(X,))
    new = set(model.state_dict())
    assert keys <= new and all(".weight_nm." in key for key in new - keys)


class _Untraceable(nn.Module):
    """A parent whose forward cannot be traced (data-dependent branch), so its Linear is sparsified alone."""

    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(16, 8)
        self.out = nn.Linear(8, 4)

    def forward(self, x):
        h = self.fc(x)
        if h.sum() > 0:  # fx cannot trace this
            h = h * 2
        return self.out(h)


def test_linear_sparsified_alone_keeps_object_and_hooks_even_when_hooked_before():
    torch.manual_seed(0)
    original = nn.Sequential(_Untraceable())
    model = copy.deepcopy(original)
    fc = model[0].fc
    seen = _Recorder()
    fc.register_forward_hook(seen.forward)
    nmfx.sparsify(model, "1:4", "ste", include="0.fc.weight")
    rows = {row.name: row for row in nmfx.report(model)}
    assert rows["0.fc.weight"].status == "sparsified", str(nmfx.report(model))
    assert model[0].fc is fc and type(fc) is MaskedLinear and nmfx.graphs(model) == {}
    x = torch.randn(5, 16)
    with torch.no_grad():
        torch.testing.assert_close(model(x), _masked_reference(original, model)(x), rtol=0, atol=0)
    assert len(seen.outputs) == 1
    with torch.no_grad():
        expected = model(x)
    inference = nmfx.to_inference(model, backend="reference", inplace=True)
    assert inference[0].fc is fc and type(fc) is NMLinear and type(inference[0].out) is nn.Linear
    with torch.no_grad():
        torch.testing.assert_close(inference(x), expected, rtol=1e-5, atol=1e-6)
    assert len(seen.outputs) == 3


def test_full_backward_hook_fires_on_a_masked_linear():
    model = _vit().train()
    grads = []
    model.blocks[0].up.register_full_backward_hook(lambda module, gin, gout: grads.append(gout[0].shape))
    nmfx.sparsify(model, "1:4", "ste", example_inputs=(X,))
    model(X).sum().backward()
    assert grads == [torch.Size([3, 16, 128])]
    assert model.blocks[0].up.weight.grad is not None


class _MLP(nn.Module):
    def __init__(self, dim=16):
        super().__init__()
        self.fc1 = nn.Linear(dim, dim * 2)
        self.fc2 = nn.Linear(dim * 2, dim)

    def forward(self, x):
        return self.fc2(F.relu(self.fc1(x)))


class _Block(nn.Module):
    def __init__(self, dim=16):
        super().__init__()
        self.norm = nn.LayerNorm(dim)
        self.mlp = _MLP(dim)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x):
        return x + self.proj(self.mlp(self.norm(x)))


class _Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.block = _Block()
        self.head = nn.Linear(16, 3)

    def forward(self, x):
        return self.head(self.block(x))


def test_submodule_hooked_before_sparsify_is_called_not_inlined_and_still_sparsified():
    torch.manual_seed(0)
    original = _Net().eval()
    model = copy.deepcopy(original)
    seen = _Recorder()
    model.block.mlp.register_forward_hook(seen.forward)
    nmfx.sparsify(model, "1:4", "ste")
    sparsified = {row.name for row in nmfx.report(model).sparsified}
    assert {"block.mlp.fc1.weight", "block.mlp.fc2.weight", "block.proj.weight"} <= sparsified
    gm = nmfx.graphs(model)["block"]
    assert any(n.op == "call_module" and n.target == "mlp" for n in gm.graph.nodes)
    x = torch.randn(4, 16)
    with torch.no_grad():
        torch.testing.assert_close(model(x), _masked_reference(original, model)(x), rtol=0, atol=0)
    assert len(seen.outputs) == 1


def test_hook_registered_later_on_an_inlined_module_warns_and_is_reported():
    torch.manual_seed(0)
    model = _Net().eval()
    mlp = model.block.mlp
    nmfx.sparsify(model, "1:4", "ste")
    assert model.block.mlp is mlp  # kept (a child of the graph), but its forward is inlined
    with pytest.warns(UserWarning, match=r"'block\.mlp' \(_MLP\) will never run: its forward is inlined"):
        handle = mlp.register_forward_hook(lambda *args: None)
    report = nmfx.report(model)
    assert len(report.notes) == 1 and "block.mlp" in report.notes[0] and "note: nmfx" in str(report)
    handle.remove()
    assert nmfx.report(model).notes == []
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a called layer inside the graph: no warning, and the hook runs
        calls = []
        model.block.proj.register_forward_hook(lambda *args: calls.append(1))
        model(torch.randn(2, 16))
    assert calls == [1]


def test_hook_on_the_replaced_object_warns():
    torch.manual_seed(0)
    model = _Net()
    old_block = model.block
    nmfx.sparsify(model, "1:4", "ste")
    assert model.block is not old_block
    with pytest.warns(UserWarning, match=r"'block' \(_Block\) will never run: nmfx.sparsify replaced this object"):
        old_block.register_forward_pre_hook(lambda *args: None)
    calls = []
    model.block.register_forward_hook(lambda *args: calls.append(1))  # the graph module is called: it fires
    model(torch.randn(2, 16))
    assert calls == [1]


class _BlockWithOwnWeight(nn.Module):
    def __init__(self):
        super().__init__()
        self.w = nn.Parameter(torch.randn(8, 16))
        self.fc = nn.Linear(8, 8)

    def forward(self, x):
        return self.fc(F.linear(x, self.w))


def test_hooked_scope_root_is_not_replaced_and_the_skip_is_reported():
    torch.manual_seed(0)
    model = nn.Sequential(_BlockWithOwnWeight(), nn.Linear(8, 2))
    block = model[0]
    calls = []
    block.register_forward_hook(lambda *args: calls.append(1))
    nmfx.sparsify(model, "1:4", "ste")
    rows = {row.name: row for row in nmfx.report(model)}
    assert rows["0.w"].status == "skip" and "it has hooks" in rows["0.w"].reason
    assert rows["0.fc.weight"].status == "sparsified"  # its Linear child is sparsified alone
    assert model[0] is block
    model(torch.randn(2, 16))
    assert calls == [1]


def test_compile_fullgraph_no_recompiles_with_masked_linear_calls():
    from torch._dynamo.testing import CompileCounterWithBackend

    torch._dynamo.reset()
    model = nmfx.sparsify(_vit().train(), "1:4", "mdgf", total_steps=3, example_inputs=(X,))
    counter = CompileCounterWithBackend("aot_eager")
    compiled = torch.compile(model, fullgraph=True, backend=counter)
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    for _ in range(3):
        compiled(X).square().mean().backward()
        opt.step()
        opt.zero_grad()
        nmfx.step(model)
    assert counter.frame_count == 1
    exported = torch.export.export(model.eval(), (X,))
    ops = [n for n in exported.graph.nodes if n.target is torch.ops.nmfx.masked_linear.default]
    assert len(ops) == 6


class _AttentionBlock(nn.Module):
    def __init__(self):
        super().__init__()
        self.attn = nn.MultiheadAttention(16, 2, batch_first=True)
        self.fc = nn.Linear(16, 16)

    def forward(self, x):
        return self.fc(self.attn(x, x, x, need_weights=False)[0])


class _Outer(nn.Module):
    def __init__(self):
        super().__init__()
        self.inner = _AttentionBlock()
        self.proj = nn.Linear(16, 16)

    def forward(self, x):
        return self.proj(self.inner(x))


def test_attention_inside_a_hooked_leaf_is_rewritten_once():
    torch.manual_seed(0)
    original = nn.Sequential(_Outer()).eval()
    model = copy.deepcopy(original)
    calls = []
    model[0].inner.register_forward_hook(lambda *args: calls.append(1))
    nmfx.sparsify(model, "1:4", "ste")
    names = [row.name for row in nmfx.report(model).sparsified]
    assert len(names) == len(set(names))
    assert {"0.inner.attn.in_proj_weight", "0.inner.attn.out_proj.weight", "0.inner.fc.weight",
            "0.proj.weight"} <= set(names)
    x = torch.randn(2, 5, 16)
    with torch.no_grad():
        torch.testing.assert_close(model(x), _masked_reference(original, model)(x), rtol=1e-6, atol=1e-6)
    assert calls == [1]
