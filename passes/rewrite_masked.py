"""Rewrite pass: replace each op the policy chose with ``nmfx.ops.masked_linear`` over a mask buffer.

For a weight at ``<owner>.<param>`` the pass creates an :class:`nmfx.state.NMState` (mask + schedule
buffers; one per weight, shared by every node that uses it) as a child of the graph module itself, under a
flat name (``nmfx_state__<owner>__<param>``), and replaces the op node by::

    masked_linear(x, <owner>.<param>, nmfx_state__<owner>__<param>.mask, bias,
                  <...>.alpha, <...>.srste_lambda | None, exact_gradient=..., transposed=...)

So the pass changes nothing but ``gm`` (the submodules it shares with the user's model are untouched) and
the rewritten graph runs as it is. ``gm.meta["nmfx_states"]`` is the plan ``{flat name: (owner path,
"<param>_nm")}`` that :func:`install_states` (the install step, run by ``nmfx.sparsify`` once every scope
compiled) applies: each state moves to ``<owner>.<param>_nm``, where checkpoints name it.

The replacement carries the original node's ``meta`` with the annotation's status set to
``"sparsified"``. With ``method="dense"`` or an ``M:M`` pattern the rewritten graph computes exactly
what the original does; otherwise exactly the original with masked weights.

A node that was a ``call_module`` of a plain ``nn.Linear`` also gets ``meta["nmfx_module_call"]`` (the
module's path): the plan for :func:`keep_module_calls`, which the install step (``nmfx.sparsify``) runs
to turn such nodes back into calls of the same module object, its class swapped to
:class:`nmfx.layers.MaskedLinear`, so the hooks registered on it keep firing. This pass itself changes
no module's class.
"""

from __future__ import annotations

import dataclasses
from typing import Optional

from torch import fx

from nmfx.layers import MaskedLinear, is_plain_linear
from nmfx.meta import META_KEY, PrunableOp, annotated_nodes, node_arg
from nmfx.methods import Method
from nmfx.ops import masked_linear
from nmfx.pattern import Pattern
from nmfx.state import STATE_SUFFIX, NMState

__all__ = ["rewrite_masked", "install_states", "keep_module_calls", "MODULE_CALL_KEY", "STATES_PLAN_KEY"]

#: ``node.meta`` key of a masked node that replaced a ``call_module`` of a plain ``nn.Linear``.
MODULE_CALL_KEY = "nmfx_module_call"
#: ``GraphModule.meta`` key of the states plan: ``{flat child name: (owner path, state name)}``.
STATES_PLAN_KEY = "nmfx_states"
_FLAT_PREFIX = "nmfx_state__"


def rewrite_masked(gm: fx.GraphModule, pattern: Optional[Pattern], method: Method) -> fx.GraphModule:
    """Rewrite every node whose annotation says ``"sparsify"``, each weight at the pattern its annotation
    holds (``pattern`` where it holds none); returns ``gm`` (changed in place)."""
    graph = gm.graph
    for node in annotated_nodes(graph):
        op: PrunableOp = node.meta[META_KEY]
        if op.status != "sparsify":
            continue
        target = op.pattern or pattern
        if target is None:
            raise ValueError(f"rewrite_masked: no pattern for {op.weight} (run the policy pass first)")
        state_path, state = _ensure_state(gm, op, target, method)
        x, bias = _operands(gm, node, op)
        with graph.inserting_before(node):
            weight = graph.get_attr(op.target)
            mask = graph.get_attr(f"{state_path}.mask")
            alpha = graph.get_attr(f"{state_path}.alpha")
            srste = graph.get_attr(f"{state_path}.srste_lambda") if state.uses_srste else None
            new = graph.call_function(
                masked_linear, (x, weight, mask, bias, alpha, srste),
                {"exact_gradient": state.exact_gradient, "transposed": op.transposed},
            )
        new.meta = dict(node.meta)
        new.meta[META_KEY] = dataclasses.replace(op, status="sparsified", pattern=target)
        if node.op == "call_module" and is_plain_linear(gm.get_submodule(node.target)):
            new.meta[MODULE_CALL_KEY] = node.target
        node.replace_all_uses_with(new)
        graph.erase_node(node)
    graph.eliminate_dead_code()
    graph.lint()
    gm.recompile()
    return gm


def keep_module_calls(gm: fx.GraphModule) -> list[str]:
    """Install step: every masked node planned as a module call (``meta["nmfx_module_call"]``) becomes a
    ``call_module`` of that same ``nn.Linear`` object again, whose class is swapped to
    :class:`~nmfx.layers.MaskedLinear` (it computes the same ``masked_linear``). Returns the module paths."""
    graph = gm.graph
    kept = []
    for node in list(graph.nodes):
        target = node.meta.get(MODULE_CALL_KEY)
        if target is None or node.target is not masked_linear:
            continue
        module = gm.get_submodule(target)
        if not isinstance(module, MaskedLinear):
            module.__class__ = MaskedLinear
        with graph.inserting_before(node):
            call = graph.call_module(target, (node.args[0],))
        call.meta = {k: v for k, v in node.meta.items() if k != MODULE_CALL_KEY}
        node.replace_all_uses_with(call)
        graph.erase_node(node)
        kept.append(target)
    if kept:
        graph.eliminate_dead_code()
        graph.lint()
        gm.recompile()
    return kept


def _ensure_state(gm: fx.GraphModule, op: PrunableOp, pattern: Pattern, method: Method) -> tuple[str, NMState]:
    """(flat name, state) of the weight's NMState, created on ``gm`` on first use (one per weight)."""
    owner_path, _, param_name = op.target.rpartition(".")
    flat = _FLAT_PREFIX + op.target.replace(".", "__")
    if not isinstance(getattr(gm, flat, None), NMState):
        owner = gm.get_submodule(owner_path) if owner_path else gm
        if isinstance(getattr(owner, param_name + STATE_SUFFIX, None), NMState):
            raise ValueError(f"{op.weight} already has nmfx state; it is sparsified once")
        gm.add_module(flat, NMState(param_name, owner.get_parameter(param_name), pattern, method, dim=op.group_dim))
        gm.meta.setdefault(STATES_PLAN_KEY, {})[flat] = (owner_path, param_name + STATE_SUFFIX)
    return flat, getattr(gm, flat)


def install_states(gm: fx.GraphModule) -> list[str]:
    """Install step: move every state :func:`rewrite_masked` planned onto the module that owns its weight
    (``<owner>.<param>_nm``, the name checkpoints use) and point the graph there. Returns the state paths."""
    plan = gm.meta.pop(STATES_PLAN_KEY, {})
    if not plan:
        return []
    moved = {}
    for flat, (owner_path, state_name) in plan.items():
        owner = gm.get_submodule(owner_path) if owner_path else gm
        owner.add_module(state_name, getattr(gm, flat))
        delattr(gm, flat)
        moved[flat] = f"{owner_path}.{state_name}" if owner_path else state_name
    for node in gm.graph.nodes:
        if node.op == "get_attr":
            head, dot, rest = node.target.partition(".")
            if head in moved:
                node.target = moved[head] + dot + rest
    gm.graph.lint()
    gm.recompile()
    return list(moved.values())


def _operands(gm: fx.GraphModule, node: fx.Node, op: PrunableOp):
    """(input node, bias node or None) of the op being replaced."""
    if node.op == "call_module":
        bias = None
        if op.bias is not None:
            with gm.graph.inserting_before(node):
                bias = gm.graph.get_attr(op.bias)
        return node.args[0], bias
    if op.kind == "addmm":
        return node.args[1], node.args[0]
    if op.kind == "linear":
        return node_arg(node, 0, "input"), node_arg(node, 2, "bias")
    return node_arg(node, 0, "input"), None
