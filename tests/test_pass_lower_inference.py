"""The lowering passes alone: plan_lowering is pure (it writes only node.meta), lower_inference applies
the plans, and a model whose planning fails is left exactly as it was (to_inference, in place)."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

import nmfx
from nmfx.layers import MaskedLinear, NMLinear
from nmfx.passes.lower_inference import PLAN_KEY, LoweredWeight, lower_inference, plan_lowering
from nmfx.passes.verify import verify
from tests.passes_common import rewrite


class TwoLayers(nn.Module):
    def __init__(self, width: int = 16):
        super().__init__()
        self.a, self.b = nn.Linear(width, width), nn.Linear(width, 8)

    def forward(self, x):
        return self.b(torch.relu(self.a(x)))


class WithHead(TwoLayers):
    """Two sparsified layers (``a``, ``b``) before a dense head."""

    def __init__(self):
        super().__init__()
        self.head = nn.Linear(8, 4)

    def forward(self, x):
        return self.head(super().forward(x))


def _snapshot(module: nn.Module) -> tuple:
    return ({k: v.clone() for k, v in module.state_dict().items()},
            {name: type(m) for name, m in module.named_modules()})


def _same(module: nn.Module, snapshot: tuple) -> bool:
    state, classes = snapshot
    now = module.state_dict()
    return (now.keys() == state.keys() and all(torch.equal(now[k], state[k]) for k in state)
            and {name: type(m) for name, m in module.named_modules()} == classes)


@settings(max_examples=12, deadline=None)
@given(pattern=st.sampled_from(["1:2", "2:4", "1:4", "1:8", "2:8", "1:16"]), seed=st.integers(0, 10**6))
def test_plan_is_pure_and_apply_equals_the_masked_model(pattern, seed):
    torch.manual_seed(seed)
    module = TwoLayers()
    gm = rewrite(module, pattern)
    x = torch.randn(3, 16)
    expected = gm(x)
    code, before = gm.code, _snapshot(gm)
    plan_lowering(gm, backend="reference")
    assert gm.code == code and _same(gm, before)  # the planning pass changed nothing but node.meta
    plans = [n.meta[PLAN_KEY] for n in gm.graph.nodes if PLAN_KEY in n.meta]
    assert len(plans) == 2 and all(isinstance(p, LoweredWeight) and p.kind == "nm_linear" for p in plans)
    lower_inference(gm, backend="reference")
    verify(gm, rewritten=True)
    assert not any(PLAN_KEY in n.meta for n in gm.graph.nodes)
    assert isinstance(module.a, NMLinear) and isinstance(module.b, NMLinear)
    torch.testing.assert_close(gm(x), expected)


def test_a_failed_plan_leaves_the_model_in_place_untouched(monkeypatch):
    """to_inference(inplace=True) plans every layer before installing any: a failure in the last layer's
    packing leaves the first layer unlowered too."""
    torch.manual_seed(0)
    model = nmfx.sparsify(WithHead(), "1:4", "ste", example_inputs=(torch.randn(2, 16),))
    assert len(nmfx.states(model)) == 2
    before = _snapshot(model)
    x = torch.randn(3, 16)
    expected = model(x)
    import nmfx.passes.lower_inference as lowering

    real = lowering.pack_nm
    calls = []

    def pack_then_fail(weight, pattern, mask):
        calls.append(weight.shape)
        if len(calls) == 2:
            raise RuntimeError("packing failed (test)")
        return real(weight, pattern, mask)

    monkeypatch.setattr(lowering, "pack_nm", pack_then_fail)
    with pytest.raises(RuntimeError, match="packing failed"):  # a PassFailure when a graph pass packed it
        nmfx.to_inference(model, backend="reference", inplace=True)
    assert len(calls) == 2 and _same(model, before) and not nmfx.is_inference(model)
    monkeypatch.undo()
    deployed = nmfx.to_inference(model, backend="reference", inplace=True)
    assert deployed is model and nmfx.is_inference(model)
    torch.testing.assert_close(model(x), expected)


def test_lone_masked_linear_is_planned_with_the_graphs(monkeypatch):
    """A MaskedLinear sparsified alone (no graph calls it) is planned before any graph is installed."""
    torch.manual_seed(0)
    layer = nmfx.sparsify(nn.Linear(16, 8), "1:4", "ste")
    assert isinstance(layer, MaskedLinear)
    x = torch.randn(2, 16)
    expected = layer(x)
    deployed = nmfx.to_inference(layer, backend="reference")
    assert isinstance(deployed, NMLinear) and isinstance(layer, MaskedLinear)
    torch.testing.assert_close(deployed(x), expected)
    snapshot = _snapshot(layer)
    import nmfx.passes.lower_inference as lowering

    monkeypatch.setattr(lowering, "pack_nm", lambda *a: (_ for _ in ()).throw(RuntimeError("no (test)")))
    with pytest.raises(RuntimeError, match="no \\(test\\)"):
        nmfx.to_inference(layer, backend="reference", inplace=True)
    assert _same(layer, snapshot) and isinstance(layer, MaskedLinear)
