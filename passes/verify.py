"""Invariant checks for rewritten graphs, run by :func:`nmfx.compile.run_pipeline` after every pass of the
sparsify and lowering pipelines (and with ``rewritten=True`` once a pipeline ends).

* ``graph.lint()`` passes;
* every ``get_attr`` resolves to an attribute of the graph's module (no dangling weight or mask);
* every ``masked_linear`` node reads a parameter weight and a bool mask buffer of the weight's shape,
  and carries an annotation whose status is ``"sparsified"``;
* an annotated ``call_module`` node with status ``"sparsified"`` calls a :class:`nmfx.layers.MaskedLinear`
  (with such a mask), one with status ``"packed"`` an :class:`nmfx.layers.NMLinear` (with its packed
  buffers), and every call of those two types is annotated so (except in a graph whose ``meta`` has
  ``"nmfx_opaque_calls"``: the root's own forward, whose submodules are scopes of their own);
* no annotated node is left with status ``"sparsify"`` after the rewrite (``rewritten=True``).
"""

from __future__ import annotations

import torch
from torch import fx

from nmfx.inference_ops import OP_FOR_BACKEND
from nmfx.layers import MaskedLinear, NMLinear
from nmfx.meta import META_KEY
from nmfx.state import NMState
from nmfx.ops import masked_linear

__all__ = ["InvariantError", "verify", "OPAQUE_CALLS_KEY"]

#: ``GraphModule.meta`` key: the graph's unannotated module calls are submodules rewritten on their own.
OPAQUE_CALLS_KEY = "nmfx_opaque_calls"


_PACKED_OPS = tuple(OP_FOR_BACKEND.values())


class InvariantError(AssertionError):
    """A graph invariant does not hold."""


def verify(gm: fx.GraphModule, rewritten: bool = False) -> None:
    """Raise :class:`InvariantError` naming the first broken invariant of ``gm``."""
    try:
        gm.graph.lint()
    except Exception as error:
        raise InvariantError(f"graph.lint() failed: {error}") from error
    for node in gm.graph.nodes:
        if node.op == "get_attr":
            try:
                _resolve(gm, node.target)
            except AttributeError as error:
                raise InvariantError(f"get_attr {node.target!r} does not resolve: {error}") from None
        if node.op == "call_function" and node.target is masked_linear:
            _check_masked(gm, node)
        if node.op == "call_function" and node.target in _PACKED_OPS:
            _check_packed(gm, node)
        if node.op == "call_module" and (META_KEY in node.meta or not gm.meta.get(OPAQUE_CALLS_KEY)):
            _check_module_call(gm, node)
        op = node.meta.get(META_KEY)
        if rewritten and op is not None and op.status == "sparsify":
            raise InvariantError(f"{op.weight}: chosen for sparsification but not rewritten")


def _check_masked(gm: fx.GraphModule, node: fx.Node) -> None:
    weight_node, mask_node = node.args[1], node.args[2]
    for arg, what in ((weight_node, "weight"), (mask_node, "mask")):
        if not isinstance(arg, fx.Node) or arg.op != "get_attr":
            raise InvariantError(f"{node.name}: the {what} is not read from the module ({arg!r})")
    weight, mask = _resolve(gm, weight_node.target), _resolve(gm, mask_node.target)
    if not isinstance(weight, torch.nn.Parameter):
        raise InvariantError(f"{node.name}: weight {weight_node.target!r} is not a parameter")
    if not isinstance(mask, torch.Tensor) or mask.dtype != torch.bool or mask.shape != weight.shape:
        raise InvariantError(f"{node.name}: mask {mask_node.target!r} is not a bool tensor of the weight's shape")
    op = node.meta.get(META_KEY)
    if op is None or op.status != "sparsified":
        raise InvariantError(f"{node.name}: masked_linear without a 'sparsified' nmfx annotation")


def _check_packed(gm: fx.GraphModule, node: fx.Node) -> None:
    for arg, what in ((node.args[1], "values"), (node.args[2], "indices")):
        if not isinstance(arg, fx.Node) or arg.op != "get_attr":
            raise InvariantError(f"{node.name}: the packed {what} are not read from the module ({arg!r})")
    if _resolve(gm, node.args[2].target).dtype != torch.uint8:
        raise InvariantError(f"{node.name}: packed indices must be uint8")
    op = node.meta.get(META_KEY)
    if op is None or op.status != "packed":
        raise InvariantError(f"{node.name}: nm_linear without a 'packed' nmfx annotation")


def _check_module_call(gm: fx.GraphModule, node: fx.Node) -> None:
    module = _resolve(gm, node.target)
    op = node.meta.get(META_KEY)
    status = op.status if op is not None else None
    for cls, want in ((MaskedLinear, "sparsified"), (NMLinear, "packed")):
        if isinstance(module, cls) != (status == want):
            raise InvariantError(f"{node.name}: a call of {type(module).__name__} {node.target!r} with nmfx status "
                                 f"{status!r} (a {cls.__name__} call must be annotated {want!r}, and only it)")
    if isinstance(module, MaskedLinear):
        state = getattr(module, "weight_nm", None)
        if not isinstance(state, NMState) or not isinstance(module.weight, torch.nn.Parameter):
            raise InvariantError(f"{node.name}: MaskedLinear {node.target!r} lacks its weight or its weight_nm state")
        if state.mask.dtype != torch.bool or state.mask.shape != module.weight.shape:
            raise InvariantError(f"{node.name}: the mask of {node.target!r} is not a bool tensor of the weight's shape")
    if isinstance(module, NMLinear):
        if module.kind == "semi_structured":
            if not isinstance(getattr(module, "weight_semi", None), torch.Tensor):
                raise InvariantError(f"{node.name}: semi-structured NMLinear {node.target!r} has no weight_semi")
        elif module.weight_indices.dtype != torch.uint8 or module.weight_values.dim() != 2:
            raise InvariantError(f"{node.name}: NMLinear {node.target!r} needs [out, K] values and uint8 indices")


def _resolve(gm: fx.GraphModule, target: str):
    value = gm
    for part in target.split("."):
        value = getattr(value, part)
    return value
