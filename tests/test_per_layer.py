"""Per-layer patterns (``pattern={glob: "N:M"}``) and the ``SparsifyConfig`` value: each layer trains,
schedules, reports, lowers, saves and loads with its own pattern; bad entries are refused, naming the glob,
with the model left as it was."""

import json

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from safetensors import safe_open
from torch import nn

import nmfx
from nmfx.config import CONFIG_FORMAT_VERSION, SparsifyConfig
from nmfx.layers import MaskedLinear, NMLinear


class Block(nn.Module):
    def __init__(self, width=32, hidden=64):
        super().__init__()
        self.attn = nn.Linear(width, width)
        self.mlp = nn.Sequential(nn.Linear(width, hidden), nn.ReLU(), nn.Linear(hidden, width))
        self.head = nn.Linear(width, 10)

    def forward(self, x):
        return self.head(self.mlp(torch.relu(self.attn(x))))


MAPPING = {"attn": "2:4", "mlp.*": "1:8"}
X = torch.randn(3, 32, generator=torch.Generator().manual_seed(1))


def _model(seed=0, **kwargs):
    torch.manual_seed(seed)
    return Block(**kwargs)


def _patterns(model):
    return {name: str(state.pattern) for name, state in nmfx.states(model).items()}


def _train(model, steps):
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    for _ in range(steps):
        model(X).square().mean().backward()
        opt.step()
        opt.zero_grad()
        nmfx.step(model)
    return model


def test_each_weight_gets_the_first_matching_pattern():
    model = nmfx.sparsify(_model(), {"mlp.2": "2:8", "attn": "2:4", "mlp.*": "1:8"}, "ste")
    assert _patterns(model) == {"attn.weight": "2:4", "mlp.0.weight": "1:8", "mlp.2.weight": "2:8"}
    for name, mask in nmfx.masks(model).items():
        pattern = nmfx.states(model)[name].pattern
        assert torch.equal(mask.reshape(-1, pattern.m).sum(-1), torch.full((mask.numel() // pattern.m,), pattern.n))
    rows = {row.name: row for row in nmfx.report(model)}
    assert (rows["attn.weight"].pattern, rows["mlp.2.weight"].pattern) == ("2:4", "2:8")
    assert "pattern entry 'mlp.2'" in rows["mlp.2.weight"].reason
    assert rows["head.weight"].status == "skip" and rows["head.weight"].pattern == "-"
    assert "{mlp.2: 2:8, attn: 2:4, mlp.*: 1:8}" in nmfx.report(model).header


def test_roles_select_patterns_and_unmatched_weights_stay_dense():
    model = nmfx.sparsify(_model(), {"mlp.up": "1:4"}, "ste")
    assert _patterns(model) == {"mlp.0.weight": "1:4"}
    rows = {row.name: row for row in nmfx.report(model)}
    assert rows["attn.weight"].status == "skip" and rows["attn.weight"].reason.startswith("no pattern matched")
    assert isinstance(model.attn, nn.Linear) and not isinstance(model.attn, MaskedLinear)
    assert rows["mlp.2.weight"].reason.startswith("no pattern matched")


def test_sdgf_stages_run_per_layer():
    model = nmfx.sparsify(_model(), MAPPING, "sdgf", total_steps=6)
    seen = {name: [] for name in nmfx.states(model)}
    for _ in range(7):
        for name, state in nmfx.states(model).items():
            seen[name].append(str(state.schedule.pattern))
        _train(model, 1)
    assert seen["attn.weight"][0] == "3:4" and seen["attn.weight"][-1] == "2:4"
    assert seen["mlp.0.weight"][0] == "7:8" and seen["mlp.0.weight"][-1] == "1:8"
    assert "4:8" in seen["mlp.0.weight"] and not any(p.endswith(":8") for p in seen["attn.weight"])


@pytest.mark.parametrize("pattern, message", [
    ({"attn": "1:3"}, "pattern entry 'attn' (1:3) matches attn.weight, whose input dim 32 is not divisible by M=3"),
    ({"mlp.*": "2:4", "attn": "one:eight"}, "pattern entry 'attn': invalid N:M pattern 'one:eight'"),
    ({"attn": "1:256"}, "pattern entry 'attn' (1:256)"),
    ({}, "pattern mapping is empty"),
])
def test_bad_entry_names_the_glob_and_leaves_the_model_unchanged(pattern, message):
    model = _model()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    classes = {name: type(m) for name, m in model.named_modules()}
    with pytest.raises(ValueError, match=message.replace("(", r"\(").replace(")", r"\)")):
        nmfx.sparsify(model, pattern, "ste")
    assert {name: type(m) for name, m in model.named_modules()} == classes
    assert model.state_dict().keys() == before.keys()
    assert all(torch.equal(model.state_dict()[k], v) for k, v in before.items())
    assert not nmfx.is_sparsified(model) and not nmfx.states(model)
    nmfx.sparsify(model, MAPPING, "ste")  # nothing was left behind that refuses a later sparsify


def test_entry_unreachable_by_the_schedule_names_the_glob():
    with pytest.raises(ValueError, match=r"pattern entry 'mlp\.\*': sdgf: the schedule \['4:8', '1:8'\] must end"):
        nmfx.sparsify(_model(), {"attn": "1:8", "mlp.*": "2:4"}, "sdgf", schedule=("4:8", "1:8"), total_steps=4)


def test_lowered_layers_keep_their_pattern_and_compute_the_masked_model():
    model = _train(nmfx.sparsify(_model(), MAPPING, "sdgf", total_steps=4), 4)
    inference = nmfx.to_inference(model, backend="reference")
    assert isinstance(inference.attn, NMLinear) and str(inference.attn.pattern) == "2:4"
    assert str(inference.mlp.get_submodule("0").pattern) == "1:8"
    torch.testing.assert_close(inference(X), model(X), rtol=0, atol=1e-6)
    assert {row.name: (row.pattern, row.density) for row in nmfx.report(inference).sparsified} == {
        "attn.weight": ("2:4", 0.5), "mlp.0.weight": ("1:8", 0.125), "mlp.2.weight": ("1:8", 0.125)}


def test_save_and_load_per_layer(tmp_path):
    model = _train(nmfx.sparsify(_model(), MAPPING, "ste"), 2)
    inference = nmfx.to_inference(model, backend="reference")
    path = tmp_path / "m.safetensors"
    nmfx.save(inference, path)
    with safe_open(str(path), framework="pt") as f:
        header = json.loads(f.metadata()["nmfx"])
    assert header["format_version"] == nmfx.serialization.PER_LAYER_FORMAT_VERSION
    assert header["pattern"] == [["attn", "2:4"], ["mlp.*", "1:8"]]
    assert {layer["weight"]: layer["pattern"] for layer in header["layers"]} == {
        "attn.weight": "2:4", "mlp.0.weight": "1:8", "mlp.2.weight": "1:8"}
    with torch.device("meta"):
        fresh = Block()
    loaded = nmfx.load(path, fresh, backend="reference")
    assert loaded is fresh and str(fresh.attn.pattern) == "2:4"
    assert torch.equal(fresh(X), inference(X))


def test_single_pattern_files_keep_format_2(tmp_path):
    inference = nmfx.to_inference(nmfx.sparsify(_model(), "1:4", "ste"), backend="reference")
    nmfx.save(inference, tmp_path / "m.safetensors")
    with safe_open(str(tmp_path / "m.safetensors"), framework="pt") as f:
        header = json.loads(f.metadata()["nmfx"])
    assert (header["format_version"], header["pattern"]) == (2, "1:4")


def test_state_dict_round_trip_and_mismatched_mapping_refused():
    source = _train(nmfx.sparsify(_model(), MAPPING, "sdgf", total_steps=6), 3)
    target = nmfx.sparsify(_model(seed=5), MAPPING, "sdgf", total_steps=6)
    target.load_state_dict(source.state_dict())
    assert torch.equal(target(X), source(X))
    assert all(torch.equal(a, b) for a, b in zip(nmfx.masks(target).values(), nmfx.masks(source).values()))
    other = nmfx.sparsify(_model(seed=5), {"attn": "1:4", "mlp.*": "1:8"}, "sdgf", total_steps=6)
    before = {k: v.clone() for k, v in other.state_dict().items()}
    with pytest.raises(ValueError, match="attn.weight: pattern '2:4' in the checkpoint vs '1:4' in the model"):
        other.load_state_dict(source.state_dict())
    assert all(torch.equal(other.state_dict()[k], v) for k, v in before.items())


# -- SparsifyConfig ---------------------------------------------------------------------------------

def test_config_is_the_same_as_the_arguments():
    config = SparsifyConfig.build(MAPPING, "sdgf", exclude="mlp.2", total_steps=6)
    by_config = nmfx.sparsify(_model(), config)
    by_args = nmfx.sparsify(_model(), MAPPING, "sdgf", exclude="mlp.2", total_steps=6)
    assert _patterns(by_config) == _patterns(by_args) == {"attn.weight": "2:4", "mlp.0.weight": "1:8"}
    assert nmfx.api.record(by_config).config == config == nmfx.api.record(by_args).config
    with pytest.raises(TypeError, match="pass no other arguments"):
        nmfx.sparsify(_model(), config, "ste")
    with pytest.raises(TypeError, match="pass no other arguments"):
        nmfx.sparsify(_model(), config, total_steps=3)


def test_config_is_frozen_and_versioned():
    config = SparsifyConfig.build("1:8", "ste")
    with pytest.raises(AttributeError):
        config.pattern = "2:4"
    data = config.to_dict()
    assert data["format_version"] == CONFIG_FORMAT_VERSION and data["pattern"] == "1:8"
    with pytest.raises(ValueError, match="newer than this nmfx reads"):
        SparsifyConfig.from_dict({**data, "format_version": CONFIG_FORMAT_VERSION + 1})
    with pytest.raises(ValueError, match="unknown fields"):
        SparsifyConfig.from_dict({**data, "patern": "1:4"})
    with pytest.raises(ValueError, match="needs 'pattern'"):
        SparsifyConfig.from_dict({"format_version": 1, "method": data["method"]})
    with pytest.raises(TypeError, match="include= takes a glob"):
        SparsifyConfig.build("1:8", include=3)


_GLOB = st.text(alphabet="abmlp.*0123", min_size=1, max_size=8)
_PATTERN = st.sampled_from(["1:4", "2:4", "1:8", "3:8", "1:16", "4:4"])


@settings(max_examples=40, deadline=None)
@given(pattern=st.one_of(_PATTERN, st.dictionaries(_GLOB, _PATTERN, min_size=1, max_size=4)),
       method=st.sampled_from(["ste", "srste", "mdgf", "dense"]),
       exclude=st.one_of(st.none(), st.lists(_GLOB, max_size=2)),
       include=st.one_of(st.none(), st.lists(_GLOB, max_size=2)))
def test_config_dict_round_trip(pattern, method, exclude, include):
    config = SparsifyConfig.build(pattern, method, include=include, exclude=exclude)
    data = json.loads(json.dumps(config.to_dict(), sort_keys=True))  # a JSON writer that sorts keys
    again = SparsifyConfig.from_dict(data)
    assert again == config and again.to_dict() == config.to_dict()
    assert again.per_layer == isinstance(pattern, dict)
    if isinstance(pattern, dict):
        assert [glob for glob, _ in again.pattern] == list(pattern)  # match order survives


# -- Hugging Face ------------------------------------------------------------------------------------

def test_hf_save_and_from_pretrained_per_layer(tmp_path):
    transformers = pytest.importorskip("transformers")
    from nmfx.integrations import hf

    transformers.logging.set_verbosity_error()
    try:
        torch.manual_seed(0)
        config = transformers.GPT2Config(n_layer=2, n_embd=32, n_head=2, vocab_size=64, n_positions=16,
                                         bos_token_id=0, eos_token_id=0)
        model = transformers.GPT2LMHeadModel(config).eval()
        nmfx.sparsify(model, {"*.attn.*": "2:4", "*.mlp.*": "1:8"}, "mdgf", total_steps=12)
        ids = torch.randint(0, 64, (2, 8), generator=torch.Generator().manual_seed(3))
        opt = torch.optim.SGD(model.parameters(), lr=0.5)
        for _ in range(2):
            model(ids, labels=ids).loss.backward()
            opt.step()
            opt.zero_grad()
            nmfx.step(model)
        model.save_pretrained(tmp_path)
        record = json.loads((tmp_path / "config.json").read_text())["nmfx"]
        assert record["format_version"] == 2 and record["pattern"] == [["*.attn.*", "2:4"], ["*.mlp.*", "1:8"]]
        restored = hf.from_pretrained(type(model), tmp_path)
        assert _patterns(restored) == _patterns(model)
        assert {p for p in _patterns(model).values()} == {"2:4", "1:8"}
        assert torch.equal(restored(ids).logits, model(ids).logits)
    finally:
        transformers.logging.set_verbosity_warning()


def test_to_dense_per_layer():
    model = _train(nmfx.sparsify(_model(), MAPPING, "ste"), 2)
    dense = nmfx.to_dense(model, into=Block())
    assert type(dense.attn) is nn.Linear and torch.equal(dense(X), model(X))
    inference = nmfx.to_inference(model, backend="reference")
    assert torch.equal(nmfx.to_dense(inference, into=Block())(X), inference(X))


@pytest.mark.parametrize("criterion", ["magnitude", "wanda", "sparsegpt"])
def test_prune_per_layer(criterion):
    model = _model()
    calibration = [torch.randn(8, 32, generator=torch.Generator().manual_seed(i)) for i in range(2)]
    nmfx.prune(model, MAPPING, calibration, criterion)
    assert _patterns(model) == {"attn.weight": "2:4", "mlp.0.weight": "1:8", "mlp.2.weight": "1:8"}
    for name, state in nmfx.states(model).items():
        weight = model.get_parameter(name)
        kept = (weight != 0).reshape(-1, state.pattern.m).sum(-1)
        assert kept.le(state.pattern.n).all(), name  # pruned to its own pattern
        assert torch.equal(state.mask, nmfx.nm_mask(weight.abs() + state.mask.float(), state.pattern))
    with pytest.raises(ValueError, match="blocksize must be a positive multiple of M=8"):
        nmfx.prune(_model(), MAPPING, calibration, "sparsegpt", blocksize=4)


_NAMES = ["attn", "attn.*", "mlp.*", "mlp.0", "mlp.2.weight", "mlp.up", "mlp.down", "other", "*", "*.weight", "head"]


@pytest.mark.filterwarnings("ignore:nmfx.sparsify. nothing in")
@settings(max_examples=30, deadline=None)
@given(entries=st.lists(st.tuples(st.sampled_from(_NAMES), st.sampled_from(["1:4", "2:4", "1:8", "2:8"])),
                        min_size=1, max_size=4, unique_by=lambda e: e[0]))
def test_first_matching_entry_wins(entries):
    """Against a plain reference: the first glob matching the weight, its module or its role gives the pattern;
    heads stay out unless included; no match leaves the weight dense."""
    import fnmatch

    model = nmfx.sparsify(_model(), dict(entries), "ste")
    rows = {row.name: row for row in nmfx.report(model)}
    for name, row in rows.items():
        texts = (name, name.rpartition(".")[0], row.role)
        match = next((p for glob, p in entries if any(fnmatch.fnmatchcase(t, glob) for t in texts)), None)
        expected = None if row.role == "head" else match
        assert (str(nmfx.states(model)[name].pattern) if name in nmfx.states(model) else None) == expected, name
        if expected is None and row.role != "head":
            assert row.reason.startswith("no pattern matched")
