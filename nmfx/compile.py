"""The nmfx compiler: every pipeline nmfx runs, in order, with what each pass needs and guarantees.

A pass reads and writes the frozen annotation in ``node.meta["nmfx"]`` (:class:`nmfx.meta.PrunableOp`);
``requires`` / ``ensures`` are the annotation statuses a graph's nodes may have before / after it, checked
around every pass together with the graph invariants of :func:`nmfx.passes.verify.verify` by
:func:`nmfx.passes.pipeline.run_pipeline` (a failure names the pass and the passes that ran before it).

**sparsify** (:func:`sparsify_model`, called by ``nmfx.sparsify``)

1. *analysis*: the whole-model graph (``torch.export`` / ``symbolic_trace`` / none,
   :func:`nmfx.tracing.analysis_graph`), annotated by ``find_prunable`` and ``tag_roles(whole_model=True)``;
   only read, for roles (which Linear is the head).
2. *scopes* (:func:`nmfx.tracing.rewrite_scopes`): the largest traceable submodules holding a prunable op
   (``find_prunable`` annotates each candidate), a root ``nn.Linear``, the root's own forward, and the
   ``nn.MultiheadAttention`` modules.
3. :data:`SPARSIFY_PIPELINE` on every traced scope, in order:

   ==================  ====================  =====================  ==========================================
   pass                requires              ensures                does
   ==================  ====================  =====================  ==========================================
   tag_roles           candidate             candidate              attention roles from the scope graph
   adopt_roles         candidate             candidate              whole-model role, else scope, else name
   policy              candidate             sparsify, skip         include/exclude/head/tied/width; pattern
   rewrite_masked      sparsify, skip        sparsified, skip       ``masked_linear`` over mask state
   ==================  ====================  =====================  ==========================================

   then ``verify(rewritten=True)``. ``nn.MultiheadAttention`` (no traceable linear op) gets the same policy
   decision per projection weight (``rewrite_multihead_attention``).
4. *install*, only once every scope compiled (the passes wrote only their graphs and the plans in
   ``gm.meta`` / ``node.meta``, so a failure before this leaves the model untouched):
   :func:`nmfx.tracing.install_scope` moves each planned state onto the module owning its weight, replaces
   submodules by their graphs, turns rewritten ``nn.Linear`` calls into ``MaskedLinear`` calls and swaps the
   root's forward; ``install_multihead_attention`` attaches the MHA states and swaps their class.

**to_inference / load** (:func:`lower_graphs`, called by ``nmfx.to_inference``; ``nmfx.load`` runs
``sparsify`` + a structure-only ``to_inference`` on a staging copy): :data:`LOWER_PIPELINE`, pass by
pass over every rewritten graph of the model (each pass runs on all graphs before the next starts):

   ==================  ====================  =====================  ==========================================
   pass                requires              ensures                does
   ==================  ====================  =====================  ==========================================
   plan_lowering       sparsified, skip      sparsified, skip       packs each weight into a plan in node.meta
   lower_inference     sparsified, skip      packed, skip           installs the plans: ``nm_linear`` nodes
                                                                    over packed buffers, owners -> NMLinear
   ==================  ====================  =====================  ==========================================

then ``verify(rewritten=True)``. Lone ``MaskedLinear`` layers are planned with ``plan_weight`` alongside the
planning pass and installed with ``lower_weight`` after the graphs. Every plan (the packing, where user
input can fail) is made before anything is installed, so a failed lowering changes nothing.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Optional

from torch import fx, nn

from nmfx.config import SparsifyConfig
from nmfx.layers import is_plain_linear
from nmfx.meta import META_KEY, annotated_nodes
from nmfx.passes.attention import tag_roles
from nmfx.passes.find_prunable import find_prunable
from nmfx.passes.lower_inference import lower_inference, plan_lowering
from nmfx.passes.pipeline import Pass, run_pipeline
from nmfx.passes.policy import Policy, apply_policy
from nmfx.passes.rewrite_masked import rewrite_masked
from nmfx.passes.rewrite_modules import (disable_fused_fast_path, install_multihead_attention,
                                        rewrite_multihead_attention)
from nmfx.passes.roles import adopt_roles
from nmfx.passes.verify import verify
from nmfx.report import ReportRow, default_pattern
from nmfx.tracing import analysis_graph, install_scope, rewrite_scopes

__all__ = ["SPARSIFY_PIPELINE", "LOWER_PIPELINE", "Context", "run_sparsify_pipeline", "sparsify_model",
           "lower_graphs", "Compiled"]


@dataclass
class Context:
    """What the passes of a pipeline read besides the graph."""

    config: Optional[SparsifyConfig] = None
    policy: Optional[Policy] = None
    graph_roles: dict[str, str] = field(default_factory=dict)  # weight -> role, from the whole-model graph
    frontend: str = ""
    whole_model: bool = False
    backend: str = "auto"
    structure_only: bool = False


def _statuses(*names: str) -> frozenset[str]:
    return frozenset(names)


SPARSIFY_PIPELINE: tuple[Pass, ...] = (
    Pass("tag_roles", lambda gm, ctx: tag_roles(gm), _statuses("candidate"), _statuses("candidate")),
    Pass("adopt_roles", lambda gm, ctx: adopt_roles(gm, ctx.graph_roles, ctx.frontend, ctx.whole_model),
         _statuses("candidate"), _statuses("candidate")),
    Pass("policy", lambda gm, ctx: apply_policy(gm, ctx.policy), _statuses("candidate"), _statuses("sparsify", "skip")),
    Pass("rewrite_masked", lambda gm, ctx: rewrite_masked(gm, None, ctx.config.method),
         _statuses("sparsify", "skip"), _statuses("sparsified", "skip")),
)

LOWER_PIPELINE: tuple[Pass, ...] = (
    Pass("plan_lowering", lambda gm, ctx: plan_lowering(gm, backend=ctx.backend, structure_only=ctx.structure_only),
         _statuses("sparsified", "skip"), _statuses("sparsified", "skip")),
    Pass("lower_inference", lambda gm, ctx: lower_inference(gm, backend=ctx.backend),
         _statuses("sparsified", "skip"), _statuses("packed", "skip")),
)


def run_sparsify_pipeline(gm: fx.GraphModule, context: Context) -> fx.GraphModule:
    """:data:`SPARSIFY_PIPELINE` on one scope's graph, then ``verify(rewritten=True)``."""
    run_pipeline(SPARSIFY_PIPELINE, gm, context)
    verify(gm, rewritten=True)
    return gm


@dataclass
class Compiled:
    """The outcome of :func:`sparsify_model`: the report rows and the analysis frontend / note."""

    rows: list[ReportRow]
    frontend: str
    note: str


def sparsify_model(model: nn.Module, config: SparsifyConfig, example_inputs: Any = None) -> Compiled:
    """Run the sparsify pipeline on every scope of ``model`` and install the result (see the module
    docstring). The passes change only their own graphs, so a failure leaves the model as it was
    (nothing to roll back)."""
    context = Context(config=config, policy=Policy.from_config(config, _tied_parameters(model)))
    analysis, context.frontend, note = analysis_graph(model, example_inputs)
    context.whole_model = analysis is not None
    if analysis is not None and not is_plain_linear(model):  # a lone Linear is no model's head
        find_prunable(analysis)
        tag_roles(analysis, whole_model=True)
        context.graph_roles = {node.meta[META_KEY].weight: node.meta[META_KEY].role
                               for node in annotated_nodes(analysis.graph)}

    def has_prunable(gm: fx.GraphModule, name: str) -> bool:
        return bool(annotated_nodes(find_prunable(gm, prefix=name).graph))

    scopes, untraced, attention_modules = rewrite_scopes(model, has_prunable)
    rows: list[ReportRow] = []
    to_install, attention_plans = [], []
    for scope in scopes:  # compile everything first: the passes change only their graphs
        run_sparsify_pipeline(scope.graph_module, context)
        ops = [node.meta[META_KEY] for node in annotated_nodes(scope.graph_module.graph)]
        if any(op.status == "sparsified" for op in ops):
            to_install.append(scope)
        rows += [ReportRow.from_op(op, config, f"{scope.frontend}({scope.name})") for op in ops]
    for name, module in attention_modules:
        ops, planned = rewrite_multihead_attention(name, module, config.method, context.policy.choose)
        attention_plans.append((module, planned))
        rows += [ReportRow.from_op(op, config, "module") for op in ops]
    for scope in to_install:  # then install, which cannot fail on user input
        install_scope(model, scope)
    for module, planned in attention_plans:
        install_multihead_attention(module, planned)
    disable_fused_fast_path(model)
    seen = {row.name for row in rows}
    for module in untraced:
        for param in module.parameters:
            name = f"{module.name}.{param}" if module.name else param
            if name in seen or (context.graph_roles and name not in context.graph_roles):
                continue
            rows.append(ReportRow(name=name, role=context.graph_roles.get(name, "other"), op=module.module_type,
                                  shape=tuple(model.get_parameter(name).shape), pattern=default_pattern(config),
                                  status="skip", reason=f"used directly in {module.module_type}.forward: "
                                  f"{module.reason}", frontend="per-module"))
    return Compiled(rows, context.frontend, note)


def lower_graphs(gms: list[fx.GraphModule], backend: str, structure_only: bool = False,
                 before_install: Callable[[], Any] = lambda: None) -> Any:
    """Run :data:`LOWER_PIPELINE` over ``gms`` pass by pass: the planning pass on every graph, then
    ``before_install()`` (the caller's own planning; its result is returned), then the install pass on
    every graph, then ``verify``. A failure before the install pass leaves every graph and module as it was."""
    context = Context(backend=backend, structure_only=structure_only)
    plan, install = LOWER_PIPELINE
    for gm in gms:
        run_pipeline((plan,), gm, context)
    planned = before_install()
    for gm in gms:
        run_pipeline((install,), gm, context)
        verify(gm, rewritten=True)
    return planned


def _tied_parameters(model: nn.Module) -> dict[str, str]:
    first_name: dict[int, str] = {}
    tied: dict[str, str] = {}
    for name, param in model.named_parameters(remove_duplicate=False):
        other = first_name.setdefault(id(param), name)
        if other != name:
            tied[name] = other
            tied.setdefault(other, name)
    return tied
