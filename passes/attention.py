"""Analysis pass: tag each prunable op with its structural role in a transformer.

Roles come from the dataflow graph, not from module names:

* ``attn.q`` / ``attn.k`` / ``attn.v``: the nearest prunable ops upstream of the query, key and value
  of an attention — a ``scaled_dot_product_attention`` call, or a matmul -> softmax -> matmul chain.
  One op feeding several of them (GPT-2's fused ``c_attn``) is ``attn.qkv`` (or ``attn.kv``...).
* ``attn.o``: the nearest prunable op downstream of an attention's output.
* ``mlp.down``: a non-attention op whose every nearest upstream prunable op feeds only it;
  those upstream ops are ``mlp.up``, or ``mlp.gate`` for the one of two whose path passes through an
  activation (Llama's ``act(gate(x)) * up(x)``).
* ``head``: an op with no prunable op downstream (only meaningful on a whole-model graph; the caller
  says so with ``whole_model=True``).
* everything else: ``other``.

"Nearest" means: searching the graph without passing through another prunable op or attention. The
graph is viewed as a networkx DiGraph for these searches (:func:`nmfx.report.to_networkx`).
"""

from __future__ import annotations

import dataclasses
import operator

import networkx as nx
import torch
import torch.nn.functional as F
from torch import fx, nn

from nmfx.meta import META_KEY, annotation, node_arg

__all__ = ["tag_roles"]

aten = torch.ops.aten
_SDPA = {F.scaled_dot_product_attention, aten.scaled_dot_product_attention.default}
_SOFTMAX_FNS = {F.softmax, torch.softmax, aten._softmax.default, aten.softmax.int, torch.Tensor.softmax}
_MATMUL_FNS = {torch.matmul, torch.bmm, operator.matmul, aten.matmul.default, aten.bmm.default, aten.mm.default,
               torch.einsum, aten.einsum.default}
_MATMUL_METHODS = {"matmul", "bmm", "__matmul__"}
_ACTIVATION_FNS = {F.gelu, F.silu, F.relu, F.mish, F.gelu, torch.tanh, torch.sigmoid, torch.relu, F.sigmoid,
                   aten.gelu.default, aten.silu.default, aten.relu.default, aten.tanh.default,
                   aten.sigmoid.default}
_ACTIVATION_METHODS = {"tanh", "sigmoid", "relu", "gelu"}
_ACTIVATION_MODULES = (nn.GELU, nn.SiLU, nn.ReLU, nn.Tanh, nn.Sigmoid, nn.Mish)


def tag_roles(gm: fx.GraphModule, whole_model: bool = False) -> fx.GraphModule:
    """Set ``role`` (and ``role_source="graph"``) on every annotated node of ``gm``, in place."""
    graph = _digraph(gm.graph)
    prunable = {node for node in gm.graph.nodes if META_KEY in node.meta}
    if not prunable:
        return gm
    roles: dict[fx.Node, set[str]] = {node: set() for node in prunable}
    attention = [(node, q, k, v) for node, q, k, v in _attentions(gm)]
    stoppers = prunable | {a[0] for a in attention}
    for out, q, k, v in attention:
        for letter, source in (("q", q), ("k", k), ("v", v)):
            for producer in _nearest(graph, source, stoppers, upstream=True, include_start=True):
                if producer in prunable:
                    roles[producer].add(letter)
        for consumer in _nearest(graph, out, stoppers, upstream=False):
            if consumer in prunable and not roles[consumer]:
                roles[consumer].add("o")
    final: dict[fx.Node, str] = {}
    for node, letters in roles.items():
        if letters == {"o"}:
            final[node] = "attn.o"
        elif letters:
            final[node] = "attn." + "".join(sorted(letters - {"o"}, key="qkv".index))
    mlp_ops = [node for node in gm.graph.nodes if node in prunable and node not in final]
    downstream = {node: _nearest(graph, node, stoppers, upstream=False) & prunable for node in prunable}
    for node in mlp_ops:
        upstream = _nearest(graph, node, stoppers, upstream=True) & prunable
        # An MLP returns to the width it started from (the residual stream); a pooler -> classifier
        # pair does not, so the classifier stays a head.
        width = annotation(node).out_features
        feeders = [u for u in upstream if u not in final and downstream[u] == {node}
                   and annotation(u).in_features == width]
        if upstream and len(feeders) == len(upstream):
            final[node] = "mlp.down"
            gated = {u for u in feeders if _has_activation(gm, graph, u, node, stoppers)} if len(feeders) == 2 else set()
            for u in feeders:
                final[u] = "mlp.gate" if gated and len(gated) == 1 and u in gated else "mlp.up"
    for node in prunable:
        if node not in final:
            final[node] = "head" if whole_model and not downstream[node] else "other"
    for node, role in final.items():
        node.meta[META_KEY] = dataclasses.replace(annotation(node), role=role, role_source="graph")
    return gm


def _digraph(graph: fx.Graph) -> nx.DiGraph:
    digraph = nx.DiGraph()
    for node in graph.nodes:
        digraph.add_node(node)
        for user in node.users:
            digraph.add_edge(node, user)
    return digraph


def _nearest(graph: nx.DiGraph, start: fx.Node, stoppers: set, upstream: bool, include_start: bool = False) -> set:
    """Nodes reachable from ``start`` without passing through a stopper (stoppers themselves included)."""
    if include_start and start in stoppers:
        return {start}
    if upstream:
        view = nx.subgraph_view(graph, filter_edge=lambda u, v: v == start or v not in stoppers)
        return nx.ancestors(view, start)
    view = nx.subgraph_view(graph, filter_edge=lambda u, v: u == start or u not in stoppers)
    return nx.descendants(view, start)


def _attentions(gm: fx.GraphModule):
    """(output node, query, key, value) for every attention in the graph."""
    for node in gm.graph.nodes:
        if node.op == "call_function" and node.target in _SDPA:
            q, k, v = (node_arg(node, i, name) for i, name in enumerate(("query", "key", "value")))
            yield node, q, k, v
        elif _is_softmax(gm, node):
            scores = _walk_to_matmul(node, upstream=True)
            context = _walk_to_matmul(node, upstream=False)
            if scores is None or context is None or len(scores.args) < 2 or len(context.args) < 2:
                continue
            probs_side = context.args[0] if _depends_on(context.args[0], node) else context.args[1]
            value = context.args[1] if probs_side is context.args[0] else context.args[0]
            yield context, scores.args[0], scores.args[1], value


def _is_softmax(gm: fx.GraphModule, node: fx.Node) -> bool:
    if node.op == "call_function":
        return node.target in _SOFTMAX_FNS
    if node.op == "call_method":
        return node.target == "softmax"
    if node.op == "call_module":
        return isinstance(gm.get_submodule(node.target), nn.Softmax)
    return False


def _is_matmul(node: fx.Node) -> bool:
    return (node.op == "call_function" and node.target in _MATMUL_FNS) or (
        node.op == "call_method" and node.target in _MATMUL_METHODS)


def _walk_to_matmul(start: fx.Node, upstream: bool, limit: int = 8):
    """The first matmul reached from ``start`` along single-tensor chains (masks, scaling, dropout)."""
    frontier = [start]
    for _ in range(limit):
        nxt = []
        for node in frontier:
            neighbours = [a for a in node.all_input_nodes] if upstream else list(node.users)
            for other in neighbours:
                if _is_matmul(other):
                    return other
                nxt.append(other)
        frontier = nxt
    return None


def _depends_on(node, ancestor: fx.Node, limit: int = 8) -> bool:
    frontier = [node] if isinstance(node, fx.Node) else []
    for _ in range(limit):
        if ancestor in frontier:
            return True
        frontier = [a for n in frontier for a in n.all_input_nodes]
    return False


def _has_activation(gm: fx.GraphModule, graph: nx.DiGraph, source: fx.Node, sink: fx.Node, stoppers: set) -> bool:
    between = _nearest(graph, source, stoppers, upstream=False) & _nearest(graph, sink, stoppers, upstream=True)
    for node in between:
        if node.op == "call_function" and node.target in _ACTIVATION_FNS:
            return True
        if node.op == "call_method" and node.target in _ACTIVATION_METHODS:
            return True
        if node.op == "call_module" and isinstance(gm.get_submodule(node.target), _ACTIVATION_MODULES):
            return True
    return False
