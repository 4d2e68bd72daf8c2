"""``nmfx.to_inference``: lower a trained sparse model into packed N:M inference graphs."""

from __future__ import annotations

import copy
import dataclasses
import warnings
from typing import Optional

import torch
from torch import nn

from nmfx.api import graphs, record, states
from nmfx.inference_ops import BACKENDS
from nmfx.meta import META_KEY, annotated_nodes
from nmfx.packed import MAX_PACKED_M
from nmfx.pattern import nm_mask
from nmfx.passes.lower_inference import lower_inference
from nmfx.passes.rewrite_modules import MaskedMultiheadAttention
from nmfx.passes.verify import verify
from nmfx.state import NMState

__all__ = ["to_inference", "is_inference", "LOWERING_BACKENDS"]

#: nm_linear's backends, plus PyTorch's 2:4 semi-structured sparse tensors (CUDA sm80+).
LOWERING_BACKENDS = BACKENDS + ("semi_structured",)


def to_inference(model: nn.Module, backend: str = "auto", *, dtype: Optional[torch.dtype] = None,
                 force: bool = False, inplace: bool = False, _structure_only: bool = False) -> nn.Module:
    """The deployable form of a sparsified model: every masked linear becomes ``nmfx::nm_linear`` over a
    packed N:M weight and the dense weights are dropped. Returns a copy unless ``inplace``, in eval mode
    with every parameter frozen (``nm_linear`` has no backward).

    Args:
        backend: ``"auto"`` (CPU: the C++ kernel when it builds, else the reference; CUDA sm80+:
            semi-structured 2:4 tensors for 2:4-compatible patterns, else the Triton kernel), ``"cpu"``,
            ``"reference"``, ``"triton"``, or ``"semi_structured"`` (layers that cannot use it fall back
            to ``nm_linear``, with the reason in ``nmfx.report``).
        dtype: cast the model (e.g. ``torch.bfloat16``) before packing.
        force: lower even if training has not reached the hard target mask (alpha = 0, target N:M): the
            target mask of the current weights is used, so outputs change; a warning says so.
    """
    found = record(model)
    if found.pattern.m > MAX_PACKED_M:
        raise ValueError(f"the packed format supports M <= {MAX_PACKED_M}; pattern {found.pattern} cannot be lowered")
    if backend not in LOWERING_BACKENDS:
        raise ValueError(f"unknown backend {backend!r}; valid backends: {', '.join(LOWERING_BACKENDS)}")
    if is_inference(model):
        raise ValueError("this model is already an nmfx inference model")
    unfinished = {name: s.schedule for name, s in states(model).items()
                  if s.schedule.alpha != 0.0 or s.schedule.pattern != s.pattern}
    if unfinished and not force and not _structure_only:
        name, state = next(iter(unfinished.items()))
        raise ValueError(f"{len(unfinished)} weights have not reached the hard {found.pattern} mask (e.g. {name}: "
                         f"alpha={state.alpha:.3g}, pattern {state.pattern}); finish the schedule (total_steps) "
                         "or pass force=True to prune them to the target mask now")
    target = model if inplace else copy.deepcopy(model)
    if dtype is not None:
        target.to(dtype)
    if unfinished and not _structure_only:
        warnings.warn(f"nmfx.to_inference(force=True): {len(unfinished)} weights pruned to {found.pattern} before "
                      "their schedule ended; outputs differ from the trained model's", stacklevel=2)
        with torch.no_grad():
            for name, state in states(target).items():
                state.mask.copy_(nm_mask(target.get_parameter(name), state.pattern, dim=state.dim))
    for gm in graphs(target).values():
        lower_inference(gm, backend=backend, structure_only=_structure_only)
        verify(gm)
    _materialize_attention(target)
    lowered = {node.meta[META_KEY].weight: node.meta[META_KEY] for gm in graphs(target).values()
               for node in annotated_nodes(gm.graph) if node.meta[META_KEY].status == "packed"}
    rows = [dataclasses.replace(row, op=lowered[row.name].kind, status="packed", reason=lowered[row.name].reason)
            if row.name in lowered else row for row in found.rows]
    object.__setattr__(target, "_nmfx_record", dataclasses.replace(found, rows=rows, inference=True))
    target.requires_grad_(False)  # an inference graph: nm_linear has no backward
    return target.eval()


def is_inference(model: nn.Module) -> bool:
    found = getattr(model, "_nmfx_record", None)
    return bool(found is not None and getattr(found, "inference", False))


def _materialize_attention(model: nn.Module) -> None:
    """``nn.MultiheadAttention`` needs dense weights (F.multi_head_attention_forward): fold the masks in."""
    for module in model.modules():
        if not isinstance(module, MaskedMultiheadAttention):
            continue
        for owner in (module, module.out_proj):
            for name, child in list(owner.named_children()):
                if isinstance(child, NMState):
                    param = getattr(owner, child.param_name)
                    with torch.no_grad():
                        param.mul_(child.mask)
                    delattr(owner, name)
        module.__class__ = nn.MultiheadAttention


def packed_layers(model: nn.Module) -> list[dict]:
    """Name, pattern and layout of every packed layer of an inference model (for file headers)."""
    pattern = str(record(model).pattern)
    layers = []
    for scope, gm in graphs(model).items():
        for node in annotated_nodes(gm.graph):
            op = node.meta[META_KEY]
            if op.status == "packed":
                layers.append({"weight": op.weight, "shape": list(op.weight_shape), "transposed": op.transposed,
                               "pattern": pattern, "kind": op.kind, "scope": scope})
    return layers



