"""The graph annotation every nmfx pass reads and writes: one frozen dataclass in ``node.meta["nmfx"]``.

Analysis passes create it (``find_prunable``) or refine it with :func:`dataclasses.replace`
(``attention`` sets the role, ``policy`` the decision); rewrite passes read it and copy it onto the
nodes they create. Nothing else about a prunable op lives anywhere else.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch.fx

from nmfx.pattern import Pattern

__all__ = ["META_KEY", "PrunableOp", "annotation", "annotated_nodes", "node_arg"]

META_KEY = "nmfx"


@dataclass(frozen=True)
class PrunableOp:
    """A linear-like op whose weight is a parameter.

    Attributes:
        kind: how the op computes: ``"linear"`` (``nn.Linear``/``F.linear``/``aten.linear``), ``"addmm"``
            (GPT-2's ``Conv1D``), ``"matmul"`` (``x @ W``), ``"multihead_attention"`` (a projection weight of
            ``nn.MultiheadAttention``, rewritten at module level); after lowering ``"nm_linear"`` or
            ``"semi_structured"``. A rewritten (masked) op keeps the kind it was found with.
        weight: qualified name of the weight parameter in the user's model.
        target: the weight's attribute path inside the graph's own module (``get_attr`` target).
        bias: the bias's attribute path inside the graph's module, or None.
        transposed: the weight is stored ``[in, out]`` (groups then run along dim 0).
        weight_shape: the stored weight's shape.
        role: structural role (``attn.q``, ``attn.k``, ``attn.v``, ``attn.qkv``, ``attn.o``, ``mlp.up``,
            ``mlp.gate``, ``mlp.down``, ``head``, or ``other``), set by the attention pass and the role
            pass.
        role_source: what the role was derived from: ``"graph"`` (set by the attention pass), then
            ``"graph (scope)"`` (the scope's graph) or ``"graph (<frontend>)"`` (the whole-model analysis graph), ``"name"`` (a name hint), ``"module"`` (MultiheadAttention), or
            ``""`` (none).
        status: ``"candidate"`` until the policy decides ``"sparsify"`` or ``"skip"``, then ``"sparsified"``
            once rewritten and ``"packed"`` once lowered by ``nmfx.to_inference``.
        reason: why the policy decided as it did.
        pattern: the N:M pattern the policy chose for this weight (None until chosen, and when skipped).
    """

    kind: str
    weight: str
    target: str
    bias: Optional[str]
    transposed: bool
    weight_shape: tuple[int, ...]
    role: str = "other"
    role_source: str = ""
    status: str = "candidate"
    reason: str = ""
    pattern: Optional[Pattern] = None

    @property
    def group_dim(self) -> int:
        """The weight dimension that N:M groups run along: the input (reduction) dimension."""
        return 0 if self.transposed else 1

    @property
    def in_features(self) -> int:
        return self.weight_shape[self.group_dim]

    @property
    def out_features(self) -> int:
        return self.weight_shape[1 - self.group_dim]


def annotation(node: torch.fx.Node) -> Optional[PrunableOp]:
    """The node's nmfx annotation, if any."""
    return node.meta.get(META_KEY)


def annotated_nodes(graph: torch.fx.Graph) -> list[torch.fx.Node]:
    """Nodes carrying an nmfx annotation, in graph order."""
    return [node for node in graph.nodes if META_KEY in node.meta]


def node_arg(node: torch.fx.Node, index: int, name: str, default=None):
    """Argument ``index`` of a call node, whether it was passed positionally or as ``name=``."""
    if index < len(node.args):
        return node.args[index]
    return node.kwargs.get(name, default)
