"""Lowering pass: ``masked_linear`` nodes -> ``nmfx::nm_linear`` nodes over packed N:M weights.

For each masked node whose weight is at ``<owner>.<param>`` the pass packs ``W * m`` (in ``[out, in]``
layout: a ``[in, out]`` Conv1D weight is transposed first) with :func:`nmfx.packed.pack_nm`, registers
the packed tensors as buffers ``<owner>.<param>_values`` / ``<owner>.<param>_indices``, replaces the
node by::

    torch.ops.nmfx.nm_linear(x, <owner>.<param>_values, <owner>.<param>_indices, bias, N, M, bits, backend)

and deletes the dense weight and its ``NMState`` (training state) from the owner. The annotation is
carried over with ``kind="nm_linear"`` and ``status="packed"``. ``structure_only=True`` allocates the
buffers empty (their values are loaded from a file afterwards, see ``nmfx.load``).
"""

from __future__ import annotations

import dataclasses

import torch
from torch import fx

from nmfx.inference_ops import nm_linear  # registers torch.ops.nmfx.nm_linear
from nmfx.meta import META_KEY, PrunableOp, annotated_nodes
from nmfx.ops import masked_linear
from nmfx.packed import index_bits, pack_nm
from nmfx.state import STATE_SUFFIX, NMState

__all__ = ["lower_inference", "VALUES_SUFFIX", "INDICES_SUFFIX"]

VALUES_SUFFIX = "_values"
INDICES_SUFFIX = "_indices"


def lower_inference(gm: fx.GraphModule, backend: str = "auto", structure_only: bool = False) -> fx.GraphModule:
    """Lower every ``masked_linear`` node of ``gm`` in place; returns ``gm``."""
    graph = gm.graph
    lowered: set[str] = set()
    for node in annotated_nodes(graph):
        if node.target is not masked_linear:
            continue
        op: PrunableOp = node.meta[META_KEY]
        owner_path, _, param = op.target.rpartition(".")
        owner = gm.get_submodule(owner_path) if owner_path else gm
        state = getattr(owner, param + STATE_SUFFIX)
        if not isinstance(state, NMState):
            raise TypeError(f"{op.weight}: no nmfx state next to the weight; was the graph rewritten by nmfx?")
        if op.target not in lowered:
            _pack_into(owner, param, state, op, structure_only)
            lowered.add(op.target)
        prefix = f"{owner_path}.{param}" if owner_path else param
        x, bias = node.args[0], node.args[3]
        pattern = state.pattern
        with graph.inserting_before(node):
            values = graph.get_attr(prefix + VALUES_SUFFIX)
            indices = graph.get_attr(prefix + INDICES_SUFFIX)
            new = graph.call_function(torch.ops.nmfx.nm_linear.default,
                                      (x, values, indices, bias, pattern.n, pattern.m, index_bits(pattern.m), backend))
        new.meta = dict(node.meta)
        new.meta[META_KEY] = dataclasses.replace(op, kind="nm_linear", status="packed")
        node.replace_all_uses_with(new)
        graph.erase_node(node)
    graph.eliminate_dead_code()
    for target in lowered:
        owner_path, _, param = target.rpartition(".")
        owner = gm.get_submodule(owner_path) if owner_path else gm
        if any(n.op == "get_attr" and n.target == target for n in graph.nodes):
            raise RuntimeError(f"{target}: the dense weight is still read after lowering; not dropped")
        delattr(owner, param)
        delattr(owner, param + STATE_SUFFIX)
    graph.lint()
    gm.recompile()
    return gm


def _pack_into(owner: torch.nn.Module, param: str, state: NMState, op: PrunableOp, structure_only: bool) -> None:
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
    owner.register_buffer(param + VALUES_SUFFIX, values)
    owner.register_buffer(param + INDICES_SUFFIX, indices)
