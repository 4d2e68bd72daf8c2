"""``nmfx.to_inference_from_checkpoint``: a deployable model from a sparse training run's distributed
checkpoint, without the whole dense model in memory.

A model trained under FSDP2 is too big for one rank, so gathering it for ``nmfx.to_inference`` is not an
option. Its ``torch.distributed.checkpoint`` (DCP) directory holds every dense weight and nmfx state
(sharded as they were trained; DCP reads any part of it in one process). This module rebuilds the
inference model from it in one process, with no process group: the structure is built on the meta device
(``sparsify`` + a structure-only ``to_inference``, as ``nmfx.load`` does), the inference model's own
tensors are allocated, the dense tensors nmfx does not pack are read straight into them, and each
sparsified weight is read with its mask one layer at a time, checked, packed and dropped. Peak memory is
the inference model plus one dense layer.

Everything read is checked before it is used (the checkpoint is untrusted): the tensors' names, shapes and
dtypes against the model, each state's config (pattern, weight shape, group dimension) and schedule
(the run must have reached its hard target mask: alpha 0 at the target pattern), and every mask (exactly
N kept per group of M). A refused checkpoint leaves ``model`` exactly as it was.
"""

from __future__ import annotations

import os
from typing import Any, Optional, Union

import torch
from torch import nn

from nmfx.accessors import is_sparsified, states
from nmfx.config import literal_glob
from nmfx.inference import packed_layers
from nmfx.methods import resolve_method
from nmfx.packed import pack_nm
from nmfx.pattern import Pattern
from nmfx.passes.lower_inference import INDICES_SUFFIX, VALUES_SUFFIX
from nmfx.serialization import _install, _unique_tensors, allocate_inference, rebuild_sparsified, refuse_unfilled
from nmfx.state import STATE_SUFFIX, _decode_config, mask_problem

__all__ = ["to_inference_from_checkpoint"]

_STATE_ENTRIES = ("step", "alpha", "config")  # read for every state before anything is allocated


def to_inference_from_checkpoint(checkpoint: Union[str, os.PathLike], model: nn.Module, *, prefix: str = "model.",
                                 backend: str = "auto", dtype: Optional[torch.dtype] = None) -> nn.Module:
    """Rebuild the inference model of a sparsified training run from its DCP checkpoint directory into a fresh
    dense ``model`` of the same architecture (build it on the meta device: no weight is allocated until the
    inference model's own); returns ``model`` itself, now what ``nmfx.to_inference`` would have made of the
    trained model, in eval mode.

    Args:
        checkpoint: a ``torch.distributed.checkpoint`` directory, e.g. one written by
            ``examples/train_distributed.py --checkpoint`` (any number of ranks, DDP or FSDP2).
        prefix: where the model's ``state_dict`` sits in the checkpoint (``dcp.save({"model": ...})`` puts
            it under ``"model."``; ``""`` for a checkpoint of the model's state dict alone).
        backend: ``"auto"`` (``nm_linear``: the C++ kernel on the CPU, where the model is rebuilt; Triton
            once it is moved to a GPU) or ``"reference"``.
        dtype: cast the inference model's tensors (e.g. ``torch.bfloat16``); default: the checkpoint's.

    Raises ``ValueError`` (the checkpoint does not fit ``model``, is malformed, or the run had not reached
    its hard masks) or ``FileNotFoundError``; ``model`` is then exactly as it was.
    """
    import torch.distributed.checkpoint as dcp

    where = os.fspath(checkpoint)
    if not isinstance(model, nn.Module):
        raise TypeError(f"expected a torch.nn.Module to rebuild into, got {type(model).__name__}")
    if is_sparsified(model) or states(model):
        raise ValueError("nmfx.to_inference_from_checkpoint rebuilds from a freshly built dense model; this one is "
                         "already sparsified: build a fresh one (on the meta device)")
    if backend not in ("auto", "reference"):
        raise ValueError(f"backend must be 'auto' or 'reference', got {backend!r} (the model is rebuilt on the CPU; "
                         "nm_linear picks its kernel from the device it is moved to)")
    stored = _read_metadata(where)
    params = dict(model.named_parameters(remove_duplicate=False))
    weights = sorted(key[len(prefix):-len(STATE_SUFFIX + ".config")] for key in stored
                     if key.startswith(prefix) and key.endswith(STATE_SUFFIX + ".config"))
    if not weights:
        raise ValueError(f"{where}: no nmfx state under the prefix {prefix!r} (keys such as "
                         f"'{prefix}<layer>.weight{STATE_SUFFIX}.config'): not a checkpoint of an nmfx-sparsified "
                         "model, or pass the prefix its state dict was saved under")
    unknown = [w for w in weights if w not in params]
    if unknown:
        raise ValueError(f"{where}: nmfx states for weights this model does not have (e.g. {unknown[0]}); nothing "
                         "was changed: build the model the run trained")
    small = {f"{prefix}{w}{STATE_SUFFIX}.{entry}": _empty(stored, f"{prefix}{w}{STATE_SUFFIX}.{entry}", where)
             for w in weights for entry in _STATE_ENTRIES}
    dcp.load(small, checkpoint_id=where)
    plans = {w: _checked_state(w, {e: small[f"{prefix}{w}{STATE_SUFFIX}.{e}"] for e in _STATE_ENTRIES},
                               tuple(params[w].shape), where) for w in weights}
    del small

    staged, memo = rebuild_sparsified(model, {literal_glob(w): str(plan["pattern"]) for w, plan in plans.items()},
                                      weights)
    for w, state in states(staged).items():
        if state.dim != plans[w]["dim"]:
            raise ValueError(f"{where}: {w} was masked along dimension {plans[w]['dim']} in the run, but this model "
                             f"groups it along {state.dim}; nothing was changed: build the model the run trained")
    allocate_inference(staged, backend, dtype)
    layers = {layer["weight"]: layer for layer in packed_layers(staged)}
    packed_names = {w + suffix for w in layers for suffix in (VALUES_SUFFIX, INDICES_SUFFIX)}
    dense = {name: t for name, t in _unique_tensors(staged).items() if name not in packed_names}
    missing = [name for name in dense if prefix + name not in stored]
    if missing:
        raise ValueError(f"{where}: {len(missing)} tensors of the model are not in the checkpoint (e.g. "
                         f"{prefix}{missing[0]}); nothing was changed")
    for name, tensor in dense.items():
        _check_shape(stored, prefix + name, tuple(tensor.shape), where)
    dcp.load({prefix + name: tensor for name, tensor in dense.items()}, checkpoint_id=where)
    for w, layer in layers.items():
        _pack_layer(staged, w, layer, plans[w], stored, prefix, where)
    refuse_unfilled(staged, where, "checkpoint")
    _install(model, staged.eval(), memo)
    return model


def _read_metadata(where: str) -> dict[str, tuple[torch.dtype, tuple[int, ...]]]:
    """``{key: (dtype, shape)}`` of every tensor in the DCP checkpoint at ``where``."""
    from torch.distributed.checkpoint import FileSystemReader
    from torch.distributed.checkpoint.metadata import TensorStorageMetadata

    if not os.path.isdir(where):
        raise FileNotFoundError(f"no checkpoint directory at {where}")
    try:
        metadata = FileSystemReader(where).read_metadata()
    except Exception as error:
        raise ValueError(f"{where} is not a readable torch.distributed.checkpoint directory: "
                         f"{type(error).__name__}: {error}") from error
    return {key: (meta.properties.dtype, tuple(meta.size)) for key, meta in metadata.state_dict_metadata.items()
            if isinstance(meta, TensorStorageMetadata)}


def _check_shape(stored: dict, key: str, shape: tuple[int, ...], where: str) -> None:
    if key not in stored:
        raise ValueError(f"{where}: {key} is not in the checkpoint; nothing was changed")
    if stored[key][1] != shape:
        raise ValueError(f"{where}: {key} has shape {list(stored[key][1])} in the checkpoint, the model "
                         f"{list(shape)}; nothing was changed: build the model the run trained")


def _empty(stored: dict, key: str, where: str) -> torch.Tensor:
    if key not in stored:
        raise ValueError(f"{where}: {key} is not in the checkpoint; nothing was changed")
    dtype, shape = stored[key]
    return torch.empty(shape, dtype=dtype)


def _checked_state(weight: str, entries: dict[str, torch.Tensor], shape: tuple[int, ...], where: str) -> dict[str, Any]:
    """The pattern and group dimension a weight was trained with, after checking its state entries and that
    its schedule had reached the hard target mask."""
    def refuse(problem: str):
        return ValueError(f"{where}: the nmfx state of {weight} {problem}; nothing was changed")

    try:
        config = _decode_config(entries["config"])
        pattern = Pattern.parse(config["pattern"])
        method = resolve_method(config["method"])
        dim, saved_shape = config["dim"], tuple(config["weight_shape"])
    except Exception as error:
        raise refuse(f"has an unreadable config ({type(error).__name__}: {error})") from None
    if saved_shape != shape:
        raise refuse(f"is for a {list(saved_shape)} weight, the model's is {list(shape)}")
    if type(dim) is not int or not -len(shape) <= dim < len(shape):
        raise refuse(f"has group dimension {dim!r} for a {len(shape)}-d weight")
    step, alpha = entries["step"], entries["alpha"]
    if step.numel() != 1 or step.dtype.is_floating_point or int(step) < 0:
        raise refuse(f"has step {step.tolist()!r} (a non-negative integer expected)")
    if alpha.numel() != 1 or not 0.0 <= float(alpha) <= 1.0:
        raise refuse(f"has alpha {alpha.tolist()!r} (a number in [0, 1] expected)")
    schedule = method.state_at(int(step), pattern)
    if float(alpha) != 0.0 or schedule.alpha != 0.0 or schedule.pattern != pattern:
        raise refuse(f"had not reached its hard {pattern} mask at step {int(step)} (alpha {float(alpha):.3g}, "
                     f"pattern {schedule.pattern}): deploy a checkpoint from the end of the schedule, or load this one "
                     "into the sparsified model and call nmfx.to_inference(model, force=True)")
    return {"pattern": pattern, "dim": dim % len(shape)}


@torch.no_grad()
def _pack_layer(staged: nn.Module, weight: str, layer: dict, plan: dict, stored: dict, prefix: str, where: str) -> None:
    """Read one dense weight and its mask, check the mask, pack them into the layer's buffers, drop them."""
    owner_path, _, param = weight.rpartition(".")
    owner = staged.get_submodule(owner_path) if owner_path else staged
    values, indices = getattr(owner, param + VALUES_SUFFIX), getattr(owner, param + INDICES_SUFFIX)
    dense_key, mask_key = prefix + weight, f"{prefix}{weight}{STATE_SUFFIX}.mask"
    shape = tuple(layer["shape"])
    _check_shape(stored, dense_key, shape, where)
    _check_shape(stored, mask_key, shape, where)
    if stored[mask_key][0] != torch.bool:
        raise ValueError(f"{where}: {mask_key} is {stored[mask_key][0]}, not a bool mask; nothing was changed")
    read = {dense_key: _empty(stored, dense_key, where), mask_key: _empty(stored, mask_key, where)}
    import torch.distributed.checkpoint as dcp

    dcp.load(read, checkpoint_id=where)
    dense, mask = read.pop(dense_key), read.pop(mask_key)
    wrong = mask_problem(mask, plan["pattern"], plan["dim"])
    if wrong:
        raise ValueError(f"{where}: the mask of {weight} is not a valid {plan['pattern']} mask: {wrong}; nothing was "
                         "changed")
    if layer["transposed"]:
        dense, mask = dense.t(), mask.t()
    packed = pack_nm(dense.to(values.dtype).contiguous(), plan["pattern"], mask.contiguous())
    values.copy_(packed.values)
    indices.copy_(packed.indices)
