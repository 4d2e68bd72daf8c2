"""Decision pass: choose which annotated ops to sparsify, and record a reason for every choice.

Defaults: sparsify every prunable projection found (attention q/k/v/o, MLP up/gate/down, others);
skip the classifier / LM head (role ``head``) and any weight tied to another parameter (masking one use
would leave the other dense). ``include``/``exclude`` are fnmatch globs matched against the weight's
qualified name, its module's name and its role (``"attn.*"``, ``"mlp.down"``, ``"*.layers.0.*"``):
``include`` keeps only what it matches (and can bring back a head); ``exclude`` wins over it. A weight
whose input dimension is not divisible by every M the method's schedule uses is skipped, never padded.

Per-layer patterns: ``pattern`` may be ``((glob, Pattern), ...)`` (a :class:`nmfx.config.SparsifyConfig`
mapping). A weight that passes the filters takes the pattern of the first entry whose glob matches it
(name, module name or role); none matching leaves it dense ("no pattern matched"). An entry whose M does
not divide the input dimension of a weight it matches is a ValueError naming the glob (the user asked for
that pattern there). The chosen pattern is written into the annotation (``PrunableOp.pattern``).
"""

from __future__ import annotations

import dataclasses
import fnmatch
from dataclasses import dataclass, field
from typing import Mapping, Optional, Union

from torch import fx

from nmfx.meta import META_KEY, PrunableOp, annotated_nodes
from nmfx.methods import Method
from nmfx.config import SparsifyConfig
from nmfx.pattern import Pattern
from nmfx.passes.pipeline import RequestError

__all__ = ["Policy", "apply_policy"]


@dataclass(frozen=True)
class Policy:
    """What to sparsify: the pattern, the method (for its schedule's patterns) and the filters."""

    pattern: Union[Pattern, tuple[tuple[str, Pattern], ...]]  # one pattern, or (glob, pattern) entries
    method: Method
    include: Optional[tuple[str, ...]] = None
    exclude: tuple[str, ...] = ()
    tied: Mapping[str, str] = field(default_factory=dict)  # weight name -> the name it is tied to

    @classmethod
    def from_config(cls, config: SparsifyConfig, tied: Mapping[str, str]) -> "Policy":
        return cls(config.pattern, config.method, config.include, config.exclude, tied)

    def decide(self, op: PrunableOp) -> tuple[str, str]:
        """("sparsify" | "skip", reason)."""
        status, reason, _ = self.choose(op)
        return status, reason

    def choose(self, op: PrunableOp) -> tuple[str, str, Optional[Pattern]]:
        """("sparsify" | "skip", reason, the weight's pattern or None when skipped). Raises ValueError
        when a per-layer entry matches a weight its pattern cannot be applied to."""
        if op.weight in self.tied:
            return "skip", f"tied to {self.tied[op.weight]} (masking one use would leave the other dense)", None
        excluded = _matches(op, self.exclude)
        if excluded:
            return "skip", f"excluded by {excluded!r}", None
        included = _matches(op, self.include) if self.include is not None else ""
        if self.include is not None and not included:
            return "skip", f"not matched by include={list(self.include)}", None
        if op.role == "head" and not included:
            return "skip", "classifier / LM head (add it to include= to sparsify it)", None
        why = f"matched {included!r}" if included else f"role {op.role}"
        if isinstance(self.pattern, Pattern):
            target, entry = self.pattern, ""
        else:
            entry = next((glob for glob, _ in self.pattern if _matches(op, (glob,))), "")
            if not entry:
                return "skip", f"no pattern matched (entries: {[glob for glob, _ in self.pattern]})", None
            target = dict(self.pattern)[entry]
            why += f"; pattern entry {entry!r}"
        for pattern in self.method.patterns(target):
            if op.in_features % pattern.m:
                if entry:
                    raise RequestError(f"pattern entry {entry!r} ({target}) matches {op.weight}, whose input dim "
                                     f"{op.in_features} is not divisible by M={pattern.m}"
                                     f"{'' if pattern == target else ' (a stage of the schedule)'}; give it "
                                     "another pattern with an earlier entry, or exclude it")
                return "skip", (f"input dim {op.in_features} is not divisible by M={pattern.m} "
                                f"(pattern {pattern}); not padded"), None
        return "sparsify", why, target


def apply_policy(gm: fx.GraphModule, policy: Policy) -> fx.GraphModule:
    """Write the decision (``status``/``reason``) into every annotated node of ``gm``, in place."""
    for node in annotated_nodes(gm.graph):
        op = node.meta[META_KEY]
        if op.status != "candidate":
            continue
        status, reason, pattern = policy.choose(op)
        node.meta[META_KEY] = dataclasses.replace(op, status=status, reason=reason, pattern=pattern)
    return gm


def _matches(op: PrunableOp, globs) -> str:
    """The first glob matching the weight name, its module name or its role ("" if none)."""
    module = op.weight.rpartition(".")[0]
    for glob in globs or ():
        if any(fnmatch.fnmatchcase(text, glob) for text in (op.weight, module, op.role)):
            return glob
    return ""
