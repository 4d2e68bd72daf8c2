"""``nmfx.save`` / ``nmfx.load``: inference models as safetensors (no pickle) with a validated, checksummed header.

The file holds the inference model's ``state_dict`` (packed ``*_values`` / ``*_indices`` buffers in place
of the sparsified dense weights; everything else as is; tied tensors once) and, in the safetensors
metadata under ``"nmfx"``, a JSON header (format 2)::

    {"format_version": 2, "pattern": "1:8", "method": {...}, "checksum": "crc32",
     "layers": [{"weight": "h.0.mlp.c_fc.weight", "shape": [768, 3072], "transposed": true,
                 "pattern": "1:8", "kind": "nm_linear", "scope": "h.0.mlp"}, ...],
     "tensors": {"<name>": {"dtype": "float16", "shape": [...], "crc32": "1c291ca3"}, ...}}

A model sparsified with per-layer patterns is written as format 3: ``"pattern"`` holds the config's
``[[glob, "N:M"], ...]`` entries and each layer's own ``"pattern"`` is what its tensors are checked against.

``load(path, model)`` treats the file as untrusted. Before the model passed in is touched it checks
the type of every header field (``ValueError`` naming the field), the format version, that the file's
tensors are exactly the header's with exactly its dtypes and shapes, every tensor's CRC-32, that every
packed layer's ``values`` / ``indices`` have exactly the shape and dtype its weight shape and pattern
imply, and that every stored in-group position is ``< M`` (one vectorised decode per layer; only
patterns whose M is not a power of two can hold invalid codes). It then rebuilds the inference model
on a *staging copy* of ``model`` (``nmfx.sparsify`` + a structure-only ``nmfx.to_inference``), checks
that the set of tensors the copy needs equals the file's, name by name and shape by shape (and that
the floating-point tensors a torch.nn / nmfx layer holds in one dtype are stored in one dtype), fills it,
checks that no tensor is left on the meta device, and only then moves the result into ``model``: the
same object comes back, its own hooks and submodule objects kept. Any refusal leaves ``model``
exactly as it was. The copy's structure is rebuilt on the meta device (``sparsify`` and a structure-only
lowering compute nothing); then only the inference model's tensors are allocated, on the CPU, filled from
the file one tensor at a time, and moved to the device ``model``'s tensors are on (the CPU for a meta
model): the dense weights of the packed layers are never allocated. ``backend="semi_structured"`` is refused: it
needs the dense weights, which files do not hold.

Meta-device models: parameters and persistent buffers come from the file; non-persistent buffers
(RoPE ``inv_freq``, BERT ``position_ids``...) are not in files, so a buffer still on the meta device
is taken from a construction of the same transformers config with its parameters on the meta device
(what ``accelerate.init_empty_weights()`` does, so it costs no weight memory). Another model with a
non-persistent buffer on the meta device is refused, naming the buffer: build it with
``accelerate.init_empty_weights()`` (buffers stay real) or on a real device.

Checksums are CRC-32 (``zlib.crc32``; about 0.3 s per GiB on one core of a shared AMD EPYC): they detect corrupted or
truncated data, not deliberate tampering; the checks above are what make a hostile file safe to load.
Format-1 files (no checksums) are still read, with a warning that corruption cannot be detected.
"""

from __future__ import annotations

import contextlib
import copy
import json
import os
import re
import sys
import warnings
import zlib
from dataclasses import dataclass
from typing import Any, Iterator, Optional, Union

import torch
from torch import nn

from nmfx.config import literal_glob

__all__ = ["save", "load", "FILE_FORMAT_VERSION", "PER_LAYER_FORMAT_VERSION"]

#: Version written by :func:`save` for a single-pattern model; :func:`load` reads versions 1 (no checksums,
#: with a warning), 2 and 3.
FILE_FORMAT_VERSION = 2
#: Format of files whose layers have their own patterns (header ``pattern``: ``[[glob, "N:M"], ...]``);
#: a single-pattern model is still written as format 2, which older nmfx reads.
PER_LAYER_FORMAT_VERSION = 3
_KEY = "nmfx"
_CHECKSUM = "crc32"
_VALUES, _INDICES = "_values", "_indices"
_PACKED_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
_DTYPES = {str(d).removeprefix("torch."): d for d in (
    torch.float64, torch.float32, torch.float16, torch.bfloat16, torch.int64, torch.int32, torch.int16, torch.int8,
    torch.uint8, torch.bool, getattr(torch, "float8_e4m3fn", None), getattr(torch, "float8_e5m2", None)) if d is not None}
_HEX8 = re.compile(r"[0-9a-f]{8}")
#: The position check reads a packed index tensor in row chunks of about this many bytes of temporaries.
_DECODE_BYTES = 1 << 24


def save(model: nn.Module, path: Union[str, os.PathLike]) -> None:
    """Write an inference model (``nmfx.to_inference``) to ``path`` as safetensors + a checksummed nmfx header."""
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
    tensors = {name: t.detach().contiguous().cpu() for name, t in _unique_tensors(model).items()}
    header = {
        "format_version": PER_LAYER_FORMAT_VERSION if found.config.per_layer else FILE_FORMAT_VERSION,
        "pattern": found.config.pattern_value(),
        "method": found.method.to_dict(),
        "checksum": _CHECKSUM,
        "layers": layers,
        "tensors": {name: {"dtype": _dtype_name(t.dtype), "shape": list(t.shape), "crc32": _crc32(t)}
                    for name, t in tensors.items()},
    }
    save_file(tensors, os.fspath(path), metadata={_KEY: json.dumps(header)})


def load(path: Union[str, os.PathLike], model: nn.Module, backend: str = "auto") -> nn.Module:
    """Rebuild the inference model saved at ``path`` from a fresh dense ``model`` of the same architecture
    (built on the meta device if you like); returns ``model`` itself, now the inference model, in eval mode.

    Raises ``ValueError`` (the file is malformed, corrupted, or does not fit ``model``) or
    ``FileNotFoundError``, and then ``model`` is exactly as it was. See the module docstring for what is
    checked. Format-1 files, which have no checksums, load with a ``UserWarning``.
    """
    from nmfx.api import is_sparsified, states
    from nmfx.inference import LOWERING_BACKENDS, check_backend_runs, packed_layers

    where = os.fspath(path)
    if not isinstance(model, nn.Module):
        raise TypeError(f"nmfx.load expects a torch.nn.Module to load into, got {type(model).__name__}")
    if backend not in LOWERING_BACKENDS:
        raise ValueError(f"unknown backend {backend!r}; valid backends: {', '.join(LOWERING_BACKENDS)}")
    if backend == "semi_structured":
        raise ValueError("files hold packed nm_linear layers; semi-structured 2:4 tensors are made from dense weights "
                         "by nmfx.to_inference: load with backend='auto' (Triton on CUDA, C++ on the CPU)")
    if is_sparsified(model) or states(model):
        raise ValueError("nmfx.load rebuilds the inference model from a freshly built dense model; this one is "
                         "already sparsified by nmfx: build a fresh one (on the meta device, if you like)")
    header = _parse_header(_read_metadata(where), where)
    _check_layout(where, header)
    device = _target_device(model)

    # The structure is rebuilt on the meta device (sparsify and a structure-only to_inference compute
    # nothing), then only the inference model's tensors are allocated, on the CPU, and the result moved to
    # the model's device: the dense weights of the layers that are packed are never allocated.
    check_backend_runs({device}, backend)
    weights = [layer.weight for layer in header.layers]
    pattern = str(header.pattern) if header.pattern is not None else (
        {literal_glob(layer.weight): str(layer.pattern) for layer in header.layers} or "1:1")
    staged, memo = rebuild_sparsified(model, pattern, weights)
    allocate_inference(staged, backend)
    targets = _unique_tensors(staged)
    _check_fit(where, header, {layer["weight"]: layer for layer in packed_layers(staged)}, targets)
    _check_module_dtypes(where, header, staged, targets)
    with torch.no_grad():  # one file tensor in memory at a time, each checked before it is copied
        for name, tensor in _checked_tensors(where, header):
            target = targets[name]
            if target.dtype != tensor.dtype:
                target.data = torch.empty_like(target, dtype=tensor.dtype)
            target.copy_(tensor)
    refuse_unfilled(staged, where, "file")
    if device.type != "cpu":
        staged.to(device)
    _install(model, staged.eval(), memo)
    return model


# -- the header ---------------------------------------------------------------------------------

@dataclass(frozen=True)
class _Layer:
    weight: str
    out_features: int
    in_features: int
    pattern: Any  # nmfx.pattern.Pattern


@dataclass(frozen=True)
class _Tensor:
    dtype: torch.dtype
    shape: tuple[int, ...]
    crc32: Optional[str]


@dataclass(frozen=True)
class _Header:
    version: int
    pattern: Any  # the file's nmfx.pattern.Pattern; None when each layer has its own (format 3)
    layers: tuple[_Layer, ...]
    tensors: dict[str, _Tensor]


def _read_metadata(where: str) -> str:
    from safetensors import safe_open

    if not os.path.exists(where):
        raise FileNotFoundError(f"no nmfx model file at {where}")
    try:
        with safe_open(where, framework="pt") as f:
            metadata = f.metadata() or {}
    except Exception as error:
        raise ValueError(f"{where} is not a readable safetensors file (truncated or corrupted?): "
                         f"{type(error).__name__}: {error}") from error
    if _KEY not in metadata:
        raise ValueError(f"{where} has no nmfx header: it was not written by nmfx.save")
    return metadata[_KEY]


class _HeaderError(ValueError):
    pass


def _fail(field: str, problem: str):
    raise _HeaderError(f"header field `{field}` {problem}")


def _require(obj: dict, key: str, kind, field: str, what: str):
    if key not in obj:
        _fail(field, "is missing")
    value = obj[key]
    if kind is int:
        ok = type(value) is int  # not bool
    else:
        ok = isinstance(value, kind)
    if not ok:
        _fail(field, f"must be {what}, got {_kind(value)}")
    return value


def _kind(value) -> str:
    return {dict: "a JSON object", list: "a JSON list", str: "a string", bool: "a boolean", int: "an integer",
            float: "a number", type(None): "null"}.get(type(value), type(value).__name__)


def _shape(value, field: str, positive: bool = False) -> tuple[int, ...]:
    if not isinstance(value, list) or not all(type(s) is int and (s > 0 if positive else s >= 0) for s in value):
        _fail(field, f"must be a list of {'positive' if positive else 'non-negative'} integers, got {value!r}"[:300])
    return tuple(value)


def _parse_header(text: str, where: str) -> _Header:
    try:
        raw = json.loads(text)
    except (json.JSONDecodeError, RecursionError) as error:
        raise ValueError(f"{where}: the nmfx header is not valid JSON ({error}); the file is corrupted") from error
    try:
        return _validate_header(raw, where)
    except _HeaderError as error:
        raise ValueError(f"{where}: {error}; the file is corrupted or was not written by nmfx.save, and nothing "
                         "was loaded") from None


def _validate_header(raw, where: str) -> _Header:
    from nmfx.packed import MAX_PACKED_M, index_bits
    from nmfx.pattern import Pattern

    if not isinstance(raw, dict):
        raise _HeaderError(f"the nmfx header must be a JSON object, got {_kind(raw)}")
    version = _require(raw, "format_version", int, "format_version", "an integer")
    if version > PER_LAYER_FORMAT_VERSION:
        raise ValueError(f"{where} uses nmfx file format {version}; this nmfx reads up to {PER_LAYER_FORMAT_VERSION}: "
                         "upgrade nmfx")
    if version < 1:
        _fail("format_version", f"must be 1 or 2 (3 with per-layer patterns), got {version}")

    def pattern_of(value, field):
        try:
            pattern = Pattern.parse(value)
        except (ValueError, TypeError) as error:
            _fail(field, f"is not an N:M pattern ({error})")
        if pattern.m > MAX_PACKED_M:
            _fail(field, f"has M={pattern.m}; the packed format holds M <= {MAX_PACKED_M}")
        return pattern

    if version >= PER_LAYER_FORMAT_VERSION:
        entries = _require(raw, "pattern", list, "pattern", "a list of [glob, 'N:M'] pairs")
        for i, entry in enumerate(entries):
            if not (isinstance(entry, list) and len(entry) == 2 and isinstance(entry[0], str)):
                _fail(f"pattern[{i}]", f"must be a [glob, 'N:M'] pair, got {entry!r}"[:200])
            pattern_of(entry[1], f"pattern[{i}]")
        file_pattern = None  # each layer's own pattern is checked below
    else:
        file_pattern = pattern_of(_require(raw, "pattern", str, "pattern", "a string such as '1:8'"), "pattern")
    _require(raw, "method", dict, "method", "a JSON object")
    if version >= 2 and _require(raw, "checksum", str, "checksum", "a string") != _CHECKSUM:
        _fail("checksum", f"names an unknown algorithm {raw['checksum']!r} (this nmfx verifies {_CHECKSUM!r})")

    tensors: dict[str, _Tensor] = {}
    for name, spec in _require(raw, "tensors", dict, "tensors", "a JSON object of tensor specs").items():
        field = f"tensors[{name!r}]"
        if not isinstance(spec, dict):
            _fail(field, f"must be a JSON object, got {_kind(spec)}")
        dtype_name = _require(spec, "dtype", str, f"{field}.dtype", "a string")
        if dtype_name not in _DTYPES:
            _fail(f"{field}.dtype", f"names no supported dtype: {dtype_name!r}"[:200])
        shape = _shape(_require(spec, "shape", list, f"{field}.shape", "a list"), f"{field}.shape")
        crc = None
        if version >= 2:
            crc = _require(spec, "crc32", str, f"{field}.crc32", "a string")
            if not _HEX8.fullmatch(crc):
                _fail(f"{field}.crc32", f"must be 8 lowercase hex digits, got {crc!r}"[:200])
        tensors[name] = _Tensor(_DTYPES[dtype_name], shape, crc)

    layers = []
    seen = set()
    for i, layer in enumerate(_require(raw, "layers", list, "layers", "a list of layer objects")):
        field = f"layers[{i}]"
        if not isinstance(layer, dict):
            _fail(field, f"must be a JSON object, got {_kind(layer)}")
        weight = _require(layer, "weight", str, f"{field}.weight", "a string")
        if weight in seen:
            _fail(f"{field}.weight", f"repeats {weight!r}")
        seen.add(weight)
        stored = _shape(_require(layer, "shape", list, f"{field}.shape", "a list"), f"{field}.shape", positive=True)
        if len(stored) != 2:
            _fail(f"{field}.shape", f"must have 2 dimensions, got {list(stored)}")
        transposed = _require(layer, "transposed", bool, f"{field}.transposed", "true or false")
        layer_pattern = pattern_of(_require(layer, "pattern", str, f"{field}.pattern", "a string"), f"{field}.pattern")
        if file_pattern is not None and layer_pattern != file_pattern:
            _fail(f"{field}.pattern", f"is {layer_pattern}, not the file's pattern {file_pattern}")
        kind = _require(layer, "kind", str, f"{field}.kind", "a string")
        if kind != "nm_linear":
            _fail(f"{field}.kind", f"must be 'nm_linear' (the only packed kind files hold), got {kind!r}"[:200])
        out_features, in_features = (stored[1], stored[0]) if transposed else stored
        pattern = layer_pattern
        if in_features % pattern.m:
            _fail(f"{field}.shape", f"has {in_features} inputs, not a multiple of M={pattern.m}")
        kept = in_features // pattern.m * pattern.n
        expect = {weight + _VALUES: (None, (out_features, kept)),
                  weight + _INDICES: (torch.uint8, (out_features, (kept * index_bits(pattern.m) + 7) // 8))}
        for name, (dtype, shape) in expect.items():
            if name not in tensors:
                _fail("tensors", f"lacks {name!r}, which packed layer {weight!r} needs")
            got = tensors[name]
            if got.shape != shape:
                _fail(f"tensors[{name!r}].shape", f"is {list(got.shape)}; a {list(stored)} {'transposed ' * transposed}"
                      f"{pattern} weight packs to exactly {list(shape)}")
            if dtype is None and got.dtype not in _PACKED_DTYPES:
                _fail(f"tensors[{name!r}].dtype", f"is {_dtype_name(got.dtype)}; packed values are float32, float16 "
                      "or bfloat16")
            if dtype is not None and got.dtype != dtype:
                _fail(f"tensors[{name!r}].dtype", f"is {_dtype_name(got.dtype)}; packed indices are uint8")
        layers.append(_Layer(weight, out_features, in_features, pattern))
    return _Header(version, file_pattern, tuple(layers), tensors)


# -- the tensors --------------------------------------------------------------------------------

_SAFETENSORS_DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
                       "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
                       "BOOL": torch.bool}


def _check_layout(where: str, header: _Header) -> None:
    """The file's tensor names, dtypes and shapes (read from its index, no data) are the header's."""
    from safetensors import safe_open

    try:
        with safe_open(where, framework="pt") as f:
            names = set(f.keys())
            problems = [f"{name} is in the file but not in its nmfx header" for name in sorted(names - header.tensors.keys())]
            problems += [f"{name} is in the nmfx header but not in the file" for name in sorted(header.tensors.keys() - names)]
            if problems:
                raise ValueError(f"{where} is inconsistent; nothing was loaded:\n  " + "\n  ".join(problems[:20]))
            for name in sorted(names):
                part, spec = f.get_slice(name), header.tensors[name]
                dtype, shape = _SAFETENSORS_DTYPES.get(part.get_dtype()), tuple(part.get_shape())
                if dtype != spec.dtype or shape != spec.shape:
                    raise ValueError(f"{where} is inconsistent: {name} is "
                                     f"{_dtype_name(dtype) if dtype else part.get_dtype()} {list(shape)} in the data but "
                                     f"{_dtype_name(spec.dtype)} {list(spec.shape)} in the nmfx header; nothing was loaded")
    except ValueError:
        raise
    except Exception as error:
        raise ValueError(f"{where} is corrupted or truncated ({type(error).__name__}: {error}); "
                         "nothing was loaded") from error


def _checked_tensors(where: str, header: _Header) -> Iterator[tuple[str, torch.Tensor]]:
    """Every tensor of the file, one at a time (the caller copies each and drops it), each checked against
    the header before it is yielded (exact dtype and shape again, CRC-32, and for packed indices every
    position < M), after :func:`_check_layout`. A failure raises ValueError; the caller has changed only
    its staging copy."""
    from safetensors import safe_open

    if header.version < 2:
        warnings.warn(f"{where} is an nmfx format-{header.version} file without checksums: corrupted tensor data "
                      "cannot be detected; save it again with this nmfx to add them", UserWarning, stacklevel=3)
    indices_of = {layer.weight + _INDICES: layer for layer in header.layers}
    try:
        with safe_open(where, framework="pt") as f:
            names = sorted(f.keys())
            if set(names) != header.tensors.keys():  # the file changed since _check_layout read it
                raise ValueError(f"{where} changed while it was being loaded (its tensor names no longer match its "
                                 "nmfx header); nothing was loaded")
            for name in names:
                tensor, spec = f.get_tensor(name), header.tensors[name]
                if tensor.dtype != spec.dtype or tuple(tensor.shape) != spec.shape:
                    raise ValueError(f"{where} is inconsistent: {name} is {_dtype_name(tensor.dtype)} "
                                     f"{list(tensor.shape)} in the data but {_dtype_name(spec.dtype)} {list(spec.shape)} "
                                     "in the nmfx header; nothing was loaded")
                if spec.crc32 is not None and _crc32(tensor) != spec.crc32:
                    raise ValueError(f"{where} is corrupted: checksum mismatch for {name} (crc32 {_crc32(tensor)}, the "
                                     f"header says {spec.crc32}); nothing was loaded")
                if name in indices_of:
                    _check_positions(where, indices_of[name], tensor)
                yield name, tensor
    except ValueError:
        raise
    except Exception as error:
        raise ValueError(f"{where} is corrupted or truncated ({type(error).__name__}: {error}); "
                         "nothing was loaded") from error


def _check_positions(where: str, layer: _Layer, indices: torch.Tensor) -> None:
    """Refuse stored in-group positions >= M (possible only when M is not a power of two)."""
    from nmfx.packed import index_bits, unpack_positions

    m, bits = layer.pattern.m, index_bits(layer.pattern.m)
    if 1 << bits == m:  # every bits-wide code is a valid position
        return
    kept = layer.in_features // m * layer.pattern.n
    step = max(1, _DECODE_BYTES // max(1, indices.shape[1] * 8))
    for start in range(0, indices.shape[0], step):
        bad = _invalid_rows(indices[start:start + step], bits, kept, m)
        if bool(bad.any()):
            row = start + int(bad.nonzero()[0])
            codes = unpack_positions(indices[row:row + 1], bits, kept)[0]
            k = int((codes >= m).nonzero()[0])
            raise ValueError(f"{where} is corrupted or hostile: {layer.weight}{_INDICES} stores in-group position "
                             f"{int(codes[k])} (row {row}, kept value {k}; {int(bad.sum())} such rows in rows {start}.."
                             f"{start + bad.shape[0] - 1}), but {layer.pattern} positions must be < M={m}; nothing "
                             "was loaded")


def _invalid_rows(indices: torch.Tensor, bits: int, kept: int, m: int) -> torch.Tensor:
    """bool ``[rows]``: the row of bit-packed positions (``nmfx.packed`` layout) holds a code >= ``m``.

    Every ``bits`` bytes of a row hold exactly 8 codes, so a row is read as ``[groups, bits]`` bytes joined
    into one integer per group and each of its 8 codes is shifted out and compared, all vectorised: no
    per-code gather (about 30x faster than decoding with ``unpack_positions``). Pad bits are ignored."""
    rows, nbytes = indices.shape
    groups = -(-nbytes // bits)
    grouped = torch.nn.functional.pad(indices, (0, groups * bits - nbytes)).view(rows, groups, bits)
    dtype = torch.int32 if bits < 4 else torch.int64  # 8 * bits bits per group
    word = grouped[..., 0].to(dtype)
    for i in range(1, bits):
        word |= grouped[..., i].to(dtype) << (8 * i)
    full, tail = divmod(kept, 8)  # group `full` holds only `tail` codes (the rest is padding)
    bad = torch.zeros(rows, groups, dtype=torch.bool)
    for j in range(8):
        hit = ((word >> (j * bits)) & ((1 << bits) - 1)) >= m
        if tail and j >= tail:
            hit[:, full:] = False
        bad |= hit
    return bad.any(dim=1)


def _crc32(tensor: torch.Tensor) -> str:
    data = tensor.detach().contiguous().cpu().reshape(-1).view(torch.uint8).numpy()
    return f"{zlib.crc32(data) & 0xFFFFFFFF:08x}"


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


# -- the model ----------------------------------------------------------------------------------

def _check_fit(where: str, header: _Header, rebuilt: dict[str, dict], targets: dict[str, torch.Tensor]) -> None:
    """The rebuilt model needs exactly the file's packed layers and tensors, with the same shapes and
    compatible dtypes (floating-point tensors take the file's precision; others must match exactly)."""
    saved = {layer.weight: layer for layer in header.layers}
    problems = [f"packed layer {w} is in the file but the rebuilt model does not sparsify it"
                for w in sorted(saved.keys() - rebuilt.keys())]
    problems += [f"packed layer {w} is in the rebuilt model but not in the file" for w in sorted(rebuilt.keys() - saved.keys())]
    for weight in sorted(saved.keys() & rebuilt.keys()):
        shape = rebuilt[weight]["shape"]
        out_features, in_features = (shape[1], shape[0]) if rebuilt[weight]["transposed"] else shape
        layer = saved[weight]
        if (layer.out_features, layer.in_features) != (out_features, in_features):
            problems.append(f"packed layer {weight}: [out, in] = {[layer.out_features, layer.in_features]} in the "
                            f"file vs {[out_features, in_features]} in the model")
    for name, spec in header.tensors.items():
        target = targets.get(name)
        if target is None:
            problems.append(f"{name} is in the file but not in the model")
        elif tuple(target.shape) != spec.shape:
            problems.append(f"{name}: shape {list(spec.shape)} in the file vs {list(target.shape)} in the model")
        elif target.dtype != spec.dtype and not (target.dtype.is_floating_point and spec.dtype.is_floating_point):
            problems.append(f"{name}: dtype {_dtype_name(spec.dtype)} in the file vs {_dtype_name(target.dtype)} in "
                            "the model")
    problems += [f"{name} is in the model but not in the file" for name in sorted(targets.keys() - header.tensors.keys())]
    if problems:
        raise ValueError(f"{where} does not fit this model; nothing was loaded:\n  " + "\n  ".join(problems[:20])
                         + (f"\n  ... and {len(problems) - 20} more" if len(problems) > 20 else ""))


def _check_module_dtypes(where: str, header: _Header, staged: nn.Module, targets: dict[str, torch.Tensor]) -> None:
    """Floating-point tensors take the file's precision, but as one cast per layer: tensors a ``torch.nn`` or
    nmfx layer (whose forward combines them in one op, e.g. ``F.linear(x, weight, bias)``) holds in one
    floating-point dtype must be stored in one dtype, else its forward fails on mixed dtypes (a float16 bias
    beside a float32 weight). A model's own modules may mix dtypes on purpose and cast in their forward
    (``transformers`` keeps some parameters in float32 beside bfloat16 ones): theirs load as stored."""
    name_of = {id(t): name for name, t in targets.items()}
    for path, module in staged.named_modules():
        if not (type(module).forward.__module__ or "").startswith(("torch.nn.modules.", "nmfx.")):  # fx: None
            continue
        stored: dict[torch.dtype, dict[torch.dtype, str]] = {}  # the model's dtype -> {the file's dtype: a tensor}
        for t in list(module._parameters.values()) + list(module._buffers.values()):
            name = name_of.get(id(t)) if t is not None else None
            if name is not None and t.dtype.is_floating_point:
                stored.setdefault(t.dtype, {}).setdefault(header.tensors[name].dtype, name)
        for own, found in stored.items():
            if len(found) > 1:
                listed = ", ".join(f"{name} as {_dtype_name(dtype)}" for dtype, name in found.items())
                raise ValueError(f"{where} stores the {_dtype_name(own)} tensors of {path or 'the model'} "
                                 f"({type(module).__name__}) in different dtypes ({listed}): that module's forward "
                                 "would fail on mixed dtypes; nothing was loaded. The file was altered, or its model was built "
                                 "with these dtypes: build this model the same way")


def _target_device(model: nn.Module) -> torch.device:
    devices = {t.device for t in _all_tensors(model) if not t.is_meta}
    if len(devices) > 1:
        raise ValueError(f"nmfx.load rebuilds the model on one device, but this one spans "
                         f"{sorted(str(d) for d in devices)}: build it on one device (or on meta) and move it after")
    return devices.pop() if devices else torch.device("cpu")


def _all_tensors(model: nn.Module):
    for module in model.modules():
        yield from (t for t in module._parameters.values() if t is not None)
        yield from (t for t in module._buffers.values() if t is not None)


def rebuild_sparsified(model: nn.Module, pattern: Any, weights: list[str]) -> tuple[nn.Module, dict]:
    """The first half of rebuilding an inference model from a fresh dense ``model`` (``nmfx.load``,
    ``nmfx.to_inference_from_checkpoint``): a staging copy (parameters on meta, non-persistent buffers real)
    sparsified with ``pattern`` on exactly ``weights``; nothing is computed, the masks are never needed.
    Returns the copy and its deepcopy memo (for :func:`_install`)."""
    import nmfx

    staged, memo = _staging_copy(model)
    _restore_non_persistent(staged, model)
    with _quiet():
        nmfx.sparsify(staged, pattern, "ste", include=[literal_glob(weight) for weight in weights] or ["<none>"])
    return staged, memo


def allocate_inference(staged: nn.Module, backend: str, dtype: Optional[torch.dtype] = None) -> None:
    """The second half: lower ``staged`` structure-only (on meta: nothing is packed) and allocate the inference
    model's own tensors, uninitialised, on the CPU; the dense weights of the packed layers never are."""
    from nmfx.inference import to_inference

    to_inference(staged, backend=backend, inplace=True, dtype=dtype, _structure_only=True)
    _materialize(staged)
    staged.to("cpu")


def refuse_unfilled(staged: nn.Module, where: str, source: str) -> None:
    """ValueError naming the first tensor of the rebuilt ``staged`` that nothing in ``source`` filled."""
    left = _meta_tensors(staged)
    if left:
        raise ValueError(f"{where}: {left[0]} is still on the meta device after loading (nothing in the {source} fills "
                         "it); nothing was loaded: build the model on a real device or with "
                         "accelerate.init_empty_weights()")


def _staging_copy(model: nn.Module) -> tuple[nn.Module, dict]:
    """A deep copy of ``model`` whose parameters and persistent buffers are meta placeholders (the file
    replaces them; so the copy costs no weight memory); non-persistent buffers and the rest are copied.
    Returns the copy and the deepcopy memo (``id(original object) -> its copy``)."""
    memo: dict[int, Any] = {}
    for module in model.modules():
        for t in module._parameters.values():
            if t is not None and id(t) not in memo:
                memo[id(t)] = nn.Parameter(torch.empty_like(t, device="meta"), requires_grad=t.requires_grad)
        for name, t in module._buffers.items():
            if t is not None and name not in module._non_persistent_buffers_set and id(t) not in memo:
                memo[id(t)] = torch.empty_like(t, device="meta")
    try:
        staged = copy.deepcopy(model, memo)
    except Exception as error:
        raise TypeError(f"nmfx.load rebuilds on a copy of the model (so a refused file changes nothing) and could "
                        f"not copy this {type(model).__name__}: {type(error).__name__}: {error}") from error
    return staged, memo


def _meta_tensors(model: nn.Module, non_persistent_only: bool = False) -> list[str]:
    """Qualified names of buffers (non-persistent only, if asked), parameters and tensor attributes on meta."""
    found = []
    for path, module in model.named_modules(remove_duplicate=False):
        prefix = f"{path}." if path else ""
        named = [(n, t) for n, t in module._buffers.items()
                 if not non_persistent_only or n in module._non_persistent_buffers_set]
        if not non_persistent_only:
            named += list(module._parameters.items())
        named += [(n, t) for n, t in vars(module).items() if isinstance(t, torch.Tensor)]
        found += [prefix + n for n, t in named if isinstance(t, torch.Tensor) and t.is_meta]
    return list(dict.fromkeys(found))


def _restore_non_persistent(staged: nn.Module, model: nn.Module) -> None:
    """Give every non-persistent buffer / tensor attribute of ``staged`` that is on the meta device its real
    value, from a construction of the same transformers config with parameters on meta; refuse otherwise."""
    missing = _meta_tensors(staged, non_persistent_only=True)
    if not missing:
        return
    reference, why = _reference_model(model)
    problems = []
    for name in missing:
        path, _, attr = name.rpartition(".")
        module = staged.get_submodule(path)
        want = getattr(module, attr)
        try:
            value = getattr(reference.get_submodule(path), attr) if reference is not None else None
        except AttributeError:
            value = None
        if not isinstance(value, torch.Tensor) or value.is_meta or value.shape != want.shape or value.dtype != want.dtype:
            problems.append(name)
            continue
        if attr in module._buffers:
            module._buffers[attr] = value
        else:
            object.__setattr__(module, attr, value)
    if problems:
        raise ValueError(f"{', '.join(problems[:5])} {'is a' if len(problems) == 1 else 'are'} non-persistent "
                         f"buffer(s) on the meta device: files do not hold them and nmfx cannot recompute them "
                         f"({why}); nothing was loaded. Build the model with its buffers real: "
                         "`with accelerate.init_empty_weights(): model = ...` (parameters on meta, buffers real) "
                         "or on a real device")


def _reference_model(model: nn.Module) -> tuple[Optional[nn.Module], str]:
    transformers = sys.modules.get("transformers")
    if transformers is None or not isinstance(model, transformers.PreTrainedModel):
        return None, f"{type(model).__name__} is not a transformers model that can be rebuilt from its config"
    try:
        with torch.device("cpu"), _parameters_on_meta(), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return type(model)(copy.deepcopy(model.config)), ""
    except Exception as error:  # a custom constructor may need more than its config; then refuse below
        return None, f"building {type(model).__name__} from its config failed: {type(error).__name__}: {error}"


@contextlib.contextmanager
def _parameters_on_meta():
    """Build modules with parameters on the meta device and buffers real (``accelerate.init_empty_weights()``'s
    default, without the dependency)."""
    register = nn.Module.register_parameter

    def register_on_meta(module: nn.Module, name: str, param) -> None:
        register(module, name, param)
        if param is not None and not param.is_meta:
            module._parameters[name] = nn.Parameter(param.to("meta"), requires_grad=param.requires_grad)

    nn.Module.register_parameter = register_on_meta
    try:
        yield
    finally:
        nn.Module.register_parameter = register


def _materialize(model: nn.Module) -> None:
    """Replace every meta parameter / buffer by an empty CPU tensor, keeping ties."""
    fresh: dict[int, torch.Tensor] = {}
    replaced = []  # keeps the meta tensors alive, so their ids stay unique during the walk
    for module in model.modules():
        for store in (module._parameters, module._buffers):
            for name, t in list(store.items()):
                if t is None or not t.is_meta:
                    continue
                if id(t) not in fresh:
                    empty = torch.empty_like(t, device="cpu")
                    fresh[id(t)] = nn.Parameter(empty, requires_grad=t.requires_grad) if isinstance(t, nn.Parameter) else empty
                    replaced.append(t)
                store[name] = fresh[id(t)]


_MODULE_STATE = ("_parameters", "_buffers", "_modules", "_non_persistent_buffers_set")
_HOOK_DICTS = tuple(k for k, v in vars(nn.Module()).items() if "hook" in k and isinstance(v, dict))


def _install(model: nn.Module, staged: nn.Module, memo: dict) -> None:
    """Move the rebuilt ``staged`` copy into ``model`` and the original submodule objects: each original
    module takes its copy's parameters, buffers, children (mapped back to the originals), class and changed
    attributes, and keeps its own hook dicts (hooks the rebuild added are merged in) and unchanged
    attributes (so ``model.config`` stays the user's object)."""
    original_of = {id(memo[id(module)]): module for module in model.modules() if id(module) in memo}

    def back(value):
        return original_of.get(id(value), value) if isinstance(value, nn.Module) else value

    pairs = [(original_of.get(id(s)), s) for s in staged.modules()]
    for original, copied in pairs:
        children = type(copied._modules)((name, back(child)) for name, child in copied._modules.items())
        if original is None:  # a module the rebuild created (GraphModule, ...)
            copied._modules = children
            continue
        state = {}
        for key, value in vars(copied).items():
            if key in _HOOK_DICTS and isinstance(vars(original).get(key), dict):
                hooks = vars(original)[key]
                for hook_id, hook in value.items():
                    hooks.setdefault(hook_id, hook)
                state[key] = hooks
            elif key in _MODULE_STATE or key not in vars(original):
                state[key] = back(value)
            else:
                before = vars(original)[key]
                state[key] = before if before is value or memo.get(id(before)) is value else back(value)
        state["_modules"] = children
        vars(original).clear()
        vars(original).update(state)
        if type(original) is not type(copied):
            original.__class__ = type(copied)


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
        self._catcher = warnings.catch_warnings()
        self._catcher.__enter__()
        warnings.filterwarnings("ignore", message="nmfx.sparsify")

    def __exit__(self, *exc):
        return self._catcher.__exit__(*exc)
