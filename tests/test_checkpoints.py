"""Training checkpoints that travel: a tensors-only state_dict (safetensors round trip), all-or-nothing
checked loads (every nmfx state before any copy), nmfx format 1, and Hugging Face ``save_pretrained`` /
``from_pretrained`` of sparsified models (effective weights under the usual keys)."""

import copy
import json
import os
import pickle

import pytest
import safetensors.torch
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

import nmfx
from tests.lm_cases import IDS, train_lm
from nmfx.ops import effective_weight
from nmfx.state import FORMAT_VERSION


class MLP(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc1 = nn.Linear(64, 64)
        self.fc2 = nn.Linear(64, 64)
        self.out = nn.Linear(64, 4)

    def forward(self, x):
        return self.out(torch.relu(self.fc2(torch.relu(self.fc1(x)))))


CASES = {
    "mdgf": {"total_steps": 12, "dense_steps": 1},
    "sdgf": {"total_steps": 12},
    "srste": {"total_steps": 12},
    "dense": {},
}


def _sparsified(method="mdgf", seed=0, **options):
    torch.manual_seed(seed)
    return nmfx.sparsify(MLP(), "1:8", method, **(options or CASES[method]))


def _train(model, steps, seed=1):
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    g = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        model(torch.randn(8, 64, generator=g)).square().mean().backward()
        opt.step()
        opt.zero_grad()
        nmfx.step(model)
    return model


def _snapshot(model):
    return {k: v.clone() for k, v in model.state_dict().items()}


def _assert_same_state(model, expected):
    current = model.state_dict()
    assert current.keys() == expected.keys()
    for key, value in expected.items():
        assert torch.equal(current[key], value), key


X = torch.randn(5, 64, generator=torch.Generator().manual_seed(7))


# -- tensors only, safetensors ----------------------------------------------------------------------
def test_state_dict_holds_tensors_only():
    model = _sparsified()
    state = model.state_dict()
    assert all(isinstance(v, torch.Tensor) for v in state.values())
    config = state["fc1.weight_nm.config"]
    assert config.dtype == torch.uint8 and config.dim() == 1
    decoded = json.loads(bytes(config.tolist()))
    assert decoded == nmfx.states(model)["fc1.weight"].config_dict() and decoded["format_version"] == FORMAT_VERSION


@pytest.mark.parametrize("method", list(CASES))
def test_safetensors_round_trip_is_exact(method, tmp_path):
    """save_file / load_file -> load_state_dict into a fresh model restores everything, and both train on
    identically (the schedule state came along)."""
    trained = _train(_sparsified(method), 5)
    path = tmp_path / "ckpt.safetensors"
    safetensors.torch.save_file(trained.state_dict(), path)
    fresh = _sparsified(method, seed=3)
    fresh.load_state_dict(safetensors.torch.load_file(path))
    _assert_same_state(fresh, _snapshot(trained))
    assert torch.equal(fresh(X), trained(X))
    _train(trained, 3, seed=2)
    _train(fresh, 3, seed=2)
    _assert_same_state(fresh, _snapshot(trained))


@pytest.mark.filterwarnings("ignore:torch.distributed is disabled")
def test_distributed_checkpoint_round_trip(tmp_path):
    """torch.distributed.checkpoint (single process) saves and loads the tensors-only state_dict in place."""
    import torch.distributed.checkpoint as dcp

    trained = _train(_sparsified("sdgf"), 5)
    dcp.save(trained.state_dict(), checkpoint_id=tmp_path)
    fresh = _sparsified("sdgf", seed=3)
    state = fresh.state_dict()
    dcp.load(state, checkpoint_id=tmp_path)
    fresh.load_state_dict(state)
    _assert_same_state(fresh, _snapshot(trained))


# -- all or nothing ---------------------------------------------------------------------------------
def _set(key, value):
    return lambda sd: sd.__setitem__(key, value)


def _mask_with_two_per_group(sd):
    mask = sd["fc2.weight_nm.mask"].clone().reshape(-1, 8)
    mask[:, 0] = mask[:, 1] = True  # groups where position 0/1 was not the kept one now keep 2 or 3
    sd["fc2.weight_nm.mask"] = mask.reshape(64, 64)


def _mask_with_a_byte_2(sd):
    """A bool tensor whose storage holds a 2 (safetensors reads raw bytes): not a valid bool tensor."""
    data = sd["fc2.weight_nm.mask"].clone().view(torch.uint8)
    data[data == 1] = 2
    sd["fc2.weight_nm.mask"] = data.view(torch.bool)


def _config(**changes):
    def mutate(sd):
        config = json.loads(bytes(sd["fc2.weight_nm.config"].tolist()))
        config.update(changes)
        sd["fc2.weight_nm.config"] = torch.tensor(list(json.dumps(config).encode()), dtype=torch.uint8)
    return mutate


BAD = {
    "step<0": (_set("fc2.weight_nm.step", torch.tensor(-5)), "step=-5 is not >= 0"),
    "step float": (_set("fc2.weight_nm.step", torch.tensor(3.0)), "step must be an integer"),
    "alpha nan": (_set("fc2.weight_nm.alpha", torch.tensor(float("nan"))), "alpha=nan"),
    "alpha inf": (_set("fc2.weight_nm.alpha", torch.tensor(float("inf"))), "alpha=inf"),
    "alpha>1": (_set("fc2.weight_nm.alpha", torch.tensor(1.5)), "alpha=1.5"),
    "alpha int": (_set("fc2.weight_nm.alpha", torch.tensor(1)), "alpha must be a floating-point"),
    "lambda<0": (_set("fc2.weight_nm.srste_lambda", torch.tensor(-1e-3)), "srste_lambda="),
    "lambda nan": (_set("fc2.weight_nm.srste_lambda", torch.tensor(float("nan"))), "srste_lambda=nan"),
    "mask all kept": (_set("fc2.weight_nm.mask", torch.ones(64, 64, dtype=torch.bool)), "not a valid 1:8 mask"),
    "mask none kept": (_set("fc2.weight_nm.mask", torch.zeros(64, 64, dtype=torch.bool)), "not a valid 1:8 mask"),
    "mask two kept": (_mask_with_two_per_group, "not a valid 1:8 mask"),
    "mask bytes": (_mask_with_a_byte_2, "bytes other than 0 and 1"),
    "mask nan float": (_set("fc2.weight_nm.mask", torch.full((64, 64), float("nan"))), "mask must be a bool tensor"),
    "mask shape": (_set("fc2.weight_nm.mask", torch.ones(64, 8, dtype=torch.bool)), "mask has shape (64, 8)"),
    "mask missing": (lambda sd: sd.pop("fc2.weight_nm.mask"), "mask is missing"),
    "other pattern": (_config(pattern="2:8"), "pattern '2:8' in the checkpoint"),
    "other method": (_config(method={"method": "ste", "version": 1}), "method"),
    "newer format": (_config(format_version=FORMAT_VERSION + 1), "newer nmfx"),
    "config garbage": (_set("fc2.weight_nm.config", torch.tensor([255, 0, 3], dtype=torch.uint8)), "not readable"),
    "config float": (_set("fc2.weight_nm.config", torch.zeros(3)), "not readable"),
    "config json list": (_set("fc2.weight_nm.config", torch.tensor(list(b"[1, 2]"), dtype=torch.uint8)), "not readable"),
    "unknown entry": (_set("fc2.weight_nm.junk", torch.zeros(())), "unknown nmfx entries ['junk']"),
    "no state": (lambda sd: [sd.pop(k) for k in list(sd) if k.startswith("fc2.weight_nm.")], "dense model"),
    "stray state": (_set("out.weight_nm.step", torch.tensor(1)), "out.weight: the checkpoint has nmfx state"),
    # torch's own shape check runs per tensor while copying: without nmfx's it would overwrite fc1 first
    "weight shape": (_set("fc2.weight", torch.zeros(64, 32)), "fc2.weight: shape (64, 32) in the checkpoint vs (64, 64)"),
    "head shape": (_set("out.weight", torch.zeros(5, 64)), "out.weight: shape (5, 64) in the checkpoint vs (4, 64)"),
}


@pytest.mark.parametrize("case", list(BAD))
def test_bad_checkpoint_refused_before_anything_is_copied(case):
    """The bad entry is in the *second* layer: a load that copied layer by layer would already have
    overwritten the first (and the head) with the trained values."""
    mutate, message = BAD[case]
    checkpoint = _snapshot(_train(_sparsified(), 4))
    mutate(checkpoint)
    target = _sparsified(seed=5)
    before, outputs = _snapshot(target), target(X)
    with pytest.raises(ValueError, match="nothing was loaded") as info:
        target.load_state_dict(checkpoint)
    assert message in str(info.value)
    assert "fc2.weight" in str(info.value) or "out.weight" in str(info.value)
    _assert_same_state(target, before)
    assert torch.equal(target(X), outputs)


class _Resizing(nn.Module):
    """Loads a buffer of any length, as torch.ao's per-channel observers and fake-quantizers do (their
    ``_load_from_state_dict`` resizes it to the checkpoint's)."""

    def __init__(self):
        super().__init__()
        self.register_buffer("scale", torch.ones(1))

    def _load_from_state_dict(self, state_dict, prefix, *args):
        if prefix + "scale" in state_dict:
            self.scale.resize_(state_dict[prefix + "scale"].shape)
        super()._load_from_state_dict(state_dict, prefix, *args)

    def forward(self, x):
        return x * self.scale


def test_shape_check_accepts_what_torch_loads():
    """nmfx's early shape check must not refuse what torch itself loads: a module that loads itself (here one
    resizing its buffer) and a lazy buffer (torch materializes it from the checkpoint). A wrong shape is still
    refused before anything is copied."""
    def build():
        torch.manual_seed(0)
        model = nn.Sequential(nn.Linear(16, 16), nn.ReLU(), nn.Linear(16, 8), _Resizing(), nn.LazyBatchNorm1d(affine=False))
        return nmfx.sparsify(model, "2:4", "ste", include="0")

    trained = build()
    trained[3].scale = torch.rand(8)
    trained.train()(torch.randn(4, 16))
    checkpoint = _snapshot(trained)
    target = build()
    target.load_state_dict(checkpoint)
    _assert_same_state(target, checkpoint)
    checkpoint["2.bias"] = torch.zeros(9)
    fresh = build()
    before = {k: v.clone() for k, v in fresh.state_dict().items() if not k.startswith("4.")}  # 4: still lazy
    with pytest.raises(ValueError, match=r"2\.bias: shape \(9,\) in the checkpoint vs \(8,\)"):
        fresh.load_state_dict(checkpoint)
    assert all(torch.equal(fresh.state_dict()[k], v) for k, v in before.items())


def test_first_problems_all_named():
    checkpoint = _snapshot(_train(_sparsified(), 4))
    checkpoint["fc1.weight_nm.alpha"] = torch.tensor(float("nan"))
    checkpoint["fc2.weight_nm.step"] = torch.tensor(-5)
    with pytest.raises(ValueError) as info:
        _sparsified(seed=5).load_state_dict(checkpoint)
    assert "fc1.weight: alpha=nan" in str(info.value) and "fc2.weight: step=-5" in str(info.value)


@settings(max_examples=25, deadline=None)
@given(seed=st.integers(0, 2**31 - 1), n_bad=st.integers(0, 3), bad_count=st.sampled_from([0, 2, 3, 8]))
def test_mask_accepted_exactly_when_every_group_keeps_n(seed, n_bad, bad_count):
    """A random 1:8 mask with ``n_bad`` groups corrupted to keep ``bad_count``: loaded (and used) iff
    ``n_bad == 0``."""
    g = torch.Generator().manual_seed(seed)
    keep = torch.randint(0, 8, (64 * 8,), generator=g)
    groups = torch.zeros(64 * 8, 8, dtype=torch.bool)
    groups[torch.arange(64 * 8), keep] = True
    for index in torch.randperm(64 * 8, generator=g)[:n_bad].tolist():
        groups[index] = False
        groups[index, torch.randperm(8, generator=g)[:bad_count]] = True
    mask = groups.reshape(64, 64)
    checkpoint = _snapshot(_sparsified(method="ste", total_steps=12))
    checkpoint["fc1.weight_nm.mask"] = mask
    target = _sparsified(method="ste", seed=1, total_steps=12)
    if n_bad:
        with pytest.raises(ValueError, match="not a valid 1:8 mask"):
            target.load_state_dict(checkpoint)
    else:
        target.load_state_dict(checkpoint)
        assert torch.equal(nmfx.masks(target)["fc1.weight"], mask)
        expected = nn.functional.linear(X, torch.where(mask, target.fc1.weight, 0), target.fc1.bias)
        assert torch.equal(target.fc1(X), expected)


def test_mask_checked_against_the_pattern_of_the_checkpoint_step():
    """SDGF at step 2 of 12 uses 7:8 masks (stepwise 7:8 -> 4:8 -> 2:8 -> 1:8): a 7:8 mask loads, the
    target 1:8 mask is refused at that step, and accepted with a step in the last stage."""
    source = _train(_sparsified("sdgf"), 2)
    assert nmfx.states(source)["fc1.weight"].schedule.pattern == nmfx.Pattern(7, 8)
    checkpoint = _snapshot(source)
    target = _sparsified("sdgf", seed=2)
    target.load_state_dict(checkpoint)
    _assert_same_state(target, checkpoint)
    target_mask = nmfx.nm_mask(source.fc1.weight, "1:8")
    with pytest.raises(ValueError, match=r"not a valid 7:8 mask \(the pattern at step 2\)"):
        target.load_state_dict({**checkpoint, "fc1.weight_nm.mask": target_mask})
    late = {**checkpoint, "fc1.weight_nm.mask": target_mask, "fc2.weight_nm.mask": nmfx.nm_mask(source.fc2.weight, "1:8")}
    late.update({f"fc{i}.weight_nm.step": torch.tensor(11) for i in (1, 2)})
    target.load_state_dict(late)
    assert torch.equal(nmfx.masks(target)["fc1.weight"], target_mask)


def test_strict_false_gives_advice_that_works():
    """torch runs load hooks with strict=True whatever the caller passed, so the refusal cannot suggest
    strict=False; it says to load before sparsify, and that works."""
    torch.manual_seed(9)
    dense = MLP()
    target = _sparsified()
    with pytest.raises(ValueError) as info:
        target.load_state_dict(dense.state_dict(), strict=False)
    message = str(info.value)
    assert "before nmfx.sparsify" in message and "pass strict=False" not in message
    fresh = MLP()
    fresh.load_state_dict(dense.state_dict())
    nmfx.sparsify(fresh, "1:8", "mdgf", **CASES["mdgf"])
    assert torch.equal(nmfx.masks(fresh)["fc1.weight"], nmfx.nm_mask(dense.fc1.weight, "1:8"))


def test_loading_into_a_submodule_is_checked_too():
    checkpoint = _snapshot(_train(_sparsified(), 4))
    sub = {k[len("fc2."):]: v for k, v in checkpoint.items() if k.startswith("fc2.")}
    target = _sparsified(seed=5)
    with pytest.raises(ValueError, match="alpha=nan"):
        target.fc2.load_state_dict({**sub, "weight_nm.alpha": torch.tensor(float("nan"))})
    target.fc2.load_state_dict(sub)
    assert torch.equal(nmfx.masks(target)["fc2.weight"], checkpoint["fc2.weight_nm.mask"])


def _effective_layout(model):
    """The state_dict as nmfx's save_pretrained writes it: effective weights + the pruned dense values."""
    out = _snapshot(model)
    for name, state in nmfx.states(model).items():
        weight = model.get_parameter(name).detach()
        out[name] = effective_weight(weight, state.mask, state.alpha)
        out[f"{name}_nm.pruned"] = weight[~state.mask]
    return out


def test_effective_weight_layout_rebuilds_the_dense_weights():
    trained = _train(_sparsified("mdgf"), 4)
    assert 0 < float(nmfx.states(trained)["fc1.weight"].alpha) < 1
    checkpoint = _effective_layout(trained)
    assert not torch.equal(checkpoint["fc1.weight"], trained.fc1.weight)
    target = _sparsified("mdgf", seed=5)
    target.load_state_dict(checkpoint)
    _assert_same_state(target, _snapshot(trained))


@pytest.mark.parametrize("change, message", [
    (lambda sd: sd.__setitem__("fc2.weight_nm.pruned", sd["fc2.weight_nm.pruned"][:-1]), "pruned has 3583 values"),
    (lambda sd: sd.__setitem__("fc2.weight_nm.pruned", sd["fc2.weight_nm.pruned"].double()), "pruned must be a 1-D"),
    (lambda sd: sd.__setitem__("fc2.weight", sd["fc2.weight"][:8]), "fc2.weight: shape (8, 64) in the checkpoint"),
    (lambda sd: sd.pop("fc2.weight"), "the weight is missing from the checkpoint"),
    (lambda sd: sd.__setitem__("fc2.weight", sd["fc2.weight"].to(torch.int32)), "a plain floating-point tensor"),
    (lambda sd: sd["fc2.weight"].add_(1e-3), "not the effective weight of the pruned values"),
])
def test_effective_weight_layout_checked(change, message):
    checkpoint = _effective_layout(_train(_sparsified("mdgf"), 4))
    change(checkpoint)
    target = _sparsified("mdgf", seed=5)
    before = _snapshot(target)
    with pytest.raises(ValueError, match="nothing was loaded") as info:
        target.load_state_dict(checkpoint)
    assert message in str(info.value)
    _assert_same_state(target, before)


def test_effective_weight_layout_into_a_submodule_refused():
    checkpoint = _effective_layout(_train(_sparsified("mdgf"), 4))
    sub = {k[len("fc2."):]: v for k, v in checkpoint.items() if k.startswith("fc2.")}
    with pytest.raises(ValueError, match="load it into the whole sparsified model"):
        _sparsified("mdgf", seed=5).fc2.load_state_dict(sub)


def test_mismatch_advice_names_the_fix():
    checkpoint = _snapshot(_sparsified("ste", total_steps=12))
    with pytest.raises(ValueError, match="same pattern, method, method options and include/exclude"):
        nmfx.sparsify(MLP(), "2:8", "ste", total_steps=12).load_state_dict(checkpoint)


# -- format 1 ---------------------------------------------------------------------------------------
def _format1(state_dict, model, **changes):
    """The state_dict as nmfx format 1 wrote it: the config as a JSON string ``_extra_state``."""
    out = {k: v for k, v in state_dict.items() if not k.endswith("_nm.config")}
    for name, state in nmfx.states(model).items():
        config = {**state.config_dict(), "format_version": 1, **changes}
        out[f"{name}_nm._extra_state"] = json.dumps(config, sort_keys=True)
    return out


def test_format1_checkpoint_loads():
    trained = _train(_sparsified(), 5)
    target = _sparsified(seed=5)
    target.load_state_dict(_format1(trained.state_dict(), trained))
    _assert_same_state(target, _snapshot(trained))
    with pytest.raises(ValueError, match="pattern '2:8' in the checkpoint"):
        _sparsified(seed=5).load_state_dict(_format1(trained.state_dict(), trained, pattern="2:8"))


def test_checked_model_still_pickles_and_copies():
    model = _sparsified()
    state = nmfx.states(model)["fc1.weight"]
    state.mark_checked({"mask": state.mask})  # as a load refused later by torch would leave it
    restored = pickle.loads(pickle.dumps(model))
    assert torch.equal(restored(X), model(X))
    assert torch.equal(copy.deepcopy(model)(X), model(X))


# -- Hugging Face -----------------------------------------------------------------------------------
transformers = pytest.importorskip("transformers")
from nmfx.integrations import hf  # noqa: E402  (needs transformers)


def _gpt2(seed=0):
    torch.manual_seed(seed)
    config = transformers.GPT2Config(n_layer=2, n_embd=32, n_head=2, vocab_size=64, n_positions=16,
                                     bos_token_id=0, eos_token_id=0)
    return transformers.GPT2LMHeadModel(config).eval()


def _llama(seed=0):
    torch.manual_seed(seed)
    config = transformers.LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                      num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=16,
                                      bos_token_id=0, eos_token_id=0, pad_token_id=0)
    return transformers.LlamaForCausalLM(config).eval()




@pytest.fixture(autouse=False)
def quiet_transformers():
    transformers.logging.set_verbosity_error()
    yield
    transformers.logging.set_verbosity_warning()


@pytest.mark.parametrize("build", [_gpt2, _llama], ids=["gpt2", "llama"])
def test_save_pretrained_round_trip(build, tmp_path, quiet_transformers):
    """Mid-schedule (alpha between 0 and 1): a plain from_pretrained computes what the sparsified model
    computes; nmfx's from_pretrained restores the sparsified model itself, which trains on identically."""
    model = train_lm(nmfx.sparsify(build(), "1:8", "mdgf", total_steps=12), 3)
    alpha = float(next(iter(nmfx.states(model).values())).alpha)
    assert 0 < alpha < 1
    logits = model(IDS).logits
    model.save_pretrained(tmp_path)

    record = json.loads((tmp_path / "config.json").read_text())["nmfx"]
    assert record["pattern"] == "1:8" and record["method"]["method"] == "mdgf"
    assert record["sparsified"] == sorted(nmfx.states(model)) and not hasattr(model.config, "nmfx")
    saved = safetensors.torch.load_file(tmp_path / "model.safetensors")
    for name, state in nmfx.states(model).items():
        weight = model.get_parameter(name).detach()
        assert torch.equal(saved[name], effective_weight(weight, state.mask, state.alpha)), name
        assert torch.equal(saved[f"{name}_nm.pruned"], weight[~state.mask])

    plain = type(model).from_pretrained(tmp_path).eval()
    assert torch.equal(plain(IDS).logits, logits)
    dense = build()
    dense.load_state_dict({k: v for k, v in model.state_dict().items() if "_nm." not in k}, strict=False)
    assert not torch.allclose(dense(IDS).logits, logits)  # the dense weights would be another function

    restored = hf.from_pretrained(type(model), tmp_path)
    _assert_same_state(restored, _snapshot(model))
    assert torch.equal(restored(IDS).logits, logits)
    train_lm(model, 2)
    train_lm(restored, 2)
    _assert_same_state(restored, _snapshot(model))


def test_inference_model_save_pretrained_refused(tmp_path, quiet_transformers):
    model = nmfx.sparsify(_gpt2(), "1:8", "ste")
    inference = nmfx.to_inference(model, backend="reference")
    with pytest.raises(ValueError, match=r"nmfx\.save\(model, path\)"):
        inference.save_pretrained(tmp_path / "out")
    assert not (tmp_path / "out").exists()
    copied = copy.deepcopy(model)
    assert copied.save_pretrained.model is copied  # a copy saves itself, not the original


def test_from_pretrained_refuses_what_nmfx_did_not_save(tmp_path, quiet_transformers):
    _gpt2().save_pretrained(tmp_path / "dense")
    with pytest.raises(ValueError, match="no 'nmfx' record"):
        hf.from_pretrained(transformers.GPT2LMHeadModel, tmp_path / "dense")

    model = train_lm(nmfx.sparsify(_gpt2(), "1:8", "mdgf", total_steps=12), 2)
    model.save_pretrained(tmp_path / "sparse")
    # loaded without nmfx and saved again: the record is in config.json, the nmfx tensors are gone
    transformers.GPT2LMHeadModel.from_pretrained(tmp_path / "sparse").save_pretrained(tmp_path / "resaved")
    with pytest.raises(ValueError, match="hold no nmfx state"):
        hf.from_pretrained(transformers.GPT2LMHeadModel, tmp_path / "resaved")

    path = tmp_path / "sparse" / "model.safetensors"
    tensors = safetensors.torch.load_file(path)
    name = sorted(nmfx.states(model))[0]
    tensors[name] = tensors[name].clone()
    tensors[name][~nmfx.masks(model)[name]] += 1.0  # a pruned position no longer matches the pruned values
    safetensors.torch.save_file(tensors, path, metadata={"format": "pt"})
    with pytest.raises(ValueError, match="not the effective weight of the pruned values"):
        hf.from_pretrained(transformers.GPT2LMHeadModel, tmp_path / "sparse")

    config = json.loads((tmp_path / "sparse" / "config.json").read_text())
    config["nmfx"]["format_version"] = 99
    (tmp_path / "sparse" / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match="newer than this nmfx"):
        hf.from_pretrained(transformers.GPT2LMHeadModel, tmp_path / "sparse")


def test_sparsify_warns_on_a_plainly_loaded_nmfx_checkpoint(tmp_path, quiet_transformers):
    nmfx.sparsify(_gpt2(), "1:8", "ste").save_pretrained(tmp_path)
    plain = transformers.GPT2LMHeadModel.from_pretrained(tmp_path)
    assert "nmfx" in plain.config.to_dict()
    with pytest.warns(UserWarning, match=r"nmfx\.integrations\.hf\.from_pretrained"):
        nmfx.sparsify(plain, "1:8", "ste")


def test_save_pretrained_files_list(tmp_path, quiet_transformers):
    """Only the usual files: config.json (with the record), generation_config.json, model.safetensors."""
    nmfx.sparsify(_gpt2(), "1:8", "ste").save_pretrained(tmp_path)
    assert sorted(os.listdir(tmp_path)) == ["config.json", "generation_config.json", "model.safetensors"]


def test_sharded_save_pretrained_round_trip(tmp_path, quiet_transformers):
    model = train_lm(nmfx.sparsify(_gpt2(), "1:8", "sdgf", total_steps=12), 4)
    model.save_pretrained(tmp_path, max_shard_size="20KB")
    assert (tmp_path / "model.safetensors.index.json").exists() and not (tmp_path / "model.safetensors").exists()
    restored = hf.from_pretrained(transformers.GPT2LMHeadModel, tmp_path)
    _assert_same_state(restored, _snapshot(model))
    assert torch.equal(restored(IDS).logits, model(IDS).logits)


def test_dense_checkpoint_refused_by_a_computed_model_and_taken_by_a_meta_built_one():
    """A model sparsified in memory has masks of its own weights: a dense checkpoint is refused (load before
    sparsify). One sparsified on the meta device and materialized has none: it takes the dense checkpoint whole,
    and nmfx.refresh computes its masks, as sparsifying the loaded model would."""
    torch.manual_seed(9)
    dense = MLP()
    with pytest.raises(ValueError, match=r"then call nmfx\.refresh\(model\)"):
        _sparsified().load_state_dict(dense.state_dict())
    with torch.device("meta"):
        meta = nmfx.sparsify(MLP(), "1:8", "mdgf", **CASES["mdgf"])
    meta.to_empty(device="cpu")
    meta.load_state_dict(dense.state_dict())
    with pytest.raises(RuntimeError, match=r"nmfx\.refresh\(model\)"):
        meta(X)
    nmfx.refresh(meta)
    fresh = MLP()
    fresh.load_state_dict(dense.state_dict())
    _assert_same_state(meta, nmfx.sparsify(fresh, "1:8", "mdgf", **CASES["mdgf"]).state_dict())


def test_effective_state_dict_gathers_sharded_weights_and_masks(quiet_transformers):
    """Under FSDP2 a state dict holds DTensor shards of the weight and (since masks are sharded) of its
    mask: save_pretrained's effective weights gather both (stood in for here by objects with full_tensor)."""
    from nmfx.integrations.hf import effective_state_dict

    class Shard:  # the part of the DTensor API effective_state_dict uses
        def __init__(self, full):
            self.full = full

        def full_tensor(self):
            return self.full

    model = train_lm(nmfx.sparsify(_gpt2(), "1:8", "ste", total_steps=4), 1)
    plain = model.state_dict()
    sharded = dict(plain)
    for name in nmfx.states(model):
        for key in (name, f"{name}_nm.mask"):
            sharded[key] = Shard(plain[key])
    expected, got = effective_state_dict(model, plain), effective_state_dict(model, sharded)
    for name in nmfx.states(model):
        assert torch.equal(got[name], expected[name]) and torch.equal(got[f"{name}_nm.pruned"], expected[f"{name}_nm.pruned"])
