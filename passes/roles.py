"""Role pass: settle each annotated op's role from the best source available.

In order: the whole-model analysis graph's role (``graph (<frontend>)``: it sees how every projection is
used, e.g. which Linear feeds the output and is the head); else the scope graph's own role from the
attention pass (``graph (scope)``); else a hint from the module's name (``name``: ``q_proj`` -> ``attn.q``,
``lm_head`` -> ``head``; a ``head`` hint is ignored when a whole-model graph exists, since it would have
said so); else ``other``.
"""

from __future__ import annotations

import dataclasses
from typing import Mapping

from torch import fx

from nmfx.meta import META_KEY, PrunableOp, annotated_nodes

__all__ = ["adopt_roles", "NAME_HINTS"]

#: Last module-name component -> role, used only when no graph says what an op is.
NAME_HINTS = {
    "q_proj": "attn.q", "query": "attn.q", "q": "attn.q", "wq": "attn.q",
    "k_proj": "attn.k", "key": "attn.k", "k": "attn.k", "wk": "attn.k",
    "v_proj": "attn.v", "value": "attn.v", "v": "attn.v", "wv": "attn.v",
    "o_proj": "attn.o", "out_proj": "attn.o", "o": "attn.o", "wo_attn": "attn.o",
    "c_attn": "attn.qkv", "qkv": "attn.qkv", "in_proj": "attn.qkv",
    "gate_proj": "mlp.gate", "up_proj": "mlp.up", "fc1": "mlp.up", "c_fc": "mlp.up", "wi": "mlp.up",
    "down_proj": "mlp.down", "fc2": "mlp.down", "wo": "mlp.down",
    "lm_head": "head", "classifier": "head", "head": "head", "score": "head",
}


def adopt_roles(gm: fx.GraphModule, graph_roles: Mapping[str, str], frontend: str, whole_model: bool) -> fx.GraphModule:
    """Set every annotated node's ``role`` / ``role_source`` in place (see the module docstring);
    ``graph_roles``: ``{weight name: role}`` from the whole-model graph. Returns ``gm``."""
    for node in annotated_nodes(gm.graph):
        op: PrunableOp = node.meta[META_KEY]
        if op.weight in graph_roles:
            role, source = graph_roles[op.weight], f"graph ({frontend})"
        elif op.role != "other":
            role, source = op.role, "graph (scope)"
        else:
            hint = NAME_HINTS.get(op.weight.rpartition(".")[0].rpartition(".")[2])
            role, source = (hint, "name") if hint and (hint != "head" or not whole_model) else ("other", "")
        node.meta[META_KEY] = dataclasses.replace(op, role=role, role_source=source)
    return gm
