"""The public verbs: ``sparsify`` (a short call into :mod:`nmfx.compile`) and ``step``; the readers
``states``, ``masks``, ``graphs``, ``record`` are re-exported from :mod:`nmfx.accessors`."""

from __future__ import annotations

import warnings
from typing import Any, Mapping, Optional, Sequence, Union

import torch
from torch import nn

from nmfx.accessors import RECORD_ATTR, graphs, is_sparsified, masks, record, states
from nmfx.compile import sparsify_model
from nmfx.config import SparsifyConfig
from nmfx.methods import Method
from nmfx.packed import MAX_PACKED_M
from nmfx.pattern import PatternLike
from nmfx.refresh import match_mask_layouts, refuse_unrefreshed_forward, require_refreshed
from nmfx.report import SparsifyRecord
from nmfx.state import (LEGACY_KEY, PRUNED_KEY, STATE_KEYS, STATE_SUFFIX, checkpoint_problems, dense_weight,
                        normalize_checkpoint)

__all__ = ["sparsify", "step", "masks", "graphs", "is_sparsified", "states", "record"]


def sparsify(
    model: nn.Module,
    pattern: Union[PatternLike, Mapping[str, PatternLike], SparsifyConfig] = "1:8",
    method: Union[str, Method, None] = None,
    *,
    example_inputs: Any = None,
    include: Optional[Union[str, Sequence[str]]] = None,
    exclude: Optional[Union[str, Sequence[str]]] = None,
    **method_options: Any,
) -> nn.Module:
    """Rewrite ``model``'s prunable linear ops into N:M masked-weight ops, **in place**, and return it.

    The model object itself is kept (its class, methods and ``state_dict`` names); the largest
    traceable submodules below it that hold prunable ops are replaced by rewritten ``GraphModule``s
    (down to single layers where nothing larger traces). Every sparsified plain ``nn.Linear`` keeps its
    object, class-swapped to :class:`nmfx.layers.MaskedLinear`, so hooks on it keep firing. Call
    :func:`nmfx.step` after every optimizer step. Every decision is in :func:`nmfx.report`.

    Args:
        model: any ``nn.Module`` (transformers, torchvision, hand-written).
        pattern: the target N:M pattern, e.g. ``"1:8"``; or per layer, a mapping from globs (over weight names,
            module names and roles, as include/exclude) to patterns, e.g. ``{"attn.*": "2:4", "mlp.*": "1:8"}``:
            the first matching entry wins, a weight no entry matches stays dense ("no pattern matched"), and an
            entry that cannot apply to a weight it matches (M does not divide its input dim) is a ValueError
            naming the glob; or a whole :class:`nmfx.config.SparsifyConfig` (then pass no other options).
        method: ``"dense"``, ``"ste"``, ``"srste"``, ``"mdgf"``, ``"sdgf"`` (the default), ``"gmp"`` or a
            method config.
        example_inputs: inputs for a ``torch.export`` analysis graph (tensor, tuple or dict of kwargs);
            transformers models provide their own.
        include, exclude: globs over weight names, module names and roles (see ``nmfx.passes.policy``).
        **method_options: the method's options (``total_steps``, ``decay``, ``schedule``...).
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"nmfx.sparsify expects a torch.nn.Module, got {type(model).__name__}")
    if is_sparsified(model) or states(model):
        raise ValueError("this model (or a submodule of it) is already sparsified by nmfx; "
                         "build a fresh model to sparsify it again")
    if isinstance(pattern, SparsifyConfig):
        if method is not None or include is not None or exclude is not None or method_options:
            raise TypeError("nmfx.sparsify(model, config): the SparsifyConfig holds the method, options and "
                            "include/exclude; pass no other arguments (or build another config)")
        config = pattern
    else:
        config = SparsifyConfig.build(pattern, "sdgf" if method is None else method, include=include,
                                      exclude=exclude, **method_options)
    method = config.method
    if method.name == "sdgf" and method.total_steps is None and method.stage_steps is None:
        warnings.warn("nmfx.sparsify: sdgf without total_steps moves to the next stage every 1,000 steps; "
                      "pass total_steps=<optimizer steps of your run> to spread the stages over it "
                      "(or stage_steps=...)", stacklevel=2)
    if method.name == "gmp" and method.total_steps is None and method.ramp_steps is None:
        warnings.warn("nmfx.sparsify: gmp without total_steps ramps its kept count from M to N over 1,000 steps; "
                      "pass total_steps=<optimizer steps of your run> (or ramp_steps=...)", stacklevel=2)
    compiled = sparsify_model(model, config, example_inputs)
    rows = compiled.rows
    object.__setattr__(model, RECORD_ATTR, SparsifyRecord(config, rows, compiled.frontend, compiled.note))
    model.register_load_state_dict_pre_hook(_refuse_mismatched_checkpoint)
    model.register_forward_pre_hook(refuse_unrefreshed_forward)
    model.register_state_dict_pre_hook(match_mask_layouts)  # FSDP2: masks sharded like their weights
    if _is_transformers_model(model):
        from nmfx.integrations.hf import install_save_pretrained  # imports transformers: only for its models

        install_save_pretrained(model)
    unpackable = sorted({str(state.pattern) for state in states(model).values() if state.pattern.m > MAX_PACKED_M})
    if unpackable:
        warnings.warn(f"nmfx.sparsify: pattern {', '.join(unpackable)} trains, but nmfx.to_inference cannot pack it "
                      f"(the packed format holds M <= {MAX_PACKED_M}); deploy with nmfx.to_dense(model) instead, or "
                      f"choose M <= {MAX_PACKED_M}", stacklevel=2)
    if not any(row.status == "sparsified" for row in rows):
        reasons = sorted({row.reason for row in rows}) or ["no linear-like op with a parameter weight was found"]
        warnings.warn(f"nmfx.sparsify: nothing in {type(model).__name__} was sparsified ({'; '.join(reasons)[:300]}). "
                      "See nmfx.report(model).", stacklevel=2)
    return model


def step(model: nn.Module) -> None:
    """Advance every sparsified weight's schedule by one optimizer step (call after ``opt.step()``):
    the step counter, alpha / SR-STE lambda, and the mask (at the method's interval and stage changes).
    Refused (RuntimeError) while a mask was never computed from real weights: see :func:`nmfx.refresh`."""
    require_refreshed(model, "nmfx.step")
    for name, state in states(model).items():
        owner_name = name.rpartition(".")[0]
        owner = model.get_submodule(owner_name) if owner_name else model
        state.advance(owner.get_parameter(state.param_name))


def _refuse_mismatched_checkpoint(module, state_dict, prefix, local_metadata, strict, missing_keys,
                                  unexpected_keys, error_msgs) -> None:
    """Root ``load_state_dict`` pre-hook. It runs before anything is copied and checks every nmfx state in
    the incoming dict (:func:`nmfx.state.checkpoint_problems`: config, step, alpha, lambda, mask), so a
    checkpoint with any problem (a dense model's, another pattern / method / shape, a step < 0, a NaN
    alpha, an invalid mask) is refused whole. Accepted older layouts are then translated in the (copied)
    dict: format 1's config string, and the effective-weight layout of nmfx's ``save_pretrained``."""
    found = states(module)
    wrong_shapes = _shape_problems(module, state_dict, prefix)
    if wrong_shapes:
        raise ValueError("refusing to load this checkpoint into the nmfx-sparsified model; nothing was loaded:\n  "
                         + "\n  ".join(wrong_shapes[:20])
                         + (f"\n  ... and {len(wrong_shapes) - 20} more" if len(wrong_shapes) > 20 else "")
                         + "\nThe checkpoint is of a model built with another configuration (widths, vocabulary, "
                         "layers); build the same model before loading it.")
    incoming = _nmfx_entries(state_dict, prefix, found)
    if not incoming and found and all(state.needs_refresh is not None for state in found.values()):
        match_mask_layouts(module)  # FSDP2: masks sharded like their weights (set_model_state_dict skips state_dict)
        _accept_dense_weights(state_dict, prefix, found)
        return
    problems = []
    for name, state in found.items():
        problems += [f"{name}: {problem}" for problem in
                     checkpoint_problems(state, incoming.get(name, {}), state_dict.get(prefix + name))]
    problems += [f"{name}: the checkpoint has nmfx state for this weight, which the model does not sparsify "
                 "(sparsified with other include/exclude?)" for name in incoming.keys() - found.keys()]
    if problems:
        advice = ""
        if any(" in the checkpoint vs " in problem for problem in problems):
            advice = ("\nThe checkpoint's model was sparsified differently: call nmfx.sparsify with the same pattern, "
                      "method, method options and include/exclude as it was.")
        if any("dense model" in problem for problem in problems):
            advice += ("\nTo start from a dense checkpoint, load it into the model before nmfx.sparsify (build the "
                      "model, load_state_dict, then sparsify); load_state_dict(strict=False) does not skip this "
                      "check, since torch runs load hooks with strict=True. A model sparsified on the meta device "
                      "and materialized with to_empty takes a dense checkpoint whole; then call nmfx.refresh(model).")
        raise ValueError("refusing to load this checkpoint into the nmfx-sparsified model; nothing was loaded:\n  "
                         + "\n  ".join(problems[:20])
                         + (f"\n  ... and {len(problems) - 20} more" if len(problems) > 20 else "") + advice)
    match_mask_layouts(module)
    for name, state in found.items():
        entries, base = incoming[name], f"{prefix}{name}{STATE_SUFFIX}."
        if PRUNED_KEY in entries:
            state_dict[prefix + name] = dense_weight(state_dict[prefix + name], entries["mask"], entries[PRUNED_KEY])
        for key in (LEGACY_KEY, PRUNED_KEY):
            state_dict.pop(base + key, None)
        normalized = normalize_checkpoint(state, entries)
        state_dict.update({base + key: value for key, value in normalized.items()})
        state.mark_checked(normalized)


def _shape_problems(module: nn.Module, state_dict, prefix: str) -> list[str]:
    """Incoming tensors whose shape differs from the parameter or persistent buffer they would be copied into
    (torch raises for those only after it has copied the entries before them), for the modules that torch's
    own ``_load_from_state_dict`` loads. A module that loads itself is left to its own checks: nmfx states
    (:func:`nmfx.state.checkpoint_problems`), ``torch.ao`` observers and fake-quantizers (they resize their
    buffers to the checkpoint's). Lazy tensors and a ``(1,)`` tensor into a 0-d one are accepted, as torch
    accepts them."""
    problems = []
    for owner_name, owner in module.named_modules(remove_duplicate=False):
        if not (type(owner)._load_from_state_dict.__module__ or "").startswith("torch.nn.modules."):
            continue
        base = f"{prefix}{owner_name}." if owner_name else prefix
        targets = [(n, t) for n, t in owner._parameters.items() if t is not None]
        targets += [(n, t) for n, t in owner._buffers.items()
                    if t is not None and n not in owner._non_persistent_buffers_set]
        for name, target in targets:
            value = state_dict.get(base + name)
            if not isinstance(value, torch.Tensor) or nn.parameter.is_lazy(target):
                continue
            if value.shape == target.shape or (target.dim() == 0 and value.shape == (1,)):
                continue
            problems.append(f"{base + name}: shape {tuple(value.shape)} in the checkpoint vs {tuple(target.shape)} "
                            "in the model")
    return problems


def _accept_dense_weights(state_dict, prefix: str, found) -> None:
    """A checkpoint without any nmfx state, loaded into a model whose masks were never computed (built on the
    meta device): the weights load; each state's own buffers are put back under its keys (so a strict load
    finds no key missing, and nothing of the state changes) and it still needs :func:`nmfx.refresh`."""
    for name, state in found.items():
        buffers = {key: getattr(state, key) for key in STATE_KEYS}
        state_dict.update({f"{prefix}{name}{STATE_SUFFIX}.{key}": value for key, value in buffers.items()})
        state.mark_checked(buffers)
        if prefix + name in state_dict:
            state.needs_refresh = "dense weights were loaded into it since"


def _nmfx_entries(state_dict, prefix: str, names) -> dict[str, dict[str, Any]]:
    """``{weight name: {entry: value}}`` for the entries under ``prefix`` of the states of weights ``names``
    (``<weight>_nm.<entry>``: all of them) and the nmfx-named entries of other weights."""
    known = set(STATE_KEYS) | {LEGACY_KEY, PRUNED_KEY}
    grouped: dict[str, dict[str, Any]] = {}
    for key, value in state_dict.items():
        if not key.startswith(prefix):
            continue
        path, _, entry = key[len(prefix):].rpartition(".")
        weight = path[: -len(STATE_SUFFIX)]
        if path.endswith(STATE_SUFFIX) and (weight in names or entry in known):
            grouped.setdefault(weight, {})[entry] = value
    return grouped


def _is_transformers_model(model: nn.Module) -> bool:
    return any(cls.__name__ == "PreTrainedModel" and cls.__module__.startswith("transformers.")
               for cls in type(model).__mro__)
