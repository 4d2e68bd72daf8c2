"""A small pass pipeline that checks graph invariants after every pass.

Modelled on ``torch.fx.passes.infra.PassManager(run_checks_after_each_pass=True)``; a failure names
the pass that broke an invariant and the passes that ran before it.
"""

from __future__ import annotations

from typing import Callable, Sequence

from torch import fx

from nmfx.passes.verify import verify

__all__ = ["PassPipeline", "PassFailure", "RequestError"]

GraphPass = Callable[[fx.GraphModule], fx.GraphModule]


class PassFailure(RuntimeError):
    """A pass raised, or left the graph breaking an invariant."""


class RequestError(ValueError):
    """What the user asked for cannot be done (e.g. a per-layer pattern that does not fit a layer it
    matches): passed through the pipeline unwrapped, since it is no compiler failure."""


class PassPipeline:
    """Run named passes in order, verifying the graph after each one."""

    def __init__(self, passes: Sequence[tuple[str, GraphPass]], check: Callable[[fx.GraphModule], None] = verify):
        self.passes = list(passes)
        self.check = check

    def __call__(self, gm: fx.GraphModule) -> fx.GraphModule:
        ran: list[str] = []
        for name, graph_pass in self.passes:
            try:
                gm = graph_pass(gm)
                self.check(gm)
            except RequestError:
                raise
            except Exception as error:
                before = ", ".join(ran) or "none"
                raise PassFailure(f"pass {name!r} failed on {type(gm).__name__}: {error} "
                                  f"(passes run before it: {before})") from error
            ran.append(name)
        return gm
