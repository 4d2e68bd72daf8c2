"""passes/verify.py: each invariant, broken on purpose, is named."""

from __future__ import annotations

import pytest
import torch
from torch import fx

from nmfx.meta import META_KEY
from nmfx.methods import resolve_method
from nmfx.passes.attention import tag_roles
from nmfx.passes.policy import Policy, apply_policy
from nmfx.passes.verify import InvariantError, verify
from nmfx.pattern import Pattern
from tests.passes_common import (traced, rewrite, masked_nodes, PlainMLP)

# ----------------------------------------------------------------------------------------------
# verify
# ----------------------------------------------------------------------------------------------
class TestVerify:
    def _rewritten(self):
        return rewrite(PlainMLP(), "2:4")

    def test_clean_graph_passes(self):
        verify(self._rewritten(), rewritten=True)

    def test_dangling_mask_get_attr(self):
        gm = self._rewritten()
        node = masked_nodes(gm)[0]
        node.args[2].target = "nowhere.mask"
        with pytest.raises(InvariantError, match="nowhere.mask"):
            verify(gm)

    @pytest.mark.filterwarnings("ignore:Attempted to insert a get_attr")
    def test_dangling_get_attr_of_any_kind(self):
        gm = fx.symbolic_trace(PlainMLP())
        x = next(iter(gm.graph.nodes))
        with gm.graph.inserting_after(x):
            gm.graph.get_attr("missing_param")
        with pytest.raises(InvariantError, match="missing_param"):
            verify(gm)

    def test_mask_of_wrong_dtype(self):
        gm = self._rewritten()
        gm.l1.weight_nm.mask = gm.l1.weight_nm.mask.float()
        with pytest.raises(InvariantError, match="mask"):
            verify(gm)

    def test_mask_of_wrong_shape(self):
        gm = self._rewritten()
        gm.l1.weight_nm.mask = torch.ones(3, 3, dtype=torch.bool)
        with pytest.raises(InvariantError, match="mask"):
            verify(gm)

    def test_weight_not_a_parameter(self):
        gm = self._rewritten()
        node = masked_nodes(gm)[0]
        node.args[1].target = node.args[2].target  # the mask buffer where the weight should be
        with pytest.raises(InvariantError, match="not a parameter"):
            verify(gm)

    def test_masked_node_without_annotation(self):
        gm = self._rewritten()
        del masked_nodes(gm)[0].meta[META_KEY]
        with pytest.raises(InvariantError, match="annotation"):
            verify(gm)

    def test_chosen_but_not_rewritten(self):
        gm = tag_roles(traced(PlainMLP()))
        apply_policy(gm, Policy(Pattern(2, 4), resolve_method("ste")))
        verify(gm)  # fine before the rewrite
        with pytest.raises(InvariantError, match="not rewritten"):
            verify(gm, rewritten=True)

    def test_lint_failure(self):
        gm = fx.symbolic_trace(PlainMLP())
        nodes = list(gm.graph.nodes)
        # use a node before it is defined
        nodes[1].args = (nodes[2],)
        with pytest.raises(InvariantError, match="lint"):
            verify(gm)

    def test_invariant_error_is_assertion_error(self):
        assert issubclass(InvariantError, AssertionError)
