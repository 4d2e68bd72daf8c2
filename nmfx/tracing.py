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
* **The root's own forward** (scope name ``""``): a root that is a plain ``nn.Linear`` is traced like any
  Linear (installed by swapping its class to ``MaskedLinear``). Any other root whose own parameters are 2-D
  is traced with *every* submodule kept as a leaf (its children are scopes of their own), and only ops on
  its own parameters are kept as prunable; the rewritten graph is installed by swapping the root's class
  for a generated subclass whose ``forward`` is the graph's code, run on the root object itself (its other
  methods, attributes, hooks and ``state_dict`` names stay). The graph is kept as ``model._nmfx_root_graph``
  (``nmfx.graphs(model)[""]``) for lowering.

Hooks. A traced graph calls the leaf modules (``torch.nn`` layers) and inlines every other submodule's
forward, so hooks on an inlined module could never run. Therefore: a submodule that has hooks when it
is traced is kept as a leaf (called, not inlined; its own children are looked at as scopes of their
own); a module with hooks is never itself replaced by a graph (reported when that leaves a weight
unsparsified), except a plain ``nn.Linear``, which is never replaced at all (:func:`install_scope` swaps
its class to :class:`nmfx.layers.MaskedLinear`). After install, registering a hook on a module whose
call was inlined (or on a module object that a graph replaced) warns, naming the module and what to do;
:func:`dead_hooks` lists such hooks for ``nmfx.report``.
"""

from __future__ import annotations

import contextlib
import inspect
import warnings
from collections import OrderedDict
from dataclasses import dataclass
from typing import Any, Optional

import torch
from torch import fx, nn


from nmfx.layers import MaskedLinear, is_plain_linear
from nmfx.meta import META_KEY, annotated_nodes
from nmfx.passes.rewrite_masked import install_states, keep_module_calls
from nmfx.passes.verify import OPAQUE_CALLS_KEY
from nmfx.state import NMState

__all__ = ["Scope", "analysis_graph", "rewrite_scopes", "trace_module", "install_scope", "has_hooks", "dead_hooks"]

#: ``GraphModule.meta`` key: the class of the module a scope's graph was traced from.
TRACED_FROM_KEY = "nmfx_traced_from"
#: The per-module hook dicts whose entries run around a module's call.
_HOOK_DICTS = ("_forward_hooks", "_forward_pre_hooks", "_backward_hooks", "_backward_pre_hooks")

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


def has_hooks(module: nn.Module) -> bool:
    """``module`` has forward (pre-)hooks or backward (pre-)hooks of its own."""
    return any(getattr(module, name, None) for name in _HOOK_DICTS)


class _Tracer(fx.Tracer):
    """``fx.Tracer`` that also keeps modules with hooks as leaves, so their hooks still run."""

    def is_leaf_module(self, m: nn.Module, module_qualified_name: str) -> bool:
        return has_hooks(m) or super().is_leaf_module(m, module_qualified_name)


class _RootTracer(fx.Tracer):
    """Traces only the root's own forward: every submodule is a leaf (called as it is)."""

    def is_leaf_module(self, m: nn.Module, module_qualified_name: str) -> bool:
        return True


#: Attribute (not a submodule) holding the rewritten graph of the root's own forward.
ROOT_GRAPH_ATTR = "_nmfx_root_graph"


def trace_module(module: nn.Module, root: bool = False) -> tuple[Optional[fx.GraphModule], str]:
    """Symbolically trace ``module`` alone (``root``: its own forward only, every submodule a leaf);
    (graph module, "") or (None, why not)."""
    if has_hooks(module) and not is_plain_linear(module) and not root:
        return None, ("it has hooks, which a graph replacing it would drop; to sparsify it, remove them, sparsify, "
                      "and register them again on model.get_submodule(<this name>)")
    was_training = module.training
    try:
        graphs = []
        for mode in (True, False):
            module.train(mode)
            graphs.append((_RootTracer() if root else _Tracer()).trace(module))
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
                # Leaves kept only for their hooks are called as they are: look inside them separately.
                hooked = _hooked_leaves(gm)
                # Attention modules are leaves of the trace: their weights are rewritten at module level.
                attention.extend((f"{name}.{sub}", m) for sub, m in module.named_modules()
                                 if sub and isinstance(m, nn.MultiheadAttention)
                                 and not any(sub == h or sub.startswith(h + ".") for h in hooked))
                for target in hooked:
                    visit(f"{name}.{target}", gm.get_submodule(target))
                return
            reason = f"it cannot be traced ({reason})"
        elif is_plain_linear(module):  # a root nn.Linear: traced like any Linear, its class swapped on install
            gm, reason = trace_module(module)
            if gm is not None and has_prunable(gm, ""):
                scopes.append(Scope("", gm))
                return
        own = tuple(n for n, p in module.named_parameters(recurse=False) if p.dim() == 2)
        if own and not name and not is_plain_linear(module):  # the root's own forward, its submodules as leaves
            gm, why = trace_module(module, root=True)
            if gm is not None and has_prunable(gm, "") and _keep_own_ops(gm):
                scopes.append(Scope("", gm))
            own = () if gm is not None else own
            reason = f"the top-level forward cannot be traced ({why})"
        if own:
            untraced.append(Untraced(name, type(module).__name__, own, reason))
        for child_name, child in module.named_children():
            visit(f"{name}.{child_name}" if name else child_name, child)

    visit("", model)
    return scopes, untraced, attention


def analysis_graph(model: nn.Module, example_inputs: Any = None) -> tuple[Optional[fx.GraphModule], str, str]:
    """(whole-model graph or None, frontend name, note on what was tried). The model's hooks are
    suspended meanwhile, so tracing never runs them on proxies or fake tensors."""
    with _hooks_suspended(model):
        return _analysis_graph(model, example_inputs)


@contextlib.contextmanager
def _hooks_suspended(model: nn.Module):
    saved = []
    for module in model.modules():
        for attr in _HOOK_DICTS:
            hooks = getattr(module, attr, None)
            if hooks:
                saved.append((module, attr, hooks))
                setattr(module, attr, OrderedDict())
    try:
        yield
    finally:
        for module, attr, hooks in saved:
            setattr(module, attr, hooks)


def _analysis_graph(model: nn.Module, example_inputs: Any) -> tuple[Optional[fx.GraphModule], str, str]:
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


def _keep_own_ops(gm: fx.GraphModule) -> bool:
    """Drop the annotations of ops on submodules' weights from a root graph (the submodules are scopes of
    their own); True if an op on the root's own parameters is left."""
    for node in annotated_nodes(gm.graph):
        if "." in node.meta[META_KEY].target:
            del node.meta[META_KEY]
    gm.meta[OPAQUE_CALLS_KEY] = True
    return bool(annotated_nodes(gm.graph))


def install_scope(model: nn.Module, scope: Scope) -> None:
    """Apply a rewritten scope to the model: its planned states move onto the modules owning the weights
    (``rewrite_masked.install_states``); a plain ``nn.Linear`` traced alone keeps its object (its class
    becomes :class:`~nmfx.layers.MaskedLinear` and it takes the graph's mask state); any other scope's
    graph module replaces the submodule it was traced from, with the ``nn.Linear`` calls it rewrote kept
    as calls of those (class-swapped) modules. Modules whose calls the graph inlines, and the replaced
    object, warn when a hook is registered on them later."""
    gm = scope.graph_module
    install_states(gm)
    if scope.name == "" and not is_plain_linear(model):
        _install_root(model, gm)
        return
    parent_name, _, child_name = scope.name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    original = getattr(parent, child_name) if scope.name else model
    if is_plain_linear(original):
        for name, child in list(gm.named_children()):
            if isinstance(child, NMState):
                original.add_module(name, child)
        original.__class__ = MaskedLinear
        return
    keep_module_calls(gm)
    called = {node.target for node in gm.graph.nodes if node.op == "call_module"}
    for path, module in original.named_modules():
        if path and not any(path == c or path.startswith(c + ".") for c in called) and not isinstance(module, NMState):
            _warn_on_new_hooks(module, f"{scope.name}.{path}", f"its forward is inlined into the rewritten graph of "
                               f"{scope.name!r}, so hooks on it never run; hook {scope.name!r} itself, or a layer it "
                               "calls, or register the hook before nmfx.sparsify (a module with hooks is kept as a call)")
    _warn_on_new_hooks(original, scope.name, f"nmfx.sparsify replaced this object by a rewritten graph module, so hooks "
                       f"on it never run; register them on model.get_submodule({scope.name!r})")
    setattr(parent, child_name, gm)


def _install_root(model: nn.Module, gm: fx.GraphModule) -> None:
    """The root keeps its object: it takes the graph's states and its class becomes a generated subclass
    whose ``forward`` is the graph's code (run on the root itself)."""
    for name, child in list(gm.named_children()):
        if isinstance(child, NMState):
            model.add_module(name, child)
    model.__class__ = _root_class(type(model), gm)
    object.__setattr__(model, ROOT_GRAPH_ATTR, gm)


def sync_root(model: nn.Module) -> None:
    """After a pass changed the root graph's own parameters, buffers and states (lowering), give the root
    the same ones and the graph's new code."""
    gm = getattr(model, ROOT_GRAPH_ATTR)
    for name in [n for n in model._parameters if n not in gm._parameters]:
        del model._parameters[name]
    for name, param in gm._parameters.items():
        model._parameters[name] = param
    for name in [n for n in model._buffers if n not in gm._buffers]:
        del model._buffers[name]
    for name, buffer in gm._buffers.items():
        model.register_buffer(name, buffer, persistent=name not in gm._non_persistent_buffers_set)
    for name in [n for n, child in model._modules.items() if isinstance(child, NMState) and n not in gm._modules]:
        del model._modules[name]
    model.__class__ = _root_class(model._nmfx_base, gm)


def _root_class(base: type, gm: fx.GraphModule) -> type:
    """A subclass of the root's own class (same name) whose ``forward`` is ``gm``'s generated code. It pickles
    as the root's own class plus the graph (:func:`_new_root`), since a generated class cannot be
    imported by name."""
    base = getattr(base, "_nmfx_base", base)
    return type(base.__name__, (base,), {"forward": type(gm).forward, "__module__": base.__module__,
                                         "__qualname__": base.__qualname__, "_nmfx_base": base,
                                         "__reduce_ex__": _reduce_root})


def _reduce_root(self: nn.Module, protocol: int):
    # (constructor, args, state): the object exists before its state is restored, so the hooks in its
    # state that refer back to it unpickle (and deepcopy) as for any module.
    return _new_root, (self._nmfx_base, getattr(self, ROOT_GRAPH_ATTR)), self.__getstate__()


def _new_root(base: type, gm: fx.GraphModule) -> nn.Module:
    """An empty object of the root's generated class (unpickling then sets its state)."""
    module = base.__new__(base)
    module.__class__ = _root_class(base, gm)
    return module


class _InlinedHooks(OrderedDict):
    """A hook dict of a module whose hooks can no longer run: adding an entry warns (the hook is kept, so
    the handle's ``remove()`` works)."""

    def __init__(self, items=(), message: str = "") -> None:
        super().__init__()
        for key, value in items:
            OrderedDict.__setitem__(self, key, value)
        self.message = message

    def __setitem__(self, key, value) -> None:
        if key not in self:
            warnings.warn(self.message, UserWarning, stacklevel=3)
        super().__setitem__(key, value)

    def __reduce__(self):
        return type(self), (list(self.items()), self.message)


def _warn_on_new_hooks(module: nn.Module, name: str, why: str) -> None:
    message = f"nmfx: a hook registered on {name!r} ({type(module).__name__}) will never run: {why}"
    for attr in _HOOK_DICTS:
        current = getattr(module, attr, None)
        if isinstance(current, OrderedDict) and not isinstance(current, _InlinedHooks):
            setattr(module, attr, _InlinedHooks(current.items(), message))


def dead_hooks(model: nn.Module) -> list[str]:
    """The warning text of every module in ``model`` that holds hooks which can never run."""
    found = []
    for module in model.modules():
        dicts = [getattr(module, attr, None) for attr in _HOOK_DICTS]
        dead = [d for d in dicts if isinstance(d, _InlinedHooks) and d]
        if dead:
            found.append(dead[0].message)
    return found


def _hooked_leaves(gm: fx.GraphModule) -> list[str]:
    """``call_module`` targets that are leaves only because they have hooks (not ``torch.nn`` layers)."""
    tracer = fx.Tracer()
    out = []
    for node in gm.graph.nodes:
        if node.op == "call_module":
            module = gm.get_submodule(node.target)
            if has_hooks(module) and not tracer.is_leaf_module(module, node.target) and node.target not in out:
                out.append(node.target)
    return out


def _graph_module(module: nn.Module, graph: fx.Graph) -> fx.GraphModule:
    """A GraphModule that keeps *all* of ``module``'s children (the real objects), its own parameters and
    buffers (with their persistence) and its plain attributes, so the state_dict keys stay the same."""
    gm = fx.GraphModule(module, graph, class_name=type(module).__name__)
    gm.meta[TRACED_FROM_KEY] = type(module)
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

