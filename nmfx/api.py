"""The public verbs: ``sparsify``, ``step``, ``masks``, ``graphs``."""

from __future__ import annotations

import dataclasses
import warnings
from typing import Any, Mapping, Optional, Sequence, Union

from torch import Tensor, fx, nn

from nmfx.layers import is_plain_linear
from nmfx.meta import META_KEY, PrunableOp, annotated_nodes
from nmfx.config import SparsifyConfig
from nmfx.methods import Method
from nmfx.passes.attention import tag_roles
from nmfx.passes.find_prunable import find_prunable
from nmfx.passes.pipeline import PassPipeline
from nmfx.passes.policy import Policy, apply_policy
from nmfx.passes.rewrite_masked import rewrite_masked
from nmfx.passes.rewrite_modules import disable_fused_fast_path, rewrite_multihead_attention
from nmfx.pattern import PatternLike
from nmfx.report import ReportRow, SparsifyRecord, default_pattern
from nmfx.state import (LEGACY_KEY, PRUNED_KEY, STATE_KEYS, STATE_SUFFIX, NMState, checkpoint_problems,
                        dense_weight, normalize_checkpoint)
from nmfx.tracing import ROOT_GRAPH_ATTR, analysis_graph, install_scope, rewrite_scopes

__all__ = ["sparsify", "step", "masks", "graphs", "is_sparsified", "states"]

_RECORD_ATTR = "_nmfx_record"

#: Last module-name component -> role, used only when no graph says what an op is.
_NAME_HINTS = {
    "q_proj": "attn.q", "query": "attn.q", "q": "attn.q", "wq": "attn.q",
    "k_proj": "attn.k", "key": "attn.k", "k": "attn.k", "wk": "attn.k",
    "v_proj": "attn.v", "value": "attn.v", "v": "attn.v", "wv": "attn.v",
    "o_proj": "attn.o", "out_proj": "attn.o", "o": "attn.o", "wo_attn": "attn.o",
    "c_attn": "attn.qkv", "qkv": "attn.qkv", "in_proj": "attn.qkv",
    "gate_proj": "mlp.gate", "up_proj": "mlp.up", "fc1": "mlp.up", "c_fc": "mlp.up", "wi": "mlp.up",
    "down_proj": "mlp.down", "fc2": "mlp.down", "wo": "mlp.down",
    "lm_head": "head", "classifier": "head", "head": "head", "score": "head",
}


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
        method: ``"dense"``, ``"ste"``, ``"srste"``, ``"mdgf"``, ``"sdgf"`` (the default) or a method config.
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
    policy = Policy.from_config(config, _tied_parameters(model))

    analysis, frontend, note = analysis_graph(model, example_inputs)
    graph_roles: dict[str, str] = {}
    if analysis is not None and not is_plain_linear(model):  # a lone Linear is no model's head
        find_prunable(analysis)
        tag_roles(analysis, whole_model=True)
        graph_roles = {node.meta[META_KEY].weight: node.meta[META_KEY].role for node in annotated_nodes(analysis.graph)}

    def has_prunable(gm: fx.GraphModule, name: str) -> bool:
        return bool(annotated_nodes(find_prunable(gm, prefix=name).graph))

    scopes, untraced, attention_modules = rewrite_scopes(model, has_prunable)
    pipeline = PassPipeline([
        ("tag_roles", tag_roles),
        ("adopt_roles", lambda gm: _adopt_roles(gm, graph_roles, frontend, whole_model=analysis is not None)),
        ("policy", lambda gm: apply_policy(gm, policy)),
        ("rewrite_masked", lambda gm: rewrite_masked(gm, None, method)),
    ])
    rows: list[ReportRow] = []
    swapped: list[tuple[nn.Module, type]] = []
    try:
        to_install = []
        for scope in scopes:
            pipeline(scope.graph_module)
            ops = [node.meta[META_KEY] for node in annotated_nodes(scope.graph_module.graph)]
            if any(op.status == "sparsified" for op in ops):
                to_install.append(scope)
            rows += [ReportRow.from_op(op, config, f"{scope.frontend}({scope.name})") for op in ops]
        for name, module in attention_modules:
            swapped.append((module, type(module)))
            ops = rewrite_multihead_attention(name, module, method, policy.choose)
            rows += [ReportRow.from_op(op, config, "module") for op in ops]
    except BaseException:
        _roll_back(model, swapped)  # nothing was installed yet; remove the states added to shared children
        raise
    for scope in to_install:
        install_scope(model, scope)
    disable_fused_fast_path(model)
    seen = {row.name for row in rows}
    for module in untraced:
        for param in module.parameters:
            name = f"{module.name}.{param}" if module.name else param
            if name in seen or (graph_roles and name not in graph_roles):
                continue
            rows.append(ReportRow(name=name, role=graph_roles.get(name, "other"), op=module.module_type,
                                  shape=tuple(model.get_parameter(name).shape), pattern=default_pattern(config),
                                  status="skip", reason=f"used directly in {module.module_type}.forward: "
                                  f"{module.reason}", frontend="per-module"))
    object.__setattr__(model, _RECORD_ATTR, SparsifyRecord(config, rows, frontend, note))
    model.register_load_state_dict_pre_hook(_refuse_mismatched_checkpoint)
    if _is_transformers_model(model):
        from nmfx.integrations.hf import install_save_pretrained  # imports transformers: only for its models

        install_save_pretrained(model)
    if not any(row.status == "sparsified" for row in rows):
        reasons = sorted({row.reason for row in rows}) or ["no linear-like op with a parameter weight was found"]
        warnings.warn(f"nmfx.sparsify: nothing in {type(model).__name__} was sparsified ({'; '.join(reasons)[:300]}). "
                      "See nmfx.report(model).", stacklevel=2)
    return model


def step(model: nn.Module) -> None:
    """Advance every sparsified weight's schedule by one optimizer step (call after ``opt.step()``):
    the step counter, alpha / SR-STE lambda, and the mask (at the method's interval and stage changes)."""
    for name, state in states(model).items():
        owner_name = name.rpartition(".")[0]
        owner = model.get_submodule(owner_name) if owner_name else model
        state.advance(owner.get_parameter(state.param_name))


def states(model: nn.Module) -> dict[str, NMState]:
    """``{weight qualified name: NMState}`` for every sparsified weight."""
    return {path[: -len(STATE_SUFFIX)]: module for path, module in model.named_modules()
            if isinstance(module, NMState)}


def masks(model: nn.Module) -> dict[str, Tensor]:
    """``{weight qualified name (as in the original model): current bool mask}``."""
    return {name: state.mask for name, state in states(model).items()}


def graphs(model: nn.Module) -> dict[str, fx.GraphModule]:
    """``{module name: rewritten GraphModule}`` (print ``gm.code`` to read one); ``""`` is the root's own
    forward when it was rewritten (the root keeps its object; its ``forward`` runs this graph's code)."""
    found = {name: module for name, module in model.named_modules()
             if isinstance(module, fx.GraphModule) and any(META_KEY in n.meta for n in module.graph.nodes)}
    root = getattr(model, ROOT_GRAPH_ATTR, None)
    return {"": root, **found} if root is not None and "" not in found else found


def is_sparsified(model: nn.Module) -> bool:
    return getattr(model, _RECORD_ATTR, None) is not None


def record(model: nn.Module) -> SparsifyRecord:
    found = getattr(model, _RECORD_ATTR, None)
    if found is None:
        raise ValueError(f"{type(model).__name__} has not been sparsified by nmfx (call nmfx.sparsify first)")
    return found


def _refuse_mismatched_checkpoint(module, state_dict, prefix, local_metadata, strict, missing_keys,
                                  unexpected_keys, error_msgs) -> None:
    """Root ``load_state_dict`` pre-hook. It runs before anything is copied and checks every nmfx state in
    the incoming dict (:func:`nmfx.state.checkpoint_problems`: config, step, alpha, lambda, mask), so a
    checkpoint with any problem (a dense model's, another pattern / method / shape, a step < 0, a NaN
    alpha, an invalid mask) is refused whole. Accepted older layouts are then translated in the (copied)
    dict: format 1's config string, and the effective-weight layout of nmfx's ``save_pretrained``."""
    found = states(module)
    incoming = _nmfx_entries(state_dict, prefix, found)
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
                      "check, since torch runs load hooks with strict=True.")
        raise ValueError("refusing to load this checkpoint into the nmfx-sparsified model; nothing was loaded:\n  "
                         + "\n  ".join(problems[:20])
                         + (f"\n  ... and {len(problems) - 20} more" if len(problems) > 20 else "") + advice)
    for name, state in found.items():
        entries, base = incoming[name], f"{prefix}{name}{STATE_SUFFIX}."
        if PRUNED_KEY in entries:
            state_dict[prefix + name] = dense_weight(state_dict[prefix + name], entries["mask"], entries[PRUNED_KEY])
        for key in (LEGACY_KEY, PRUNED_KEY):
            state_dict.pop(base + key, None)
        normalized = normalize_checkpoint(state, entries)
        state_dict.update({base + key: value for key, value in normalized.items()})
        state.mark_checked(normalized)


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


def _adopt_roles(gm: fx.GraphModule, graph_roles: dict[str, str], frontend: str, whole_model: bool) -> fx.GraphModule:
    """Prefer the whole-model graph's role; else the scope graph's; else a name hint."""
    for node in annotated_nodes(gm.graph):
        op: PrunableOp = node.meta[META_KEY]
        if op.weight in graph_roles:
            role, source = graph_roles[op.weight], f"graph ({frontend})"
        elif op.role != "other":
            role, source = op.role, "graph (scope)"
        else:
            hint = _NAME_HINTS.get(op.weight.rpartition(".")[0].rpartition(".")[2])
            role, source = (hint, "name") if hint and (hint != "head" or not whole_model) else ("other", "")
        node.meta[META_KEY] = dataclasses.replace(op, role=role, role_source=source)
    return gm


def _tied_parameters(model: nn.Module) -> dict[str, str]:
    first_name: dict[int, str] = {}
    tied: dict[str, str] = {}
    for name, param in model.named_parameters(remove_duplicate=False):
        other = first_name.setdefault(id(param), name)
        if other != name:
            tied[name] = other
            tied.setdefault(other, name)
    return tied


def _roll_back(model: nn.Module, swapped: list[tuple[nn.Module, type]]) -> None:
    """Undo what a failed ``sparsify`` did to modules it shares with the model."""
    for module, cls in swapped:
        module.__class__ = cls
    for module in list(model.modules()):
        for child_name, child in list(module.named_children()):
            if isinstance(child, NMState):
                delattr(module, child_name)
