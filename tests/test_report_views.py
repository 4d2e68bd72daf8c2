"""nmfx/report.py views of a rewritten graph: to_networkx and to_dot carry the annotations."""

from __future__ import annotations

import nmfx
from tests.passes_common import (rewrite, Block)

# ----------------------------------------------------------------------------------------------
# networkx / dot views of a rewritten graph
# ----------------------------------------------------------------------------------------------
def test_to_networkx_and_dot_carry_annotations():
    gm = rewrite(Block(), "2:4", exclude=("mlp.up",))
    graph = nmfx.to_networkx(gm)
    annotated = {n: a for n, a in graph.nodes(data=True) if "nmfx_role" in a}
    assert len(annotated) == 5
    statuses = sorted(a["nmfx_status"] for a in annotated.values())
    assert statuses == ["skip"] + ["sparsified"] * 4
    assert all(graph.has_edge(inp.name, node.name) for node in gm.graph.nodes for inp in node.all_input_nodes)
    dot = nmfx.to_dot(gm)
    assert dot.startswith("digraph") and dot.count("palegreen") == 4 and dot.count("lightgrey") == 1
