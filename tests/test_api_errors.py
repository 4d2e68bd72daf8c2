"""Bad inputs to the public API: clear errors and warnings, no half-done rewrites, a report that works."""

from __future__ import annotations

import copy
import warnings

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

import nmfx


class MLP(nn.Module):
    def __init__(self, d=32, h=64, out=8):
        super().__init__()
        self.fc1 = nn.Linear(d, h)
        self.fc2 = nn.Linear(h, d)
        self.head = nn.Linear(d, out)

    def forward(self, x):
        return self.head(x + self.fc2(F.relu(self.fc1(x))))


class Body(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc1 = nn.Linear(16, 32)
        self.fc2 = nn.Linear(32, 16)

    def forward(self, x):
        return self.fc2(F.relu(self.fc1(x)))


class Outer(nn.Module):
    def __init__(self):
        super().__init__()
        self.body = nn.Sequential(Body(), Body())
        self.head = nn.Linear(16, 4)

    def forward(self, x):
        return self.head(self.body(x))


def fresh(seed=0) -> MLP:
    torch.manual_seed(seed)
    return MLP()


def snapshot(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in model.state_dict().items()}


def assert_untouched(model: nn.Module, before: dict[str, torch.Tensor], module_types: dict[str, type]) -> None:
    assert not nmfx.is_sparsified(model)
    after = model.state_dict()
    assert set(after) == set(before)
    assert all(torch.equal(after[k], before[k]) for k in before)
    assert {n: type(m) for n, m in model.named_modules()} == module_types
    assert nmfx.masks(model) == {} and nmfx.graphs(model) == {}


def nothing_sparsified_warning(record) -> str:
    messages = [str(w.message) for w in record if "nothing in" in str(w.message)]
    assert len(messages) == 1, [str(w.message) for w in record]
    return messages[0]


# ----------------------------------------------------------------------------------------------
# type errors
# ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("value, type_name", [
    ("model", "str"), (torch.randn(3), "Tensor"), (None, "NoneType"), ([nn.Linear(4, 4)], "list"),
    (nn.Linear, "type"), ({"fc": nn.Linear(4, 4)}, "dict"),
])
def test_non_module_input_raises_type_error(value, type_name):
    with pytest.raises(TypeError, match=rf"torch\.nn\.Module.*got {type_name}\b"):
        nmfx.sparsify(value, "2:4", "ste")


# ----------------------------------------------------------------------------------------------
# models with nothing to do
# ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("build", [
    lambda: nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU()),
    lambda: nn.Sequential(nn.ReLU(), nn.Dropout()),
    lambda: nn.Sequential(nn.Embedding(10, 4), nn.LayerNorm(4)),
], ids=["conv", "no-params", "embedding-layernorm"])
def test_no_prunable_op_warns_and_report_works(build):
    model = build()
    with pytest.warns(UserWarning) as record:
        result = nmfx.sparsify(model, "2:4", "ste")
    assert result is model
    message = nothing_sparsified_warning(record)
    assert "Sequential" in message and "no linear-like op" in message and "nmfx.report" in message
    assert record[0].filename == __file__, "the warning should point at the caller (stacklevel)"
    report = nmfx.report(model)
    assert list(report) == [] and report.sparsified == []
    text = str(report)
    assert "0/0 weights sparsified" in text
    for column in report.columns:
        assert column in text
    assert nmfx.masks(model) == {} and nmfx.states(model) == {} and nmfx.graphs(model) == {}
    nmfx.step(model)  # a no-op, not an error


def test_bare_linear_top_level_is_sparsified_in_place():
    """A bare nn.Linear root keeps its object: its class becomes MaskedLinear (tests/test_root_forward.py)."""
    model = nn.Linear(8, 8)
    assert nmfx.sparsify(model, "2:4", "ste") is model
    (row,) = nmfx.report(model)
    assert row.name == "weight" and row.status == "sparsified"
    assert isinstance(model, nn.Linear) and type(model) is nmfx.MaskedLinear


# ----------------------------------------------------------------------------------------------
# methods and options
# ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("method", ["bogus", "SD-GF", "", "ste2"])
def test_unknown_method_lists_valid_ones(method):
    model = fresh()
    before, types = snapshot(model), {n: type(m) for n, m in model.named_modules()}
    with pytest.raises(ValueError, match="unknown method") as info:
        nmfx.sparsify(model, "1:4", method)
    for name in ("dense", "ste", "srste", "mdgf", "sdgf"):
        assert name in str(info.value)
    assert repr(method) in str(info.value)
    assert_untouched(model, before, types)


def test_method_names_are_case_insensitive():
    model = fresh()
    nmfx.sparsify(model, "1:4", " STE ")
    assert len(nmfx.report(model).sparsified) == 2


@pytest.mark.parametrize("method, options, bad", [
    ("ste", {"foo": 1}, "foo"),
    ("srste", {"decay": "linear"}, "decay"),
    ("mdgf", {"schedule": "geometric"}, "schedule"),
    ("sdgf", {"total_steps": 10, "lambda_": 1.0}, "lambda_"),
])
def test_unknown_option_lists_valid_ones(method, options, bad):
    model = fresh()
    before, types = snapshot(model), {n: type(m) for n, m in model.named_modules()}
    with pytest.raises(ValueError, match="unknown option") as info:
        nmfx.sparsify(model, "1:4", method, **options)
    message = str(info.value)
    assert bad in message and "valid options" in message and "total_steps" in message
    assert_untouched(model, before, types)


def test_default_call_works_and_warns_about_sdgf_stage_length():
    """The headline call, nmfx.sparsify(model, pattern="1:8"), works; sdgf without total_steps says
    how long its stages are."""
    with pytest.warns(UserWarning, match="every 1,000 steps.*total_steps"):
        model = nmfx.sparsify(fresh(), pattern="1:4")
    assert nmfx.masks(model)


def test_gmp_without_a_length_says_how_long_its_ramp_is():
    with pytest.warns(UserWarning, match="gmp without total_steps ramps .* over 1,000 steps"):
        nmfx.sparsify(fresh(), "1:4", "gmp")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        nmfx.sparsify(fresh(), "1:4", "gmp", total_steps=100)
        nmfx.sparsify(fresh(), "1:4", "gmp", ramp_steps=50)


def test_unknown_option_on_a_method_config():
    with pytest.raises(ValueError, match="unknown option.*nope"):
        nmfx.sparsify(fresh(), "1:4", nmfx.STE(), nope=3)


@pytest.mark.parametrize("method, options, needle", [
    ("sdgf", {"total_steps": 10, "stage_steps": 3}, "not both"),
    ("mdgf", {"decay": "cosine"}, "decay"),
    ("ste", {"mask_interval": 0}, "mask_interval"),
    ("srste", {"srste_lambda": -1.0}, "srste_lambda"),
    ("sdgf", {"total_steps": 10, "schedule": "spiral"}, "schedule"),
    ("ste", {"dense_steps": 0.5}, "total_steps"),
])
def test_invalid_option_values(method, options, needle):
    model = fresh()
    before, types = snapshot(model), {n: type(m) for n, m in model.named_modules()}
    with pytest.raises(ValueError, match=needle):
        nmfx.sparsify(model, "1:4", method, **options)
    assert_untouched(model, before, types)
def test_sdgf_schedule_not_ending_at_target():
    model = fresh()
    before, types = snapshot(model), {n: type(m) for n, m in model.named_modules()}
    with pytest.raises(ValueError, match="must end at the target"):
        nmfx.sparsify(model, "1:4", "sdgf", total_steps=10, schedule=["2:4", "1:2"])
    assert_untouched(model, before, types)


def test_sdgf_schedule_not_ending_at_target_is_an_error():
    """Whatever its type, the mismatch is an error naming the schedule, and the model is left as it was."""
    model = fresh()
    before, types = snapshot(model), {n: type(m) for n, m in model.named_modules()}
    with pytest.raises(Exception, match="must end at the target pattern 1:4"):
        nmfx.sparsify(model, "1:4", "sdgf", total_steps=10, schedule=["2:4", "1:2"])
    assert_untouched(model, before, types)


# ----------------------------------------------------------------------------------------------
# patterns
# ----------------------------------------------------------------------------------------------
BAD_PATTERNS = ["1:0", "0:4", "5:4", "abc", "1:300", "1/4", "2:4:8", "-1:4", "1.5:4", "", " : ", "N:M",
                (1, 2, 3), (0, 4), (True, 4), (2, 4.0), 1.5, None, 4, ["2", "4"]]


@pytest.mark.parametrize("pattern", BAD_PATTERNS, ids=repr)
def test_bad_pattern_raises_value_error(pattern):
    model = fresh()
    before, types = snapshot(model), {n: type(m) for n, m in model.named_modules()}
    with pytest.raises(ValueError, match="invalid N:M pattern") as info:
        nmfx.sparsify(model, pattern, "ste")
    assert "expected 'N:M'" in str(info.value)
    assert_untouched(model, before, types)
    # the model is still usable afterwards
    nmfx.sparsify(model, "1:4", "ste")
    assert len(nmfx.report(model).sparsified) == 2


@settings(max_examples=40, deadline=None)
@given(n=st.integers(-3, 300), m=st.integers(-3, 300))
def test_pattern_validation_property(n, m):
    text = f"{n}:{m}"
    if 1 <= n <= m <= nmfx.MAX_M:
        assert str(nmfx.Pattern.parse(text)) == text
    else:
        with pytest.raises(ValueError, match="invalid N:M pattern"):
            nmfx.Pattern.parse(text)


@pytest.mark.parametrize("pattern", ["1:4", " 1 : 4 ", (1, 4), nmfx.Pattern(1, 4)], ids=repr)
def test_equivalent_pattern_spellings(pattern):
    model = fresh()
    nmfx.sparsify(model, pattern, "ste")
    assert {row.pattern for row in nmfx.report(model)} == {"1:4"}
    assert len(nmfx.report(model).sparsified) == 2


def test_pattern_wider_than_every_layer_warns():
    model = fresh()
    with pytest.warns(UserWarning) as record:
        nmfx.sparsify(model, "1:128", "ste")
    message = nothing_sparsified_warning(record)
    assert "not divisible by M=128" in message
    rows = {row.name: row for row in nmfx.report(model)}
    assert rows["fc1.weight"].status == "skip" and "input dim 32" in rows["fc1.weight"].reason
    assert rows["fc2.weight"].status == "skip" and "input dim 64" in rows["fc2.weight"].reason
    assert nmfx.masks(model) == {}
    x = torch.randn(3, 32)
    torch.testing.assert_close(model(x), fresh()(x), atol=0, rtol=0)


def test_pattern_wider_than_some_layers_skips_them_only():
    model = fresh()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        nmfx.sparsify(model, "1:64", "ste")
    messages = [str(w.message) for w in caught]
    assert not any("nothing in" in m for m in messages)  # something is sparsified
    assert any("cannot pack" in m for m in messages)  # but M = 64 cannot be lowered: said at sparsify
    rows = {row.name: row for row in nmfx.report(model)}
    assert rows["fc1.weight"].status == "skip"
    assert "32" in rows["fc1.weight"].reason and "M=64" in rows["fc1.weight"].reason
    assert rows["fc2.weight"].status == "sparsified"  # input dim 64
    assert set(nmfx.masks(model)) == {"fc2.weight"}


# ----------------------------------------------------------------------------------------------
# include / exclude that match nothing
# ----------------------------------------------------------------------------------------------
def test_include_matching_nothing_warns():
    model = fresh()
    with pytest.warns(UserWarning, match=r"not matched by include=\['nomatch\*'\]"):
        nmfx.sparsify(model, "1:4", "ste", include="nomatch*")
    assert all(row.status == "skip" for row in nmfx.report(model))


def test_exclude_everything_warns():
    model = fresh()
    with pytest.warns(UserWarning, match="excluded by"):
        nmfx.sparsify(model, "1:4", "ste", exclude=["*"])
    assert nmfx.masks(model) == {}


# ----------------------------------------------------------------------------------------------
# sparsifying twice
# ----------------------------------------------------------------------------------------------
def test_sparsify_twice_raises_and_changes_nothing():
    model = fresh()
    nmfx.sparsify(model, "1:4", "ste")
    masks = {k: v.clone() for k, v in nmfx.masks(model).items()}
    graphs = nmfx.graphs(model)
    with pytest.raises(ValueError, match="already sparsified"):
        nmfx.sparsify(model, "2:4", "srste")
    assert {k: torch.equal(v, masks[k]) for k, v in nmfx.masks(model).items()} == dict.fromkeys(masks, True)
    assert nmfx.graphs(model) == graphs
    assert {row.pattern for row in nmfx.report(model)} == {"1:4"}


def test_deepcopy_of_sparsified_model_is_sparsified():
    model = fresh()
    nmfx.sparsify(model, "1:4", "ste")
    clone = copy.deepcopy(model)
    assert nmfx.is_sparsified(clone)
    with pytest.raises(ValueError, match="already sparsified"):
        nmfx.sparsify(clone, "1:4", "ste")
def test_sparsify_parent_of_sparsified_submodule():
    torch.manual_seed(0)
    model = Outer()
    nmfx.sparsify(model.body, "1:4", "ste")
    with pytest.raises(ValueError, match="already sparsified"):
        nmfx.sparsify(model, "2:4", "ste")


# ----------------------------------------------------------------------------------------------
# report
# ----------------------------------------------------------------------------------------------
def test_report_before_sparsify_raises():
    with pytest.raises(ValueError, match="has not been sparsified"):
        nmfx.report(fresh())


def test_report_table_has_headers_and_every_weight():
    model = fresh()
    nmfx.sparsify(model, "1:4", "ste", exclude="fc2")
    report = nmfx.report(model)
    text = str(report)
    lines = text.splitlines()
    assert lines[0].startswith("nmfx: 1/3 weights sparsified at 1:4 with method ste")
    header = lines[1].split()
    assert header == ["name", "role", "op", "shape", "pattern", "density", "status", "reason", "frontend"]
    assert set(lines[2]) <= {"-", " "}
    assert len(lines) == 3 + 3
    for name in ("fc1.weight", "fc2.weight", "head.weight"):
        assert sum(line.startswith(name + " ") for line in lines) == 1, name
    row_line = next(line for line in lines if line.startswith("fc1.weight"))
    assert "32x64" not in row_line and "64x32" in row_line  # shape of fc1's [out, in] weight
    assert "0.250" in row_line and "sparsified" in row_line
    skipped = next(line for line in lines if line.startswith("fc2.weight"))
    assert "excluded by 'fc2'" in skipped and " - " in skipped  # no density for a skipped weight
    assert [row.name for row in report.sparsified] == ["fc1.weight"]


def test_report_rows_fields():
    model = fresh()
    nmfx.sparsify(model, "1:4", "ste")
    rows = {row.name: row for row in nmfx.report(model)}
    assert set(rows) == {"fc1.weight", "fc2.weight", "head.weight"}
    fc1 = rows["fc1.weight"]
    assert (fc1.role, fc1.op, fc1.shape, fc1.pattern, fc1.status) == ("mlp.up", "linear", (64, 32), "1:4", "sparsified")
    assert fc1.density == pytest.approx(0.25)
    assert rows["head.weight"].density is None and rows["head.weight"].role == "head"


def test_report_density_follows_schedule():
    """The report's density is that of the current mask (SDGF stepwise: 3:4 first, then 1:4... here 1:4
    from 3:4 -> 2:4 -> 1:4)."""
    model = fresh()
    nmfx.sparsify(model, "1:4", "sdgf", total_steps=3)
    densities = []
    for _ in range(3):
        densities.append(nmfx.report(model).sparsified[0].density)
        nmfx.step(model)
    densities.append(nmfx.report(model).sparsified[0].density)
    assert densities[0] == pytest.approx(0.75)
    assert densities[-1] == pytest.approx(0.25)
    assert densities == sorted(densities, reverse=True)


# ----------------------------------------------------------------------------------------------
# atomicity
# ----------------------------------------------------------------------------------------------
def test_failed_sparsify_leaves_model_untouched(monkeypatch):
    import nmfx.compile

    real = nmfx.compile.rewrite_masked
    calls = []

    def flaky(gm, pattern, method):
        calls.append(gm)
        if len(calls) == 2:
            raise RuntimeError("injected failure in the second scope")
        return real(gm, pattern, method)

    monkeypatch.setattr(nmfx.compile, "rewrite_masked", flaky)
    torch.manual_seed(0)
    model = Outer()
    before, types = snapshot(model), {n: type(m) for n, m in model.named_modules()}
    with pytest.raises(Exception, match="injected failure"):
        nmfx.sparsify(model, "2:4", "ste")
    assert len(calls) == 2
    assert_untouched(model, before, types)


def test_a_pattern_that_cannot_be_packed_is_warned_about_at_sparsify():
    import warnings as _warnings

    model = torch.nn.Sequential(torch.nn.Linear(128, 64), torch.nn.ReLU(), torch.nn.Linear(64, 2))
    with pytest.warns(UserWarning, match=r"1:64 trains, but nmfx.to_inference cannot pack it"):
        nmfx.sparsify(model, "1:64", "ste", include=["0.weight"])
    with pytest.raises(ValueError, match="M <= 32"):
        nmfx.to_inference(model)
    with _warnings.catch_warnings():
        _warnings.simplefilter("error", UserWarning)
        nmfx.sparsify(torch.nn.Sequential(torch.nn.Linear(128, 64), torch.nn.Linear(64, 2)), "1:32", "ste",
                      include=["0.weight"])
