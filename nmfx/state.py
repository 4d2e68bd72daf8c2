"""Per-weight sparsity state: the mask and the schedule, as buffers of the module that owns the weight.

Each sparsified parameter ``<owner>.<param>`` gets a child module ``<owner>.<param>_nm`` (an
:class:`NMState`) holding buffers ``mask`` (bool, the weight's shape), ``step`` (optimizer steps taken),
``alpha`` and ``srste_lambda`` (0-d tensors read by the masked op) and ``config`` (the canonical JSON of
the pattern, method, group dim and weight shape, as uint8 bytes). The ``state_dict`` therefore holds
tensors only: ``torch.save``, ``safetensors``, DCP and ``save_pretrained`` take it as it is, DDP
broadcasts it, and the optimizer only ever sees the dense weights.

Under FSDP2 the mask is stored like its weight (:meth:`NMState.match_layout`): a DTensor with the weight's
mesh and placements, each rank holding only its shard, wherever no shard boundary splits a group of M; the
forward gathers it (``nmfx.ops.masked_linear``), :meth:`NMState.full_mask` gives the whole mask, and DCP /
``get_state_dict`` / ``set_model_state_dict`` shard and gather it like the weight.

Loading checks every incoming entry before anything is copied (:func:`checkpoint_problems`): the config
must match the model's, ``step`` is an integer >= 0, ``alpha`` lies in [0, 1], ``srste_lambda`` is finite
and >= 0, and the mask is a bool tensor of the weight's shape keeping exactly N of every M along the
group dim for the pattern the schedule prescribes at that step. Two other layouts are accepted and
translated (:func:`normalize_checkpoint`): nmfx format 1 (the config as a JSON string ``_extra_state``),
and the *effective-weight* layout written by nmfx's ``save_pretrained`` (the weight key holds
``W * (m + alpha (1 - m))`` and ``<param>_nm.pruned`` the dense values at the pruned positions, so the
dense weight is rebuilt bit for bit).
"""

from __future__ import annotations

import json
import math
import warnings
import weakref
from typing import Any, Mapping, Optional

import torch
from torch import Tensor, nn

from nmfx.methods import Method, ScheduleState, resolve_method
from nmfx.ops import gather_mask, is_dtensor
from nmfx.pattern import Pattern, nm_mask

__all__ = ["NMState", "REFRESH_ADVICE", "STATE_SUFFIX", "FORMAT_VERSION", "STATE_KEYS", "PRUNED_KEY", "LEGACY_KEY",
           "checkpoint_problems", "normalize_checkpoint", "dense_weight", "pruned_values", "mask_problem",
           "config_mismatch"]

#: ``<param>_nm`` is the name of the state module next to parameter ``<param>``.
STATE_SUFFIX = "_nm"
#: Version of the nmfx state in a ``state_dict``: 1 kept the config as a JSON ``_extra_state`` string,
#: 2 keeps it as a uint8 ``config`` tensor (tensors only).
FORMAT_VERSION = 2
#: The entries an :class:`NMState` writes into a ``state_dict`` (under ``<owner>.<param>_nm.``).
STATE_KEYS = ("mask", "step", "alpha", "srste_lambda", "config")
#: Effective-weight layout: the dense weight's values at the pruned positions (1-D, row-major order).
PRUNED_KEY = "pruned"
#: Format 1's config entry (a JSON string).
LEGACY_KEY = "_extra_state"
_MAX_CONFIG_BYTES = 1 << 16
#: The fix named by every refusal of a state that was never computed from real weights.
REFRESH_ADVICE = ("call nmfx.refresh(model) once the weights are loaded or initialised (after to_empty); it computes "
                  "every mask from the current weights and starts the schedules at step 0 (to resume a run, load its "
                  "checkpoint instead)")


class NMState(nn.Module):
    """Mask and schedule state of one sparsified weight.

    Args:
        param_name: name of the weight inside its owner module (e.g. ``"weight"``).
        weight: the weight (used for its shape, device and the initial mask; not stored).
        pattern: the target N:M pattern.
        method: the method config.
        dim: the weight dimension groups run along (the input dim: -1 for ``nn.Linear``, 0 for ``Conv1D``).
    """

    def __init__(self, param_name: str, weight: Tensor, pattern: Pattern, method: Method, dim: int) -> None:
        super().__init__()
        self.param_name = param_name
        self.pattern = pattern
        self.method = method
        #: The schedule's mask patterns, in order, ending at ``pattern`` (resolved once).
        self.stages = method.patterns(pattern)
        self._schedule_at: Optional[tuple[int, ScheduleState]] = None  # (step, schedule) of the last read
        self.dim = dim % weight.dim()
        self.weight_shape = tuple(weight.shape)
        self._checked: dict[str, weakref.ref] = {}
        #: Why the buffers hold no state computed from real weights (None once they do): set when built on the
        #: meta device or materialized by ``to_empty``, cleared by :meth:`restart` (``nmfx.refresh``) or by
        #: loading a checked nmfx checkpoint. A Python attribute, so no buffer contents can fake it.
        self.needs_refresh: Optional[str] = None
        self._allocate(weight.device)
        if weight.is_meta:  # nothing to compute from: the buffers stay on meta until nmfx.refresh
            self.needs_refresh = "it was built on the meta device"
        else:
            self.restart(weight)

    def _allocate(self, device: torch.device) -> None:
        """(Re)create the buffers on ``device``, uninitialised (:meth:`restart` fills them)."""
        shape = self.weight_shape
        self.register_buffer("mask", torch.empty(shape, dtype=torch.bool, device=device))
        self.register_buffer("step", torch.empty((), dtype=torch.int64, device=device))
        self.register_buffer("alpha", torch.empty((), dtype=torch.float32, device=device))
        self.register_buffer("srste_lambda", torch.empty((), dtype=torch.float32, device=device))
        self.register_buffer("config", torch.empty(len(_encode_config(self.config_dict())), dtype=torch.uint8,
                                                   device=device))
        # The mask flip rate of the last refresh, for nmfx.stats (not saved: it is a measurement).
        self.register_buffer("last_flip_rate", torch.empty((), dtype=torch.float32, device=device), persistent=False)

    @torch.no_grad()
    def restart(self, weight: Tensor) -> None:
        """Start the schedule over from the current ``weight``: step 0, its alpha / lambda, the config, and
        the mask of ``weight`` at step 0's pattern (what building the state from ``weight`` gives). Buffers
        on the meta device are allocated on the weight's device first. ``weight`` may be an FSDP2 shard
        (then this is a collective: every rank calls it)."""
        if weight.is_meta:
            raise RuntimeError(f"cannot compute the mask of {self.param_name}: its weight is on the meta device "
                               "(materialize the model with to_empty and load or initialise its weights first)")
        if tuple(weight.shape) != self.weight_shape:
            raise ValueError(f"{self.param_name} has shape {tuple(weight.shape)}, its nmfx state {self.weight_shape}")
        if any(buffer.is_meta for buffer in self.buffers()):
            self._allocate(weight.device)
        self.step.zero_()
        self.config.copy_(_encode_config(self.config_dict()))
        self.needs_refresh = None
        self._schedule_at = None
        self._mask_pattern = None
        self.refresh(weight, force=True)

    # -- schedule -------------------------------------------------------------------------------
    @property
    def schedule(self) -> ScheduleState:
        """What the method prescribes at the current step (computed once per step value)."""
        if self.needs_refresh is not None:
            raise RuntimeError(f"the nmfx state of {self.param_name!r} was never computed from real weights "
                               f"({self.needs_refresh}): {REFRESH_ADVICE}")
        step = int(self.step)
        if step < 0:  # uninitialised memory that nothing flagged (a to_empty nmfx could not see)
            raise RuntimeError(f"the nmfx state of {self.param_name!r} holds step {step}, not a step count "
                               f"(uninitialised memory?): {REFRESH_ADVICE}")
        cached = getattr(self, "_schedule_at", None)
        if cached is None or cached[0] != step:
            cached = self._schedule_at = (step, self.method.state_at(step, self.pattern))
        return cached[1]

    @property
    def exact_gradient(self) -> bool:
        return getattr(self.method, "exact_gradient", False)

    @property
    def uses_srste(self) -> bool:
        return self.method.name == "srste"

    @torch.no_grad()
    def refresh(self, weight: Tensor, force: bool = False) -> None:
        """Set alpha/lambda for the current step and recompute the mask if the schedule says so."""
        state = self.schedule
        self.alpha.fill_(state.alpha)
        self.srste_lambda.fill_(state.srste_lambda)
        pattern_changed = getattr(self, "_mask_pattern", None) != state.pattern
        due = int(self.step) % self.method.mask_interval == 0 and not state.mask_frozen
        if force or pattern_changed or due:
            self.match_layout(weight)
            monotone = self.method.monotone_mask and not force  # gmp: pruned weights count as zero, never return
            if is_dtensor(self.mask):  # sharded storage: each rank masks its own shard, nothing is gathered
                old, local = self.mask.to_local(), weight.to_local()
                new_mask = nm_mask(local * old if monotone else local, state.pattern, dim=self.dim)
                if force:
                    flips = torch.zeros(())
                else:
                    flips = _sum_over_shards((new_mask != old).sum(), self.mask).float() / self.mask.numel()
                old.copy_(new_mask)
            else:
                if not monotone and _shard_local(weight, state.pattern, self.dim):
                    new_mask = _gathered_mask(weight, state.pattern, self.dim)
                else:
                    scores = _full(weight)
                    new_mask = nm_mask(scores * self.mask if monotone else scores, state.pattern, dim=self.dim)
                flips = torch.zeros(()) if force else (new_mask != self.mask).float().mean()
                self.mask.copy_(new_mask)
            self.last_flip_rate.copy_(flips)
            self._mask_pattern = state.pattern

    def full_mask(self) -> Tensor:
        """The whole mask: the ``mask`` buffer, or, when it is sharded (FSDP2, see :meth:`match_layout`), its
        shards all-gathered (a collective: call it on every rank)."""
        return gather_mask(self.mask)

    def shardable(self, weight: Tensor) -> bool:
        """``weight`` is an FSDP2 (DTensor) shard whose boundaries split no group of M at any stage of the
        schedule: each rank can then store and compute only its own shard of the mask."""
        return all(_shard_local(weight, pattern, self.dim) for pattern in set(self.stages))

    def match_layout(self, weight: Tensor) -> bool:
        """Store the mask like ``weight``: sharded (a DTensor with the weight's mesh and placements, each rank
        holding only its shard) when :meth:`shardable`, whole otherwise. Changes only the layout, never the
        mask; comm-free unless a sharded mask must become whole again. Returns whether the mask is sharded."""
        mask = self.mask
        if self.shardable(weight):
            if (is_dtensor(mask) and mask.device_mesh == weight.device_mesh
                    and tuple(mask.placements) == tuple(weight.placements)):
                return True
            from torch.distributed.tensor import distribute_tensor

            whole = gather_mask(mask) if is_dtensor(mask) else mask
            self.register_buffer("mask", distribute_tensor(whole, weight.device_mesh, weight.placements,
                                                           src_data_rank=None))  # each rank keeps its slice
            return True
        if is_dtensor(mask):
            self.register_buffer("mask", gather_mask(mask).clone())
        if is_dtensor(weight) and not getattr(self, "_whole_noted", False):
            self._whole_noted = True
            warnings.warn(f"nmfx: the mask of a {self.weight_shape} weight ({self.param_name}) stays whole on every "
                          f"rank under FSDP2: its shard boundaries split groups of M along dim {self.dim} (patterns "
                          f"{', '.join(map(str, self.stages))}); shard it along another dim or into multiples of M "
                          "for its mask to be sharded too", stacklevel=2)
        return False

    @torch.no_grad()
    def advance(self, weight: Tensor) -> None:
        """One optimizer step has been taken: advance the schedule and refresh the mask."""
        self.schedule  # noqa: B018  (raises, before any change, when the state was never computed)
        self.step += 1
        self.refresh(weight)

    # -- checkpointing --------------------------------------------------------------------------
    def config_dict(self) -> dict[str, Any]:
        """The pattern, method, group dim and weight shape (what the ``config`` buffer encodes)."""
        return {
            "format_version": FORMAT_VERSION,
            "pattern": str(self.pattern),
            "method": self.method.to_dict(),
            "dim": self.dim,
            "weight_shape": list(self.weight_shape),
        }

    def mark_checked(self, entries: Mapping[str, Any]) -> None:
        """Record that ``entries`` (this state's part of a ``state_dict``) passed the checks, so
        loading them does not check them again."""
        self._checked = {key: weakref.ref(value) for key, value in entries.items() if isinstance(value, Tensor)}

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                              error_msgs) -> None:
        entries = {key[len(prefix):]: value for key, value in state_dict.items() if key.startswith(prefix)}
        checked, self._checked = getattr(self, "_checked", {}), {}
        already = bool(entries) and all(key in checked and checked[key]() is value for key, value in entries.items())
        if entries and not already:  # loaded without the root model's check (into this submodule alone)
            problems = checkpoint_problems(self, entries, alone=True)
            if problems:
                raise ValueError(f"refusing to load the nmfx state of {prefix[:-1]!r}: " + "; ".join(problems))
            for key in (LEGACY_KEY, PRUNED_KEY):
                state_dict.pop(prefix + key, None)
            state_dict.update({prefix + key: value for key, value in normalize_checkpoint(self, entries).items()})
        # A checked, complete nmfx state from elsewhere makes these buffers real; its own buffers put back
        # (the dense-weights load, see nmfx.api) prove nothing.
        loaded = {key[len(prefix):]: value for key, value in state_dict.items() if key.startswith(prefix)}
        restores = set(STATE_KEYS) <= loaded.keys() and any(
            value is not getattr(self, key, None) for key, value in loaded.items() if key in STATE_KEYS)
        self._adapt_mask_layout(state_dict, prefix + "mask")
        errors = len(error_msgs)
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                                      error_msgs)
        if restores and len(error_msgs) == errors and not self.mask.is_meta:
            self.needs_refresh = None
        if self.needs_refresh is None:
            # The mask was computed at a step's pattern: remember it so the next refresh knows.
            self._mask_pattern = self.schedule.pattern

    def _adapt_mask_layout(self, state_dict: dict, key: str) -> None:
        """A whole incoming mask loads into a sharded one (each rank takes its slice); a sharded incoming mask
        into a whole one makes this one sharded alike (the model's own ``state_dict`` decides, see
        :meth:`match_layout`)."""
        from_dict = state_dict.get(key)
        if not isinstance(from_dict, Tensor) or tuple(from_dict.shape) != self.weight_shape:
            return  # super() reports it
        own = self.mask
        if is_dtensor(own) and not is_dtensor(from_dict):
            from torch.distributed.tensor import distribute_tensor

            state_dict[key] = distribute_tensor(from_dict, own.device_mesh, own.placements, src_data_rank=None)
        elif is_dtensor(from_dict) and not is_dtensor(own):
            from torch.distributed.tensor import distribute_tensor

            self.register_buffer("mask", distribute_tensor(own, from_dict.device_mesh, from_dict.placements,
                                                           src_data_rank=None))
        elif is_dtensor(own) and tuple(own.placements) != tuple(from_dict.placements):
            state_dict[key] = from_dict.redistribute(own.device_mesh, own.placements)

    def _apply(self, fn, recurse: bool = True):
        """``to``/``cuda``/``to_empty``...: buffers that leave or reach the meta device, or that ``to_empty``
        replaced, hold no computed state any more."""
        was_meta = self.mask.is_meta
        out = super()._apply(fn, recurse)
        if self.mask.is_meta:
            self.needs_refresh = "its buffers are on the meta device"
        elif was_meta:
            self.needs_refresh = "its buffers were materialized from the meta device and hold uninitialised memory"
        elif getattr(fn, "__qualname__", "").startswith("Module.to_empty."):
            self.needs_refresh = "to_empty left its buffers uninitialised"
        return out

    def __setstate__(self, state: dict[str, Any]) -> None:
        state.setdefault("needs_refresh", None)  # pickled by an nmfx without the flag: its state was computed
        super().__setstate__(state)

    def __getstate__(self) -> dict[str, Any]:
        state = dict(super().__getstate__())
        state["_checked"] = {}  # weak references do not pickle
        return state

    def extra_repr(self) -> str:
        return f"{self.param_name}, pattern={self.pattern}, method={self.method.name}, dim={self.dim}"


def checkpoint_problems(state: NMState, entries: Mapping[str, Any], weight: Any = None, *,
                        alone: bool = False) -> list[str]:
    """What is wrong with ``entries`` (``{"mask": ..., "step": ..., ...}``: one state's part of a
    ``state_dict``) as a checkpoint of ``state`` (empty when they can be loaded). ``weight`` is the
    incoming owner weight, needed for the effective-weight layout (a ``pruned`` entry); ``alone``: the
    state is loaded by itself, without its owner's weight."""
    if not entries:
        return ["no nmfx state in the checkpoint (is it a dense model's?)"]
    unknown = sorted(set(entries) - set(STATE_KEYS) - {LEGACY_KEY, PRUNED_KEY})
    if unknown:
        return [f"unknown nmfx entries {unknown} in the checkpoint"]
    expected = state.config_dict()
    if "config" in entries:
        saved = _decode_config(entries["config"])
    elif LEGACY_KEY in entries:
        saved = entries[LEGACY_KEY]
    else:
        return ["the checkpoint has no nmfx config for it"]
    mismatch = config_mismatch(expected, saved)
    if mismatch:
        return [mismatch]
    problems = [f"{key} is missing from the checkpoint" for key in STATE_KEYS[:4] if key not in entries]
    step = entries.get("step")
    step_ok = step is not None and _check_scalar(problems, "step", step, integer=True, low=0, high=None)
    alpha = entries.get("alpha")
    alpha_ok = alpha is not None and _check_scalar(problems, "alpha", alpha, integer=False, low=0.0, high=1.0)
    if "srste_lambda" in entries:
        _check_scalar(problems, "srste_lambda", entries["srste_lambda"], integer=False, low=0.0, high=None)
    mask = entries.get("mask")
    mask_ok = False
    if mask is not None:
        if not isinstance(mask, Tensor) or mask.dtype != torch.bool:
            problems.append(f"mask must be a bool tensor, got {_describe(mask)}")
        elif tuple(mask.shape) != state.weight_shape:
            problems.append(f"mask has shape {tuple(mask.shape)}, the weight {state.weight_shape}")
        elif step_ok and not mask.is_meta:
            pattern = state.method.state_at(int(step), state.pattern).pattern
            wrong = mask_problem(mask, pattern, state.dim)
            if wrong:
                problems.append(f"the mask is not a valid {pattern} mask (the pattern at step {int(step)}): {wrong}")
            mask_ok = not wrong
    if PRUNED_KEY in entries:
        problems += _pruned_problems(entries, weight, state.weight_shape, mask_ok and alpha_ok, alone)
    return problems


def normalize_checkpoint(state: NMState, entries: Mapping[str, Any]) -> dict[str, Any]:
    """``entries`` (checked by :func:`checkpoint_problems`) in this version's layout: a format-1 config
    string becomes the ``config`` tensor; ``pruned`` is dropped (see :func:`dense_weight`)."""
    out = {key: value for key, value in entries.items() if key not in (LEGACY_KEY, PRUNED_KEY)}
    out.setdefault("config", state.config.clone())
    return out


def dense_weight(effective: Tensor, mask: Tensor, pruned: Tensor) -> Tensor:
    """The dense weight of the effective-weight layout: ``effective`` where kept, ``pruned`` elsewhere."""
    weight = effective.detach().clone()
    weight[~mask.to(weight.device)] = pruned.to(weight.device)
    return weight


def pruned_values(weight: Tensor, mask: Tensor) -> Tensor:
    """The dense weight's values at the pruned positions (1-D, row-major): the ``pruned`` entry."""
    return weight.detach()[~mask.to(weight.device)]


def mask_problem(mask: Tensor, pattern: Pattern, dim: int) -> str:
    """Why ``mask`` does not keep exactly ``pattern.n`` of every ``pattern.m`` along ``dim`` ("" if it does).
    A sharded mask (DTensor) is checked shard by shard where no shard splits a group, and all ranks return
    a problem when any shard has one (a collective: call it on every rank)."""
    size = mask.shape[dim]
    if size % pattern.m:
        return f"dimension {dim} has size {size}, not divisible by M={pattern.m}"
    if is_dtensor(mask):
        if not _shard_local(mask, pattern, dim):
            return mask_problem(gather_mask(mask), pattern, dim)
        mine = mask_problem(mask.to_local(), pattern, dim)
        bad = _sum_over_shards(torch.tensor(int(bool(mine)), device=mask.to_local().device), mask)
        if int(bad) == 0:
            return ""
        return f"on this rank's shard: {mine}" if mine else f"{int(bad)} other rank(s) hold an invalid shard of it"
    data = mask.movedim(dim, -1).contiguous().view(torch.uint8)  # summing bytes is ~4x faster than bools
    if data.numel() and int(data.max()) > 1:
        return "it holds bytes other than 0 and 1 (not a valid bool tensor)"
    counts = data.reshape(-1, pattern.m).sum(-1, dtype=torch.int16)
    bad = (counts != pattern.n).nonzero()
    if bad.numel() == 0:
        return ""
    first = int(bad[0, 0])
    return (f"{bad.shape[0]} of {counts.numel()} groups keep a count other than {pattern.n} "
            f"(group {first} keeps {int(counts[first])} of {pattern.m})")


def config_mismatch(expected: dict[str, Any], saved: Any) -> str:
    """Why a saved state's config differs from ``expected`` (empty when they agree)."""
    try:
        saved = json.loads(saved) if isinstance(saved, (str, bytes)) else dict(saved)
    except (TypeError, ValueError):
        return f"the saved nmfx config is not readable ({saved!r:.80})"
    version = saved.get("format_version", 0)
    if not isinstance(version, int) or isinstance(version, bool):
        return f"the saved nmfx config has format_version {version!r:.40}, not an integer"
    if version > FORMAT_VERSION:
        return f"it was written by a newer nmfx (format {version} > {FORMAT_VERSION}); upgrade nmfx"
    problems = []
    for key in ("pattern", "dim", "weight_shape"):
        if saved.get(key) != expected[key]:
            problems.append(f"{key} {saved.get(key)!r:.80} in the checkpoint vs {expected[key]!r} in the model")
    if saved.get("method") is not None:
        try:
            saved_method = resolve_method(saved["method"]).to_dict()
        except (TypeError, ValueError) as error:
            return f"the checkpoint's method config is not valid ({error})"
        if saved_method != expected["method"]:
            problems.append(f"method {saved_method} in the checkpoint vs {expected['method']} in the model")
    return "; ".join(problems)


def _encode_config(config: dict[str, Any]) -> Tensor:
    data = json.dumps(config, sort_keys=True, separators=(",", ":")).encode()
    return torch.frombuffer(bytearray(data), dtype=torch.uint8).clone()


def _decode_config(value: Any) -> Any:
    """The config dict of a ``config`` entry, or a description of why it is not one (a str that
    :func:`config_mismatch` reports as unreadable)."""
    if not isinstance(value, Tensor) or value.dtype != torch.uint8 or value.dim() != 1:
        return f"<{_describe(value)}, not a 1-D uint8 tensor>"
    if value.numel() > _MAX_CONFIG_BYTES or value.is_meta:
        return f"<{value.numel()} bytes>"
    try:
        config = json.loads(bytes(value.tolist()).decode("utf-8"))
    except (UnicodeDecodeError, ValueError):
        return "<not JSON>"
    return config if isinstance(config, dict) else f"<JSON {type(config).__name__}, not an object>"


def _check_scalar(problems: list[str], name: str, value: Any, integer: bool, low: float, high: Optional[float]) -> bool:
    """Append why ``value`` is not a valid one-element ``name`` tensor; True if it is valid."""
    kind = "an integer" if integer else "a floating-point"
    if (not isinstance(value, Tensor) or value.numel() != 1 or value.dim() > 1 or value.dtype == torch.bool
            or value.is_floating_point() == integer or value.is_complex()):
        problems.append(f"{name} must be {kind} scalar tensor, got {_describe(value)}")
        return False
    if value.is_meta:
        return True
    number = value.item()
    bounds = f"in [{low}, {high}]" if high is not None else f">= {low}"
    if not math.isfinite(number) or number < low or (high is not None and number > high):
        problems.append(f"{name}={number} is not {'finite and ' if not integer else ''}{bounds}")
        return False
    return True


def _pruned_problems(entries: Mapping[str, Any], weight: Any, shape: tuple[int, ...], values_ok: bool,
                     alone: bool) -> list[str]:
    pruned = entries[PRUNED_KEY]
    if alone:
        return ["the checkpoint holds the effective weight and its pruned values (nmfx's save_pretrained): "
                "load it into the whole sparsified model, which rebuilds the dense weight"]
    if weight is None:
        return ["the weight is missing from the checkpoint (its pruned values are there)"]
    if not isinstance(weight, Tensor) or type(weight) not in (Tensor, nn.Parameter) or not weight.is_floating_point():
        return [f"the weight must be a plain floating-point tensor, got {_describe(weight)}"]
    if tuple(weight.shape) != shape:
        return [f"the weight has shape {tuple(weight.shape)}, the model's {shape}"]
    if not isinstance(pruned, Tensor) or pruned.dtype != weight.dtype or pruned.dim() != 1:
        return [f"pruned must be a 1-D {weight.dtype} tensor (the weight's dtype), got {_describe(pruned)}"]
    if not values_ok or weight.is_meta or pruned.is_meta:
        return []
    mask, alpha = entries["mask"].to(weight.device), entries["alpha"]
    dropped = ~mask
    count = int(dropped.sum())
    if pruned.numel() != count:
        return [f"pruned has {pruned.numel()} values for the mask's {count} pruned positions"]
    # The weight entry must be the effective weight of these values: W * alpha where pruned.
    expected = pruned.to(weight.device) * alpha.to(device=weight.device, dtype=weight.dtype)
    if not torch.equal(_bits(weight.detach()[dropped]), _bits(expected)):
        return ["the weight is not the effective weight of the pruned values (the weights file was changed "
                "after nmfx saved it?)"]
    return []


def _bits(t: Tensor) -> Tensor:
    """Bit patterns of a float tensor (so NaN compares equal to the same NaN)."""
    return t.view({1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}[t.element_size()])


def _describe(value: Any) -> str:
    if isinstance(value, Tensor):
        return f"{type(value).__name__}(dtype={value.dtype}, shape={tuple(value.shape)})"
    return f"{type(value).__name__} {value!r:.60}"


def _shard_local(weight: Tensor, pattern: Pattern, dim: int) -> bool:
    """``weight`` is a DTensor (FSDP2) whose shard boundaries never split a group of ``pattern.m`` along
    ``dim``: each rank can compute its shard's mask alone. True for FSDP2's ``Shard(0)`` of a Linear weight
    (groups run along dim 1); along the group dim only when every shard's length is a multiple of M."""
    placements = getattr(weight, "placements", None)
    if placements is None or not hasattr(weight, "to_local"):
        return False
    along_groups = 0
    for mesh_dim, placement in enumerate(placements):
        if placement.is_replicate():
            continue
        if not placement.is_shard():
            return False  # Partial: the local tensor is not a slice of the weight
        if placement.dim % weight.dim() == dim:
            along_groups += 1
            chunk = -(-weight.shape[dim] // weight.device_mesh.size(mesh_dim))  # DTensor shards like torch.chunk
            if chunk % pattern.m:
                return False
    return along_groups <= 1


def _gathered_mask(weight: Tensor, pattern: Pattern, dim: int) -> Tensor:
    """The whole mask of a sharded ``weight`` (:func:`_shard_local` holds): each rank's shard's mask, gathered as
    bytes — 1 byte per element instead of the weight's 2-8, and each rank masks only its own shard."""
    from torch.distributed.tensor import DTensor

    local = nm_mask(weight.to_local(), pattern, dim=dim).view(torch.uint8)
    shards = DTensor.from_local(local, weight.device_mesh, weight.placements, shape=weight.shape,
                                stride=weight.stride())
    return shards.full_tensor().view(torch.bool)


def _sum_over_shards(value: Tensor, like: Tensor) -> Tensor:
    """``value`` (computed from this rank's shard of the DTensor ``like``) summed over the ranks holding the
    other shards (in place; the replicas of an HSDP mesh are not counted twice)."""
    import torch.distributed as dist

    for mesh_dim, placement in enumerate(like.placements):
        if placement.is_shard():
            dist.all_reduce(value, group=like.device_mesh.get_group(mesh_dim))
    return value


def _full(weight: Tensor) -> Tensor:
    """The whole weight, also when it is a DTensor shard (FSDP2)."""
    full_tensor = getattr(weight, "full_tensor", None)
    return full_tensor() if callable(full_tensor) else weight
