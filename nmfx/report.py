"""Inspection: the per-weight report table and a networkx view of rewritten graphs."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Optional, Sequence

import networkx as nx
from torch import fx, nn

from nmfx.accessors import graphs, masks, record
from nmfx.config import SparsifyConfig
from nmfx.layers import NMLinear
from nmfx.meta import META_KEY, PrunableOp
from nmfx.methods import Method
from nmfx.pattern import Pattern
from nmfx.refresh import unrefreshed_states
from nmfx.tracing import dead_hooks

__all__ = ["ReportRow", "Report", "SparsifyRecord", "report", "to_networkx", "to_dot"]


@dataclass(frozen=True)
class ReportRow:
    """One weight nmfx looked at: what it is, and what was decided."""

    name: str
    role: str
    op: str
    shape: tuple[int, ...]
    pattern: str
    status: str  # "sparsified", "skip", or "packed" (after nmfx.to_inference)
    reason: str
    frontend: str
    density: Optional[float] = None  # of the current hard mask; None when not sparsified

    @classmethod
    def from_op(cls, op: PrunableOp, config: SparsifyConfig, frontend: str) -> "ReportRow":
        """The row of an annotation; its pattern is the one the policy chose, else the model-wide one
        (``"-"`` with per-layer patterns)."""
        return cls(name=op.weight, role=op.role, op=op.kind, shape=op.weight_shape,
                   pattern=str(op.pattern) if op.pattern is not None else default_pattern(config),
                   status="sparsified" if op.status == "sparsified" else "skip", reason=op.reason,
                   frontend=frontend)


def default_pattern(config: SparsifyConfig) -> str:
    """The report's pattern cell of a weight the policy gave no pattern."""
    return "-" if config.per_layer else str(config.pattern)


@dataclass
class SparsifyRecord:
    """What ``sparsify`` was asked (``config``) and decided (``rows``), kept on the model for ``report``."""

    config: SparsifyConfig
    rows: list[ReportRow]
    analysis_frontend: str
    analysis_note: str
    inference: bool = False  # lowered by nmfx.to_inference

    @property
    def pattern(self):
        """The config's pattern: a :class:`~nmfx.pattern.Pattern`, or ``((glob, Pattern), ...)``."""
        return self.config.pattern

    @property
    def method(self) -> Method:
        return self.config.method

    def pattern_of(self, weight: str) -> Optional[Pattern]:
        """The pattern a sparsified weight was given (None if it was not sparsified)."""
        for row in self.rows:
            if row.name == weight and row.status in ("sparsified", "packed"):
                return Pattern.parse(row.pattern)
        return None


class Report(list):
    """A list of :class:`ReportRow` that prints as an aligned table."""

    columns = ("name", "role", "op", "shape", "pattern", "density", "status", "reason", "frontend")

    def __init__(self, rows, header: str = "", notes: Sequence[str] = ()):
        super().__init__(rows)
        self.header = header
        self.notes = list(notes)  # e.g. hooks that can never run, printed under the table

    def __str__(self) -> str:
        cells = [[_cell(getattr(row, col)) for col in self.columns] for row in self]
        widths = [max([len(col)] + [len(c[i]) for c in cells]) for i, col in enumerate(self.columns)]
        line = lambda values: "  ".join(v.ljust(w) for v, w in zip(values, widths)).rstrip()
        out = [self.header] if self.header else []
        out += [line(self.columns), line(["-" * w for w in widths])] + [line(c) for c in cells]
        out += [f"note: {note}" for note in self.notes]
        return "\n".join(out)

    @property
    def sparsified(self) -> list[ReportRow]:
        return [row for row in self if row.status in ("sparsified", "packed")]


def report(model: nn.Module) -> Report:
    """Rows (name, role, op, shape, pattern, density, status, reason, frontend) for every weight nmfx
    considered; ``density`` is that of the current hard mask (none while a mask was never computed: a model
    sparsified on the meta device before ``nmfx.refresh``). ``print(report)`` gives a table, followed by
    ``report.notes``: one line per module holding hooks that can never run (registered after
    ``nmfx.sparsify`` on a module whose call a rewritten graph inlines)."""
    found = record(model)
    current = masks(model)
    pending = unrefreshed_states(model)
    lowered = _lowered(model) if found.inference else {}
    rows = []
    for row in found.rows:
        if row.name in lowered:  # packed by to_inference: what lowering did, read from the model now
            kind, reason, note = lowered[row.name]
            if reason is None:
                reason = f"{row.reason}; {note}" if note else row.reason
            row = dataclasses.replace(row, op=kind, status="packed", reason=reason)
        mask = current.get(row.name) if row.name not in pending else None
        density = float(mask.float().mean()) if mask is not None and row.status == "sparsified" else None
        if row.status == "packed":
            density = Pattern.parse(row.pattern).density
        rows.append(dataclasses.replace(row, density=density))
    sparsified = sum(row.status in ("sparsified", "packed") for row in rows)
    kind = "packed for inference" if found.inference else "sparsified"
    header = (f"nmfx: {sparsified}/{len(rows)} weights {kind} at {found.config.describe_pattern()} with method "
              f"{found.method.name}; analysis graph: {found.analysis_frontend}"
              + (f" ({found.analysis_note})" if found.analysis_note else ""))
    return Report(rows, header, dead_hooks(model))


def _lowered(model: nn.Module) -> dict[str, tuple[str, Optional[str], str]]:
    """``{weight: (kind, reason, note)}`` of every packed layer of an inference model: from the annotations of
    its graphs (whose reason includes lowering's; no note), else from the ``NMLinear`` itself (reason None: the
    recorded one stands, followed by the layer's note)."""
    out: dict[str, tuple[str, Optional[str], str]] = {}
    for gm in graphs(model).values():
        for node in gm.graph.nodes:
            op = node.meta.get(META_KEY)
            if op is not None and op.status == "packed":
                out[op.weight] = (op.kind, op.reason, "")
    for name, module in model.named_modules():
        weight = f"{name}.weight" if name else "weight"
        if isinstance(module, NMLinear) and weight not in out:
            out[weight] = (module.kind, None, module.note)
    return out


def to_networkx(gm: fx.GraphModule) -> nx.DiGraph:
    """The graph as a DiGraph: one node per fx node (keyed by name) with ``op``, ``target`` and, for
    annotated nodes, the nmfx annotation's fields (``nmfx_role``, ``nmfx_status``...); a ``call_module`` node also
    gets ``module_type`` (e.g. ``MaskedLinear`` or ``NMLinear``)."""
    graph = nx.DiGraph()
    for node in gm.graph.nodes:
        attrs = {"op": node.op, "target": _target_name(node.target)}
        if node.op == "call_module":  # e.g. a MaskedLinear / NMLinear that the graph calls
            attrs["module_type"] = type(gm.get_submodule(node.target)).__name__
        op = node.meta.get(META_KEY)
        if op is not None:
            attrs.update({f"nmfx_{k}": v for k, v in dataclasses.asdict(op).items()})
        graph.add_node(node.name, **attrs)
        for inp in node.all_input_nodes:
            graph.add_edge(inp.name, node.name)
    return graph


def to_dot(gm: fx.GraphModule) -> str:
    """Graphviz source of the graph, sparsified ops filled green and skipped ones grey."""
    graph = to_networkx(gm)
    lines = ["digraph nmfx {", "  node [shape=box, fontsize=10];"]
    for name, attrs in graph.nodes(data=True):
        label = f"{name}\\n{attrs['target']}" + (f" ({attrs['module_type']})" if "module_type" in attrs else "")
        style = ""
        if "nmfx_role" in attrs:
            label += f"\\n{attrs['nmfx_role']} [{attrs['nmfx_status']}]"
            color = "palegreen" if attrs["nmfx_status"] in ("sparsified", "packed") else "lightgrey"
            style = f", style=filled, fillcolor={color}"
        lines.append(f'  "{name}" [label="{label}"{style}];')
    lines += [f'  "{u}" -> "{v}";' for u, v in graph.edges]
    lines.append("}")
    return "\n".join(lines)


def _target_name(target) -> str:
    if isinstance(target, str):
        return target
    return getattr(target, "__qualname__", None) or getattr(target, "__name__", None) or str(target)


def _cell(value) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.3f}"
    if isinstance(value, tuple):
        return "x".join(map(str, value))
    return str(value)
