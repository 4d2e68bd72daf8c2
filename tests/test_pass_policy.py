"""passes/policy.py: what is sparsified and why (include/exclude/head/tied/width), a reason for every decision."""

from __future__ import annotations

import pytest
from torch import nn

from nmfx.methods import resolve_method
from nmfx.passes.attention import tag_roles
from nmfx.passes.policy import Policy, apply_policy
from nmfx.pattern import Pattern
from tests.passes_common import (annotations, traced, decide, PlainMLP, Block)

# ----------------------------------------------------------------------------------------------
# policy
# ----------------------------------------------------------------------------------------------
class TestPolicy:
    def test_default_sparsifies_everything_but_the_head(self):
        decided = decide(Block())
        assert {n: s for n, (s, _) in decided.items()} == {
            "attn.p1.weight": "sparsify", "attn.p2.weight": "sparsify", "up.weight": "sparsify",
            "down.weight": "sparsify", "cls.weight": "skip"}
        assert "head" in decided["cls.weight"][1] and "include" in decided["cls.weight"][1]
        assert decided["up.weight"][1] == "role mlp.up"

    def test_include_brings_head_back(self):
        decided = decide(Block(), include=("cls.*",))
        assert decided["cls.weight"] == ("sparsify", "matched 'cls.*'")
        assert all(s == "skip" and "not matched by include" in r for n, (s, r) in decided.items() if n != "cls.weight")

    def test_include_by_role_head(self):
        decided = decide(Block(), include=("head",))
        assert [n for n, (s, _) in decided.items() if s == "sparsify"] == ["cls.weight"]

    @pytest.mark.parametrize("glob, expected", [
        ("attn.*", {"attn.p1.weight", "attn.p2.weight"}),         # by role (and by module name)
        ("mlp.down", {"down.weight"}),                              # by role only
        ("up", {"up.weight"}),                                      # by module name
        ("*.p2.weight", {"attn.p2.weight"}),                        # by weight name
    ])
    def test_include_globs(self, glob, expected):
        decided = decide(Block(), include=(glob,))
        assert {n for n, (s, _) in decided.items() if s == "sparsify"} == expected

    @pytest.mark.parametrize("glob, excluded", [
        ("attn.qkv", {"attn.p1.weight"}),
        ("mlp.*", {"up.weight", "down.weight"}),
        ("attn.p2", {"attn.p2.weight"}),                            # module name
        ("down.weight", {"down.weight"}),
    ])
    def test_exclude_globs(self, glob, excluded):
        decided = decide(Block(), exclude=(glob,))
        sparsified = {n for n, (s, _) in decided.items() if s == "sparsify"}
        assert sparsified == {"attn.p1.weight", "attn.p2.weight", "up.weight", "down.weight"} - excluded
        for name in excluded:
            assert decided[name] == ("skip", f"excluded by {glob!r}")

    def test_exclude_wins_over_include(self):
        decided = decide(Block(), include=("mlp.*",), exclude=("down",))
        assert decided["up.weight"][0] == "sparsify"
        assert decided["down.weight"] == ("skip", "excluded by 'down'")

    def test_tied_weights_skipped(self):
        decided = decide(Block(), tied={"up.weight": "emb.weight", "emb.weight": "up.weight"})
        status, reason = decided["up.weight"]
        assert status == "skip" and "tied" in reason and "emb.weight" in reason
        assert decided["down.weight"][0] == "sparsify"

    def test_tied_skip_even_when_included(self):
        decided = decide(Block(), include=("*",), tied={"cls.weight": "x.weight"})
        assert decided["cls.weight"][0] == "skip"

    def test_non_divisible_input_dim_skipped_with_reason(self):
        model = nn.Sequential(nn.Linear(12, 16), nn.ReLU(), nn.Linear(16, 16), nn.ReLU(), nn.Linear(16, 4))
        decided = decide(model, pattern="1:8", whole_model=False)
        status, reason = decided["0.weight"]
        assert status == "skip"
        assert "12" in reason and "M=8" in reason and "not padded" in reason
        assert decided["2.weight"][0] == "sparsify"

    def test_sdgf_geometric_needs_m64_for_1_8(self):
        method = resolve_method("sdgf", total_steps=100, schedule="geometric")
        assert max(p.m for p in method.patterns("1:8")) == 64
        model = nn.Sequential(nn.Linear(32, 64), nn.ReLU(), nn.Linear(64, 32), nn.ReLU(), nn.Linear(32, 4))
        decided = decide(model, pattern="1:8", method=method, whole_model=False)
        status, reason = decided["0.weight"]
        assert status == "skip" and "32" in reason and "M=64" in reason
        assert decided["2.weight"][0] == "sparsify"  # input width 64
        assert decided["4.weight"][0] == "skip"
        # stepwise stays at M=8, so width 32 is fine there
        stepwise = decide(model, pattern="1:8", method=resolve_method("sdgf", total_steps=100), whole_model=False)
        assert {n: s for n, (s, _) in stepwise.items()} == dict.fromkeys(stepwise, "sparsify")

    def test_decided_ops_are_not_redecided(self):
        gm = tag_roles(traced(PlainMLP()))
        apply_policy(gm, Policy(Pattern(2, 4), resolve_method("ste"), exclude=("mlp.up",)))
        apply_policy(gm, Policy(Pattern(2, 4), resolve_method("ste")))
        assert annotations(gm)["l1.weight"].status == "skip"

    def test_every_decision_has_a_reason(self):
        decided = decide(Block(), exclude=("attn.o",), tied={"up.weight": "z"})
        assert all(reason for _, reason in decided.values())
