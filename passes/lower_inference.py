"""Lowering: ``masked_linear`` nodes -> ``nmfx::nm_linear`` nodes over packed N:M weights, in two passes.

:func:`plan_lowering` (pure: it writes only ``node.meta[PLAN_KEY]``) packs, for each masked node whose
weight is at ``<owner>.<param>``, ``W * m`` (in ``[out, in]`` layout: a ``[in, out]`` Conv1D weight is
transposed first) with :func:`nmfx.packed.pack_nm`. :func:`lower_inference` then applies the plans: it
registers the packed tensors as buffers ``<owner>.<param>_values`` / ``<owner>.<param>_indices``,
replaces the node by::

    torch.ops.nmfx.nm_linear(x, <owner>.<param>_values, <owner>.<param>_indices, bias, N, M, bits)

(``torch.ops.nmfx.nm_linear_reference``, same arguments, for ``backend="reference"``; every other
backend lowers to ``nm_linear``, whose kernel the dispatcher picks from the tensors' device)

and deletes the dense weight and its ``NMState`` (training state) from the owner. The annotation is
carried over with ``kind="nm_linear"`` and ``status="packed"``. ``structure_only=True`` allocates the
buffers empty (their values are loaded from a file afterwards, see ``nmfx.load``).

An owner that is an ``nn.Linear`` / :class:`~nmfx.layers.MaskedLinear` or a transformers ``Conv1D``
becomes an :class:`~nmfx.layers.NMLinear` (its class is swapped: same object, same buffer names). A call
of a ``MaskedLinear`` (``call_module``) stays a call of that module, now an ``NMLinear`` whose forward
is ``nm_linear``; only its annotation changes. Other owners keep their class.

``backend="semi_structured"`` (and ``"auto"`` on CUDA sm80+ for 2:4-compatible patterns) lowers a layer
instead to ``F.linear`` over ``torch.sparse.to_sparse_semi_structured(W * m)`` (PyTorch's 2:4 sparse
tensor cores; a 1:8 mask is a valid 2:4 mask), stored as ``<owner>.<param>_semi``. The constraints
(CUDA sm80+, fp16/bf16, 2:4-compatible pattern, out % 32 == 0 and in % 64 == 0) are checked per layer
up front; a layer that fails one is packed for ``nm_linear`` instead and the reason is kept in its
annotation (``nmfx.report`` shows it).
"""

from __future__ import annotations

import dataclasses

import torch
from torch import fx

from nmfx.inference_ops import OP_FOR_BACKEND
from nmfx.layers import MaskedLinear, become_nm_linear, is_conv1d, is_plain_linear
from nmfx.meta import META_KEY, PrunableOp, annotated_nodes
from nmfx.ops import masked_linear
from nmfx.packed import index_bits, pack_nm
from nmfx.pattern import Pattern
from nmfx.state import STATE_SUFFIX, NMState

__all__ = ["plan_lowering", "lower_inference", "plan_weight", "lower_weight", "LoweredWeight", "PLAN_KEY", "SEMI_REFUSED", "layer_backend", "semi_structured_problem", "VALUES_SUFFIX", "INDICES_SUFFIX", "SEMI_SUFFIX"]

VALUES_SUFFIX = "_values"
INDICES_SUFFIX = "_indices"
SEMI_SUFFIX = "_semi"
#: How a layer's note / annotation reason says why it was not lowered to a 2:4 semi-structured tensor.
SEMI_REFUSED = "not semi-structured: "
#: ``node.meta`` key of a :class:`LoweredWeight` made by :func:`plan_lowering`.
PLAN_KEY = "nmfx_lowering"


def semi_structured_problem(weight: torch.Tensor, pattern, out_features: int, in_features: int) -> str:
    """Why a ``[out, in]`` weight cannot use ``to_sparse_semi_structured`` ("" when it can)."""
    if weight.device.type != "cuda":
        return f"needs a CUDA tensor (the weight is on {weight.device}; PyTorch's 2:4 kernels are CUDA-only)"
    if torch.cuda.get_device_capability(weight.device) < (8, 0):
        return f"needs an sm80+ GPU (this one is sm{''.join(map(str, torch.cuda.get_device_capability(weight.device)))})"
    if weight.dtype not in (torch.float16, torch.bfloat16):
        return f"needs float16 or bfloat16 weights (got {weight.dtype}; pass dtype= to to_inference)"
    if not pattern.is_2to4_compatible:
        return f"pattern {pattern} is not 2:4-compatible"
    if out_features % 32 or in_features % 64:
        return f"shape [{out_features}, {in_features}] is not a multiple of [32, 64]"
    return ""


@dataclasses.dataclass
class LoweredWeight:
    """The plan for one sparsified weight: its packed tensors (registered on the owner as
    ``<param><suffix>``), the kind of layer it becomes, and why semi-structured was refused ("")."""

    kind: str  # "nm_linear" or "semi_structured"
    reason: str
    pattern: Pattern
    tensors: dict  # suffix -> tensor


def plan_lowering(gm: fx.GraphModule, backend: str = "auto", structure_only: bool = False) -> fx.GraphModule:
    """The planning pass: pack every weight a ``masked_linear`` node or a ``MaskedLinear`` call of ``gm``
    reads and store the :class:`LoweredWeight` in the node's ``meta[PLAN_KEY]`` (one plan per weight,
    shared by the nodes that read it). Changes nothing else: neither the graph nor any module, so every
    plan of a model can be made (and fail) before anything is lowered."""
    planned: dict[str, LoweredWeight] = {}
    for node in _lowerable_nodes(gm):
        op: PrunableOp = node.meta[META_KEY]
        if op.target not in planned:
            owner_path, _, param = op.target.rpartition(".")
            planned[op.target] = plan_weight(gm.get_submodule(owner_path) if owner_path else gm, param, op, backend,
                                             structure_only)
        node.meta[PLAN_KEY] = planned[op.target]
    return gm


def lower_inference(gm: fx.GraphModule, backend: str = "auto", structure_only: bool = False) -> fx.GraphModule:
    """The lowering pass: apply the plans of :func:`plan_lowering` (made now for nodes that have none) to
    ``gm`` in place: register the packed buffers, replace each masked node by ``nm_linear`` (or
    ``nm_linear_reference`` / ``F.linear`` over a 2:4 tensor), drop the dense weights and their states, and
    swap each owning ``nn.Linear`` / ``Conv1D`` to ``NMLinear``. Returns ``gm``."""
    graph = gm.graph
    if any(PLAN_KEY not in node.meta for node in _lowerable_nodes(gm)):
        plan_lowering(gm, backend, structure_only)
    installed: dict[str, tuple] = {}  # weight target -> (owner, param, annotation, plan): dense dropped at the end
    for node in list(_lowerable_nodes(gm)):
        op: PrunableOp = node.meta[META_KEY]
        plan: LoweredWeight = node.meta.pop(PLAN_KEY)
        owner_path, _, param = op.target.rpartition(".")
        owner = gm.get_submodule(owner_path) if owner_path else gm
        if op.target not in installed:
            for suffix, tensor in plan.tensors.items():
                _register(owner, param + suffix, tensor)
            installed[op.target] = (owner, param, op, plan)
        annotation = dataclasses.replace(op, kind=plan.kind, status="packed", pattern=plan.pattern,
                                         reason=f"{op.reason}; {SEMI_REFUSED}{plan.reason}" if plan.reason
                                         else op.reason)
        if node.op == "call_module":  # the module itself becomes an NMLinear: the call stays, so do its hooks
            node.meta[META_KEY] = annotation
            continue
        prefix = f"{owner_path}.{param}" if owner_path else param
        x, bias = node.args[0], node.args[3]
        with graph.inserting_before(node):
            if plan.kind == "semi_structured":
                new = graph.call_function(torch.nn.functional.linear, (x, graph.get_attr(prefix + SEMI_SUFFIX), bias))
            else:
                values = graph.get_attr(prefix + VALUES_SUFFIX)
                indices = graph.get_attr(prefix + INDICES_SUFFIX)
                new = graph.call_function(OP_FOR_BACKEND[layer_backend(backend)], (
                    x, values, indices, bias, plan.pattern.n, plan.pattern.m, index_bits(plan.pattern.m)))
        new.meta = dict(node.meta)
        new.meta[META_KEY] = annotation
        node.replace_all_uses_with(new)
        graph.erase_node(node)
    graph.eliminate_dead_code()
    for target, (owner, param, op, plan) in installed.items():
        if any(n.op == "get_attr" and n.target in (target, target + STATE_SUFFIX) for n in graph.nodes):
            raise RuntimeError(f"{target}: the dense weight is still read after lowering; not dropped")
        _drop_dense(owner, param, op, plan, backend, swap=owner is not gm)
    graph.lint()
    gm.recompile()
    return gm


def plan_weight(owner: torch.nn.Module, param: str, op: PrunableOp, backend: str = "auto",
                structure_only: bool = False) -> LoweredWeight:
    """The :class:`LoweredWeight` of ``owner.<param>`` (packed by its mask, ``owner.<param>_nm``); reads only.
    ``structure_only`` allocates the packed tensors empty (``nmfx.load`` fills them from a file)."""
    state = getattr(owner, param + STATE_SUFFIX, None)
    if not isinstance(state, NMState):
        raise TypeError(f"{op.weight}: no nmfx state next to the weight; was the graph rewritten by nmfx?")
    weight = getattr(owner, param) if hasattr(owner, param) else None
    semi, reason = _wants_semi_structured(backend, weight, state.pattern, op)
    if semi:
        return LoweredWeight("semi_structured", reason, state.pattern, {SEMI_SUFFIX: _semi_structured(owner, param, state, op)})
    return LoweredWeight("nm_linear", reason, state.pattern, _packed(owner, param, state, op, structure_only))


def lower_weight(owner: torch.nn.Module, plan: LoweredWeight, param: str, op: PrunableOp, backend: str = "auto",
                 swap: bool = True) -> None:
    """Apply ``plan`` (from :func:`plan_weight`) to a weight no graph reads: register its packed tensors on
    ``owner``, drop the dense weight and its state, and, when ``swap`` and ``owner`` is an ``nn.Linear`` /
    ``MaskedLinear`` or a transformers ``Conv1D`` and ``param == "weight"``, swap ``owner``'s class to
    :class:`NMLinear`."""
    for suffix, tensor in plan.tensors.items():
        _register(owner, param + suffix, tensor)
    _drop_dense(owner, param, op, plan, backend, swap)


def _lowerable_nodes(gm: fx.GraphModule) -> list[fx.Node]:
    """The annotated nodes of ``gm`` that lowering replaces: ``masked_linear`` calls and ``MaskedLinear`` calls."""
    return [node for node in annotated_nodes(gm.graph)
            if node.target is masked_linear
            or (node.op == "call_module" and isinstance(gm.get_submodule(node.target), MaskedLinear))]


def _register(owner: torch.nn.Module, name: str, tensor: torch.Tensor) -> None:
    if name.endswith(SEMI_SUFFIX):
        owner.register_parameter(name, torch.nn.Parameter(tensor, requires_grad=False))
    else:
        owner.register_buffer(name, tensor)


def _drop_dense(owner: torch.nn.Module, param: str, op: PrunableOp, plan: LoweredWeight, backend: str,
                swap: bool) -> None:
    convertible = is_plain_linear(owner) or (is_conv1d(owner) and op.transposed)
    delattr(owner, param)
    delattr(owner, param + STATE_SUFFIX)
    if swap and param == "weight" and convertible:
        become_nm_linear(owner, op.in_features, op.out_features, plan.pattern, layer_backend(backend), plan.kind,
                         op.transposed, f"{SEMI_REFUSED}{plan.reason}" if plan.reason else "")


def layer_backend(backend: str) -> str:
    """The backend a packed layer lowered with ``backend`` calls: ``"reference"``, or ``"auto"`` (the op's
    kernel for the tensors' device; ``to_inference`` checked up front that an explicit ``"cpu"`` /
    ``"triton"`` is the kernel that will run)."""
    return "reference" if backend == "reference" else "auto"


def _wants_semi_structured(backend: str, weight, pattern, op: PrunableOp) -> tuple[bool, str]:
    """(use to_sparse_semi_structured, why not when it was asked for explicitly)."""
    if backend not in ("semi_structured", "auto") or weight is None:
        return False, ""
    if backend == "auto" and (weight.device.type != "cuda" or not pattern.is_2to4_compatible):
        return False, ""
    problem = semi_structured_problem(weight, pattern, op.out_features, op.in_features)
    return not problem, problem if backend == "semi_structured" else ""


def _semi_structured(owner: torch.nn.Module, param: str, state: NMState, op: PrunableOp) -> torch.Tensor:
    weight = getattr(owner, param).detach()
    mask = state.mask
    if op.transposed:
        weight, mask = weight.t(), mask.t()
    dense = torch.where(mask, weight, torch.zeros((), dtype=weight.dtype, device=weight.device)).contiguous()
    return torch.sparse.to_sparse_semi_structured(dense)


def _packed(owner: torch.nn.Module, param: str, state: NMState, op: PrunableOp, structure_only: bool) -> dict:
    weight = getattr(owner, param).detach()
    out_features, in_features = op.out_features, op.in_features
    if structure_only:
        kept = in_features // state.pattern.m * state.pattern.n
        values = torch.empty(out_features, kept, dtype=weight.dtype, device=weight.device)
        indices = torch.empty(out_features, (kept * index_bits(state.pattern.m) + 7) // 8, dtype=torch.uint8,
                              device=weight.device)
    else:
        mask = state.mask
        if op.transposed:
            weight, mask = weight.t(), mask.t()
        packed = pack_nm(weight.contiguous(), state.pattern, mask.contiguous())
        values, indices = packed.values, packed.indices
    return {VALUES_SUFFIX: values, INDICES_SUFFIX: indices}
