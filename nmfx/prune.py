"""``nmfx.prune``: one-shot N:M pruning of a trained model from calibration data.

Criteria (the N:M mask of every weight keeps ``N`` of each group of ``M`` along the input dimension):

* ``"magnitude"``: the largest ``|W_ij|`` (no calibration needed).
* ``"wanda"`` (Sun et al. 2023, "A Simple and Effective Pruning Approach for LLMs"): the largest
  ``|W_ij| * ||X_j||_2``, ``X_j`` the layer's input column ``j`` over every calibration token. The norms
  of all layers come from one pass of the unpruned model (the reference code feeds each block the
  outputs of the already-pruned blocks before it; here only SparseGPT does that).
* ``"sparsegpt"`` (Frantar & Alistarh 2023, "SparseGPT"): the mask is chosen column block by column
  block with the OBS saliency ``w^2 / [H^-1]_jj`` (``H = X^T X``), and every pruned weight's error is
  compensated in the not-yet-processed weights of its row through the Cholesky factor of ``H^-1``.
  Layers are processed one at a time in forward order, each with inputs computed by the already-pruned
  earlier layers; only one layer's ``H`` is held at a time.

The statistics are collected on the rewritten graph: a shadow copy of the module tree that shares the
model's tensors is sparsified (``nmfx.sparsify``, the same config), its masked ops run dense (alpha = 1),
and a ``TorchFunctionMode`` reads the input of every ``nmfx::masked_linear`` call, which it attributes to
a weight by the call's mask buffer. So every op that ``sparsify`` rewrites is calibrated, however the
model calls it (``nn.Linear``, ``Conv1D``, ``F.linear`` in a parent's forward); a weight that reaches
its op only as a weight (``nmfx::masked_weight``, e.g. ``nn.MultiheadAttention``'s ``in_proj_weight``)
has no visible input and is refused by ``"wanda"`` / ``"sparsegpt"``, with the fix. Then the shadow is
dropped, the model is sparsified in place with ``nmfx.sparsify(model, pattern, method)``, the pruned
weights are set to zero (SparseGPT also updates the kept ones) and the masks are the chosen ones.

Memory beyond the model: the calibration batches, two bool masks per pruned weight (the chosen one, and
the shadow's state, then the model's), one layer's float32 weight copies and, for SparseGPT, one layer's
``H`` and its Cholesky factors. SparseGPT writes each layer as it goes (the later layers' Hessians need it pruned), so that a
refusal half-way can restore the model it keeps the original of every layer written, on the CPU;
magnitude and Wanda write nothing before the last step that can fail and keep no copy.

How masks evolve afterwards: the pruned weights are exactly zero, so the effective weights are the
dense weights and a mask recomputed from ``|W|`` reproduces the chosen one (up to ties between zeros,
which leave the effective weights unchanged). ``method="ste"`` (the default) is a finished schedule
(alpha = 0, target pattern), so ``nmfx.to_inference`` lowers the result without ``force``. Fine-tuning
with a method that recomputes masks from ``|W|`` (``ste``, ``srste``, ``mdgf``: every ``mask_interval``
steps) starts from the pruned masks and lets pruned weights grow back where their straight-through
gradients push them; SR-STE decays them toward zero; MDGF (alpha from 1 to 0) starts from the pruned
model's forward exactly, since the pruned weights are zero. For a mask that never changes, fine-tune
with ``method="ste", total_steps=T, fine_tune_steps=T`` (a frozen-mask phase over the whole run).
To fine-tune with another method after pruning with ``ste``: ``nmfx.to_dense`` then ``nmfx.sparsify``.
"""

from __future__ import annotations

import copy
import gc
import itertools
import math
import sys
import warnings
from typing import Any, Iterable, Mapping, Optional, Sequence, Union

import torch
from torch import Tensor, nn
from torch.overrides import TorchFunctionMode

from nmfx.api import record, sparsify, states
from nmfx.config import SparsifyConfig
from nmfx.methods import Method
from nmfx.pattern import Pattern, PatternLike, nm_mask

__all__ = ["prune", "CRITERIA", "sparsegpt_prune", "wanda_mask"]

CRITERIA = ("magnitude", "wanda", "sparsegpt")

#: SparseGPT's defaults (Frantar & Alistarh 2023): dampening as a fraction of the mean diagonal of H,
#: and the width of the column blocks whose error is propagated lazily.
DEFAULT_PERCDAMP = 0.01
DEFAULT_BLOCKSIZE = 128
#: When the damped Hessian is not positive definite, the dampening is multiplied by 10 up to this.
_MAX_PERCDAMP = 10.0


class _StopForward(BaseException):
    """Raised by a hook to end a calibration forward once the layer of interest has seen its input (a
    BaseException, so that a model's own ``except Exception`` does not swallow it)."""


def prune(
    model: nn.Module,
    pattern: Union[PatternLike, Mapping[str, PatternLike]] = "2:4",
    calibration: Any = None,
    criterion: str = "magnitude",
    *,
    method: Union[str, Method] = "ste",
    include: Optional[Union[str, Sequence[str]]] = None,
    exclude: Optional[Union[str, Sequence[str]]] = None,
    example_inputs: Any = None,
    percdamp: Optional[float] = None,
    blocksize: Optional[int] = None,
    progress: Optional[bool] = None,
    **method_options: Any,
) -> nn.Module:
    """Prune ``model`` one-shot to ``pattern`` and return it sparsified **in place** (as ``nmfx.sparsify``).

    Args:
        model: a trained, not yet sparsified model.
        pattern: the N:M pattern, e.g. ``"2:4"``, ``"1:8"``, or per layer ``{glob: pattern}`` as for
            ``nmfx.sparsify`` (first match wins; unmatched weights stay dense).
        calibration: the calibration inputs, run through ``model`` as they are (moved to the model's
            device): an iterable (a list, a ``DataLoader``) of batches, each a tuple of positional
            arguments, a dict of keyword arguments or a single tensor; a lone tensor or dict is one
            batch. Required by ``"wanda"`` and ``"sparsegpt"``; optional for ``"magnitude"`` (then only
            checked).
        criterion: ``"magnitude"``, ``"wanda"`` or ``"sparsegpt"``.
        method: the method of the returned model (``"ste"``: a finished schedule; any other to fine-tune
            with it, with ``**method_options`` such as ``total_steps``).
        include, exclude, example_inputs: as for ``nmfx.sparsify`` (which weights are pruned).
        percdamp: SparseGPT dampening, a fraction of the mean diagonal of ``H`` (default 0.01).
        blocksize: SparseGPT column block width, a multiple of every ``M`` (default 128, or ``M`` if larger,
            per layer).
        progress: show a progress bar over layers (tqdm; default: when stderr is a terminal).

    Raises:
        ValueError: bad calibration data (empty, not batches, non-finite values, a forward that fails
            or produces non-finite activations), a selected weight whose input the criterion cannot see
            (it never ran, or its consumer takes the weight itself), or options that do not fit. The model
            is then left exactly as it was.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"nmfx.prune expects a torch.nn.Module, got {type(model).__name__}")
    if criterion not in CRITERIA:
        raise ValueError(f"unknown criterion {criterion!r}; valid criteria: {', '.join(CRITERIA)}")
    config = SparsifyConfig.build(pattern, method, include=include, exclude=exclude, **method_options)
    if criterion != "sparsegpt" and (percdamp is not None or blocksize is not None):
        raise ValueError(f"percdamp= and blocksize= are SparseGPT options; criterion={criterion!r} takes neither")
    percdamp = DEFAULT_PERCDAMP if percdamp is None else percdamp
    if isinstance(percdamp, bool) or not isinstance(percdamp, (int, float)) or not 0 <= percdamp < _MAX_PERCDAMP:
        raise ValueError(f"percdamp must be a number in [0, {_MAX_PERCDAMP}), got {percdamp!r}")
    for target in config.patterns:
        _blocksize(blocksize, target)  # checked against every pattern before any work
    if calibration is None and criterion != "magnitude":
        raise ValueError(f"criterion={criterion!r} needs calibration data: pass calibration=<batches of model inputs> "
                         "(e.g. a few hundred sequences of training text), or use criterion='magnitude'")
    batches = None if calibration is None else _batches(calibration, _device(model))

    shadow, plan = _shadow(model, config, example_inputs)
    layers = {name: _Layer.of(model, name, dim) for name, (dim, _) in plan.items()}
    backups: dict[str, Tensor] = {}  # SparseGPT's pruned layers, as they were (on the CPU)
    bar = None
    try:
        order, once = (_check_pass(shadow, batches, layers, criterion) if batches
                       else (list(layers), dict.fromkeys(layers, False)))
        bar = _progress(order, progress, f"nmfx.prune ({criterion}, {config.describe_pattern()})")
        masks: dict[str, Tensor] = {}
        with torch.no_grad():
            for name in bar:
                layer, pattern = layers[name], plan[name][1]
                weight = layer.matrix()  # [out, in] float32 copy
                if criterion == "magnitude":
                    masks[name] = nm_mask(weight, pattern)
                elif criterion == "wanda":
                    masks[name] = wanda_mask(weight, layer.column_sq, pattern)
                else:  # sequential: the next layers' Hessians need this one pruned, so it is written now
                    hessian = _hessian(shadow, batches, layer, stop_early=once[name])
                    new, masks[name] = sparsegpt_prune(weight, hessian, pattern, percdamp=percdamp,
                                                       blocksize=_blocksize(blocksize, pattern), name=name,
                                                       overwrite_hessian=True)
                    del hessian
                    backups[name] = layer.param.detach().to("cpu", copy=True)
                    layer.write(new)
                del weight
        bar.close()
        del shadow  # its masks: free them before sparsify allocates the model's; a rewritten module tree
        gc.collect()  # holds reference cycles, so dropping the last reference alone frees nothing
        sparsify(model, config, example_inputs=example_inputs)
    except BaseException:
        if bar is not None:
            bar.close()
        with torch.no_grad():
            for name, original in backups.items():
                layers[name].param.copy_(original)
        raise
    # Nothing refuses from here on: magnitude / Wanda write their pruned weights only now, so a refusal
    # above never had to undo them (and no copy of the dense weights was kept).
    found = states(model)
    with torch.no_grad():
        for name, keep in masks.items():
            layer, state = layers[name], found[name]
            if criterion != "sparsegpt":
                layer.write(layer.matrix().masked_fill_(~keep, 0.0))
            state.restart(layer.param)  # the state as sparsify builds it from the pruned weights
            if state.schedule.pattern == state.pattern:  # e.g. SDGF starts from a denser pattern: keep its own mask
                state.mask.copy_(keep if state.dim == 1 else keep.T)
    return model


def wanda_mask(weight: Tensor, column_sq: Tensor, pattern: PatternLike) -> Tensor:
    """Wanda's N:M mask of an ``[out, in]`` weight: the top-N of ``|W_ij| * sqrt(column_sq_j)`` in every
    group of M along the input (``column_sq_j = sum over tokens of X_tj^2``); ties go to the lower index."""
    score = weight.abs().float() * column_sq.float().sqrt().unsqueeze(0)
    return nm_mask(score, pattern, dim=1)


def sparsegpt_prune(weight: Tensor, hessian: Tensor, pattern: PatternLike, *, percdamp: float = DEFAULT_PERCDAMP,
                    blocksize: int = DEFAULT_BLOCKSIZE, name: str = "weight",
                    overwrite_hessian: bool = False) -> tuple[Tensor, Tensor]:
    """SparseGPT on one ``[out, in]`` weight with ``hessian = X^T X`` (``[in, in]``): (new weight, N:M mask).
    ``overwrite_hessian=True`` uses a float32 ``hessian`` as scratch space (saves one ``[in, in]`` copy).

    Computed in float32. Inputs that never fire (``H_jj == 0``) get ``H_jj = 1`` and their weights are
    zeroed (they contribute nothing). ``percdamp * mean(diag H)`` is added to the diagonal; when that is
    not enough for a Cholesky factorization, the dampening is raised tenfold (with a warning) up to
    ``percdamp = 10``, then a ValueError.
    """
    pattern = Pattern.parse(pattern)
    n, m = pattern.n, pattern.m
    W = weight.detach().float().clone()
    rows, cols = W.shape
    if cols % m or blocksize % m:
        raise ValueError(f"{name}: input dim {cols} and blocksize {blocksize} must be multiples of M={m}")
    if tuple(hessian.shape) != (cols, cols):
        raise ValueError(f"{name}: the Hessian has shape {tuple(hessian.shape)}, expected {(cols, cols)}")
    H = hessian.detach() if overwrite_hessian and hessian.dtype == torch.float32 else hessian.detach().float().clone()
    dead = H.diagonal() == 0
    H.diagonal()[dead] = 1.0
    W[:, dead] = 0.0
    U = _inverse_cholesky(H, percdamp, name)  # upper factor of H^-1: U^T U = H^-1
    del H
    keep = torch.zeros(rows, cols, dtype=torch.bool, device=W.device)
    for start in range(0, cols, blocksize):
        end = min(start + blocksize, cols)
        block = W[:, start:end].clone()
        factor = U[start:end, start:end]
        errors = torch.zeros_like(block)
        for j in range(end - start):
            if j % m == 0:  # choose this group's N survivors with the weights as updated so far
                saliency = block[:, j:j + m].square() / factor.diagonal()[j:j + m].square().unsqueeze(0)
                keep[:, start + j:start + j + m] = nm_mask(saliency, pattern, dim=1)
            column = block[:, j]
            kept = torch.where(keep[:, start + j], column, torch.zeros_like(column))
            error = (column - kept) / factor[j, j]
            block[:, j:].sub_(error.unsqueeze(1) * factor[j, j:].unsqueeze(0))
            block[:, j] = kept
            errors[:, j] = error
        W[:, start:end] = block
        W[:, end:].sub_(errors @ U[start:end, end:])
    if not torch.isfinite(W).all():
        raise ValueError(f"{name}: SparseGPT produced non-finite weights (an ill-conditioned Hessian?); "
                         "raise percdamp= or use criterion='wanda'")
    return W.masked_fill_(~keep, 0.0), keep


# -- layers -------------------------------------------------------------------------------------------

class _Layer:
    """One weight to prune: the parameter, and how its matrix is oriented (``dim``: the input dimension)."""

    def __init__(self, name: str, param: nn.Parameter, dim: int) -> None:
        self.name, self.param, self.dim = name, param, dim
        self.column_sq: Optional[Tensor] = None

    @classmethod
    def of(cls, model: nn.Module, name: str, dim: int) -> "_Layer":
        param = model.get_parameter(name)
        if param.dim() != 2:
            raise ValueError(f"nmfx.prune handles 2-D weights; {name} has shape {tuple(param.shape)}")
        return cls(name, param, dim)

    @property
    def in_features(self) -> int:
        return self.param.shape[self.dim]

    def matrix(self) -> Tensor:
        """The weight as a float32 ``[out, in]`` copy."""
        w = self.param.detach().float()
        return (w if self.dim == 1 else w.T).clone()

    def write(self, matrix: Tensor) -> None:
        self.param.copy_(matrix if self.dim == 1 else matrix.T)


def _inverse_cholesky(H: Tensor, percdamp: float, name: str) -> Tensor:
    """The upper Cholesky factor of ``(H + damp I)^-1``; dampens ``H`` in place (no ``[in, in]`` identity or
    sum is allocated: at most ``H`` and two factors are alive at once)."""
    mean_diag = H.diagonal().mean().item()
    damp, added = percdamp, 0.0
    while True:
        H.diagonal().add_(damp * mean_diag - added)
        added = damp * mean_diag
        lower, info = torch.linalg.cholesky_ex(H)
        if info == 0:
            inverse = torch.cholesky_inverse(lower)
            del lower
            upper, info = torch.linalg.cholesky_ex(inverse, upper=True)
            del inverse
            if info == 0 and torch.isfinite(upper).all():
                if damp != percdamp:
                    warnings.warn(f"nmfx.prune: {name}: the Hessian needed percdamp={damp:g} (asked {percdamp:g}) "
                                  "to be positive definite", stacklevel=3)
                return upper
        damp = max(damp * 10, 1e-4)
        if damp > _MAX_PERCDAMP:
            raise ValueError(f"{name}: the calibration Hessian X^T X is not positive definite even with "
                             f"percdamp={_MAX_PERCDAMP:g}; use more calibration data or criterion='wanda'")


def _blocksize(blocksize: Optional[int], pattern: Pattern) -> int:
    if blocksize is None:
        return math.ceil(DEFAULT_BLOCKSIZE / pattern.m) * pattern.m
    if isinstance(blocksize, bool) or not isinstance(blocksize, int) or blocksize < 1 or blocksize % pattern.m:
        raise ValueError(f"blocksize must be a positive multiple of M={pattern.m} (pattern {pattern}), got {blocksize!r}")
    return blocksize


# -- the shadow: the rewritten graph the statistics are read from -----------------------------------------

def _shadow(model: nn.Module, config: SparsifyConfig,
            example_inputs: Any) -> tuple[nn.Module, dict[str, tuple[int, Pattern]]]:
    """A copy of the module tree that shares (and never changes) the model's tensors, sparsified with
    ``config`` and running dense (every alpha = 1), in eval mode; and the plan ``{weight name: (input dim,
    pattern)}`` that ``sparsify`` chose. Earlier layers pruned in the model are pruned in the shadow too."""
    shared = {id(t): t for t in itertools.chain(model.parameters(), model.buffers())}
    shadow = copy.deepcopy(model, shared)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        shadow = sparsify(shadow, config, example_inputs=example_inputs)
    found = states(shadow)
    if not found:
        reasons = sorted({f"{row.name}: {row.reason}" for row in record(shadow).rows})
        raise ValueError(f"nmfx.prune: nothing in {type(model).__name__} would be sparsified at {config.describe_pattern()} "
                         f"(check include=/exclude=): {'; '.join(reasons)[:400]}")
    with torch.no_grad():
        for state in found.values():
            state.alpha.fill_(1.0)  # W * (m + 1 * (1 - m)) = W: the masked ops compute the model's own
    return shadow.eval(), {name: (state.dim, state.pattern) for name, state in found.items()}


class _MaskedOps(TorchFunctionMode):
    """Calls ``seen(name, x)`` with the input ``x`` of every ``nmfx::masked_linear`` call whose mask is the
    shadow state of weight ``name``, and ``as_weight(name)`` for every ``nmfx::masked_weight`` call (an op
    that takes the masked weight itself: its input is not visible here)."""

    def __init__(self, masks: dict[int, str], seen, as_weight=None) -> None:
        super().__init__()
        self.masks, self.seen, self.as_weight = masks, seen, as_weight

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        op = getattr(func, "overloadpacket", func)
        if op is torch.ops.nmfx.masked_linear:
            name = self.masks.get(id(args[2] if len(args) > 2 else kwargs.get("mask")))
            if name is not None:
                self.seen(name, args[0] if args else kwargs["x"])
        elif op is torch.ops.nmfx.masked_weight and self.as_weight is not None:
            name = self.masks.get(id(args[1] if len(args) > 1 else kwargs.get("mask")))
            if name is not None:
                self.as_weight(name)
        return func(*args, **kwargs)


def _mask_ids(shadow: nn.Module, names) -> dict[int, str]:
    found = states(shadow)
    return {id(found[name].mask): name for name in names}


# -- calibration ----------------------------------------------------------------------------------------

_Batch = tuple[tuple, dict]


def _batches(calibration: Any, device: torch.device) -> list[_Batch]:
    """The calibration batches as ``(args, kwargs)``, checked (non-empty, finite) and on ``device``."""
    if isinstance(calibration, (Tensor, Mapping)):
        calibration = [calibration]
    if isinstance(calibration, (str, bytes)) or not isinstance(calibration, Iterable):
        raise ValueError(f"calibration must be an iterable of batches (a list or a DataLoader), got "
                         f"{type(calibration).__name__}")
    batches = []
    for i, item in enumerate(calibration):
        if isinstance(item, Tensor):
            args, kwargs = (item,), {}
        elif isinstance(item, Mapping):
            if not all(isinstance(k, str) for k in item):
                raise ValueError(f"calibration batch {i} is a dict with non-string keys; keyword arguments need names")
            args, kwargs = (), dict(item)
        elif isinstance(item, (tuple, list)):
            args, kwargs = tuple(item), {}
        else:
            raise ValueError(f"calibration batch {i} is a {type(item).__name__}; each batch must be a tuple of "
                             "positional arguments, a dict of keyword arguments or a tensor")
        for where, value in _tensors(args, kwargs):
            if value.is_floating_point() or value.is_complex():
                if not torch.isfinite(value).all():
                    raise ValueError(f"calibration batch {i}, argument {where}: contains NaN or infinite values")
        batches.append((_to(args, device), _to(kwargs, device)))
    if not batches:
        raise ValueError("calibration is empty: pass at least one batch of model inputs")
    return batches


def _tensors(args: tuple, kwargs: dict):
    stack = [(str(i), a) for i, a in enumerate(args)] + [(repr(k), v) for k, v in kwargs.items()]
    while stack:
        where, value = stack.pop()
        if isinstance(value, Tensor):
            yield where, value
        elif isinstance(value, (tuple, list)):
            stack += [(f"{where}[{i}]", v) for i, v in enumerate(value)]
        elif isinstance(value, Mapping):
            stack += [(f"{where}[{k!r}]", v) for k, v in value.items()]


def _to(value: Any, device: torch.device) -> Any:
    if isinstance(value, Tensor):
        return value.to(device)
    if isinstance(value, tuple):
        return tuple(_to(v, device) for v in value)
    if isinstance(value, list):
        return [_to(v, device) for v in value]
    if isinstance(value, dict):
        return {k: _to(v, device) for k, v in value.items()}
    return value


def _device(model: nn.Module) -> torch.device:
    first = next(itertools.chain(model.parameters(), model.buffers()), None)
    return first.device if first is not None else torch.device("cpu")


def _forward(model: nn.Module, batches: list[_Batch], mode: TorchFunctionMode, starting=None) -> None:
    """Run every batch through ``model`` (no grad) under ``mode``, calling ``starting(i)`` before batch ``i``;
    a failing batch becomes a ValueError naming it."""
    with torch.no_grad():
        for i, (args, kwargs) in enumerate(batches):
            if starting is not None:
                starting(i)
            try:
                with mode:
                    model(*args, **kwargs)
            except _StopForward:
                pass
            except _NonFinite as error:
                raise ValueError(f"calibration batch {i} makes the input of {error.args[0]} non-finite (NaN or inf "
                                 "activations); check the model and the calibration data") from None
            except Exception as error:
                raise ValueError(f"calibration batch {i} does not run through {type(model).__name__} "
                                 f"({type(error).__name__}: {str(error)[:300]}); pass the model's own inputs (a "
                                 "tuple of positional arguments or a dict of keyword arguments per batch)") from error


def _input_of(layer: _Layer, x: Any) -> Tensor:
    """The input of ``layer``'s op as float32 ``[tokens, in]``."""
    if not isinstance(x, Tensor) or x.shape[-1] != layer.in_features:
        raise ValueError(f"{layer.name}: its input has shape {tuple(getattr(x, 'shape', ()))}, expected "
                         f"[..., {layer.in_features}]")
    return x.detach().reshape(-1, layer.in_features).float()


def _check_pass(shadow: nn.Module, batches: list[_Batch], layers: dict[str, _Layer],
                criterion: str) -> tuple[list[str], dict[str, bool]]:
    """One pass over the calibration data: checks it runs and keeps the layers' inputs finite; returns the
    layers in the order they first run and whether each runs exactly once in every batch; for Wanda also
    each layer's per-input-column sum of squares. For ``"wanda"`` / ``"sparsegpt"``, a layer whose input
    was never seen is a ValueError naming it and the fix."""
    order: list[str] = []
    counts: dict[str, list[int]] = {name: [0] * len(batches) for name in layers}
    as_weight: set[str] = set()
    batch = [0]

    def seen(name: str, x: Any) -> None:
        layer = layers[name]
        x = _input_of(layer, x)
        if not torch.isfinite(x).all():
            raise _NonFinite(name)
        if not any(counts[name]):
            order.append(name)
        counts[name][batch[0]] += 1
        if criterion == "wanda":
            sq = x.square().sum(0)
            layer.column_sq = sq if layer.column_sq is None else layer.column_sq + sq

    for layer in layers.values():
        layer.column_sq = None
    mode = _MaskedOps(_mask_ids(shadow, layers), seen, as_weight.add)
    _forward(shadow, batches, mode, starting=lambda i: batch.__setitem__(0, i))
    never = [name for name in layers if not any(counts[name])]
    if criterion != "magnitude":
        hidden = [name for name in never if name in as_weight]
        if hidden:
            raise ValueError(f"criterion={criterion!r} reads each weight's input at its op; {len(hidden)} selected "
                             f"weights are passed to their consumer as weights, so their input is not visible (e.g. "
                             f"{hidden[0]}, as nn.MultiheadAttention uses its projections): exclude them "
                             "(exclude=[...]) or use criterion='magnitude'")
        if never:
            raise ValueError(f"{len(never)} selected layers never ran on the calibration data (e.g. {never[0]}); "
                             "exclude them (exclude=[...]) or use criterion='magnitude'")
    once = {name: all(c == 1 for c in counts[name]) for name in layers}
    return order + never, once


class _NonFinite(BaseException):
    """A layer's calibration input is not finite (a BaseException, so a model's own ``except Exception``
    cannot swallow it)."""


def _hessian(shadow: nn.Module, batches: list[_Batch], layer: _Layer, stop_early: bool) -> Tensor:
    """``X^T X`` (float32) of ``layer``'s input over the calibration data, with the model as it is now
    (earlier layers already pruned). Ends each forward at the layer when it runs once in every batch."""
    H = torch.zeros(layer.in_features, layer.in_features, dtype=torch.float32, device=layer.param.device)
    calls = []

    def seen(name: str, x: Any) -> None:
        x = _input_of(layer, x)
        H.addmm_(x.T, x)
        calls.append(len(x))
        if stop_early:
            raise _StopForward

    _forward(shadow, batches, _MaskedOps(_mask_ids(shadow, [layer.name]), seen))
    if not any(calls):  # H = 0: every input would count as dead and the whole weight be zeroed
        raise ValueError(f"{layer.name} ran on the calibration data with the dense model but gets no input once the "
                         "earlier layers are pruned (it runs or not depending on their outputs, as an MoE expert): "
                         "exclude it (exclude=[...]) or use criterion='wanda'")
    if not torch.isfinite(H).all():
        raise ValueError(f"{layer.name}: the calibration Hessian is not finite (activations overflow after the "
                         "earlier layers were pruned?); use criterion='wanda' or fewer/shorter calibration batches")
    return H


def _progress(items: list[str], enabled: Optional[bool], description: str):
    from tqdm.auto import tqdm  # a dependency of nmfx

    show = sys.stderr.isatty() if enabled is None else enabled
    return tqdm(items, desc=description, unit="layer", disable=not show)
