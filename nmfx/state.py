"""Per-weight sparsity state: the mask and the schedule, as buffers of the module that owns the weight.

Each sparsified parameter ``<owner>.<param>`` gets a child module ``<owner>.<param>_nm`` (an
:class:`NMState`) holding buffers ``mask`` (bool, the weight's shape), ``step`` (optimizer steps taken),
``alpha`` and ``srste_lambda`` (0-d tensors read by the masked op), and the config as extra state. So
``state_dict()`` round-trips everything, DDP broadcasts it, and the optimizer only ever sees the dense
weights.
"""

from __future__ import annotations

import json
from typing import Any

import torch
from torch import Tensor, nn

from nmfx.methods import Method, ScheduleState, resolve_method
from nmfx.pattern import Pattern, nm_mask

__all__ = ["NMState", "STATE_SUFFIX", "FORMAT_VERSION"]

#: ``<param>_nm`` is the name of the state module next to parameter ``<param>``.
STATE_SUFFIX = "_nm"
#: Version of the extra state written into ``state_dict()``.
FORMAT_VERSION = 1


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
        self.dim = dim % weight.dim()
        self.weight_shape = tuple(weight.shape)
        device = weight.device
        self.register_buffer("mask", torch.ones(weight.shape, dtype=torch.bool, device=device))
        self.register_buffer("step", torch.zeros((), dtype=torch.int64, device=device))
        self.register_buffer("alpha", torch.ones((), dtype=torch.float32, device=device))
        self.register_buffer("srste_lambda", torch.zeros((), dtype=torch.float32, device=device))
        # The mask flip rate of the last refresh, for nmfx.stats (not saved: it is a measurement).
        self.register_buffer("last_flip_rate", torch.zeros((), dtype=torch.float32, device=device), persistent=False)
        self.refresh(weight, force=True)

    # -- schedule -------------------------------------------------------------------------------
    @property
    def schedule(self) -> ScheduleState:
        """What the method prescribes at the current step."""
        return self.method.state_at(int(self.step), self.pattern)

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
            new_mask = nm_mask(_full(weight), state.pattern, dim=self.dim)
            flips = torch.zeros(()) if force else (new_mask != self.mask).float().mean()
            self.last_flip_rate.copy_(flips)
            self.mask.copy_(new_mask)
            self._mask_pattern = state.pattern

    @torch.no_grad()
    def advance(self, weight: Tensor) -> None:
        """One optimizer step has been taken: advance the schedule and refresh the mask."""
        self.step += 1
        self.refresh(weight)

    # -- checkpointing --------------------------------------------------------------------------
    def config_dict(self) -> dict[str, Any]:
        return {
            "format_version": FORMAT_VERSION,
            "pattern": str(self.pattern),
            "method": self.method.to_dict(),
            "dim": self.dim,
            "weight_shape": list(self.weight_shape),
        }

    def get_extra_state(self) -> Any:
        return json.dumps(self.config_dict(), sort_keys=True)

    def set_extra_state(self, state: Any) -> None:
        mismatch = config_mismatch(self.config_dict(), state)
        if mismatch:
            raise ValueError(f"nmfx state mismatch for weight {self.param_name!r}: {mismatch}")

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs) -> None:
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)
        # The mask was computed at a step's pattern: remember it so the next refresh knows.
        self._mask_pattern = self.schedule.pattern

    def extra_repr(self) -> str:
        return f"{self.param_name}, pattern={self.pattern}, method={self.method.name}, dim={self.dim}"


def config_mismatch(expected: dict[str, Any], saved: Any) -> str:
    """Why a saved state's config differs from ``expected`` (empty when they agree)."""
    try:
        saved = json.loads(saved) if isinstance(saved, str) else dict(saved)
    except (TypeError, ValueError):
        return f"the saved nmfx state is not readable ({saved!r:.80})"
    version = saved.get("format_version", 0)
    if version > FORMAT_VERSION:
        return f"it was written by a newer nmfx (format {version} > {FORMAT_VERSION}); upgrade nmfx"
    problems = []
    for key in ("pattern", "dim", "weight_shape"):
        if saved.get(key) != expected[key]:
            problems.append(f"{key} {saved.get(key)!r} in the checkpoint vs {expected[key]!r} in the model")
    if saved.get("method") is not None:
        saved_method = resolve_method(saved["method"]).to_dict()
        if saved_method != expected["method"]:
            problems.append(f"method {saved_method} in the checkpoint vs {expected['method']} in the model")
    return "; ".join(problems)


def _full(weight: Tensor) -> Tensor:
    """The whole weight, also when it is a DTensor shard (FSDP2)."""
    full_tensor = getattr(weight, "full_tensor", None)
    return full_tensor() if callable(full_tensor) else weight
