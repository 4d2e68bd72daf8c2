"""Gradient-flow methods for N:M sparse training, as frozen config dataclasses, and their schedules.

Each method says what the forward uses as the effective weight and which gradient reaches the dense
weight (see ``nmfx.ops.masked_linear``); its schedule says, at every optimizer step, which phase
training is in, the mask decay ``alpha``, the SR-STE coefficient and the N:M pattern of the mask.

The methods and their defaults follow the official code of Bambhaniya et al. 2024 ("Progressive
Gradient Flow for Robust N:M Sparsity Training in Transformers", arXiv 2402.04744;
abhibambhaniya/progressive_gradient_flow_nm_sparsity, ``sparse_functions.py`` / ``train.py``):

========  ==========================  ================================  =============================
method    forward weight              gradient written to W             schedule
========  ==========================  ================================  =============================
dense     W                           g                                 none (baseline)
ste       W * m                       g (straight-through)              none
srste     W * m                       g + lambda * (1 - m) * W          none (Zhou et al. 2021)
mdgf      W * (m + alpha (1 - m))     g, or g * (m + alpha (1 - m))     alpha decays 1 -> 0
sdgf      W * m_t (N_t:M_t mask)      g (straight-through)              N_t:M_t steps to the target
                                                                      (``decay=``: and alpha, as mdgf)
gmp       W * m_t (k_t:M mask)        g * m_t (pruned get none)         k_t: M -> N, cubic (Zhu & Gupta)
========  ==========================  ================================  =============================

Phases (all methods): ``dense_steps`` of dense warm-up, the sparse phase, then ``fine_tune_steps``
with a hard, frozen mask. ``dense_steps``/``fine_tune_steps`` accept an int (steps) or a float in
[0, 1) (a fraction of ``total_steps``, as the official code's epoch fractions). Every method that has
``total_steps`` ends hard-masked (alpha = 0, the target pattern) at ``total_steps`` at the latest.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Any, ClassVar, Mapping, Optional, Sequence, Union

from nmfx.pattern import MAX_M, Pattern, PatternLike

__all__ = [
    "Method", "Dense", "STE", "SRSTE", "MDGF", "SDGF", "GMP", "ScheduleState", "METHODS", "resolve_method",
    "CONFIG_VERSION",
]

#: Version of the serialized method config (``Method.to_dict``); bump on incompatible changes.
CONFIG_VERSION = 1

#: With ``total_steps`` and no ``decay_coef``, MDGF's alpha decays over this fraction of the sparse phase
#: (linear: to 0; exponential: to exp(-5) ~ 0.0067, then 0), so the rest trains at the hard mask. The
#: official 2e-4 reaches 0 after 5,000 steps, a small fraction of its recipes' length; decaying until the
#: very last step would amount to dense training followed by an unrecovered one-shot prune.
_DECAY_FRACTION = 0.5
_EXP_DECAY_END_EXPONENT = 5.0

#: SDGF's stage length when neither ``total_steps`` nor ``stage_steps`` is given.
_DEFAULT_STAGE_STEPS = 1000

#: The geometric / densify SDGF schedules never use masks with groups wider than this.
_MAX_SCHEDULE_M = 128

#: GMP's ramp, as a fraction of the sparse phase, when ``total_steps`` is given and ``ramp_steps`` is not
#: (the same span as MDGF's fitted decay); without ``total_steps``, :data:`_DEFAULT_RAMP_STEPS` steps.
_RAMP_FRACTION = 0.5
_DEFAULT_RAMP_STEPS = 1000


@dataclass(frozen=True)
class ScheduleState:
    """What a method prescribes at one optimizer step."""

    phase: str  # "dense" (warm-up), "sparse", or "fine_tune" (hard, frozen mask)
    alpha: float  # weight kept on pruned elements in the forward: 1 = dense, 0 = hard mask
    srste_lambda: float  # SR-STE decay on pruned weights in the backward (0 = none)
    pattern: Pattern  # N_t:M_t of the mask at this step
    mask_frozen: bool  # True in the fine-tune phase: the mask is not recomputed


@dataclass(frozen=True)
class Method:
    """Base of all method configs: the training length and the phase knobs.

    Args:
        total_steps: optimizer steps of the whole run; required by schedules that must fit a length
            (``sdgf``, fractional phases). At and after it, the mask is hard and at the target pattern.
        dense_steps: dense warm-up at the start (official default 0).
        fine_tune_steps: final hard, frozen-mask phase (official default 0).
        mask_interval: recompute the mask from the dense weights every this many steps (default 1,
            as the official code, which recomputes it at every forward).
    """

    total_steps: int | None = None
    dense_steps: Union[int, float] = 0
    fine_tune_steps: Union[int, float] = 0
    mask_interval: int = 1

    name: ClassVar[str] = ""
    #: True when a new mask may only keep weights the previous one kept (pruned weights count as zero).
    monotone_mask: ClassVar[bool] = False

    def __post_init__(self) -> None:
        if self.total_steps is not None:
            _check_int("total_steps", self.total_steps, minimum=1)
        _check_int("mask_interval", self.mask_interval, minimum=1)
        for knob in ("dense_steps", "fine_tune_steps"):
            value = getattr(self, knob)
            if isinstance(value, float):
                if not 0.0 <= value < 1.0:
                    raise ValueError(f"{self.name}: {knob}={value!r} as a float is a fraction of total_steps "
                                     "and must lie in [0, 1); give an int for a number of steps")
                if value > 0 and self.total_steps is None:
                    raise ValueError(f"{self.name}: {knob}={value!r} is a fraction of total_steps, but "
                                     "total_steps is not set; give total_steps or an int number of steps")
            else:
                _check_int(knob, value, minimum=0)
        if self.total_steps is None and self.fine_tune_steps:
            raise ValueError(f"{self.name}: fine_tune_steps needs total_steps (it is the end of the run)")
        if self.total_steps is not None and self.dense_end + self._fine_tune_len > self.total_steps:
            raise ValueError(f"{self.name}: dense_steps ({self.dense_end}) + fine_tune_steps "
                             f"({self._fine_tune_len}) exceed total_steps ({self.total_steps})")

    # -- phases ---------------------------------------------------------------------------------
    @property
    def dense_end(self) -> int:
        """First step of the sparse phase."""
        return _resolve_steps(self.dense_steps, self.total_steps)

    @property
    def _fine_tune_len(self) -> int:
        return _resolve_steps(self.fine_tune_steps, self.total_steps)

    @property
    def sparse_end(self) -> int | None:
        """First step of the fine-tune (hard, frozen-mask) phase, or None for an open-ended run."""
        if self.total_steps is None:
            return None
        return self.total_steps - self._fine_tune_len

    def state_at(self, step: int, target: PatternLike) -> ScheduleState:
        """The phase, alpha, SR-STE lambda and mask pattern at optimizer ``step`` (0-based)."""
        target = Pattern.parse(target)
        if step < 0:
            raise ValueError(f"step must be >= 0, got {step}")
        if step < self.dense_end:
            return ScheduleState("dense", 1.0, 0.0, self._sparse_pattern(0, target), False)
        sparse_end = self.sparse_end
        if sparse_end is not None and step >= sparse_end:
            frozen = self._fine_tune_len > 0
            return ScheduleState("fine_tune" if frozen else "sparse", self._final_alpha, self._lambda, target, frozen)
        return ScheduleState("sparse", self._alpha(step - self.dense_end), self._lambda,
                             self._sparse_pattern(step - self.dense_end, target), False)

    def patterns(self, target: PatternLike) -> tuple[Pattern, ...]:
        """Every mask pattern the schedule uses (for checking a layer's width against each M)."""
        return (Pattern.parse(target),)

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready form: ``{"method": name, "version": ..., **fields}``."""
        fields_ = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
        if isinstance(fields_.get("schedule"), tuple):
            fields_["schedule"] = [str(p) for p in fields_["schedule"]]
        return {"method": self.name, "version": CONFIG_VERSION, **fields_}

    # -- per-method hooks -----------------------------------------------------------------------
    @property
    def _lambda(self) -> float:
        return 0.0

    @property
    def _final_alpha(self) -> float:
        return 0.0

    def _alpha(self, sparse_step: int) -> float:
        return 0.0

    def _sparse_pattern(self, sparse_step: int, target: Pattern) -> Pattern:
        return target

    @property
    def _sparse_len(self) -> int | None:
        end = self.sparse_end
        return None if end is None else end - self.dense_end


@dataclass(frozen=True)
class Dense(Method):
    """Dense baseline: forward ``W``, gradient ``g``. The N:M mask is still tracked (it is what one-shot
    pruning at the end would keep), so stats and reports work for the baseline too."""

    name: ClassVar[str] = "dense"

    @property
    def _final_alpha(self) -> float:
        return 1.0

    def state_at(self, step: int, target: PatternLike) -> ScheduleState:
        base = super().state_at(step, target)
        return dataclasses.replace(base, phase="dense", alpha=1.0)


@dataclass(frozen=True)
class STE(Method):
    """Straight-through estimator: forward ``W * m``, gradient ``g`` to the dense W."""

    name: ClassVar[str] = "ste"


@dataclass(frozen=True)
class SRSTE(Method):
    """SR-STE (Zhou et al. 2021): forward ``W * m``, gradient ``g + srste_lambda * (1 - m) * W``.

    ``srste_lambda`` defaults to 2e-4, the value hard-coded in the official code (its ``--decay-coef``
    flag does not reach it)."""

    srste_lambda: float = 2e-4
    name: ClassVar[str] = "srste"

    def __post_init__(self) -> None:
        super().__post_init__()
        _check_number("srste_lambda", self.srste_lambda, minimum=0.0)

    @property
    def _lambda(self) -> float:
        return float(self.srste_lambda)


@dataclass(frozen=True)
class MDGF(Method):
    """Mask Decay Gradient Flow: forward ``W * (m + alpha_t (1 - m))``, alpha_t decaying from 1 to 0.

    Args:
        decay: ``"linear"`` (alpha = max(0, 1 - c s)) or ``"exponential"`` (alpha = exp(-c s)); ``s``
            counts optimizer steps from the end of the dense warm-up (the official code means this but
            its offset is 100x too small; nmfx does not copy that).
        decay_coef: ``c``. Default: with ``total_steps``, fitted to the first half of the sparse phase
            (linear reaches 0 there, exponential exp(-5); the second half trains at the hard mask);
            without it, the official 2e-4.
        gradient: ``"straight_through"`` (official: ``g`` reaches W unchanged) or ``"exact"`` (the
            autograd gradient ``g * (m + alpha (1 - m))``).
    """

    decay: str = "linear"
    decay_coef: float | None = None
    gradient: str = "straight_through"
    name: ClassVar[str] = "mdgf"

    def __post_init__(self) -> None:
        super().__post_init__()
        _check_choice("decay", self.decay, _DECAYS)
        _check_choice("gradient", self.gradient, ("straight_through", "exact"))
        if self.decay_coef is not None:
            _check_number("decay_coef", self.decay_coef, minimum=0.0, strict=True)

    @property
    def coef(self) -> float:
        """The decay coefficient in use (given, fitted to total_steps, or the official 2e-4)."""
        return _decay_coef(self.decay, self.decay_coef, self._sparse_len)

    def _alpha(self, sparse_step: int) -> float:
        return _decayed_alpha(self.decay, self.decay_coef, self._sparse_len, sparse_step)

    @property
    def exact_gradient(self) -> bool:
        return self.gradient == "exact"


@dataclass(frozen=True)
class SDGF(Method):
    """Structure Decay Gradient Flow: forward ``W * m_t`` with an ``N_t:M_t`` mask that goes from
    dense-ish to the target in equal stages over the sparse phase; gradient straight-through.

    Args:
        schedule: ``"stepwise"`` (official ``SPARSIFY``, default): N goes ``M-1, M/2, M/4, ..., N`` at
            fixed M (1:8: 7:8 -> 4:8 -> 2:8 -> 1:8). ``"geometric"`` (official ``FINE``): N and M scaled
            together at constant density (1:8: 8:64 -> 4:32 -> 2:16 -> 1:8), groups never wider than
            128. ``"densify"`` (official ``DENSIFY``): N fixed, M shrinking (1:8: 1:64 -> 1:32 -> 1:16 ->
            1:8). Or an explicit sequence of patterns ending at the target.
        stage_steps: without ``total_steps``, each stage lasts this many optimizer steps (default
            1,000), then the target pattern holds for good. With ``total_steps`` the stages split the
            sparse phase equally, as in the official code (give one or the other).
        depth: ``geometric`` / ``densify`` only: the number of scaled stages before the target. Default
            (None): ``min(log2(M/N), log2(128/M))``, so no stage is denser than the target's M allows or
            wider than 128. ``depth=3`` is the official code's (always 4 stages: 1:32 runs
            8:256 -> 4:128 -> 2:64 -> 1:32, 2:4 runs 16:32 -> 8:16 -> 4:8 -> 2:4); every stage's M must then
            divide the layer's input width.
        decay: combine with MDGF's mask decay, as the official code allows (its ``structure_decay_flag``
            with a ``decay_type``): ``None`` (default, plain SDGF), ``"linear"`` or ``"exponential"``.
            The forward is then ``W * (m_t + alpha_t (1 - m_t))`` with the stage's ``N_t:M_t`` mask
            ``m_t`` and MDGF's ``alpha_t`` on one clock from the start of the sparse phase (not restarted
            per stage); the gradient stays straight-through.
        decay_coef: MDGF's ``decay_coef`` for ``decay`` (default: fitted as MDGF's).
    """

    schedule: Union[str, Sequence[PatternLike]] = "stepwise"
    stage_steps: Optional[int] = None
    depth: Optional[int] = None
    decay: Optional[str] = None
    decay_coef: Optional[float] = None
    name: ClassVar[str] = "sdgf"

    def __post_init__(self) -> None:
        if isinstance(self.schedule, str):
            _check_choice("schedule", self.schedule, ("stepwise", "geometric", "densify"))
        elif isinstance(self.schedule, Sequence) and len(self.schedule) > 0:
            object.__setattr__(self, "schedule", tuple(Pattern.parse(p) for p in self.schedule))
        else:
            raise ValueError(f"sdgf: schedule={self.schedule!r}: expected 'stepwise', 'geometric', "
                             "'densify' or a non-empty list of patterns such as ['4:8', '2:8', '1:8']")
        super().__post_init__()
        if self.depth is not None:
            _check_int("depth", self.depth, minimum=0)
            if self.schedule not in ("geometric", "densify"):
                raise ValueError(f"sdgf: depth={self.depth} applies to the 'geometric' and 'densify' schedules, "
                                 f"not {self.schedule!r}")
        if self.stage_steps is not None:
            _check_int("stage_steps", self.stage_steps, minimum=1)
            if self.total_steps is not None:
                raise ValueError("sdgf: give total_steps (stages split the run) or stage_steps (fixed stage "
                                 "length), not both")
        if self.decay is not None:
            _check_choice("decay", self.decay, _DECAYS)
        if self.decay_coef is not None:
            if self.decay is None:
                raise ValueError(f"sdgf: decay_coef={self.decay_coef!r} needs decay='linear' or 'exponential' "
                                 "(the mask decay it sets the rate of)")
            _check_number("decay_coef", self.decay_coef, minimum=0.0, strict=True)

    def patterns(self, target: PatternLike) -> tuple[Pattern, ...]:
        target = Pattern.parse(target)
        if isinstance(self.schedule, tuple):
            if self.schedule[-1] != target:
                raise ValueError(f"sdgf: the schedule {[str(p) for p in self.schedule]} must end at the "
                                 f"target pattern {target}")
            return self.schedule
        n, m = target.n, target.m
        if self.schedule == "stepwise":
            stages = [m - 1] if m - 1 > n else []
            k = m // 2
            while k > n:
                if not stages or k < stages[-1]:
                    stages.append(k)
                k //= 2
            return tuple(Pattern(s, m) for s in stages) + (target,)
        depth = self.depth
        if depth is None:
            depth = 0
            while n << (depth + 1) <= m and m << (depth + 1) <= _MAX_SCHEDULE_M:
                depth += 1
        elif m << depth > MAX_M:
            raise ValueError(f"sdgf: depth={depth} at {target} needs {n << depth if self.schedule == 'geometric' else n}"
                             f":{m << depth} masks, but M is at most {MAX_M}; give a smaller depth")
        if self.schedule == "geometric":
            return tuple(Pattern(n << j, m << j) for j in range(depth, 0, -1)) + (target,)
        return tuple(Pattern(n, m << j) for j in range(depth, 0, -1)) + (target,)

    def _alpha(self, sparse_step: int) -> float:
        if self.decay is None:
            return 0.0
        return _decayed_alpha(self.decay, self.decay_coef, self._sparse_len, sparse_step)

    def _sparse_pattern(self, sparse_step: int, target: Pattern) -> Pattern:
        stages = self.patterns(target)
        if self._sparse_len is None:
            stage = sparse_step // (self.stage_steps or _DEFAULT_STAGE_STEPS)
        else:
            stage = sparse_step * len(stages) // max(1, self._sparse_len)
        return stages[min(stage, len(stages) - 1)]


@dataclass(frozen=True)
class GMP(Method):
    """Gradual magnitude pruning (Zhu & Gupta 2017, "To prune, or not to prune"), adapted to N:M.

    Zhu & Gupta raise the sparsity along ``s_t = s_f (1 - (1 - t / T)^3)``; per group of M that is a kept
    count ``k_t = N + (M - N) (1 - t / T)^3`` (rounded to the nearest integer) falling from M to N over a
    ramp of T steps, after which the target N:M holds. The masks are hard (forward ``W * m_t``) and the
    pruned weights are treated as zeroed: they get no gradient (``g * m_t``) and never come back (each new
    mask keeps the largest-|W| of the weights the previous mask kept).

    Args:
        ramp_steps: length of the ramp: an int number of optimizer steps, or a float in (0, 1], a fraction
            of the sparse phase (needs ``total_steps``). Default: half of the sparse phase with
            ``total_steps`` (the span of MDGF's fitted decay), 1,000 steps without it.
    """

    ramp_steps: Union[int, float, None] = None
    name: ClassVar[str] = "gmp"
    monotone_mask: ClassVar[bool] = True

    def __post_init__(self) -> None:
        super().__post_init__()
        value = self.ramp_steps
        if isinstance(value, float):
            if not 0.0 < value <= 1.0:
                raise ValueError(f"gmp: ramp_steps={value!r} as a float is a fraction of the sparse phase and must "
                                 "lie in (0, 1]; give an int for a number of steps")
            if self.total_steps is None:
                raise ValueError(f"gmp: ramp_steps={value!r} is a fraction of the sparse phase, but total_steps is "
                                 "not set; give total_steps or an int number of steps")
        elif value is not None:
            _check_int("ramp_steps", value, minimum=1)
            if self._sparse_len is not None and value > self._sparse_len:
                raise ValueError(f"gmp: ramp_steps={value} is longer than the sparse phase ({self._sparse_len} "
                                 "steps); shorten it or raise total_steps")

    @property
    def exact_gradient(self) -> bool:
        return True  # pruned weights are zeroed in Zhu & Gupta: no gradient reaches them

    @property
    def ramp_length(self) -> int:
        """The ramp in optimizer steps (counted from the end of the dense warm-up)."""
        length = self._sparse_len
        if isinstance(self.ramp_steps, float):
            return max(1, round(self.ramp_steps * length))
        if self.ramp_steps is not None:
            return self.ramp_steps
        return _DEFAULT_RAMP_STEPS if length is None else max(1, round(_RAMP_FRACTION * length))

    def kept(self, sparse_step: int, target: PatternLike) -> int:
        """The kept count per group of M at ``sparse_step`` steps into the sparse phase."""
        target = Pattern.parse(target)
        left = max(0.0, 1.0 - sparse_step / self.ramp_length)
        return min(target.m, target.n + round((target.m - target.n) * left ** 3))

    def patterns(self, target: PatternLike) -> tuple[Pattern, ...]:
        """Every k:M the ramp can pass through, from M:M (dense) down to the target."""
        target = Pattern.parse(target)
        return tuple(Pattern(k, target.m) for k in range(target.m, target.n, -1)) + (target,)

    def _sparse_pattern(self, sparse_step: int, target: Pattern) -> Pattern:
        return Pattern(self.kept(sparse_step, target), target.m)


#: Method name -> config class (a constant table, not a registry).
METHODS: Mapping[str, type[Method]] = {cls.name: cls for cls in (Dense, STE, SRSTE, MDGF, SDGF, GMP)}


def resolve_method(method: Union[str, Method, Mapping[str, Any]] = "sdgf", **options: Any) -> Method:
    """A method config from a name plus options, a config (options replace its fields) or a
    ``to_dict()`` mapping. Unknown names and options raise ``ValueError`` listing the valid ones."""
    if isinstance(method, Mapping):
        data = dict(method)
        version = data.pop("version", CONFIG_VERSION)
        if version > CONFIG_VERSION:
            raise ValueError(f"method config version {version} is newer than this nmfx understands "
                             f"({CONFIG_VERSION}); upgrade nmfx")
        return resolve_method(data.pop("method", None), **data, **options)
    if isinstance(method, Method):
        cls, base = type(method), method
    elif isinstance(method, str) and method.strip().lower() in METHODS:
        cls, base = METHODS[method.strip().lower()], None
    else:
        raise ValueError(f"unknown method {method!r}; valid methods: {', '.join(METHODS)}")
    valid = [f.name for f in dataclasses.fields(cls)]
    unknown = sorted(set(options) - set(valid))
    if unknown:
        raise ValueError(f"unknown option(s) {', '.join(unknown)} for method {cls.name!r}; "
                         f"valid options: {', '.join(valid)}")
    return dataclasses.replace(base, **options) if base is not None else cls(**options)


_DECAYS = ("linear", "exponential")


def _decay_coef(decay: str, given: float | None, sparse_len: int | None) -> float:
    """MDGF's decay coefficient: ``given``, else fitted to :data:`_DECAY_FRACTION` of the sparse phase,
    else (open-ended run) the official 2e-4."""
    if given is not None:
        return float(given)
    if not sparse_len:
        return 2e-4
    decay_steps = max(1.0, _DECAY_FRACTION * sparse_len)
    return 1.0 / decay_steps if decay == "linear" else _EXP_DECAY_END_EXPONENT / decay_steps


def _decayed_alpha(decay: str, given: float | None, sparse_len: int | None, sparse_step: int) -> float:
    """MDGF's alpha ``sparse_step`` optimizer steps into the sparse phase."""
    coef = _decay_coef(decay, given, sparse_len)
    if decay == "linear":
        return max(0.0, 1.0 - coef * sparse_step)
    if given is None and sparse_len and sparse_step >= _DECAY_FRACTION * sparse_len:
        return 0.0  # the fitted exponential hands over to the hard mask where linear reaches 0
    return math.exp(-coef * sparse_step)


def _resolve_steps(value: Union[int, float], total: int | None) -> int:
    if isinstance(value, float):
        return 0 if total is None else int(round(value * total))
    return int(value)


def _check_int(name: str, value: Any, minimum: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"{name}={value!r}: expected an integer >= {minimum}")


def _check_number(name: str, value: Any, minimum: float, strict: bool = False) -> None:
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
    if not ok or value < minimum or (strict and value == minimum):
        raise ValueError(f"{name}={value!r}: expected a finite number {'>' if strict else '>='} {minimum}")


def _check_choice(name: str, value: Any, choices: Sequence[str]) -> None:
    if value not in choices:
        raise ValueError(f"{name}={value!r}: expected one of {', '.join(repr(c) for c in choices)}")
