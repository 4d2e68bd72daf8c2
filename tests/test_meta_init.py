"""The large-model flow on one process: a model built on the meta device is sparsified there, materialized with
``to_empty``, given weights, and ``nmfx.refresh``-ed; it then equals the model sparsified in memory from the same
weights (state, outputs, training). Until refreshed it refuses to train and to lower, naming the fix, whatever
its uninitialised buffers happen to hold."""

import copy
import pickle
import warnings

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

import nmfx
from tests.lm_cases import IDS, train_lm
from nmfx.refresh import require_refreshed, unrefreshed_states

transformers = pytest.importorskip("transformers")


class MLP(nn.Module):
    def __init__(self, width=32):
        super().__init__()
        self.fc1 = nn.Linear(16, width)
        self.fc2 = nn.Linear(width, 16)
        self.out = nn.Linear(16, 4)

    def forward(self, x):
        return self.out(torch.relu(self.fc2(torch.relu(self.fc1(x)))))


def _gpt2():
    config = transformers.GPT2Config(n_layer=2, n_embd=32, n_head=2, vocab_size=64, n_positions=16,
                                     bos_token_id=0, eos_token_id=0, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
    return transformers.GPT2LMHeadModel(config)


def _llama():
    config = transformers.LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                      num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=16,
                                      bos_token_id=0, eos_token_id=0, pad_token_id=0)
    return transformers.LlamaForCausalLM(config)


BUILDS = {"gpt2": _gpt2, "llama": _llama}
X = torch.randn(8, 16, generator=torch.Generator().manual_seed(4))
OPTIONS = {"pattern": "1:8", "method": "mdgf", "total_steps": 10}


@pytest.fixture(autouse=True)
def quiet_transformers():
    transformers.logging.set_verbosity_error()
    yield
    transformers.logging.set_verbosity_warning()


def _sparsify(model, **options):
    options = {**OPTIONS, **options}
    return nmfx.sparsify(model, options.pop("pattern"), options.pop("method"), **options)


def _restore_non_persistent(model, build):
    """Non-persistent buffers (Llama's rotary frequencies) are in no state dict: after to_empty they are
    recomputed, here from a model built in memory (a real run rebuilds its rotary module on the device)."""
    reference = dict(build().named_buffers())
    persistent = model.state_dict().keys()
    with torch.no_grad():
        for name, buffer in model.named_buffers():
            if name not in persistent and name in reference:
                buffer.copy_(reference[name])


def _meta_flow(build, dense_state, **options):
    """Build on meta, sparsify, to_empty, load the dense weights, refresh."""
    with torch.device("meta"):
        model = build()
    _sparsify(model, **options)
    model.to_empty(device="cpu")
    model.tie_weights()  # to_empty gives each module its own tensor: GPT-2's head and embedding are one again
    _restore_non_persistent(model, build)
    model.load_state_dict(dense_state)
    return nmfx.refresh(model)


def _bytes(t):
    """A tensor's bytes (uninitialised memory may hold NaNs and bools other than 0/1)."""
    return t.detach().reshape(-1).view(torch.uint8)


def _snapshot(model):
    return {k: _bytes(v).clone() for k, v in model.state_dict().items()}


def _assert_unchanged(model, before):
    after = model.state_dict()
    assert after.keys() == before.keys()
    for key, value in before.items():
        assert torch.equal(_bytes(after[key]), value), key


def _assert_same_state(a, b):
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    for key in sa:
        assert torch.equal(sa[key], sb[key]), key


@pytest.mark.parametrize("arch", list(BUILDS))
def test_meta_flow_equals_sparsifying_in_memory(arch):
    build = BUILDS[arch]
    torch.manual_seed(0)
    dense = build()
    dense_state = {k: v.clone() for k, v in dense.state_dict().items()}
    reference = _sparsify(dense)
    model = _meta_flow(build, dense_state)
    assert not unrefreshed_states(model)
    assert nmfx.report(model) == nmfx.report(reference)
    _assert_same_state(model, reference)
    assert torch.equal(model(IDS).logits, reference(IDS).logits)
    train_lm(model, 3)
    train_lm(reference, 3)
    _assert_same_state(model, reference)


def test_sparsify_on_meta_allocates_nothing_and_computes_nothing():
    with torch.device("meta"):
        model = _llama()
    _sparsify(model)
    found = nmfx.states(model)
    assert len(found) == 14
    assert all(buffer.is_meta for state in found.values() for buffer in state.buffers())
    assert set(unrefreshed_states(model).values()) == {"it was built on the meta device"}


def _unrefreshed_mlp():
    with torch.device("meta"):
        model = _sparsify(MLP())
    return model.to_empty(device="cpu")


REFUSED = {
    "step": lambda m: nmfx.step(m),
    "training forward": lambda m: m.train()(X),
    "to_dense": lambda m: nmfx.to_dense(m, MLP(), force=True),
    "to_inference": lambda m: nmfx.to_inference(m, backend="reference", force=True),
    "stats": lambda m: nmfx.stats(m),
}


@pytest.mark.parametrize("action", list(REFUSED))
def test_unrefreshed_model_refuses_naming_refresh(action):
    model = _unrefreshed_mlp()
    with torch.no_grad():
        for p in model.parameters():
            p.normal_()
    before = _snapshot(model)
    with pytest.raises(RuntimeError, match=r"nmfx\.refresh\(model\)") as info:
        REFUSED[action](model)
    assert "never computed from real weights" in str(info.value)
    _assert_unchanged(model, before)
    nmfx.refresh(model)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # force=True's warnings
        REFUSED[action](model)  # works once refreshed


def test_require_refreshed_names_the_action():
    model = _unrefreshed_mlp()
    with pytest.raises(RuntimeError, match=r"^nmfx\.save refused: the masks of 2 sparsified weights"):
        require_refreshed(model, "nmfx.save")
    nmfx.refresh(model)
    require_refreshed(model, "nmfx.save")


@settings(max_examples=12, deadline=None)
@given(fill=st.sampled_from(["zeros", "valid copy", "random bytes"]), seed=st.integers(0, 2**16))
def test_no_buffer_contents_make_an_unrefreshed_model_trainable(fill, seed):
    """to_empty leaves whatever memory held: zeros, random bytes, or even a perfectly valid state (a copy of a
    refreshed model's). None of it passes for computed state: the flag is a Python attribute."""
    torch.manual_seed(seed)
    valid = _sparsify(MLP())
    model = _unrefreshed_mlp()
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for (name, buffer), source in zip(model.named_buffers(), valid.buffers()):
            if fill == "zeros":
                buffer.zero_()
            elif fill == "valid copy":
                buffer.copy_(source)
            else:
                raw = torch.randint(0, 256, (buffer.numel() * buffer.element_size(),), generator=g, dtype=torch.uint8)
                buffer.view(-1).view(torch.uint8).copy_(raw)
    with pytest.raises(RuntimeError, match=r"nmfx\.refresh\(model\)"):
        nmfx.step(model)
    with pytest.raises(RuntimeError, match=r"nmfx\.refresh\(model\)"):
        model.train()(X)


def test_to_empty_of_a_model_built_in_memory_needs_refresh_too():
    """The issue's report: a CPU-built model materialized the same way read its garbage step."""
    model = _sparsify(MLP())
    model.to_empty(device="cpu")
    assert set(unrefreshed_states(model).values()) == {"to_empty left its buffers uninitialised"}
    with pytest.raises(RuntimeError, match=r"nmfx\.refresh\(model\)"):
        nmfx.step(model)
    moved = _sparsify(MLP()).to("meta")
    assert set(unrefreshed_states(moved).values()) == {"its buffers are on the meta device"}
    moved.to_empty(device="cpu")
    assert unrefreshed_states(moved)
    kept = _sparsify(MLP())
    kept.to(torch.float64).to("cpu")  # moves that keep values keep the state
    assert not unrefreshed_states(kept)


def test_refresh_restarts_the_schedule_from_the_current_weights():
    torch.manual_seed(1)
    model = _sparsify(MLP(), method="sdgf")
    opt = torch.optim.SGD(model.parameters(), lr=0.5)
    for _ in range(4):
        model(X).square().mean().backward()
        opt.step()
        opt.zero_grad()
        nmfx.step(model)
    assert int(nmfx.states(model)["fc1.weight"].step) == 4
    nmfx.refresh(model)
    fresh = MLP()
    fresh.load_state_dict({k: v for k, v in model.state_dict().items() if "_nm." not in k})
    _assert_same_state(model, _sparsify(fresh, method="sdgf"))


def test_refresh_refuses_weights_still_on_meta_and_changes_nothing():
    with torch.device("meta"):
        model = _sparsify(MLP())
    with pytest.raises(RuntimeError, match=r"still on the meta device; nothing was changed.*to_empty"):
        nmfx.refresh(model)
    assert all(b.is_meta for b in model.buffers())
    with pytest.raises(ValueError, match="call nmfx.sparsify first"):
        nmfx.refresh(MLP())


def test_dense_weights_assigned_onto_meta_then_refresh():
    """load_state_dict(assign=True) of a dense checkpoint into the meta model: the weights become real, the
    states (still on meta) are allocated on the weights' device by refresh."""
    torch.manual_seed(2)
    dense = MLP()
    state = {k: v.clone() for k, v in dense.state_dict().items()}
    with torch.device("meta"):
        model = _sparsify(MLP())
    model.load_state_dict(state, assign=True)
    assert set(unrefreshed_states(model).values()) == {"dense weights were loaded into it since"}
    nmfx.refresh(model)
    _assert_same_state(model, _sparsify(dense))


def test_dense_checkpoint_into_an_unrefreshed_model_is_the_documented_path():
    torch.manual_seed(3)
    dense = MLP()
    model = _unrefreshed_mlp()
    model.load_state_dict(dense.state_dict())  # strict: the nmfx keys are not reported missing
    assert torch.equal(model.fc1.weight, dense.fc1.weight)
    with pytest.raises(RuntimeError, match="dense weights were loaded"):
        nmfx.step(model)
    nmfx.refresh(model)
    _assert_same_state(model, _sparsify(dense))


def test_bad_checkpoints_are_still_refused_by_an_unrefreshed_model():
    """Only a checkpoint with no nmfx state at all takes the dense path; one with a part of it, or a bad one,
    is refused whole and the model is untouched."""
    source = _sparsify(MLP())
    checkpoint = {k: v.clone() for k, v in source.state_dict().items()}
    partial = {k: v for k, v in checkpoint.items() if not k.startswith("fc2.weight_nm.")}
    bad = {**checkpoint, "fc1.weight_nm.alpha": torch.tensor(float("nan"))}
    for case, message in ((partial, "dense model"), (bad, "alpha=nan")):
        model = _unrefreshed_mlp()
        before = _snapshot(model)
        with pytest.raises(ValueError, match="nothing was loaded") as info:
            model.load_state_dict(case)
        assert message in str(info.value)
        _assert_unchanged(model, before)
        assert len(unrefreshed_states(model)) == 2


def test_a_sparse_checkpoint_resumes_without_refresh():
    """Resuming (the whole model's state_dict, nmfx state included) makes the states real: no refresh, and the
    run continues exactly as the source does."""
    torch.manual_seed(4)
    source = _sparsify(MLP())
    opt = torch.optim.SGD(source.parameters(), lr=0.5)
    for _ in range(3):
        source(X).square().mean().backward()
        opt.step()
        opt.zero_grad()
        nmfx.step(source)
    model = _unrefreshed_mlp()
    model.load_state_dict(source.state_dict())
    assert not unrefreshed_states(model)
    _assert_same_state(model, source)
    nmfx.step(model)
    nmfx.step(source)
    _assert_same_state(model, source)


def test_flag_survives_pickle_and_deepcopy():
    model = _unrefreshed_mlp()
    for copied in (copy.deepcopy(model), pickle.loads(pickle.dumps(model))):
        assert len(unrefreshed_states(copied)) == 2
        with pytest.raises(RuntimeError, match=r"nmfx\.refresh"):
            nmfx.step(copied)
        nmfx.refresh(copied)
        nmfx.step(copied)


@settings(max_examples=10, deadline=None)
@given(pattern=st.sampled_from(["1:4", "2:4", "1:8", "2:8"]), method=st.sampled_from(["dense", "ste", "srste", "mdgf", "sdgf", "gmp"]),
       seed=st.integers(0, 2**16))
def test_meta_flow_equals_in_memory_for_any_pattern_and_method(pattern, method, seed):
    torch.manual_seed(seed)
    dense = MLP()
    state = {k: v.clone() for k, v in dense.state_dict().items()}
    options = {"pattern": pattern, "method": method, "total_steps": 8}
    reference = _sparsify(dense, **options)
    with torch.device("meta"):
        model = _sparsify(MLP(), **options)
    model.to_empty(device="cpu")
    model.load_state_dict(state)
    nmfx.refresh(model)
    _assert_same_state(model, reference)
    assert torch.equal(model(X), reference(X))
    for trained in (model, reference):  # the schedules run on identically (stage changes, gmp's pruning)
        opt = torch.optim.SGD(trained.parameters(), lr=0.1)
        for _ in range(4):
            trained(X).square().mean().backward()
            opt.step()
            opt.zero_grad()
            nmfx.step(trained)
    _assert_same_state(model, reference)


def test_a_state_pickled_before_the_flag_existed_loads_as_computed():
    model = _sparsify(MLP())
    state = nmfx.states(model)["fc1.weight"]
    old = state.__getstate__()
    del old["needs_refresh"]  # what an nmfx without meta-device support pickled
    restored = type(state).__new__(type(state))
    restored.__setstate__(old)
    assert restored.needs_refresh is None
    assert restored.schedule == state.schedule


def test_before_refresh_report_shows_no_density_and_save_pretrained_refuses(tmp_path):
    """A meta-sparsified model reports its decisions without reading its (absent) masks, runs a shape-only
    forward on meta, and, once materialized but not refreshed, refuses save_pretrained and to_inference."""
    with torch.device("meta"):
        model = _llama()
    nmfx.sparsify(model, "1:4", "ste")
    rows = nmfx.report(model)
    assert rows.sparsified and all(row.density is None for row in rows)
    with torch.no_grad():
        logits = model.eval()(torch.zeros(1, 4, dtype=torch.long, device="meta")).logits
    assert logits.is_meta and logits.shape[-1] == 64
    model.to_empty(device="cpu")
    with pytest.raises(RuntimeError, match="save_pretrained refused.*nmfx.refresh"):
        model.save_pretrained(tmp_path / "hf")
    with pytest.raises(RuntimeError, match="nmfx.to_inference refused.*nmfx.refresh"):
        nmfx.to_inference(model)
