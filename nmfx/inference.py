"""``nmfx.to_inference``: lower a trained sparse model into packed N:M inference graphs."""

from __future__ import annotations

import copy
import dataclasses
import warnings
from typing import Optional

import torch
from torch import nn

from nmfx.accessors import graphs, record, states
from nmfx.compile import lower_graphs
from nmfx.layers import MaskedLinear, NMLinear, is_conv1d
from nmfx.meta import META_KEY, PrunableOp, annotated_nodes
from nmfx.packed import MAX_PACKED_M
from nmfx.pattern import nm_mask
from nmfx.passes.lower_inference import PLAN_KEY, SEMI_REFUSED, SEMI_SUFFIX, lower_weight, plan_weight
from nmfx.passes.rewrite_modules import MaskedMultiheadAttention
from nmfx.refresh import require_refreshed
from nmfx.state import NMState
from nmfx.tracing import ROOT_GRAPH_ATTR, TRACED_FROM_KEY, sync_root

__all__ = ["to_inference", "is_inference", "LOWERING_BACKENDS"]

#: What a lowering may be asked for: "auto" (the nm_linear kernel registered for the tensors' device),
#: "cpu" / "triton" (the same op, after checking that this is the kernel that will run), "reference"
#: (nmfx::nm_linear_reference), and PyTorch's 2:4 semi-structured sparse tensors (CUDA sm80+).
LOWERING_BACKENDS = ("auto", "cpu", "triton", "reference", "semi_structured")


def to_inference(model: nn.Module, backend: str = "auto", *, dtype: Optional[torch.dtype] = None,
                 force: bool = False, inplace: bool = False, _structure_only: bool = False) -> nn.Module:
    """The deployable form of a sparsified model: every masked linear becomes ``nmfx::nm_linear`` over a
    packed N:M weight and the dense weights are dropped. Returns a copy unless ``inplace``, in eval mode.
    The packed layers take no gradient (``nm_linear`` has no backward; their biases are frozen); the
    model's other parameters keep their ``requires_grad`` (freezing them would also change how
    ``torch.matmul`` runs a dense head on a sliced 3-d input: a weight-sized copy per prefill).

    Each lowered ``nn.Linear`` (``MaskedLinear``) and transformers ``Conv1D`` becomes an
    :class:`nmfx.layers.NMLinear` (the same object where it was one, so its hooks keep firing; buffers
    ``weight_values`` / ``weight_indices``, no ``weight``). When CPU layers will run the plain-torch
    reference because the C++ kernel cannot be built (backend ``"auto"``), a RuntimeWarning says so,
    with the build error.

    The packed layers call ``torch.ops.nmfx.nm_linear``, whose kernel is chosen by the dispatcher from
    the tensors' device (C++ on the CPU, Triton on CUDA), so the lowered model runs wherever it is moved.

    Args:
        backend: ``"auto"`` (CUDA sm80+: semi-structured 2:4 tensors for 2:4-compatible patterns, else
            ``nm_linear``); ``"cpu"`` / ``"triton"``: ``nm_linear``, after checking that its C++ (Triton)
            kernel can run on the model's tensors (RuntimeError naming the reason otherwise, instead of a
            fallback); ``"reference"``: ``nmfx::nm_linear_reference`` (plain torch, every device); or
            ``"semi_structured"`` (layers that cannot use it fall back to ``nm_linear``, with the reason
            in ``nmfx.report``).
        dtype: cast the model (e.g. ``torch.bfloat16``) before packing.
        force: lower even if training has not reached the hard target mask (alpha = 0, target N:M): the
            target mask of the current weights is used, so outputs change; a warning says so.
    """
    found = record(model)
    too_wide = sorted({str(state.pattern) for state in states(model).values() if state.pattern.m > MAX_PACKED_M})
    if too_wide:
        raise ValueError(f"the packed format supports M <= {MAX_PACKED_M}; pattern {', '.join(too_wide)} cannot be lowered")
    if backend not in LOWERING_BACKENDS:
        raise ValueError(f"unknown backend {backend!r}; valid backends: {', '.join(LOWERING_BACKENDS)}")
    if is_inference(model):
        raise ValueError("this model is already an nmfx inference model")
    if not _structure_only:  # a structure-only rebuild (nmfx.load) has no real weights or masks yet
        require_refreshed(model, "nmfx.to_inference")
    unfinished = {} if _structure_only else {name: s.schedule for name, s in states(model).items()
                                             if s.schedule.alpha != 0.0 or s.schedule.pattern != s.pattern}
    if unfinished and not force:
        name, state = next(iter(unfinished.items()))
        raise ValueError(f"{len(unfinished)} weights have not reached the hard {found.config.describe_pattern()} mask "
                         f"(e.g. {name}: alpha={state.alpha:.3g}, pattern {state.pattern} of target "
                         f"{states(model)[name].pattern}); finish the schedule (total_steps) "
                         "or pass force=True to prune them to the target mask now")
    unreachable = _unlowerable_states(model)
    if unreachable:
        raise ValueError(f"{len(unreachable)} sparsified weights (e.g. {unreachable[0]}) are in no rewritten graph that "
                         "still carries nmfx's annotations, so they cannot be lowered; nothing was changed. Graph "
                         "annotations do not survive pickling the whole model (torch.save(model)): rebuild it with "
                         "nmfx.sparsify(fresh_model, <same arguments>) and fresh_model.load_state_dict(state_dict)")
    target = model if inplace else copy.deepcopy(model)
    if dtype is not None:
        target.to(dtype)
    if unfinished:
        warnings.warn(f"nmfx.to_inference(force=True): {len(unfinished)} weights pruned to {found.config.describe_pattern()} before "
                      "their schedule ended; outputs differ from the trained model's", stacklevel=2)
        with torch.no_grad():
            for name, state in states(target).items():
                state.mask.copy_(nm_mask(target.get_parameter(name), state.pattern, dim=state.dim))
    if not _structure_only:  # a structure-only rebuild checks once its tensors have a device (nmfx.load)
        check_backend_runs({state.mask.device for state in states(target).values()}, backend)
    scoped = graphs(target)

    def plan_lone_layers() -> list:
        """Plans for the MaskedLinear layers that no graph lowers (sparsified alone), made after the graphs'."""
        called = {id(gm.get_submodule(node.target)) for gm in scoped.values() for node in gm.graph.nodes
                  if node.op == "call_module" and PLAN_KEY in node.meta}
        plans = []
        for name, module in target.named_modules():
            if isinstance(module, MaskedLinear) and id(module) not in called:
                weight = f"{name}.weight" if name else "weight"
                op = PrunableOp(kind="linear", weight=weight, target="weight", bias="bias" if module.bias is not None
                                else None, transposed=False, weight_shape=tuple(module.weight.shape))
                plans.append((module, op, plan_weight(module, "weight", op, backend, _structure_only)))
        return plans

    lone = lower_graphs(list(scoped.values()), backend, _structure_only, before_install=plan_lone_layers)
    for scope, gm in scoped.items():
        if gm is getattr(target, ROOT_GRAPH_ATTR, None):
            sync_root(target)
        _replace_standalone_scope(target, scope, gm)
    for module, op, plan in lone:
        lower_weight(module, plan, "weight", op, backend)
    _materialize_attention(target)
    # The record keeps what sparsify decided; nmfx.report reads what lowering did from the model itself.
    object.__setattr__(target, "_nmfx_record", dataclasses.replace(found, inference=True))
    for layer in target.modules():  # nm_linear has no backward; the rest keep requires_grad (see above)
        if isinstance(layer, NMLinear) and layer.bias is not None:
            layer.bias.requires_grad_(False)
    return target.eval()


def _unlowerable_states(model: nn.Module) -> list[str]:
    """Sparsified weights that lowering would not reach: neither an annotated masked op of a rewritten graph,
    nor a lone ``MaskedLinear``, nor a ``nn.MultiheadAttention`` projection."""
    reachable = {node.meta[META_KEY].weight for gm in graphs(model).values() for node in annotated_nodes(gm.graph)
                 if node.meta[META_KEY].status == "sparsified"}
    for name, module in model.named_modules():
        prefix = f"{name}." if name else ""
        if isinstance(module, MaskedLinear):
            reachable.add(f"{prefix}weight")
        elif isinstance(module, MaskedMultiheadAttention):
            reachable.update(f"{prefix}{weight}" for weight, _ in module.named_parameters())
    return sorted(set(states(model)) - reachable)


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
    layers: dict[str, dict] = {}
    for scope, gm in graphs(model).items():
        for node in annotated_nodes(gm.graph):
            op = node.meta[META_KEY]
            if op.status == "packed":
                layers.setdefault(op.weight, {"weight": op.weight, "shape": list(op.weight_shape),
                                              "transposed": op.transposed, "pattern": str(op.pattern), "kind": op.kind,
                                              "scope": scope})
    for name, module in model.named_modules():
        if isinstance(module, NMLinear):  # lowered alone, with no graph of its own
            weight = f"{name}.weight" if name else "weight"
            layers.setdefault(weight, {"weight": weight, "shape": list(module.weight_shape),
                                       "transposed": module.transposed, "pattern": str(module.pattern), "kind": module.kind,
                                       "scope": name})
    return list(layers.values())


def check_backend_runs(devices: set, backend: str) -> None:
    """For packed layers on ``devices``: an explicit ``"cpu"`` / ``"triton"`` must be the kernel that runs
    (RuntimeError otherwise); with ``"auto"``, warn (once per call) when CPU layers will run the reference
    because the C++ kernel is missing."""
    if backend == "triton":
        from nmfx.kernels import triton_nm

        if any(d.type != "cuda" for d in devices):
            raise RuntimeError(f"nmfx.to_inference(backend='triton'): the model's weights are on {sorted(map(str, devices))}; "
                               "the Triton kernel is nm_linear's CUDA kernel: move the model to a GPU first")
        why = triton_nm.unavailable_reason(*(torch.empty(0, device=d) for d in devices))
        if why is not None:
            raise RuntimeError(f"nmfx.to_inference(backend='triton'): the Triton kernels cannot run: {why}")
        return
    if backend not in ("auto", "cpu", "semi_structured"):
        return
    if backend == "cpu" and any(d.type != "cpu" for d in devices):
        raise RuntimeError(f"nmfx.to_inference(backend='cpu'): the model's weights are on {sorted(map(str, devices))}; "
                           "the C++ kernel is nm_linear's CPU kernel: call model.cpu() first")
    if not any(d.type == "cpu" for d in devices):
        return
    from nmfx.kernels import cpu

    if cpu.available():
        return
    if backend == "cpu":
        raise RuntimeError(f"nmfx.to_inference(backend='cpu'): the C++ CPU kernel for nm_linear cannot be built "
                           f"({cpu.build_error()}). Fix the build (a C++ compiler and ninja; see the reason), or "
                           "pass backend='reference' for the plain-torch path")
    warnings.warn(f"nmfx.to_inference: the C++ CPU kernel for nm_linear is unavailable ({cpu.build_error()}), so "
                  "the packed layers run the plain-torch reference, which densifies the weight at every call "
                  "(several times slower than the dense model). Fix the build (a C++ compiler and ninja; see the "
                  "reason), or pass backend='reference' to choose that path explicitly.", RuntimeWarning, stacklevel=3)


_CALL_HOOK_ATTRS = ("_forward_hooks", "_forward_hooks_with_kwargs", "_forward_hooks_always_called",
                    "_forward_pre_hooks", "_forward_pre_hooks_with_kwargs", "_backward_hooks", "_backward_pre_hooks",
                    "_is_full_backward_hook")


def _replace_standalone_scope(model: nn.Module, scope: str, gm) -> None:
    """A transformers ``Conv1D`` traced alone (its graph is one packed op over its own buffers) becomes an
    :class:`NMLinear` with the same buffers and the same hook dicts (hooks registered on the graph module
    keep firing)."""
    cls = gm.meta.get(TRACED_FROM_KEY)
    ops = [node.meta[META_KEY] for node in annotated_nodes(gm.graph)]
    if cls is None or not is_conv1d(cls):
        return
    if len(ops) != 1 or ops[0].status != "packed" or ops[0].target != "weight" or list(gm.children()):
        return
    op = ops[0]
    layer = NMLinear.__new__(NMLinear)
    nn.Module.__init__(layer)
    note = SEMI_REFUSED + op.reason.partition(f"; {SEMI_REFUSED}")[2] if f"; {SEMI_REFUSED}" in op.reason else ""
    layer._setup(op.in_features, op.out_features, op.pattern, _node_backend(gm), op.kind, op.transposed, note)
    if op.kind == "semi_structured":
        layer.register_parameter("weight_semi", getattr(gm, "weight" + SEMI_SUFFIX))
    else:
        layer.register_buffer("weight_values", gm.weight_values)
        layer.register_buffer("weight_indices", gm.weight_indices)
    layer.register_parameter("bias", getattr(gm, "bias", None))
    for attr in _CALL_HOOK_ATTRS:  # shared, so the handles of hooks registered on the graph module still work
        if hasattr(gm, attr):
            setattr(layer, attr, getattr(gm, attr))
    layer.train(gm.training)
    parent_name, _, child_name = scope.rpartition(".")
    setattr(model.get_submodule(parent_name) if parent_name else model, child_name, layer)


def _node_backend(gm) -> str:
    """The layer backend of the packed op a standalone scope's graph calls."""
    for node in gm.graph.nodes:
        if node.target is torch.ops.nmfx.nm_linear_reference.default:
            return "reference"
    return "auto"
