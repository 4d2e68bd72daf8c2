"""Lowered layers are a real module type (``NMLinear``), and ``to_inference`` says when it falls back to
the plain-torch reference because the C++ kernel is unavailable."""

from __future__ import annotations

import copy
import warnings

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
import torch.nn.functional as F
from torch import nn

import nmfx
from nmfx.examples import TinyViT
from nmfx.layers import MaskedLinear, NMLinear

X = torch.randn(4, 1, 8, 8, generator=torch.Generator().manual_seed(0))


@pytest.fixture(scope="module")
def vit_pair():
    torch.manual_seed(0)
    model = nmfx.sparsify(TinyViT(dim=32, depth=1, heads=2), "1:4", "ste").eval()
    return model, nmfx.to_inference(model, backend="reference")


def test_lowered_linears_are_nm_linear_modules(vit_pair):
    model, inference = vit_pair
    layers = {name: m for name, m in inference.named_modules() if isinstance(m, NMLinear)}
    assert set(layers) == {f"blocks.0.{p}" for p in ("q", "k", "v", "o", "up", "down")}
    up = layers["blocks.0.up"]
    assert not isinstance(up, nn.Linear) and not hasattr(up, "weight") and not hasattr(up, "weight_nm")
    assert (up.in_features, up.out_features, str(up.pattern), up.kind, up.transposed) == (32, 128, "1:4", "nm_linear", False)
    assert repr(up) == "NMLinear(in_features=32, out_features=128, pattern=1:4, bias=True, backend=reference)"
    assert type(inference.head) is nn.Linear  # the skipped head stays dense
    assert repr(model.blocks[0].up).startswith("MaskedLinear(\n  in_features=32, out_features=128, bias=True\n"
                                               "  (weight_nm): NMState(weight, pattern=1:4, method=ste")
    torch.testing.assert_close(up.dense_weight(), model.blocks[0].up.weight * model.blocks[0].up.weight_nm.mask)


def test_state_dict_keys_are_the_packed_names(vit_pair):
    model, inference = vit_pair
    sparsified = {row.name for row in nmfx.report(model).sparsified}
    expected = set()
    for key in model.state_dict():
        weight = key.split("_nm.")[0]
        if weight in sparsified:
            if key == weight:
                expected |= {weight + "_values", weight + "_indices"}
        else:
            expected.add(key)
    assert set(inference.state_dict()) == expected
    assert "blocks.0.q.weight_values" in expected and "blocks.0.q.bias" in expected


@pytest.mark.filterwarnings("ignore::DeprecationWarning")  # torch.ao.quantization's deprecation notice
def test_quantize_dynamic_skips_nm_linear_and_quantizes_the_dense_head(vit_pair):
    model, inference = vit_pair
    quantized = torch.ao.quantization.quantize_dynamic(copy.deepcopy(inference), {nn.Linear}, dtype=torch.qint8)
    assert type(quantized.blocks[0].q) is NMLinear
    assert "quantized" in type(quantized.head).__module__
    with torch.no_grad():
        expected, got = model(X), quantized(X)
    assert got.shape == expected.shape and torch.isfinite(got).all()
    assert (got - expected).abs().max() < 0.05 * expected.abs().max() + 1e-3


def test_nm_linear_works_standalone():
    torch.manual_seed(0)
    linear = nn.Linear(16, 6)
    layer = NMLinear.from_linear(linear, "2:4", backend="reference")
    mask = nmfx.nm_mask(linear.weight, "2:4")
    x = torch.randn(3, 5, 16)
    torch.testing.assert_close(layer(x), F.linear(x, linear.weight * mask, linear.bias))
    assert set(layer.state_dict()) == {"weight_values", "weight_indices", "bias"}
    blank = NMLinear(16, 6, "2:4", backend="reference")
    blank.load_state_dict(layer.state_dict())
    torch.testing.assert_close(blank(x), layer(x), rtol=0, atol=0)
    with pytest.raises(ValueError, match="multiple of M=4"):
        NMLinear(10, 6, "2:4")
    with pytest.raises(ValueError, match="backend"):
        NMLinear(16, 6, "2:4", backend="gpu")


def test_gpt2_conv1d_owners_become_nm_linear():
    transformers = pytest.importorskip("transformers")
    transformers.logging.set_verbosity_error()
    torch.manual_seed(0)
    gpt2 = transformers.GPT2LMHeadModel(transformers.GPT2Config(n_layer=1, n_embd=32, n_head=2, vocab_size=64,
                                                                n_positions=16))
    nmfx.sparsify(gpt2, "1:8", "ste")
    c_attn = gpt2.transformer.h[0].attn.c_attn  # traced alone: a graph module until lowered
    calls = []
    c_attn.register_forward_hook(lambda *args: calls.append(1))
    inference = nmfx.to_inference(gpt2, backend="reference", inplace=True)
    block = inference.transformer.h[0]
    for layer in (block.attn.c_attn, block.attn.c_proj, block.mlp.c_fc, block.mlp.c_proj):
        assert type(layer) is NMLinear and layer.transposed and not hasattr(layer, "weight")
    assert (block.attn.c_attn.in_features, block.attn.c_attn.out_features) == (32, 96)
    assert set(nmfx.graphs(inference)) == {"transformer.h.0.mlp"}  # Conv1D graphs became NMLinear modules
    ids = torch.randint(0, 64, (2, 6))
    with torch.no_grad():
        inference(ids)
    assert calls == [1]  # the hook registered on the graph module moved to the NMLinear
    assert {layer["weight"] for layer in nmfx.inference.packed_layers(inference)} == {
        f"transformer.h.0.{p}.weight" for p in ("attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj")}


def _fake_unavailable(monkeypatch):
    from nmfx.kernels import cpu

    monkeypatch.setattr(cpu, "available", lambda: False)
    monkeypatch.setattr(cpu, "build_error", lambda: "CalledProcessError: c++ exited with 1 (test)")


def test_reference_fallback_warns_once_with_the_reason(vit_pair, monkeypatch):
    model, _ = vit_pair
    _fake_unavailable(monkeypatch)
    with pytest.warns(RuntimeWarning) as caught:
        nmfx.to_inference(model, backend="auto")
    mine = [w for w in caught if "to_inference" in str(w.message)]
    assert len(mine) == 1 and "c++ exited with 1 (test)" in str(mine[0].message)
    assert mine[0].filename == __file__  # points at the caller


def test_load_warns_too_when_it_lowers_to_the_reference(vit_pair, monkeypatch, tmp_path):
    """nmfx.load(backend="auto") into a CPU model lowers like to_inference: the same warning, with the reason."""
    _, inference = vit_pair
    nmfx.save(inference, tmp_path / "vit.safetensors")
    _fake_unavailable(monkeypatch)
    with pytest.warns(RuntimeWarning) as caught:
        nmfx.load(tmp_path / "vit.safetensors", TinyViT(dim=32, depth=1, heads=2), backend="auto")
    mine = [w for w in caught if "C++ CPU kernel for nm_linear is unavailable" in str(w.message)]
    assert len(mine) == 1 and "c++ exited with 1 (test)" in str(mine[0].message)
    assert mine[0].filename == __file__  # points at the caller


def test_no_fallback_warning_for_the_explicit_reference_or_a_working_kernel(vit_pair, monkeypatch):
    model, _ = vit_pair
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        _fake_unavailable(monkeypatch)
        nmfx.to_inference(model, backend="reference")
        monkeypatch.setattr(nmfx.kernels.cpu, "available", lambda: True)
        nmfx.to_inference(model, backend="auto")


def test_training_model_keeps_masked_linear_until_lowered(vit_pair):
    model, inference = vit_pair
    assert nmfx.NMLinear is NMLinear and nmfx.MaskedLinear is MaskedLinear
    assert type(model.blocks[0].q) is MaskedLinear and isinstance(model.blocks[0].q.weight, nn.Parameter)
    assert not any(isinstance(m, MaskedLinear) for m in inference.modules())


@settings(max_examples=15, deadline=None)
@given(n_m=st.sampled_from([(1, 2), (1, 4), (2, 4), (1, 8), (3, 8), (2, 6)]), groups=st.integers(1, 4),
       out=st.integers(1, 9), bias=st.booleans(), seed=st.integers(0, 2**16))
def test_property_nm_linear_equals_the_masked_dense_layer(n_m, groups, out, bias, seed):
    n, m = n_m
    torch.manual_seed(seed)
    linear = nn.Linear(groups * m, out, bias=bias)
    layer = NMLinear.from_linear(linear, f"{n}:{m}", backend="reference")
    dense = linear.weight * nmfx.nm_mask(linear.weight, f"{n}:{m}")
    assert torch.equal(layer.dense_weight(), dense)
    x = torch.randn(2, groups * m)
    torch.testing.assert_close(layer(x), F.linear(x, dense, linear.bias))


class _Untraceable(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(16, 16)
        self.out = nn.Linear(16, 4)

    def forward(self, x):
        h = self.fc(x)
        if h.sum() > 0:  # fx cannot trace this: fc is sparsified alone
            h = -h
        return self.out(h)


def test_layers_lowered_alone_round_trip_through_files(tmp_path):
    torch.manual_seed(0)
    model = nmfx.sparsify(_Untraceable(), "1:4", "ste", include="fc.weight")
    inference = nmfx.to_inference(model, backend="reference")
    assert type(inference.fc) is NMLinear and nmfx.graphs(inference) == {}
    assert [r.status for r in nmfx.report(inference) if r.name == "fc.weight"] == ["packed"]
    nmfx.save(inference, tmp_path / "m.safetensors")
    torch.manual_seed(1)
    loaded = nmfx.load(tmp_path / "m.safetensors", _Untraceable(), backend="reference")
    assert type(loaded.fc) is NMLinear
    x = torch.randn(3, 16)
    with torch.no_grad():
        assert torch.equal(loaded(x), inference(x))


def test_real_build_failure_warns_from_to_inference(tmp_path):
    """No working C++ compiler (CXX=/bin/false, empty build cache), in a subprocess: to_inference's
    warning names the build error, and the lowered model still computes the right result."""
    import os
    import subprocess
    import sys
    import textwrap

    script = textwrap.dedent("""
        import warnings, torch, nmfx
        from torch import nn
        torch.manual_seed(0)
        model = nmfx.sparsify(nn.Sequential(nn.Linear(16, 16), nn.ReLU(), nn.Linear(16, 2)), "1:4", "ste")
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            inference = nmfx.to_inference(model)
        mine = [str(w.message) for w in caught if str(w.message).startswith("nmfx.to_inference")]
        assert len(mine) == 1 and nmfx.kernels.cpu.build_error()[:40] in mine[0], mine
        x = torch.randn(3, 16)
        torch.testing.assert_close(inference(x), model.eval()(x))
        print("ok")
    """)
    env = {**os.environ, "CXX": "/bin/false", "NMFX_CACHE_DIR": str(tmp_path / "cache")}
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env, timeout=300)
    assert done.returncode == 0 and "ok" in done.stdout, done.stdout[-2000:] + done.stderr[-3000:]
