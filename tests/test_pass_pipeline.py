"""passes/pipeline.py: run_pipeline runs passes in order and names the one that broke an invariant."""

from __future__ import annotations

import pytest
import torch
from torch import fx

import nmfx
from nmfx.methods import resolve_method
from nmfx.passes.attention import tag_roles
from nmfx.passes.find_prunable import find_prunable
from nmfx.passes.pipeline import Pass, PassFailure, run_pipeline
from nmfx.passes.policy import Policy, apply_policy
from nmfx.passes.rewrite_masked import install_states, rewrite_masked
from nmfx.passes.verify import InvariantError
from nmfx.pattern import Pattern
from tests.passes_common import (roles, masked_nodes, masked_reference, PlainMLP, Block)

# ----------------------------------------------------------------------------------------------
# run_pipeline
# ----------------------------------------------------------------------------------------------
def pipeline(*passes, check=None):
    """A runner over ``(name, fn(gm))`` pairs, as the tests below write them."""
    declared = tuple(Pass(name, lambda gm, ctx, fn=fn: fn(gm)) for name, fn in passes)
    return lambda gm: run_pipeline(declared, gm, **({"check": check} if check else {}))


class TestRunPipeline:
    def test_runs_in_order_and_checks_after_each(self):
        calls = []

        def make(name):
            def graph_pass(gm):
                calls.append(name)
                return gm
            return graph_pass

        checked = []
        run = pipeline(("a", make("a")), ("b", make("b")), check=lambda gm: checked.append(len(calls)))
        gm = fx.symbolic_trace(PlainMLP())
        assert run(gm) is gm
        assert calls == ["a", "b"] and checked == [1, 2]

    def test_failure_names_pass_and_passes_before(self):
        def boom(gm):
            raise RuntimeError("kaboom")

        run = pipeline(("find", find_prunable), ("roles", tag_roles), ("explode", boom),
                       ("never", lambda gm: pytest.fail("ran after a failure")))
        with pytest.raises(PassFailure) as info:
            run(fx.symbolic_trace(PlainMLP()))
        message = str(info.value)
        assert "'explode'" in message and "kaboom" in message
        assert "find, roles" in message
        assert "never" not in message
        assert isinstance(info.value.__cause__, RuntimeError)

    @pytest.mark.filterwarnings("ignore:Attempted to insert a get_attr")
    def test_invariant_broken_by_a_pass_is_caught(self):
        def dangling(gm):
            first = next(iter(gm.graph.nodes))
            with gm.graph.inserting_after(first):
                gm.graph.get_attr("ghost")
            return gm

        run = pipeline(("find", find_prunable), ("breaks", dangling))
        with pytest.raises(PassFailure, match=r"'breaks'.*ghost.*passes run before it: find") as info:
            run(fx.symbolic_trace(PlainMLP()))
        assert isinstance(info.value.__cause__, InvariantError)

    def test_first_pass_failure_says_none_before(self):
        run = pipeline(("first", lambda gm: 1 / 0))
        with pytest.raises(PassFailure, match=r"'first'.*passes run before it: none"):
            run(fx.symbolic_trace(PlainMLP()))

    def test_full_pipeline_end_to_end(self):
        torch.manual_seed(0)
        module = Block()
        pattern, method = Pattern(1, 4), resolve_method("ste")
        run = pipeline(
            ("find_prunable", find_prunable),
            ("tag_roles", lambda gm: tag_roles(gm, whole_model=True)),
            ("policy", lambda gm: apply_policy(gm, Policy(pattern, method))),
            ("rewrite_masked", lambda gm: rewrite_masked(gm, pattern, method)),
        )
        gm = run(fx.symbolic_trace(module))
        assert nmfx.states(module) == {}  # the pass put its states on gm (planned), not on the shared modules
        installed = install_states(gm)  # the install step: states move to <owner>.<param>_nm
        assert len(installed) == 4 and sorted(installed) == sorted(name + "_nm" for name in nmfx.states(gm))
        assert len(masked_nodes(gm)) == 4  # the head is skipped
        ref = masked_reference(module, gm)
        x = torch.randn(2, 3, 8)
        assert torch.equal(gm(x), ref(x))
