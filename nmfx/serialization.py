"""``nmfx.save`` / ``nmfx.load``: inference models as safetensors (no pickle) with a JSON header.

The file holds the inference model's ``state_dict`` (packed ``*_values`` / ``*_indices`` buffers in place
of the sparsified dense weights; everything else as is) and, in the safetensors metadata under
``"nmfx"``, a JSON header::

    {"format_version": 1, "pattern": "1:8", "method": {...}, "backend": "auto",
     "layers": [{"weight": "h.0.mlp.c_fc.weight", "shape": [768, 3072], "transposed": true,
                 "pattern": "1:8", "scope": "h.0.mlp"}, ...],
     "tensors": {"<name>": {"dtype": "float16", "shape": [...]}, ...}}

``load(path, model)`` takes a freshly built *dense* model of the same architecture (on the meta device
if you like: no memory for dense weights), re-runs the same rewrite on it, lowers it with empty packed
buffers and fills every tensor from the file — after checking that every name, shape and dtype
matches, so a mismatched file is refused before anything is copied.
"""

from __future__ import annotations

import json
import os
from typing import Union

import torch
from torch import nn

__all__ = ["save", "load", "FILE_FORMAT_VERSION"]

FILE_FORMAT_VERSION = 1
_KEY = "nmfx"


def save(model: nn.Module, path: Union[str, os.PathLike]) -> None:
    """Write an inference model (``nmfx.to_inference``) to ``path`` as safetensors + nmfx header."""
    from safetensors.torch import save_file

    from nmfx.api import record
    from nmfx.inference import is_inference, packed_layers

    if not is_inference(model):
        raise ValueError("nmfx.save writes inference models: call nmfx.to_inference(model) first "
                         "(a training checkpoint is simply model.state_dict())")
    found = record(model)
    layers = packed_layers(model)
    semi = [layer["weight"] for layer in layers if layer["kind"] == "semi_structured"]
    if semi:
        raise ValueError(f"{len(semi)} layers (e.g. {semi[0]}) are lowered to semi-structured 2:4 tensors, which the "
                         "file format does not hold: save a to_inference(model, backend='auto') lowering made on the "
                         "CPU and lower again on the GPU after loading")
    tensors = _unique_tensors(model)
    header = {
        "format_version": FILE_FORMAT_VERSION,
        "pattern": str(found.pattern),
        "method": found.method.to_dict(),
        "layers": layers,
        "tensors": {name: {"dtype": str(t.dtype).removeprefix("torch."), "shape": list(t.shape)}
                    for name, t in tensors.items()},
    }
    save_file({k: v.detach().contiguous().cpu() for k, v in tensors.items()}, os.fspath(path),
              metadata={_KEY: json.dumps(header)})


def load(path: Union[str, os.PathLike], model: nn.Module, backend: str = "auto") -> nn.Module:
    """Rebuild the inference model saved at ``path`` from a fresh dense ``model`` of the same architecture
    (meta device allowed); returns it (the same object, rewritten in place), in eval mode."""
    from safetensors import safe_open

    import nmfx
    from nmfx.inference import packed_layers, to_inference

    header = _read_header(path)
    if any(t.is_meta for t in list(model.parameters()) + list(model.buffers())):
        _to_empty_keeping_ties(model)
    weights = [layer["weight"] for layer in header["layers"]]
    with _quiet():
        nmfx.sparsify(model, header["pattern"], "ste", include=weights or ["<none>"])
    to_inference(model, backend=backend, inplace=True, _structure_only=True)
    rebuilt = {layer["weight"]: layer for layer in packed_layers(model)}
    saved = {layer["weight"]: layer for layer in header["layers"]}
    if rebuilt.keys() != saved.keys():
        raise ValueError(f"{os.fspath(path)}: the model does not match the file's architecture: packed layers "
                         f"only in the file: {sorted(saved.keys() - rebuilt.keys())[:5]}, only in the model: "
                         f"{sorted(rebuilt.keys() - saved.keys())[:5]}")
    targets = _unique_tensors(model)
    problems = []
    for name, spec in header["tensors"].items():
        if name not in targets:
            problems.append(f"{name} is in the file but not in the model")
        elif list(targets[name].shape) != spec["shape"]:
            problems.append(f"{name}: shape {spec['shape']} in the file vs {list(targets[name].shape)} in the model")
    problems += [f"{name} is in the model but not in the file" for name in targets.keys() - header["tensors"].keys()]
    if problems:
        raise ValueError(f"{os.fspath(path)} does not fit this model; nothing was loaded:\n  " + "\n  ".join(problems[:20]))
    try:
        with safe_open(os.fspath(path), framework="pt") as f:
            loaded = {name: f.get_tensor(name) for name in header["tensors"]}
    except Exception as error:
        raise ValueError(f"{os.fspath(path)} is corrupted or truncated ({type(error).__name__}: {error}); "
                         "nothing was loaded") from error
    with torch.no_grad():
        for name, tensor in loaded.items():
            target = targets[name]
            if target.dtype != tensor.dtype:
                target.data = torch.empty_like(target, dtype=tensor.dtype)
            target.copy_(tensor)
    return model.eval()


def _to_empty_keeping_ties(model: nn.Module) -> None:
    """``model.to_empty(device="cpu")``, which unties shared parameters; tie them again."""
    first: dict[int, str] = {}
    ties = []
    for name, param in model.named_parameters(remove_duplicate=False):
        owner = first.setdefault(id(param), name)
        if owner != name:
            ties.append((name, owner))
    model.to_empty(device="cpu")
    for name, owner in ties:
        module_name, _, attr = name.rpartition(".")
        setattr(model.get_submodule(module_name) if module_name else model, attr, model.get_parameter(owner))


def _read_header(path) -> dict:
    from safetensors import safe_open

    if not os.path.exists(path):
        raise FileNotFoundError(f"no nmfx model file at {os.fspath(path)}")
    try:
        with safe_open(os.fspath(path), framework="pt") as f:
            metadata = f.metadata() or {}
    except Exception as error:
        raise ValueError(f"{os.fspath(path)} is not a readable safetensors file (truncated or corrupted?): "
                         f"{type(error).__name__}: {error}") from error
    if _KEY not in metadata:
        raise ValueError(f"{os.fspath(path)} has no nmfx header: it was not written by nmfx.save")
    try:
        header = json.loads(metadata[_KEY])
    except json.JSONDecodeError as error:
        raise ValueError(f"{os.fspath(path)}: the nmfx header is corrupted ({error})") from error
    version = header.get("format_version")
    if not isinstance(version, int) or version > FILE_FORMAT_VERSION:
        raise ValueError(f"{os.fspath(path)} uses nmfx file format {version!r}; this nmfx reads up to "
                         f"{FILE_FORMAT_VERSION}: upgrade nmfx")
    for key in ("pattern", "layers", "tensors"):
        if key not in header:
            raise ValueError(f"{os.fspath(path)}: the nmfx header lacks {key!r}")
    return header


def _unique_tensors(model: nn.Module) -> dict[str, torch.Tensor]:
    """The state_dict with tied tensors kept once (safetensors refuses shared storage)."""
    seen: dict[int, str] = {}
    out = {}
    for name, tensor in model.state_dict(keep_vars=True).items():
        if not isinstance(tensor, torch.Tensor):
            continue
        key = id(tensor)
        if key in seen:
            continue
        seen[key] = name
        out[name] = tensor
    return out


class _quiet:
    """Silence nmfx's own 'nothing sparsified' warning while rebuilding (the checks below are stricter)."""

    def __enter__(self):
        import warnings

        self._catcher = warnings.catch_warnings()
        self._catcher.__enter__()
        warnings.filterwarnings("ignore", message="nmfx.sparsify")

    def __exit__(self, *exc):
        return self._catcher.__exit__(*exc)
