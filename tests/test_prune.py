"""nmfx.prune: one-shot N:M pruning (magnitude, Wanda, SparseGPT) from calibration data."""

import importlib
import warnings

import pytest
import torch
from hypothesis import given, settings, strategies as st
from torch import nn

import nmfx
from nmfx.examples import TinyViT
from nmfx.prune import sparsegpt_prune, wanda_mask

prune_module = importlib.import_module("nmfx.prune")  # ``nmfx.prune`` is the function

CRITERIA = ("magnitude", "wanda", "sparsegpt")


def _vit(seed: int = 0) -> TinyViT:
    torch.manual_seed(seed)
    return TinyViT(dim=32, depth=2).eval()


def _images(batches: int = 3, seed: int = 1) -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return [torch.rand(4, 1, 8, 8, generator=gen) for _ in range(batches)]


def _gpt2():
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    config = transformers.GPT2Config(n_layer=2, n_embd=32, n_head=2, vocab_size=64, n_positions=16,
                                     bos_token_id=0, eos_token_id=0)
    return transformers.GPT2LMHeadModel(config).eval()


def _tokens(batches: int = 3) -> list[dict]:
    gen = torch.Generator().manual_seed(2)
    return [{"input_ids": torch.randint(0, 64, (2, 16), generator=gen)} for _ in range(batches)]


def _snapshot(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in model.state_dict().items()}


def _assert_untouched(model: nn.Module, before: dict[str, torch.Tensor]) -> None:
    after = model.state_dict()
    assert after.keys() == before.keys()
    for key, value in before.items():
        assert torch.equal(after[key], value), key
    assert not nmfx.is_sparsified(model) and not nmfx.states(model)


class _OneLayer(nn.Module):
    """One linear layer (its role is "head", so tests pass include="fc")."""

    def __init__(self, inp: int, out: int) -> None:
        super().__init__()
        self.fc = nn.Linear(inp, out)

    def forward(self, x):
        return self.fc(x)


def _record_sparsegpt_inputs(monkeypatch) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """Make ``nmfx.prune`` record, per layer, copies of the (weight, Hessian) it passes to ``sparsegpt_prune``."""
    seen: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
    real = prune_module.sparsegpt_prune

    def spy(weight, hessian, *args, name, **kwargs):
        seen[name] = (weight.clone(), hessian.clone())
        return real(weight, hessian, *args, name=name, **kwargs)

    monkeypatch.setattr(prune_module, "sparsegpt_prune", spy)
    return seen


def _expected_topn(score: torch.Tensor, n: int, m: int) -> torch.Tensor:
    """The top-n of every group of m along the last dim, by a plain sort (random data: no ties)."""
    groups = score.reshape(score.shape[0], -1, m)
    top = groups.argsort(dim=-1, descending=True)[..., :n]
    return torch.zeros_like(groups, dtype=torch.bool).scatter_(-1, top, True).reshape(score.shape)


# -- masks -----------------------------------------------------------------------------------------

@settings(max_examples=8, deadline=None)
@given(seed=st.integers(0, 2**16), pattern=st.sampled_from(["2:4", "1:4", "1:8", "3:8"]))
def test_wanda_mask_is_the_formula_on_known_inputs(seed, pattern):
    torch.manual_seed(seed)
    model = _OneLayer(16, 8)
    scales = torch.rand(16) * 4  # columns of very different norms, so Wanda differs from magnitude
    calibration = [torch.randn(5, 16) * scales for _ in range(2)]
    weight = model.fc.weight.detach().clone()
    norms = torch.cat(calibration).square().sum(0).sqrt()
    n, m = map(int, pattern.split(":"))
    expected = _expected_topn(weight.abs() * norms, n, m)
    nmfx.prune(model, pattern, calibration, "wanda", include="fc")
    assert torch.equal(nmfx.masks(model)["fc.weight"], expected)
    assert torch.equal(model.fc.weight.detach(), weight * expected)  # pruned weights are zero, the rest kept
    assert torch.equal(wanda_mask(weight, norms.square(), pattern), expected)


@pytest.mark.parametrize("criterion", CRITERIA)
@pytest.mark.parametrize("pattern", ["2:4", "1:8", "3:8"])
def test_exactly_n_per_group_and_pruned_weights_zero(criterion, pattern):
    model = nmfx.prune(_vit(), pattern, _images(), criterion)
    n, m = map(int, pattern.split(":"))
    found = nmfx.states(model)
    assert len(found) == 12  # q, k, v, o, up, down of both blocks (the head is skipped, as in sparsify)
    for name, state in found.items():
        mask, weight = state.mask, model.get_parameter(name).detach()
        assert mask.sum(-1).eq(weight.shape[-1] // m * n).all()
        assert mask.reshape(mask.shape[0], -1, m).sum(-1).eq(n).all(), name
        assert torch.equal(weight * mask, weight), f"{name}: a pruned weight is not zero"
    assert nmfx.report(model) is not None


@pytest.mark.parametrize("criterion", CRITERIA)
def test_gpt2_conv1d_groups_run_along_the_input(criterion):
    model = nmfx.prune(_gpt2(), "1:8", _tokens(), criterion)
    found = nmfx.states(model)
    assert found and all(state.dim == 0 for state in found.values())  # Conv1D weights are [in, out]
    for name, state in found.items():
        mask = state.mask.T  # [out, in]
        assert mask.reshape(mask.shape[0], -1, 8).sum(-1).eq(1).all(), name
        assert torch.equal(model.get_parameter(name) * state.mask, model.get_parameter(name))


def _reconstruction_errors(seed: int, pattern: str) -> dict[str, float]:
    gen = torch.Generator().manual_seed(seed)
    inp, out, tokens = 64, 16, 512
    # Correlated inputs: a rank-8 signal with unequal column scales plus a little noise.
    basis = torch.randn(8, inp, generator=gen) * (torch.rand(inp, generator=gen) * 3 + 0.1)
    x = torch.randn(tokens, 8, generator=gen) @ basis + 0.05 * torch.randn(tokens, inp, generator=gen)
    base = nn.Linear(inp, out, bias=False)
    with torch.no_grad():
        base.weight.copy_(torch.randn(out, inp, generator=gen))
    reference = x @ base.weight.detach().T
    errors = {}
    for criterion in CRITERIA:
        model = _OneLayer(inp, out)
        with torch.no_grad():
            model.fc.weight.copy_(base.weight)
        nmfx.prune(model, pattern, [x[:256], x[256:]], criterion, include="fc")
        errors[criterion] = (model(x) - model.fc.bias.detach() - reference).square().sum().item()
    return errors


@settings(max_examples=5, deadline=None)
@given(seed=st.integers(0, 2**16), pattern=st.sampled_from(["2:4", "1:8"]))
def test_sparsegpt_reconstructs_better_than_wanda_and_magnitude_on_correlated_inputs(seed, pattern):
    errors = _reconstruction_errors(seed, pattern)
    assert errors["sparsegpt"] < errors["wanda"], errors
    assert errors["sparsegpt"] < errors["magnitude"], errors


@settings(max_examples=5, deadline=None)
@given(seed=st.integers(0, 2**16), pattern=st.sampled_from(["2:4", "1:8"]))
def test_wanda_reconstructs_better_than_magnitude_on_independent_inputs_of_unequal_scales(seed, pattern):
    """Wanda's score is the diagonal of H times w^2: where the inputs are uncorrelated (H nearly diagonal) it
    beats magnitude, and SparseGPT beats both. (On strongly correlated inputs Wanda can lose to magnitude.)"""
    gen = torch.Generator().manual_seed(seed)
    inp, out = 64, 16
    x = torch.randn(512, inp, generator=gen) * (torch.rand(inp, generator=gen) * 3 + 0.1)
    weight = torch.randn(out, inp, generator=gen)
    errors = {}
    for criterion in CRITERIA:
        model = _OneLayer(inp, out)
        with torch.no_grad():
            model.fc.weight.copy_(weight)
            model.fc.bias.zero_()
        nmfx.prune(model, pattern, [x[:256], x[256:]], criterion, include="fc")
        errors[criterion] = (model(x) - x @ weight.T).square().sum().item()
    assert errors["sparsegpt"] < errors["wanda"] < errors["magnitude"], errors


@settings(max_examples=6, deadline=None)
@given(seed=st.integers(0, 2**16), blocksize=st.sampled_from([4, 8, 24]))
def test_sparsegpt_lazy_block_updates_equal_column_by_column(seed, blocksize):
    """The lazy batch update is exact algebra: every block size gives the same result."""
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(200, 48, generator=gen) @ torch.randn(48, 48, generator=gen)
    weight = torch.randn(6, 48, generator=gen)
    reference, ref_mask = sparsegpt_prune(weight, x.T @ x, "2:4", blocksize=4 * 12)
    new, mask = sparsegpt_prune(weight, x.T @ x, "2:4", blocksize=blocksize)
    assert torch.equal(mask, ref_mask)
    torch.testing.assert_close(new, reference, rtol=1e-4, atol=1e-4)


def test_sparsegpt_dense_pattern_keeps_the_weights_and_zeroes_dead_inputs():
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(100, 16, generator=gen)
    weight = torch.randn(4, 16, generator=gen)
    new, mask = sparsegpt_prune(weight, x.T @ x, "4:4")
    assert mask.all()
    torch.testing.assert_close(new, weight)
    x[:, 3] = 0  # an input that never fires: its weights contribute nothing and are zeroed
    new, mask = sparsegpt_prune(weight, x.T @ x, "2:4")
    assert torch.isfinite(new).all() and (new[:, 3] == 0).all()
    assert mask.reshape(4, -1, 4).sum(-1).eq(2).all()


def test_sparsegpt_singular_hessian_raises_dampening_with_a_warning():
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(3, 16, generator=gen)  # rank 3 < 16: X^T X is singular
    weight = torch.randn(4, 16, generator=gen)
    with pytest.warns(UserWarning, match="percdamp"):
        new, mask = sparsegpt_prune(weight, x.T @ x, "2:4", percdamp=0.0)
    assert torch.isfinite(new).all() and mask.reshape(4, -1, 4).sum(-1).eq(2).all()


def test_sparsegpt_hopeless_hessian_is_a_clear_error():
    weight = torch.randn(4, 16)
    hessian = torch.full((16, 16), float("nan"))
    with pytest.raises(ValueError, match="not positive definite"):
        sparsegpt_prune(weight, hessian, "2:4")
    with pytest.raises(ValueError, match="Hessian has shape"):
        sparsegpt_prune(weight, torch.eye(8), "2:4")


@settings(max_examples=6, deadline=None)
@given(seed=st.integers(0, 2**16), m=st.sampled_from([2, 4, 8, 16, 32]), data=st.data())
def test_any_packable_pattern_prunes_and_lowers(seed, m, data):
    """Every N:M the packed format holds (M <= 32), each criterion: exactly N kept per group, lowered
    without force to the same outputs."""
    n = data.draw(st.integers(1, m - 1), label="n")
    gen = torch.Generator().manual_seed(seed)
    calibration = [torch.randn(8, 64, generator=gen) for _ in range(2)]
    for criterion in CRITERIA:
        torch.manual_seed(seed)
        model = nmfx.prune(_OneLayer(64, 8).eval(), f"{n}:{m}", calibration, criterion, include="fc")
        mask = nmfx.masks(model)["fc.weight"]
        assert mask.reshape(8, -1, m).sum(-1).eq(n).all(), criterion
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            inference = nmfx.to_inference(model)
        torch.testing.assert_close(inference(calibration[0]), model(calibration[0]), rtol=1e-5, atol=1e-5)


def test_bfloat16_model_is_pruned_with_float32_statistics(monkeypatch):
    seen = _record_sparsegpt_inputs(monkeypatch)
    torch.manual_seed(0)
    model = _OneLayer(32, 8).eval().bfloat16()
    calibration = [torch.randn(16, 32).bfloat16() for _ in range(2)]
    nmfx.prune(model, "2:4", calibration, "sparsegpt", include="fc")
    dtypes = {name: (weight.dtype, hessian.dtype) for name, (weight, hessian) in seen.items()}
    assert dtypes == {"fc.weight": (torch.float32, torch.float32)}  # the weight and X^T X in float32
    weight = model.fc.weight.detach()
    assert weight.dtype == torch.bfloat16 and weight.ne(0).reshape(8, -1, 4).sum(-1).le(2).all()


class _Functional(nn.Module):
    """A weight used through ``F.linear`` in its owner's forward (no nn.Linear module), then a Linear."""

    def __init__(self) -> None:
        super().__init__()
        self.w = nn.Parameter(torch.randn(8, 16))
        self.fc = nn.Linear(8, 4)

    def forward(self, x):
        return self.fc(torch.relu(nn.functional.linear(x, self.w)))


def test_statistics_come_from_the_rewritten_graph_whatever_calls_the_op():
    """``F.linear`` in a forward is calibrated like an nn.Linear; Wanda's norms are those of the dense model."""
    torch.manual_seed(0)
    model = _Functional().eval()
    calibration = [torch.randn(6, 16) * (torch.arange(16) % 4 + 0.1) for _ in range(2)]
    x = torch.cat(calibration)
    w, fc = model.w.detach().clone(), model.fc.weight.detach().clone()
    hidden = torch.relu(x @ w.T)  # fc's input in the unpruned model
    nmfx.prune(model, "2:4", calibration, "wanda", include="*")
    masks = nmfx.masks(model)
    assert torch.equal(masks["w"], _expected_topn(w.abs() * x.square().sum(0).sqrt(), 2, 4))
    assert torch.equal(masks["fc.weight"], _expected_topn(fc.abs() * hidden.square().sum(0).sqrt(), 2, 4))


# -- calibration input -------------------------------------------------------------------------------

@pytest.mark.parametrize("criterion", ["wanda", "sparsegpt"])
@pytest.mark.parametrize("calibration, message", [
    ([], "calibration is empty"),
    (None, "needs calibration data"),
    ([torch.rand(4, 1, 7, 7)], "calibration batch 0 does not run"),
    ([torch.rand(4, 1, 8, 8), torch.rand(4, 3, 8, 8)], "calibration batch 1 does not run"),
    ([torch.rand(4, 1, 8, 8), torch.full((4, 1, 8, 8), float("nan"))], "batch 1, argument 0: contains NaN"),
    ([(torch.rand(4, 1, 8, 8),), {"images": torch.tensor([[float("inf")]])}], "batch 1, argument 'images'"),
    ([torch.full((4, 1, 8, 8), 3e38)], "non-finite"),
    (["some text"], "batch 0 is a str"),
    (42, "must be an iterable of batches"),
])
def test_bad_calibration_is_a_clear_error_and_the_model_is_untouched(criterion, calibration, message):
    model = _vit()
    before = _snapshot(model)
    with pytest.raises(ValueError, match=message):
        nmfx.prune(model, "2:4", calibration, criterion)
    _assert_untouched(model, before)
    assert not any(m._forward_pre_hooks or m._forward_hooks for m in model.modules())  # no hook left behind


class _Forgiving(nn.Module):
    """A model whose forward swallows its blocks' exceptions (falls back to the identity)."""

    def __init__(self):
        super().__init__()
        self.blocks = nn.ModuleList(nn.Sequential(nn.Linear(16, 16), nn.GELU()) for _ in range(2))
        self.head = nn.Linear(16, 4)

    def forward(self, x):
        for block in self.blocks:
            try:
                x = block(x)
            except Exception:
                pass
        return self.head(x)


@pytest.mark.parametrize("criterion", ["wanda", "sparsegpt"])
def test_non_finite_activations_refused_even_when_the_model_swallows_exceptions(criterion):
    model = _Forgiving()
    with torch.no_grad():
        model.blocks[0][0].weight.fill_(3e38)  # finite weights, overflowing activations into block 1
    before = _snapshot(model)
    with pytest.raises(ValueError, match="batch 0 makes the input of blocks.1.0.weight non-finite"):
        nmfx.prune(model, "2:4", [torch.ones(4, 16)], criterion)
    _assert_untouched(model, before)


def test_a_failure_midway_restores_every_pruned_layer(monkeypatch):
    model = _vit()
    before = _snapshot(model)
    calls = []
    real = prune_module.sparsegpt_prune

    def failing(*args, **kwargs):
        calls.append(1)
        if len(calls) == 5:
            raise ValueError("boom")
        return real(*args, **kwargs)

    monkeypatch.setattr(prune_module, "sparsegpt_prune", failing)
    with pytest.raises(ValueError, match="boom"):
        nmfx.prune(model, "2:4", _images(), "sparsegpt")
    _assert_untouched(model, before)


@pytest.mark.parametrize("criterion", CRITERIA)
def test_a_failure_in_the_final_sparsify_leaves_the_model_untouched(criterion, monkeypatch):
    model = _vit()
    before = _snapshot(model)
    real = prune_module.sparsify

    def failing(target, *args, **kwargs):
        if target is model:  # the shadow copy is sparsified first, the model last
            raise RuntimeError("out of memory, say")
        return real(target, *args, **kwargs)

    monkeypatch.setattr(prune_module, "sparsify", failing)
    with pytest.raises(RuntimeError, match="out of memory"):
        nmfx.prune(model, "2:4", _images(), criterion)
    _assert_untouched(model, before)


def test_bad_options_are_refused_before_anything_runs():
    model = _vit()
    before = _snapshot(model)
    with pytest.raises(ValueError, match="unknown criterion"):
        nmfx.prune(model, "2:4", _images(), "obs")
    with pytest.raises(ValueError, match="SparseGPT options"):
        nmfx.prune(model, "2:4", _images(), "wanda", percdamp=0.1)
    with pytest.raises(ValueError, match="multiple of M=8"):
        nmfx.prune(model, "1:8", _images(), "sparsegpt", blocksize=12)
    with pytest.raises(ValueError, match="percdamp"):
        nmfx.prune(model, "1:8", _images(), "sparsegpt", percdamp=-1.0)
    with pytest.raises(ValueError, match="invalid N:M"):
        nmfx.prune(model, "9:8", _images(), "wanda")
    with pytest.raises(ValueError, match="nothing in TinyViT would be sparsified"):
        nmfx.prune(model, "2:4", _images(), "wanda", include="no_such_layer")
    _assert_untouched(model, before)
    nmfx.prune(model, "2:4")
    with pytest.raises(ValueError, match="already sparsified"):
        nmfx.prune(model, "2:4")


def test_layers_the_criterion_cannot_hook_are_named():
    model = nn.Sequential(nn.TransformerEncoderLayer(16, 2, dim_feedforward=32, batch_first=True)).eval()
    before = _snapshot(model)
    calibration = [torch.rand(2, 5, 16)]
    with pytest.raises(ValueError, match="passed to their consumer as weights.*self_attn.*exclude them"):
        nmfx.prune(model, "2:4", calibration, "wanda")
    _assert_untouched(model, before)
    nmfx.prune(model, "2:4", calibration, "wanda", exclude="*self_attn*")
    assert set(nmfx.states(model)) == {"0.linear1.weight", "0.linear2.weight"}


def test_calibration_forms_dataloader_kwargs_and_tensor():
    images = _images()
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(torch.cat(images)), batch_size=4)
    pruned = {}
    for label, calibration in (("list", images), ("loader", loader),
                               ("kwargs", [{"images": b} for b in images]), ("tuple", [(b,) for b in images])):
        pruned[label] = nmfx.masks(nmfx.prune(_vit(), "2:4", calibration, "wanda"))
    for label in ("loader", "kwargs", "tuple"):
        assert pruned[label].keys() == pruned["list"].keys()
        assert all(torch.equal(pruned[label][k], pruned["list"][k]) for k in pruned["list"]), label
    single = nmfx.masks(nmfx.prune(_vit(), "2:4", torch.cat(images), "wanda"))  # a lone tensor is one batch
    assert all(torch.equal(single[k], pruned["list"][k]) for k in single)


def test_include_exclude_leave_other_layers_dense():
    model = _vit()
    up = model.blocks[0].up.weight.detach().clone()
    nmfx.prune(model, "2:4", _images(), "sparsegpt", exclude="*.up")
    assert not any(name.endswith(".up.weight") for name in nmfx.states(model))
    assert torch.equal(model.blocks[0].up.weight.detach(), up)


def test_progress_bar_on_request(capsys):
    nmfx.prune(_vit(), "2:4", _images(), "wanda", progress=True)
    assert "nmfx.prune (wanda, 2:4)" in capsys.readouterr().err
    nmfx.prune(_vit(), "2:4", _images(), "wanda")  # not a terminal: silent
    assert "nmfx.prune" not in capsys.readouterr().err


# -- composition ---------------------------------------------------------------------------------------

@pytest.mark.parametrize("criterion", CRITERIA)
def test_pruned_model_lowers_without_force_and_saves(criterion, tmp_path):
    images = _images()
    model = nmfx.prune(_vit(), "1:8", images, criterion)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no force, no warning
        inference = nmfx.to_inference(model)
    expected = model(images[0])
    torch.testing.assert_close(inference(images[0]), expected, rtol=1e-5, atol=1e-5)
    path = tmp_path / "pruned.safetensors"
    nmfx.save(inference, path)
    loaded = nmfx.load(path, TinyViT(dim=32, depth=2))
    torch.testing.assert_close(loaded(images[0]), expected, rtol=1e-5, atol=1e-5)


def test_pruned_training_model_round_trips_its_state_dict_mid_fine_tune():
    """A training checkpoint of a pruned model is its state_dict: a fresh model sparsified with the same
    config loads it and continues identically (masks, schedule step, outputs)."""
    images = _images()
    model = nmfx.prune(_vit(), "1:8", images, "wanda", method="srste", total_steps=6)
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    model.train()

    def train_step(m, o):
        loss = nn.functional.cross_entropy(m(images[0]), torch.arange(4))
        o.zero_grad()
        loss.backward()
        o.step()
        nmfx.step(m)

    for _ in range(2):
        train_step(model, opt)
    restored = nmfx.sparsify(_vit(seed=5), "1:8", "srste", total_steps=6)
    restored.load_state_dict(model.state_dict())
    restored.train()
    ropt = torch.optim.SGD(restored.parameters(), lr=0.05)
    ropt.load_state_dict(opt.state_dict())
    for name, state in nmfx.states(model).items():
        restored_state = nmfx.states(restored)[name]
        assert torch.equal(restored_state.mask, state.mask) and int(restored_state.step) == int(state.step) == 2
    for _ in range(2):
        train_step(model, opt)
        train_step(restored, ropt)
    torch.testing.assert_close(restored.eval()(images[1]), model.eval()(images[1]))


def test_fine_tuning_continues_from_the_pruned_weights():
    images = _images()
    ste = nmfx.prune(_vit(), "2:4", images, "wanda")
    model = nmfx.prune(_vit(), "2:4", images, "wanda", method="srste")
    for name, state in nmfx.states(model).items():  # same pruned start, whatever the method
        assert torch.equal(state.mask, nmfx.states(ste)[name].mask)
        assert torch.equal(model.get_parameter(name), ste.get_parameter(name))
    torch.testing.assert_close(model(images[0]), ste(images[0]))
    start = {name: model.get_parameter(name).detach().clone() for name in nmfx.states(model)}
    target = torch.randint(0, 10, (4,))
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    losses = []
    model.train()
    for _ in range(4):
        loss = nn.functional.cross_entropy(model(images[0]), target)
        opt.zero_grad()
        loss.backward()
        opt.step()
        nmfx.step(model)
        losses.append(loss.item())
    assert losses[-1] < losses[0]
    for name, state in nmfx.states(model).items():
        assert state.mask.reshape(state.mask.shape[0], -1, 4).sum(-1).eq(2).all()
        assert not torch.equal(model.get_parameter(name), start[name])
    # the other route: fold back to a plain model and sparsify it with any method; magnitude masks of the
    # zeroed weights are the pruned masks
    dense = nmfx.to_dense(ste, into=TinyViT(dim=32, depth=2))
    again = nmfx.sparsify(dense, "2:4", "mdgf", total_steps=10)
    torch.testing.assert_close(again(images[0]), ste(images[0]))  # alpha = 1, yet pruned weights are zero
    for name, state in nmfx.states(again).items():
        assert torch.equal(state.mask, nmfx.states(ste)[name].mask)


def test_sdgf_after_pruning_starts_at_its_own_denser_mask():
    model = nmfx.prune(_vit(), "1:8", _images(), "wanda", method="sdgf", total_steps=40)
    for name, state in nmfx.states(model).items():
        assert state.schedule.pattern == nmfx.Pattern(7, 8)
        assert state.mask.reshape(state.mask.shape[0], -1, 8).sum(-1).eq(7).all()
        weight = model.get_parameter(name)
        assert torch.equal(weight * state.mask, weight)  # the pruned model's forward, still


def test_hf_trainer_fine_tunes_a_pruned_model(tmp_path):
    transformers = pytest.importorskip("transformers")
    from nmfx.integrations.hf import NMSparsityCallback

    transformers.logging.set_verbosity_error()
    model = _gpt2()
    calibration = _tokens()
    nmfx.prune(model, "1:8", calibration, "sparsegpt", method="srste")
    pruned = {name: state.mask.clone() for name, state in nmfx.states(model).items()}
    ids = torch.cat([batch["input_ids"] for batch in calibration])
    data = [{"input_ids": row, "labels": row} for row in ids]
    args = transformers.TrainingArguments(output_dir=str(tmp_path), max_steps=3, per_device_train_batch_size=2,
                                          report_to=[], save_strategy="no", use_cpu=True, learning_rate=1e-3)
    trainer = transformers.Trainer(model=model, args=args, train_dataset=data)
    NMSparsityCallback.attach(trainer)
    trainer.train()
    for name, state in nmfx.states(model).items():
        assert int(state.step) == 3
        mask = state.mask.T
        assert mask.reshape(mask.shape[0], -1, 8).sum(-1).eq(1).all()
    # SR-STE recomputes masks from |W|; three small steps from the pruned (zeroed) weights keep most of them
    kept = torch.cat([(nmfx.states(model)[n].mask & m).flatten() for n, m in pruned.items()]).float().sum()
    assert kept / sum(m.sum() for m in pruned.values()) > 0.9


class _Reused(nn.Module):
    """One layer called twice per forward (a weight-shared block)."""

    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(8, 8)
        self.out = nn.Linear(8, 4)

    def forward(self, x):
        return self.out(self.fc(torch.relu(self.fc(x))))


def test_sparsegpt_hessian_counts_every_call_of_a_reused_layer(monkeypatch):
    torch.manual_seed(0)
    model = _Reused().eval()
    x = torch.randn(16, 8)
    with torch.no_grad():
        second = torch.relu(model.fc(x))
    expected = x.T @ x + second.T @ second
    seen = _record_sparsegpt_inputs(monkeypatch)
    nmfx.prune(model, "2:4", [x], "sparsegpt", include="fc")
    torch.testing.assert_close(seen["fc.weight"][1], expected)


class _TwoLayers(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc1 = nn.Linear(16, 16)
        self.fc2 = nn.Linear(16, 8)

    def forward(self, x):
        return self.fc2(torch.relu(self.fc1(x)))


def test_sparsegpt_is_sequential_later_layers_see_the_pruned_earlier_ones(monkeypatch):
    """fc2's Hessian is built from the output of fc1 *as pruned* (SparseGPT's sequential calibration)."""
    torch.manual_seed(0)
    model = _TwoLayers().eval()
    x = torch.randn(64, 16)
    with torch.no_grad():
        dense_hidden = torch.relu(model.fc1(x))
    seen = _record_sparsegpt_inputs(monkeypatch)
    nmfx.prune(model, "2:4", [x[:32], x[32:]], "sparsegpt", include=["fc1", "fc2"])
    assert list(seen) == ["fc1.weight", "fc2.weight"]  # forward order
    with torch.no_grad():
        pruned_hidden = torch.relu(model.fc1(x))  # fc1 as pruned (unchanged since)
    torch.testing.assert_close(seen["fc2.weight"][1], pruned_hidden.T @ pruned_hidden)
    assert not torch.allclose(seen["fc2.weight"][1], dense_hidden.T @ dense_hidden, rtol=1e-3, atol=1e-3)


class _Loop(nn.Module):
    """``fc`` runs ``times`` times per forward (a batch-dependent count)."""

    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(8, 8)
        self.out = nn.Linear(8, 4)

    def forward(self, x, times: int):
        for _ in range(times):
            x = torch.relu(self.fc(x))
        return self.out(x)


def test_sparsegpt_hessian_counts_a_layer_that_runs_unevenly_across_batches(monkeypatch):
    """Twice in one batch and never in the other: as many calls as batches, yet not once per batch, so no
    forward may end at the layer's first call."""
    torch.manual_seed(0)
    model = _Loop().eval()
    x, y = torch.randn(16, 8), torch.randn(16, 8)
    with torch.no_grad():
        second = torch.relu(model.fc(x))
    seen = _record_sparsegpt_inputs(monkeypatch)
    nmfx.prune(model, "2:4", [(x, 2), (y, 0)], "sparsegpt", include="fc")
    torch.testing.assert_close(seen["fc.weight"][1], x.T @ x + second.T @ second)


def test_sparsegpt_holds_one_hessian_at_a_time(monkeypatch):
    import weakref

    alive = []
    real = prune_module._hessian

    def tracked(*args, **kwargs):
        assert all(ref() is None for ref in alive), "an earlier layer's Hessian is still alive"
        hessian = real(*args, **kwargs)
        alive.append(weakref.ref(hessian))
        return hessian

    monkeypatch.setattr(prune_module, "_hessian", tracked)
    nmfx.prune(_vit(), "2:4", _images(), "sparsegpt")
    assert len(alive) == 12


def test_ending_calibration_forwards_early_changes_nothing(monkeypatch):
    early = nmfx.prune(_vit(), "2:4", _images(), "sparsegpt")
    real = prune_module._hessian
    monkeypatch.setattr(prune_module, "_hessian", lambda model, batches, layer, stop_early: real(model, batches, layer, False))
    full = nmfx.prune(_vit(), "2:4", _images(), "sparsegpt")
    for name in nmfx.states(early):
        assert torch.equal(nmfx.masks(early)[name], nmfx.masks(full)[name])
        torch.testing.assert_close(early.get_parameter(name), full.get_parameter(name))


def test_frozen_mask_fine_tune_keeps_the_pruned_masks():
    images = _images()
    model = nmfx.prune(_vit(), "1:8", images, "sparsegpt", method="ste", total_steps=3, fine_tune_steps=3)
    pruned = {name: state.mask.clone() for name, state in nmfx.states(model).items()}
    opt = torch.optim.SGD(model.parameters(), lr=1.0)  # large steps: a recomputed mask would move
    model.train()
    for _ in range(3):
        loss = nn.functional.cross_entropy(model(images[0]), torch.arange(4))
        opt.zero_grad()
        loss.backward()
        opt.step()
        nmfx.step(model)
    for name, state in nmfx.states(model).items():
        assert torch.equal(state.mask, pruned[name])
    assert not all(torch.equal(nmfx.nm_mask(model.get_parameter(n), "1:8"), pruned[n]) for n in pruned)
    nmfx.to_inference(model)  # finished: lowers without force


def test_bench_prune_never_trusts_its_checkpoint_cache(tmp_path, capsys):
    """A truncated or mismatched cached checkpoint is retrained, and a good one is reused."""
    from pathlib import Path

    from safetensors.torch import save_file

    from benchmarks.accuracy import LMTask
    from benchmarks.bench_prune import pretrained

    task = LMTask(dict(dim=32, depth=1, heads=2, context=16, batch=4, lr=1e-3, weight_decay=0.0,
                       corpus_chars=5_000, val_windows=4), "cpu")
    model, info = pretrained(task, 2, tmp_path, seed=0)
    assert not info["cached"]
    path = Path(info["checkpoint"])
    again, info = pretrained(task, 2, tmp_path, seed=0)
    assert info["cached"] and all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), again.state_dict().values()))
    path.write_bytes(path.read_bytes()[:100])  # truncated
    _, info = pretrained(task, 2, tmp_path, seed=0)
    assert not info["cached"] and "ignoring cached checkpoint" in capsys.readouterr().err
    save_file({"tok.weight": torch.zeros(3, 3)}, str(path))  # readable, wrong architecture
    _, info = pretrained(task, 2, tmp_path, seed=0)
    assert not info["cached"]
    state = dict(model.state_dict())
    state["tok.weight"] = torch.full_like(state["tok.weight"], float("nan"))  # right shapes, poisoned
    save_file({k: v.contiguous() for k, v in state.items()}, str(path))
    _, info = pretrained(task, 2, tmp_path, seed=0)
    assert not info["cached"]


def test_the_shadows_masks_are_freed_before_the_model_is_sparsified(monkeypatch):
    """The docstring's memory bound (two bool masks per weight at a time): the shadow's states are gone when the
    model's are allocated. A sparsified module tree holds reference cycles, so only a collection frees it; the
    automatic one is off here, as it may not run in time."""
    import gc
    import weakref

    model, shadow_states, alive = _vit(), [], []
    real = prune_module.sparsify

    def spy(target, *args, **kwargs):
        if target is model:
            alive.append(sum(ref() is not None for ref in shadow_states))
            return real(target, *args, **kwargs)
        result = real(target, *args, **kwargs)
        shadow_states.extend(weakref.ref(state) for state in nmfx.states(result).values())
        return result

    monkeypatch.setattr(prune_module, "sparsify", spy)
    gc.collect()
    gc.disable()
    try:
        nmfx.prune(model, "2:4", _images(), "wanda")
    finally:
        gc.enable()
    assert len(shadow_states) == 12 and alive == [0]


class _Routed(nn.Module):
    """``fc2`` runs only when ``fc1``'s output is large enough (data-dependent routing, as an MoE gate)."""

    def __init__(self) -> None:
        super().__init__()
        self.fc1, self.fc2, self.out = nn.Linear(16, 16), nn.Linear(16, 16), nn.Linear(16, 4)
        self.threshold = 0.0

    def forward(self, x):
        h = self.fc1(x)
        if h.abs().mean() > self.threshold:
            h = self.fc2(h)
        return self.out(h)


def test_sparsegpt_refuses_a_layer_that_stops_running_once_earlier_layers_are_pruned():
    """fc2 runs on the dense model but not after fc1 is pruned: its Hessian would be 0, every input "dead", and
    the whole weight zeroed. Refused instead, naming it, and the model is untouched."""
    torch.manual_seed(0)
    model, x = _Routed().eval(), torch.randn(64, 16)
    with torch.no_grad():
        model.threshold = 0.95 * model.fc1(x).abs().mean().item()  # 2:4-pruning fc1 lowers it below
    before = _snapshot(model)
    with pytest.raises(ValueError, match="fc2.weight ran on the calibration data with the dense model but gets no "
                                         "input once the earlier layers are pruned"):
        nmfx.prune(model, "2:4", [x], "sparsegpt", include=["fc1", "fc2"])
    _assert_untouched(model, before)
    nmfx.prune(model, "2:4", [x], "sparsegpt", include="fc1")  # the advice: exclude it
    assert set(nmfx.states(model)) == {"fc1.weight"}
