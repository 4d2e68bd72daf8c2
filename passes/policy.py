"""Decision pass: choose which annotated ops to sparsify, and record a reason for every choice.

Defaults: sparsify every prunable projection found (attention q/k/v/o, MLP up/gate/down, others);
skip the classifier / LM head (role ``head``) and any weight tied to another parameter (masking one use
would leave the other dense). ``include``/``exclude`` are fnmatch globs matched against the weight's
qualified name, its module's name and its role (``"attn.*"``, ``"mlp.down"``, ``"*.layers.0.*"``):
``include`` keeps only what it matches (and can bring back a head); ``exclude`` wins over it. A weight
whose input dimension is not divisible by every M the method's schedule uses is skipped, never padded.
"""

from __future__ import annotations

import dataclasses
import fnmatch
from dataclasses import dataclass, field
from typing import Mapping, Optional

from torch import fx

from nmfx.meta import META_KEY, PrunableOp, annotated_nodes
from nmfx.methods import Method
from nmfx.pattern import Pattern

__all__ = ["Policy", "apply_policy"]


@dataclass(frozen=True)
class Policy:
    """What to sparsify: the pattern, the method (for its schedule's patterns) and the filters."""

    pattern: Pattern
    method: Method
    include: Optional[tuple[str, ...]] = None
    exclude: tuple[str, ...] = ()
    tied: Mapping[str, str] = field(default_factory=dict)  # weight name -> the name it is tied to

    def decide(self, op: PrunableOp) -> tuple[str, str]:
        """("sparsify" | "skip", reason)."""
        if op.weight in self.tied:
            return "skip", f"tied to {self.tied[op.weight]} (masking one use would leave the other dense)"
        excluded = _matches(op, self.exclude)
        if excluded:
            return "skip", f"excluded by {excluded!r}"
        included = _matches(op, self.include) if self.include is not None else ""
        if self.include is not None and not included:
            return "skip", f"not matched by include={list(self.include)}"
        if op.role == "head" and not included:
            return "skip", "classifier / LM head (add it to include= to sparsify it)"
        for pattern in self.method.patterns(self.pattern):
            if op.in_features % pattern.m:
                return "skip", (f"input dim {op.in_features} is not divisible by M={pattern.m} "
                                f"(pattern {pattern}); not padded")
        why = f"matched {included!r}" if included else f"role {op.role}"
        return "sparsify", why


def apply_policy(gm: fx.GraphModule, policy: Policy) -> fx.GraphModule:
    """Write the decision (``status``/``reason``) into every annotated node of ``gm``, in place."""
    for node in annotated_nodes(gm.graph):
        op = node.meta[META_KEY]
        if op.status != "candidate":
            continue
        status, reason = policy.decide(op)
        node.meta[META_KEY] = dataclasses.replace(op, status=status, reason=reason)
    return gm


def _matches(op: PrunableOp, globs) -> str:
    """The first glob matching the weight name, its module name or its role ("" if none)."""
    module = op.weight.rpartition(".")[0]
    for glob in globs or ():
        if any(fnmatch.fnmatchcase(text, glob) for text in (op.weight, module, op.role)):
            return glob
    return ""
