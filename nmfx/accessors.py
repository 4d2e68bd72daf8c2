"""Read what ``nmfx.sparsify`` left on a model: its states, masks, rewritten graphs and record.

Kept apart from :mod:`nmfx.api` (which drives the compiler) so that :mod:`nmfx.report`, :mod:`nmfx.stats`
and the other readers import them at module level without an import cycle.
"""

from __future__ import annotations

from typing import Any

from torch import Tensor, fx, nn

from nmfx.meta import META_KEY
from nmfx.state import STATE_SUFFIX, NMState
from nmfx.tracing import ROOT_GRAPH_ATTR

__all__ = ["states", "masks", "graphs", "is_sparsified", "record", "RECORD_ATTR"]

#: Attribute (not a submodule) holding the model's :class:`nmfx.report.SparsifyRecord`.
RECORD_ATTR = "_nmfx_record"


def states(model: nn.Module) -> dict[str, NMState]:
    """``{weight qualified name: NMState}`` for every sparsified weight."""
    return {path[: -len(STATE_SUFFIX)]: module for path, module in model.named_modules()
            if isinstance(module, NMState)}


def masks(model: nn.Module) -> dict[str, Tensor]:
    """``{weight qualified name (as in the original model): current bool mask}``, each whole: under FSDP2,
    where each rank stores only its shard of a mask, the shards are gathered (call it on every rank)."""
    return {name: state.full_mask() for name, state in states(model).items()}


def graphs(model: nn.Module) -> dict[str, fx.GraphModule]:
    """``{module name: rewritten GraphModule}`` (print ``gm.code`` to read one); ``""`` is the root's own
    forward when it was rewritten (the root keeps its object; its ``forward`` runs this graph's code)."""
    found = {name: module for name, module in model.named_modules()
             if isinstance(module, fx.GraphModule) and any(META_KEY in n.meta for n in module.graph.nodes)}
    root = getattr(model, ROOT_GRAPH_ATTR, None)
    return {"": root, **found} if root is not None and "" not in found else found


def is_sparsified(model: nn.Module) -> bool:
    return getattr(model, RECORD_ATTR, None) is not None


def record(model: nn.Module) -> Any:
    """The model's :class:`nmfx.report.SparsifyRecord` (ValueError if it was not sparsified)."""
    found = getattr(model, RECORD_ATTR, None)
    if found is None:
        raise ValueError(f"{type(model).__name__} has not been sparsified by nmfx (call nmfx.sparsify first)")
    return found
