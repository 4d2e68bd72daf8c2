"""``SparsifyConfig``: everything ``nmfx.sparsify`` was asked to do, as one frozen, versioned value.

It is parsed and checked once (patterns, method and its options, include/exclude globs), kept on the
model (``nmfx.report``, file headers and Hugging Face records store its :meth:`~SparsifyConfig.to_dict`),
and can be built ahead of time, logged, diffed and passed around::

    config = nmfx.SparsifyConfig.build({"attn.*": "2:4", "mlp.*": "1:8"}, "sdgf", total_steps=10_000)
    nmfx.sparsify(model, config)

``pattern`` is one N:M pattern for every weight, or an ordered mapping from globs (matched, like
include/exclude, against a weight's qualified name, its module's name and its role) to patterns: the
first matching entry gives a weight its pattern; a weight no entry matches stays dense ("no pattern
matched").
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any, Mapping, Optional, Sequence, Union

from nmfx.methods import Method, resolve_method
from nmfx.pattern import Pattern, PatternLike

__all__ = ["SparsifyConfig", "CONFIG_FORMAT_VERSION", "PatternSpec", "literal_glob"]

#: Version of :meth:`SparsifyConfig.to_dict`; bump on incompatible changes.
CONFIG_FORMAT_VERSION = 1

#: One pattern for every weight, or ``((glob, pattern), ...)`` in match order.
PatternSpec = Union[Pattern, tuple[tuple[str, Pattern], ...]]


@dataclass(frozen=True)
class SparsifyConfig:
    """What to sparsify and how. Build it with :meth:`build` (which checks everything) or :meth:`from_dict`.

    Attributes:
        pattern: a :class:`~nmfx.pattern.Pattern`, or ``((glob, Pattern), ...)`` (first match wins).
        method: the method config (schedule and gradient rule).
        include: globs a weight must match to be sparsified (None: every prunable weight but heads).
        exclude: globs of weights never sparsified (wins over include).
        version: :data:`CONFIG_FORMAT_VERSION` of the dict form.
    """

    pattern: PatternSpec
    method: Method
    include: Optional[tuple[str, ...]] = None
    exclude: tuple[str, ...] = ()
    version: int = CONFIG_FORMAT_VERSION

    @classmethod
    def build(cls, pattern: Union[PatternLike, Mapping[str, PatternLike]] = "1:8",
              method: Union[str, Method, Mapping[str, Any]] = "sdgf", *,
              include: Optional[Union[str, Sequence[str]]] = None,
              exclude: Optional[Union[str, Sequence[str]]] = None, **method_options: Any) -> "SparsifyConfig":
        """Parse and check the arguments of ``nmfx.sparsify``. Raises ValueError/TypeError naming the bad
        argument (for a mapping: the glob whose pattern is invalid or cannot be reached by the method)."""
        resolved = resolve_method(method, **method_options)
        spec = _parse_pattern(pattern)
        for glob, target in _entries(spec):
            try:
                resolved.patterns(target)  # a schedule that cannot reach the target fails here, before any change
            except ValueError as error:
                if glob is None:
                    raise
                raise ValueError(f"pattern entry {glob!r}: {error}") from None
        return cls(spec, resolved, _globs("include", include), _globs("exclude", exclude) or ())

    @property
    def per_layer(self) -> bool:
        """The pattern is a ``{glob: pattern}`` mapping."""
        return not isinstance(self.pattern, Pattern)

    @property
    def patterns(self) -> tuple[Pattern, ...]:
        """Every distinct target pattern, in entry order."""
        return tuple(dict.fromkeys(target for _, target in _entries(self.pattern)))

    def describe_pattern(self) -> str:
        """``"1:8"`` or ``"{attn.*: 2:4, mlp.*: 1:8}"``."""
        if isinstance(self.pattern, Pattern):
            return str(self.pattern)
        return "{" + ", ".join(f"{glob}: {target}" for glob, target in self.pattern) + "}"

    def pattern_value(self) -> Union[str, list[list[str]]]:
        """The pattern as ``nmfx.sparsify`` takes it, JSON-ready: ``"1:8"`` or ``[["attn.*", "2:4"], ...]``
        (pairs, not an object, so a JSON writer that sorts keys cannot change the match order)."""
        if isinstance(self.pattern, Pattern):
            return str(self.pattern)
        return [[glob, str(target)] for glob, target in self.pattern]

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready dict that :meth:`from_dict` turns back into an equal config."""
        return {"format_version": self.version, "pattern": self.pattern_value(), "method": self.method.to_dict(),
                "include": list(self.include) if self.include is not None else None, "exclude": list(self.exclude)}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> "SparsifyConfig":
        """The config of a :meth:`to_dict` dict (checked as :meth:`build` checks its arguments; a newer
        format version is refused)."""
        if not isinstance(data, Mapping):
            raise TypeError(f"a SparsifyConfig dict must be a mapping, got {type(data).__name__}")
        check_format_version(data.get("format_version"), CONFIG_FORMAT_VERSION, "SparsifyConfig dict")
        unknown = sorted(set(data) - {"format_version", "pattern", "method", "include", "exclude"})
        if unknown:
            raise ValueError(f"SparsifyConfig dict has unknown fields {unknown}")
        if "pattern" not in data or "method" not in data:
            raise ValueError("SparsifyConfig dict needs 'pattern' and 'method'")
        return cls.build(data["pattern"], data["method"], include=data.get("include"), exclude=data.get("exclude"))


def _parse_pattern(pattern: Any) -> PatternSpec:
    if isinstance(pattern, Mapping):
        if not pattern:
            raise ValueError("pattern mapping is empty; give at least one {glob: 'N:M'} entry")
        entries = []
        for glob, value in pattern.items():
            if not isinstance(glob, str) or not glob:
                raise TypeError(f"pattern mapping keys are globs (non-empty strings) over weight names, module names "
                                f"and roles, got {glob!r}")
            try:
                entries.append((glob, Pattern.parse(value)))
            except (TypeError, ValueError) as error:
                raise ValueError(f"pattern entry {glob!r}: {error}") from None
        return tuple(entries)
    if isinstance(pattern, (list, tuple)) and pattern and all(isinstance(e, (list, tuple)) and len(e) == 2
                                                              for e in pattern):
        return _parse_pattern(dict(pattern))  # the ((glob, pattern), ...) form of SparsifyConfig.pattern
    return Pattern.parse(pattern)


def _entries(spec: PatternSpec) -> list[tuple[Optional[str], Pattern]]:
    return [(None, spec)] if isinstance(spec, Pattern) else list(spec)


def _globs(argument: str, value: Any) -> Optional[tuple[str, ...]]:
    if value is None:
        return None
    if isinstance(value, str):
        return (value,)
    if isinstance(value, (list, tuple, set, frozenset)) and all(isinstance(v, str) for v in value):
        return tuple(value)
    raise TypeError(f"{argument}= takes a glob string or a list of them (weight names, module names or roles "
                    f"such as 'attn.*'), got {value!r}")


def literal_glob(name: str) -> str:
    """A glob matching exactly ``name`` (its ``*``, ``?`` and ``[`` escaped)."""
    return re.sub(r"([*?\[])", r"[\1]", name)


def check_format_version(version: Any, newest: int, where: str) -> int:
    """``version`` as read from a saved nmfx record: a positive integer this nmfx can read (ValueError
    naming ``where`` otherwise; a newer one asks to upgrade)."""
    if not isinstance(version, int) or isinstance(version, bool) or version < 1:
        raise ValueError(f"{where}: format_version must be a positive integer, got {version!r:.40}")
    if version > newest:
        raise ValueError(f"{where} has format {version}, newer than this nmfx reads ({newest}); upgrade nmfx")
    return version
