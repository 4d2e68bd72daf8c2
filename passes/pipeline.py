"""The pass runner: run declared passes in order, checking each one's contract and the graph invariants.

Modelled on ``torch.fx.passes.infra.PassManager(run_checks_after_each_pass=True)``. A :class:`Pass` names
the annotation statuses (``node.meta["nmfx"].status``) its graph may hold before it (``requires``) and
after it (``ensures``); :func:`run_pipeline` checks both around every pass, runs ``verify`` after each,
and names the pass that broke something and the passes that ran before it. The pipelines themselves are
declared in :mod:`nmfx.compile`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Optional

from torch import fx

from nmfx.meta import META_KEY, annotated_nodes
from nmfx.passes.verify import verify

__all__ = ["Pass", "run_pipeline", "PassFailure", "RequestError"]


class PassFailure(RuntimeError):
    """A pass raised, broke its contract, or left the graph breaking an invariant."""


class RequestError(ValueError):
    """What the user asked for cannot be done (e.g. a per-layer pattern that does not fit a layer it
    matches): passed through the pipeline unwrapped, since it is no compiler failure."""


@dataclass(frozen=True)
class Pass:
    """One graph pass: ``run(gm, context)`` changes ``gm`` in place. Its annotations' statuses must be in
    ``requires`` before and in ``ensures`` after (None: not checked)."""

    name: str
    run: Callable[[fx.GraphModule, Any], Any]
    requires: Optional[frozenset[str]] = None
    ensures: Optional[frozenset[str]] = None


def run_pipeline(passes: tuple[Pass, ...], gm: fx.GraphModule, context: Any = None,
                 check: Callable[[fx.GraphModule], None] = verify) -> fx.GraphModule:
    """Run ``passes`` on ``gm`` in order, checking each one's contract and ``check`` (the graph invariants)
    after it; returns ``gm``. Raises :class:`PassFailure` naming the pass (a :class:`RequestError` passes
    through as it is)."""
    ran: list[str] = []
    for graph_pass in passes:
        try:
            _check_statuses(gm, graph_pass.requires, "requires")
            graph_pass.run(gm, context)
            check(gm)
            _check_statuses(gm, graph_pass.ensures, "ensures")
        except RequestError:
            raise
        except Exception as error:
            raise PassFailure(f"pass {graph_pass.name!r} failed on {type(gm).__name__}: {error} "
                              f"(passes run before it: {', '.join(ran) or 'none'})") from error
        ran.append(graph_pass.name)
    return gm


def _check_statuses(gm: fx.GraphModule, allowed: Optional[frozenset[str]], which: str) -> None:
    if allowed is None:
        return
    for node in annotated_nodes(gm.graph):
        op = node.meta[META_KEY]
        if op.status not in allowed:
            raise AssertionError(f"{op.weight}: status {op.status!r}, but the pass {which} {sorted(allowed)}")
