"""Analysis pass: find every linear-like op whose weight is a parameter, and annotate it.

Recognised, structurally (module names play no part):

* ``call_module`` of an ``nn.Linear`` (and subclasses such as ``NonDynamicallyQuantizableLinear``);
* ``F.linear`` / ``aten.linear`` with a parameter weight;
* ``torch.addmm`` / ``aten.addmm`` with a parameter as the second operand (GPT-2's ``Conv1D``, whose
  weight is stored ``[in, out]``: its N:M groups run along dim 0);
* ``matmul`` / ``mm`` / ``@`` with a 2-D parameter as the right operand (``x @ W``, or ``x @ W.t()``).

Each match gets a :class:`nmfx.meta.PrunableOp` in ``node.meta["nmfx"]`` with the weight's qualified
name in the user's model (``prefix`` + its path in the graph's module), the bias, the layout and the
shape. Weights that are not ``nn.Parameter`` (buffers, computed tensors) are not prunable.
"""

from __future__ import annotations

import operator
from typing import Optional

import torch
import torch.nn.functional as F
from torch import fx, nn

from nmfx.meta import META_KEY, PrunableOp, node_arg

__all__ = ["find_prunable"]

aten = torch.ops.aten
_LINEAR = {F.linear, torch._C._nn.linear, aten.linear.default}
_ADDMM = {torch.addmm, aten.addmm.default}
_MATMUL = {torch.matmul, torch.mm, operator.matmul, aten.mm.default, aten.matmul.default}
_MATMUL_METHODS = {"matmul", "mm", "__matmul__"}
_TRANSPOSE_FNS = {torch.t, aten.t.default, aten.permute.default, torch.transpose, aten.transpose.int}
_TRANSPOSE_METHODS = {"t", "transpose", "permute"}


def find_prunable(gm: fx.GraphModule, prefix: str = "") -> fx.GraphModule:
    """Annotate the prunable ops of ``gm`` in place; ``prefix`` is ``gm``'s qualified name in the model."""
    for node in gm.graph.nodes:
        found = _match(gm, node)
        if found is not None:
            kind, target, bias, transposed = found
            weight = gm.get_parameter(target)
            node.meta[META_KEY] = PrunableOp(
                kind=kind, weight=_join(prefix, target), target=target, bias=bias,
                transposed=transposed, weight_shape=tuple(weight.shape),
            )
    return gm


def _match(gm: fx.GraphModule, node: fx.Node) -> Optional[tuple[str, str, Optional[str], bool]]:
    """(kind, weight target, bias target, weight stored [in, out]) for a prunable node, else None."""
    if node.op == "call_module":
        module = gm.get_submodule(node.target)
        if isinstance(module, nn.Linear) and isinstance(module.weight, nn.Parameter) and len(node.args) == 1:
            bias = f"{node.target}.bias" if module.bias is not None else None
            return "linear", f"{node.target}.weight", bias, False
        return None
    if node.op == "call_function" and node.target in _LINEAR:
        x, weight, bias = (node_arg(node, i, name) for i, name in enumerate(("input", "weight", "bias")))
        resolved = _parameter(gm, weight)
        if resolved is None or not isinstance(x, fx.Node):
            return None
        return "linear", resolved[0], _bias(gm, bias), resolved[1]
    is_addmm = node.op == "call_function" and node.target in _ADDMM
    if is_addmm and len(node.args) == 3 and node.kwargs.get("beta", 1) == 1 and node.kwargs.get("alpha", 1) == 1:
        # addmm's bias must be a 1-D parameter to be a linear bias (other operands may broadcast oddly).
        resolved, bias = _parameter(gm, node.args[2]), _bias(gm, node.args[0])
        if resolved is None or bias is None or gm.get_parameter(bias).dim() != 1:
            return None
        return "addmm", resolved[0], bias, not resolved[1]
    is_matmul = (node.op == "call_function" and node.target in _MATMUL) or (
        node.op == "call_method" and node.target in _MATMUL_METHODS)
    if is_matmul and len(node.args) == 2:
        resolved = _parameter(gm, node.args[1])
        if resolved is None:
            return None
        return "matmul", resolved[0], None, not resolved[1]
    return None


def _parameter(gm: fx.GraphModule, arg) -> Optional[tuple[str, bool]]:
    """(target, flipped) when ``arg`` is a 2-D parameter, or its transpose (flipped=True)."""
    if not isinstance(arg, fx.Node):
        return None
    flipped = False
    if _is_transpose(arg):
        arg, flipped = arg.args[0], True
    if not isinstance(arg, fx.Node) or arg.op != "get_attr":
        return None
    try:
        param = gm.get_parameter(arg.target)
    except AttributeError:
        return None
    return (arg.target, flipped) if param.dim() == 2 else None


def _is_transpose(node: fx.Node) -> bool:
    """``W.t()``, ``W.T``, ``transpose(0, 1)`` or ``permute(1, 0)`` of a 2-D tensor (not identities)."""
    if node.op == "call_function" and node.target is getattr:
        return node.args[1] in ("T", "mT")
    if node.op == "call_method" and node.target in _TRANSPOSE_METHODS:
        name = node.target
    elif node.op == "call_function" and node.target in _TRANSPOSE_FNS:
        name = getattr(node.target, "__name__", str(node.target)).split(".")[0]
    else:
        return False
    rest = list(node.args[1:])
    if name == "t":
        return True
    dims = rest[0] if len(rest) == 1 and isinstance(rest[0], (list, tuple)) else rest
    if len(dims) != 2 or not all(isinstance(d, int) for d in dims):
        return False
    first, second = (d % 2 for d in dims)
    if "permute" in name:
        return (first, second) == (1, 0)
    return first != second


def _bias(gm: fx.GraphModule, arg) -> Optional[str]:
    if isinstance(arg, fx.Node) and arg.op == "get_attr":
        try:
            gm.get_parameter(arg.target)
        except AttributeError:
            return None
        return arg.target
    return None


def _join(prefix: str, name: str) -> str:
    return f"{prefix}.{name}" if prefix else name
