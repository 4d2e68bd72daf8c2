"""nmfx: N:M structured sparsity for PyTorch, as torch.fx passes.

``nmfx.sparsify(model, pattern="1:8")`` rewrites a model's prunable linear ops into masked-weight ops
whose backward follows a progressive-gradient-flow method; ``nmfx.step(model)`` after each optimizer
step advances the schedules.
"""

from nmfx.pattern import MAX_M, Pattern, nm_mask

__all__ = ["MAX_M", "Pattern", "nm_mask"]
__version__ = "0.1.0"
