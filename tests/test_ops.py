"""The masked-weight ops: forward, the gradient formula of every method, opcheck, gradcheck, compile,
export and autocast."""

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch.library import opcheck

from nmfx import nm_mask
from nmfx.ops import masked_linear, masked_weight

SHAPES = [((4, 16), (8, 16)), ((2, 3, 32), (5, 32)), ((1, 8), (3, 8))]


def _case(x_shape, w_shape, dtype=torch.float64, pattern="1:4", seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(x_shape, generator=g, dtype=dtype, requires_grad=True)
    w = torch.randn(w_shape, generator=g, dtype=dtype, requires_grad=True)
    b = torch.randn(w_shape[0], generator=g, dtype=dtype, requires_grad=True)
    return x, w, b, nm_mask(w, pattern)


def _reference(x, w, b, m, alpha, lam, exact):
    """Plain-torch statement of the methods table: forward W_eff, gradient to W by formula."""
    keep = m.to(w.dtype)
    w_eff = (w * (keep + alpha * (1 - keep))).detach().requires_grad_()
    y = torch.nn.functional.linear(x, w_eff, b)
    return y, w_eff, keep


@pytest.mark.parametrize("x_shape,w_shape", SHAPES)
@pytest.mark.parametrize("alpha,lam,exact", [(0.0, None, False), (0.0, 2e-2, False), (0.3, None, False), (0.3, None, True),
                                             (1.0, None, False), (0.25, 0.1, True)])
def test_forward_and_gradient_follow_the_formula(x_shape, w_shape, alpha, lam, exact):
    x, w, b, m = _case(x_shape, w_shape)
    a = torch.tensor(alpha, dtype=torch.float64)
    lam_t = None if lam is None else torch.tensor(lam, dtype=torch.float64)
    y = masked_linear(x, w, m, b, a, lam_t, exact)
    go = torch.randn_like(y)
    y.backward(go)
    x2 = x.detach().clone().requires_grad_()
    b2 = b.detach().clone().requires_grad_()
    y_ref, w_eff, keep = _reference(x2, w.detach(), b2, m, alpha, lam, exact)
    y_ref.backward(go)
    g = w_eff.grad
    expected_w = g * (keep + alpha * (1 - keep)) if exact else g.clone()
    if lam is not None:
        expected_w = expected_w + lam * (1 - keep) * w.detach()
    torch.testing.assert_close(y, y_ref)
    torch.testing.assert_close(x.grad, x2.grad)
    torch.testing.assert_close(b.grad, b2.grad)
    torch.testing.assert_close(w.grad, expected_w)


def test_hard_mask_forward_is_w_times_m_and_dense_is_w():
    x, w, b, m = _case((3, 16), (4, 16))
    zero, one = torch.tensor(0.0), torch.tensor(1.0)
    torch.testing.assert_close(masked_linear(x, w, m, b, zero), torch.nn.functional.linear(x, w * m, b), rtol=0, atol=0)
    torch.testing.assert_close(masked_linear(x, w, m, b, one), torch.nn.functional.linear(x, w, b), rtol=0, atol=0)


def test_transposed_weight_matches_linear_of_transpose():
    x, w, b, m = _case((3, 16), (4, 16))
    wt = w.detach().t().contiguous().requires_grad_()
    a = torch.tensor(0.5, dtype=torch.float64)
    y1 = masked_linear(x, w, m, b, a, None, True)
    y2 = masked_linear(x, wt, m.t().contiguous(), b, a, None, True, transposed=True)
    torch.testing.assert_close(y1, y2)
    y1.sum().backward()
    y2.sum().backward()
    torch.testing.assert_close(w.grad.t(), wt.grad)


@pytest.mark.parametrize("transposed", [False, True])
def test_gradcheck_exact_gradient(transposed):
    """With the exact gradient and no SR-STE term, the op's backward is the true derivative."""
    x, w, b, m = _case((2, 3, 8), (4, 8))
    a = torch.tensor(0.4, dtype=torch.float64)
    if transposed:
        w = w.detach().t().contiguous().requires_grad_()
        m = m.t().contiguous()
    assert torch.autograd.gradcheck(lambda x, w, b: masked_linear(x, w, m, b, a, None, True, transposed), (x, w, b))
    assert torch.autograd.gradcheck(lambda w: masked_weight(w, m, a, None, True), (w,))


@pytest.mark.parametrize("bias,lam,exact,transposed", [(True, True, False, False), (False, False, True, False), (True, False, False, True)])
def test_opcheck_masked_linear(bias, lam, exact, transposed):
    x, w, b, m = _case((2, 3, 16), (8, 16), dtype=torch.float32)
    if transposed:
        w = w.detach().t().contiguous().requires_grad_()
        m = m.t().contiguous()
    args = (x, w, m, b if bias else None, torch.tensor(0.3), torch.tensor(0.01) if lam else None, exact, transposed)
    opcheck(torch.ops.nmfx.masked_linear.default, args)


def test_opcheck_masked_weight():
    _, w, _, m = _case((2, 16), (8, 16), dtype=torch.float32)
    opcheck(torch.ops.nmfx.masked_weight.default, (w, m, torch.tensor(0.3), torch.tensor(0.01), True))


def test_masked_weight_gradient_formula():
    _, w, _, m = _case((2, 16), (8, 16))
    a, lam = torch.tensor(0.2, dtype=torch.float64), torch.tensor(0.05, dtype=torch.float64)
    w_eff = masked_weight(w, m, a, lam, False)
    go = torch.randn_like(w_eff)
    w_eff.backward(go)
    torch.testing.assert_close(w_eff, torch.where(m, w, 0.2 * w))
    torch.testing.assert_close(w.grad, go + 0.05 * (~m) * w.detach())


@settings(max_examples=25, deadline=None)
@given(st.integers(1, 5), st.sampled_from([4, 8, 16]), st.integers(1, 6), st.floats(0, 1), st.booleans())
def test_property_gradient_to_pruned_weights(rows, m, out, alpha, exact):
    """Straight-through: pruned weights get the full g. Exact: pruned get alpha * g, kept get g."""
    x, w, b, mask = _case((rows, 2 * m), (out, 2 * m), pattern=f"1:{m}")
    y = masked_linear(x, w, mask, b, torch.tensor(alpha, dtype=torch.float64), None, exact)
    y.sum().backward()
    g = torch.ones(rows, out, dtype=torch.float64).t() @ x.detach()
    expected = torch.where(mask, g, alpha * g) if exact else g
    torch.testing.assert_close(w.grad, expected)


def test_compile_fullgraph_matches_eager_forward_and_backward():
    x, w, b, m = _case((4, 6, 32), (16, 32), dtype=torch.float32)
    a, lam = torch.tensor(0.3), torch.tensor(1e-2)
    fn = lambda x, w, b: masked_linear(x, w, m, b, a, lam, True).square().sum()
    eager = fn(x, w, b)
    eager.backward()
    grads = [t.grad.clone() for t in (x, w, b)]
    for t in (x, w, b):
        t.grad = None
    compiled = torch.compile(fn, fullgraph=True, backend="aot_eager")(x, w, b)
    compiled.backward()
    torch.testing.assert_close(compiled, eager)
    for t, g in zip((x, w, b), grads):
        torch.testing.assert_close(t.grad, g)


def test_export_keeps_one_op_node():
    class M(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.w = torch.nn.Parameter(torch.randn(8, 16))
            self.register_buffer("m", nm_mask(self.w, "1:8"))
            self.register_buffer("a", torch.tensor(0.0))

        def forward(self, x):
            return masked_linear(x, self.w, self.m, None, self.a)

    ep = torch.export.export(M(), (torch.randn(2, 16),))
    targets = [n.target for n in ep.graph.nodes if n.op == "call_function"]
    assert targets.count(torch.ops.nmfx.masked_linear.default) == 1


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_autocast_casts_and_grads_reach_fp32_weight(dtype):
    x, w, b, m = _case((4, 16), (8, 16), dtype=torch.float32)
    with torch.autocast("cpu", dtype=dtype):
        y = masked_linear(x, w, m, b, torch.tensor(0.0))
    assert y.dtype == dtype
    y.float().sum().backward()
    assert w.grad.dtype == torch.float32
    expected = torch.nn.functional.linear(x.detach().to(dtype), (w.detach() * m).to(dtype), b.detach().to(dtype))
    torch.testing.assert_close(y, expected)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_low_precision_weights(dtype):
    x, w, b, m = _case((4, 16), (8, 16), dtype=dtype)
    y = masked_linear(x, w, m, b, torch.tensor(0.5))
    y.float().sum().backward()
    assert y.dtype == dtype and w.grad.dtype == dtype and torch.isfinite(w.grad.float()).all()


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_matches_cpu():
    x, w, b, m = _case((4, 16), (8, 16), dtype=torch.float32)
    a = torch.tensor(0.3)
    torch.testing.assert_close(masked_linear(x.cuda(), w.cuda(), m.cuda(), b.cuda(), a.cuda()).cpu(), masked_linear(x, w, m, b, a))


def test_whole_sparsified_model_pickles_and_unpickles():
    """torch.save(model) re-traces each graph module's code on load: the masked ops must record themselves
    instead of running (they read x.device, which a Proxy does not have)."""
    import io

    transformers = pytest.importorskip("transformers")
    import nmfx

    transformers.logging.set_verbosity_error()
    torch.manual_seed(0)
    model = transformers.GPT2LMHeadModel(transformers.GPT2Config(n_layer=1, n_embd=32, n_head=2, vocab_size=64,
                                                                 n_positions=32))
    nmfx.sparsify(model, "1:4", "mdgf", total_steps=10)
    buffer = io.BytesIO()
    torch.save(model, buffer)
    buffer.seek(0)
    loaded = torch.load(buffer, weights_only=False)
    ids = torch.randint(0, 64, (2, 8))
    with torch.no_grad():
        torch.testing.assert_close(loaded.eval()(ids).logits, model.eval()(ids).logits)
    codes = [module.code for module in loaded.modules() if isinstance(module, torch.fx.GraphModule)]
    assert any("masked_linear" in code for code in codes)


def test_to_inference_of_an_unpickled_whole_model_is_refused_not_silently_unlowered():
    """Graph annotations do not survive torch.save(model); to_inference must say so, not claim 'packed'."""
    import io

    transformers = pytest.importorskip("transformers")
    import nmfx

    transformers.logging.set_verbosity_error()
    model = transformers.GPT2LMHeadModel(transformers.GPT2Config(n_layer=1, n_embd=32, n_head=2, vocab_size=64,
                                                                 n_positions=32))
    nmfx.sparsify(model, "1:4", "ste")
    buffer = io.BytesIO()
    torch.save(model, buffer)
    buffer.seek(0)
    loaded = torch.load(buffer, weights_only=False)
    before = {k: v.clone() for k, v in loaded.state_dict().items()}
    with pytest.raises(ValueError, match="do not survive pickling"):
        nmfx.to_inference(loaded, inplace=True)
    after = loaded.state_dict()
    assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)
