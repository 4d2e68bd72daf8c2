"""The masked-weight linear op, the contract between rewritten training graphs, compilers and kernels.

``torch.ops.nmfx.masked_linear(x, weight, mask, bias, alpha, srste_lambda, exact_gradient, transposed)``

Forward: ``y = x @ W_eff.T + b`` with ``W_eff = W * (m + alpha * (1 - m))`` (``alpha`` is a 0-d tensor:
1 is the dense forward, 0 the hard mask ``W * m``; a tensor so that a new alpha never recompiles).
``transposed=True`` means the weight is stored ``[in, out]`` (GPT-2's ``Conv1D``): ``y = x @ W_eff + b``.

Backward, with ``g = dL/dW_eff`` (in the weight's stored layout):

* ``dL/dx = dL/dy @ W_eff`` and ``dL/db`` as usual;
* ``dL/dW = g`` (straight-through), or ``g * (m + alpha (1 - m))`` when ``exact_gradient`` (the
  autograd-exact gradient of the forward);
* plus ``srste_lambda * (1 - m) * W`` when ``srste_lambda`` is given (SR-STE's decay of pruned weights).

The op is a ``torch.library`` custom op with a fake implementation and a registered autograd
formula, so ``torch.compile(fullgraph=True)`` and ``torch.export`` keep it as one node. Call it through
:func:`masked_linear`, which also applies autocast (the op itself is not autocast-aware).
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.fx
from torch import Tensor

__all__ = ["masked_linear", "masked_weight", "effective_weight", "weight_gradient", "is_dtensor", "gather_mask"]


def is_dtensor(t: object) -> bool:
    """``t`` is a ``torch.distributed.tensor.DTensor`` (checked without importing torch.distributed)."""
    return hasattr(t, "to_local") and hasattr(t, "device_mesh") and hasattr(t, "placements")


def gather_mask(mask: Tensor) -> Tensor:
    """The whole mask: ``mask`` itself, or, for a sharded mask (a DTensor: nmfx's storage under FSDP2), its
    shards all-gathered as bytes (a collective: every rank of the mesh calls it; 1 byte per element)."""
    if not is_dtensor(mask):
        return mask
    if mask.is_meta:
        return torch.empty(mask.shape, dtype=mask.dtype, device="meta")
    from torch.distributed.tensor import DTensor

    shards = DTensor.from_local(mask.to_local().view(torch.uint8), mask.device_mesh, mask.placements,
                                shape=mask.shape, stride=mask.stride())
    whole = shards.full_tensor()
    wait = getattr(whole, "wait", None)  # an AsyncCollectiveTensor: the plain tensor, once the gather is done
    return (wait() if callable(wait) else whole).view(torch.bool)


class _MaskShard:
    """What autograd keeps of a gathered mask between forward and backward: its shard (gathered again there)."""

    __slots__ = ("shard",)

    def __init__(self, shard: Tensor) -> None:
        self.shard = shard


def _call_with_shard_saved(op, whole: Tensor, shard: Tensor, *args):
    """``op(*args)`` (which takes ``whole``, the gathered ``shard``), its autograd keeping the shard instead of the
    whole mask, so the backward gathers it again (as FSDP2 does its weight): per-rank mask memory between forward
    and backward is that of the shard. Saved-tensor hooks already active (activation checkpointing, offloading)
    still see every other saved tensor."""
    if not torch.is_grad_enabled() or not torch._C._autograd._saved_tensors_hooks_is_enabled():
        return op(*args)
    outer = torch._C._autograd._top_saved_tensors_default_hooks(False)
    outer_pack, outer_unpack = outer if outer is not None else (None, None)
    ptr, shape = whole.data_ptr(), whole.shape

    def pack(t: Tensor):
        if t.dtype == torch.bool and t.shape == shape and t.data_ptr() == ptr:
            return _MaskShard(shard)
        return outer_pack(t) if outer_pack is not None else t

    def unpack(packed):
        if isinstance(packed, _MaskShard):
            return gather_mask(packed.shard)
        return outer_unpack(packed) if outer_unpack is not None else packed

    with torch.autograd.graph.saved_tensors_hooks(pack, unpack):
        return op(*args)


def effective_weight(weight: Tensor, mask: Tensor, alpha: Tensor) -> Tensor:
    """``W * (m + alpha (1 - m))``: one weight-sized temporary (the result), two passes."""
    scaled = weight * alpha.to(weight.dtype)
    return torch.where(mask, weight, scaled, out=scaled)


def weight_gradient(grad_eff: Tensor, weight: Tensor, mask: Tensor, alpha: Tensor,
                    srste_lambda: Optional[Tensor], exact_gradient: bool) -> Tensor:
    """The method's gradient for the dense weight from ``g = dL/dW_eff`` (module doc); may reuse ``g``."""
    if exact_gradient:
        grad_eff = effective_weight(grad_eff, mask, alpha)
    if srste_lambda is not None:
        # g + lambda W where pruned, g where kept: one temporary, two passes.
        decayed = torch.addcmul(grad_eff, weight, srste_lambda.to(weight.dtype))
        grad_eff = torch.where(mask, grad_eff, decayed, out=decayed)
    return grad_eff


def _linear(x: Tensor, weight: Tensor, bias: Optional[Tensor], transposed: bool) -> Tensor:
    return torch.nn.functional.linear(x, weight.t() if transposed else weight, bias)


@torch.library.custom_op("nmfx::masked_linear", mutates_args=())
def _masked_linear_op(
    x: Tensor,
    weight: Tensor,
    mask: Tensor,
    bias: Optional[Tensor],
    alpha: Tensor,
    srste_lambda: Optional[Tensor],
    exact_gradient: bool,
    transposed: bool,
) -> Tensor:
    return _linear(x, effective_weight(weight, mask, alpha), bias, transposed)


@_masked_linear_op.register_fake
def _masked_linear_fake(x, weight, mask, bias, alpha, srste_lambda, exact_gradient, transposed):
    out_features = weight.shape[1] if transposed else weight.shape[0]
    return x.new_empty((*x.shape[:-1], out_features))


def _setup_context(ctx, inputs, output) -> None:
    x, weight, mask, bias, alpha, srste_lambda, exact_gradient, transposed = inputs
    ctx.save_for_backward(x, weight, mask, alpha, srste_lambda)
    ctx.has_bias = bias is not None
    ctx.exact_gradient = exact_gradient
    ctx.transposed = transposed


def _backward(ctx, grad_out: Tensor):
    x, weight, mask, alpha, srste_lambda = ctx.saved_tensors
    need_x, need_w, _, need_b = ctx.needs_input_grad[:4]
    grad_x = grad_w = grad_b = None
    if need_x:
        w_eff = effective_weight(weight, mask, alpha)
        grad_x = grad_out @ (w_eff.t() if ctx.transposed else w_eff)
    if need_w:
        go = grad_out.reshape(-1, grad_out.shape[-1])
        xs = x.reshape(-1, x.shape[-1])
        grad_w = xs.t() @ go if ctx.transposed else go.t() @ xs
        grad_w = weight_gradient(grad_w, weight, mask, alpha, srste_lambda, ctx.exact_gradient)
    if need_b and ctx.has_bias:
        grad_b = grad_out.reshape(-1, grad_out.shape[-1]).sum(0)
    return grad_x, grad_w, None, grad_b, None, None, None, None


_masked_linear_op.register_autograd(_backward, setup_context=_setup_context)


@torch.library.custom_op("nmfx::masked_weight", mutates_args=())
def _masked_weight_op(
    weight: Tensor, mask: Tensor, alpha: Tensor, srste_lambda: Optional[Tensor], exact_gradient: bool
) -> Tensor:
    return effective_weight(weight, mask, alpha)


@_masked_weight_op.register_fake
def _masked_weight_fake(weight, mask, alpha, srste_lambda, exact_gradient):
    return torch.empty_like(weight)


def _setup_weight_context(ctx, inputs, output) -> None:
    weight, mask, alpha, srste_lambda, exact_gradient = inputs
    ctx.save_for_backward(weight, mask, alpha, srste_lambda)
    ctx.exact_gradient = exact_gradient


def _weight_backward(ctx, grad_eff: Tensor):
    weight, mask, alpha, srste_lambda = ctx.saved_tensors
    return weight_gradient(grad_eff, weight, mask, alpha, srste_lambda, ctx.exact_gradient), None, None, None, None


_masked_weight_op.register_autograd(_weight_backward, setup_context=_setup_weight_context)


def masked_weight(
    weight: Tensor,
    mask: Tensor,
    alpha: Optional[Tensor] = None,
    srste_lambda: Optional[Tensor] = None,
    exact_gradient: bool = False,
) -> Tensor:
    """``W_eff`` itself, with the method's gradient to ``W``: for consumers that take a weight rather
    than an input (``nn.MultiheadAttention``'s packed ``in_proj_weight``). Costs one weight-sized
    tensor that autograd keeps for the consumer's backward; ``masked_linear`` avoids that."""
    traced = _record_if_traced(masked_weight, (weight, mask, alpha, srste_lambda), {"exact_gradient": exact_gradient})
    if traced is not None:
        return traced
    if alpha is None:
        alpha = torch.zeros((), device=weight.device)
    if is_dtensor(mask) and not is_dtensor(weight):  # FSDP2: the weight is gathered for the forward, so the mask
        whole = gather_mask(mask)
        return _call_with_shard_saved(torch.ops.nmfx.masked_weight, whole, mask, weight, whole, alpha, srste_lambda,
                                      exact_gradient)
    return torch.ops.nmfx.masked_weight(weight, mask, alpha, srste_lambda, exact_gradient)


def masked_linear(
    x: Tensor,
    weight: Tensor,
    mask: Tensor,
    bias: Optional[Tensor] = None,
    alpha: Optional[Tensor] = None,
    srste_lambda: Optional[Tensor] = None,
    exact_gradient: bool = False,
    transposed: bool = False,
) -> Tensor:
    """Linear with an N:M-masked weight whose backward follows a gradient-flow method (module doc).

    Under autocast, ``x``, ``weight`` and ``bias`` are cast to the autocast dtype first (gradients flow
    back through the cast to the full-precision weight). A sharded mask (a DTensor, nmfx's storage under
    FSDP2) with a whole weight (FSDP2 gathers it for the forward) is gathered too (:func:`gather_mask`), and
    gathered again in the backward: between the two, autograd keeps only the shard."""
    traced = _record_if_traced(masked_linear, (x, weight, mask, bias, alpha, srste_lambda),
                               {"exact_gradient": exact_gradient, "transposed": transposed})
    if traced is not None:
        return traced
    if alpha is None:
        alpha = torch.zeros((), device=weight.device)
    device_type = x.device.type
    if device_type != "meta" and torch.is_autocast_enabled(device_type):  # meta has no autocast state
        dtype = torch.get_autocast_dtype(device_type)
        x, weight = x.to(dtype), weight.to(dtype)
        bias = bias.to(dtype) if bias is not None else None
    if is_dtensor(mask) and not is_dtensor(weight):
        whole = gather_mask(mask)
        return _call_with_shard_saved(torch.ops.nmfx.masked_linear, whole, mask, x, weight, whole, bias, alpha,
                                      srste_lambda, exact_gradient, transposed)
    return torch.ops.nmfx.masked_linear(x, weight, mask, bias, alpha, srste_lambda, exact_gradient, transposed)


def _record_if_traced(fn, args: tuple, kwargs: dict):
    """Under symbolic tracing, a node calling ``fn`` itself (None otherwise). ``torch.fx.wrap`` below covers
    code that names these functions from this module; this covers a graph module's generated code, which
    is re-traced when the graph module is unpickled (``torch.load`` of a whole sparsified model)."""
    proxy = next((a for a in args if isinstance(a, torch.fx.Proxy)), None)
    if proxy is None:
        return None
    return proxy.tracer.create_proxy("call_function", fn, args, kwargs)


torch.fx.wrap("masked_linear")
torch.fx.wrap("masked_weight")
