"""The compiler driver (nmfx/compile.py): pipelines as data, requires/ensures checked around every pass by
passes/pipeline.py, the role pass (passes/roles.py) and the one-way imports of the readers."""

import dataclasses
import subprocess
import sys

import pytest
import torch
from torch import fx, nn

import nmfx
from nmfx.compile import LOWER_PIPELINE, SPARSIFY_PIPELINE, Context, run_sparsify_pipeline
from nmfx.config import SparsifyConfig
from nmfx.meta import META_KEY, annotated_nodes
from nmfx.passes.find_prunable import find_prunable
from nmfx.passes.pipeline import Pass, PassFailure, run_pipeline
from nmfx.passes.policy import Policy
from nmfx.passes.roles import adopt_roles


class MLP(nn.Module):
    def __init__(self):
        super().__init__()
        self.up_proj = nn.Linear(16, 32)
        self.down_proj = nn.Linear(32, 16)

    def forward(self, x):
        return self.down_proj(torch.relu(self.up_proj(x)))


def _graph():
    return find_prunable(fx.symbolic_trace(MLP()))


def _context(pattern="2:4"):
    config = SparsifyConfig.build(pattern, "ste")
    return Context(config=config, policy=Policy.from_config(config, {}))


def test_pipelines_are_declared_in_order_with_their_contracts():
    assert [p.name for p in SPARSIFY_PIPELINE] == ["tag_roles", "adopt_roles", "policy", "rewrite_masked"]
    assert [p.name for p in LOWER_PIPELINE] == ["plan_lowering", "lower_inference"]
    for pipeline in (SPARSIFY_PIPELINE, LOWER_PIPELINE):
        for before, after in zip(pipeline, pipeline[1:]):
            assert before.ensures <= after.requires, (before.name, after.name)
    assert SPARSIFY_PIPELINE[-1].ensures == LOWER_PIPELINE[0].requires


def test_sparsify_pipeline_ends_rewritten():
    gm = run_sparsify_pipeline(_graph(), _context())
    ops = [node.meta[META_KEY] for node in annotated_nodes(gm.graph)]
    assert [(op.weight, op.role, op.status, str(op.pattern)) for op in ops] == [
        ("up_proj.weight", "mlp.up", "sparsified", "2:4"), ("down_proj.weight", "mlp.down", "sparsified", "2:4")]
    assert [op.role_source for op in ops] == ["graph (scope)", "graph (scope)"]


def test_a_pass_breaking_its_contract_is_named():
    def forget(gm, ctx):  # claims to decide but leaves a candidate
        node = annotated_nodes(gm.graph)[0]
        node.meta[META_KEY] = dataclasses.replace(node.meta[META_KEY], status="sparsify")

    bad = Pass("lazy_policy", forget, frozenset({"candidate"}), frozenset({"sparsify", "skip"}))
    with pytest.raises(PassFailure, match=r"pass 'lazy_policy' failed.*down_proj.weight: status 'candidate'.*"
                                          r"passes run before it: tag_roles"):
        run_pipeline((SPARSIFY_PIPELINE[0], bad), _graph(), _context())


def test_a_pass_run_out_of_order_is_refused():
    with pytest.raises(PassFailure, match=r"pass 'rewrite_masked'.*status 'candidate', but the pass requires"):
        run_pipeline((SPARSIFY_PIPELINE[-1],), _graph(), _context())


def test_roles_prefer_the_whole_model_graph_then_the_scope_then_names():
    gm = _graph()
    adopt_roles(gm, {"up_proj.weight": "attn.q"}, "torch.export", whole_model=True)
    ops = {node.meta[META_KEY].weight: node.meta[META_KEY] for node in annotated_nodes(gm.graph)}
    assert (ops["up_proj.weight"].role, ops["up_proj.weight"].role_source) == ("attn.q", "graph (torch.export)")
    assert (ops["down_proj.weight"].role, ops["down_proj.weight"].role_source) == ("mlp.down", "name")


def test_name_hint_head_ignored_when_a_whole_model_graph_exists():
    class Model(nn.Module):
        def __init__(self):
            super().__init__()
            self.lm_head = nn.Linear(8, 8)

        def forward(self, x):
            return self.lm_head(x)

    gm = find_prunable(fx.symbolic_trace(Model()))
    adopt_roles(gm, {}, "fx.symbolic_trace", whole_model=True)
    assert annotated_nodes(gm.graph)[0].meta[META_KEY].role == "other"
    gm = find_prunable(fx.symbolic_trace(Model()))
    adopt_roles(gm, {}, "", whole_model=False)
    assert annotated_nodes(gm.graph)[0].meta[META_KEY].role == "head"


@pytest.mark.parametrize("module", ["nmfx.report", "nmfx.accessors", "nmfx.compile", "nmfx.config",
                                    "nmfx.passes.policy", "nmfx.tracing"])
def test_modules_import_first_without_cycles(module):
    """Each module imports on its own in a fresh interpreter (a cycle broken only by import order fails)."""
    result = subprocess.run([sys.executable, "-c", f"import {module}"], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-2000:]


def test_report_and_api_do_not_import_each_other():
    import ast
    import inspect

    report_module = sys.modules["nmfx.report"]  # nmfx.report is also the function's name
    source = inspect.getsource(report_module)
    imported = {node.module for node in ast.walk(ast.parse(source)) if isinstance(node, ast.ImportFrom)}
    assert "nmfx.api" not in imported
    assert report_module.record is nmfx.api.record  # one accessor, re-exported by api
