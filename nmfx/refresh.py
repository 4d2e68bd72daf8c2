"""``nmfx.refresh``: compute every mask from the weights a model holds *now*, for models built on the meta device.

The large-model flow builds the model on the meta device, sparsifies it there (the :class:`~nmfx.state.NMState`
buffers stay on meta: there is nothing to compute a mask from), shards it (FSDP2's ``fully_shard``),
materializes it with ``to_empty`` (every buffer then holds uninitialised memory) and only then loads or
initialises the weights. :func:`refresh` is the step after that: it restarts every schedule at step 0 and
computes every mask from the current weights, exactly what ``nmfx.sparsify`` does for a model built in memory.

Until then each state carries ``needs_refresh`` (why it holds nothing real): a Python attribute set at
construction on meta and by ``to_empty`` / moves off or onto the meta device, so no buffer contents can fake
it. Loading a checked nmfx checkpoint clears it as :func:`refresh` does. A model with such states refuses to
train (``nmfx.step``, a forward in training mode) and to lower (:func:`require_refreshed`), naming the fix.

Kept apart from :mod:`nmfx.state` (one weight's state) because it works on whole models through
:func:`nmfx.accessors.states`, which imports :mod:`nmfx.state`.
"""

from __future__ import annotations

from typing import Any

from torch import nn

from nmfx.accessors import RECORD_ATTR, states
from nmfx.ops import is_dtensor
from nmfx.state import REFRESH_ADVICE

__all__ = ["refresh", "unrefreshed_states", "require_refreshed", "match_mask_layouts"]


def refresh(model: nn.Module) -> nn.Module:
    """Restart every sparsified weight's schedule at step 0 and compute its mask from the current weight;
    returns ``model`` (changed in place).

    Call it after ``model.to_empty(...)`` and loading or initialising the weights of a model sparsified on the
    meta device (``set_model_state_dict`` of a dense checkpoint, ``load_state_dict``, an init function). The
    result equals sparsifying a model that held these weights from the start. Under FSDP2 it is a collective:
    call it on every rank; each rank then stores only its shard of each mask (:func:`match_mask_layouts`). To
    resume a sparse run, load its checkpoint instead (model and nmfx state): refresh would start the schedules
    over.

    Raises:
        ValueError: ``model`` is not sparsified by nmfx.
        RuntimeError: a sparsified weight is still on the meta device; nothing was changed.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"nmfx.refresh expects a torch.nn.Module, got {type(model).__name__}")
    found = states(model)
    if not found:
        raise ValueError(f"nmfx.refresh: {type(model).__name__} has no nmfx state (call nmfx.sparsify first)")
    weights = {name: model.get_parameter(name) for name in found}
    on_meta = [name for name, weight in weights.items() if weight.is_meta]
    if on_meta:
        raise RuntimeError(f"nmfx.refresh: {len(on_meta)} sparsified weights (e.g. {on_meta[0]}) are still on the meta "
                           "device; nothing was changed. Materialize the model (model.to_empty(device=...)) and load "
                           "or initialise its weights first")
    for name, state in found.items():
        state.restart(weights[name])
    return model


def match_mask_layouts(model: nn.Module, *_: Any) -> list[str]:
    """Store every mask like its weight (:meth:`nmfx.state.NMState.match_layout`): under FSDP2 each rank keeps
    only its shard of a mask, as a DTensor with the weight's placements, wherever no shard boundary splits a
    group of M; returns the sharded weights whose masks stay whole (each state warns once about it).

    ``nmfx.sparsify`` registers it as a ``state_dict`` pre-hook of the model, so a model sharded after
    sparsify (and ``to_empty``'d) has sharded masks before ``get_state_dict`` / DCP reads or loads them;
    :func:`refresh` and ``nmfx.step`` (at each mask recompute) match layouts too. Comm-free unless a sharded mask
    must become whole again (its weight was sharded differently since)."""
    found = states(model)
    weights = {name: model.get_parameter(name) for name in found}
    return [name for name, state in found.items()
            if not state.match_layout(weights[name]) and is_dtensor(weights[name])]


def unrefreshed_states(model: nn.Module) -> dict[str, str]:
    """``{weight name: why}`` for every sparsified weight whose nmfx state was never computed from real
    weights (built on the meta device, materialized by ``to_empty``, dense weights loaded since)."""
    return {name: state.needs_refresh for name, state in states(model).items() if state.needs_refresh is not None}


def require_refreshed(model: nn.Module, action: str) -> None:
    """Raise ``RuntimeError`` naming ``nmfx.refresh(model)`` if any nmfx state of ``model`` was never computed
    from real weights; ``action`` (e.g. ``"nmfx.to_inference"``) is what is refused."""
    pending = unrefreshed_states(model)
    if pending:
        name, why = next(iter(pending.items()))
        raise RuntimeError(f"{action} refused: the masks of {len(pending)} sparsified weights were never computed from "
                           f"real weights (e.g. {name}: {why}); {REFRESH_ADVICE}")


def refuse_unrefreshed_forward(module: nn.Module, args: Any) -> None:
    """Forward pre-hook ``nmfx.sparsify`` puts on the model: a training-mode forward over masks that were never
    computed (uninitialised memory) is refused. States still on the meta device compute nothing, so they pass."""
    found = getattr(module, RECORD_ATTR, None)
    if not module.training or found is None or found.inference:
        return
    pending = {name: state.needs_refresh for name, state in states(module).items()
               if state.needs_refresh is not None and not state.mask.is_meta}
    if pending:
        name, why = next(iter(pending.items()))
        raise RuntimeError(f"training forward refused: the masks of {len(pending)} sparsified weights were never "
                           f"computed from real weights (e.g. {name}: {why}); {REFRESH_ADVICE}")
