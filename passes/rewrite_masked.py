"""Rewrite pass: replace each op the policy chose with ``nmfx.ops.masked_linear`` over a mask buffer.

For a weight at ``<owner>.<param>`` the pass registers an :class:`nmfx.state.NMState` child
``<owner>.<param>_nm`` (mask + schedule buffers; one per weight, shared by every node that uses it)
and replaces the op node by::

    masked_linear(x, <owner>.<param>, <owner>.<param>_nm.mask, bias,
                  <owner>.<param>_nm.alpha, <owner>.<param>_nm.srste_lambda | None,
                  exact_gradient=..., transposed=...)

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

__all__ = ["rewrite_masked", "keep_module_calls", "MODULE_CALL_KEY"]

#: ``node.meta`` key of a masked node that replaced a ``call_module`` of a plain ``nn.Linear``.
MODULE_CALL_KEY = "nmfx_module_call"


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
    """(path, state) of the weight's NMState, created on first use (one per weight)."""
    owner_path, _, param_name = op.target.rpartition(".")
    owner = gm.get_submodule(owner_path) if owner_path else gm
    state_name = param_name + STATE_SUFFIX
    if not isinstance(getattr(owner, state_name, None), NMState):
        weight = owner.get_parameter(param_name)
        owner.add_module(state_name, NMState(param_name, weight, pattern, method, dim=op.group_dim))
    return (f"{owner_path}.{state_name}" if owner_path else state_name), getattr(owner, state_name)


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
