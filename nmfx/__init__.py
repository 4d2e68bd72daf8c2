"""nmfx: N:M structured sparsity for PyTorch, as torch.fx passes.

``nmfx.sparsify(model, pattern="1:8")`` rewrites a model's prunable linear ops into masked-weight ops
whose backward follows a progressive-gradient-flow method; ``nmfx.step(model)`` after each optimizer
step advances the schedules; ``nmfx.report(model)`` says what was done and why.
"""

from nmfx import ops  # registers torch.ops.nmfx.masked_linear
from nmfx.api import graphs, is_sparsified, masks, sparsify, states, step
from nmfx.refresh import refresh
from nmfx.config import SparsifyConfig
from nmfx.methods import MDGF, SDGF, SRSTE, STE, Dense, Method, resolve_method
from nmfx.pattern import MAX_M, Pattern, nm_mask
from nmfx.report import report, to_dot, to_networkx
from nmfx.stats import stats
from nmfx.inference import is_inference, to_inference
from nmfx.from_checkpoint import to_inference_from_checkpoint
from nmfx.layers import MaskedLinear, NMLinear
from nmfx.serialization import load, save
from nmfx.prune import prune
from nmfx.dense import to_dense

__all__ = [
    "sparsify", "step", "refresh", "stats", "masks", "to_inference", "to_inference_from_checkpoint", "is_inference", "save", "load", "states", "graphs", "report", "is_sparsified", "to_networkx", "to_dot",
    "prune", "to_dense", "MaskedLinear", "NMLinear", "SparsifyConfig",
    "Pattern", "nm_mask", "MAX_M", "Method", "Dense", "STE", "SRSTE", "MDGF", "SDGF", "resolve_method", "ops",
]
__version__ = "0.1.0"
