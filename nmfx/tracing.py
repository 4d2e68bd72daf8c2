"""Tracing frontends: turn a model into the graphs nmfx analyses and the graphs it rewrites.

* **Analysis** (:func:`analysis_graph`): the best whole-model graph available — ``torch.export``
  (non-strict) when example inputs are given or the model can make them (a transformers model's
  ``dummy_inputs``), else ``torch.fx.symbolic_trace`` of the whole model, else none ("per-module").
  It is only read (roles, heads), never installed.
* **Rewrite scopes** (:func:`rewrite_scopes`): the largest proper submodules that
  ``symbolic_trace`` can trace and whose graph does not depend on train/eval mode and that carry no
  hooks, down to the prunable leaves (an ``nn.Linear`` is always traceable). Only scopes that contain a
  prunable op are returned. The root is never replaced, so the user's model object keeps its class and
  methods (a transformers model keeps ``generate()`` and ``config``).
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass
from typing import Any, Optional

import torch
from torch import fx, nn


__all__ = ["Scope", "analysis_graph", "rewrite_scopes", "trace_module", "install_scope"]

SYMBOLIC = "fx.symbolic_trace"
EXPORT = "torch.export"
PER_MODULE = "per-module"


@dataclass
class Scope:
    """A traced submodule: ``graph_module`` replaces the module at ``name`` once rewritten."""

    name: str
    graph_module: fx.GraphModule
    frontend: str = SYMBOLIC


@dataclass
class Untraced:
    """A module whose own forward uses parameters but could not be traced (reported, not rewritten)."""

    name: str
    module_type: str
    parameters: tuple[str, ...]
    reason: str


def trace_module(module: nn.Module) -> tuple[Optional[fx.GraphModule], str]:
    """Symbolically trace ``module`` alone; (graph module, "") or (None, why not)."""
    if module._forward_hooks or module._forward_pre_hooks:
        return None, "it has forward hooks, which a traced graph would drop"
    was_training = module.training
    try:
        graphs = []
        for mode in (True, False):
            module.train(mode)
            graphs.append(fx.Tracer().trace(module))
    except Exception as error:  # tracing user code can fail in any way; the reason is reported
        first_line = str(error).splitlines()[0][:160] if str(error) else ""
        return None, f"{type(error).__name__}: {first_line}"
    finally:
        module.train(was_training)
    if graphs[0].python_code("self").src != graphs[1].python_code("self").src:
        return None, "its traced graph depends on train/eval mode"
    return _graph_module(module, graphs[0] if was_training else graphs[1]), ""


def rewrite_scopes(model: nn.Module, has_prunable) -> tuple[list[Scope], list[Untraced], list[tuple[str, nn.Module]]]:
    """The largest traceable proper submodules for which ``has_prunable(graph_module, name)`` is true;
    the modules that use parameters in an untraceable forward; and the ``nn.MultiheadAttention``
    modules (rewritten at module level, see ``nmfx.passes.rewrite_modules``)."""
    scopes: list[Scope] = []
    untraced: list[Untraced] = []
    attention: list[tuple[str, nn.Module]] = []

    def visit(name: str, module: nn.Module) -> None:
        if not any(True for _ in module.parameters()):
            return
        if isinstance(module, nn.MultiheadAttention):
            attention.append((name, module))
            return
        if name:
            gm, reason = trace_module(module)
            if gm is not None:
                if has_prunable(gm, name):
                    scopes.append(Scope(name, gm))
                # Attention modules are leaves of the trace: their weights are rewritten at module level.
                attention.extend((f"{name}.{sub}", m) for sub, m in module.named_modules()
                                 if sub and isinstance(m, nn.MultiheadAttention))
                return
            reason = f"it cannot be traced ({reason})"
        else:
            reason = ("the top-level module's own forward is never rewritten, so the model keeps its class "
                      "(sparsify a module that contains this one)")
        own = tuple(n for n, p in module.named_parameters(recurse=False) if p.dim() == 2)
        if own:
            untraced.append(Untraced(name, type(module).__name__, own, reason))
        for child_name, child in module.named_children():
            visit(f"{name}.{child_name}" if name else child_name, child)

    visit("", model)
    return scopes, untraced, attention


def analysis_graph(model: nn.Module, example_inputs: Any = None) -> tuple[Optional[fx.GraphModule], str, str]:
    """(whole-model graph or None, frontend name, note on what was tried)."""
    notes = []
    args, kwargs = _inputs(model, example_inputs)
    if args is not None:
        try:
            exported = torch.export.export(model, args, kwargs, strict=False)
            return exported.module(), EXPORT, ""
        except Exception as error:  # reported: export is best-effort for analysis
            notes.append(f"torch.export failed ({type(error).__name__}: {str(error).splitlines()[0][:120]})")
    else:
        notes.append("no example_inputs (pass example_inputs= for a torch.export analysis graph)")
    try:
        return fx.symbolic_trace(model), SYMBOLIC, "; ".join(notes)
    except Exception as error:
        notes.append(f"symbolic_trace failed ({type(error).__name__})")
    return None, PER_MODULE, "; ".join(notes) + "; roles fall back to per-module graphs and names"


def install_scope(model: nn.Module, scope: Scope) -> None:
    """Put the (rewritten) graph module in place of the submodule it was traced from."""
    parent_name, _, child_name = scope.name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child_name, scope.graph_module)


def _graph_module(module: nn.Module, graph: fx.Graph) -> fx.GraphModule:
    """A GraphModule that keeps *all* of ``module``'s children (the real objects), its own parameters and
    buffers (with their persistence) and its plain attributes, so the state_dict keys stay the same."""
    gm = fx.GraphModule(module, graph, class_name=type(module).__name__)
    for name, child in module.named_children():
        setattr(gm, name, child)
    for name, param in module.named_parameters(recurse=False):
        setattr(gm, name, param)
    for name, buffer in module.named_buffers(recurse=False):
        gm.register_buffer(name, buffer, persistent=name not in module._non_persistent_buffers_set)
    for name, value in vars(module).items():
        if not name.startswith("_") and name != "training" and not hasattr(gm, name):
            setattr(gm, name, value)
    gm.train(module.training)
    return gm


def _inputs(model: nn.Module, example_inputs: Any) -> tuple[Optional[tuple], dict]:
    if example_inputs is None:
        example_inputs = getattr(model, "dummy_inputs", None) if hasattr(model, "config") else None
        if example_inputs is None:
            return None, {}
    if isinstance(example_inputs, torch.Tensor):
        args, kwargs = (example_inputs,), {}
    elif isinstance(example_inputs, dict):
        args, kwargs = (), dict(example_inputs)
    else:
        args, kwargs = tuple(example_inputs), {}
    parameters = inspect.signature(model.forward).parameters
    if "use_cache" in parameters and hasattr(model, "config"):
        kwargs.setdefault("use_cache", False)  # a cache object is not a tensor output
    if "decoder_input_ids" in parameters and "decoder_input_ids" not in kwargs and "input_ids" in kwargs:
        kwargs["decoder_input_ids"] = kwargs["input_ids"]
    return args, kwargs

