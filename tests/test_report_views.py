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


# ----------------------------------------------------------------------------------------------
# nmfx.report is built on demand: the record keeps sparsify's decisions, lowering is read from the model
# ----------------------------------------------------------------------------------------------
def test_report_of_an_inference_model_is_read_from_the_model():
    import torch
    from torch import nn

    from nmfx.accessors import record

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b, self.head = nn.Linear(16, 16), nn.Linear(16, 16), nn.Linear(16, 4)

        def forward(self, x):
            return self.head(self.b(torch.relu(self.a(x))))

    model = nmfx.sparsify(Net(), {"a*": "1:4", "b*": "2:8"}, "ste", example_inputs=(torch.randn(2, 16),))
    trained_rows = list(nmfx.report(model))
    deployed = nmfx.to_inference(model, backend="reference")
    assert record(deployed).rows == record(model).rows  # what sparsify decided: never patched by lowering
    assert [r.status for r in record(deployed).rows] == ["sparsified", "sparsified", "skip"]
    rows = {r.name: r for r in nmfx.report(deployed)}
    assert (rows["a.weight"].status, rows["a.weight"].op, rows["a.weight"].pattern) == ("packed", "nm_linear", "1:4")
    assert (rows["b.weight"].status, rows["b.weight"].density) == ("packed", 0.25)
    assert rows["head.weight"].status == "skip" and rows["head.weight"].reason == trained_rows[2].reason
    assert list(nmfx.report(model)) == trained_rows  # the trained model's report is unchanged
    deployed.b.note = "not semi-structured: (test)"  # the layer's own note is what the report says
    assert nmfx.report(deployed)[1].reason.endswith("; not semi-structured: (test)")
