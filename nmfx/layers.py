"""The module types nmfx turns linear layers into: :class:`MaskedLinear` (training) and
:class:`NMLinear` (inference).

Both are installed by swapping the class of the user's own module object (``module.__class__ = ...``),
so the object, its name in the model, its ``state_dict`` keys and every hook registered on it (before or
after the swap) are kept. Rewritten graphs call these modules (``call_module``) instead of inlining
their weights, which is what keeps the hooks firing; ``torch.compile`` and ``torch.export`` trace
through their ``forward`` and see the ``nmfx::masked_linear`` / ``nmfx::nm_linear`` ops.

* ``nmfx.sparsify`` turns every plain ``nn.Linear`` whose call it rewrites into a :class:`MaskedLinear`
  (still an ``nn.Linear``: the optimizer, DDP/FSDP and ``isinstance`` checks see the dense weight).
* ``nmfx.to_inference`` turns every lowered ``nn.Linear`` / ``MaskedLinear`` and every lowered
  transformers ``Conv1D`` into an :class:`NMLinear`: a plain ``nn.Module`` (deliberately *not* an
  ``nn.Linear``: it has no dense ``weight``) holding buffers ``weight_values`` / ``weight_indices``
  (the packed format of :mod:`nmfx.packed`) and ``bias``, so module-walking tools such as
  ``torch.ao.quantization.quantize_dynamic`` see a type they skip instead of an ``nn.Linear`` without
  a weight. Other owners of a sparsified weight (a module holding several weights that its parent's
  forward uses through ``F.linear``) keep their class and get the same buffers.
"""

from __future__ import annotations

from typing import Optional, Union

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from nmfx.inference_ops import OP_FOR_BACKEND
from nmfx.ops import masked_linear
from nmfx.packed import MAX_PACKED_M, index_bits, pack_nm
from nmfx.pattern import Pattern, PatternLike

__all__ = ["MaskedLinear", "NMLinear", "check_layer_backend", "is_plain_linear", "is_conv1d", "become_nm_linear"]

#: NMLinear storage formats: nmfx's packed values + indices, or PyTorch's semi-structured 2:4 tensor.
KINDS = ("nm_linear", "semi_structured")


def is_plain_linear(module: nn.Module) -> bool:
    """``module`` is exactly an ``nn.Linear`` (or already a :class:`MaskedLinear`): its forward is known."""
    return type(module) in (nn.Linear, MaskedLinear)


def is_conv1d(module: Union[nn.Module, type]) -> bool:
    """``module`` (or class) is transformers' ``Conv1D`` (GPT-2 & co.: a linear layer whose weight is stored
    ``[in, out]``)."""
    cls = module if isinstance(module, type) else type(module)
    return cls.__name__ == "Conv1D" and cls.__module__.startswith("transformers.")


class MaskedLinear(nn.Linear):
    """An ``nn.Linear`` whose weight goes through its N:M mask: ``nmfx.ops.masked_linear`` over
    ``weight`` and the :class:`nmfx.state.NMState` child ``weight_nm`` (mask, alpha, SR-STE lambda).

    ``nmfx.sparsify`` makes these by swapping the class of the model's own ``nn.Linear`` objects; they are
    not meant to be constructed directly. Its ``repr`` shows the state child (pattern, method).
    """

    def forward(self, input: Tensor) -> Tensor:
        state = self.weight_nm  # its mask may be a shard (FSDP2): masked_linear gathers it with the weight
        return masked_linear(input, self.weight, state.mask, self.bias, state.alpha,
                             state.srste_lambda if state.uses_srste else None,
                             exact_gradient=state.exact_gradient)


class NMLinear(nn.Module):
    """A linear layer over a packed N:M weight: ``y = x @ W.T + bias`` by ``torch.ops.nmfx.nm_linear``.

    State (``state_dict`` keys): ``weight_values`` ``[out, K]`` and ``weight_indices`` (uint8) as described
    in :class:`nmfx.packed.PackedNMWeight`, and ``bias`` ``[out]`` (or None). With
    ``kind="semi_structured"`` the weight is instead the parameter ``weight_semi``, a
    ``torch.sparse.SparseSemiStructuredTensor`` used through ``F.linear`` (CUDA sm80+).

    Attributes: ``in_features``, ``out_features``, ``pattern``, ``backend`` (``"auto"``: the op's kernel for
    the tensors' device, C++ on the CPU and Triton on CUDA; ``"reference"``: ``nmfx::nm_linear_reference``,
    plain torch on every device; may be changed), ``kind`` and ``transposed``
    (the trained weight was stored ``[in, out]``, as a ``Conv1D``'s; the packed one is always ``[out, in]``),
    ``index_bits`` and ``note`` (what lowering said about the layer, e.g. why it is not semi-structured).
    There is no ``weight``: :meth:`dense_weight` unpacks one.
    """

    def __init__(self, in_features: int, out_features: int, pattern: PatternLike, bias: bool = True,
                 backend: str = "auto", device=None, dtype: Optional[torch.dtype] = None) -> None:
        super().__init__()
        pattern = Pattern.parse(pattern)
        if pattern.m > MAX_PACKED_M or in_features % pattern.m:
            raise ValueError(f"NMLinear: in_features={in_features} must be a multiple of M={pattern.m} "
                             f"(M <= {MAX_PACKED_M})")
        dtype = dtype or torch.get_default_dtype()
        kept = in_features // pattern.m * pattern.n
        self._setup(in_features, out_features, pattern, backend, "nm_linear", transposed=False)
        self.register_buffer("weight_values", torch.zeros(out_features, kept, dtype=dtype, device=device))
        self.register_buffer("weight_indices", torch.zeros(out_features, (kept * index_bits(pattern.m) + 7) // 8,
                                                           dtype=torch.uint8, device=device))
        self.register_parameter("bias", nn.Parameter(torch.zeros(out_features, dtype=dtype, device=device),
                                                     requires_grad=False) if bias else None)

    def _setup(self, in_features: int, out_features: int, pattern: Pattern, backend: str, kind: str,
               transposed: bool, note: str = "") -> None:
        self.note = note  # what lowering said about this layer (e.g. why it is not semi-structured); nmfx.report
        self.in_features = in_features
        self.out_features = out_features
        self.pattern = pattern
        self.backend = backend
        self.kind = kind
        self.transposed = transposed
        self.index_bits = index_bits(pattern.m)  # the width of weight_indices' codes

    @classmethod
    def from_linear(cls, linear: nn.Linear, pattern: PatternLike, mask: Optional[Tensor] = None,
                    backend: str = "auto") -> "NMLinear":
        """A new NMLinear holding ``linear``'s weight pruned to ``pattern`` (by ``mask``, or by magnitude)."""
        out = cls(linear.in_features, linear.out_features, pattern, bias=linear.bias is not None, backend=backend,
                  device=linear.weight.device, dtype=linear.weight.dtype)
        packed = pack_nm(linear.weight.detach(), out.pattern, mask)
        with torch.no_grad():
            out.weight_values.copy_(packed.values)
            out.weight_indices.copy_(packed.indices)
            if linear.bias is not None:
                out.bias.copy_(linear.bias)
        return out

    @property
    def backend(self) -> str:
        return self._backend

    @backend.setter
    def backend(self, backend: str) -> None:
        check_layer_backend(backend)
        self._backend = backend

    @property
    def weight_shape(self) -> tuple[int, int]:
        """The shape of the trained dense weight (``[in, out]`` when ``transposed``)."""
        shape = (self.out_features, self.in_features)
        return shape[::-1] if self.transposed else shape

    def forward(self, input: Tensor) -> Tensor:
        if self.kind == "semi_structured":
            return F.linear(input, self.weight_semi, self.bias)
        return OP_FOR_BACKEND[self.backend](input, self.weight_values, self.weight_indices, self.bias, self.pattern.n,
                                            self.pattern.m, self.index_bits)

    def dense_weight(self) -> Tensor:
        """The dense ``[out, in]`` masked weight (a new tensor; zeros where pruned)."""
        if self.kind == "semi_structured":
            return self.weight_semi.to_dense()
        eye = torch.eye(self.in_features, dtype=self.weight_values.dtype, device=self.weight_values.device)
        return torch.ops.nmfx.nm_linear_reference(eye, self.weight_values, self.weight_indices, None, self.pattern.n,
                                                  self.pattern.m, self.index_bits).t().contiguous()

    def extra_repr(self) -> str:
        text = (f"in_features={self.in_features}, out_features={self.out_features}, pattern={self.pattern}, "
                f"bias={self.bias is not None}")
        return text + (", kind=semi_structured" if self.kind == "semi_structured" else f", backend={self.backend}")


def check_layer_backend(backend: str) -> None:
    """ValueError unless ``backend`` is one a packed layer can call (a key of ``OP_FOR_BACKEND``)."""
    if backend not in OP_FOR_BACKEND:
        raise ValueError(f"NMLinear: backend must be 'auto' (the kernel registered for the tensors' device: C++ on "
                         f"the CPU, Triton on CUDA) or 'reference' (plain torch), got {backend!r}")


def become_nm_linear(module: nn.Module, in_features: int, out_features: int, pattern: Pattern, backend: str,
                     kind: str, transposed: bool, note: str = "") -> NMLinear:
    """Swap ``module``'s class to :class:`NMLinear` in place (its packed buffers are already registered and
    its dense weight and training state removed); returns it."""
    for stale in ("nf", "nx"):  # Conv1D's own names for the feature counts
        module.__dict__.pop(stale, None)
    module.__class__ = NMLinear
    module._setup(in_features, out_features, pattern, backend, kind, transposed, note)
    return module
