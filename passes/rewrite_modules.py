"""Module-level rewrite for modules whose forward cannot be traced but whose weight use is known.

``nn.MultiheadAttention`` reads ``in_proj_weight`` (or ``q/k/v_proj_weight``) and ``out_proj.weight``
directly inside ``F.multi_head_attention_forward`` — no traceable linear call to rewrite. Its class is
swapped, in place, for :class:`MaskedMultiheadAttention` (a subclass: ``isinstance`` checks, parameters
and state_dict names are unchanged), whose forward passes ``nmfx.ops.masked_weight`` of each sparsified
weight. The fused CPU/CUDA fast paths of ``nn.TransformerEncoderLayer`` read weights directly too, so
they are switched off for layers that hold sparsified weights (the math is the same slow path).
"""

from __future__ import annotations

import dataclasses
from typing import Callable, Optional

import torch.nn.functional as F
from torch import Tensor, nn

from nmfx.meta import PrunableOp
from nmfx.methods import Method
from nmfx.ops import masked_weight
from nmfx.pattern import Pattern
from nmfx.state import STATE_SUFFIX, NMState

__all__ = ["MaskedMultiheadAttention", "multihead_attention_ops", "rewrite_multihead_attention",
           "install_multihead_attention", "disable_fused_fast_path"]


class MaskedMultiheadAttention(nn.MultiheadAttention):
    """``nn.MultiheadAttention`` whose projection weights go through nmfx masks (never the fast path)."""

    def forward(self, query: Tensor, key: Tensor, value: Tensor, key_padding_mask: Optional[Tensor] = None,
                need_weights: bool = True, attn_mask: Optional[Tensor] = None,
                average_attn_weights: bool = True, is_causal: bool = False):
        batched = query.dim() == 3
        if self.batch_first and batched:
            query, key, value = (t.transpose(1, 0) for t in (query, key, value))
        separate = not self._qkv_same_embed_dim
        out, weights = F.multi_head_attention_forward(
            query, key, value, self.embed_dim, self.num_heads,
            None if separate else _masked(self, "in_proj_weight"), self.in_proj_bias,
            self.bias_k, self.bias_v, self.add_zero_attn, self.dropout,
            _masked(self.out_proj, "weight"), self.out_proj.bias,
            training=self.training, key_padding_mask=key_padding_mask, need_weights=need_weights,
            attn_mask=attn_mask, use_separate_proj_weight=separate,
            q_proj_weight=_masked(self, "q_proj_weight") if separate else None,
            k_proj_weight=_masked(self, "k_proj_weight") if separate else None,
            v_proj_weight=_masked(self, "v_proj_weight") if separate else None,
            average_attn_weights=average_attn_weights, is_causal=is_causal,
        )
        if self.batch_first and batched:
            out = out.transpose(1, 0)
        return out, weights


def multihead_attention_ops(name: str, module: nn.MultiheadAttention) -> list[tuple[nn.Module, str, PrunableOp]]:
    """(owner module, parameter name, annotation) for each projection weight of an MHA at ``name``."""
    prefix = f"{name}." if name else ""
    params = ["q_proj_weight", "k_proj_weight", "v_proj_weight"] if not module._qkv_same_embed_dim else ["in_proj_weight"]
    roles = {"in_proj_weight": "attn.qkv", "q_proj_weight": "attn.q", "k_proj_weight": "attn.k", "v_proj_weight": "attn.v"}
    found = []
    for param in params:
        weight = getattr(module, param)
        found.append((module, param, PrunableOp(
            kind="multihead_attention", weight=prefix + param, target=param,
            bias="in_proj_bias" if module.in_proj_bias is not None else None, transposed=False,
            weight_shape=tuple(weight.shape), role=roles[param], role_source="module")))
    out_weight = module.out_proj.weight
    found.append((module.out_proj, "weight", PrunableOp(
        kind="multihead_attention", weight=f"{prefix}out_proj.weight", target="out_proj.weight",
        bias="out_proj.bias" if module.out_proj.bias is not None else None, transposed=False,
        weight_shape=tuple(out_weight.shape), role="attn.o", role_source="module")))
    return found


def rewrite_multihead_attention(name: str, module: nn.MultiheadAttention, method: Method,
                                choose: Callable[[PrunableOp], tuple[str, str, Optional[Pattern]]]
                                ) -> tuple[list[PrunableOp], list[tuple[nn.Module, str, NMState]]]:
    """Decide each projection weight (``choose``: the policy's status, reason and pattern) and make the
    states of the chosen ones; changes nothing. Returns the annotations and the plan for
    :func:`install_multihead_attention`: (owner module, parameter name, state) per chosen weight."""
    ops, planned = [], []
    for owner, param, op in multihead_attention_ops(name, module):
        status, reason, pattern = choose(op)
        if status == "sparsify":
            planned.append((owner, param, NMState(param, getattr(owner, param), pattern, method, dim=1)))
            status = "sparsified"
        ops.append(dataclasses.replace(op, status=status, reason=reason, pattern=pattern))
    return ops, planned


def install_multihead_attention(module: nn.MultiheadAttention, planned: list[tuple[nn.Module, str, NMState]]) -> None:
    """Install step: attach the planned states and swap the class if any weight was chosen."""
    for owner, param, state in planned:
        owner.add_module(param + STATE_SUFFIX, state)
    if planned:
        module.__class__ = MaskedMultiheadAttention


def disable_fused_fast_path(model: nn.Module) -> None:
    """Switch off ``nn.TransformerEncoderLayer``'s fused inference path where a weight is sparsified:
    it reads the raw weights, bypassing masks. (Its gate checks ``activation_relu_or_gelu``.)"""
    for layer in model.modules():
        if isinstance(layer, nn.TransformerEncoderLayer):
            if any(isinstance(m, NMState) for m in layer.modules()):
                layer.activation_relu_or_gelu = False


def _masked(owner: nn.Module, param: str) -> Tensor:
    weight = getattr(owner, param)
    state = getattr(owner, param + STATE_SUFFIX, None)
    if not isinstance(state, NMState):
        return weight
    return masked_weight(weight, state.mask, state.alpha, state.srste_lambda if state.uses_srste else None,
                         state.exact_gradient)
