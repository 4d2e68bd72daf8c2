"""``nmfx.to_dense``: fold an nmfx model back into a plain model of the original architecture.

The result has no nmfx modules, states, rewritten graphs or custom ops, the original class and
``state_dict`` keys, and the *effective* weights: ``W * m`` for a training model at its hard target
mask, the unpacked weights for an inference model. It is what runtimes that take dense checkpoints
need (``save_pretrained``, vLLM, llama.cpp converters, ``torch.onnx.export``).

``nmfx.sparsify`` replaces submodules by ``GraphModule``s and keeps no copy of the modules it replaced,
so the plain model is built fresh and filled: pass ``into=`` a new instance of the same architecture
(the meta device is fine), or let ``to_dense`` build one for a ``transformers`` model
(``type(model)(model.config)`` on the meta device).

ONNX: a packed inference model calls ``nmfx::nm_linear``, which has no ONNX definition. Both exporters
refuse it pointing here: ``torch.onnx.export(..., dynamo=True)`` (the default) through the op's fake
implementation, the TorchScript exporter (``dynamo=False``) through a symbolic (both in
``nmfx.inference_ops``). Export ``to_dense(model)`` instead.
"""

from __future__ import annotations

import copy
import warnings
from typing import Optional

import torch
from torch import Tensor, nn

from nmfx.api import is_sparsified, record, states
from nmfx.inference import is_inference, packed_layers
from nmfx.packed import PackedNMWeight
from nmfx.pattern import nm_mask
from nmfx.refresh import require_refreshed
from nmfx.state import STATE_SUFFIX, NMState

__all__ = ["to_dense"]

def to_dense(model: nn.Module, into: Optional[nn.Module] = None, *, force: bool = False) -> nn.Module:
    """A plain copy of nmfx model ``model`` with its effective sparse weights; ``model`` is not changed.

    Args:
        model: a model from ``nmfx.sparsify`` / ``nmfx.prune`` (training form) or ``nmfx.to_inference``.
        into: a freshly built, never sparsified instance of the model's architecture (meta device
            allowed); it is filled in place and returned. Optional for ``transformers`` models.
        force: for a training model whose schedule has not reached the hard target mask (alpha > 0, or
            an earlier SDGF pattern), fold the target mask of the current weights in anyway (outputs
            change; a warning says so), as ``to_inference(force=True)`` does. Without it, refused.

    Raises:
        ValueError: ``model`` is not an nmfx model, its schedule is unfinished (without ``force``), or
            ``into`` does not match its parameters and buffers (names or shapes); ``into`` is then unchanged.
    """
    found = record(model)
    tensors = _effective_inference(model) if is_inference(model) else _effective_training(model, force, str(found.pattern))
    target = into if into is not None else _fresh(model)
    if is_sparsified(target) or states(target):
        raise ValueError("into= must be a plain model (it is already sparsified by nmfx); build a fresh one")
    slots = dict(target.named_parameters(remove_duplicate=False))
    slots.update(target.named_buffers(remove_duplicate=False))
    only_model, only_target = sorted(tensors.keys() - slots.keys()), sorted(slots.keys() - tensors.keys())
    shapes = [f"{name}: {tuple(tensors[name].shape)} in the model vs {tuple(slots[name].shape)} in into="
              for name in sorted(tensors.keys() & slots.keys()) if tensors[name].shape != slots[name].shape]
    if only_model or only_target or shapes:
        raise ValueError("into= does not have the model's architecture; nothing was copied:"
                         + (f"\n  only in the model: {only_model[:8]}" if only_model else "")
                         + (f"\n  only in into=: {only_target[:8]}" if only_target else "")
                         + "".join(f"\n  {line}" for line in shapes[:8]))
    device = next(iter(tensors.values())).device if tensors else torch.device("cpu")
    if any(t.is_meta for t in slots.values()):
        _materialize(target, device)
        slots = dict(target.named_parameters(remove_duplicate=False))
        slots.update(target.named_buffers(remove_duplicate=False))
    with torch.no_grad():
        for name, value in tensors.items():
            slot = slots[name]
            if slot.dtype == value.dtype and slot.device == value.device:
                slot.copy_(value)
            else:
                slot.data = value.detach().clone()
    return target.train(model.training)


def _effective_training(model: nn.Module, force: bool, pattern: str) -> dict[str, Tensor]:
    """``{name: tensor}`` of every parameter and buffer outside nmfx states, weights folded with their masks."""
    require_refreshed(model, "nmfx.to_dense")
    found = states(model)
    unfinished = [name for name, s in found.items() if s.schedule.alpha != 0.0 or s.schedule.pattern != s.pattern]
    if unfinished and not force:
        name = unfinished[0]
        schedule = found[name].schedule
        raise ValueError(f"{len(unfinished)} weights have not reached the hard {pattern} mask (e.g. {name}: "
                         f"alpha={schedule.alpha:.3g}, pattern {schedule.pattern}); finish the schedule or pass "
                         "force=True to fold in the target mask of the current weights")
    if unfinished:
        warnings.warn(f"nmfx.to_dense(force=True): {len(unfinished)} weights pruned to {pattern} before their "
                      "schedule ended; outputs differ from the model's", stacklevel=3)
    state_paths = tuple(name + STATE_SUFFIX for name in found)
    tensors = {}
    for name, tensor in _named_tensors(model):
        if name.startswith(state_paths) and _under_state(model, name):
            continue
        tensors[name] = tensor.detach()
    with torch.no_grad():
        for name, state in found.items():
            weight = tensors[name]
            mask = nm_mask(weight, state.pattern, dim=state.dim) if name in unfinished else state.mask
            tensors[name] = weight * mask
    return tensors


def _effective_inference(model: nn.Module) -> dict[str, Tensor]:
    """``{name: tensor}`` of an inference model, each packed weight unpacked under its original name."""
    tensors = {name: tensor.detach() for name, tensor in _named_tensors(model)}
    for layer in packed_layers(model):
        name = layer["weight"]
        if layer["kind"] == "semi_structured":
            raise ValueError(f"{name} is lowered to a semi-structured 2:4 tensor; call to_dense on the training "
                             "model or on a to_inference(backend='auto') lowering made on the CPU")
        values, indices = tensors.pop(f"{name}_values"), tensors.pop(f"{name}_indices")
        out_in = tuple(layer["shape"][::-1]) if layer["transposed"] else tuple(layer["shape"])
        packed = PackedNMWeight(values, indices, layer["pattern"], out_in, values.dtype)
        dense = packed.unpack()
        tensors[name] = dense.T.contiguous() if layer["transposed"] else dense
    return tensors


def _named_tensors(model: nn.Module):
    yield from model.named_parameters(remove_duplicate=False)
    yield from model.named_buffers(remove_duplicate=False)


def _under_state(model: nn.Module, name: str) -> bool:
    path = name.rpartition(".")[0]
    return isinstance(model.get_submodule(path), NMState)


def _fresh(model: nn.Module) -> nn.Module:
    config = getattr(model, "config", None)
    if config is None or not type(model).__module__.startswith("transformers"):
        raise ValueError(f"nmfx.to_dense cannot rebuild a plain {type(model).__name__} by itself: pass "
                         f"into=<a new {type(model).__name__}(...) of the same architecture> (the meta device "
                         "is fine: with torch.device('meta'): ...)")
    with torch.device("meta"):
        return type(model)(copy.deepcopy(config))


def _materialize(model: nn.Module, device: torch.device) -> None:
    """``model.to_empty(device)``, keeping tied parameters tied (every tensor is overwritten afterwards)."""
    first: dict[int, str] = {}
    ties = []
    for name, param in model.named_parameters(remove_duplicate=False):
        owner = first.setdefault(id(param), name)
        if owner != name:
            ties.append((name, owner))
    model.to_empty(device=device)
    for name, owner in ties:
        module_name, _, attr = name.rpartition(".")
        setattr(model.get_submodule(module_name) if module_name else model, attr, model.get_parameter(owner))
