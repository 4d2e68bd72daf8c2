"""Method configs: validation, serialization and the schedule of every method at chosen steps."""

import json
import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

import nmfx
from nmfx.methods import GMP, MDGF, METHODS, SDGF, SRSTE, STE, Dense, resolve_method


def test_resolve_by_name_and_options():
    m = resolve_method("mdgf", decay="exponential", decay_coef=1e-4)
    assert isinstance(m, MDGF) and m.decay == "exponential" and m.coef == 1e-4
    assert resolve_method(" SDGF ", total_steps=10).name == "sdgf"
    assert resolve_method(m, decay_coef=2e-4).decay_coef == 2e-4  # a config plus options


@pytest.mark.parametrize("bad,match", [("foo", "valid methods: dense, ste, srste, mdgf, sdgf"), (3, "unknown method")])
def test_unknown_method_lists_valid(bad, match):
    with pytest.raises(ValueError, match=match):
        resolve_method(bad)


def test_unknown_option_lists_valid():
    with pytest.raises(ValueError, match="unknown option.*decay_rate.*valid options:.*decay_coef"):
        resolve_method("mdgf", decay_rate=0.1)


@pytest.mark.parametrize("kwargs", [
    {"method": "mdgf", "decay": "cosine"}, {"method": "mdgf", "decay_coef": -1.0}, {"method": "mdgf", "gradient": "x"},
    {"method": "srste", "srste_lambda": -1e-4}, {"method": "srste", "srste_lambda": float("nan")},
    {"method": "ste", "total_steps": 0}, {"method": "ste", "mask_interval": 0}, {"method": "ste", "dense_steps": -1},
    {"method": "ste", "dense_steps": 0.1}, {"method": "ste", "total_steps": 10, "dense_steps": 1.5},
    {"method": "ste", "total_steps": 10, "dense_steps": 6, "fine_tune_steps": 5}, {"method": "ste", "fine_tune_steps": 3},
    {"method": "sdgf", "total_steps": 10, "stage_steps": 5}, {"method": "sdgf", "stage_steps": 0},
    {"method": "sdgf", "total_steps": 10, "schedule": "linear"}, {"method": "sdgf", "total_steps": 10, "schedule": []},
    {"method": "sdgf", "total_steps": 10, "schedule": ["2:8", "x"]},
    {"method": "gmp", "ramp_steps": 0}, {"method": "gmp", "ramp_steps": 0.5},
    {"method": "gmp", "total_steps": 10, "ramp_steps": 1.5}, {"method": "gmp", "total_steps": 10, "ramp_steps": 0.0},
    {"method": "gmp", "total_steps": 10, "dense_steps": 4, "ramp_steps": 7}, {"method": "gmp", "ramp_steps": True},
    {"method": "sdgf", "decay": "cosine"}, {"method": "sdgf", "decay_coef": 1e-3},
    {"method": "sdgf", "decay": "linear", "decay_coef": 0.0},
])
def test_invalid_configs(kwargs):
    with pytest.raises(ValueError):
        resolve_method(**kwargs)


@pytest.mark.parametrize("method", [Dense(), STE(total_steps=9), SRSTE(srste_lambda=1e-3), MDGF(total_steps=50, decay="exponential"),
                                    SDGF(total_steps=100, schedule=["4:8", "2:8", "1:8"], dense_steps=0.1),
                                    GMP(total_steps=100, ramp_steps=0.3, dense_steps=10), GMP(ramp_steps=40),
                                    SDGF(total_steps=40, schedule="geometric", depth=3),
                                    SDGF(total_steps=40, decay="exponential", decay_coef=0.1)])
def test_json_round_trip(method):
    data = json.loads(json.dumps(method.to_dict()))
    assert data["version"] == 1 and data["method"] == method.name
    assert resolve_method(data) == method


def test_newer_config_version_refused():
    with pytest.raises(ValueError, match="newer"):
        resolve_method({"method": "ste", "version": 99})


def test_configs_are_frozen_and_comparable():
    a, b = MDGF(total_steps=10), MDGF(total_steps=10)
    assert a == b and hash(a) == hash(b)
    with pytest.raises(Exception):
        a.total_steps = 3


# -- schedules ----------------------------------------------------------------------------------

def test_dense_is_dense_forever():
    s = Dense(total_steps=10).state_at(50, "1:8")
    assert (s.phase, s.alpha, s.srste_lambda) == ("dense", 1.0, 0.0)


def test_ste_and_srste_phases():
    m = SRSTE(total_steps=100, dense_steps=10, fine_tune_steps=20)
    assert m.state_at(9, "1:8").phase == "dense" and m.state_at(9, "1:8").srste_lambda == 0.0
    mid = m.state_at(10, "1:8")
    assert (mid.phase, mid.alpha, mid.srste_lambda, mid.mask_frozen) == ("sparse", 0.0, 2e-4, False)
    end = m.state_at(80, "1:8")
    assert (end.phase, end.alpha, end.mask_frozen) == ("fine_tune", 0.0, True)


def test_mdgf_linear_official_default_without_total_steps():
    m = MDGF()
    assert m.state_at(0, "1:8").alpha == 1.0
    assert m.state_at(2500, "1:8").alpha == pytest.approx(0.5)
    assert m.state_at(5000, "1:8").alpha == 0.0  # 2e-4 reaches 0 after 5,000 steps
    assert m.state_at(9000, "1:8").alpha == 0.0


def test_mdgf_clock_starts_after_dense_warmup():
    m = MDGF(decay_coef=0.01, dense_steps=100)
    assert m.state_at(99, "1:8").alpha == 1.0 and m.state_at(99, "1:8").phase == "dense"
    assert m.state_at(150, "1:8").alpha == pytest.approx(0.5)


def test_mdgf_exponential():
    m = MDGF(decay="exponential", decay_coef=1e-4)
    assert m.state_at(10_000, "1:32").alpha == pytest.approx(math.exp(-1))


@pytest.mark.parametrize("decay", ["linear", "exponential"])
def test_mdgf_fits_total_steps_and_ends_hard(decay):
    m = MDGF(total_steps=1000, decay=decay)
    alphas = [m.state_at(s, "1:8").alpha for s in range(0, 1001, 50)]
    assert alphas[0] == 1.0 and all(a >= b for a, b in zip(alphas, alphas[1:]))
    assert m.state_at(499, "1:8").alpha < 0.01  # the decay spans the first half of the sparse phase
    assert m.state_at(500, "1:8").alpha == 0.0 and m.state_at(1000, "1:8").alpha == 0.0


@pytest.mark.parametrize("target,schedule,expected", [
    ("1:8", "stepwise", ["7:8", "4:8", "2:8", "1:8"]),
    ("1:16", "stepwise", ["15:16", "8:16", "4:16", "2:16", "1:16"]),
    ("2:4", "stepwise", ["3:4", "2:4"]),
    ("1:8", "geometric", ["8:64", "4:32", "2:16", "1:8"]),
    ("1:16", "geometric", ["8:128", "4:64", "2:32", "1:16"]),
    ("1:8", "densify", ["1:64", "1:32", "1:16", "1:8"]),
])
def test_sdgf_stages(target, schedule, expected):
    assert [str(p) for p in SDGF(total_steps=10, schedule=schedule).patterns(target)] == expected


@pytest.mark.parametrize("target,schedule,depth,expected", [
    ("1:32", "geometric", None, ["4:128", "2:64", "1:32"]),  # nmfx's default: no group wider than 128
    ("1:32", "geometric", 3, ["8:256", "4:128", "2:64", "1:32"]),  # the official code's 4 stages
    ("2:4", "geometric", 3, ["16:32", "8:16", "4:8", "2:4"]),
    ("1:32", "densify", 3, ["1:256", "1:128", "1:64", "1:32"]),
    ("1:8", "geometric", 0, ["1:8"]),
])
def test_sdgf_depth(target, schedule, depth, expected):
    assert [str(p) for p in SDGF(total_steps=10, schedule=schedule, depth=depth).patterns(target)] == expected


def test_sdgf_depth_is_checked():
    with pytest.raises(ValueError, match="depth=3 applies to the 'geometric' and 'densify'"):
        SDGF(depth=3)
    with pytest.raises(ValueError, match="expected an integer >= 0"):
        SDGF(schedule="geometric", depth=-1)
    with pytest.raises(ValueError, match="M is at most 256"):
        SDGF(schedule="geometric", depth=4).patterns("1:32")


def test_sdgf_equal_stages_over_the_sparse_phase():
    m = SDGF(total_steps=100, dense_steps=20)  # sparse phase 20..99, 4 stages of 20 steps for 1:8
    got = {s: str(m.state_at(s, "1:8").pattern) for s in (0, 20, 39, 40, 60, 80, 99, 100, 500)}
    assert got == {0: "7:8", 20: "7:8", 39: "7:8", 40: "4:8", 60: "2:8", 80: "1:8", 99: "1:8", 100: "1:8", 500: "1:8"}
    assert all(m.state_at(s, "1:8").alpha == 0.0 for s in (20, 99))


def test_sdgf_without_total_steps_uses_fixed_stage_lengths():
    m = SDGF(stage_steps=10)
    got = [str(m.state_at(s, "1:8").pattern) for s in (0, 9, 10, 25, 30, 10_000)]
    assert got == ["7:8", "7:8", "4:8", "2:8", "1:8", "1:8"]
    assert str(SDGF().state_at(999, "1:8").pattern) == "7:8" and str(SDGF().state_at(1000, "1:8").pattern) == "4:8"


def test_sdgf_explicit_list_must_end_at_target():
    with pytest.raises(ValueError, match="must end at the target"):
        SDGF(total_steps=10, schedule=["4:8", "2:8"]).patterns("1:8")


@settings(max_examples=80, deadline=None)
@given(st.sampled_from(list(METHODS)), st.integers(1, 500), st.floats(0, 0.4), st.floats(0, 0.4), st.integers(0, 600),
       st.sampled_from(["2:4", "1:8", "1:16", "1:32"]))
def test_every_method_ends_hard_at_target(name, total, dense, fine, extra, target):
    options = {"decay": ("linear", "exponential")[extra % 2]} if name in ("mdgf", "sdgf") and extra % 3 else {}
    method = resolve_method(name, total_steps=total, dense_steps=dense, fine_tune_steps=fine, **options)
    end = method.state_at(total + extra, target)
    assert str(end.pattern) == target
    assert end.alpha == (1.0 if name == "dense" else 0.0)
    for step in range(0, total, max(1, total // 7)):
        s = method.state_at(step, target)
        assert 0.0 <= s.alpha <= 1.0
        assert s.pattern.density >= nmfx.Pattern.parse(target).density


@pytest.mark.parametrize("decay", ["linear", "exponential"])
def test_sdgf_with_mask_decay_runs_mdgf_alpha_on_the_stage_masks(decay):
    # the official code's structure_decay_flag + decay_type: stage patterns as SDGF, alpha as MDGF of the
    # same run, on one clock from the start of the sparse phase
    combined = SDGF(total_steps=200, dense_steps=40, decay=decay)
    sdgf, mdgf = SDGF(total_steps=200, dense_steps=40), MDGF(total_steps=200, dense_steps=40, decay=decay)
    for step in range(0, 220, 7):
        state = combined.state_at(step, "1:8")
        assert state.pattern == sdgf.state_at(step, "1:8").pattern
        assert state.alpha == mdgf.state_at(step, "1:8").alpha
        assert state.srste_lambda == 0.0
    assert combined.state_at(40, "1:8").alpha == 1.0 and str(combined.state_at(40, "1:8").pattern) == "7:8"
    assert 0.0 < combined.state_at(100, "1:8").alpha < 1.0  # mid-decay across a stage change (4:8 from 80)
    assert SDGF(total_steps=200).state_at(50, "1:8").alpha == 0.0  # plain SDGF: hard stage masks
    assert SDGF(decay="linear", decay_coef=1e-2).state_at(50, "1:8").alpha == pytest.approx(0.5)


def test_sdgf_with_mask_decay_trains_on_the_decayed_stage_mask():
    torch.manual_seed(0)
    model = nmfx.sparsify(nn.Sequential(nn.Linear(32, 16), nn.GELU(), nn.Linear(16, 4)), "1:8", "sdgf", total_steps=8,
                          decay="linear")
    for _ in range(3):
        nmfx.step(model)
    state = nmfx.resolve_method("sdgf", total_steps=8, decay="linear").state_at(3, "1:8")
    assert 0.0 < state.alpha < 1.0 and str(state.pattern) == "4:8"
    mask = nmfx.masks(model)["0.weight"]
    assert torch.equal(mask.view(-1, 8).sum(-1), torch.full((16 * 4,), 4))  # the stage's 4:8 mask
    weight, bias = model[0].weight.detach(), model[0].bias.detach()
    x = torch.randn(5, 32)
    expected = x @ (weight * (mask + state.alpha * ~mask)).T + bias
    torch.testing.assert_close(model(x), nn.functional.gelu(expected) @ model[2].weight.T + model[2].bias)


# -- gradual magnitude pruning -------------------------------------------------------------------

def test_gmp_cubic_ramp_of_the_kept_count():
    m = GMP(total_steps=1000)  # the ramp spans the first half of the sparse phase
    assert m.ramp_length == 500
    # k_t = N + round((M - N) (1 - t/500)^3) for 1:8
    expected = {0: 8, 100: 1 + round(7 * 0.8 ** 3), 250: 1 + round(7 * 0.5 ** 3), 400: 1 + round(7 * 0.2 ** 3),
                500: 1, 999: 1, 1000: 1}
    assert {t: m.state_at(t, "1:8").pattern.n for t in expected} == expected
    assert all(m.state_at(t, "1:8").pattern.m == 8 and m.state_at(t, "1:8").alpha == 0.0 for t in expected)
    assert [str(p) for p in m.patterns("2:4")] == ["4:4", "3:4", "2:4"]
    warm = GMP(total_steps=100, dense_steps=20, ramp_steps=0.25)  # ramp of 20 steps from step 20
    assert warm.state_at(19, "1:4").phase == "dense" and warm.ramp_length == 20
    assert [warm.state_at(t, "1:4").pattern.n for t in (20, 30, 40, 99)] == [4, 1 + round(3 * 0.5 ** 3), 1, 1]
    assert GMP().ramp_length == 1000 and GMP().exact_gradient


@settings(max_examples=40, deadline=None)
@given(st.integers(1, 400), st.sampled_from(["2:4", "1:8", "3:16", "1:32"]), st.floats(0.01, 1.0))
def test_gmp_kept_count_never_grows(total, target, ramp):
    m = GMP(total_steps=total, ramp_steps=ramp)
    kept = [m.state_at(t, target).pattern.n for t in range(total + 2)]
    pattern = nmfx.Pattern.parse(target)
    assert kept[0] == pattern.m  # nothing pruned at the first step
    assert all(a >= b for a, b in zip(kept, kept[1:])) and kept[-1] == pattern.n


def test_gmp_training_prunes_monotonically_and_pruned_weights_get_no_gradient():
    torch.manual_seed(0)
    model = nmfx.sparsify(nn.Sequential(nn.Linear(32, 64), nn.GELU(), nn.Linear(64, 32), nn.GELU(), nn.Linear(32, 4)),
                          "1:8", "gmp", total_steps=12, ramp_steps=8)
    opt = torch.optim.SGD(model.parameters(), lr=0.5)  # large steps: a non-monotone mask would flip
    g = torch.Generator().manual_seed(0)
    previous = nmfx.masks(model)["0.weight"].clone()
    assert bool(previous.all())  # k = M at step 0: nothing pruned yet
    for _ in range(12):
        opt.zero_grad()
        model(torch.randn(16, 32, generator=g)).square().mean().backward()
        mask = nmfx.masks(model)["0.weight"]
        assert not model[0].weight.grad[~mask].any()  # pruned weights receive no gradient
        opt.step()
        nmfx.step(model)
        mask = nmfx.masks(model)["0.weight"]
        assert not (mask & ~previous).any()  # a pruned weight never returns
        previous = mask.clone()
    assert torch.equal(mask.view(-1, 8).sum(-1), torch.ones(64 * 4, dtype=torch.int64))
